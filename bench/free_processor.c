/* The benchmark's "free processor": an ext_proc server that costs (almost)
 * nothing, to measure Envoy's own share of the ext_proc path in the same run.
 *
 *   free_processor PORT HEADERS_BLOCK_HEX MESSAGE_HEX TRAILERS_BLOCK_HEX [MESSAGE2_HEX]
 *
 * Single-threaded epoll, HTTP/2 with prior knowledge (h2c), loopback only.
 * Every gRPC message on every stream is answered with one precomputed
 * response: a HEADERS frame carrying HEADERS_BLOCK (an HPACK block, sent once
 * per stream), then a DATA frame carrying MESSAGE (a gRPC length-prefixed
 * message). Given MESSAGE2, streams alternate between MESSAGE and MESSAGE2 by
 * stream id (odd ids 1, 5, 9, ... get MESSAGE; 3, 7, 11, ... get MESSAGE2).
 * A client half-close is answered with TRAILERS_BLOCK (END_STREAM).
 *
 * It never decodes HPACK (it needs no header value), so it cannot answer the
 * gRPC health service: turn the cluster's health check off. Envoy resets every
 * ext_proc stream after the answer (RST_STREAM CANCEL); a reset frees the
 * stream's slot. A measuring tool, not a server: no limits, no GOAWAY, no
 * TLS, no flow control beyond keeping the receive windows open.
 *
 * Prints "serving port=N" once it listens (PORT 0: the kernel's choice).
 * Build: cc -O2 -o free_processor bench/free_processor.c
 * Derived from a canned-frame responder used to measure the transport. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define RING 4096 /* stream slots per connection: more than Envoy ever has open */
#define MAX_BLOCK 4096

typedef struct {
    int fd;
    int preface_seen;
    unsigned char *in;
    size_t inlen, incap;
    unsigned char *out; /* unsent output (the kernel's buffer was full) */
    size_t outlen, outcap;
    uint32_t sids[RING];
    unsigned char headers_sent[RING];
    uint64_t unacked; /* DATA bytes received since the last connection WINDOW_UPDATE */
    int want_out;     /* registered for EPOLLOUT */
} conn_t;

static unsigned char hdr_block[MAX_BLOCK], msg1[MAX_BLOCK], msg2[MAX_BLOCK], trl_block[MAX_BLOCK];
static size_t hdr_len, msg1_len, msg2_len, trl_len;

static size_t unhex(const char *s, unsigned char *d) {
    size_t n = strlen(s) / 2;
    if (n > MAX_BLOCK) { fprintf(stderr, "free_processor: argument longer than %d bytes\n", MAX_BLOCK); exit(2); }
    for (size_t i = 0; i < n; i++)
        if (sscanf(s + 2 * i, "%2hhx", &d[i]) != 1) { fprintf(stderr, "free_processor: bad hex\n"); exit(2); }
    return n;
}

static void put(conn_t *c, const void *p, size_t n) {
    if (c->outlen + n > c->outcap) {
        c->outcap = (c->outlen + n) * 2;
        c->out = realloc(c->out, c->outcap);
        if (!c->out) abort();
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}

static void frame_header(conn_t *c, size_t len, int type, int flags, uint32_t sid) {
    unsigned char h[9] = {len >> 16, len >> 8, len, type, flags, sid >> 24, sid >> 16, sid >> 8, sid};
    put(c, h, 9);
}

static void on_frame(conn_t *c, const unsigned char *payload, size_t len, int type, int flags, uint32_t sid) {
    size_t slot = (sid >> 1) & (RING - 1);
    switch (type) {
    case 0: /* DATA: Envoy sends each gRPC message in one frame */
        c->unacked += len;
        if (c->sids[slot] != sid) break;
        if (len >= 5) {
            if (!c->headers_sent[slot]) {
                frame_header(c, hdr_len, 1, 0x4, sid);
                put(c, hdr_block, hdr_len);
                c->headers_sent[slot] = 1;
            }
            if (msg2_len && ((sid >> 1) & 1)) {
                frame_header(c, msg2_len, 0, 0, sid);
                put(c, msg2, msg2_len);
            } else {
                frame_header(c, msg1_len, 0, 0, sid);
                put(c, msg1, msg1_len);
            }
        }
        if (flags & 0x1) goto trailers;
        break;
    case 1: /* HEADERS: a new stream (or the client's trailers) */
        if (c->sids[slot] != sid) { c->sids[slot] = sid; c->headers_sent[slot] = 0; }
        if (flags & 0x1) goto trailers;
        break;
    case 3: /* RST_STREAM */
        if (c->sids[slot] == sid) c->sids[slot] = 0;
        break;
    case 4: /* SETTINGS -> ACK */
        if (!(flags & 0x1)) frame_header(c, 0, 4, 0x1, 0);
        break;
    case 6: /* PING -> ACK */
        if (!(flags & 0x1) && len == 8) { frame_header(c, 8, 6, 0x1, 0); put(c, payload, 8); }
        break;
    default:
        break;
    }
    return;
trailers:
    if (!c->headers_sent[slot]) { frame_header(c, hdr_len, 1, 0x4, sid); put(c, hdr_block, hdr_len); }
    frame_header(c, trl_len, 1, 0x5, sid);
    put(c, trl_block, trl_len);
    c->sids[slot] = 0;
}

/* Writes what the kernel takes; 0 when all is written, 1 when some is left, -1 on error. */
static int flush(conn_t *c) {
    size_t done = 0;
    while (done < c->outlen) {
        ssize_t w = write(c->fd, c->out + done, c->outlen - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return -1;
        }
        done += (size_t)w;
    }
    memmove(c->out, c->out + done, c->outlen - done);
    c->outlen -= done;
    return c->outlen ? 1 : 0;
}

static void drop(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: free_processor PORT HEADERS_BLOCK_HEX MESSAGE_HEX TRAILERS_BLOCK_HEX [MESSAGE2_HEX]\n");
        return 2;
    }
    hdr_len = unhex(argv[2], hdr_block);
    msg1_len = unhex(argv[3], msg1);
    trl_len = unhex(argv[4], trl_block);
    if (argc == 6) msg2_len = unhex(argv[5], msg2);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128) || getsockname(ls, (struct sockaddr *)&a, &alen)) {
        perror("free_processor: listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("serving port=%d\n", ntohs(a.sin_port));
    fflush(stdout);

    static unsigned char rb[1 << 16];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno == EINTR) continue;
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) { /* the listener */
                int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                if (fd < 0) continue;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                c = calloc(1, sizeof *c);
                if (!c) abort();
                c->fd = fd;
                c->incap = 1 << 16;
                c->in = malloc(c->incap);
                /* Server preface: SETTINGS (INITIAL_WINDOW_SIZE 1 MiB) and a connection WINDOW_UPDATE. */
                frame_header(c, 6, 4, 0, 0);
                unsigned char s[6] = {0, 4, 0, 0x10, 0, 0};
                put(c, s, 6);
                frame_header(c, 4, 8, 0, 0);
                unsigned char w[4] = {0x7f, 0xff, 0, 0};
                put(c, w, 4);
                struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                if (flush(c) < 0) drop(ep, c);
                continue;
            }
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) { drop(ep, c); continue; }
            if (evs[i].events & EPOLLIN) {
                ssize_t r = read(c->fd, rb, sizeof rb);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { drop(ep, c); continue; }
                if (r > 0) {
                    if (c->inlen + (size_t)r > c->incap) {
                        c->incap = (c->inlen + (size_t)r) * 2;
                        c->in = realloc(c->in, c->incap);
                        if (!c->in) abort();
                    }
                    memcpy(c->in + c->inlen, rb, (size_t)r);
                    c->inlen += (size_t)r;
                    size_t pos = 0;
                    if (!c->preface_seen) {
                        if (c->inlen < 24) continue;
                        c->preface_seen = 1;
                        pos = 24;
                    }
                    while (c->inlen - pos >= 9) {
                        const unsigned char *h = c->in + pos;
                        size_t len = ((size_t)h[0] << 16) | ((size_t)h[1] << 8) | h[2];
                        if (c->inlen - pos < 9 + len) break;
                        uint32_t sid = ((uint32_t)(h[5] & 0x7f) << 24) | ((uint32_t)h[6] << 16) | ((uint32_t)h[7] << 8) | h[8];
                        on_frame(c, h + 9, len, h[3], h[4], sid);
                        pos += 9 + len;
                    }
                    memmove(c->in, c->in + pos, c->inlen - pos);
                    c->inlen -= pos;
                    if (c->unacked > (1u << 29)) { /* give the connection window back, in large steps */
                        uint32_t inc = (uint32_t)c->unacked;
                        frame_header(c, 4, 8, 0, 0);
                        unsigned char w[4] = {inc >> 24, inc >> 16, inc >> 8, inc};
                        put(c, w, 4);
                        c->unacked = 0;
                    }
                }
            }
            int left = c->outlen ? flush(c) : 0;
            if (left < 0) { drop(ep, c); continue; }
            if (left != c->want_out) { /* EPOLLOUT only while output waits */
                c->want_out = left;
                struct epoll_event e2 = {.events = EPOLLIN | (left ? EPOLLOUT : 0), .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e2);
            }
        }
    }
}
