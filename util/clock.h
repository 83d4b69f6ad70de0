/* clock.h — monotonic time in seconds (double), for rates, deadlines and benchmarks. */
#ifndef TWN_UTIL_CLOCK_H
#define TWN_UTIL_CLOCK_H

#include <time.h>

static inline double twn_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
