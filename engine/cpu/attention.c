/* attention.c — causal GQA attention for one sequence against its KV cache.
 *
 * Mirrors eager_attention_forward: scores = q·k^T * scale, causal mask, softmax in fp32, · v.
 * Prefills with many rows use sgemm per head (scores [n, L] and P·V); short steps (decode) use
 * plain dot products, which for one row are as fast and avoid BLAS call overhead per head. */
#include <cblas.h>
#include <math.h>

#include "engine/cpu/ops.h"
#include "util/mem.h"

static void softmax_causal(float *row, int valid, int L) {
    float mx = -INFINITY;
    for (int j = 0; j < valid; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.f;
    for (int j = 0; j < valid; j++) {
        row[j] = expf(row[j] - mx);
        sum += row[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < valid; j++) row[j] *= inv;
    for (int j = valid; j < L; j++) row[j] = 0.f;
}

void twn_cpu_attention(const float *q, const float *k, const float *v, float *out, int n, int L,
                       int nh, int nkv, int D, float scale) {
    int rep = nh / nkv, qs = nh * D, ks = nkv * D, past = L - n;
    if (n >= 8) {
        float *S = twn_malloc((size_t)n * L * sizeof(float) * (size_t)nh);
        /* Heads are independent: one OpenMP thread per head.  The engine links the OpenMP
         * build of OpenBLAS, which runs a GEMM called inside a parallel region on the calling
         * thread, so the two never oversubscribe the cores. */
#pragma omp parallel for schedule(dynamic, 1) if (nh > 1 && (double)n * L * D >= 65536.0)
        for (int h = 0; h < nh; h++) {
            float *Sh = S + (size_t)h * n * L;
            const float *kh = k + (size_t)(h / rep) * D, *vh = v + (size_t)(h / rep) * D;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, L, D, scale, q + (size_t)h * D,
                        qs, kh, ks, 0.f, Sh, L);
            for (int t = 0; t < n; t++) softmax_causal(Sh + (size_t)t * L, past + t + 1, L);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, L, 1.f, Sh, L, vh, ks, 0.f,
                        out + (size_t)h * D, qs);
        }
        twn_free(S);
        return;
    }
    /* Short steps: one score buffer for the whole step, [n][nh][L], no allocation per head. */
    float *scores = twn_malloc((size_t)n * nh * L * sizeof(float));
#pragma omp parallel for collapse(2) schedule(static) if (L * nh >= 512)
    for (int t = 0; t < n; t++)
        for (int h = 0; h < nh; h++) {
            int valid = past + t + 1;
            const float *qh = q + (size_t)t * qs + (size_t)h * D;
            const float *kh = k + (size_t)(h / rep) * D, *vh = v + (size_t)(h / rep) * D;
            float *sc = scores + ((size_t)t * nh + h) * L;
            for (int j = 0; j < valid; j++) {
                const float *kj = kh + (size_t)j * ks;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (int i = 0; i < D; i++) d += qh[i] * kj[i];
                sc[j] = d * scale;
            }
            softmax_causal(sc, valid, valid);
            float *o = out + (size_t)t * qs + (size_t)h * D;
            for (int i = 0; i < D; i++) o[i] = 0.f;
            for (int j = 0; j < valid; j++) {
                const float *vj = vh + (size_t)j * ks;
                float p = sc[j];
                for (int i = 0; i < D; i++) o[i] += p * vj[i];
            }
        }
    twn_free(scores);
}
