/* The machine's own latency floor: a thread pinned to one CPU reads the clock in a tight
 * loop for 3 s and counts the gaps, i.e. the moments the CPU ran something else (timer
 * interrupts, the hypervisor). Any round trip that overlaps such a gap takes that long.
 *
 *   gcc -O2 -o /tmp/stalls perf/stalls.c && /tmp/stalls 0 && /tmp/stalls 1
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(int argc, char **argv) {
    int cpu = argc > 1 ? atoi(argv[1]) : 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        perror("sched_setaffinity");
        return 1;
    }
    /* Gaps of 5-10, 10-20, 20-40 ... µs; the last bin takes everything longer. */
    long bins[10] = {0};
    long lost_ns = 0;
    long start = now_ns(), last = start;
    for (;;) {
        long t = now_ns(), gap = t - last;
        last = t;
        if (gap >= 5000) {
            int b = 0;
            for (long x = gap / 5000; x > 1 && b < 9; x >>= 1) b++;
            bins[b]++;
            lost_ns += gap;
        }
        if (t - start > 3000000000L) break;
    }
    printf("cpu %d, 3 s: gaps", cpu);
    for (int b = 0; b < 10; b++) printf(" %s%ld µs: %ld", b == 9 ? ">=" : "", 5L << b, bins[b]);
    printf("; %.2f %% of the time lost\n", lost_ns / 3e7);
    return 0;
}
