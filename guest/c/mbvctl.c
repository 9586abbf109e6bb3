/* mbvctl -- a tiny command-line tool on the C guest library (mbv.h), with mbctl's exit codes.
 *
 *   mbvctl [--shm PATH [--doorbell SOCKET] | --device BDF] [--timeout S] [--json] [--no-wait] -w TEXT
 *   mbvctl [--shm PATH [--doorbell SOCKET] | --device BDF] [--json] -r
 *   mbvctl [--shm PATH [--doorbell SOCKET] | --device BDF] --init
 *
 * -w sends TEXT as given (like mbctl --raw -w: no grammar check) and prints one line per
 * answer record (successes on stdout, failures on stderr); --no-wait publishes it with no
 * one to collect the answer and exits.  --doorbell rings the host through an ivshmem server's
 * socket after sending (a device rings by itself when it is an ivshmem-doorbell).
 * Exit codes (guest/mbctl.py EXIT_CODES):
 *   0 ok, 1 the host answered with an error, 2 usage, 3 command too long,
 *   4 no answer in time / answer lost, 5 channel unusable, 6 ring full or lock busy.
 */
#include "mbv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DOORBELL_TIMEOUT_MS 2000   /* for the ivshmem server's setup, as mbctl's */

enum { EXIT_OK, EXIT_HOST_ERROR, EXIT_USAGE, EXIT_INVALID, EXIT_TIMEOUT, EXIT_CHANNEL, EXIT_RING_FULL };

static const char USAGE[] =
    "usage: mbvctl [--shm PATH [--doorbell SOCKET] | --device BDF] [--timeout S] [--json] [--no-wait] "
    "(-w TEXT | -r | --init)\n"
    "  -w, --write TEXT  send TEXT (e.g. \"@R F 52:34:56:00:12:22 10.0.0.5@\") and print the answer\n"
    "  -r, --read        show the channel's state and last answers\n"
    "  --init            re-initialise the channel (new epoch; pending commands are dropped)\n"
    "  --shm PATH        region file instead of the ivshmem device, e.g. /dev/shm/mb0\n"
    "  --device BDF      ivshmem PCI device (default: the only one)\n"
    "  --doorbell SOCKET with --shm: ring the host through this ivshmem server's socket after sending\n"
    "                    (a device rings by itself when it is an ivshmem-doorbell)\n"
    "  --timeout S       seconds for the lock, a free slot and the answer (default 5)\n"
    "  --no-wait         publish and exit; nobody collects the answer\n"
    "  --json            print JSON\n"
    "exit codes: 0 ok, 1 host error, 2 usage, 3 too long, 4 timeout or answer lost,\n"
    "  5 channel unusable, 6 ring full or lock busy\n";

static int json_output;

/* ---- text out: UTF-8 with invalid sequences replaced (U+FFFD), as Python decodes it ---- */
/* The code point at s (n > 0 bytes left), or -1 for an invalid sequence; *used = the bytes
 * taken (for an invalid one: its maximal valid prefix, at least 1, as Python replaces). */
static long decode(const unsigned char *s, size_t n, size_t *used)
{
    unsigned c = s[0], need, lo = 0x80, hi = 0xbf;
    long cp;
    *used = 1;
    if (c < 0x80)
        return c;
    if (c >= 0xc2 && c <= 0xdf) {
        need = 1;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        cp = c & 0x0f;
        lo = c == 0xe0 ? 0xa0 : lo;   /* no overlong forms */
        hi = c == 0xed ? 0x9f : hi;   /* no surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        cp = c & 0x07;
        lo = c == 0xf0 ? 0x90 : lo;
        hi = c == 0xf4 ? 0x8f : hi;   /* nothing above U+10FFFF */
    } else {
        return -1;
    }
    for (unsigned i = 1; i <= need; i++) {
        unsigned b = i < n ? s[i] : 0;
        if (i >= n || b < (i == 1 ? lo : 0x80u) || b > (i == 1 ? hi : 0xbfu))
            return -1;
        cp = cp << 6 | (b & 0x3f);
        *used = i + 1;
    }
    return cp;
}

static void put_text(FILE *out, const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < n;) {
        size_t used;
        if (decode(s + i, n - i, &used) < 0)
            fputs("\xef\xbf\xbd", out);
        else
            fwrite(s + i, 1, used, out);
        i += used;
    }
}

/* The inside of a JSON string as Python's json.dumps writes it (ensure_ascii). */
static void put_json_body(FILE *out, const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < n;) {
        size_t used;
        long cp = decode(s + i, n - i, &used);
        i += used;
        if (cp < 0)
            cp = 0xfffd;
        if (cp == '"' || cp == '\\') fprintf(out, "\\%c", (int)cp);
        else if (cp == '\n') fputs("\\n", out);
        else if (cp == '\r') fputs("\\r", out);
        else if (cp == '\t') fputs("\\t", out);
        else if (cp == '\b') fputs("\\b", out);
        else if (cp == '\f') fputs("\\f", out);
        else if (cp >= 0x20 && cp < 0x7f) fputc((int)cp, out);
        else if (cp < 0x10000) fprintf(out, "\\u%04lx", cp);
        else fprintf(out, "\\u%04lx\\u%04lx", 0xd800 + ((cp - 0x10000) >> 10), 0xdc00 + ((cp - 0x10000) & 0x3ff));
    }
}

static void put_json(FILE *out, const char *text, size_t n)
{
    fputc('"', out);
    put_json_body(out, text, n);
    fputc('"', out);
}

static void put_json_cstr(FILE *out, const char *s) { put_json(out, s, strlen(s)); }

static int fail(const char *message, int code)
{
    if (json_output) {
        fputs("{\"error\": ", stdout);
        put_json_cstr(stdout, message);
        printf(", \"exit_code\": %d}\n", code);
    }
    fputs("mbvctl: ", stderr);
    put_text(stderr, message, strlen(message));
    fputc('\n', stderr);
    return code;
}

static int channel_failure(int error)
{
    const char *detail = *mbv_detail() ? mbv_detail() : mbv_strerror(error);
    switch (error) {
    case MBV_ETIMEOUT: case MBV_ELOST: return fail(detail, EXIT_TIMEOUT);
    case MBV_ETOOLONG: return fail(detail, EXIT_INVALID);
    case MBV_ERINGFULL: case MBV_EBUSY: return fail(detail, EXIT_RING_FULL);
    default: return fail(detail, EXIT_CHANNEL);
    }
}

static const char *status_name(unsigned status, char *buf, size_t n)
{
    const char *name = mbv_status_name(status);
    if (name)
        return name;
    snprintf(buf, n, "STATUS_%u", status);
    return buf;
}

/* A record's lines as mbctl has them: the message (if any), then the indented lines. */
struct lines { const struct mbv_record *rec; int message_done; size_t cursor; };

static int next_line(struct lines *l, const char **line, size_t *len)
{
    if (!l->message_done) {
        l->message_done = 1;
        if (l->rec->message_len) {
            *line = l->rec->message;
            *len = l->rec->message_len;
            return 1;
        }
    }
    return mbv_record_next_line(l->rec, &l->cursor, line, len);
}

static void print_answers(const char *text, size_t n)
{
    struct mbv_answers it;
    struct mbv_record rec;
    mbv_answers_init(&it, text, n);
    while (mbv_answers_next(&it, &rec) == 1) {
        struct lines l = {&rec, 0, 0};
        const char *line;
        size_t len;
        if (mbv_record_ok(&rec)) {
            int any = 0;
            while (next_line(&l, &line, &len)) {
                put_text(stdout, line, len);
                fputc('\n', stdout);
                any = 1;
            }
            if (!any)
                puts("ok");
            continue;
        }
        fputs("mbvctl: ", stderr);
        put_text(stderr, rec.status, rec.status_len);
        fputc(' ', stderr);
        put_text(stderr, rec.code, rec.code_len);
        if (next_line(&l, &line, &len) && len) {
            fputs(": ", stderr);
            put_text(stderr, line, len);
        }
        fputc('\n', stderr);
        while (next_line(&l, &line, &len)) {
            fputs("  ", stderr);
            put_text(stderr, line, len);
            fputc('\n', stderr);
        }
    }
}

static void print_json_answers(const char *text, size_t n)
{
    struct mbv_answers it;
    struct mbv_record rec;
    mbv_answers_init(&it, text, n);
    fputc('[', stdout);
    for (int first = 1; mbv_answers_next(&it, &rec) == 1; first = 0) {
        fputs(first ? "{\"status\": " : ", {\"status\": ", stdout);
        put_json(stdout, rec.status, rec.status_len);
        fputs(", \"code\": ", stdout);
        put_json(stdout, rec.code, rec.code_len);
        fputs(", \"text\": \"", stdout);
        struct lines l = {&rec, 0, 0};
        const char *line;
        size_t len;
        for (int k = 0; next_line(&l, &line, &len); k++) {
            if (k)
                fputs("\\n", stdout);
            put_json_body(stdout, line, len);
        }
        fputs("\"}", stdout);
    }
    fputc(']', stdout);
}

static double since_ms(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) * 1e3 + (double)(now.tv_nsec - start->tv_nsec) / 1e6;
}

static int send_text(struct mbv *ch, const char *text, int timeout_ms, int no_wait)
{
    size_t n = strlen(text);
    struct mbv_ticket ticket;
    char name[32];
    if (no_wait) {
        int e = mbv_submit(ch, text, n, timeout_ms, -1, &ticket);
        if (e < 0)
            return channel_failure(e);
        if (json_output)
            printf("{\"seq\": %llu, \"epoch\": %u, \"published\": true}\n", (unsigned long long)ticket.seq,
                   ticket.epoch);
        else
            printf("published command %llu (epoch 0x%08x); nobody will collect its answer\n",
                   (unsigned long long)ticket.seq, ticket.epoch);
        return EXIT_OK;
    }
    struct mbv_response *r = malloc(sizeof *r);
    if (!r)
        return fail("out of memory", EXIT_CHANNEL);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int e = mbv_request(ch, text, n, timeout_ms, r, &ticket);
    double elapsed = since_ms(&start);
    if (e < 0) {
        free(r);
        return channel_failure(e);
    }
    int records = mbv_answers_count(r->text, r->length) >= 0;
    const char *status = status_name(r->status, name, sizeof name);
    if (json_output) {
        printf("{\"seq\": %llu, \"epoch\": %u, \"status\": ", (unsigned long long)r->seq, r->epoch);
        put_json_cstr(stdout, status);
        printf(", \"code\": %u, \"text\": ", r->status);
        put_json(stdout, r->text, r->length);
        printf(", \"truncated\": %s, \"answers\": ", r->truncated ? "true" : "false");
        if (records)
            print_json_answers(r->text, r->length);
        else
            fputs("null", stdout);
        printf(", \"round_trip_ms\": %.3f}\n", elapsed);
    } else if (!records) {
        FILE *out = r->status == MBV_STATUS_OK ? stdout : stderr;
        if (r->status != MBV_STATUS_OK)
            fprintf(out, "mbvctl: host answered %s: ", status);
        put_text(out, r->text, r->length);
        fputs(r->truncated ? " [answer truncated]\n" : "\n", out);
    } else {
        print_answers(r->text, r->length);
    }
    int code = r->status == MBV_STATUS_OK ? EXIT_OK : EXIT_HOST_ERROR;
    free(r);
    return code;
}

static int show_status(struct mbv *ch)
{
    struct mbv_state st;
    mbv_describe(ch, &st);
    const char *states[] = {"blank", "unusable", "ready"};
    if (json_output) {
        fputs("{\"region\": ", stdout);
        put_json_cstr(stdout, ch->path);
        printf(", \"state\": \"%s\"", states[st.state]);
    } else {
        printf("%-14s %s\n%-14s %s\n", "region", ch->path, "state", states[st.state]);
    }
    if (st.state != MBV_READY) {
        const char *detail = st.state == MBV_BLANK
                                 ? "not initialised yet (the guest's first command does it)" : st.problem;
        if (json_output) {
            fputs(", \"detail\": ", stdout);
            put_json_cstr(stdout, detail);
            puts("}");
        } else {
            printf("%-14s %s\n", "detail", detail);
        }
        return st.state == MBV_UNUSABLE ? EXIT_CHANNEL : EXIT_OK;
    }
    unsigned long long pending = st.publish > st.consume ? st.publish - st.consume : 0;
    int attached = st.host_epoch == st.guest_epoch;
    if (json_output)
        printf(", \"epoch\": \"0x%08x\", \"slots\": %u, \"published\": %llu, \"answered\": %llu, "
               "\"pending\": %llu, \"host_attached\": %s, \"last_answers\": [",
               st.guest_epoch, st.geometry.slot_count, (unsigned long long)st.publish,
               (unsigned long long)st.consume, pending, attached ? "true" : "false");
    else
        printf("%-14s 0x%08x\n%-14s %u\n%-14s %llu\n%-14s %llu\n%-14s %llu\n%-14s %s\n", "epoch", st.guest_epoch,
               "slots", st.geometry.slot_count, "published", (unsigned long long)st.publish, "answered",
               (unsigned long long)st.consume, "pending", pending, "host_attached", attached ? "True" : "False");
    struct mbv_response *r = malloc(sizeof *r);
    if (!r)
        return fail("out of memory", EXIT_CHANNEL);
    int first = 1;
    char name[32];
    for (uint64_t seq = st.consume > 5 ? st.consume - 5 : 0; seq < st.consume; seq++) {
        if (!mbv_peek(ch, seq, r))
            continue;
        const char *status = status_name(r->status, name, sizeof name);
        if (json_output) {
            printf("%s{\"seq\": %llu, \"status\": \"%s\", \"text\": ", first ? "" : ", ",
                   (unsigned long long)seq, status);
            put_json(stdout, r->text, r->length);
            fputc('}', stdout);
        } else {
            printf("  #%-6llu %-12s ", (unsigned long long)seq, status);
            for (const char *line = r->text, *end = r->text + r->length;;) {
                const char *nl = memchr(line, '\n', (size_t)(end - line));
                put_text(stdout, line, (size_t)((nl ? nl : end) - line));
                if (!nl)
                    break;
                printf("\n%22s", "");
                line = nl + 1;
            }
            fputc('\n', stdout);
        }
        first = 0;
    }
    if (json_output)
        puts("]}");
    free(r);
    return EXIT_OK;
}

/* The options that take a value; their value is never read as an option (the --json scan
 * skips it) and an option name in its place is refused, as mbctl's argparse does: neither
 * "-w --json" nor "--shm --json" sends "--json" or opens a file of that name. */
static const char *const VALUED[] = {"-w", "--write", "--shm", "--device", "--doorbell", "--timeout"};

static int takes_value(const char *a)
{
    for (size_t k = 0; k < sizeof VALUED / sizeof VALUED[0]; k++)
        if (strcmp(a, VALUED[k]) == 0)
            return 1;
    return 0;
}

static int is_option(const char *a)
{
    static const char *const flags[] = {"--json", "-h", "--help", "-r", "--read", "--init", "--no-wait"};
    for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++)
        if (strcmp(a, flags[k]) == 0)
            return 1;
    return takes_value(a);
}

static int usage(const char *message)
{
    fwrite(USAGE, 1, strcspn(USAGE, "\n") + 1, stderr);   /* the usage line; --help has the rest */
    return fail(message, EXIT_USAGE);
}

int main(int argc, char **argv)
{
    const char *shm = NULL, *device = NULL, *doorbell = NULL, *text = NULL;
    int read_state = 0, init = 0, no_wait = 0, have_device = 0;
    double timeout = 5.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            json_output = 1;
        else if (takes_value(argv[i]) && i + 1 < argc && !is_option(argv[i + 1]))
            i++;                         /* a value, not an option */
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc && !is_option(argv[i + 1]);
        if (strcmp(a, "--json") == 0)
            continue;
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(USAGE, stdout);
            return EXIT_OK;
        } else if (strcmp(a, "-r") == 0 || strcmp(a, "--read") == 0)
            read_state = 1;
        else if (strcmp(a, "--init") == 0)
            init = 1;
        else if (strcmp(a, "--no-wait") == 0)
            no_wait = 1;
        else if ((strcmp(a, "-w") == 0 || strcmp(a, "--write") == 0) && more)
            text = argv[++i];
        else if (strcmp(a, "--shm") == 0 && more)
            shm = argv[++i];
        else if (strcmp(a, "--doorbell") == 0 && more)
            doorbell = argv[++i];
        else if (strcmp(a, "--device") == 0 && more) {
            device = argv[++i];
            have_device = 1;
        } else if (strcmp(a, "--timeout") == 0 && more) {
            char *end;
            timeout = strtod(argv[++i], &end);
            if (*end || end == argv[i] || !(timeout >= 0) || timeout > 2000000)
                return usage("--timeout: give seconds, e.g. 5 or 0.2");
        } else {
            if (takes_value(a))
                return usage("an option lacks its value");
            char message[300];
            snprintf(message, sizeof message, "unknown argument '%.200s'", a);
            return usage(message);
        }
    }
    if (shm && have_device)
        return usage("--shm and --device exclude each other");
    if ((text != NULL) + read_state + init != 1)
        return usage(text || read_state || init ? "give one of -w TEXT, -r and --init"
                                                : "nothing to do; give -w TEXT, -r or --init (see --help)");
    if (doorbell && !shm)
        return usage("--doorbell goes with --shm (a device rings through its own doorbell)");
    struct mbv ch;
    char shm_path[4096];
    if (shm && !strchr(shm, '/')) {      /* a bare name is a POSIX shm object, as with mbctl */
        snprintf(shm_path, sizeof shm_path, "/dev/shm/%s", shm);
        shm = shm_path;
    }
    int e = shm ? mbv_open_path(&ch, shm) : mbv_open_device(&ch, device);
    if (e < 0)
        return channel_failure(e);
    if (doorbell && (e = mbv_attach_doorbell(&ch, doorbell, DOORBELL_TIMEOUT_MS)) < 0) {
        int code = channel_failure(e);
        mbv_close(&ch);
        return code;
    }
    int code;
    if (read_state) {
        code = show_status(&ch);
    } else if (init) {
        uint32_t epoch;
        e = mbv_format(&ch, NULL, (int)(timeout * 1000), &epoch);
        if (e < 0)
            code = channel_failure(e);
        else {
            if (json_output)
                printf("{\"epoch\": %u}\n", epoch);
            else
                printf("channel re-initialised, epoch 0x%08x\n", epoch);
            code = EXIT_OK;
        }
    } else {
        code = send_text(&ch, text, (int)(timeout * 1000 + 0.5), no_wait);
    }
    mbv_close(&ch);
    return code;
}
