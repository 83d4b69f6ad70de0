/* clock.h — monotonic time in seconds (double), for rates, deadlines and benchmarks. */
#ifndef TWN_UTIL_CLOCK_H
#define TWN_UTIL_CLOCK_H

#include <time.h>

static inline double twn_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Wall-clock time in unix milliseconds: only for timestamps that cross process boundaries
 * (lease deadlines on the wire), never for measuring intervals. */
static inline unsigned long long twn_unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull;
}

/* A twn_now() instant as unix milliseconds (0 for instants before the epoch). */
static inline unsigned long long twn_unix_ms_at(double mono) {
    double ms = (double)twn_unix_ms() + (mono - twn_now()) * 1000.0;
    return ms > 0 ? (unsigned long long)ms : 0;
}

#endif
