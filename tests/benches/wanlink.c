/* A user-space link emulator for the WAN benchmark (this kernel has no sch_netem): joins two
 * persistent TUN devices that live in two network namespaces and imposes, per direction, a
 * bottleneck rate with a finite drop-tail queue, random loss, and a one-way delay.
 *
 *   wanlink <netns-a> <tun-a> <netns-b> <tun-b> <rtt-us> <rate-bit/s, 0 = none> <loss-ppm>
 *           <queue-bytes>
 *
 * Each direction: a reader thread takes IP packets off one TUN device, drops one at random with
 * probability loss-ppm/1e6, serialises it at the bottleneck rate (a packet that would wait more
 * than queue-bytes of backlog is a bottleneck drop), and a writer thread delivers it rtt/2 after
 * it left the bottleneck (to within 50 us: packets due together are delivered in one wake-up).
 * A line on stdin prints the counters since the last line and resets them:
 *
 *   <queue drops> <random losses> <packets delivered> | <queue drops in each 500 ms since then>
 *
 * (the timeline's bins end at the last one with a drop; at most BINS of them). Loss of the
 * emulator's own ring (more than RING packets in flight) is counted as a queue drop.
 *
 * Build: cc -O2 -pthread -o wanlink wanlink.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define RING 16384
#define SLOT 2048
#define SLACK_NS 50000u
#define BINS 120
#define BIN_NS 500000000u

struct dir {
    int in, out;
    uint64_t rate, loss_ppm, queue_bytes, one_way_ns;
    uint64_t next_free; /* when the bottleneck is free again (ns) */
    uint64_t rng;
    /* ring of packets in flight */
    uint8_t (*buf)[SLOT];
    uint32_t *len;
    uint64_t *due;
    uint64_t head, tail; /* head: next to deliver; tail: next free slot */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint_fast64_t queue_drops, losses, delivered;
};

/* Queue drops of both directions over time, since the last counters line. */
static atomic_uint_fast64_t since_ns, timeline[BINS];

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void queue_drop(struct dir *d, uint64_t now) {
    atomic_fetch_add(&d->queue_drops, 1);
    uint64_t since = atomic_load(&since_ns);
    uint64_t bin = now > since ? (now - since) / BIN_NS : 0;
    atomic_fetch_add(&timeline[bin < BINS ? bin : BINS - 1], 1);
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static int open_tun(const char *ns, const char *name) {
    char path[256];
    snprintf(path, sizeof path, "/var/run/netns/%s", ns);
    int nsfd = open(path, O_RDONLY);
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNET) != 0) {
        perror(path);
        exit(1);
    }
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) != 0) {
        perror(name);
        exit(1);
    }
    return fd;
}

static void *reader(void *arg) {
    struct dir *d = arg;
    uint8_t pkt[SLOT];
    for (;;) {
        ssize_t n = read(d->in, pkt, sizeof pkt);
        if (n <= 0) continue;
        if (d->loss_ppm && xorshift(&d->rng) % 1000000 < d->loss_ppm) {
            atomic_fetch_add(&d->losses, 1);
            continue;
        }
        uint64_t now = now_ns(), leave = now;
        if (d->rate) {
            uint64_t start = d->next_free > now ? d->next_free : now;
            uint64_t backlog_bytes = (start - now) * d->rate / 8 / 1000000000u;
            if (backlog_bytes + (uint64_t)n > d->queue_bytes) {
                queue_drop(d, now);
                continue;
            }
            leave = start + (uint64_t)n * 8 * 1000000000u / d->rate;
            d->next_free = leave;
        }
        pthread_mutex_lock(&d->mu);
        if (d->tail - d->head >= RING) {
            pthread_mutex_unlock(&d->mu);
            queue_drop(d, now);
            continue;
        }
        uint64_t i = d->tail % RING;
        memcpy(d->buf[i], pkt, (size_t)n);
        d->len[i] = (uint32_t)n;
        d->due[i] = leave + d->one_way_ns;
        if (d->tail++ == d->head) pthread_cond_signal(&d->cv); /* the writer may be waiting */
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

static void *writer(void *arg) {
    struct dir *d = arg;
    for (;;) {
        pthread_mutex_lock(&d->mu);
        while (d->head == d->tail) pthread_cond_wait(&d->cv, &d->mu);
        uint64_t i = d->head % RING;
        uint64_t due = d->due[i];
        pthread_mutex_unlock(&d->mu);
        uint64_t now = now_ns();
        /* Deliver up to SLACK_NS early, so packets due together leave in one wake-up. */
        if (due > now + SLACK_NS) {
            struct timespec t = {(time_t)(due / 1000000000u), (long)(due % 1000000000u)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
        }
        if (write(d->out, d->buf[i], d->len[i]) > 0) atomic_fetch_add(&d->delivered, 1);
        pthread_mutex_lock(&d->mu);
        d->head++;
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

static void init(struct dir *d, int in, int out, char **argv, uint64_t seed) {
    memset(d, 0, sizeof *d);
    d->in = in;
    d->out = out;
    d->one_way_ns = strtoull(argv[5], NULL, 10) * 1000u / 2;
    d->rate = strtoull(argv[6], NULL, 10);
    d->loss_ppm = strtoull(argv[7], NULL, 10);
    d->queue_bytes = strtoull(argv[8], NULL, 10);
    d->rng = seed;
    d->buf = calloc(RING, SLOT);
    d->len = calloc(RING, sizeof *d->len);
    d->due = calloc(RING, sizeof *d->due);
    if (!d->buf || !d->len || !d->due) exit(1);
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: wanlink <netns-a> <tun-a> <netns-b> <tun-b> <rtt-us> <rate-bit/s> <loss-ppm> <queue-bytes>\n");
        return 2;
    }
    int a = open_tun(argv[1], argv[2]);
    int b = open_tun(argv[3], argv[4]);
    static struct dir ab, ba;
    init(&ab, a, b, argv, 0x9e3779b97f4a7c15u);
    init(&ba, b, a, argv, 0xd1b54a32d192ed03u);
    pthread_t t[4];
    pthread_create(&t[0], NULL, reader, &ab);
    pthread_create(&t[1], NULL, writer, &ab);
    pthread_create(&t[2], NULL, reader, &ba);
    pthread_create(&t[3], NULL, writer, &ba);
    atomic_store(&since_ns, now_ns());
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("%lu %lu %lu |",
               (unsigned long)(atomic_exchange(&ab.queue_drops, 0) + atomic_exchange(&ba.queue_drops, 0)),
               (unsigned long)(atomic_exchange(&ab.losses, 0) + atomic_exchange(&ba.losses, 0)),
               (unsigned long)(atomic_exchange(&ab.delivered, 0) + atomic_exchange(&ba.delivered, 0)));
        uint64_t bins[BINS];
        int last = -1;
        for (int i = 0; i < BINS; i++)
            if ((bins[i] = atomic_exchange(&timeline[i], 0))) last = i;
        atomic_store(&since_ns, now_ns());
        for (int i = 0; i <= last; i++) printf(" %lu", (unsigned long)bins[i]);
        printf("\n");
        fflush(stdout);
    }
    return 0;
}
