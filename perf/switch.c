/* What handing work between two threads costs on this machine: two threads pinned to the
 * given CPUs pass a counter back and forth 200,000 times, each waiting either with
 * sched_yield between polls (how laminardb's threads poll) or with a bare pause loop.
 * On one CPU every hand-over is a context switch; on two it is a cache-line transfer.
 *
 *   gcc -O2 -o /tmp/switch perf/switch.c -lpthread
 *   /tmp/switch 0 0 1   # same CPU, yielding
 *   /tmp/switch 0 1 1   # two CPUs, yielding
 *   /tmp/switch 0 1 0   # two CPUs, spinning
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROUNDS 200000L

static atomic_long turn;
static int cpu_a, cpu_b, yielding;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

/* Waits until `turn` is `value`. */
static void wait_for(long value) {
    while (atomic_load(&turn) != value) {
        if (yielding)
            sched_yield();
        else
            __builtin_ia32_pause();
    }
}

static void *answer(void *unused) {
    (void)unused;
    pin(cpu_b);
    for (long i = 1; i <= ROUNDS; i++) {
        wait_for(2 * i - 1);
        atomic_store(&turn, 2 * i);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CPU_A CPU_B YIELD(0|1)\n", argv[0]);
        return 2;
    }
    cpu_a = atoi(argv[1]);
    cpu_b = atoi(argv[2]);
    yielding = atoi(argv[3]);
    pthread_t peer;
    pthread_create(&peer, NULL, answer, NULL);
    pin(cpu_a);
    long start = now_ns();
    for (long i = 1; i <= ROUNDS; i++) {
        atomic_store(&turn, 2 * i - 1);
        wait_for(2 * i);
    }
    long took = now_ns() - start;
    pthread_join(peer, NULL);
    printf("cpu %d <-> cpu %d, %s: %.2f µs per hand-over\n", cpu_a, cpu_b, yielding ? "yielding" : "spinning",
           took / (2.0 * ROUNDS) / 1000);
    return 0;
}
