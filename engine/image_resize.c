/* image_resize.c — the bicubic antialiased resize of the two reference processors, bit-exact.
 *
 * Both references run the same separable algorithm (Pillow's ImagingResample; torch's uint8
 * kernel is a port of Pillow-SIMD): for each output coordinate i, center = scale * (i + 0.5),
 * support = 2 * max(scale, 1), taps xmin .. xmin+n-1 with xmin = (int)(center - support + 0.5),
 * weights filter((j + xmin - center + 0.5) / max(scale, 1)) with Keys' cubic a = -0.5, normalized
 * to sum 1, then quantized to fixed point.  The horizontal pass runs first, its result is rounded
 * to uint8, then the vertical pass.  They differ only in the fixed point:
 *   - Pillow (TWN_IMAGE_BACKEND_PIL): int32 weights with 22 fractional bits;
 *   - torch (TWN_IMAGE_BACKEND_TORCHVISION): int16 weights, the precision chosen per pass as the
 *     largest p <= 22 for which round(max_weight * 2^p) still fits 15 bits
 *     (`_compute_index_ranges_int16_weights` in aten/src/ATen/native/cpu/UpSampleKernel.cpp);
 * and in how the cubic polynomial is written (kept as each writes it, so the doubles agree).
 * Each output is (2^(prec-1) + sum w_j * p_j) >> prec clamped to 0..255, in int32, so the result
 * is independent of evaluation order and of vectorization.
 *
 * Weight computation must not be contracted into FMAs (the references round each operation). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE4_1__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "engine/image.h"
#include "util/mem.h"

/* Pillow's bicubic_filter (libImaging/Resample.c). */
static double pil_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* torch's HelperInterpCubic::aa_filter: cubic_convolution1/2 with A = -0.5 (ATen UpSample.h). */
static double torch_bicubic(double x) {
    const double A = -0.5;
    x = fabs(x);
    if (x < 1.0) return ((A + 2) * x - (A + 3)) * x * x + 1;
    if (x < 2.0) return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A;
    return 0.0;
}

/* Fixed-point taps of one pass: output i reads n[i] inputs from xmin[i] with weights
 * k[i * ksize ..]; each sum is rounded with 2^(prec-1) and shifted by prec. */
typedef struct {
    int out, ksize, prec;
    int *xmin, *n;
    int32_t *k;
} taps;

static void taps_free(taps *t) {
    twn_free(t->xmin);
    twn_free(t->n);
    twn_free(t->k);
    memset(t, 0, sizeof *t);
}

static int taps_make(int in, int out, twn_image_backend backend, taps *t, twn_err *err) {
    memset(t, 0, sizeof *t);
    double (*filter)(double) = backend == TWN_IMAGE_BACKEND_PIL ? pil_bicubic : torch_bicubic;
    double scale = (double)in / out;
    double fscale = scale >= 1.0 ? scale : 1.0;
    double support = 2.0 * fscale, inv = 1.0 / fscale;
    double ks = ceil(support) * 2 + 1;
    if (ks > 1e6) return twn_err_set(err, "resize %d -> %d: filter support too large", in, out);
    int ksize = (int)ks;
    size_t nk;
    if (twn_mul_size((size_t)out, (size_t)ksize, &nk) != 0) goto oom;
    double *w = twn_try_alloc(nk * sizeof *w);
    t->xmin = twn_try_alloc((size_t)out * sizeof *t->xmin);
    t->n = twn_try_alloc((size_t)out * sizeof *t->n);
    t->k = twn_try_alloc(nk * sizeof *t->k);
    if (!w || !t->xmin || !t->n || !t->k) {
        twn_free(w);
        taps_free(t);
        goto oom;
    }
    t->out = out;
    t->ksize = ksize;
    double wmax = 0.0;
    for (int i = 0; i < out; i++) {
        double center = scale * (i + 0.5);
        int64_t xmin = (int64_t)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int64_t xmax = (int64_t)(center + support + 0.5);
        if (xmax > in) xmax = in;
        int64_t n = xmax - xmin;
        if (n < 0) n = 0;
        if (n > ksize) n = ksize;
        double *wi = w + (size_t)i * ksize, total = 0.0;
        for (int64_t j = 0; j < n; j++) {
            double v = filter((j + xmin - center + 0.5) * inv);
            wi[j] = v;
            total += v;
        }
        for (int64_t j = 0; j < n; j++) {
            if (total != 0.0) wi[j] /= total;
            if (wi[j] > wmax) wmax = wi[j];
        }
        for (int64_t j = n; j < ksize; j++) wi[j] = 0.0;
        t->xmin[i] = (int)xmin;
        t->n[i] = (int)n;
    }
    if (backend == TWN_IMAGE_BACKEND_PIL) {
        t->prec = 22; /* PRECISION_BITS = 32 - 8 - 2 */
    } else {
        int p;
        for (p = 0; p < 22; p++)
            if ((int)(0.5 + wmax * (1 << (p + 1))) >= (1 << 15)) break;
        t->prec = p;
    }
    for (size_t j = 0; j < nk; j++) {
        double v = w[j] * (double)(1 << t->prec);
        int q = v < 0 ? (int)(-0.5 + v) : (int)(0.5 + v);
        t->k[j] = backend == TWN_IMAGE_BACKEND_PIL ? q : (int16_t)q;
    }
    twn_free(w);
    return 0;
oom:
    return twn_err_set(err, "resize %d -> %d: cannot allocate the filter taps", in, out);
}

static inline uint8_t clamp8(int32_t v, int prec) {
    v >>= prec; /* arithmetic shift, as both references */
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

// ------------------------------------------------------------------------------------------------
// Passes over interleaved RGB rows.  With SSE4.1 / AVX2 (the build uses -march=native) the same
// int32 arithmetic runs several channels or bytes per instruction; results are identical to the
// scalar loops, which remain for other targets and for the last bytes of a row.

/* Rows [y0, y1) of src (sw wide, src_h rows in all) into rows [0, y1-y0) of dst (dw wide).  The
 * SIMD path loads 4 bytes per tap (R, G, B and the next pixel's R, whose lane is dropped), so the
 * very last pixel of the buffer is read by the scalar loop. */
static void pass_horizontal(const uint8_t *src, int sw, int src_h, int y0, int y1, uint8_t *dst,
                            int dw, const taps *t) {
    const int32_t half = t->prec ? 1 << (t->prec - 1) : 0;
    int y = y0;
#if defined(__AVX2__)
    /* Two rows at once, one row per 128-bit half; the last row of the buffer is left to the
     * one-row loop below. */
    const __m128i shift = _mm_cvtsi32_si128(t->prec);
    for (; y + 1 < y1 && y + 1 < src_h - 1; y += 2) {
        const uint8_t *s = src + (size_t)y * sw * 3, *s1 = s + (size_t)sw * 3;
        uint8_t *d = dst + (size_t)(y - y0) * dw * 3, *d1 = d + (size_t)dw * 3;
        for (int x = 0; x < dw; x++, d += 3, d1 += 3) {
            const int32_t *k = t->k + (size_t)x * t->ksize;
            const size_t off = (size_t)t->xmin[x] * 3;
            const uint8_t *p = s + off, *q = s1 + off;
            __m256i acc = _mm256_set_epi32(0, half, half, half, 0, half, half, half);
            for (int j = 0, n = t->n[x]; j < n; j++, p += 3, q += 3) {
                uint32_t a, b;
                memcpy(&a, p, 4);
                memcpy(&b, q, 4);
                __m256i px =
                    _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)((uint64_t)b << 32 | a)));
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, _mm256_set1_epi32(k[j])));
            }
            acc = _mm256_sra_epi32(acc, shift);
            __m128i lo = _mm256_castsi256_si128(acc), hi = _mm256_extracti128_si256(acc, 1);
            __m128i b8 = _mm_packus_epi16(_mm_packus_epi32(lo, hi), _mm_setzero_si128());
            uint64_t o = (uint64_t)_mm_cvtsi128_si64(b8);
            memcpy(d, &o, 3);
            o >>= 32;
            memcpy(d1, &o, 3);
        }
    }
#endif
    for (; y < y1; y++) {
        const uint8_t *s = src + (size_t)y * sw * 3;
        uint8_t *d = dst + (size_t)(y - y0) * dw * 3;
        const int last_row = y == src_h - 1;
        for (int x = 0; x < dw; x++, d += 3) {
            const int32_t *k = t->k + (size_t)x * t->ksize;
            const uint8_t *p = s + (size_t)t->xmin[x] * 3;
            const int n = t->n[x];
#if defined(__SSE4_1__)
            if (!last_row || t->xmin[x] + n < sw) {
                __m128i acc = _mm_set_epi32(0, half, half, half);
                for (int j = 0; j < n; j++, p += 3) {
                    int32_t w;
                    memcpy(&w, p, 4);
                    __m128i px = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(w));
                    acc = _mm_add_epi32(acc, _mm_mullo_epi32(px, _mm_set1_epi32(k[j])));
                }
                acc = _mm_sra_epi32(acc, _mm_cvtsi32_si128(t->prec));
                acc = _mm_packus_epi32(acc, acc); /* clamps below 0 */
                acc = _mm_packus_epi16(acc, acc); /* clamps above 255 */
                int32_t o = _mm_cvtsi128_si32(acc);
                memcpy(d, &o, 3);
                continue;
            }
#else
            (void)last_row;
#endif
            int32_t r = half, g = half, b = half;
            for (int j = 0; j < n; j++, p += 3) {
                r += p[0] * k[j];
                g += p[1] * k[j];
                b += p[2] * k[j];
            }
            d[0] = clamp8(r, t->prec);
            d[1] = clamp8(g, t->prec);
            d[2] = clamp8(b, t->prec);
        }
    }
}

/* src rows are numbered from `row0` (the first row the taps may read). */
static void pass_vertical(const uint8_t *src, int row0, int w, uint8_t *dst, const taps *t) {
    const int32_t half = t->prec ? 1 << (t->prec - 1) : 0;
    const size_t stride = (size_t)w * 3;
    for (int y = 0; y < t->out; y++) {
        const int32_t *k = t->k + (size_t)y * t->ksize;
        const uint8_t *s0 = src + (size_t)(t->xmin[y] - row0) * stride;
        const int n = t->n[y];
        uint8_t *d = dst + (size_t)y * stride;
        size_t i = 0;
#if defined(__AVX2__)
        const __m128i shift = _mm_cvtsi32_si128(t->prec);
        for (; i + 16 <= stride; i += 16) {
            __m256i a0 = _mm256_set1_epi32(half), a1 = a0;
            const uint8_t *s = s0 + i;
            for (int j = 0; j < n; j++, s += stride) {
                __m128i px = _mm_loadu_si128((const __m128i *)s);
                __m256i kj = _mm256_set1_epi32(k[j]);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(px), kj));
                a1 = _mm256_add_epi32(
                    a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(px, 8)), kj));
            }
            a0 = _mm256_sra_epi32(a0, shift);
            a1 = _mm256_sra_epi32(a1, shift);
            /* packus works within 128-bit lanes; permute puts the 16 bytes back in order */
            __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(a0, a1), 0xd8);
            __m128i b8 =
                _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
            _mm_storeu_si128((__m128i *)(d + i), b8);
        }
#endif
        for (; i < stride; i++) {
            int32_t acc = half;
            for (int j = 0; j < n; j++) acc += s0[(size_t)j * stride + i] * k[j];
            d[i] = clamp8(acc, t->prec);
        }
    }
}

// ------------------------------------------------------------------------------------------------

int twn_image_resize(const twn_rgb_image *img, int out_w, int out_h, twn_image_backend backend,
                     twn_rgb_image *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    if (!img || !img->rgb || img->width <= 0 || img->height <= 0 || out_w <= 0 || out_h <= 0)
        return twn_err_set(err, "resize %dx%d -> %dx%d: empty image or size", img ? img->width : 0,
                           img ? img->height : 0, out_w, out_h);
    if (backend != TWN_IMAGE_BACKEND_PIL && backend != TWN_IMAGE_BACKEND_TORCHVISION)
        return twn_err_set(err, "resize: unknown backend %d", (int)backend);
    const int in_w = img->width, in_h = img->height;
    size_t out_bytes, mid_bytes;
    if (twn_mul_size((size_t)out_w * 3, (size_t)out_h, &out_bytes) != 0)
        return twn_err_set(err, "resize to %dx%d: size overflows", out_w, out_h);
    uint8_t *dst = twn_try_alloc(out_bytes ? out_bytes : 1);
    if (!dst)
        return twn_err_set(err, "resize to %dx%d: cannot allocate %zu bytes", out_w, out_h,
                           out_bytes);
    out->rgb = dst;
    out->width = out_w;
    out->height = out_h;
    out->format = img->format;
    out->exif_orientation = img->exif_orientation;
    const int need_h = in_w != out_w, need_v = in_h != out_h;
    if (!need_h && !need_v) {
        memcpy(dst, img->rgb, out_bytes);
        return 0;
    }
    taps th = {0}, tv = {0};
    uint8_t *mid = NULL;
    if (need_h && taps_make(in_w, out_w, backend, &th, err) != 0) goto fail;
    if (need_v && taps_make(in_h, out_h, backend, &tv, err) != 0) goto fail;
    if (!need_v) {
        pass_horizontal(img->rgb, in_w, in_h, 0, in_h, dst, out_w, &th);
    } else {
        /* Only the rows the vertical taps read need the horizontal pass (Pillow's ybox). */
        int row0 = tv.xmin[0], row1 = tv.xmin[tv.out - 1] + tv.n[tv.out - 1];
        if (row1 <= row0) row1 = row0 + 1;
        const uint8_t *vsrc = img->rgb + (size_t)row0 * in_w * 3;
        if (need_h) {
            if (twn_mul_size((size_t)out_w * 3, (size_t)(row1 - row0), &mid_bytes) != 0 ||
                !(mid = twn_try_alloc(mid_bytes))) {
                twn_err_set(err, "resize to %dx%d: cannot allocate the intermediate image", out_w,
                            out_h);
                goto fail;
            }
            pass_horizontal(img->rgb, in_w, in_h, row0, row1, mid, out_w, &th);
            vsrc = mid;
        }
        pass_vertical(vsrc, row0, out_w, dst, &tv);
    }
    twn_free(mid);
    taps_free(&th);
    taps_free(&tv);
    return 0;
fail:
    twn_free(mid);
    taps_free(&th);
    taps_free(&tv);
    twn_free(dst);
    memset(out, 0, sizeof *out);
    return -1;
}
