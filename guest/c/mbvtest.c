/* mbvtest -- load and test driver for the C guest library (used by tests/test_guest_c.py and
 * for throughput measurements).  Payloads are the echo responder's favourites:
 * "@R F 52:34:56:ID:hh:ll 10.0.0.1@", whose answer must be one OK record naming that MAC.
 *
 *   mbvtest request PATH ID COUNT [HOLD_AFTER]
 *       COUNT requests (hh:ll = the request's number), each answer checked; prints
 *       "done COUNT SECONDS".  With HOLD_AFTER: after that many requests, send
 *       "@X 52:34:56:ID:ff:ff@", print "holding SEQ" and wait for it (exit 3 if answered).
 *   mbvtest stall PATH COUNT COLLECT_MS
 *       submit COUNT commands promising to collect within COLLECT_MS, print "published COUNT",
 *       then never read the answers (sleeps until killed): a live writer that broke its promise.
 *   mbvtest pipeline PATH COUNT TIMEOUT_MS
 *       submit up to COUNT commands without waiting (promise 60 s); print "submitted N" and the
 *       first error; then wait for every ticket and print "answered N" (all answers checked).
 *   mbvtest threads PATH THREADS COUNT
 *       THREADS threads share one handle, COUNT requests each; prints "ok TOTAL".
 *   mbvtest abandon PATH COLLECT_MS WAIT_MS
 *       submit one command, wait WAIT_MS; prints "timeout SEQ" or the outcome.
 *   mbvtest format PATH SLOTS COMMAND_SIZE RESPONSE_SIZE   (SLOTS 0: the default geometry)
 *   mbvtest device PCI_DIR [BDF]      open an ivshmem device below PCI_DIR; prints "ok SIZE PATH"
 *   mbvtest ring PCI_DIR COUNT
 *       open the only ivshmem device below PCI_DIR and submit COUNT commands for nobody (each
 *       rings the device's doorbell, if it has one); prints "published COUNT".
 *   mbvtest doorbell PATH SOCKET TIMEOUT_MS COUNT
 *       attach the doorbell of the ivshmem server at SOCKET (mbv_attach_doorbell) and submit
 *       COUNT commands for nobody; prints "attached FDS" (or the error) and, after mbv_close,
 *       "closed FDS": descriptors open then, more than before the region was opened.
 *   mbvtest crc                        CRC-32 of stdin, in hex
 *   mbvtest answers                    the records of stdin: "R\tSTATUS\tCODE\tMESSAGE", "L\tLINE"
 * Exit 0 on success, 1 on a wrong answer, 2 usage, 4 a library error (printed as
 * "error NAME: DETAIL" on stdout).
 */
#include "mbv.h"

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int library_error(int e)
{
    printf("error %s: %s\n", mbv_strerror(e), mbv_detail());
    fflush(stdout);
    return 4;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The payload of request i of writer id, and what its answer must hold: OK, one record
 * ("OK ok ..."), naming the command's MAC (the responder's wording may change). */
static void command(char *payload, char *expected, unsigned id, long i)
{
    sprintf(payload, "@R F 52:34:56:%02x:%02lx:%02lx 10.0.0.1@", id & 0xff, (i >> 8) & 0xff, i & 0xff);
    sprintf(expected, "52:34:56:%02x:%02lx:%02lx", id & 0xff, (i >> 8) & 0xff, i & 0xff);
}

static int checked(const struct mbv_response *r, const char *payload, const char *expected)
{
    if (r->status == MBV_STATUS_OK && strncmp(r->text, "OK ok ", 6) == 0 && strstr(r->text, expected)
        && !strchr(r->text, '\n') && mbv_answers_count(r->text, r->length) == 1)
        return 0;
    fprintf(stderr, "mbvtest: %s answered with status %u: %s\n", payload, r->status, r->text);
    return 1;
}

static void *out_of_memory(void)
{
    fputs("mbvtest: out of memory\n", stderr);
    exit(4);
}

static struct mbv_response *response(void)
{
    struct mbv_response *r = malloc(sizeof *r);
    return r ? r : out_of_memory();
}

static int done_with(struct mbv_response *r, int code)   /* every return path frees it */
{
    free(r);
    return code;
}

static int request(struct mbv *ch, unsigned id, long count, long hold_after)
{
    struct mbv_response *r = response();
    char payload[64], expected[80];
    double start = now_s();
    for (long i = 0; i < count; i++) {
        if (i == hold_after) {
            struct mbv_ticket t;
            sprintf(payload, "@X 52:34:56:%02x:ff:ff@", id & 0xff);
            int e = mbv_submit(ch, payload, strlen(payload), 20000, 600000, &t);
            if (e < 0)
                return done_with(r, library_error(e));
            printf("holding %llu\n", (unsigned long long)t.seq);
            fflush(stdout);
            e = mbv_wait(ch, &t, 600000, r);
            fprintf(stderr, "mbvtest: the held command was answered (%d); expected to be killed first\n", e);
            return done_with(r, 3);
        }
        command(payload, expected, id, i);
        int e = mbv_request(ch, payload, strlen(payload), 20000, r, NULL);
        if (e < 0)
            return done_with(r, library_error(e));
        if (checked(r, payload, expected))
            return done_with(r, 1);
    }
    printf("done %ld %.6f\n", count, now_s() - start);
    return done_with(r, 0);
}

/* COUNT commands of writer id, submitted without waiting (collect_ms < 0: for nobody). */
static int publish(struct mbv *ch, unsigned id, long count, int collect_ms)
{
    for (long i = 0; i < count; i++) {
        struct mbv_ticket t;
        char payload[64], expected[80];
        command(payload, expected, id, i);
        int e = mbv_submit(ch, payload, strlen(payload), 5000, collect_ms, &t);
        if (e < 0)
            return library_error(e);
    }
    return 0;
}

static int stall(struct mbv *ch, long count, int collect_ms)
{
    int code = publish(ch, 0xee, count, collect_ms);
    if (code)
        return code;
    printf("published %ld\n", count);
    fflush(stdout);
    for (;;)
        pause();
}

static int pipeline(struct mbv *ch, long count, int timeout_ms)
{
    if (count < 0)
        return 2;
    struct mbv_ticket *tickets = calloc(count ? (size_t)count : 1, sizeof *tickets);
    if (!tickets)
        out_of_memory();
    struct mbv_response *r = response();
    char payload[64], expected[80];
    long n = 0;
    int e = 0;
    for (; n < count; n++) {
        command(payload, expected, 0xdd, n);
        if ((e = mbv_submit(ch, payload, strlen(payload), timeout_ms, 60000, &tickets[n])) < 0)
            break;
    }
    printf("submitted %ld\n", n);
    if (e < 0)
        library_error(e);
    for (long i = 0; i < n; i++) {
        command(payload, expected, 0xdd, i);
        int code = (e = mbv_wait(ch, &tickets[i], 20000, r)) < 0 ? library_error(e)
                   : tickets[i].seq != r->seq || checked(r, payload, expected) ? 1 : 0;
        if (code) {
            free(tickets);
            return done_with(r, code);
        }
    }
    printf("answered %ld\n", n);
    free(tickets);
    return done_with(r, 0);
}

struct worker {
    pthread_t thread;
    struct mbv *ch;
    unsigned id;
    long count;
    int result;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    struct mbv_response *r = response();
    char payload[64], expected[80];
    w->result = 0;
    for (long i = 0; i < w->count && !w->result; i++) {
        command(payload, expected, w->id, i);
        int e = mbv_request(w->ch, payload, strlen(payload), 20000, r, NULL);
        if (e < 0) {
            fprintf(stderr, "mbvtest: thread %u: %s: %s\n", w->id, mbv_strerror(e), mbv_detail());
            w->result = 4;
        } else {
            w->result = checked(r, payload, expected);
        }
    }
    free(r);
    return NULL;
}

static int threads(struct mbv *ch, int count, long each)
{
    struct worker workers[64];
    if (count < 1 || count > 64)
        return 2;
    for (int i = 0; i < count; i++) {
        workers[i] = (struct worker){.ch = ch, .id = 0x40u + (unsigned)i, .count = each};
        if (pthread_create(&workers[i].thread, NULL, work, &workers[i]) != 0)
            return 4;
    }
    int result = 0;
    for (int i = 0; i < count; i++) {
        pthread_join(workers[i].thread, NULL);
        result = result ? result : workers[i].result;
    }
    if (!result)
        printf("ok %ld\n", count * each);
    return result;
}

static int abandon(struct mbv *ch, int collect_ms, int wait_ms)
{
    struct mbv_ticket t;
    struct mbv_response *r = response();
    int e = mbv_submit(ch, "@X 52:34:56:00:12:22@", 21, 1000, collect_ms, &t);
    if (e < 0)
        return done_with(r, library_error(e));
    e = mbv_wait(ch, &t, wait_ms, r);
    if (e == MBV_ETIMEOUT)
        printf("timeout %llu\n", (unsigned long long)t.seq);
    else if (e < 0)
        return done_with(r, library_error(e));
    else
        printf("answered %llu %u %s\n", (unsigned long long)r->seq, r->status, r->text);
    return done_with(r, 0);
}

static int ring(const char *pci_dir, long count)
{
    struct mbv ch;
    int e = mbv_open_device_in(&ch, pci_dir, NULL);
    if (e < 0)
        return library_error(e);
    int code = publish(&ch, 0xbb, count, -1);
    mbv_close(&ch);
    if (!code)
        printf("published %ld\n", count);
    return code;
}

static int open_descriptors(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int count = 0;
    for (struct dirent *entry; (entry = readdir(d));)
        count += entry->d_name[0] != '.';
    closedir(d);
    return count;
}

static int doorbell(const char *path, const char *socket_path, int timeout_ms, long count)
{
    struct mbv ch;
    int before = open_descriptors();
    int e = mbv_open_path(&ch, path);
    if (e < 0)
        return library_error(e);
    int code = (e = mbv_attach_doorbell(&ch, socket_path, timeout_ms)) < 0 ? library_error(e)
               : (printf("attached %d\n", open_descriptors() - before), publish(&ch, 0xbb, count, -1));
    mbv_close(&ch);
    printf("closed %d\n", open_descriptors() - before);
    return code;
}

static int answers(void)
{
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text, stdin);
    struct mbv_answers it;
    struct mbv_record rec;
    int count = mbv_answers_count(text, n);
    if (count < 0) {
        printf("%s\n", mbv_strerror(count));
        return 0;
    }
    mbv_answers_init(&it, text, n);
    while (mbv_answers_next(&it, &rec) == 1) {
        printf("R\t%.*s\t%.*s\t%.*s\n", (int)rec.status_len, rec.status, (int)rec.code_len, rec.code,
               (int)rec.message_len, rec.message);
        const char *line;
        size_t len, cursor = 0;
        while (mbv_record_next_line(&rec, &cursor, &line, &len))
            printf("L\t%.*s\n", (int)len, line);
    }
    printf("count %d\n", count);
    return 0;
}

int main(int argc, char **argv)
{
    struct mbv ch;
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "crc") == 0) {
        static unsigned char data[1 << 20];
        size_t n = fread(data, 1, sizeof data, stdin);
        printf("%08x\n", mbv_crc32(0, data, n));
        return 0;
    }
    if (strcmp(mode, "answers") == 0)
        return answers();
    if (strcmp(mode, "device") == 0 && (argc == 3 || argc == 4)) {
        int e = mbv_open_device_in(&ch, argv[2], argc == 4 ? argv[3] : NULL);
        if (e < 0)
            return library_error(e);
        printf("ok %zu %s\n", ch.size, ch.path);
        mbv_close(&ch);
        return 0;
    }
    if (strcmp(mode, "ring") == 0 && argc == 4)
        return ring(argv[2], strtol(argv[3], NULL, 0));
    if (strcmp(mode, "doorbell") == 0 && argc == 6)
        return doorbell(argv[2], argv[3], (int)strtol(argv[4], NULL, 0), strtol(argv[5], NULL, 0));
    int args = strcmp(mode, "request") == 0 ? (argc == 5 || argc == 6 ? argc : -1)
               : strcmp(mode, "stall") == 0 || strcmp(mode, "pipeline") == 0 || strcmp(mode, "threads") == 0
                       || strcmp(mode, "abandon") == 0 ? (argc == 5 ? 5 : -1)
               : strcmp(mode, "format") == 0 ? (argc == 6 ? 6 : -1) : -1;
    if (args < 0) {
        fputs("usage: see the comment at the top of guest/c/mbvtest.c\n", stderr);
        return 2;
    }
    int e = mbv_open_path(&ch, argv[2]);
    if (e < 0)
        return library_error(e);
    long a = strtol(argv[3], NULL, 0), b = strtol(argv[4], NULL, 0);
    int code;
    if (strcmp(mode, "request") == 0)
        code = request(&ch, (unsigned)a, b, argc == 6 ? strtol(argv[5], NULL, 0) : -1);
    else if (strcmp(mode, "stall") == 0)
        code = stall(&ch, a, (int)b);
    else if (strcmp(mode, "pipeline") == 0)
        code = pipeline(&ch, a, (int)b);
    else if (strcmp(mode, "threads") == 0)
        code = threads(&ch, (int)a, b);
    else if (strcmp(mode, "abandon") == 0)
        code = abandon(&ch, (int)a, (int)b);
    else {
        struct mbv_geometry g = {(uint32_t)a, (uint32_t)b, (uint32_t)strtol(argv[5], NULL, 0)};
        uint32_t epoch;
        e = mbv_format(&ch, a ? &g : NULL, 5000, &epoch);
        code = e < 0 ? library_error(e) : (printf("epoch %u\n", epoch), 0);
    }
    mbv_close(&ch);
    return code;
}
