/* kernel_tests.c — host wrappers that run one kernel on host data, for tests/unit/test_cuda.c.
 *
 * Each wrapper uploads its inputs (rounding to bf16 where the engine's kernel reads bf16),
 * launches exactly the launcher the forward step uses, and reads the result back as float, so
 * the test can hold it against the CPU op of engine/cpu/ on the same inputs.  They share one
 * lazily created stream and cuBLAS handle on device 0. */
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/cuda_internal.h"

static struct {
    bool ready;
    cudaStream_t s;
    cublasHandle_t h;
    void *ws;
} tc;

typedef struct {
    void *p[48];
    int n;
} kit;

static int ready(twn_err *err) {
    (void)cudaGetLastError(); /* an error left by an earlier test must not be blamed on this one */
    if (tc.ready) return twn_cu_check(cudaSetDevice(0), err, "cudaSetDevice(0)");
    if (twn_cu_check(cudaSetDevice(0), err, "cudaSetDevice(0)") ||
        twn_cu_check(cudaStreamCreate(&tc.s), err, "cudaStreamCreate") ||
        twn_cu_blas_check(cublasCreate(&tc.h), err, "cublasCreate") ||
        twn_cu_blas_check(cublasSetStream(tc.h, tc.s), err, "cublasSetStream"))
        return -1;
    tc.ready = true;
    return 0;
}

static void *kalloc(kit *k, size_t bytes, twn_err *err) {
    void *p = NULL;
    if (k->n == (int)(sizeof k->p / sizeof *k->p)) {
        twn_cu_err(err, "kernel test: too many buffers");
        return NULL;
    }
    if (twn_cu_check(cudaMalloc(&p, bytes ? bytes : 1), err, "cudaMalloc")) return NULL;
    k->p[k->n++] = p;
    return p;
}

static void kfree(kit *k) {
    cudaStreamSynchronize(tc.s);
    for (int i = 0; i < k->n; i++) cudaFree(k->p[i]);
    k->n = 0;
}

static void *put(kit *k, const void *src, size_t bytes, twn_err *err) {
    void *d = kalloc(k, bytes, err);
    if (d && src && twn_cu_check(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice), err, "upload"))
        return NULL;
    return d;
}

static twn_bf16 *put_bf16(kit *k, const float *src, size_t n, twn_err *err) {
    twn_bf16 *h = malloc(sizeof(twn_bf16) * (n ? n : 1));
    if (!h) {
        twn_cu_err(err, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) h[i] = twn_cu_f2bf(src[i]);
    twn_bf16 *d = put(k, h, sizeof(twn_bf16) * n, err);
    free(h);
    return d;
}

/* A launch with a bad configuration fails at once and only cudaGetLastError reports it (the
 * stream stays healthy), so every read-back checks it before waiting for the stream. */
static int finish(twn_err *err) {
    if (twn_cu_check(cudaGetLastError(), err, "kernel launch")) return -1;
    return twn_cu_check(cudaStreamSynchronize(tc.s), err, "kernel");
}

static int get_f32(float *dst, const float *src, size_t n, twn_err *err) {
    if (finish(err)) return -1;
    return twn_cu_check(cudaMemcpy(dst, src, sizeof(float) * n, cudaMemcpyDeviceToHost), err,
                        "download");
}

static int get_bf16(float *dst, const twn_bf16 *src, size_t n, twn_err *err) {
    if (finish(err)) return -1;
    twn_bf16 *h = malloc(sizeof(twn_bf16) * (n ? n : 1));
    if (!h) return twn_cu_err(err, "out of memory");
    int rc = twn_cu_check(cudaMemcpy(h, src, sizeof(twn_bf16) * n, cudaMemcpyDeviceToHost), err,
                          "download");
    for (size_t i = 0; !rc && i < n; i++) dst[i] = twn_cu_bf2f(h[i]);
    free(h);
    return rc;
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        if (!(x)) goto fail;                                                                       \
    } while (0)

static int k_linear(const float *X, int M, int K, const float *W, int N, float *Y, twn_err *err) {
    kit k = {0};
    twn_bf16 *x, *w;
    float *y;
    if (ready(err)) return -1;
    TRY(x = put_bf16(&k, X, (size_t)M * K, err));
    TRY(w = put_bf16(&k, W, (size_t)N * K, err));
    TRY(y = kalloc(&k, sizeof(float) * (size_t)M * N, err));
    if (twn_cu_gemm(tc.h, x, M, K, K, w, N, y, N, 0.f, err) || get_f32(Y, y, (size_t)M * N, err))
        goto fail;
    kfree(&k);
    return 0;
fail:
    kfree(&k);
    return -1;
}

static int k_rmsnorm(const float *x, const float *w, int rows, int dim, float eps, bool out_bf16,
                     float *out, twn_err *err) {
    kit k = {0};
    float *dx, *dw;
    void *o;
    if (ready(err)) return -1;
    TRY(dx = put(&k, x, sizeof(float) * (size_t)rows * dim, err));
    TRY(dw = put(&k, w, sizeof(float) * (size_t)dim, err));
    TRY(o = kalloc(&k, sizeof(float) * (size_t)rows * dim, err));
    if (out_bf16) {
        twn_cu_rmsnorm_bf16(tc.s, o, dim, dx, dim, dw, rows, dim, eps);
        if (get_bf16(out, o, (size_t)rows * dim, err)) goto fail;
    } else {
        twn_cu_rmsnorm_f32(tc.s, o, dim, dx, dim, dw, rows, dim, eps);
        if (get_f32(out, o, (size_t)rows * dim, err)) goto fail;
    }
    kfree(&k);
    return 0;
fail:
    kfree(&k);
    return -1;
}

static int k_qk_norm_rope(const float *qkv, int T, int nh, int nkv, int D, const float *q_w,
                          const float *k_w, float eps, const int32_t *pos, const float *inv_freq,
                          const uint8_t *stream, float *q, float *kout, float *vout, twn_err *err) {
    kit k = {0};
    const int ld = (nh + 2 * nkv) * D, kd = nkv * D;
    float *d_qkv, *dqw, *dkw, *dif;
    int32_t *dpos, *dslot;
    uint8_t *dst;
    twn_bf16 *kc, *vc;
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)(T ? T : 1));
    if (!slot) return twn_cu_err(err, "out of memory");
    for (int r = 0; r < T; r++) slot[r] = T - 1 - r; /* cache rows in reverse: slots matter */
    if (ready(err)) goto fail;
    TRY(d_qkv = put(&k, qkv, sizeof(float) * (size_t)T * ld, err));
    TRY(dqw = put(&k, q_w, sizeof(float) * (size_t)D, err));
    TRY(dkw = put(&k, k_w, sizeof(float) * (size_t)D, err));
    TRY(dif = put(&k, inv_freq, sizeof(float) * (size_t)D / 2, err));
    TRY(dst = put(&k, stream, (size_t)D / 2, err));
    TRY(dpos = put(&k, pos, sizeof(int32_t) * 3 * (size_t)T, err));
    TRY(dslot = put(&k, slot, sizeof(int32_t) * (size_t)T, err));
    TRY(kc = kalloc(&k, sizeof(twn_bf16) * (size_t)T * kd, err));
    TRY(vc = kalloc(&k, sizeof(twn_bf16) * (size_t)T * kd, err));
    twn_cu_qk_norm_rope(tc.s, d_qkv, ld, T, nh, nkv, D, dqw, dkw, eps, dpos, T, dif, dst, dslot, kc,
                        vc);
    float *all = malloc(sizeof(float) * (size_t)T * ld + sizeof(float) * 2 * (size_t)T * kd + 1);
    if (!all) {
        twn_cu_err(err, "out of memory");
        goto fail;
    }
    float *kk = all + (size_t)T * ld, *vv = kk + (size_t)T * kd;
    int rc = get_f32(all, d_qkv, (size_t)T * ld, err) || get_bf16(kk, kc, (size_t)T * kd, err) ||
             get_bf16(vv, vc, (size_t)T * kd, err);
    for (int r = 0; !rc && r < T; r++) {
        memcpy(q + (size_t)r * nh * D, all + (size_t)r * ld, sizeof(float) * (size_t)nh * D);
        memcpy(kout + (size_t)r * kd, kk + (size_t)slot[r] * kd, sizeof(float) * (size_t)kd);
        memcpy(vout + (size_t)r * kd, vv + (size_t)slot[r] * kd, sizeof(float) * (size_t)kd);
    }
    free(all);
    if (rc) goto fail;
    free(slot);
    kfree(&k);
    return 0;
fail:
    free(slot);
    kfree(&k);
    return -1;
}

static int k_silu_mul(const float *g, const float *u, int64_t n, float *out, twn_err *err) {
    kit k = {0};
    float *gu = malloc(sizeof(float) * 2 * (size_t)(n ? n : 1)), *d;
    twn_bf16 *o;
    if (!gu) return twn_cu_err(err, "out of memory");
    memcpy(gu, g, sizeof(float) * (size_t)n); /* one row: [g | u] as the fused GEMM writes it */
    memcpy(gu + n, u, sizeof(float) * (size_t)n);
    if (ready(err)) goto fail;
    TRY(d = put(&k, gu, sizeof(float) * 2 * (size_t)n, err));
    TRY(o = kalloc(&k, sizeof(twn_bf16) * (size_t)n, err));
    twn_cu_silu_mul(tc.s, o, (int)n, d, (int)(2 * n), 1, (int)n);
    if (get_bf16(out, o, (size_t)n, err)) goto fail;
    free(gu);
    kfree(&k);
    return 0;
fail:
    free(gu);
    kfree(&k);
    return -1;
}

static int k_lora(const float *X, int T, int K, int N, const int32_t *adapter, int n_adapters,
                  const float *const *A, const float *const *B, const int *rank, const float *scale,
                  float *Y, twn_err *err) {
    kit k = {0};
    twn_cu_lora_set set;
    memset(&set, 0, sizeof set);
    int rmax = 1;
    twn_bf16 *x;
    float *y, *tmp;
    int32_t *ad;
    if (n_adapters > TWN_MAX_ADAPTERS)
        return twn_cu_err(err, "%d adapters; at most %d", n_adapters, TWN_MAX_ADAPTERS);
    if (ready(err)) return -1;
    for (int a = 0; a < n_adapters; a++) {
        if (!A[a]) continue;
        TRY(set.A[a] = put(&k, A[a], sizeof(float) * (size_t)rank[a] * K, err));
        TRY(set.B[a] = put(&k, B[a], sizeof(float) * (size_t)N * rank[a], err));
        set.rank[a] = rank[a];
        set.scale[a] = scale[a];
        rmax = rank[a] > rmax ? rank[a] : rmax;
    }
    TRY(x = put_bf16(&k, X, (size_t)T * K, err));
    TRY(y = put(&k, Y, sizeof(float) * (size_t)T * N, err));
    TRY(ad = put(&k, adapter, sizeof(int32_t) * (size_t)T, err));
    TRY(tmp = kalloc(&k, sizeof(float) * (size_t)T * rmax, err));
    twn_cu_lora(tc.s, x, K, T, K, y, N, N, ad, set, tmp, rmax);
    if (get_f32(Y, y, (size_t)T * N, err)) goto fail;
    kfree(&k);
    return 0;
fail:
    kfree(&k);
    return -1;
}

static int k_attention(int n_seqs, const int *n, const int *past, const float *q,
                       const float *const *kin, const float *const *vin, int nh, int nkv, int D,
                       float scale, int page_rows, uint64_t seed, float *out, twn_err *err) {
    kit k = {0};
    const int kd = nkv * D, qd = nh * D, tr = twn_cu_attention_tile_rows(nh, nkv);
    int T = 0, pages = 0, tiles = 0;
    for (int s = 0; s < n_seqs; s++) {
        T += n[s];
        pages += (past[s] + n[s] + page_rows - 1) / page_rows;
        tiles += (n[s] + tr - 1) / tr;
    }
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)(pages + 1));
    twn_cu_tile *tl = malloc(sizeof(twn_cu_tile) * (size_t)(tiles + 1));
    twn_bf16 *hk = calloc((size_t)pages * page_rows * kd + 1, sizeof(twn_bf16));
    twn_bf16 *hv = calloc((size_t)pages * page_rows * kd + 1, sizeof(twn_bf16));
    float *dq;
    twn_bf16 *kc, *vc, *o;
    twn_cu_tile *dt;
    int32_t *dbt;
    if (!perm || !tl || !hk || !hv) {
        twn_cu_err(err, "out of memory");
        goto fail;
    }
    /* pages in a shuffled order (Fisher-Yates with an LCG), so block tables are not identity */
    for (int i = 0; i < pages; i++) perm[i] = i;
    uint64_t st = seed * 6364136223846793005ull + 1442695040888963407ull;
    for (int i = pages - 1; i > 0; i--) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        int j = (int)((st >> 33) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int s = 0, bt = 0, row0 = 0, nt = 0; s < n_seqs; s++) {
        int len = past[s] + n[s];
        for (int p = 0; p < len; p++) {
            size_t dst = ((size_t)perm[bt + p / page_rows] * page_rows + p % page_rows) * kd;
            for (int i = 0; i < kd; i++) {
                hk[dst + i] = twn_cu_f2bf(kin[s][(size_t)p * kd + i]);
                hv[dst + i] = twn_cu_f2bf(vin[s][(size_t)p * kd + i]);
            }
        }
        for (int i = 0; i < n[s]; i += tr)
            tl[nt++] = (twn_cu_tile){row0 + i, n[s] - i < tr ? n[s] - i : tr, past[s] + i, bt};
        bt += (len + page_rows - 1) / page_rows;
        row0 += n[s];
    }
    if (ready(err) || twn_cu_check((cudaError_t)twn_cu_attention_prepare(D), err, "attention"))
        goto fail;
    TRY(dq = put(&k, q, sizeof(float) * (size_t)T * qd, err));
    TRY(kc = put(&k, hk, sizeof(twn_bf16) * (size_t)pages * page_rows * kd, err));
    TRY(vc = put(&k, hv, sizeof(twn_bf16) * (size_t)pages * page_rows * kd, err));
    TRY(dt = put(&k, tl, sizeof(twn_cu_tile) * (size_t)tiles, err));
    TRY(dbt = put(&k, perm, sizeof(int32_t) * (size_t)pages, err));
    TRY(o = kalloc(&k, sizeof(twn_bf16) * (size_t)T * qd, err));
    twn_cu_attention(tc.s, dq, qd, o, qd, dt, tiles, dbt, kc, vc, page_rows, nh, nkv, D, scale);
    if (twn_cu_check(cudaGetLastError(), err, "attention launch") ||
        get_bf16(out, o, (size_t)T * qd, err))
        goto fail;
    free(perm), free(tl), free(hk), free(hv);
    kfree(&k);
    return 0;
fail:
    free(perm), free(tl), free(hk), free(hv);
    kfree(&k);
    return -1;
}

static int k_argmax(const float *x, int rows, int V, int32_t *out, twn_err *err) {
    kit k = {0};
    float *dx;
    int32_t *o;
    if (ready(err)) return -1;
    TRY(dx = put(&k, x, sizeof(float) * (size_t)rows * V, err));
    TRY(o = kalloc(&k, sizeof(int32_t) * (size_t)rows, err));
    twn_cu_argmax(tc.s, dx, rows, V, o);
    if (finish(err) ||
        twn_cu_check(cudaMemcpy(out, o, sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost),
                     err, "download"))
        goto fail;
    kfree(&k);
    return 0;
fail:
    kfree(&k);
    return -1;
}

static int k_pool(const float *h, int rows, int H, int r0, int n, bool normalize, float *out,
                  twn_err *err) {
    kit k = {0};
    float *dh, *o;
    int32_t *dr, *dc;
    if (ready(err)) return -1;
    TRY(dh = put(&k, h, sizeof(float) * (size_t)rows * H, err));
    TRY(dr = put(&k, &r0, sizeof(int32_t), err));
    TRY(dc = put(&k, &n, sizeof(int32_t), err));
    TRY(o = kalloc(&k, sizeof(float) * (size_t)H, err));
    twn_cu_pool(tc.s, dh, H, dr, dc, 1, normalize, o);
    if (get_f32(out, o, (size_t)H, err)) goto fail;
    kfree(&k);
    return 0;
fail:
    kfree(&k);
    return -1;
}

const twn_cuda_kernels twn_cu_kernel_tests = {
    .linear = k_linear,
    .rmsnorm = k_rmsnorm,
    .qk_norm_rope = k_qk_norm_rope,
    .silu_mul = k_silu_mul,
    .lora = k_lora,
    .attention = k_attention,
    .argmax = k_argmax,
    .pool = k_pool,
};
