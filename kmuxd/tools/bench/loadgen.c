/*
 * loadgen: the benchmark's clients, in C, so that the clients cost little
 * next to the proxy being measured (two cores are shared by everything).
 *
 * Built by `python -m kmuxd.tools.bench` (gcc -O2) into its run directory.
 * One binary drives every target with the same code, so a difference in
 * the figures is the target's, not the client's:
 *
 *   transports  kmux       SOCK_SEQPACKET to kmuxd: the hello packet (msgpack,
 *                          encoded by the real client library and passed in
 *                          hex), then one packet per message, kind byte 0x00
 *               seqpacket  SOCK_SEQPACKET to the C relay: kind byte, no hello
 *               tcp        TCP to 127.0.0.1:PORT (TCP_NODELAY)
 *               zmtp       ZeroMQ's wire protocol (ZMTP 3.0, NULL mechanism) as
 *                          a DEALER over a Unix stream socket (zmq ipc://)
 *   modes       flood      P processes, one client each, send as fast as they can
 *               rr         N clients in one epoll loop, closed loop: one request
 *                          in flight per client
 *               open       N clients, requests sent at a fixed rate whatever the
 *                          answers; latency counts from the *scheduled* time
 *               idle       connect N clients, hold them until stdin closes
 *               churn      P processes x N clients: connect, hello, close
 *
 * Protocol with the caller (stdout/stdin, one line each): print "ready"
 * once connected; read "go START STOP WSTART WEND" (CLOCK_MONOTONIC seconds,
 * the clock of Python's time.monotonic): run from START to STOP, measure in
 * [WSTART, WEND]; print one JSON line with the result; exit.
 *
 * Invariants: every loop is bounded by the clock or a count; every buffer is
 * allocated once with a named size; a protocol error, a refused hello or a
 * notice from kmuxd ends the run with a message on stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Largest message (request, response or flood message) we handle. */
#define MAX_MESSAGE (1024 * 1024)
/* Socket buffers: one SEQPACKET packet must fit in SO_SNDBUF, so a sender
 * asks for SOCK_BUFFER_PER_MESSAGE times its largest packet, at least
 * SOCK_BUFFER_MIN (the kernel's usual default). Not more: a sender with a
 * deep buffer runs on while the proxy waits for a CPU, on two cores. */
#define SOCK_BUFFER_MIN 212992
#define SOCK_BUFFER_PER_MESSAGE 2
/* flood: messages handed to the kernel per sendmmsg call (each stays its own packet). */
#define FLOOD_BATCH 32
/* Per-client receive buffer for stream transports (several responses). */
#define STREAM_BUFFER (64 * 1024)
/* Most clients in one process (rr, open, idle, churn). */
#define MAX_CLIENTS 65536
/* Latency samples kept; past this, requests are counted but not sampled. */
#define MAX_SAMPLES (8 * 1024 * 1024)
/* Requests in flight at once (open loop); the opaque field indexes this table. */
#define INFLIGHT_SLOTS (1 << 20)
/* Open loop: seconds after the window's end to wait for its last answers. */
#define DRAIN_GRACE 2.0
#define EPOLL_BATCH 256

enum transport { T_KMUX, T_SEQPACKET, T_TCP, T_ZMTP };
enum reply { R_MCBIN, R_ASCII, R_PACKET };

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "loadgen: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(1);
}
#define FAIL(what) do { fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno)); exit(1); } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
    double d = t - now();
    if (d > 0) {
        struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

/* -- options ------------------------------------------------------------------- */

static struct {
    const char *mode, *path;
    enum transport transport;
    enum reply reply;
    int port, clients, procs, size;
    double rate;
    unsigned char *hello, *request;
    size_t hello_len, request_len;
} opt = {.clients = 1, .procs = 1, .size = 64, .reply = R_MCBIN};

static unsigned char *unhex(const char *s, size_t *len) {
    size_t n = strlen(s);
    if (n % 2) die("odd hex string: %s", s);
    unsigned char *out = malloc(n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) die("bad hex string: %s", s);
        out[i] = (unsigned char)v;
    }
    *len = n / 2;
    return out;
}

static void parse_args(int argc, char **argv) {
    if (argc < 2) die("%s", "usage: loadgen flood|rr|open|idle|churn --transport T (--path P | --port N) ...");
    opt.mode = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("option %s needs a value", k);
        if (!strcmp(k, "--transport")) {
            if (!strcmp(v, "kmux")) opt.transport = T_KMUX;
            else if (!strcmp(v, "seqpacket")) opt.transport = T_SEQPACKET;
            else if (!strcmp(v, "tcp")) opt.transport = T_TCP;
            else if (!strcmp(v, "zmtp")) opt.transport = T_ZMTP;
            else die("unknown transport %s", v);
        } else if (!strcmp(k, "--reply")) {
            if (!strcmp(v, "mcbin")) opt.reply = R_MCBIN;
            else if (!strcmp(v, "ascii")) opt.reply = R_ASCII;
            else die("unknown reply framing %s", v);
        } else if (!strcmp(k, "--path")) opt.path = v;
        else if (!strcmp(k, "--port")) opt.port = atoi(v);
        else if (!strcmp(k, "--clients")) opt.clients = atoi(v);
        else if (!strcmp(k, "--procs")) opt.procs = atoi(v);
        else if (!strcmp(k, "--size")) opt.size = atoi(v);
        else if (!strcmp(k, "--rate")) opt.rate = atof(v);
        else if (!strcmp(k, "--hello")) opt.hello = unhex(v, &opt.hello_len);
        else if (!strcmp(k, "--request")) opt.request = unhex(v, &opt.request_len);
        else die("unknown option %s", k);
    }
    if (opt.clients < 1 || opt.clients > MAX_CLIENTS) die("%s", "--clients must be 1..65536");
    if (opt.procs < 1 || opt.procs > 1024) die("%s", "--procs must be 1..1024");
    if (opt.size < 5 || opt.size > MAX_MESSAGE) die("%s", "--size must be 5..1048576");
    if (opt.transport == T_KMUX && !opt.hello) die("%s", "--transport kmux needs --hello HEX");
    if (opt.transport == T_TCP ? opt.port <= 0 : !opt.path) die("%s", "need --port (tcp) or --path");
    /* Packet transports deliver whole messages; the reply framing only matters on streams. */
    if (opt.transport == T_KMUX || opt.transport == T_SEQPACKET || opt.transport == T_ZMTP) opt.reply = R_PACKET;
}

/* -- connecting ------------------------------------------------------------------ */

static void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            FAIL("send");
        }
        p += n;
        len -= (size_t)n;
    }
}

static void read_exact(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0) die("%s", "peer closed the connection during the handshake");
        if (n < 0) {
            if (errno == EINTR) continue;
            FAIL("recv");
        }
        p += n;
        len -= (size_t)n;
    }
}

/* ZMTP 3.0 greeting (64 bytes) and READY command for a DEALER, NULL mechanism. */
static void zmtp_handshake(int fd) {
    unsigned char g[64] = {0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0};
    memcpy(g + 12, "NULL", 4);
    write_all(fd, g, sizeof g);
    static const char ready[] = "\x05READY\x0bSocket-Type\x00\x00\x00\x06" "DEALER";
    unsigned char cmd[2 + sizeof ready - 1] = {0x04, sizeof ready - 1};
    memcpy(cmd + 2, ready, sizeof ready - 1);
    write_all(fd, cmd, sizeof cmd);
    unsigned char peer[64];
    read_exact(fd, peer, sizeof peer);
    if (peer[0] != 0xff || peer[9] != 0x7f || peer[10] < 3) die("%s", "not a ZMTP 3 peer");
    unsigned char head[9];
    read_exact(fd, head, 1);
    uint64_t size;
    if (head[0] & 0x02) {
        read_exact(fd, head + 1, 8);
        size = 0;
        for (int i = 1; i < 9; i++) size = size << 8 | head[i];
    } else {
        read_exact(fd, head + 1, 1);
        size = head[1];
    }
    if (!(head[0] & 0x04) || size > 4096) die("%s", "expected the peer's READY command");
    unsigned char body[4096];
    read_exact(fd, body, size);
}

static int connect_client(const char *name) {
    int fd;
    if (opt.transport == T_TCP) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) FAIL("socket");
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) FAIL("connect tcp");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        return fd;
    }
    fd = socket(AF_UNIX, opt.transport == T_ZMTP ? SOCK_STREAM : SOCK_SEQPACKET, 0);
    if (fd < 0) FAIL("socket");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(opt.path) >= sizeof a.sun_path) die("socket path too long: %s", opt.path);
    strcpy(a.sun_path, opt.path);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) FAIL("connect unix");
    long want = SOCK_BUFFER_PER_MESSAGE * ((long)opt.size + 64);
    int buf = want > SOCK_BUFFER_MIN ? (int)want : SOCK_BUFFER_MIN;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (opt.transport == T_ZMTP) {
        zmtp_handshake(fd);
    } else if (opt.transport == T_KMUX) {
        write_all(fd, opt.hello, opt.hello_len);
        unsigned char answer[4097];
        ssize_t n = recv(fd, answer, sizeof answer - 1, 0);
        if (n <= 0) die("%s: no answer to the hello", name);
        /* msgpack {"ok": true}: a2 6f 6b c3 */
        if (!memmem(answer, (size_t)n, "\xa2ok\xc3", 4)) {
            answer[n] = 0;
            die("kmuxd refused the hello: %s", (char *)answer);
        }
    }
    return fd;
}

/* The bytes one message takes on the wire: kind byte, ZMTP frame header, or nothing. */
static size_t wire_prefix(unsigned char *out, size_t len) {
    if (opt.transport == T_KMUX || opt.transport == T_SEQPACKET) {
        out[0] = 0x00;
        return 1;
    }
    if (opt.transport == T_ZMTP) {
        if (len < 256) {
            out[0] = 0x00;
            out[1] = (unsigned char)len;
            return 2;
        }
        out[0] = 0x02;
        for (int i = 0; i < 8; i++) out[1 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
        return 9;
    }
    return 0;
}

static void read_go(double *start, double *stop, double *ws, double *we) {
    printf("ready\n");
    fflush(stdout);
    char line[256];
    if (!fgets(line, sizeof line, stdin)) die("%s", "stdin closed before 'go'");
    if (sscanf(line, "go %lf %lf %lf %lf", start, stop, ws, we) != 4) die("expected 'go ...', got %s", line);
}

/* -- flood ---------------------------------------------------------------------- */

/* One flood client: the message, already framed for its transport. */
struct flood {
    int fd;
    unsigned char *pkt;
    size_t len;
};

static void flood_connect(struct flood *f, int index) {
    char name[32];
    snprintf(name, sizeof name, "flood-%d", index);
    f->fd = connect_client(name);
    f->pkt = malloc((size_t)opt.size + 16);
    size_t pre = wire_prefix(f->pkt, (size_t)opt.size);
    /* u32be framing: the length field counts what follows the 4-byte header. */
    uint32_t body = (uint32_t)opt.size - 4;
    unsigned char *m = f->pkt + pre;
    m[0] = body >> 24; m[1] = body >> 16; m[2] = body >> 8; m[3] = body;
    memset(m + 4, 'x', (size_t)opt.size - 4);
    f->len = pre + (size_t)opt.size;
}

/* Send from start to stop; returns messages sent, and those sent inside [ws, we). */
static long flood_send(struct flood *f, double start, double stop, double ws, double we, long *in_window) {
    sleep_until(start);
    long sent = 0, w0 = -1, w1 = -1;
    /* FLOOD_BATCH copies of the same message per system call: each is still
     * one packet (SEQPACKET) or one send (TCP), but the client pays one
     * kernel entry per batch, so the proxy, not the clients, sets the pace. */
    struct mmsghdr msgs[FLOOD_BATCH];
    struct iovec iov = {.iov_base = f->pkt, .iov_len = f->len};
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < FLOOD_BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int stream = opt.transport == T_TCP || opt.transport == T_ZMTP;
    for (double t = now(); t < stop; t = now()) { /* bounded by the clock */
        if (w0 < 0 && t >= ws) w0 = sent;
        if (w1 < 0 && t >= we) w1 = sent;
        int n = sendmmsg(f->fd, msgs, FLOOD_BATCH, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EMSGSIZE) die("%s", "EMSGSIZE: the message does not fit one packet (raise net.core.wmem_max)");
            FAIL("flood sendmmsg");
        }
        /* On a stream, a short write of the last message must be completed
         * before anything else goes out, or the framing breaks. */
        if (stream && n > 0 && msgs[n - 1].msg_len != f->len)
            write_all(f->fd, f->pkt + msgs[n - 1].msg_len, f->len - msgs[n - 1].msg_len);
        sent += n;
    }
    *in_window = w0 >= 0 ? (w1 >= 0 ? w1 : sent) - w0 : 0;
    close(f->fd);
    return sent;
}

static int run_flood(void) {
    int pipes[1024][2], back[1024][2];
    pid_t pids[1024];
    int ready[2];
    if (pipe(ready) < 0) FAIL("pipe");
    for (int i = 0; i < opt.procs; i++) {
        if (pipe(pipes[i]) < 0 || pipe(back[i]) < 0) FAIL("pipe");
        pids[i] = fork();
        if (pids[i] < 0) FAIL("fork");
        if (pids[i] == 0) {
            struct flood f;
            flood_connect(&f, i); /* connected (hello answered) before we say ready */
            double t[4];
            if (write(ready[1], "r", 1) != 1) _exit(1);
            if (read(pipes[i][0], t, sizeof t) != sizeof t) _exit(1);
            long out[2];
            out[0] = flood_send(&f, t[0], t[1], t[2], t[3], &out[1]);
            if (write(back[i][1], out, sizeof out) != sizeof out) _exit(1);
            _exit(0);
        }
        close(back[i][1]);
    }
    close(ready[1]);
    for (int i = 0; i < opt.procs; i++) {
        char c;
        if (read(ready[0], &c, 1) != 1) die("%s", "a flood process failed to connect");
    }
    double t[4];
    read_go(&t[0], &t[1], &t[2], &t[3]);
    for (int i = 0; i < opt.procs; i++)
        if (write(pipes[i][1], t, sizeof t) != sizeof t) FAIL("write pipe");
    long total = 0, total_window = 0;
    int failed = 0;
    for (int i = 0; i < opt.procs; i++) {
        long out[2] = {0, 0};
        if (read(back[i][0], out, sizeof out) != sizeof out) failed++;
        int status;
        waitpid(pids[i], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
        total += out[0];
        total_window += out[1];
    }
    printf("{\"sent\": %ld, \"sent_in_window\": %ld, \"failed_procs\": %d}\n", total, total_window, failed);
    return failed ? 1 : 0;
}

/* -- request/response: rr (closed loop) and open (fixed rate) ---------------------- */

struct client {
    int fd;
    unsigned char *buf; /* stream transports: bytes received, not yet a whole reply */
    size_t have;
    /* ASCII replies carry no id: replies come back in order per connection. */
    uint32_t *fifo;
    size_t fifo_head, fifo_tail, fifo_cap;
};

struct slot {
    double t;     /* send time (rr) or scheduled time (open) */
    int owner;    /* client index, -1 when free */
    uint32_t id;  /* the full request id: a stale reply whose id only shares the slot is a stray */
};

static struct client *clients;
static struct slot *slots;
static double *samples;
static size_t nsamples;
static long completed, completed_bytes, overruns, notices, strays, inflight;

static uint32_t opaque_of(const unsigned char *msg, size_t len) {
    /* memcached binary: the 4-byte opaque at offset 12, echoed by the server
     * and restored by kmuxd's id rewrite; the ZMTP echo returns the request. */
    if (len < 16) die("%s", "reply shorter than a memcached binary header");
    return (uint32_t)msg[12] << 24 | (uint32_t)msg[13] << 16 | (uint32_t)msg[14] << 8 | msg[15];
}

static void send_request(int c, uint32_t id, unsigned char *scratch) {
    size_t pre = wire_prefix(scratch, opt.request_len);
    memcpy(scratch + pre, opt.request, opt.request_len);
    if (opt.reply != R_ASCII && opt.request_len >= 16) {
        scratch[pre + 12] = id >> 24; scratch[pre + 13] = id >> 16; scratch[pre + 14] = id >> 8; scratch[pre + 15] = id;
    }
    write_all(clients[c].fd, scratch, pre + opt.request_len);
    if (opt.reply == R_ASCII) {
        struct client *cl = &clients[c];
        if (cl->fifo_tail - cl->fifo_head == cl->fifo_cap) die("%s", "too many ASCII requests in flight on one client");
        cl->fifo[cl->fifo_tail++ % cl->fifo_cap] = id;
    }
}

/* A whole reply arrived on client c: which request did it answer? */
static uint32_t match_reply(int c, const unsigned char *msg, size_t len) {
    if (opt.reply == R_ASCII) {
        struct client *cl = &clients[c];
        if (cl->fifo_head == cl->fifo_tail) die("%s", "an ASCII reply nobody asked for");
        return cl->fifo[cl->fifo_head++ % cl->fifo_cap];
    }
    return opaque_of(msg, len);
}

/* Length of the first whole reply in buf[0:have], or 0 if it is not whole yet. */
static size_t stream_reply_len(const unsigned char *buf, size_t have) {
    if (opt.transport == T_ZMTP) {
        size_t pos = 0;
        for (;;) { /* frames until one without MORE; command frames are skipped by the caller */
            if (have - pos < 2) return 0;
            uint8_t flags = buf[pos];
            uint64_t size;
            size_t head;
            if (flags & 0x02) {
                if (have - pos < 9) return 0;
                size = 0;
                for (int i = 1; i < 9; i++) size = size << 8 | buf[pos + i];
                head = 9;
            } else {
                size = buf[pos + 1];
                head = 2;
            }
            if (size > MAX_MESSAGE) die("%s", "ZMTP frame too large");
            if (have - pos < head + size) return 0;
            pos += head + size;
            if (!(flags & 0x01)) return pos;
        }
    }
    if (opt.reply == R_MCBIN) {
        if (have < 24) return 0;
        size_t total = 24 + ((size_t)buf[8] << 24 | (size_t)buf[9] << 16 | (size_t)buf[10] << 8 | buf[11]);
        if (total > STREAM_BUFFER) die("%s", "memcached reply larger than the stream buffer");
        return have >= total ? total : 0;
    }
    /* ASCII: a GET reply ends with END\r\n; an error is one line. */
    const unsigned char *end = memmem(buf, have, "END\r\n", 5);
    if (end) return (size_t)(end - buf) + 5;
    const unsigned char *eol = memmem(buf, have, "\r\n", 2);
    if (eol && (!memcmp(buf, "SERVER_ERROR", have < 12 ? have : 12) || !memcmp(buf, "ERROR", have < 5 ? have : 5) ||
                !memcmp(buf, "CLIENT_ERROR", have < 12 ? have : 12))) {
        fprintf(stderr, "loadgen: error reply: %.*s\n", (int)(eol - buf), buf);
        notices++;
        return (size_t)(eol - buf) + 2;
    }
    return 0;
}

/* Deliver every whole reply readable on client c to on_reply. Returns 0 at EOF. */
typedef void (*reply_fn)(int c, uint32_t id, size_t len, double t);

static int read_replies(int c, unsigned char *pkt, reply_fn on_reply) {
    struct client *cl = &clients[c];
    if (opt.transport == T_KMUX || opt.transport == T_SEQPACKET) {
        for (;;) {
            ssize_t n = recv(cl->fd, pkt, MAX_MESSAGE + 1, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return 1;
                FAIL("recv");
            }
            if (n == 0) return 0;
            if (pkt[0] != 0x00) { /* a NOTICE: an error about one of our requests */
                fprintf(stderr, "loadgen: kmuxd notice on client %d (%zd bytes)\n", c, n);
                notices++;
                continue;
            }
            on_reply(c, match_reply(c, pkt + 1, (size_t)n - 1), (size_t)n - 1, now());
        }
    }
    for (;;) {
        ssize_t n = recv(cl->fd, cl->buf + cl->have, STREAM_BUFFER - cl->have, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return 1;
            FAIL("recv");
        }
        if (n == 0) return 0;
        cl->have += (size_t)n;
        double t = now();
        size_t pos = 0, len;
        while ((len = stream_reply_len(cl->buf + pos, cl->have - pos)) > 0) {
            const unsigned char *msg = cl->buf + pos;
            size_t mlen = len;
            if (opt.transport == T_ZMTP) {
                if (msg[0] & 0x04) { pos += len; continue; } /* a command (PING...): not a reply */
                size_t head = (msg[0] & 0x02) ? 9 : 2;
                msg += head;
                mlen -= head;
            }
            on_reply(c, match_reply(c, msg, mlen), mlen, t);
            pos += len;
        }
        memmove(cl->buf, cl->buf + pos, cl->have - pos);
        cl->have -= pos;
        if (cl->have == STREAM_BUFFER) die("%s", "a reply does not fit the stream buffer");
    }
}

static int epfd;
static double g_ws, g_we, g_stop;
static unsigned char *g_scratch;
static uint32_t next_id;
static int open_loop;
static long window_unfinished;

static void record(double latency, size_t len) {
    completed++;
    completed_bytes += (long)(len + opt.request_len);
    if (nsamples < MAX_SAMPLES) samples[nsamples++] = latency;
}

/* Send request id for client owner; t is its send (rr) or scheduled (open) time. */
static void issue(int owner, uint32_t id, double t) {
    struct slot *s = &slots[id % INFLIGHT_SLOTS];
    if (s->owner >= 0) overruns++; /* INFLIGHT_SLOTS requests behind: the oldest is forgotten */
    else inflight++;
    s->owner = owner;
    s->id = id;
    s->t = t;
    send_request(owner, id, g_scratch);
}

static void rr_reply(int c, uint32_t id, size_t len, double t) {
    (void)c;
    struct slot *s = &slots[id % INFLIGHT_SLOTS];
    if (s->owner < 0 || s->id != id) {
        /* Not ours: with balance steering, a late reply to a client of an
         * earlier run that left can reach one of ours. Counted, not timed. */
        strays++;
        return;
    }
    int owner = s->owner;
    double sent = s->t;
    s->owner = -1;
    inflight--;
    if (open_loop) {
        if (sent >= g_ws && sent < g_we) {
            record(t - sent, len);
            window_unfinished--;
        }
        return;
    }
    if (t >= g_ws && t < g_we) record(t - sent, len);
    /* Closed loop: the owner (with balance steering, not always the receiver) sends again. */
    if (t < g_stop) /* bounded: no new request after the run's end */
        issue(owner, next_id++, now());
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nsamples) return 0;
    size_t i = (size_t)(p * (double)nsamples);
    if (i >= nsamples) i = nsamples - 1;
    return samples[i] * 1e6;
}

static int run_rr(int is_open) {
    open_loop = is_open;
    if (!opt.request) die("%s", "rr/open need --request HEX");
    clients = calloc((size_t)opt.clients, sizeof *clients);
    slots = malloc(INFLIGHT_SLOTS * sizeof *slots);
    samples = malloc(MAX_SAMPLES * sizeof *samples);
    g_scratch = malloc(opt.request_len + 16);
    unsigned char *pkt = malloc(MAX_MESSAGE + 1);
    for (size_t i = 0; i < INFLIGHT_SLOTS; i++) slots[i].owner = -1;
    epfd = epoll_create1(0);
    for (int i = 0; i < opt.clients; i++) {
        char name[32];
        snprintf(name, sizeof name, "rr-%d", i);
        clients[i].fd = connect_client(name);
        if (opt.transport == T_TCP || opt.transport == T_ZMTP) clients[i].buf = malloc(STREAM_BUFFER);
        if (opt.reply == R_ASCII) {
            clients[i].fifo_cap = 65536;
            clients[i].fifo = malloc(clients[i].fifo_cap * sizeof(uint32_t));
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, clients[i].fd, &ev) < 0) FAIL("epoll_ctl");
    }
    double start, stop, ws, we;
    read_go(&start, &stop, &ws, &we);
    g_ws = ws;
    g_we = we;
    g_stop = stop;
    sleep_until(start);
    struct epoll_event evs[EPOLL_BATCH];
    double next_send = start, interval = is_open ? 1.0 / opt.rate : 0;
    int rr_client = 0;
    /* Ids start anywhere, so a stale reply from an earlier run is told apart. */
    next_id = (uint32_t)(now() * 1e6) ^ ((uint32_t)getpid() << 16);
    if (!is_open)
        for (int i = 0; i < opt.clients; i++) issue(i, next_id++, now());
    /* After the last send, wait (at most DRAIN_GRACE) for every answer, so
     * nothing of this run is still on its way when the next one starts. */
    double last_send = is_open ? we : stop, deadline = last_send + DRAIN_GRACE;
    for (;;) {
        double t = now();
        if (t >= deadline || (t >= last_send && inflight == 0)) break;
        if (is_open) {
            /* Every request whose time has come is sent now, answered or not:
             * a slow target cannot slow the schedule (no coordinated omission). */
            while (next_send <= t && next_send < we) {
                if (next_send >= ws) window_unfinished++;
                issue(rr_client, next_id++, next_send);
                rr_client = (rr_client + 1) % opt.clients;
                next_send += interval;
            }
        }
        /* Wake for the next scheduled send, or (open loop) at the window's end
         * to see whether its last answer is in, or at the deadline. */
        double until = is_open && next_send < we ? next_send : t < last_send ? last_send : deadline;
        if (until > deadline) until = deadline;
        double wait = until - now();
        if (wait < 0) wait = 0;
        struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
        int n = epoll_pwait2(epfd, evs, EPOLL_BATCH, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            FAIL("epoll_pwait2");
        }
        for (int i = 0; i < n; i++) {
            int c = (int)evs[i].data.u32;
            if (!read_replies(c, pkt, rr_reply)) die("%s", "the target closed a client's connection");
        }
    }
    qsort(samples, nsamples, sizeof *samples, cmp_double);
    /* Open loop: a request of the window still unanswered counts as slower than any answered one. */
    long unfinished = is_open ? window_unfinished : 0;
    size_t answered = nsamples;
    for (long i = 0; i < unfinished && nsamples < MAX_SAMPLES; i++) samples[nsamples++] = 1e9;
    double sum = 0;
    for (size_t i = 0; i < answered; i++) sum += samples[i];
    printf("{\"completed\": %ld, \"bytes\": %ld, \"window_s\": %.6f, \"p50_us\": %.2f, \"p99_us\": %.2f, "
           "\"p999_us\": %.2f, \"max_us\": %.2f, \"mean_us\": %.2f, \"samples\": %zu, \"unfinished\": %ld, "
           "\"overruns\": %ld, \"notices\": %ld, \"strays\": %ld, \"inflight_at_end\": %ld}\n",
           completed, completed_bytes, we - ws, pct(0.50), pct(0.99), pct(0.999),
           answered ? samples[answered - 1] * 1e6 : 0.0, answered ? sum / (double)answered * 1e6 : 0.0,
           answered, unfinished, overruns, notices, strays, inflight);
    return notices || overruns ? 1 : 0;
}

/* -- idle and churn ------------------------------------------------------------------ */

static void raise_nofile(rlim_t want) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    if (r.rlim_cur < want) {
        r.rlim_cur = want < r.rlim_max ? want : r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

static int run_idle(void) {
    raise_nofile((rlim_t)opt.clients + 64);
    int *fds = malloc((size_t)opt.clients * sizeof *fds);
    double t0 = now();
    for (int i = 0; i < opt.clients; i++) fds[i] = connect_client("idle");
    double t1 = now();
    printf("{\"connected\": %d, \"connect_s\": %.6f}\n", opt.clients, t1 - t0);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) { /* hold the clients until stdin closes */ }
    for (int i = 0; i < opt.clients; i++) close(fds[i]);
    return 0;
}

static int run_churn(void) {
    double start, stop, ws, we;
    read_go(&start, &stop, &ws, &we);
    pid_t pids[1024];
    for (int p = 0; p < opt.procs; p++) {
        pids[p] = fork();
        if (pids[p] < 0) FAIL("fork");
        if (pids[p] == 0) {
            sleep_until(start);
            for (int i = 0; i < opt.clients; i++) close(connect_client("churn"));
            _exit(0);
        }
    }
    int failed = 0;
    for (int p = 0; p < opt.procs; p++) {
        int status;
        waitpid(pids[p], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
    }
    double t = now();
    printf("{\"clients\": %d, \"seconds\": %.6f, \"failed_procs\": %d}\n", opt.clients * opt.procs, t - start, failed);
    return failed ? 1 : 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    parse_args(argc, argv);
    if (!strcmp(opt.mode, "flood")) return run_flood();
    if (!strcmp(opt.mode, "rr")) return run_rr(0);
    if (!strcmp(opt.mode, "open")) return run_rr(1);
    if (!strcmp(opt.mode, "idle")) return run_idle();
    if (!strcmp(opt.mode, "churn")) return run_churn();
    die("unknown mode %s", opt.mode);
    return 2;
}
