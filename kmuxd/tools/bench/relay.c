/*
 * relay: the benchmark's C peer for the one-way flood, the same shape as
 * kmuxd's send path with nothing else: SOCK_SEQPACKET clients in, a fixed
 * number of TCP connections out.
 *
 *   relay --path SOCKET --port PORT [--connections 4] [--max-message BYTES]
 *
 * Theory of operation: one level-triggered epoll, each socket registered
 * once. A readable client is drained: packets are received one after the
 * other straight into the batch buffer of the next TCP connection (round
 * robin), each packet's kind byte (0x00, as in kmux DATA packets) landing on
 * a saved-and-restored byte before the message, and each u32be header is
 * checked against the packet's size. The drain stops at EAGAIN or when the
 * batch is full (BATCH_BYTES or BATCH_MESSAGES, so one client cannot hold a
 * connection), then the batch goes out with one blocking send (TCP push-back
 * stops the relay, as kmuxd's write_buffer does). There is no hello, no
 * steering, no statistics, no receive path: it is the floor for a relay.
 *
 * stdout: "listening" once the socket listens and every connection is up.
 * SIGTERM: exit 0, printing messages and bytes relayed to stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_CONNECTIONS 64
#define BATCH_BYTES (256 * 1024)
#define BATCH_MESSAGES 512
#define SOCK_BUFFER (4 * 1024 * 1024)
#define EPOLL_BATCH 256
#define LISTEN_BACKLOG 1024

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

#define FAIL(what) do { fprintf(stderr, "relay: %s: %s\n", what, strerror(errno)); exit(1); } while (0)

struct conn {
    int fd;
    unsigned char *buf; /* buf[0] is the spare byte the first kind byte lands on */
    size_t used;        /* message bytes in buf[1:] */
    int msgs;
};

static struct conn conns[MAX_CONNECTIONS];
static int nconns = 4;
static size_t max_message = 1024 * 1024;
static long relayed_msgs, relayed_bytes, bad_frames;

static void flush(struct conn *c) {
    const unsigned char *p = c->buf + 1;
    size_t left = c->used;
    while (left) {
        ssize_t n = send(c->fd, p, left, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            FAIL("send to the backend");
        }
        p += n;
        left -= (size_t)n;
    }
    c->used = 0;
    c->msgs = 0;
}

/* Drain one client into connection batches. Returns 0 when the client is gone. */
static int drain(int fd, int *next) {
    for (;;) {
        struct conn *c = &conns[*next];
        unsigned char *at = c->buf + c->used; /* the byte before the message's place */
        unsigned char saved = *at;
        ssize_t n = recv(fd, at, max_message + 1, MSG_DONTWAIT);
        unsigned char kind = *at;
        *at = saved;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return 1;
            return 0;
        }
        if (n == 0) return 0;
        size_t len = (size_t)n - 1;
        const unsigned char *m = at + 1;
        if (kind != 0x00 || len < 4 || ((size_t)m[0] << 24 | (size_t)m[1] << 16 | (size_t)m[2] << 8 | m[3]) + 4 != len) {
            bad_frames++; /* refused, never written: the message's bytes are simply not kept */
            continue;
        }
        c->used += len;
        c->msgs++;
        relayed_msgs++;
        relayed_bytes += (long)len;
        if (c->used >= BATCH_BYTES || c->msgs >= BATCH_MESSAGES) {
            flush(c);
            *next = (*next + 1) % nconns;
        }
    }
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--connections")) nconns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-message")) max_message = (size_t)atol(argv[i + 1]);
        else { fprintf(stderr, "relay: unknown option %s\n", argv[i]); return 2; }
    }
    if (!path || port <= 0 || nconns < 1 || nconns > MAX_CONNECTIONS || max_message < 16) {
        fprintf(stderr, "usage: relay --path SOCKET --port PORT [--connections 1..64] [--max-message BYTES]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) FAIL("connect to the backend");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[i].fd = fd;
        conns[i].buf = malloc(BATCH_BYTES + max_message + 2);
    }
    int lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0);
    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof ua.sun_path) { fprintf(stderr, "relay: socket path too long\n"); return 2; }
    strcpy(ua.sun_path, path);
    unlink(path);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&ua, sizeof ua) < 0 || listen(lfd, LISTEN_BACKLOG) < 0) FAIL("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("listening\n");
    fflush(stdout);
    int next = 0;
    struct epoll_event evs[EPOLL_BATCH];
    while (!stopping) {
        int n = epoll_wait(ep, evs, EPOLL_BATCH, 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            FAIL("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int cfd;
                while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int buf = SOCK_BUFFER;
                    setsockopt(cfd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            if (!drain(fd, &next)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
        /* Everything that was ready is drained: write what each batch holds. */
        for (int i = 0; i < nconns; i++)
            if (conns[i].used) flush(&conns[i]);
    }
    fprintf(stderr, "relay: %ld messages, %ld bytes relayed, %ld bad frames\n", relayed_msgs, relayed_bytes, bad_frames);
    unlink(path);
    return 0;
}
