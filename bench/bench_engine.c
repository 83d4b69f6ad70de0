/* bench_engine.c — CPU decoder speed against its GEMM-only floor, measured in the same run.
 *
 * usage: bench_engine BASE_DIR [--prefill P] [--batch B] [--ctx C] [--steps S] [--reps R]
 *   BASE_DIR: a Qwen3-VL model directory (config.json + safetensors), e.g. the base/ folder that
 *   `twn mkmodel` writes.
 *
 * Prefill: one sequence of P tokens through twn_lm_forward (no adapter), best of R.  Its floor is
 * the same GEMMs with the same shapes and the same weights issued alone — per layer q, k, v, o,
 * gate, up, down through twn_cpu_linear (which is what the engine calls), the two attention
 * products per head (heads in parallel, as engine/cpu/attention.c runs them), and the lm_head row —
 * so floor/engine is the share of the time the engine spends in the GEMMs it cannot avoid (the
 * issue's target for prefill: >= 0.8).
 *
 * Decode (best of R, alternating with its floor): B sequences, each prefilled with C tokens (KV
 * reserved for C + S rows, as the TWN scheduler reserves prompt + max_think_tokens), then S steps
 * of one token each (B rows per step).  Its floor is the projections and lm_head for B rows per
 * step; decode attention is not a GEMM (dot products against the KV cache) and is left out of the
 * floor, so the decode ratio also shows what attention and the rest cost.
 *
 * Memory: peak RSS (getrusage) beside the fp32 weight bytes plus the KV cache bytes; the target is
 * peak <= 1.2 x (weights + KV).
 *
 * Prints one block of results; scripts/bench.sh collects it into BENCHMARKS.md. */
#include <cblas.h>
#undef I /* complex.h (via cblas.h) defines I; twn_lm has a field I */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "engine/cpu/ops.h"
#include "engine/lm.h"
#include "util/mem.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double peak_rss_bytes(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss * 1024.0;
}

static int proj_out(const twn_lm *lm, int j) {
    int qd = lm->nh * lm->D, kd = lm->nkv * lm->D;
    const int o[TWN_NPROJ] = {qd, kd, kd, lm->H, lm->I, lm->I, lm->H};
    return o[j];
}
static int proj_in(const twn_lm *lm, int j) {
    return j == TWN_O ? lm->nh * lm->D : j == TWN_DOWN ? lm->I : lm->H;
}

/* The projections (+ lm_head for `heads` rows) for M rows, alone. */
static void floor_proj(const twn_lm *lm, int M, int heads, float *X, float *Y) {
    for (int l = 0; l < lm->L; l++)
        for (int j = 0; j < TWN_NPROJ; j++) {
            int K = proj_in(lm, j), N = proj_out(lm, j);
            twn_cpu_linear(X, M, K, K, lm->layers[l].w[j], N, Y, N, 1.f, 0.f);
        }
    twn_cpu_linear(X, heads, lm->H, lm->H, lm->lm_head, lm->V, Y, lm->V, 1.f, 0.f);
}

/* The prefill attention products of twn_cpu_attention (n == L rows, every head), alone. */
static void floor_attn(const twn_lm *lm, int n, float *q, float *k, float *Sall, float *out) {
    int D = lm->D, qs = lm->nh * D, ks = lm->nkv * D, rep = lm->nh / lm->nkv;
    for (int l = 0; l < lm->L; l++)
#pragma omp parallel for schedule(dynamic, 1) if (lm->nh > 1 && (double)n * n * D >= 65536.0)
        for (int h = 0; h < lm->nh; h++) {
            float *S = Sall + (size_t)h * n * n;
            const float *kh = k + (size_t)(h / rep) * D;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, D, 1.f, q + (size_t)h * D,
                        qs, kh, ks, 0.f, S, n);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, n, 1.f, S, n, kh, ks, 0.f,
                        out + (size_t)h * D, qs);
        }
}

static void fill(float *x, size_t n, unsigned *seed) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(rand_r(seed) % 2001 - 1000) * 1e-3f;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr,
                "usage: %s BASE_DIR [--prefill P] [--batch B] [--ctx C] [--steps S] "
                "[--reps R]\n",
                argv[0]);
        return 2;
    }
    int P = 256, B = 8, C = 128, S = 16, R = 3;
    for (int i = 2; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--prefill"))
            P = v;
        else if (!strcmp(argv[i], "--batch"))
            B = v;
        else if (!strcmp(argv[i], "--ctx"))
            C = v;
        else if (!strcmp(argv[i], "--steps"))
            S = v;
        else if (!strcmp(argv[i], "--reps"))
            R = v;
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (P < 8 || B < 1 || C < 1 || S < 1 || R < 1) {
        fprintf(stderr, "need --prefill >= 8 and positive --batch, --ctx, --steps, --reps\n");
        return 2;
    }
    double rss0 = peak_rss_bytes(); /* the process (libraries, BLAS buffers) before any model */
    twn_err err;
    twn_lm *lm;
    double t0 = now();
    if (twn_lm_load(argv[1], &lm, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    double t_load = now() - t0;
    unsigned seed = 1;
    int32_t *ids = twn_malloc(sizeof(int32_t) * (size_t)(P > C ? P : C));
    for (int i = 0; i < (P > C ? P : C); i++) ids[i] = (int32_t)(rand_r(&seed) % 151643);

    /* ---- prefill: engine, then floor, alternating R times; best of each */
    int H = lm->H, qd = lm->nh * lm->D, kd = lm->nkv * lm->D;
    int wide = lm->V > lm->I ? lm->V : lm->I;
    wide = wide > qd ? wide : qd;
    float *X = twn_malloc(sizeof(float) * (size_t)P * (lm->I > H ? lm->I : H));
    float *Y = twn_malloc(sizeof(float) * (size_t)P * wide);
    float *Q = twn_malloc(sizeof(float) * (size_t)P * qd),
          *K = twn_malloc(sizeof(float) * (size_t)P * kd);
    float *Sc = twn_malloc(sizeof(float) * (size_t)P * P * lm->nh),
          *O = twn_malloc(sizeof(float) * (size_t)P * qd);
    fill(X, (size_t)P * (lm->I > H ? lm->I : H), &seed);
    fill(Q, (size_t)P * qd, &seed);
    fill(K, (size_t)P * kd, &seed);
    float *logits = twn_malloc(sizeof(float) * (size_t)lm->V);
    double best_pre = 1e30, best_floor = 1e30;
    for (int r = 0; r <= R; r++) { /* r == 0 warms up */
        twn_kv kv;
        twn_kv_init(&kv, lm);
        twn_lm_seq sq = {
            .kv = &kv, .n = P, .ids = ids, .adapter = TWN_NO_ADAPTER, .logits = logits};
        double a = now();
        if (twn_lm_forward(lm, &sq, 1, NULL, NULL, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        double e = now() - a;
        twn_kv_free(&kv);
        a = now();
        floor_proj(lm, P, 1, X, Y);
        floor_attn(lm, P, Q, K, Sc, O);
        double f = now() - a;
        if (r) {
            best_pre = e < best_pre ? e : best_pre;
            best_floor = f < best_floor ? f : best_floor;
        }
    }

    /* ---- decode: B sequences with C tokens of context, S steps */
    twn_kv *kvs = twn_calloc((size_t)B, sizeof *kvs);
    twn_lm_seq *seqs = twn_calloc((size_t)B, sizeof *seqs);
    int32_t *next = twn_calloc((size_t)B, sizeof(int32_t));
    float *lg = twn_malloc(sizeof(float) * (size_t)B * lm->V);
    for (int b = 0; b < B; b++) {
        twn_kv_init(&kvs[b], lm);
        twn_kv_reserve(&kvs[b], C + S); /* as engine/twn.c does for a CoT */
        twn_lm_seq sq = {.kv = &kvs[b], .n = C, .ids = ids, .adapter = TWN_NO_ADAPTER};
        if (twn_lm_forward(lm, &sq, 1, NULL, NULL, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        next[b] = ids[b];
    }
    double t_dec = 1e30, t_dec_floor = 1e30;
    for (int r = 0; r < R; r++) { /* alternate engine and floor; best of R each */
        for (int b = 0; b < B; b++) {
            twn_kv_truncate(&kvs[b], C);
            kvs[b].next_pos = C;
        }
        double a = now();
        for (int s = 0; s < S; s++) {
            for (int b = 0; b < B; b++)
                seqs[b] = (twn_lm_seq){.kv = &kvs[b],
                                       .n = 1,
                                       .ids = &next[b],
                                       .adapter = TWN_NO_ADAPTER,
                                       .logits = lg + (size_t)b * lm->V};
            if (twn_lm_forward(lm, seqs, B, NULL, NULL, &err)) {
                fprintf(stderr, "%s\n", err.msg);
                return 1;
            }
        }
        double e = now() - a;
        a = now();
        for (int s = 0; s < S; s++) floor_proj(lm, B, B, X, Y);
        double f = now() - a;
        t_dec = e < t_dec ? e : t_dec;
        t_dec_floor = f < t_dec_floor ? f : t_dec_floor;
    }
    size_t kv_bytes = 0;
    for (int b = 0; b < B; b++)
        kv_bytes += (size_t)kvs[b].cap * kvs[b].kvdim * 2 * sizeof(float) * lm->L;
    double rss = peak_rss_bytes();

    double flops_pre = 0; /* 2*M*N*K over the floor's GEMMs */
    for (int j = 0; j < TWN_NPROJ; j++) flops_pre += 2.0 * P * proj_out(lm, j) * proj_in(lm, j);
    flops_pre = flops_pre * lm->L + 2.0 * lm->V * H + 4.0 * lm->L * lm->nh * (double)P * P * lm->D;
    printf("model %s: layers %d, hidden %d, heads %d/%d, intermediate %d, %.1f M params, "
           "fp32 weights %.1f MB, load %.2f s\n",
           argv[1], lm->L, H, lm->nh, lm->nkv, lm->I, (double)lm->n_params / 1e6,
           (double)lm->weight_bytes / 1e6, t_load);
    printf("prefill P=%d: engine %.1f tok/s (%.3f s, %.1f GFLOP/s), GEMM floor %.1f tok/s "
           "(%.3f s) -> floor/engine %.2f\n",
           P, P / best_pre, best_pre, flops_pre / best_pre / 1e9, P / best_floor, best_floor,
           best_floor / best_pre);
    printf("decode B=%d ctx=%d steps=%d: engine %.1f tok/s (%.2f ms/step), projection floor "
           "%.1f tok/s -> floor/engine %.2f\n",
           B, C, S, B * S / t_dec, 1e3 * t_dec / S, B * S / t_dec_floor, t_dec_floor / t_dec);
    printf("memory: peak RSS %.1f MB (%.1f MB before loading), weights %.1f MB + KV %.1f MB -> "
           "peak/(weights+KV) %.2f, above the start %.2f\n",
           rss / 1e6, rss0 / 1e6, (double)lm->weight_bytes / 1e6, (double)kv_bytes / 1e6,
           rss / ((double)lm->weight_bytes + (double)kv_bytes),
           (rss - rss0) / ((double)lm->weight_bytes + (double)kv_bytes));

    for (int b = 0; b < B; b++) twn_kv_free(&kvs[b]);
    twn_free(kvs), twn_free(seqs), twn_free(next), twn_free(lg), twn_free(logits);
    twn_free(X), twn_free(Y), twn_free(Q), twn_free(K), twn_free(Sc), twn_free(O), twn_free(ids);
    twn_lm_free(lm);
    return 0;
}
