/* mbv.h -- guest side of the mbvisor channel (docs/protocol.md, version 1), in C.
 *
 * A middlebox (DPDK, VPP, Click, ...) embeds this to hand commands in the grammar of
 * docs/grammar.md (e.g. "@R F 52:34:56:00:12:22 10.0.0.5@") to the host through the
 * shared-memory ring and to read the host's answers.  C11 + POSIX (pthreads), nothing else.
 *
 * Build:  cc -std=c11 -O2 -Wall -Wextra -Werror -pedantic -D_GNU_SOURCE -c mbv.c -pthread
 * (guest/c/Makefile: make -C guest/c BUILD=/some/dir).
 *
 *     struct mbv ch;
 *     struct mbv_response *r = malloc(sizeof *r);
 *     if (mbv_open_device(&ch, NULL) < 0) { fprintf(stderr, "%s\n", mbv_detail()); ... }
 *     int e = mbv_request(&ch, "@X 52:34:56:00:12:22@", 21, 5000, r);
 *     if (e < 0) ...                    // mbv_strerror(e), mbv_detail()
 *     else if (r->status != MBV_STATUS_OK) ...   // r->text holds one record per command
 *     mbv_close(&ch);
 *
 * Threads: one struct mbv may be shared by the threads of a process (a mutex plus flock
 * serialise publishing; waiting runs unlocked).  Processes: each process opens its own
 * struct mbv (after fork(), the child must not use the parent's handle; it opens its own).
 *
 * Errors: every function returning int gives 0 (or a count) on success and a negative
 * MBV_E* value on failure; mbv_detail() then says what happened, for an operator, in the
 * calling thread.  The values mirror docs/protocol.md section 13.
 */
#ifndef MBV_H
#define MBV_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors (docs/protocol.md section 13) ------------------------------------------- */
#define MBV_OK          0
#define MBV_ERROR      (-1)  /* ChannelError: no permission, several ivshmem devices, I/O, bad argument */
#define MBV_EDEVICE    (-2)  /* DeviceNotFound: no such file or no ivshmem device */
#define MBV_ETOOSMALL  (-3)  /* RegionTooSmall: the region is < 33024 bytes */
#define MBV_EBADREGION (-4)  /* BadRegion: wrong magic/version/header size, epoch 0, bad geometry;
                                mbv_format with a geometry that does not fit */
#define MBV_ETOOLONG   (-5)  /* CommandTooLong: payload > command_slot_size - 32; nothing written */
#define MBV_EBUSY      (-6)  /* ChannelBusy: the lock was not obtained by the deadline; nothing sent */
#define MBV_ERINGFULL  (-7)  /* RingFull: no slot came free by the deadline; nothing sent */
#define MBV_ETIMEOUT   (-8)  /* ResponseTimeout: no answer by the deadline; the command stays pending */
#define MBV_ELOST      (-9)  /* AnswerLost: the slot was reused after this writer's promise */
#define MBV_ERESET     (-10) /* ChannelReset: the region was re-initialised during the wait */
#define MBV_EANSWER    (-11) /* the response text is not an answer list (mbv_answers_*) */
#define MBV_EDOORBELL  (-12) /* DoorbellError: the ivshmem server cannot be reached, speaks something
                                else or serves another region (mbv_attach_doorbell) */

/* A short fixed name for an MBV_E* value ("ring full", ...); never NULL. */
const char *mbv_strerror(int error);
/* The message of the last failure in this thread (names the cause, e.g. which writer holds
 * a full ring); "" if none.  Valid until the thread's next mbv_* call. */
const char *mbv_detail(void);

/* ---- layout constants (docs/protocol.md sections 3, 6, 8) ---------------------------- */
#define MBV_HEADER_SIZE      256u
#define MBV_SLOT_HEADER_SIZE 32u
#define MBV_MIN_REGION_SIZE  33024u            /* 256 + 4 x (4096 + 4096) */
#define MBV_MAX_SLOT_SIZE    65536u
#define MBV_MAX_TEXT         (MBV_MAX_SLOT_SIZE - MBV_SLOT_HEADER_SIZE)
#define MBV_MAX_PROMISE_MS   86400000          /* promises are capped at 24 h (32-bit ms clock) */

#define MBV_STATUS_OK           0
#define MBV_STATUS_SYNTAX       1
#define MBV_STATUS_CORRUPT      2
#define MBV_STATUS_REFUSED      3
#define MBV_STATUS_REJECTED     4
#define MBV_STATUS_RATE_LIMITED 5
#define MBV_STATUS_UNAVAILABLE  6
#define MBV_STATUS_INTERNAL     7
/* "OK", "SYNTAX", ... or NULL for a value this library does not know (treat as failure;
 * Python names it "STATUS_<n>"). */
const char *mbv_status_name(unsigned status);

/* The region's lock-step state.  Treat as opaque; fields may change. */
struct mbv {
    int fd;                 /* the mapped file (flock is taken on it) */
    unsigned char *base;    /* the mapping */
    size_t size;            /* the mapped size = region_size in every check */
    dev_t dev;              /* identity of the region file: answers kept while waiting */
    ino_t ino;              /*   for a slot (the own-answers rule) are keyed by it   */
    pthread_mutex_t lock;   /* threads sharing this descriptor */
    char path[256];         /* for messages */
    volatile uint32_t *registers; /* BAR0 of an ivshmem-doorbell device, or NULL */
    int eventfd;            /* the host's eventfd from an ivshmem server, or -1 */
};

/* What mbv_submit hands back; pass it to mbv_wait. */
struct mbv_ticket {
    uint64_t seq;
    uint32_t epoch;
    uint32_t collect_by;    /* the promise written into the slot (0 = nobody will collect) */
};

/* One answer.  text is UTF-8 from the host (not checked; replace invalid sequences when
 * decoding), length bytes, followed by a NUL.  ~64 KiB: allocate it, do not put it on a
 * small stack. */
struct mbv_response {
    uint64_t seq;
    uint32_t epoch;
    uint16_t status;        /* MBV_STATUS_*; anything but 0 is a failure */
    uint16_t flags;         /* bit 0: TRUNCATED */
    int truncated;
    uint32_t length;
    char text[MBV_MAX_TEXT + 1];
};

struct mbv_geometry {
    uint32_t slot_count;          /* power of two, 4..1024 */
    uint32_t command_slot_size;   /* multiple of 64, 64..65536 */
    uint32_t response_slot_size;  /* multiple of 64, 64..65536 */
};

/* ---- opening -------------------------------------------------------------------------- */
/* A region file that exists (/dev/shm/NAME, or any file), mapped shared, whole size.
 * MBV_EDEVICE if it does not exist, MBV_ETOOSMALL if < 33024 bytes, MBV_ERROR otherwise. */
int mbv_open_path(struct mbv *ch, const char *path);
/* The ivshmem PCI device's BAR2 (/sys/bus/pci/devices/<bdf>/resource2); bdf NULL = the only
 * function with vendor 0x1af4, device 0x1110 (MBV_ERROR if there are several, MBV_EDEVICE if
 * none).  Turns on memory decoding ("enable") if needed.  Needs root.
 * An ivshmem-doorbell device (its BAR0 IVPosition register reads >= 1) is rung after every
 * publish (docs/protocol.md section 12); if BAR0 cannot be mapped, or on ivshmem-plain, there
 * is no doorbell and the host finds commands by looking, a little later. */
int mbv_open_device(struct mbv *ch, const char *bdf_or_null);
/* The same below another directory than /sys/bus/pci/devices (tests, odd sysfs mounts). */
int mbv_open_device_in(struct mbv *ch, const char *pci_devices_dir, const char *bdf_or_null);
/* Host side (tests, benchmarks): ring the host after every publish through the ivshmem
 * server at socket_path (`mbvisor ivshmem-server REGION=SOCKET`), which must serve this very
 * region file (same device and inode).  Connects as QEMU does, keeps the host's (peer 0,
 * vector 0) eventfd and closes the connection and everything else it received; the whole
 * setup is bounded by timeout_ms.  Replaces a doorbell attached before.  Call it before other
 * threads use the handle.  MBV_EDOORBELL if the server cannot be reached, speaks something
 * else or serves another region (nothing is kept open then). */
int mbv_attach_doorbell(struct mbv *ch, const char *socket_path, int timeout_ms);
void mbv_close(struct mbv *ch);

/* ---- commands ------------------------------------------------------------------------- */
/* Publish one payload (normally "@cmd@" frames; the library does not look at it), then ring
 * the channel's doorbell if it has one (outside the writers' lock).
 * Everything (the thread mutex, the flock, a free slot) is bounded by timeout_ms: one attempt
 * is always made (0 = now or not at all), and nothing is published after it once the deadline
 * has passed (MBV_EBUSY if the lock came late, MBV_ERINGFULL if the slot stayed taken).  collect_within_ms >= 0 is this writer's promise to have read
 * (or abandoned) the answer within that time -- after it, another writer may reuse the answered
 * slot (your later mbv_wait then gives MBV_ELOST); < 0 means nobody will collect the answer
 * (writer_pid 0, collect_by 0: the slot is free as soon as it is answered).  Promises are capped
 * at MBV_MAX_PROMISE_MS.
 * A blank region (magic all zero) is formatted with the default geometry first.
 * Errors: MBV_EBUSY, MBV_ERINGFULL, MBV_ETOOLONG, MBV_EBADREGION, MBV_ETOOSMALL, MBV_ERROR. */
int mbv_submit(struct mbv *ch, const void *payload, size_t len, int timeout_ms,
               int collect_within_ms, struct mbv_ticket *ticket);
/* Wait up to timeout_ms for the answer to a ticket of this process (any handle of the process
 * on the same region).  The slot is then marked COLLECTED (or, on timeout, ABANDONED: the
 * command stays pending and the host still answers it) under the writers' lock, tried for at
 * most 50 ms, and only while the ticket's promise holds; unmarked, the slot frees itself when
 * the promise passes.  A ticket submitted for nobody (collect_within_ms < 0) is never marked.
 * Errors: MBV_ETIMEOUT, MBV_ELOST, MBV_ERESET, MBV_ERROR. */
int mbv_wait(struct mbv *ch, const struct mbv_ticket *ticket, int timeout_ms,
             struct mbv_response *out);
/* Submit and wait under one deadline, which is also the promise.  ticket may be NULL. */
int mbv_request(struct mbv *ch, const void *payload, size_t len, int timeout_ms,
                struct mbv_response *out, struct mbv_ticket *ticket);

/* Re-initialise the region explicitly: a new random epoch (different from the current one),
 * geometry g or (NULL) the default for the region's size.  Every pending command and answer
 * is dropped; waiters get MBV_ERESET.  Writes the new epoch to *epoch if not NULL. */
int mbv_format(struct mbv *ch, const struct mbv_geometry *g, int timeout_ms, uint32_t *epoch);

/* ---- inspection (mbvctl -r); reads only, marks nothing ------------------------------- */
struct mbv_state {
    int state;              /* MBV_BLANK, MBV_UNUSABLE or MBV_READY */
    char problem[160];      /* MBV_UNUSABLE: why */
    struct mbv_geometry geometry;
    uint32_t guest_epoch, host_epoch;
    uint64_t publish, consume; /* consume is 0 unless host_epoch == guest_epoch */
};
enum { MBV_BLANK = 0, MBV_UNUSABLE = 1, MBV_READY = 2 };
int mbv_describe(struct mbv *ch, struct mbv_state *st);
/* The answer in the response slot of seq (current epoch), if it is there and intact:
 * 1 and *out filled, 0 if not there. */
int mbv_peek(struct mbv *ch, uint64_t seq, struct mbv_response *out);

/* ---- the answer list (docs/protocol.md section 6) ------------------------------------ */
/* A record is "STATUS code[ message]" then lines indented by two spaces.  Pointers point
 * into the text given (not NUL-terminated; use the lengths). */
struct mbv_record {
    const char *status; size_t status_len;   /* "OK", "SYNTAX", ...: ok iff "OK" */
    const char *code; size_t code_len;       /* "ok", "syntax", "not-applied", ... */
    const char *message; size_t message_len; /* may be empty */
    const char *lines; size_t lines_len;     /* the indented lines, raw (see next_line) */
    unsigned line_count;
};
struct mbv_answers { const char *text; size_t len, pos; };

/* How many records the text holds, or MBV_EANSWER if it is not an answer list (then show
 * the text as it is).  An empty text is not an answer list.  STATUS is checked on ASCII
 * (Python's str.isupper() on the decoded text): a status with non-ASCII letters, which no
 * host writes (section 8's names are ASCII), may be judged differently from answers.parse. */
int mbv_answers_count(const char *text, size_t len);
void mbv_answers_init(struct mbv_answers *it, const char *text, size_t len);
/* 1 and *rec filled, 0 at the end, MBV_EANSWER on a line that is not a record. */
int mbv_answers_next(struct mbv_answers *it, struct mbv_record *rec);
/* The record's indented lines without their indent: *cursor starts at 0; 1 per line, 0 at
 * the end. */
int mbv_record_next_line(const struct mbv_record *rec, size_t *cursor, const char **line, size_t *len);
int mbv_record_ok(const struct mbv_record *rec);

/* zlib-compatible CRC-32 (IEEE, reflected 0xEDB88320): crc = mbv_crc32(0, data, n) and
 * chained calls; mbv_crc32(0, "123456789", 9) == 0xCBF43926. */
uint32_t mbv_crc32(uint32_t crc, const void *data, size_t len);

/* Answers this library reads for the process while it waits for a slot (the own-answers
 * rule, docs/protocol.md section 9) are kept for the process's waiters in a process-wide
 * stash of MBV_STASH_ENTRIES answers, keyed by (region file, epoch, seq); a fork()ed child
 * starts with an empty one.  When it is full, entries of an older epoch or whose
 * promise has passed are dropped first; if none can be dropped, no more answers are taken
 * and the slot stays busy (submit then fails with MBV_ERINGFULL at its deadline, or another
 * thread's mbv_wait reads the answer).  Waiting for your tickets frees entries. */
#define MBV_STASH_ENTRIES 64

#ifdef __cplusplus
}
#endif
#endif /* MBV_H */
