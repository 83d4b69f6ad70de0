/* rng.h — deterministic random numbers (xoshiro256** seeded by splitmix64).
 *
 * Used where results must be reproducible from a seed: `twn mkmodel` weights, seeded sampling,
 * tests.  Identical sequences on every platform; no global state. */
#ifndef TWN_UTIL_RNG_H
#define TWN_UTIL_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} twn_rng;

void twn_rng_seed(twn_rng *r, uint64_t seed);
uint64_t twn_rng_u64(twn_rng *r);
/* Uniform in [0, 1) with 53 bits. */
double twn_rng_uniform(twn_rng *r);
/* Standard normal (Box–Muller on two uniforms; one value per call). */
double twn_rng_normal(twn_rng *r);

#endif
