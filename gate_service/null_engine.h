/* null_engine.h — a stand-in for the TWN engine in tests and benchmarks (`twn run --engine null`).
 *
 * Instant and deterministic: an item's vector is a unit vector drawn from twn_hash64(id), about
 * 20% of ids are routed hard, and a hard item "thinks" 1..8 tokens.  Header-only so the gate and
 * the worker (separate libraries) share it without a link dependency. */
#ifndef TWN_GATE_NULL_ENGINE_H
#define TWN_GATE_NULL_ENGINE_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "util/hash.h"

static inline uint64_t twn_null_hash(const char *id) {
    return twn_hash64(id, strlen(id));
}

static inline int twn_null_hard(const char *id) {
    return (twn_null_hash(id) >> 7) % 5 == 0;
}

static inline float twn_null_p_think(const char *id) {
    return (float)((twn_null_hash(id) >> 20) % 1000) / 1000.0f;
}

static inline uint32_t twn_null_think_tokens(const char *id) {
    return 1u + (uint32_t)((twn_null_hash(id) >> 40) % 8);
}

/* Pretends n items took item_us microseconds each (job.null_item_us), like an engine would. */
static inline void twn_null_pace(int item_us, int n) {
    if (item_us <= 0 || n <= 0) return;
    long long ns = (long long)item_us * 1000 * n;
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    nanosleep(&ts, NULL);
}

/* dim floats, L2-normalized, a function of the id only (splitmix64 stream seeded by its hash). */
static inline void twn_null_vec(const char *id, int dim, float *out) {
    uint64_t x = twn_null_hash(id);
    double ss = 0;
    for (int i = 0; i < dim; i++) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[i] = (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        ss += (double)out[i] * out[i];
    }
    float inv = ss > 0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
    for (int i = 0; i < dim; i++) out[i] *= inv;
}

#endif
