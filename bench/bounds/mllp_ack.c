/* The socket-path bound: a minimal MLLP ACK server in C (one thread, epoll, non-blocking sockets).
 *
 * For every frame <VT> msg <FS><CR> it finds MSH-10 and answers
 *   <VT>MSH|^~\&|BOUND|C|||<now>||ACK|A<id>|P|2.5<CR>MSA|AA|<id><CR><FS><CR>
 * No parsing beyond MSH-10, no storage, no validation: what the machine can do on the socket path, so
 * every other figure reads as a fraction of it. Built by bench/ingest.py with `gcc -O2`.
 *
 *   mllp_ack PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (1 << 20)

struct conn {
    int fd;
    char *buf;
    size_t len, cap;
};

static void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
}

/* Blocking-enough write of a small answer: loopback sockets rarely push back; spin on EAGAIN. */
static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Answer every complete frame in c->buf; keep the incomplete rest. Returns -1 to close. */
static int pump(struct conn *c) {
    size_t start = 0;
    char out[65536];
    size_t out_len = 0;
    char now[32];
    time_t t = time(NULL);
    strftime(now, sizeof now, "%Y%m%d%H%M%S", gmtime(&t));
    for (;;) {
        char *base = c->buf + start;
        size_t avail = c->len - start;
        char *end = memmem(base, avail, "\x1c\x0d", 2);
        if (!end) break;
        char *msg = base;
        size_t mlen = (size_t)(end - base);
        if (mlen && msg[0] == 0x0b) { msg++; mlen--; }
        /* MSH-10: after the 9th field separator of the first segment */
        const char *id = "", *p = msg, *stop = msg + mlen;
        size_t idlen = 0;
        int fields = 0;
        while (p < stop && *p != '\r') {
            if (*p == '|') {
                fields++;
                if (fields == 9) {
                    id = p + 1;
                    const char *q = id;
                    while (q < stop && *q != '|' && *q != '\r') q++;
                    idlen = (size_t)(q - id);
                    break;
                }
            }
            p++;
        }
        if (idlen > 199) idlen = 199;
        if (out_len + 512 > sizeof out) {
            if (write_all(c->fd, out, out_len) < 0) return -1;
            out_len = 0;
        }
        out_len += (size_t)snprintf(out + out_len, sizeof out - out_len,
                                    "\x0bMSH|^~\\&|BOUND|C|||%s||ACK|A%.*s|P|2.5\rMSA|AA|%.*s\r\x1c\r", now,
                                    (int)idlen, id, (int)idlen, id);
        start = (size_t)(end - c->buf) + 2;
    }
    if (out_len && write_all(c->fd, out, out_len) < 0) return -1;
    if (start) {
        memmove(c->buf, c->buf + start, c->len - start);
        c->len -= start;
    }
    return c->len > MAX_FRAME ? -1 : 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 2575;
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 512) < 0) {
        perror("bind/listen");
        return 1;
    }
    set_nonblocking(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept(ls, NULL, NULL)) >= 0) {
                    set_nonblocking(fd);
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->cap = 65536;
                    nc->buf = malloc(nc->cap);
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            for (;;) {
                if (c->cap - c->len < 65536) {
                    c->cap *= 2;
                    c->buf = realloc(c->buf, c->cap);
                }
                ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
                if (r > 0) {
                    c->len += (size_t)r;
                    continue;
                }
                if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    close_conn(ep, c);
                    c = NULL;
                }
                break;
            }
            if (c && pump(c) < 0) close_conn(ep, c);
        }
    }
}
