/* attention_full.c — bidirectional multi-head attention over one segment (the vision tower).
 *
 * Mirrors Qwen3VLVisionAttention for one cu_seqlens segment (one image frame): every token sees
 * every token of its segment, scores = q·k^T * scale, softmax in fp32 with the max subtracted,
 * then · v.  Block-diagonal attention across images is the caller running one segment at a time,
 * so nothing here can leak between images.  Per head: two sgemms (scores [n, n], then P·V) and
 * a vectorized softmax between them; q, k, v are read in place from the fused qkv rows through
 * their leading dimensions. */
#include <cblas.h>
#include <math.h>

#include "engine/cpu/ops.h"
#include "engine/cpu/vexp.h"
#include "util/mem.h"

/* Score buffer bound, in floats (64 MB). */
#define ATT_MAX_SCORES (16 << 20)

static void softmax_row(float *row, int n) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        row[j] = twn_vexpf(row[j] - mx);
        sum += row[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int j = 0; j < n; j++) row[j] *= inv;
}

int twn_cpu_attention_full(const float *q, int ldq, const float *k, int ldk, const float *v,
                           int ldv, float *out, int ldo, int n, int nh, int D, float scale) {
    if (n <= 0) return 0;
    /* Query rows go in blocks so the score buffer stays within ATT_MAX_SCORES floats however
     * large the image (a 4096 x 4096 image is 65536 patches: one [n, n] matrix would be 17 GB).
     * Each row's scores are complete within its block, so blocking changes nothing. */
    const int64_t rows = (int64_t)ATT_MAX_SCORES / n;
    const int blk = rows < 1 ? 1 : rows > n ? n : (int)rows;
    float *S = twn_try_alloc((size_t)blk * (size_t)n * sizeof(float));
    if (!S) return -1;
    for (int h = 0; h < nh; h++) {
        const size_t off = (size_t)h * D;
        for (int r0 = 0; r0 < n; r0 += blk) {
            const int m = n - r0 < blk ? n - r0 : blk;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, D, scale,
                        q + (size_t)r0 * ldq + off, ldq, k + off, ldk, 0.f, S, n);
#pragma omp parallel for schedule(static) if (m >= 64)
            for (int t = 0; t < m; t++) softmax_row(S + (size_t)t * n, n);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, D, n, 1.f, S, n, v + off, ldv,
                        0.f, out + (size_t)r0 * ldo + off, ldo);
        }
    }
    twn_free(S);
    return 0;
}
