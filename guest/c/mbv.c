/* mbv.c -- guest side of the mbvisor channel, written from docs/protocol.md (version 1).
 * See mbv.h for the API.  Section numbers (section 9, ...) refer to docs/protocol.md. */
#include "mbv.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if ATOMIC_LLONG_LOCK_FREE != 2 || ATOMIC_INT_LOCK_FREE != 2
#error "the channel needs lock-free 32- and 64-bit atomics (docs/protocol.md section 11)"
#endif

/* ---- layout (sections 3-6, 8) --------------------------------------------------------- */
enum {
    H_MAGIC = 0, H_VERSION = 4, H_SLOT_COUNT = 8, H_CMD_SIZE = 12, H_RESP_SIZE = 16,
    H_GUEST_EPOCH = 20, H_PUBLISH = 24, H_CONSUME = 32, H_HOST_EPOCH = 40,
    C_SEQ = 0, C_EPOCH = 8, C_LENGTH = 12, C_CRC = 16, C_PID = 20, C_STATE = 24, C_COLLECT_BY = 28,
    R_SEQ = 0, R_EPOCH = 8, R_LENGTH = 12, R_CRC = 16, R_STATUS = 20, R_FLAGS = 22,
    ST_FREE = 0, ST_PUBLISHED = 1, ST_COLLECTED = 2, ST_ABANDONED = 3,
};
#define VERSION 1u
#define MIN_SLOTS 4u
#define MAX_SLOTS 1024u
#define DEFAULT_SLOT_SIZE 4096u
#define FLAG_TRUNCATED 1u
#define WAIT_CEILING_US 1000   /* section 12: guest wait() and submit() retries */
#define SPIN_NS 200000         /* yield-only for this long before sleeping: C polls in ~1 us, so
                                * Python's 20 yields would end before a Python host answers */
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110

static const unsigned char MAGIC[4] = {'M', 'B', 'V', 'R'};

/* ---- errors ---------------------------------------------------------------------------- */
static _Thread_local char detail_buf[512];

const char *mbv_detail(void) { return detail_buf; }

static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail_buf, sizeof detail_buf, fmt, ap);
    va_end(ap);
    return code;
}

const char *mbv_strerror(int error)
{
    switch (error) {
    case MBV_OK: return "ok";
    case MBV_ERROR: return "channel error";
    case MBV_EDEVICE: return "device not found";
    case MBV_ETOOSMALL: return "region too small";
    case MBV_EBADREGION: return "bad region";
    case MBV_ETOOLONG: return "command too long";
    case MBV_EBUSY: return "channel busy";
    case MBV_ERINGFULL: return "ring full";
    case MBV_ETIMEOUT: return "response timeout";
    case MBV_ELOST: return "answer lost";
    case MBV_ERESET: return "channel reset";
    case MBV_EANSWER: return "not an answer list";
    case MBV_EDOORBELL: return "doorbell error";
    default: return "unknown error";
    }
}

const char *mbv_status_name(unsigned status)
{
    static const char *const names[] = {"OK", "SYNTAX", "CORRUPT", "REFUSED", "REJECTED",
                                        "RATE_LIMITED", "UNAVAILABLE", "INTERNAL"};
    return status < sizeof names / sizeof names[0] ? names[status] : NULL;
}

/* ---- CRC-32 (section 7) ---------------------------------------------------------------- */
static const uint32_t crc_table[256] = {
    0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u, 0x706af48fu,
    0xe963a535u, 0x9e6495a3u, 0x0edb8832u, 0x79dcb8a4u, 0xe0d5e91eu, 0x97d2d988u,
    0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u, 0x90bf1d91u, 0x1db71064u, 0x6ab020f2u,
    0xf3b97148u, 0x84be41deu, 0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u,
    0x136c9856u, 0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u,
    0xfa0f3d63u, 0x8d080df5u, 0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u, 0xa2677172u,
    0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu, 0x35b5a8fau, 0x42b2986cu,
    0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u, 0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u,
    0x26d930acu, 0x51de003au, 0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u,
    0xcfba9599u, 0xb8bda50fu, 0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u,
    0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du, 0x76dc4190u, 0x01db7106u,
    0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu, 0x9fbfe4a5u, 0xe8b8d433u,
    0x7807c9a2u, 0x0f00f934u, 0x9609a88eu, 0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du,
    0x91646c97u, 0xe6635c01u, 0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu,
    0x6c0695edu, 0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u, 0x65b0d9c6u, 0x12b7e950u,
    0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u, 0xfbd44c65u,
    0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u, 0x4adfa541u, 0x3dd895d7u,
    0xa4d1c46du, 0xd3d6f4fbu, 0x4369e96au, 0x346ed9fcu, 0xad678846u, 0xda60b8d0u,
    0x44042d73u, 0x33031de5u, 0xaa0a4c5fu, 0xdd0d7cc9u, 0x5005713cu, 0x270241aau,
    0xbe0b1010u, 0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
    0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u, 0x2eb40d81u,
    0xb7bd5c3bu, 0xc0ba6cadu, 0xedb88320u, 0x9abfb3b6u, 0x03b6e20cu, 0x74b1d29au,
    0xead54739u, 0x9dd277afu, 0x04db2615u, 0x73dc1683u, 0xe3630b12u, 0x94643b84u,
    0x0d6d6a3eu, 0x7a6a5aa8u, 0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u,
    0xf00f9344u, 0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu,
    0x196c3671u, 0x6e6b06e7u, 0xfed41b76u, 0x89d32be0u, 0x10da7a5au, 0x67dd4accu,
    0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u, 0xd6d6a3e8u, 0xa1d1937eu,
    0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u, 0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu,
    0xd80d2bdau, 0xaf0a1b4cu, 0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u,
    0x316e8eefu, 0x4669be79u, 0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u,
    0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu, 0xc5ba3bbeu, 0xb2bd0b28u,
    0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u, 0x2cd99e8bu, 0x5bdeae1du,
    0x9b64c2b0u, 0xec63f226u, 0x756aa39cu, 0x026d930au, 0x9c0906a9u, 0xeb0e363fu,
    0x72076785u, 0x05005713u, 0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u,
    0x92d28e9bu, 0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u, 0x86d3d2d4u, 0xf1d4e242u,
    0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u, 0x18b74777u,
    0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu, 0x8f659effu, 0xf862ae69u,
    0x616bffd3u, 0x166ccf45u, 0xa00ae278u, 0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u,
    0xa7672661u, 0xd06016f7u, 0x4969474du, 0x3e6e77dbu, 0xaed16a4au, 0xd9d65adcu,
    0x40df0b66u, 0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
    0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u, 0xcdd70693u,
    0x54de5729u, 0x23d967bfu, 0xb3667a2eu, 0xc4614ab8u, 0x5d681b02u, 0x2a6f2b94u,
    0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu, 0x2d02ef8du,
};

uint32_t mbv_crc32(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = data;
    crc = ~crc;
    while (len--)
        crc = crc_table[(crc ^ *p++) & 0xffu] ^ (crc >> 8);
    return ~crc;
}

/* ---- shared-memory access (section 11): aligned atomic loads and stores ---------------- */
static uint32_t ld32(const unsigned char *p)
{
    return le32toh(atomic_load_explicit((_Atomic uint32_t *)(uintptr_t)p, memory_order_relaxed));
}

static uint64_t ld64(const unsigned char *p)
{
    return le64toh(atomic_load_explicit((_Atomic uint64_t *)(uintptr_t)p, memory_order_relaxed));
}

static uint32_t ld32_acquire(const unsigned char *p)
{
    return le32toh(atomic_load_explicit((_Atomic uint32_t *)(uintptr_t)p, memory_order_acquire));
}

static void st32(unsigned char *p, uint32_t v)
{
    atomic_store_explicit((_Atomic uint32_t *)(void *)p, htole32(v), memory_order_relaxed);
}

static void st64(unsigned char *p, uint64_t v)
{
    atomic_store_explicit((_Atomic uint64_t *)(void *)p, htole64(v), memory_order_relaxed);
}

static void put32(unsigned char *p, uint32_t v)  /* private buffers */
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* ---- time and back-off (sections 9, 12) ------------------------------------------------ */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CLOCK_MONOTONIC milliseconds modulo 2^32, never 0 (0 means "no promise"). */
static uint32_t clock_ms(int64_t ns)
{
    uint32_t ms = (uint32_t)((uint64_t)ns / 1000000u);
    return ms ? ms : 1;
}

/* The promise for a deadline: its millisecond, rounded up, so it never comes before it. */
static uint32_t promise_at(int64_t deadline_ns)
{
    return clock_ms(deadline_ns + 999999);
}

static int promise_passed(uint32_t collect_by, int64_t now)
{
    return collect_by != 0 && (int32_t)(clock_ms(now) - collect_by) >= 0;
}

static int64_t deadline_after(int timeout_ms)
{
    return now_ns() + (int64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000;
}

struct backoff {
    int64_t spin_until; /* 0: not started */
    long pause_us;
};

/* Idle polls yield for the first SPIN_NS; then sleep 50 us, doubling to 1 ms; never past
 * the deadline. */
static void backoff_wait(struct backoff *b, int64_t deadline)
{
    int64_t now = now_ns();
    if (b->spin_until == 0)
        b->spin_until = now + SPIN_NS;
    if (now < b->spin_until) {
        sched_yield();
        return;
    }
    b->pause_us = b->pause_us ? b->pause_us * 2 : 50;
    if (b->pause_us > WAIT_CEILING_US)
        b->pause_us = WAIT_CEILING_US;
    int64_t pause = (int64_t)b->pause_us * 1000, left = deadline - now_ns();
    if (left <= 0)
        return;
    if (pause > left)
        pause = left;
    struct timespec ts = {.tv_sec = (time_t)(pause / 1000000000), .tv_nsec = (long)(pause % 1000000000)};
    nanosleep(&ts, NULL);
}

/* ---- header (sections 3, 4) ------------------------------------------------------------ */
struct hdr {
    unsigned char magic[4];
    uint32_t version, header_size;
    struct mbv_geometry g;
    uint32_t guest_epoch, host_epoch;
    uint64_t publish, consume;
};

static void read_header(const struct mbv *ch, struct hdr *h)
{
    const unsigned char *b = ch->base;
    uint32_t magic = atomic_load_explicit((_Atomic uint32_t *)(uintptr_t)(b + H_MAGIC), memory_order_acquire);
    memcpy(h->magic, &magic, 4);                      /* the bytes as they are in memory */
    uint32_t vh = ld32(b + H_VERSION);
    h->version = vh & 0xffffu;
    h->header_size = vh >> 16;
    h->g.slot_count = ld32(b + H_SLOT_COUNT);
    h->g.command_slot_size = ld32(b + H_CMD_SIZE);
    h->g.response_slot_size = ld32(b + H_RESP_SIZE);
    h->guest_epoch = ld32(b + H_GUEST_EPOCH);
    h->publish = ld64(b + H_PUBLISH);
    h->host_epoch = ld32_acquire(b + H_HOST_EPOCH);   /* before consume (section 11) */
    h->consume = ld64(b + H_CONSUME);
    atomic_thread_fence(memory_order_acquire);        /* the header before the slots */
}

static int blank(const struct hdr *h)
{
    static const unsigned char zero[4];
    return memcmp(h->magic, zero, 4) == 0;
}

static uint64_t host_consume(const struct hdr *h)
{
    return h->host_epoch == h->guest_epoch ? h->consume : 0;
}

static uint64_t ring_size(const struct mbv_geometry *g)
{
    return MBV_HEADER_SIZE + (uint64_t)g->slot_count * ((uint64_t)g->command_slot_size + g->response_slot_size);
}

static const char *geometry_problem(const struct mbv_geometry *g, size_t region_size, char *buf, size_t n)
{
    uint32_t count = g->slot_count;
    if (count < MIN_SLOTS || count > MAX_SLOTS || (count & (count - 1)))
        return snprintf(buf, n, "slot count %u is not a power of two in %u..%u", count, MIN_SLOTS, MAX_SLOTS), buf;
    const char *names[2] = {"command", "response"};
    uint32_t sizes[2] = {g->command_slot_size, g->response_slot_size};
    for (int i = 0; i < 2; i++)
        if (sizes[i] < 2 * MBV_SLOT_HEADER_SIZE || sizes[i] > MBV_MAX_SLOT_SIZE || sizes[i] % 64)
            return snprintf(buf, n, "%s slot size %u is not a multiple of 64 in 64..%u", names[i], sizes[i],
                            MBV_MAX_SLOT_SIZE), buf;
    if (ring_size(g) > region_size)
        return snprintf(buf, n, "ring needs %llu bytes but the region has %zu",
                        (unsigned long long)ring_size(g), region_size), buf;
    return NULL;
}

/* Section 4's checks, in its order; NULL if the header is valid. */
static const char *header_problem(const struct hdr *h, size_t region_size, char *buf, size_t n)
{
    if (memcmp(h->magic, MAGIC, 4) != 0)
        return snprintf(buf, n, "bad magic %02x %02x %02x %02x; expected MBVR (not an mbvisor channel)",
                        h->magic[0], h->magic[1], h->magic[2], h->magic[3]), buf;
    if (h->version != VERSION)
        return snprintf(buf, n, "protocol version %u; this side speaks version %u", h->version, VERSION), buf;
    if (h->header_size != MBV_HEADER_SIZE)
        return snprintf(buf, n, "header size %u; expected %u", h->header_size, MBV_HEADER_SIZE), buf;
    if (h->guest_epoch == 0)
        return snprintf(buf, n, "guest epoch is 0 (region not initialised)"), buf;
    return geometry_problem(&h->g, region_size, buf, n);
}

static size_t cmd_off(const struct mbv_geometry *g, uint64_t seq)
{
    return MBV_HEADER_SIZE + (size_t)(seq % g->slot_count) * g->command_slot_size;
}

static size_t resp_off(const struct mbv_geometry *g, uint64_t seq)
{
    return MBV_HEADER_SIZE + (size_t)g->slot_count * g->command_slot_size
           + (size_t)(seq % g->slot_count) * g->response_slot_size;
}

/* geometry_for(region_size), section 3; -1 if the region is too small. */
static int default_geometry(size_t region_size, struct mbv_geometry *g)
{
    size_t fitting = region_size < MBV_HEADER_SIZE ? 0 : (region_size - MBV_HEADER_SIZE) / (2 * DEFAULT_SLOT_SIZE);
    if (fitting < MIN_SLOTS)
        return -1;
    uint32_t count = MIN_SLOTS;
    while (count * 2 <= fitting && count * 2 <= MAX_SLOTS)
        count *= 2;
    *g = (struct mbv_geometry){count, DEFAULT_SLOT_SIZE, DEFAULT_SLOT_SIZE};
    return 0;
}

static int random_epoch(uint32_t avoid, uint32_t *epoch)
{
    for (;;) {
        uint32_t e = 0;
        ssize_t got = getrandom(&e, sizeof e, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got != (ssize_t)sizeof e) {   /* no getrandom(): the kernel's CSPRNG through the file */
            int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                return fail(MBV_ERROR, "no random source for the epoch: %s", strerror(errno));
            got = read(fd, &e, sizeof e);
            close(fd);
            if (got != (ssize_t)sizeof e)
                return fail(MBV_ERROR, "cannot read /dev/urandom for the epoch");
        }
        if (e != 0 && e != avoid) {
            *epoch = e;
            return 0;
        }
    }
}

/* Section 4's formatting order: magic 0, bytes 4..ring_size-1 zero, the fields, magic last. */
static int format_region(struct mbv *ch, const struct mbv_geometry *g, uint32_t avoid, uint32_t *epoch_out)
{
    uint32_t epoch = 0;
    int e = random_epoch(avoid, &epoch);
    if (e < 0)
        return e;
    unsigned char *b = ch->base;
    st32(b + H_MAGIC, 0);
    atomic_thread_fence(memory_order_seq_cst);
    memset(b + 4, 0, (size_t)ring_size(g) - 4);
    st32(b + H_VERSION, VERSION | MBV_HEADER_SIZE << 16);
    st32(b + H_SLOT_COUNT, g->slot_count);
    st32(b + H_CMD_SIZE, g->command_slot_size);
    st32(b + H_RESP_SIZE, g->response_slot_size);
    st32(b + H_GUEST_EPOCH, epoch);
    st64(b + H_PUBLISH, 0);
    st64(b + H_CONSUME, 0);
    st32(b + H_HOST_EPOCH, 0);
    uint32_t magic;
    memcpy(&magic, MAGIC, 4);
    atomic_store_explicit((_Atomic uint32_t *)(void *)(b + H_MAGIC), magic, memory_order_release);
    if (epoch_out)
        *epoch_out = epoch;
    return 0;
}

/* Under the lock (section 9): a blank region is formatted, anything else invalid refused. */
static int check_header(struct mbv *ch, struct hdr *h, int format_blank)
{
    char why[160];
    read_header(ch, h);
    if (blank(h) && format_blank) {
        struct mbv_geometry g;
        if (default_geometry(ch->size, &g) < 0)
            return fail(MBV_ETOOSMALL, "%s: region of %zu bytes is too small for a ring (at least %u)",
                        ch->path, ch->size, MBV_MIN_REGION_SIZE);
        int e = format_region(ch, &g, 0, NULL);
        if (e < 0)
            return e;
        read_header(ch, h);
    }
    if (header_problem(h, ch->size, why, sizeof why))
        return fail(MBV_EBADREGION, "%s: %s", ch->path, why);
    return 0;
}

/* ---- locking (section 9, Deadlines) ----------------------------------------------------- */
static int lock_until(struct mbv *ch, int64_t deadline)
{
    struct backoff b = {0, 0};
    for (;;) {
        int r = pthread_mutex_trylock(&ch->lock);
        if (r == 0) {
            if (flock(ch->fd, LOCK_EX | LOCK_NB) == 0)
                return 0;
            int err = errno;
            pthread_mutex_unlock(&ch->lock);
            if (err != EWOULDBLOCK && err != EINTR)
                return fail(MBV_ERROR, "%s: cannot lock the channel: %s", ch->path, strerror(err));
        } else if (r != EBUSY) {
            return fail(MBV_ERROR, "%s: cannot lock the channel: %s", ch->path, strerror(r));
        }
        if (now_ns() >= deadline)
            return fail(MBV_EBUSY, "%s: another writer held the channel's lock until the deadline; "
                                   "nothing was sent", ch->path);
        backoff_wait(&b, deadline);
    }
}

static void unlock(struct mbv *ch)
{
    flock(ch->fd, LOCK_UN);
    pthread_mutex_unlock(&ch->lock);
}

/* ---- reading a response (sections 6, 7, 11): copy, then verify ---------------------------- */
struct answer {
    uint16_t status, flags;
    uint32_t length;
};

/* The answer to (seq, epoch) copied into text (room for max_response bytes), or 0. */
static int read_response(const struct mbv *ch, const struct mbv_geometry *g, uint64_t seq, uint32_t epoch,
                         char *text, struct answer *a)
{
    const unsigned char *r = ch->base + resp_off(g, seq);
    unsigned char fixed[MBV_SLOT_HEADER_SIZE];
    memcpy(fixed, r, sizeof fixed);
    atomic_thread_fence(memory_order_acquire);          /* the fields before the text */
    uint32_t length = get32(fixed + R_LENGTH);
    if (get64(fixed + R_SEQ) != seq || get32(fixed + R_EPOCH) != epoch
        || length > g->response_slot_size - MBV_SLOT_HEADER_SIZE)
        return 0;
    memcpy(text, r + MBV_SLOT_HEADER_SIZE, length);
    uint32_t crc = mbv_crc32(0, fixed, 16);
    crc = mbv_crc32(crc, fixed + R_STATUS, 4);
    crc = mbv_crc32(crc, text, length);
    if (crc != get32(fixed + R_CRC))
        return 0;
    a->status = (uint16_t)(fixed[R_STATUS] | fixed[R_STATUS + 1] << 8);
    a->flags = (uint16_t)(fixed[R_FLAGS] | fixed[R_FLAGS + 1] << 8);
    a->length = length;
    return 1;
}

static void fill_response(struct mbv_response *out, uint64_t seq, uint32_t epoch, const struct answer *a)
{
    out->seq = seq;
    out->epoch = epoch;
    out->status = a->status;
    out->flags = a->flags;
    out->truncated = (a->flags & FLAG_TRUNCATED) != 0;
    out->length = a->length;
    out->text[a->length] = '\0';
}

/* ---- the own-answers stash (section 9, Submit step 3) ----------------------------------- */
struct stash_entry {
    int used;
    dev_t dev;
    ino_t ino;
    uint32_t epoch, collect_by;
    uint64_t seq;
    struct answer a;
    char *text;
};

static struct stash_entry stash[MBV_STASH_ENTRIES];
static pthread_mutex_t stash_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t stash_once = PTHREAD_ONCE_INIT;

static void stash_prepare(void) { pthread_mutex_lock(&stash_lock); }
static void stash_parent(void) { pthread_mutex_unlock(&stash_lock); }

static void stash_child(void)  /* the answers belong to the parent's waiters */
{
    for (int i = 0; i < MBV_STASH_ENTRIES; i++) {
        free(stash[i].text);
        stash[i] = (struct stash_entry){0};
    }
    pthread_mutex_unlock(&stash_lock);
}

static void stash_setup(void) { pthread_atfork(stash_prepare, stash_parent, stash_child); }

static int stash_find(const struct mbv *ch, uint64_t seq, uint32_t epoch)
{
    for (int i = 0; i < MBV_STASH_ENTRIES; i++)
        if (stash[i].used && stash[i].seq == seq && stash[i].epoch == epoch && stash[i].dev == ch->dev
            && stash[i].ino == ch->ino)
            return i;
    return -1;
}

static void stash_drop(int i)
{
    free(stash[i].text);
    stash[i] = (struct stash_entry){0};
}

/* A free entry, dropping one nobody can still want (an older epoch of this region, or a
 * promise that has passed) if need be; -1 if the stash is full. */
static int stash_room(const struct mbv *ch, uint32_t epoch)
{
    int64_t now = now_ns();
    for (int i = 0; i < MBV_STASH_ENTRIES; i++)
        if (!stash[i].used)
            return i;
    for (int i = 0; i < MBV_STASH_ENTRIES; i++)
        if ((stash[i].dev == ch->dev && stash[i].ino == ch->ino && stash[i].epoch != epoch)
            || promise_passed(stash[i].collect_by, now)) {
            stash_drop(i);
            return i;
        }
    return -1;
}

/* Take a kept answer for the ticket: 1 and *out filled, else 0.  Caller holds stash_lock. */
static int stash_take_locked(const struct mbv *ch, const struct mbv_ticket *t, struct mbv_response *out)
{
    int i = stash_find(ch, t->seq, t->epoch);
    if (i < 0)
        return 0;
    memcpy(out->text, stash[i].text, stash[i].a.length);
    fill_response(out, t->seq, t->epoch, &stash[i].a);
    stash_drop(i);
    return 1;
}

/* Read every answered command of this process that is still PUBLISHED, keep the answers for
 * this process's waiters and mark them COLLECTED.  Caller holds the channel's lock. */
static void collect_own(struct mbv *ch, const struct hdr *h, uint64_t consumed)
{
    const struct mbv_geometry *g = &h->g;
    uint64_t from = consumed > g->slot_count ? consumed - g->slot_count : 0;
    uint32_t me = (uint32_t)getpid();
    size_t room = g->response_slot_size - MBV_SLOT_HEADER_SIZE;
    char *text = NULL;
    pthread_mutex_lock(&stash_lock);
    for (uint64_t seq = from; seq < consumed; seq++) {
        unsigned char *c = ch->base + cmd_off(g, seq);
        if (ld64(c + C_SEQ) != seq || ld32(c + C_EPOCH) != h->guest_epoch || ld32(c + C_STATE) != ST_PUBLISHED
            || ld32(c + C_PID) != me || stash_find(ch, seq, h->guest_epoch) >= 0)
            continue;
        if (!text && !(text = malloc(room + 1)))
            break;
        struct answer a;
        if (!read_response(ch, g, seq, h->guest_epoch, text, &a))
            continue;   /* not readable (yet): the slot stays the waiter's */
        int i = stash_room(ch, h->guest_epoch);
        if (i < 0)
            break;
        char *kept = malloc(a.length + 1);
        if (!kept)
            break;
        memcpy(kept, text, a.length);
        kept[a.length] = '\0';
        stash[i] = (struct stash_entry){1, ch->dev, ch->ino, h->guest_epoch, ld32(c + C_COLLECT_BY), seq, a, kept};
        st32(c + C_STATE, ST_COLLECTED);   /* under the lock nobody can have reused the slot */
    }
    pthread_mutex_unlock(&stash_lock);
    free(text);
}

/* ---- the doorbell (section 12) ---------------------------------------------------------- */
#define BAR0_SIZE 256
#define IVPOSITION_REGISTER 2           /* BAR0 offset 8, as the index of a 32-bit register */
#define DOORBELL_REGISTER 3             /* BAR0 offset 12 */
#define HOST_PEER 0                     /* mbvisor's convention: the host is peer 0 and hears */
#define COMMAND_VECTOR 0                /*   the guests' commands on vector 0 */

/* A ring is only a hint (the host also looks at the region every second), so a failure is
 * ignored.  The register store is one aligned 32-bit store, released so that the published
 * command is visible before the ring; the eventfd's write is ordered by the kernel. */
static void ring_doorbell(struct mbv *ch)
{
    if (ch->registers)
        atomic_store_explicit((volatile _Atomic uint32_t *)&ch->registers[DOORBELL_REGISTER],
                              htole32(HOST_PEER << 16 | COMMAND_VECTOR), memory_order_release);
    if (ch->eventfd >= 0) {
        uint64_t one = 1;                        /* what QEMU adds for a guest's Doorbell write */
        if (write(ch->eventfd, &one, sizeof one) != (ssize_t)sizeof one) {
            /* a counter full of unheard rings, or an odd descriptor: the host still looks */
        }
    }
}

/* ---- submit (section 9) --------------------------------------------------------------- */
/* Whether the slot of seq may take it (section 9, Submit step 3); why not in why. */
static int slot_free(const struct mbv *ch, const struct hdr *h, uint64_t seq, uint64_t consumed,
                     char *why, size_t n)
{
    const struct mbv_geometry *g = &h->g;
    if (seq >= consumed && seq - consumed >= g->slot_count) {
        snprintf(why, n, "ring full: %llu of %u commands are waiting for the host (is the mbvisor agent running?); "
                 "nothing was sent", (unsigned long long)(seq - consumed), g->slot_count);
        return 0;
    }
    if (seq < g->slot_count)
        return 1;
    const unsigned char *c = ch->base + cmd_off(g, seq);
    uint64_t owner_seq = ld64(c + C_SEQ);
    uint32_t pid = ld32(c + C_PID), collect_by = ld32(c + C_COLLECT_BY);
    if (owner_seq != seq - g->slot_count || ld32(c + C_EPOCH) != h->guest_epoch || ld32(c + C_STATE) != ST_PUBLISHED)
        return 1;
    if (pid == 0 || pid > INT_MAX)      /* nobody collects; or not a pid at all */
        return 1;
    if (kill((pid_t)pid, 0) < 0 && errno == ESRCH)
        return 1;                       /* a dead writer (EPERM counts as alive) */
    int64_t now = now_ns();
    if (promise_passed(collect_by, now))
        return 1;                       /* a broken promise */
    if (pid == (uint32_t)getpid())
        snprintf(why, n, "ring full: the host answered command %llu of this process, which has not read it yet "
                 "and keeps at most %d answers for its waiters; wait for its tickets; nothing was sent",
                 (unsigned long long)owner_seq, MBV_STASH_ENTRIES);
    else if (collect_by == 0)
        snprintf(why, n, "ring full: the host answered command %llu, but its writer (process %u, alive, "
                 "no time given) has not read the answer yet; nothing was sent", (unsigned long long)owner_seq, pid);
    else
        snprintf(why, n, "ring full: the host answered command %llu, but its writer (process %u, alive, "
                 "promised within %.1f s) has not read the answer yet; nothing was sent",
                 (unsigned long long)owner_seq, pid, (uint32_t)(collect_by - clock_ms(now)) / 1000.0);
    return 0;
}

/* One attempt is always made (a timeout of 0 means "now or not at all"); after it, nothing
 * is published once the deadline has passed: ChannelBusy if the lock came late, RingFull if
 * the slot stayed taken. */
static int submit_until(struct mbv *ch, const void *payload, size_t len, int64_t deadline, int collect,
                        uint32_t collect_by, struct mbv_ticket *ticket)
{
    struct backoff b = {0, 0};
    char why[400];
    for (int first = 1;; first = 0) {
        int e = lock_until(ch, deadline);
        if (e < 0)
            return e;
        int late = !first && now_ns() >= deadline;
        struct hdr h;
        if ((e = check_header(ch, &h, 1)) < 0) {
            unlock(ch);
            return e;
        }
        if (len > h.g.command_slot_size - MBV_SLOT_HEADER_SIZE) {
            unlock(ch);
            return fail(MBV_ETOOLONG, "command of %zu bytes does not fit this ring's %u-byte slots; send it in parts",
                        len, h.g.command_slot_size - MBV_SLOT_HEADER_SIZE);
        }
        uint64_t seq = h.publish, consumed = host_consume(&h);
        int free_slot = slot_free(ch, &h, seq, consumed, why, sizeof why);
        if (!free_slot) {
            collect_own(ch, &h, consumed);
            free_slot = slot_free(ch, &h, seq, consumed, why, sizeof why);
        }
        if (free_slot && late) {
            unlock(ch);
            return fail(MBV_EBUSY, "%s: the channel's lock came free only after the deadline; nothing was sent",
                        ch->path);
        }
        if (free_slot) {
            unsigned char *c = ch->base + cmd_off(&h.g, seq), fixed[16];
            memcpy(c + MBV_SLOT_HEADER_SIZE, payload, len);
            put64(fixed, seq);
            put32(fixed + 8, h.guest_epoch);
            put32(fixed + 12, (uint32_t)len);
            uint32_t crc = mbv_crc32(mbv_crc32(0, fixed, 16), payload, len);  /* over the private copy */
            if (!collect)
                collect_by = 0;
            st64(c + C_SEQ, seq);
            st32(c + C_EPOCH, h.guest_epoch);
            st32(c + C_LENGTH, (uint32_t)len);
            st32(c + C_CRC, crc);
            st32(c + C_PID, collect ? (uint32_t)getpid() : 0);
            st32(c + C_STATE, ST_PUBLISHED);
            st32(c + C_COLLECT_BY, collect_by);
            atomic_store_explicit((_Atomic uint64_t *)(void *)(ch->base + H_PUBLISH), htole64(seq + 1),
                                  memory_order_release);
            unlock(ch);
            ring_doorbell(ch);   /* outside the lock: for a device, a ring is a VM exit */
            ticket->seq = seq;
            ticket->epoch = h.guest_epoch;
            ticket->collect_by = collect_by;
            return 0;
        }
        unlock(ch);
        if (now_ns() >= deadline)
            return fail(MBV_ERINGFULL, "%s", why);
        backoff_wait(&b, deadline);
    }
}

int mbv_submit(struct mbv *ch, const void *payload, size_t len, int timeout_ms, int collect_within_ms,
               struct mbv_ticket *ticket)
{
    if (!ch || !ch->base || (!payload && len) || !ticket)
        return fail(MBV_ERROR, "mbv_submit: bad argument");
    int64_t deadline = deadline_after(timeout_ms);
    uint32_t collect_by = 0;
    if (collect_within_ms >= 0) {
        int64_t within = collect_within_ms < 1 ? 1 : collect_within_ms > MBV_MAX_PROMISE_MS ? MBV_MAX_PROMISE_MS
                                                                                          : collect_within_ms;
        collect_by = promise_at(now_ns() + within * 1000000);
    }
    return submit_until(ch, payload, len, deadline, collect_within_ms >= 0, collect_by, ticket);
}

/* ---- wait (section 9) ------------------------------------------------------------------ */
#define MARK_WAIT_MS 50   /* how long marking tries for the writers' lock */

/* Store state only if the slot still holds the ticket, only while its promise holds (after
 * it the slot is free for reuse anyway), and under the writers' lock: between reading the
 * slot's seq/epoch and storing, a writer whose promise has passed could lose the slot to
 * another one, whose command the store would then mark.  If the lock is not had within
 * MARK_WAIT_MS the slot stays PUBLISHED until the promise passes: slower reuse, nothing lost.
 * A copy of the answer that a submit of this process kept meanwhile is dropped (COLLECTED:
 * the caller has the answer) or taken into *out (ABANDONED: then 1 is returned and nothing
 * is marked, the state is COLLECTED already). */
static int finish(struct mbv *ch, const struct mbv_geometry *g, const struct mbv_ticket *t, uint32_t state,
                  struct mbv_response *out)
{
    char saved[sizeof detail_buf];
    int locked = 0, kept = 0;
    if (t->collect_by != 0 && !promise_passed(t->collect_by, now_ns())) {
        memcpy(saved, detail_buf, sizeof saved);       /* a busy lock here is no error */
        locked = lock_until(ch, now_ns() + (int64_t)MARK_WAIT_MS * 1000000) == 0;
        memcpy(detail_buf, saved, sizeof saved);
    }
    pthread_mutex_lock(&stash_lock);
    if (state == ST_ABANDONED) {
        kept = stash_take_locked(ch, t, out);
    } else {
        int i = stash_find(ch, t->seq, t->epoch);
        if (i >= 0)
            stash_drop(i);
    }
    if (locked && !kept) {
        unsigned char *c = ch->base + cmd_off(g, t->seq);
        if (ld64(c + C_SEQ) == t->seq && ld32(c + C_EPOCH) == t->epoch)
            st32(c + C_STATE, state);
    }
    pthread_mutex_unlock(&stash_lock);
    if (locked)
        unlock(ch);
    return kept;
}

static int reset_error(const struct mbv_ticket *t)
{
    return fail(MBV_ERESET, "channel was re-initialised while command %llu waited; its outcome is unknown",
                (unsigned long long)t->seq);
}

static int stash_take(const struct mbv *ch, const struct mbv_ticket *t, struct mbv_response *out)
{
    pthread_mutex_lock(&stash_lock);
    int kept = stash_take_locked(ch, t, out);
    pthread_mutex_unlock(&stash_lock);
    return kept;
}

static int wait_until(struct mbv *ch, const struct mbv_ticket *t, int64_t deadline, int timeout_ms,
                      struct mbv_response *out)
{
    struct backoff b = {0, 0};
    char why[160];
    for (;;) {
        if (stash_take(ch, t, out))                    /* step 1: another thread kept it */
            return 0;
        struct hdr h;                                  /* step 2 */
        read_header(ch, &h);
        if (h.guest_epoch != t->epoch || header_problem(&h, ch->size, why, sizeof why))
            return reset_error(t);
        struct answer a;                               /* step 3 */
        if (read_response(ch, &h.g, t->seq, t->epoch, out->text, &a)) {
            fill_response(out, t->seq, t->epoch, &a);
            finish(ch, &h.g, t, ST_COLLECTED, NULL);
            return 0;
        }
        const unsigned char *c = ch->base + cmd_off(&h.g, t->seq);   /* step 4 */
        if (ld64(c + C_SEQ) != t->seq || ld32(c + C_EPOCH) != t->epoch) {
            if (stash_take(ch, t, out))   /* a submit of this process kept it, then the slot was reused */
                return 0;
            read_header(ch, &h);
            if (h.guest_epoch != t->epoch || header_problem(&h, ch->size, why, sizeof why))
                return reset_error(t);
            return fail(MBV_ELOST, "the answer to command %llu was not read by the time this writer promised, "
                        "and another writer reused its slot; its outcome is unknown", (unsigned long long)t->seq);
        }
        if (now_ns() >= deadline) {                    /* step 5 */
            if (finish(ch, &h.g, t, ST_ABANDONED, out))   /* kept meanwhile: the answer is here after all */
                return 0;
            uint64_t consumed = host_consume(&h);
            return fail(MBV_ETIMEOUT, "no answer to command %llu within %g s; it stays pending in the ring "
                        "(%llu command(s) ahead of it are unanswered)", (unsigned long long)t->seq,
                        timeout_ms / 1000.0, (unsigned long long)(t->seq > consumed ? t->seq - consumed : 0));
        }
        backoff_wait(&b, deadline);
    }
}

int mbv_wait(struct mbv *ch, const struct mbv_ticket *t, int timeout_ms, struct mbv_response *out)
{
    if (!ch || !ch->base || !t || !out)
        return fail(MBV_ERROR, "mbv_wait: bad argument");
    return wait_until(ch, t, deadline_after(timeout_ms), timeout_ms, out);
}

int mbv_request(struct mbv *ch, const void *payload, size_t len, int timeout_ms, struct mbv_response *out,
                struct mbv_ticket *ticket)
{
    struct mbv_ticket own;
    if (!ticket)
        ticket = &own;
    if (!ch || !ch->base || (!payload && len) || !out)
        return fail(MBV_ERROR, "mbv_request: bad argument");
    int64_t deadline = deadline_after(timeout_ms);
    int64_t promised = timeout_ms > MBV_MAX_PROMISE_MS ? now_ns() + (int64_t)MBV_MAX_PROMISE_MS * 1000000 : deadline;
    int e = submit_until(ch, payload, len, deadline, 1, promise_at(promised), ticket);
    return e < 0 ? e : wait_until(ch, ticket, deadline, timeout_ms, out);
}

int mbv_format(struct mbv *ch, const struct mbv_geometry *g, int timeout_ms, uint32_t *epoch)
{
    if (!ch || !ch->base)
        return fail(MBV_ERROR, "mbv_format: bad argument");
    struct mbv_geometry chosen;
    char why[160];
    if (!g) {
        if (default_geometry(ch->size, &chosen) < 0)
            return fail(MBV_ETOOSMALL, "%s: region of %zu bytes is too small for a ring (at least %u)",
                        ch->path, ch->size, MBV_MIN_REGION_SIZE);
    } else {
        chosen = *g;
        if (geometry_problem(&chosen, ch->size, why, sizeof why))
            return fail(MBV_EBADREGION, "%s: %s", ch->path, why);
    }
    int e = lock_until(ch, deadline_after(timeout_ms));
    if (e < 0)
        return e;
    struct hdr h;
    read_header(ch, &h);
    e = format_region(ch, &chosen, h.guest_epoch, epoch);
    unlock(ch);
    return e;
}

/* ---- inspection ------------------------------------------------------------------------ */
int mbv_describe(struct mbv *ch, struct mbv_state *st)
{
    struct hdr h;
    read_header(ch, &h);
    memset(st, 0, sizeof *st);
    st->geometry = h.g;
    st->guest_epoch = h.guest_epoch;
    st->host_epoch = h.host_epoch;
    st->publish = h.publish;
    st->consume = host_consume(&h);
    if (blank(&h))
        st->state = MBV_BLANK;
    else if (header_problem(&h, ch->size, st->problem, sizeof st->problem))
        st->state = MBV_UNUSABLE;
    else
        st->state = MBV_READY;
    return 0;
}

int mbv_peek(struct mbv *ch, uint64_t seq, struct mbv_response *out)
{
    struct hdr h;
    char why[160];
    struct answer a;
    read_header(ch, &h);
    if (header_problem(&h, ch->size, why, sizeof why) || !read_response(ch, &h.g, seq, h.guest_epoch, out->text, &a))
        return 0;
    fill_response(out, seq, h.guest_epoch, &a);
    return 1;
}

/* ---- opening (section 2) --------------------------------------------------------------- */
static int map_fd(struct mbv *ch, int fd, const char *path)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return fail(MBV_ERROR, "%s: %s", path, strerror(err));
    }
    if (st.st_size < (off_t)MBV_MIN_REGION_SIZE) {
        close(fd);
        return fail(MBV_ETOOSMALL, "%s: region of %lld bytes is too small for a ring (at least %u)", path,
                    (long long)st.st_size, MBV_MIN_REGION_SIZE);
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int err = errno;
        close(fd);
        return fail(MBV_ERROR, "%s: cannot map the region: %s", path, strerror(err));
    }
    pthread_once(&stash_once, stash_setup);
    memset(ch, 0, sizeof *ch);
    ch->fd = fd;
    ch->base = base;
    ch->size = (size_t)st.st_size;
    ch->dev = st.st_dev;
    ch->ino = st.st_ino;
    snprintf(ch->path, sizeof ch->path, "%s", path);
    pthread_mutex_init(&ch->lock, NULL);
    ch->eventfd = -1;
    return 0;
}

static int open_error(const char *path, int err)
{
    if (err == ENOENT || err == ENOTDIR)
        return fail(MBV_EDEVICE, "%s: does not exist", path);
    if (err == EACCES || err == EPERM)
        return fail(MBV_ERROR, "%s: no permission to open it read-write (root needed?)", path);
    return fail(MBV_ERROR, "%s: %s", path, strerror(err));
}

int mbv_open_path(struct mbv *ch, const char *path)
{
    if (!ch || !path)
        return fail(MBV_ERROR, "mbv_open_path: bad argument");
    ch->base = NULL;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return open_error(path, errno);
    return map_fd(ch, fd, path);
}

/* BAR0 of the device, kept if the device has a doorbell: guests are peers 1 and up, and an
 * ivshmem-plain device's IVPosition reads 0.  Whatever fails means no doorbell (section 12). */
static void map_doorbell(struct mbv *ch, const char *dir, const char *name)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s/resource0", dir, name);
    int fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return;
    void *bar0 = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= BAR0_SIZE)   /* sysfs gives the BAR's size; less would fault */
        bar0 = mmap(NULL, BAR0_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (bar0 == MAP_FAILED)
        return;
    volatile uint32_t *registers = bar0;
    if (le32toh(registers[IVPOSITION_REGISTER]) >= 1)
        ch->registers = registers;
    else
        munmap(bar0, BAR0_SIZE);
}

/* The first line of a small sysfs file, without the newline; -1 if it cannot be read. */
static int read_line(const char *path, char *buf, size_t n)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    char *got = fgets(buf, (int)n, f);
    fclose(f);
    if (!got)
        return -1;
    buf[strcspn(buf, "\r\n")] = '\0';
    return 0;
}

static int is_ivshmem(const char *dir, const char *name)
{
    char path[PATH_MAX], value[32];
    snprintf(path, sizeof path, "%s/%s/vendor", dir, name);
    if (read_line(path, value, sizeof value) < 0 || strtol(value, NULL, 16) != IVSHMEM_VENDOR)
        return 0;
    snprintf(path, sizeof path, "%s/%s/device", dir, name);
    return read_line(path, value, sizeof value) == 0 && strtol(value, NULL, 16) == IVSHMEM_DEVICE;
}

/* A BDF names a device if it is its whole name or the end of it ("00:04.0" = "0000:00:04.0"). */
static int names(const char *name, const char *bdf)
{
    size_t n = strlen(name), b = strlen(bdf);
    return b > 0 && b <= n && strcmp(name + n - b, bdf) == 0 && (b == n || name[n - b - 1] == ':');
}

int mbv_open_device_in(struct mbv *ch, const char *dir, const char *bdf)
{
    char found[2][256], path[PATH_MAX], value[32];
    int count = 0;
    if (!ch || !dir)
        return fail(MBV_ERROR, "mbv_open_device: bad argument");
    ch->base = NULL;
    DIR *d = opendir(dir);
    struct dirent *entry;
    while (d && (entry = readdir(d))) {
        if (entry->d_name[0] == '.' || (bdf && !names(entry->d_name, bdf)) || !is_ivshmem(dir, entry->d_name))
            continue;
        if (count < 2)
            snprintf(found[count], sizeof found[count], "%s", entry->d_name);
        count++;
    }
    if (d)
        closedir(d);
    if (count == 0)
        return fail(MBV_EDEVICE, "no ivshmem device (PCI 1af4:1110)%s%s found under %s; start the VM with "
                    "'-device ivshmem-plain,memdev=...' or pass --shm PATH", bdf ? " at " : "", bdf ? bdf : "", dir);
    if (count > 1)
        return fail(MBV_ERROR, "several ivshmem devices (%s, %s%s); choose one with --device BDF", found[0],
                    found[1], count > 2 ? ", ..." : "");
    snprintf(path, sizeof path, "%s/%s/enable", dir, found[0]);
    if (read_line(path, value, sizeof value) == 0 && strcmp(value, "0") == 0) {
        int fd = open(path, O_WRONLY | O_CLOEXEC);     /* turn on memory decoding */
        if (fd >= 0) {
            if (write(fd, "1", 1) != 1) {
                /* not ours to change, or already on: mapping the BAR tells */
            }
            close(fd);
        }
    }
    snprintf(path, sizeof path, "%s/%s/resource2", dir, found[0]);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail(MBV_ERROR, "cannot open %s: %s (root needed)", path, strerror(errno));
    int e = map_fd(ch, fd, path);
    if (e == 0)
        map_doorbell(ch, dir, found[0]);
    return e;
}

int mbv_open_device(struct mbv *ch, const char *bdf)
{
    return mbv_open_device_in(ch, "/sys/bus/pci/devices", bdf);
}

/* ---- a host-side doorbell: QEMU's ivshmem client-server protocol (section 12) ----------- */
#define IVSHMEM_PROTOCOL_VERSION 0
#define SHARED_MEMORY_MESSAGE (-1)   /* the number that comes with the shared memory's descriptor */
#define MAX_PEER 0xffff              /* the Doorbell register has 16 bits for a peer */
#define MAX_SETUP_MESSAGES 4096      /* longer than any server's setup */
#define MAX_FDS_PER_MESSAGE 4        /* servers send one; more are received and closed */

struct server {
    int socket;
    int64_t deadline;                /* of the whole setup */
    const char *path;
};

/* Keep the first descriptor of a message (*fd, -1 if none yet) and close any other. */
static void take_descriptors(struct msghdr *m, int *fd)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int received;
            memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
            if (*fd < 0)
                *fd = received;
            else
                close(received);
        }
    }
}

/* The server's next message: a little-endian signed 64-bit number and, if one came with it,
 * a descriptor (*fd, else -1).  0, or MBV_EDOORBELL with nothing left open. */
static int receive_message(const struct server *s, int64_t *number, int *fd)
{
    unsigned char data[8];
    size_t got = 0;
    *fd = -1;
    while (got < sizeof data) {   /* a stream may cut a message; its descriptor comes with the first byte */
        int64_t left = s->deadline - now_ns();
        struct pollfd ready = {.fd = s->socket, .events = POLLIN};
        int r = poll(&ready, 1, left > 0 ? (int)((left + 999999) / 1000000) : 0);
        ssize_t n = 0;
        if (r > 0) {
            union { struct cmsghdr align; char space[CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int))]; } control;
            struct iovec part = {data + got, sizeof data - got};
            struct msghdr m = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control.space,
                               .msg_controllen = sizeof control.space};
            n = recvmsg(s->socket, &m, MSG_CMSG_CLOEXEC);
            if (n >= 0)
                take_descriptors(&m, fd);
        }
        if ((r < 0 || n < 0) && errno == EINTR)
            continue;
        const char *problem = r == 0 ? "the doorbell server did not finish its setup in time"
                              : r < 0 || n < 0 ? strerror(errno)
                              : n == 0 ? "the doorbell server closed the connection during the setup" : NULL;
        if (problem) {
            int e = fail(MBV_EDOORBELL, "%s: %s", s->path, problem);
            if (*fd >= 0)
                close(*fd);
            *fd = -1;
            return e;
        }
        got += (size_t)n;
    }
    *number = (int64_t)get64(data);
    return 0;
}

/* A message that should come without a descriptor; whether one came (it is closed). */
static int receive_number(const struct server *s, int64_t *number, int *came_with_fd)
{
    int fd, e = receive_message(s, number, &fd);
    *came_with_fd = fd >= 0;
    if (fd >= 0)
        close(fd);
    return e;
}

/* The setup up to the host's eventfd for vector 0 (QEMU docs/specs/ivshmem-spec.rst): the
 * version, this client's ID, the shared memory, then every peer's eventfds, the host's first. */
static int read_setup(const struct server *s, int *memory, int *eventfd)
{
    int64_t version, peer_id, number;
    int e, fd, with_fd;
    if ((e = receive_number(s, &version, &with_fd)) < 0)
        return e;
    if (version != IVSHMEM_PROTOCOL_VERSION || with_fd)
        return fail(MBV_EDOORBELL, "%s: ivshmem protocol version %lld, only %d is known", s->path,
                    (long long)version, IVSHMEM_PROTOCOL_VERSION);
    if ((e = receive_number(s, &peer_id, &with_fd)) < 0)
        return e;
    if (peer_id < 1 || peer_id > MAX_PEER)
        return fail(MBV_EDOORBELL, "%s: peer ID %lld is not a guest's (1 to %d; the host is %d): not an mbvisor "
                    "doorbell server", s->path, (long long)peer_id, MAX_PEER, HOST_PEER);
    if ((e = receive_message(s, &number, memory)) < 0)
        return e;
    if (number != SHARED_MEMORY_MESSAGE || *memory < 0)
        return fail(MBV_EDOORBELL, "%s: expected the shared memory, got message %lld", s->path, (long long)number);
    for (int i = 0; i < MAX_SETUP_MESSAGES; i++) {
        if ((e = receive_message(s, &number, &fd)) < 0)
            return e;
        if (fd >= 0 && number == HOST_PEER) {
            *eventfd = fd;   /* vector 0: a peer's eventfds come in the order of its vectors */
            return 0;
        }
        if (fd >= 0)
            close(fd);       /* another peer's or this client's own: a writer rings only the host */
        if (fd < 0 || number < 0 || number > MAX_PEER)
            return fail(MBV_EDOORBELL, "%s: unexpected message %lld during the setup", s->path, (long long)number);
    }
    return fail(MBV_EDOORBELL, "%s: no eventfd of the host (peer %d) in the setup", s->path, HOST_PEER);
}

static int connect_server(const char *path, int timeout_ms)
{
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof address.sun_path)
        return fail(MBV_EDOORBELL, "cannot connect to the doorbell server at %s: AF_UNIX path too long", path);
    memcpy(address.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* A server whose backlog is full keeps connect() waiting: bounded like the rest (0 would
     * mean no bound). */
    int limit_ms = timeout_ms > 0 ? timeout_ms : 1;
    struct timeval limit = {.tv_sec = limit_ms / 1000, .tv_usec = (limit_ms % 1000) * 1000};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit) < 0
        || connect(fd, (const struct sockaddr *)&address, sizeof address) < 0) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        return fail(MBV_EDOORBELL, "cannot connect to the doorbell server at %s: %s", path, strerror(err));
    }
    return fd;
}

int mbv_attach_doorbell(struct mbv *ch, const char *socket_path, int timeout_ms)
{
    if (!ch || !ch->base || !socket_path)
        return fail(MBV_ERROR, "mbv_attach_doorbell: bad argument");
    struct server s = {.deadline = deadline_after(timeout_ms), .path = socket_path};
    if ((s.socket = connect_server(socket_path, timeout_ms)) < 0)
        return s.socket;
    int memory = -1, eventfd = -1;
    int e = read_setup(&s, &memory, &eventfd);
    close(s.socket);   /* the eventfd is all a writer needs */
    struct stat served;
    if (e == 0 && (fstat(memory, &served) < 0 || served.st_dev != ch->dev || served.st_ino != ch->ino))
        e = fail(MBV_EDOORBELL, "the doorbell server at %s serves another region", socket_path);
    if (memory >= 0)
        close(memory);
    if (e < 0) {
        if (eventfd >= 0)
            close(eventfd);
        return e;
    }
    if (ch->eventfd >= 0)
        close(ch->eventfd);
    ch->eventfd = eventfd;
    return 0;
}

void mbv_close(struct mbv *ch)
{
    if (!ch || !ch->base)
        return;
    munmap(ch->base, ch->size);
    close(ch->fd);
    if (ch->registers)
        munmap((void *)(uintptr_t)ch->registers, BAR0_SIZE);
    if (ch->eventfd >= 0)
        close(ch->eventfd);
    ch->registers = NULL;
    ch->eventfd = -1;
    pthread_mutex_destroy(&ch->lock);
    ch->base = NULL;
    ch->fd = -1;
}

/* ---- the answer list (section 6) -------------------------------------------------------- */
static int is_status(const char *s, size_t n)   /* Python's str.isupper() on ASCII */
{
    int cased = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] >= 'a' && s[i] <= 'z')
            return 0;
        cased |= s[i] >= 'A' && s[i] <= 'Z';
    }
    return cased;
}

static int is_code(const char *s, size_t n)     /* [a-z0-9][a-z0-9-]* or "-" */
{
    if (n == 1 && s[0] == '-')
        return 1;
    if (n == 0 || s[0] == '-')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-'))
            return 0;
    return 1;
}

void mbv_answers_init(struct mbv_answers *it, const char *text, size_t len)
{
    it->text = text;
    it->len = len;
    it->pos = 0;
}

static size_t line_end(const char *text, size_t len, size_t pos)
{
    const char *nl = memchr(text + pos, '\n', len - pos);
    return nl ? (size_t)(nl - text) : len;
}

static int indented(const char *text, size_t len, size_t pos)
{
    return pos + 2 <= len && text[pos] == ' ' && text[pos + 1] == ' ';
}

int mbv_answers_next(struct mbv_answers *it, struct mbv_record *rec)
{
    if (it->pos > it->len)
        return 0;
    const char *t = it->text;
    size_t start = it->pos, end = line_end(t, it->len, start);
    const char *line = t + start;
    size_t n = end - start;
    const char *space = memchr(line, ' ', n);
    memset(rec, 0, sizeof *rec);
    rec->status = line;
    rec->status_len = space ? (size_t)(space - line) : n;
    if (space) {
        const char *code = space + 1, *stop = line + n;
        const char *space2 = memchr(code, ' ', (size_t)(stop - code));
        rec->code = code;
        rec->code_len = space2 ? (size_t)(space2 - code) : (size_t)(stop - code);
        rec->message = space2 ? space2 + 1 : stop;
        rec->message_len = (size_t)(stop - rec->message);
    } else {
        rec->code = rec->message = line + n;
    }
    if (!is_status(rec->status, rec->status_len) || !is_code(rec->code, rec->code_len))
        return fail(MBV_EANSWER, "not an answer record: '%.*s'", (int)(n < 80 ? n : 80), line);
    size_t pos = end + 1;
    rec->lines = t + (pos <= it->len ? pos : it->len);
    while (pos <= it->len && indented(t, it->len, pos)) {
        size_t e = line_end(t, it->len, pos);
        rec->line_count++;
        rec->lines_len = e - (size_t)(rec->lines - t);
        pos = e + 1;
    }
    it->pos = pos;
    return 1;
}

int mbv_answers_count(const char *text, size_t len)
{
    struct mbv_answers it;
    struct mbv_record rec;
    int count = 0, r;
    mbv_answers_init(&it, text, len);
    while ((r = mbv_answers_next(&it, &rec)) == 1)
        count++;
    return r < 0 ? r : count;
}

int mbv_record_next_line(const struct mbv_record *rec, size_t *cursor, const char **line, size_t *len)
{
    if (*cursor >= rec->lines_len || rec->line_count == 0)
        return 0;
    size_t e = line_end(rec->lines, rec->lines_len, *cursor);
    *line = rec->lines + *cursor + 2;
    *len = e - *cursor - 2;
    *cursor = e + 1;
    return 1;
}

int mbv_record_ok(const struct mbv_record *rec)
{
    return rec->status_len == 2 && memcmp(rec->status, "OK", 2) == 0;
}
