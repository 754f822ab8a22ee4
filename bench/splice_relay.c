/* A byte-copy relay between two unix sockets: the floor of any man in the middle.
 *
 *     gcc -O2 -o splice_relay bench/splice_relay.c
 *     ./splice_relay --listen /tmp/x/relay.sock --runtime-endpoint unix:///tmp/x/runtime.sock [--copy]
 *
 * bench/forwarding.py compiles it into its temporary directory and measures it as the "byte-copy"
 * reference row. For every accepted connection it opens one connection upstream and moves bytes
 * both ways without looking at them: no HTTP/2, no gRPC, no protobuf. By default each direction
 * goes through a pipe with splice(2) (socket -> pipe -> socket, no copy to user space); --copy uses
 * plain read(2)/write(2) through a 64 KiB buffer instead. One thread, level-triggered epoll,
 * non-blocking sockets.
 *
 * It runs until killed (SIGTERM's default action); the benchmark stops it with everything else.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define MAX_EVENTS 64

enum { MORE, WAIT_IN, WAIT_OUT, DONE, FAILED };

struct conn;

/* One direction of a connection: bytes read from src wait in the pipe (or buffer) until dst takes them. */
struct dir {
    int src, dst;
    int pipe[2];   /* splice mode */
    char *buf;     /* copy mode */
    size_t off;    /* copy mode: first unsent byte in buf */
    size_t pending;
    int eof;
    int state;
};

/* What epoll_event.data points at: one of a connection's two sockets. */
struct end {
    struct conn *conn;
    int fd;
    unsigned events;  /* as last registered */
};

struct conn {
    struct end ends[2];  /* 0: the accepted client, 1: upstream */
    struct dir dirs[2];  /* 0: client -> upstream, 1: upstream -> client */
    int closed;
    struct conn *next_dead;
};

static int copy_mode;
static int epfd;
static struct sockaddr_un upstream;
static struct conn *dead;  /* closed during this epoll batch; freed after it */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void unix_address(struct sockaddr_un *addr, const char *endpoint) {
    if (strncmp(endpoint, "unix://", 7) == 0)
        endpoint += 7;
    if (strlen(endpoint) >= sizeof(addr->sun_path)) {
        fprintf(stderr, "socket path too long: %s\n", endpoint);
        exit(2);
    }
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    strcpy(addr->sun_path, endpoint);
}

static void close_conn(struct conn *c) {
    if (c->closed)
        return;
    c->closed = 1;
    for (int i = 0; i < 2; i++) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->ends[i].fd, NULL);
        close(c->ends[i].fd);
        if (c->dirs[i].pipe[0] >= 0) {
            close(c->dirs[i].pipe[0]);
            close(c->dirs[i].pipe[1]);
        }
        free(c->dirs[i].buf);
    }
    c->next_dead = dead;
    dead = c;
}

/* Move what can be moved now; returns what the direction waits for. */
static int pump(struct dir *d) {
    for (;;) {
        if (d->pending > 0) {
            ssize_t n = copy_mode ? write(d->dst, d->buf + d->off, d->pending)
                                  : splice(d->pipe[0], NULL, d->dst, NULL, d->pending,
                                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->pending -= (size_t)n;
                d->off += (size_t)n;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return WAIT_OUT;
            return FAILED;
        }
        if (d->eof)
            return DONE;
        d->off = 0;
        ssize_t n = copy_mode ? read(d->src, d->buf, CHUNK)
                              : splice(d->src, NULL, d->pipe[1], NULL, CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            d->pending = (size_t)n;
            continue;
        }
        if (n == 0) {
            d->eof = 1;
            shutdown(d->dst, SHUT_WR);
            return DONE;
        }
        if (errno == EAGAIN || errno == EINTR)
            return WAIT_IN;
        return FAILED;
    }
}

/* Pump both directions, then register each socket for exactly what its directions wait for. */
static void service(struct conn *c) {
    for (int i = 0; i < 2; i++) {
        c->dirs[i].state = pump(&c->dirs[i]);
        if (c->dirs[i].state == FAILED) {
            close_conn(c);
            return;
        }
    }
    if (c->dirs[0].state == DONE && c->dirs[1].state == DONE) {
        close_conn(c);
        return;
    }
    for (int i = 0; i < 2; i++) {
        struct end *e = &c->ends[i];
        unsigned want = 0;
        for (int j = 0; j < 2; j++) {
            if (c->dirs[j].src == e->fd && c->dirs[j].state == WAIT_IN)
                want |= EPOLLIN;
            if (c->dirs[j].dst == e->fd && c->dirs[j].state == WAIT_OUT)
                want |= EPOLLOUT;
        }
        if (want != e->events) {
            struct epoll_event ev = {.events = want, .data.ptr = e};
            if (epoll_ctl(epfd, EPOLL_CTL_MOD, e->fd, &ev) < 0)
                die("epoll_ctl MOD");
            e->events = want;
        }
    }
}

static int init_dir(struct dir *d, int src, int dst) {
    d->src = src;
    d->dst = dst;
    d->pipe[0] = d->pipe[1] = -1;
    d->buf = NULL;
    d->off = d->pending = 0;
    d->eof = 0;
    d->state = WAIT_IN;
    if (copy_mode)
        return (d->buf = malloc(CHUNK)) != NULL ? 0 : -1;
    return pipe2(d->pipe, O_NONBLOCK | O_CLOEXEC);
}

static void accept_all(int listener) {
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                perror("accept4");
            return;
        }
        /* A blocking connect: on a unix socket it completes (or fails) at once. */
        int up = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (up < 0 || connect(up, (struct sockaddr *)&upstream, sizeof(upstream)) < 0 || set_nonblocking(up) < 0) {
            perror("upstream");
            if (up >= 0)
                close(up);
            close(client);
            continue;
        }
        struct conn *c = calloc(1, sizeof(*c));
        if (c == NULL || init_dir(&c->dirs[0], client, up) < 0 || init_dir(&c->dirs[1], up, client) < 0)
            die("connection setup");
        int fds[2] = {client, up};
        for (int i = 0; i < 2; i++) {
            c->ends[i] = (struct end){.conn = c, .fd = fds[i], .events = EPOLLIN};
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->ends[i]};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0)
                die("epoll_ctl ADD");
        }
    }
}

int main(int argc, char **argv) {
    const char *listen_path = NULL, *runtime = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc)
            listen_path = argv[++i];
        else if (strcmp(argv[i], "--runtime-endpoint") == 0 && i + 1 < argc)
            runtime = argv[++i];
        else if (strcmp(argv[i], "--copy") == 0)
            copy_mode = 1;
        else {
            fprintf(stderr, "usage: %s --listen PATH --runtime-endpoint PATH [--copy]\n", argv[0]);
            return 2;
        }
    }
    if (listen_path == NULL || runtime == NULL) {
        fprintf(stderr, "--listen and --runtime-endpoint are required\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    unix_address(&upstream, runtime);
    struct sockaddr_un local;
    unix_address(&local, listen_path);
    unlink(local.sun_path);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&local, sizeof(local)) < 0 || listen(listener, 1024) < 0)
        die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &lev) < 0)
        die("epoll_ctl listener");
    fprintf(stderr, "byte-copy relay (%s) %s -> %s (pid %d)\n", copy_mode ? "read/write" : "splice",
            local.sun_path, upstream.sun_path, (int)getpid());
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct end *e = events[i].data.ptr;
            if (e == NULL)
                accept_all(listener);
            else if (!e->conn->closed) {
                struct conn *c = e->conn;
                service(c);
                /* A hung-up peer keeps reporting EPOLLHUP: once what it sent is passed on, drop the pair. */
                struct dir *in = e == &c->ends[0] ? &c->dirs[0] : &c->dirs[1];
                if (!c->closed && ((events[i].events & EPOLLERR) ||
                                   ((events[i].events & EPOLLHUP) && in->state == DONE)))
                    close_conn(c);
            }
        }
        while (dead != NULL) {
            struct conn *next = dead->next_dead;
            free(dead);
            dead = next;
        }
    }
}
