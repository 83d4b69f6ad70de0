/* vexp.h — an expf the compiler can vectorize, for the loops that run it millions of times.
 *
 * glibc's expf is a call per element, so a softmax over 784x784 scores or a GELU over every MLP
 * activation of the vision tower stays scalar.  This is Cephes' expf (Cody-Waite reduction by
 * ln 2, degree-6 polynomial, 2^n built in the exponent bits): within ~2 ulp of expf on the
 * clamped range, straight-line code that `#pragma omp simd` turns into AVX-512/AVX2 lanes.
 * Inputs are clamped to [-87, 88] so 2^n stays a normal float: exp(-87) = 1.6e-38 stands in for
 * the underflowed tail, which is negligible wherever this is used (softmax after the max is
 * subtracted, 1 / (1 + e) in sigmoid-form GELU). */
#ifndef TWN_ENGINE_CPU_VEXP_H
#define TWN_ENGINE_CPU_VEXP_H

#include <stdint.h>
#include <string.h>

static inline float twn_vexpf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* n = round(x / ln 2) with the 1.5 * 2^23 trick (round-to-nearest in the FPU's mode). */
    float n = x * 1.44269504088896341f + 12582912.0f;
    n -= 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

#endif
