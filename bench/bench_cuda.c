/* bench_cuda.c — the CUDA backend's speed, with its baselines measured in the same run.
 *
 * usage: bench_cuda BASE_DIR [--prefill P] [--batch B] [--ctx C] [--steps S] [--reps R]
 *   BASE_DIR: a Qwen3-VL model directory (config.json + safetensors), e.g. the base/ folder that
 *   `twn mkmodel --preset qwen3-0.5b` writes.
 *
 * Prefill: one sequence of P tokens, best of R, on cuda and (once) on the cpu backend: the
 * ratio is the speed-up over the reference engine on this machine.
 * Decode: B sequences prefilled with C tokens, then S steps of one token each (greedy, argmax on
 * the device), with CUDA graphs and without: tokens/s and the graphs' gain.
 *
 * Without a usable GPU (no module, driver or device) it prints why and exits 0, so the bench
 * scripts can run it everywhere. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend.h"
#include "engine/lm.h"
#include "util/mem.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int die(const char *what, const twn_err *e) {
    fprintf(stderr, "bench_cuda: %s: %s\n", what, e->msg);
    return 1;
}

/* Seconds for one prefill of P tokens (fresh KV each time), best of reps. */
static double prefill(twn_backend *b, const int32_t *ids, int P, int reps, twn_err *e) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        twn_bkv *kv;
        if (twn_backend_kv_open(b, P, &kv, e)) return -1;
        int32_t am;
        twn_bseq s = {.kv = kv, .n = P, .ids = ids, .adapter = TWN_NO_ADAPTER, .argmax = &am};
        double t0 = now();
        int rc = twn_backend_forward(b, &s, 1, e);
        double t = now() - t0;
        twn_backend_kv_close(b, kv);
        if (rc) return -1;
        best = t < best ? t : best;
    }
    return best;
}

/* Seconds for S decode steps of B sequences after a C-token prefill each. */
static double decode(twn_backend *b, const int32_t *ids, int B, int C, int S, twn_err *e) {
    twn_bkv **kv = twn_calloc((size_t)B, sizeof *kv);
    twn_bseq *s = twn_calloc((size_t)B, sizeof *s);
    int32_t *tok = twn_calloc((size_t)B, sizeof *tok);
    double t = -1;
    for (int i = 0; i < B; i++) {
        if (twn_backend_kv_open(b, C + S, &kv[i], e)) goto out;
        s[i] = (twn_bseq){
            .kv = kv[i], .n = C, .ids = ids, .adapter = TWN_NO_ADAPTER, .argmax = &tok[i]};
    }
    if (twn_backend_forward(b, s, B, e)) goto out;
    for (int i = 0; i < B; i++) s[i].n = 1, s[i].ids = &tok[i];
    if (twn_backend_forward(b, s, B, e)) goto out; /* warm-up: captures the graph */
    double t0 = now();
    for (int k = 1; k < S; k++)
        if (twn_backend_forward(b, s, B, e)) goto out;
    t = now() - t0;
out:
    for (int i = 0; i < B; i++) twn_backend_kv_close(b, kv[i]);
    twn_free(kv), twn_free(s), twn_free(tok);
    return t;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_cuda BASE_DIR [--prefill P] [--batch B] [--ctx C] "
                        "[--steps S] [--reps R]\n");
        return 2;
    }
    int P = 512, B = 32, C = 256, S = 64, R = 3;
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
    }
    if (P < 1 || B < 1 || C < 1 || S < 2 || R < 1) {
        fprintf(stderr, "bench_cuda: sizes must be positive (steps >= 2)\n");
        return 2;
    }
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    char why[TWN_ERR_MAX];
    if (!twn_backend_cuda_available(&o, why, sizeof why)) {
        printf("bench_cuda: skipped (CUDA unavailable: %s)\n", why);
        return 0;
    }
    twn_err e;
    twn_lm *lm;
    if (twn_lm_load(argv[1], &lm, &e)) return die("loading the model", &e);
    int n = P > C ? P : C;
    int32_t *ids = twn_malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((i * 7919 + 13) % lm->V);
    twn_backend *cpu, *gpu, *gpu_nograph;
    o.kind = TWN_BACKEND_CPU;
    if (twn_backend_open(lm, &o, &cpu, &e)) return die("cpu backend", &e);
    o.kind = TWN_BACKEND_CUDA;
    /* two contexts share the device: size each KV pool for the decode run (bf16 K and V) */
    o.kv_budget_bytes =
        (size_t)(B + 1) * (size_t)(n + S + 16) * (size_t)lm->L * (size_t)(lm->nkv * lm->D) * 4;
    if (twn_backend_open(lm, &o, &gpu, &e)) return die("cuda backend", &e);
    o.cuda_graphs = false;
    if (twn_backend_open(lm, &o, &gpu_nograph, &e)) return die("cuda backend (no graphs)", &e);
    printf("model %s: hidden %d, %d layers, heads %d/%d, vocab %d\n", argv[1], lm->H, lm->L, lm->nh,
           lm->nkv, lm->V);
    printf("%s\n", twn_backend_describe(gpu));

    double tg = prefill(gpu, ids, P, R, &e);
    if (tg < 0) return die("cuda prefill", &e);
    double tc = prefill(cpu, ids, P, 1, &e);
    if (tc < 0) return die("cpu prefill", &e);
    printf("prefill %d tokens: cuda %.2f ms (%.0f tok/s), cpu %.2f ms (%.0f tok/s); cuda/cpu "
           "speed-up %.1fx\n",
           P, tg * 1e3, P / tg, tc * 1e3, P / tc, tc / tg);
    double dg = decode(gpu, ids, B, C, S, &e);
    if (dg < 0) return die("cuda decode (graphs)", &e);
    double dn = decode(gpu_nograph, ids, B, C, S, &e);
    if (dn < 0) return die("cuda decode", &e);
    printf("decode %d seqs x %d steps after %d tokens: graphs %.3f ms/step (%.0f tok/s), eager "
           "%.3f ms/step (%.0f tok/s); graphs gain %.2fx\n",
           B, S - 1, C, dg * 1e3 / (S - 1), B * (S - 1) / dg, dn * 1e3 / (S - 1), B * (S - 1) / dn,
           dn / dg);
    twn_backend_close(cpu);
    twn_backend_close(gpu);
    twn_backend_close(gpu_nograph);
    twn_lm_free(lm);
    twn_free(ids);
    return 0;
}
