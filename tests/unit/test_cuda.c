/* test_cuda.c — the CUDA backend against the CPU reference, on a GPU (ctest label "gpu").
 *
 * Where no CUDA backend can run (module not built, no driver, no device) it prints the reason
 * and exits 77, which ctest reports as skipped (SKIP_RETURN_CODE).
 *
 * Kernels: each kernel of engine/cuda/ against its CPU op (engine/cpu/ops.h) on random inputs,
 * through the module's test entry points (twn_cuda_kernels): GEMM, RMSNorm, q/k norm + M-RoPE +
 * KV write, SwiGLU, segmented LoRA over two adapters, paged attention (prefill, decode and
 * chunked rows of several sequences over shuffled pages, three GQA shapes), argmax, pooling.
 * Model: ragged mixed-adapter steps (prefill with query vectors and pooling, M-RoPE positions
 * with DeepStack, decode steps, a sequence joining mid-way) on random in-memory models and on the
 * tiny checkpoint, CUDA vs the CPU fp32 engine; CUDA graphs vs eager; KV pool accounting.
 * Scheduler: twn_embed_items (engine/twn.c) on the tiny checkpoint with the model's backend
 * switched to cuda — text and image items in mode never against the cpu backend's embeddings
 * (whole-model tolerance), mode always end to end, and a KV pool so small that sequences wait
 * for pages (same embeddings) while an item that can never fit fails alone with the pool's
 * message.
 *
 * Tolerance ("bf16 level"): max |gpu - cpu| / max |cpu| over each output, any NaN or Inf fails.
 * Kernels: <= 1e-2 (one bf16 rounding of an input or output, 2^-9 relative, against fp32).
 * Whole model: <= 3e-2.  The device rounds to bf16 everything the engine feeds a GEMM (normed
 * rows, attention and SwiGLU outputs, the logits rows) and the KV cache; the same roundings
 * emulated inside the CPU engine (lm.c with round-to-bf16 at those five points) already move the
 * outputs of these very scenarios by up to 0.8e-2 (random models) and 1.2e-2 (tiny checkpoint,
 * decode logits after 6 steps), before any difference in accumulation order or exp/sincos.
 * The weights are bf16 values on both sides, so nothing else differs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/cpu/ops.h"
#include "engine/cuda/cuda_abi.h"
#include "engine/twn.h"
#include "tests/testutil.h"
#include "tests/unit/random_lm.h"
#include "util/mem.h"

/* CUDA and AddressSanitizer do not mix (the driver's address-space reservations collide with
 * ASan's shadow memory, and LSan reports the driver's allocations), so under ASan no CUDA context
 * is created: the GPU checks run in the release build. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

#define SKIP_CODE 77
#define TOL       1e-2 /* one kernel */
#define MODEL_TOL 3e-2 /* the whole decoder, see above */

static const twn_cuda_module *M;

/* max |a - ref| / max |ref|; infinite when either holds a NaN or Inf. */
static double rel_err(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        double d = fabs((double)a[i] - ref[i]);
        num = d > num ? d : num;
        den = fabs(ref[i]) > den ? fabs(ref[i]) : den;
    }
    return den > 0 ? num / den : num;
}

static void check_tol(const char *what, const float *a, const float *ref, size_t n, double tol) {
    double r = rel_err(a, ref, n);
    printf("  %-52s rel %.3g\n", what, r);
    if (!(r <= tol)) fail_msg("%s: relative error %.3g > %.0e", what, r, tol);
}

static void check(const char *what, const float *a, const float *ref, size_t n) {
    check_tol(what, a, ref, n, TOL);
}

static float *rnd(size_t n, uint64_t seed, float std, float mean) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    float *p = twn_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = mean + std * (float)twn_rng_normal(&g);
    return p;
}

static float *bf(const float *x, size_t n) {
    float *p = twn_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = rl_bf16(x[i]);
    return p;
}

#define OK(call)                                                                                   \
    do {                                                                                           \
        twn_err e_;                                                                                \
        e_.msg[0] = 0;                                                                             \
        if ((call) != 0) fail_msg("%s: %s", #call, e_.msg);                                        \
    } while (0)
#define E (&e_)

/* ------------------------------------------------------------------------------------------ */
/* Kernels */

static void test_linear(void **st) {
    (void)st;
    const int shapes[][3] = {{37, 160, 96}, {1, 1024, 300}, {130, 64, 1000}};
    for (size_t c = 0; c < 3; c++) {
        int Mr = shapes[c][0], K = shapes[c][1], N = shapes[c][2];
        float *X = rnd((size_t)Mr * K, 1 + c, 1, 0), *W = rnd((size_t)N * K, 2 + c, 0.1f, 0);
        float *Xb = bf(X, (size_t)Mr * K), *Wb = bf(W, (size_t)N * K);
        float *Y = twn_malloc(sizeof(float) * (size_t)Mr * N),
              *R = twn_malloc(sizeof(float) * (size_t)Mr * N);
        twn_cpu_linear(Xb, Mr, K, K, Wb, N, R, N, 1.f, 0.f);
        OK(M->kernels->linear(X, Mr, K, W, N, Y, E));
        char what[64];
        snprintf(what, sizeof what, "linear M=%d K=%d N=%d", Mr, K, N);
        check(what, Y, R, (size_t)Mr * N);
        twn_free(X), twn_free(W), twn_free(Xb), twn_free(Wb), twn_free(Y), twn_free(R);
    }
}

static void test_rmsnorm(void **st) {
    (void)st;
    const int shapes[][2] = {{7, 1000}, {3, 64}, {33, 2560}};
    for (size_t c = 0; c < 3; c++) {
        int rows = shapes[c][0], dim = shapes[c][1];
        float *x = rnd((size_t)rows * dim, 10 + c, 3, 0.5f), *w = rnd((size_t)dim, 20 + c, 0.1f, 1);
        float *ref = twn_malloc(sizeof(float) * (size_t)rows * dim);
        float *out = twn_malloc(sizeof(float) * (size_t)rows * dim);
        twn_cpu_rmsnorm(ref, x, w, rows, dim, dim, 1e-6f);
        char what[64];
        for (int b16 = 0; b16 < 2; b16++) {
            OK(M->kernels->rmsnorm(x, w, rows, dim, 1e-6f, b16, out, E));
            snprintf(what, sizeof what, "rmsnorm %dx%d -> %s", rows, dim, b16 ? "bf16" : "fp32");
            check(what, out, ref, (size_t)rows * dim);
        }
        twn_free(x), twn_free(w), twn_free(ref), twn_free(out);
    }
}

static void test_qk_norm_rope(void **st) {
    (void)st;
    const int shapes[][3] = {{6, 2, 16}, {4, 2, 32}, {32, 8, 128}}; /* nh, nkv, D */
    const int T = 9;
    for (size_t c = 0; c < 3; c++) {
        int nh = shapes[c][0], nkv = shapes[c][1], D = shapes[c][2], half = D / 2;
        int qd = nh * D, kd = nkv * D, ld = qd + 2 * kd;
        float *qkv = rnd((size_t)T * ld, 30 + c, 2, 0), *qw = rnd((size_t)D, 31, 0.1f, 1);
        float *kw = rnd((size_t)D, 32, 0.1f, 1);
        float *inv = twn_malloc(sizeof(float) * (size_t)half),
              *cs = twn_malloc(sizeof(float) * (size_t)T * half);
        float *sn = twn_malloc(sizeof(float) * (size_t)T * half);
        uint8_t *stream = twn_malloc((size_t)half);
        int32_t *pos = twn_malloc(sizeof(int32_t) * 3 * T);
        for (int j = 0; j < half; j++) {
            inv[j] = 1.0f / powf(5e6f, (float)(2 * j) / (float)D);
            stream[j] = (j % 3 == 1 && j < 3 * (D / 8))   ? 1
                        : (j % 3 == 2 && j < 3 * (D / 8)) ? 2
                                                          : 0;
        }
        for (int r = 0; r < T; r++) { /* large T positions: the phase must survive */
            pos[r] = 100000 + 37 * r;
            pos[T + r] = 5 + r / 3;
            pos[2 * T + r] = 5 + r % 3;
        }
        for (int r = 0; r < T; r++)
            for (int j = 0; j < half; j++) {
                float ang = (float)pos[stream[j] * T + r] * inv[j];
                cs[r * half + j] = cosf(ang);
                sn[r * half + j] = sinf(ang);
            }
        float *rq = twn_malloc(sizeof(float) * (size_t)T * qd),
              *rk = twn_malloc(sizeof(float) * (size_t)T * kd);
        float *rv = twn_malloc(sizeof(float) * (size_t)T * kd);
        for (int r = 0; r < T; r++) {
            memcpy(rq + (size_t)r * qd, qkv + (size_t)r * ld, sizeof(float) * (size_t)qd);
            memcpy(rk + (size_t)r * kd, qkv + (size_t)r * ld + qd, sizeof(float) * (size_t)kd);
            for (int i = 0; i < kd; i++)
                rv[(size_t)r * kd + i] = rl_bf16(qkv[(size_t)r * ld + qd + kd + i]);
        }
        twn_cpu_rmsnorm(rq, rq, qw, T * nh, D, D, 1e-6f);
        twn_cpu_rmsnorm(rk, rk, kw, T * nkv, D, D, 1e-6f);
        twn_cpu_rope(rq, T, nh, D, qd, cs, sn);
        twn_cpu_rope(rk, T, nkv, D, kd, cs, sn);
        float *q = twn_malloc(sizeof(float) * (size_t)T * qd),
              *k = twn_malloc(sizeof(float) * (size_t)T * kd);
        float *v = twn_malloc(sizeof(float) * (size_t)T * kd);
        OK(M->kernels->qk_norm_rope(qkv, T, nh, nkv, D, qw, kw, 1e-6f, pos, inv, stream, q, k, v,
                                    E));
        char what[80];
        snprintf(what, sizeof what, "q norm+rope nh=%d D=%d", nh, D);
        check(what, q, rq, (size_t)T * qd);
        snprintf(what, sizeof what, "k norm+rope -> bf16 cache nkv=%d D=%d", nkv, D);
        check(what, k, rk, (size_t)T * kd);
        assert_memory_equal(v, rv, sizeof(float) * (size_t)T * kd); /* v: bf16 copy, exact */
        twn_free(qkv), twn_free(qw), twn_free(kw), twn_free(inv), twn_free(cs), twn_free(sn);
        twn_free(stream), twn_free(pos), twn_free(rq), twn_free(rk), twn_free(rv);
        twn_free(q), twn_free(k), twn_free(v);
    }
}

static void test_silu_mul(void **st) {
    (void)st;
    const int64_t n = 4099;
    float *g = rnd((size_t)n, 40, 3, 0), *u = rnd((size_t)n, 41, 1, 0);
    float *ref = twn_malloc(sizeof(float) * n), *out = twn_malloc(sizeof(float) * n);
    memcpy(ref, g, sizeof(float) * n);
    twn_cpu_silu_mul(ref, u, n);
    OK(M->kernels->silu_mul(g, u, n, out, E));
    check("silu(g) * u -> bf16", out, ref, (size_t)n);
    twn_free(g), twn_free(u), twn_free(ref), twn_free(out);
}

static void test_lora_segmented(void **st) {
    (void)st;
    const int T = 11, K = 64, N = 48;
    const int32_t ad[11] = {0, 0, 1, -1, 1, 0, 1, 1, -1, 0, 1};
    const int rank[2] = {4, 8};
    const float scale[2] = {2.0f, 0.25f};
    float *A[2], *B[2];
    for (int a = 0; a < 2; a++) {
        A[a] = rnd((size_t)rank[a] * K, 50 + a, 0.2f, 0);
        B[a] = rnd((size_t)N * rank[a], 52 + a, 0.5f, 0);
    }
    float *X = rnd((size_t)T * K, 54, 1, 0), *Xb = bf(X, (size_t)T * K);
    float *Y = rnd((size_t)T * N, 55, 1, 0), *R = twn_malloc(sizeof(float) * T * N);
    memcpy(R, Y, sizeof(float) * T * N);
    float tmp[8];
    for (int r = 0; r < T; r++) {
        int a = ad[r];
        if (a < 0) continue;
        twn_cpu_linear(Xb + (size_t)r * K, 1, K, K, A[a], rank[a], tmp, rank[a], 1.f, 0.f);
        twn_cpu_linear(tmp, 1, rank[a], rank[a], B[a], N, R + (size_t)r * N, N, scale[a], 1.f);
    }
    const float *cA[2] = {A[0], A[1]}, *cB[2] = {B[0], B[1]};
    OK(M->kernels->lora(X, T, K, N, ad, 2, cA, cB, rank, scale, Y, E));
    check("segmented LoRA, 2 adapters + plain rows", Y, R, (size_t)T * N);
    for (int r = 0; r < T; r++) /* plain rows are untouched */
        if (ad[r] < 0) {
            float *y0 = rnd((size_t)T * N, 55, 1, 0);
            assert_memory_equal(Y + (size_t)r * N, y0 + (size_t)r * N, sizeof(float) * N);
            twn_free(y0);
        }
    for (int a = 0; a < 2; a++) twn_free(A[a]), twn_free(B[a]);
    twn_free(X), twn_free(Xb), twn_free(Y), twn_free(R);
}

static void attention_case(int nh, int nkv, int D, int ns, const int *n, const int *past,
                           int page_rows) {
    int T = 0, qd = nh * D, kd = nkv * D;
    for (int s = 0; s < ns; s++) T += n[s];
    float *q = rnd((size_t)T * qd, 60, 1, 0), *out = twn_malloc(sizeof(float) * (size_t)T * qd);
    float *ref = twn_malloc(sizeof(float) * (size_t)T * qd);
    float *k[4], *v[4];
    for (int s = 0, r = 0; s < ns; s++) {
        size_t len = (size_t)(past[s] + n[s]);
        k[s] = rnd(len * kd, 61 + s, 1, 0);
        v[s] = rnd(len * kd, 71 + s, 1, 0);
        float *kb = bf(k[s], len * kd), *vb = bf(v[s], len * kd);
        twn_cpu_attention(q + (size_t)r * qd, kb, vb, ref + (size_t)r * qd, n[s], (int)len, nh, nkv,
                          D, 1.0f / sqrtf((float)D));
        r += n[s];
        twn_free(kb), twn_free(vb);
    }
    const float *ck[4] = {k[0], ns > 1 ? k[1] : NULL, ns > 2 ? k[2] : NULL, NULL};
    const float *cv[4] = {v[0], ns > 1 ? v[1] : NULL, ns > 2 ? v[2] : NULL, NULL};
    OK(M->kernels->attention(ns, n, past, q, ck, cv, nh, nkv, D, 1.0f / sqrtf((float)D), page_rows,
                             99, out, E));
    char what[96];
    snprintf(what, sizeof what, "paged attention nh=%d nkv=%d D=%d, %d seqs", nh, nkv, D, ns);
    check(what, out, ref, (size_t)T * qd);
    for (int s = 0; s < ns; s++) twn_free(k[s]), twn_free(v[s]);
    twn_free(q), twn_free(out), twn_free(ref);
}

static void test_attention(void **st) {
    (void)st;
    const int n1[3] = {37, 1, 5}, p1[3] = {0, 50, 13};
    attention_case(8, 2, 64, 3, n1, p1, 16);
    const int n2[3] = {200, 1, 1}, p2[3] = {0, 300, 0}; /* Qwen3-VL-4B heads */
    attention_case(32, 8, 128, 3, n2, p2, 16);
    const int n3[1] = {11}, p3[1] = {3}; /* GQA 3, tiny pages */
    attention_case(6, 2, 16, 1, n3, p3, 4);
    const int n4[2] = {1, 1}, p4[2] = {1000, 7}; /* decode over many key tiles */
    attention_case(16, 8, 128, 2, n4, p4, 16);
}

static void test_argmax(void **st) {
    (void)st;
    const int V = 151936;
    float *x = rnd((size_t)3 * V, 80, 2, 0);
    x[V + 5] = 50.f, x[V + 1000] = 50.f;      /* tie: the lower index wins */
    x[2 * V + 0] = NAN, x[2 * V + 77] = 60.f; /* NaN never wins */
    int want0 = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[want0]) want0 = i;
    int32_t out[3];
    OK(M->kernels->argmax(x, 3, V, out, E));
    printf("  argmax: %d %d %d\n", out[0], out[1], out[2]);
    assert_int_equal(out[0], want0);
    assert_int_equal(out[1], 5);
    assert_int_equal(out[2], 77);
    twn_free(x);
}

static void test_pool(void **st) {
    (void)st;
    const int H = 64;
    float *h = rnd((size_t)10 * H, 90, 1, 0.3f), ref[64], out[64];
    memset(ref, 0, sizeof ref);
    for (int r = 4; r < 10; r++)
        for (int i = 0; i < H; i++) ref[i] += h[r * H + i];
    for (int i = 0; i < H; i++) ref[i] /= 6.0f;
    OK(M->kernels->pool(h, 10, H, 4, 6, false, out, E));
    assert_memory_equal(out, ref, sizeof ref); /* same fp32 sums in the same order */
    twn_cpu_l2_normalize(ref, H, 1e-12f);
    OK(M->kernels->pool(h, 10, H, 4, 6, true, out, E));
    check("pool mean + L2 normalize", out, ref, (size_t)H);
    twn_free(h);
}

/* ------------------------------------------------------------------------------------------ */
/* Whole model: CUDA (eager and graphs) against the CPU engine */

enum { N_BACK = 3 }; /* cpu, cuda eager, cuda graphs */

typedef struct {
    twn_backend *b[N_BACK];
    twn_bkv *kv[N_BACK][4];
} rig;

static void rig_open(rig *g, const twn_lm *lm) {
    twn_backend_opts o;
    memset(g, 0, sizeof *g);
    for (int i = 0; i < N_BACK; i++) {
        twn_backend_opts_default(&o);
        o.kind = i == 0 ? TWN_BACKEND_CPU : TWN_BACKEND_CUDA;
        o.cuda_graphs = i == 2;
        o.kv_budget_bytes = 64u << 20;
        OK(twn_backend_open(lm, &o, &g->b[i], E));
        for (int s = 0; s < 4; s++) OK(twn_backend_kv_open(g->b[i], 8, &g->kv[i][s], E));
    }
    printf("  %s\n", twn_backend_describe(g->b[1]));
}

static void rig_close(rig *g) {
    for (int i = 0; i < N_BACK; i++) {
        for (int s = 0; s < 4; s++) twn_backend_kv_close(g->b[i], g->kv[i][s]);
        twn_backend_close(g->b[i]);
    }
}

/* Outputs of one sequence in one step, per backend. */
typedef struct {
    float *hidden[N_BACK], *logits[N_BACK], *pooled[N_BACK];
    int32_t argmax[N_BACK];
} outs;

/* Runs the same step (seqs as a template: kv indices in .kv as (twn_bkv *)(intptr_t)s) on
 * every backend and compares each output with the cpu's. */
static void run_compare(rig *g, const twn_lm *lm, const twn_bseq *tpl, const int *kvi, int ns,
                        const char *label, int32_t *cpu_argmax) {
    const int H = lm->H, V = lm->V;
    outs o[4];
    twn_bseq s[4];
    memset(o, 0, sizeof o);
    for (int i = 0; i < N_BACK; i++) {
        for (int j = 0; j < ns; j++) {
            s[j] = tpl[j];
            s[j].kv = g->kv[i][kvi[j]];
            if (tpl[j].hidden)
                s[j].hidden = o[j].hidden[i] = twn_malloc(sizeof(float) * (size_t)tpl[j].n * H);
            if (tpl[j].logits) s[j].logits = o[j].logits[i] = twn_malloc(sizeof(float) * (size_t)V);
            if (tpl[j].pooled) s[j].pooled = o[j].pooled[i] = twn_malloc(sizeof(float) * (size_t)H);
            if (tpl[j].argmax) s[j].argmax = &o[j].argmax[i];
        }
        OK(twn_backend_forward(g->b[i], s, ns, E));
    }
    for (int j = 0; j < ns; j++)
        for (int i = 1; i < N_BACK; i++) {
            char what[96];
            const char *bn = i == 1 ? "cuda" : "cuda+graphs";
            if (tpl[j].hidden) {
                snprintf(what, sizeof what, "%s seq %d hidden (%s)", label, j, bn);
                check_tol(what, o[j].hidden[i], o[j].hidden[0], (size_t)tpl[j].n * H, MODEL_TOL);
            }
            if (tpl[j].logits) {
                snprintf(what, sizeof what, "%s seq %d logits (%s)", label, j, bn);
                check_tol(what, o[j].logits[i], o[j].logits[0], (size_t)V, MODEL_TOL);
            }
            if (tpl[j].pooled) {
                snprintf(what, sizeof what, "%s seq %d pooled (%s)", label, j, bn);
                check_tol(what, o[j].pooled[i], o[j].pooled[0], (size_t)H, MODEL_TOL);
            }
            if (tpl[j].argmax && o[j].argmax[i] != o[j].argmax[0]) {
                /* a different token is only acceptable between near-equal logits */
                const float *l = o[j].logits[0];
                assert_non_null(l);
                float mx = 0;
                for (int v = 0; v < V; v++) mx = fabsf(l[v]) > mx ? fabsf(l[v]) : mx;
                printf("  %s seq %d: argmax %d vs cpu %d (logits %g vs %g)\n", label, j,
                       o[j].argmax[i], o[j].argmax[0], l[o[j].argmax[i]], l[o[j].argmax[0]]);
                assert_true(fabsf(l[o[j].argmax[i]] - l[o[j].argmax[0]]) <= MODEL_TOL * mx);
            }
        }
    for (int j = 0; j < ns; j++) { /* a replayed graph runs the very same kernels */
        char what[96];
        snprintf(what, sizeof what, "%s seq %d graphs vs eager", label, j);
        if (tpl[j].hidden)
            check_tol(what, o[j].hidden[2], o[j].hidden[1], (size_t)tpl[j].n * H, 1e-5);
        if (tpl[j].logits) check_tol(what, o[j].logits[2], o[j].logits[1], (size_t)V, 1e-5);
        if (tpl[j].argmax) assert_int_equal(o[j].argmax[2], o[j].argmax[1]);
    }
    for (int j = 0; j < ns; j++) {
        if (cpu_argmax && tpl[j].argmax) cpu_argmax[j] = o[j].argmax[0];
        for (int i = 0; i < N_BACK; i++) {
            twn_free(o[j].hidden[i]);
            twn_free(o[j].logits[i]);
            twn_free(o[j].pooled[i]);
        }
    }
}

/* A gate-like prefill with query vectors (adapter ea), a CoT prompt (adapter ra), an image-like
 * prefill with 3-stream positions and DeepStack (no adapter); then CoT decode steps of both,
 * with a fourth sequence joining at step 3. */
static void model_scenario(const twn_lm *lm, const float *queries, int K, int ea, int ra) {
    const int H = lm->H, V = lm->V;
    rig g;
    rig_open(&g, lm);
    int32_t ids_a[24], ids_b[9], ids_c[6], ids_d[20];
    for (int i = 0; i < 24; i++) ids_a[i] = (i * 131 + 7) % V;
    for (int i = 0; i < 9; i++) ids_b[i] = (i * 71 + 3) % V;
    for (int i = 0; i < 6; i++) ids_c[i] = (i * 17 + 1) % V;
    for (int i = 0; i < 20; i++) ids_d[i] = (i * 29 + 5) % V;
    int na = 20 + K;
    float *emb_a = twn_calloc((size_t)na * H, sizeof(float));
    for (int q = 0; q < K; q++) {
        ids_a[20 + q] = TWN_TOKEN_EMBED;
        memcpy(emb_a + (size_t)(20 + q) * H, queries + (size_t)q * H, sizeof(float) * (size_t)H);
    }
    const int32_t pos_c[18] = {0, 1, 1, 1, 1, 3, 0, 1, 1, 2, 2, 3, 0, 1, 2, 1, 2, 3};
    const int32_t ds_rows[2] = {1, 4};
    float *feat = rnd((size_t)2 * 2 * H, 7, 0.5f, 0);
    twn_lm_deepstack ds = {
        .n_layers = lm->L < 2 ? lm->L : 2, .n_rows = 2, .rows = ds_rows, .feat = feat};
    float dummy;
    int32_t am[4];
    twn_bseq step1[3] = {{.n = na,
                          .ids = ids_a,
                          .embeds = emb_a,
                          .adapter = ea,
                          .hidden = &dummy,
                          .pool_rows = K,
                          .pooled = &dummy},
                         {.n = 9, .ids = ids_b, .adapter = ra, .logits = &dummy, .argmax = &am[1]},
                         {.n = 6,
                          .ids = ids_c,
                          .pos = pos_c,
                          .adapter = TWN_NO_ADAPTER,
                          .hidden = &dummy,
                          .deepstack = &ds}};
    const int kv1[3] = {0, 1, 2};
    run_compare(&g, lm, step1, kv1, 3, "prefill", am);
    int32_t tok_a = ids_a[3], tok_b = am[1];
    for (int t = 0; t < 6; t++) {
        twn_bseq st[3] = {
            {.n = 1, .ids = &tok_b, .adapter = ra, .logits = &dummy, .argmax = &am[0]},
            {.n = 1, .ids = &tok_a, .adapter = ea, .logits = &dummy, .argmax = &am[1]},
            {.n = 20, .ids = ids_d, .adapter = ra, .hidden = &dummy, .logits = &dummy}};
        const int kv2[3] = {1, 0, 3};
        char label[32];
        snprintf(label, sizeof label, "decode %d", t);
        run_compare(&g, lm, st, kv2, t == 3 ? 3 : 2, label, am);
        tok_b = am[0], tok_a = am[1];
    }
    for (int i = 0; i < N_BACK; i++) {
        assert_int_equal(twn_backend_kv_len(g.b[i], g.kv[i][0]), na + 6);
        assert_int_equal(twn_backend_kv_len(g.b[i], g.kv[i][1]), 9 + 6);
        assert_int_equal(twn_backend_kv_len(g.b[i], g.kv[i][3]), 20);
    }
    rig_close(&g);
    twn_free(emb_a);
    twn_free(feat);
}

static void test_model_random(void **st) {
    (void)st;
    const rl_dims shapes[] = {{.H = 48,
                               .I = 80,
                               .nh = 6,
                               .nkv = 2,
                               .D = 16,
                               .V = 97,
                               .L = 3,
                               .tied = false,
                               .section = {4, 2, 2}},
                              {.H = 512,
                               .I = 1024,
                               .nh = 8,
                               .nkv = 2,
                               .D = 128,
                               .V = 1000,
                               .L = 2,
                               .tied = true,
                               .section = {24, 20, 20}}};
    for (size_t c = 0; c < 2; c++) {
        const rl_dims *d = &shapes[c];
        printf(" random model H=%d D=%d heads %d/%d\n", d->H, d->D, d->nh, d->nkv);
        twn_lm *lm = rl_make_lm(d, 100 + c);
        twn_adapter *a0 = rl_make_adapter(d, "embedding", 200 + c, 4, true, -1);
        twn_adapter *a1 = rl_make_adapter(d, "reasoning", 300 + c, 8, false, TWN_DOWN);
        int i0, i1;
        OK(twn_lm_attach_adapter(lm, a0, &i0, E));
        OK(twn_lm_attach_adapter(lm, a1, &i1, E));
        float *queries = rnd((size_t)3 * d->H, 400, 1, 0);
        model_scenario(lm, queries, 3, i0, i1);
        twn_free(queries);
        twn_lm_free(lm);
        rl_free_adapter(a0);
        rl_free_adapter(a1);
    }
}

static void test_model_tiny_checkpoint(void **st) {
    (void)st;
    char manifest[1200];
    snprintf(manifest, sizeof manifest, "%s/twn.json", tu_tiny_model());
    twn_model *m;
    OK(twn_model_load(manifest, &m, E));
    printf(" tiny checkpoint %s\n", manifest);
    model_scenario(m->lm, m->queries, m->K, m->emb_idx, m->rsn_idx);
    twn_model_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* The scheduler on the cuda backend */

static const char *sched_texts[] = {
    "A red bicycle leaning against a brick wall.",
    "Quarterly revenue grew 12% while operating costs fell.",
    "量子コンピュータは重ね合わせを利用する。",
    "def add(a, b):\n    return a + b",
    "Explain why the sky is blue at noon and red at sunset.",
};
#define N_SCHED ((int)(sizeof sched_texts / sizeof *sched_texts))

static void sched_items(twn_item *it, const char *const *img) {
    for (int i = 0; i < N_SCHED; i++) it[i] = (twn_item){.id = "t", .text = sched_texts[i]};
    it[N_SCHED] = (twn_item){.id = "img", .text = "a rocket", .images = img, .n_images = 1};
}

static void sched_run(const twn_model *m, const twn_item *it, int n, const char *mode,
                      twn_result *r) {
    twn_opts o;
    twn_opts_default(&o);
    OK(twn_mode_parse(mode, &o, E));
    OK(twn_embed_items(m, it, n, &o, r, E));
}

static void set_backend(twn_model *m, twn_backend_kind kind, size_t kv_budget) {
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = kind;
    o.kv_budget_bytes = kv_budget;
    OK(twn_model_set_backend(m, &o, E));
    printf("  %s\n", twn_backend_describe(m->backend));
}

static void test_embed_items_cuda(void **st) {
    (void)st;
    twn_model *m;
    OK(twn_model_load(tu_tiny_model(), &m, E));
    const int H = m->lm->H, n = N_SCHED + 1;
    const char *img[1] = {TWN_SOURCE_DIR "/tests/data/images/rocket.jpg"};
    twn_item it[N_SCHED + 1];
    sched_items(it, img);
    twn_result cpu[N_SCHED + 1], gpu[N_SCHED + 1], al[N_SCHED + 1], one[N_SCHED + 1];
    sched_run(m, it, n, "never", cpu);
    for (int i = 0; i < n; i++) sched_run(m, &it[i], 1, "always", &one[i]);
    set_backend(m, TWN_BACKEND_CUDA, 64u << 20);
    assert_int_equal(twn_backend_which(m->backend), TWN_BACKEND_CUDA);
    sched_run(m, it, n, "never", gpu);
    for (int i = 0; i < n; i++) {
        char what[64];
        assert_null(cpu[i].error);
        assert_null(gpu[i].error);
        snprintf(what, sizeof what, "embed_items never item %d (cuda vs cpu)", i);
        check_tol(what, gpu[i].embedding, cpu[i].embedding, (size_t)H, MODEL_TOL);
    }
    /* always: gate, greedy CoT on the device (argmax), embedding pass; bf16 may pick another
     * token where two logits nearly tie, so the CoTs are reported, not required equal */
    sched_run(m, it, n, "always", al);
    int same = 0;
    for (int i = 0; i < n; i++) {
        assert_null(al[i].error);
        assert_true(al[i].hard);
        assert_true(al[i].think_tokens >= 1 && al[i].think_tokens <= m->man.max_think_tokens);
        double norm = 0;
        for (int k = 0; k < H; k++) norm += (double)al[i].embedding[k] * al[i].embedding[k];
        assert_true(fabs(norm - 1.0) < 1e-4);
        same += one[i].n_cot == al[i].n_cot &&
                !memcmp(one[i].cot_ids, al[i].cot_ids, sizeof(int32_t) * (size_t)one[i].n_cot);
    }
    printf("  mode always: %d of %d CoTs identical to the cpu backend's\n", same, n);
    for (int i = 0; i < n; i++) {
        twn_result_free(&cpu[i]);
        twn_result_free(&gpu[i]);
        twn_result_free(&al[i]);
        twn_result_free(&one[i]);
    }
    twn_model_free(m);
}

/* A pool of 6 pages of 16 rows: prompts wait for each other's pages (mode never: the same
 * embeddings as with a large pool, within the tolerance, since the steps batch differently) and
 * a prompt longer than the whole pool fails alone, with the pool's message; mode always (CoT
 * reservations of prompt + max_think_tokens rows) completes too, and every page comes back. */
static void test_embed_items_kv_wait(void **st) {
    (void)st;
    twn_model *m;
    OK(twn_model_load(tu_tiny_model(), &m, E));
    const twn_lm *lm = m->lm;
    const int H = lm->H;
    const size_t page = 2u * (size_t)lm->L * 16 * (size_t)(lm->nkv * lm->D) * 2;
    char *longtxt = twn_malloc(6000);
    longtxt[0] = 0;
    for (int i = 0; i < 150; i++) strcat(longtxt, "word ");
    twn_item it[N_SCHED + 1];
    for (int i = 0; i < N_SCHED; i++) it[i] = (twn_item){.id = "t", .text = sched_texts[i]};
    it[N_SCHED] = (twn_item){.id = "long", .text = longtxt};
    twn_result big[N_SCHED + 1], small[N_SCHED + 1], al[N_SCHED + 1];
    set_backend(m, TWN_BACKEND_CUDA, 64u << 20);
    sched_run(m, it, N_SCHED, "never", big);
    set_backend(m, TWN_BACKEND_CUDA, 6 * page);
    assert_true(twn_backend_kv_rows_free(m->backend) == 96);
    sched_run(m, it, N_SCHED + 1, "never", small);
    sched_run(m, it, N_SCHED + 1, "always", al);
    for (int i = 0; i < N_SCHED; i++) {
        char what[64];
        assert_null(small[i].error);
        assert_null(al[i].error);
        assert_true(al[i].think_tokens >= 1);
        snprintf(what, sizeof what, "kv wait item %d (small pool vs large)", i);
        check_tol(what, small[i].embedding, big[i].embedding, (size_t)H, MODEL_TOL);
        twn_result_free(&big[i]);
        twn_result_free(&small[i]);
        twn_result_free(&al[i]);
    }
    for (int k = 0; k < 2; k++) {
        twn_result *r = k ? &al[N_SCHED] : &small[N_SCHED];
        assert_non_null(r->error);
        printf("  %s\n", r->error);
        assert_true(!strncmp(r->error, "KV cache: KV cache pool exhausted", 33));
        assert_null(r->embedding);
        twn_result_free(r);
    }
    assert_true(twn_backend_kv_rows_free(m->backend) == 96); /* every page came back */
    twn_free(longtxt);
    twn_model_free(m);
}

static void test_kv_pool(void **st) {
    (void)st;
    const rl_dims d = {
        .H = 48, .I = 80, .nh = 6, .nkv = 2, .D = 16, .V = 97, .L = 3, .section = {4, 2, 2}};
    twn_lm *lm = rl_make_lm(&d, 5);
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CUDA;
    o.kv_page_rows = 16;
    o.kv_budget_bytes = 4 * (2u * 3 * 16 * 32 * 2); /* 4 pages of 16 rows, 3 layers, kd 32 */
    twn_backend *b;
    OK(twn_backend_open(lm, &o, &b, E));
    assert_true(twn_backend_kv_rows_free(b) == 64);
    twn_bkv *x = NULL, *y = NULL, *z = NULL;
    twn_err e;
    assert_int_equal(twn_backend_kv_open(b, 65, &x, &e), -1);
    assert_string_equal(e.msg, "KV cache pool exhausted: a sequence needs 5 more page(s) of 16 "
                               "rows (65 rows in all), 4 of 4 pages are free; raise the KV "
                               "budget or lower max_active");
    assert_true(twn_backend_kv_rows_free(b) == 64);
    OK(twn_backend_kv_open(b, 32, &x, E));
    OK(twn_backend_kv_open(b, 17, &y, E));
    assert_true(twn_backend_kv_rows_free(b) == 0);
    assert_int_equal(twn_backend_kv_open(b, 1, &z, &e), -1);
    /* a step that grows y past its pages fails the same way, naming the need */
    int32_t ids[20];
    for (int i = 0; i < 20; i++) ids[i] = i;
    twn_bseq s = {.kv = y, .n = 20, .ids = ids, .adapter = TWN_NO_ADAPTER};
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), 0); /* 20 rows fit y's 2 pages */
    s.n = 13;
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), -1);
    assert_non_null(strstr(e.msg, "KV cache pool exhausted: a sequence needs 1 more page(s)"));
    twn_backend_kv_close(b, x);
    assert_true(twn_backend_kv_rows_free(b) == 32);
    twn_backend_kv_close(b, y);
    assert_true(twn_backend_kv_rows_free(b) == 64);
    /* the same bad token message as the cpu engine */
    OK(twn_backend_kv_open(b, 4, &z, E));
    const int32_t bad[2] = {4, 97};
    twn_bseq sb = {.kv = z, .n = 2, .ids = bad, .adapter = TWN_NO_ADAPTER};
    assert_int_equal(twn_backend_forward(b, &sb, 1, &e), -1);
    assert_string_equal(e.msg, "sequence 0 row 1: token id 97 is outside the vocabulary [0, 97)");
    twn_backend_kv_close(b, z);
    twn_backend_close(b);
    twn_lm_free(lm);
}

int main(void) {
    char why[TWN_ERR_MAX];
    twn_backend_opts o;
    twn_backend_opts_default(&o);
#ifdef UNDER_ASAN
    printf("SKIP test_cuda: built with AddressSanitizer, which the CUDA driver does not support; "
           "the GPU tests run in the release build\n");
    return SKIP_CODE;
#endif
    if (!twn_backend_cuda_available(&o, why, sizeof why)) {
        printf("SKIP test_cuda: %s\n", why);
        return SKIP_CODE;
    }
    M = twn_backend_cuda_module(NULL, why, sizeof why);
    printf("CUDA module: %s\n", M->build_info);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_qk_norm_rope),
        cmocka_unit_test(test_silu_mul),
        cmocka_unit_test(test_lora_segmented),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_argmax),
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_model_random),
        cmocka_unit_test(test_model_tiny_checkpoint),
        cmocka_unit_test(test_kv_pool),
        cmocka_unit_test(test_embed_items_cuda),
        cmocka_unit_test(test_embed_items_kv_wait),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
