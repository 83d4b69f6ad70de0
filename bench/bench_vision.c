/* bench_vision.c — the vision tower's images/s on the CPU beside its GEMM-only floor.
 *
 * usage: bench_vision [--preset tiny|qwen3vl-2b|all] [--size PX] [--batch B] [--seconds S]
 *                     [--model DIR]
 * Builds the tower of a `twn mkmodel` preset with random weights in memory (no 4.5 GB checkpoint
 * needed; --model DIR loads a real checkpoint's base directory instead), feeds B square images
 * of PX x PX pixels (default 448: a 28 x 28 patch grid, 784 patches, 196 output tokens) per
 * forward, and reports images/s.  In the same run it replays exactly the sgemm calls that
 * forward makes (patch embed, qkv/proj/fc1/fc2 per block, per-head attention score and P.V
 * products per image, the merger and DeepStack merger GEMMs), same shapes and leading
 * dimensions, and reports the ratio tower time / GEMM time: how far the rest (norms, GELU,
 * softmax, RoPE, position interpolation, copies) keeps the tower from its floor.
 * Threads: OpenBLAS's (OPENBLAS_NUM_THREADS) and OpenMP's (OMP_NUM_THREADS) pools, as the engine
 * runs.  Not a test: it only reports. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/mkmodel.h"
#include "engine/vision.h"
#include "util/clock.h"
#include "util/mem.h"

/* Fills n floats with a cheap deterministic pattern of standard deviation ~std. */
static void fill(float *p, size_t n, float mean, float std, uint64_t seed) {
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        p[i] = mean + std * 1.7320508f * (2.f * (float)(s >> 40) / (float)(1 << 24) - 1.f);
    }
}

static void fill_merger(const twn_vision *v, twn_vision_merger *m, uint64_t seed) {
    const int M = v->unit * v->Hv, nd = m->postshuffle ? M : v->Hv;
    fill(m->norm_w, (size_t)nd, 1.f, 0.1f, seed + 1);
    fill(m->norm_b, (size_t)nd, 0.f, 0.02f, seed + 2);
    fill(m->fc1_w, (size_t)M * M, 0.f, 1.f / sqrtf((float)M), seed + 3);
    fill(m->fc1_b, (size_t)M, 0.f, 0.02f, seed + 4);
    fill(m->fc2_w, (size_t)v->Hout * M, 0.f, 1.f / sqrtf((float)M), seed + 5);
    fill(m->fc2_b, (size_t)v->Hout, 0.f, 0.02f, seed + 6);
}

static twn_vision *random_tower(const twn_mkmodel_preset *p) {
    twn_vision_config c = {.depth = p->v_depth,
                           .hidden_size = p->v_hidden,
                           .intermediate_size = p->v_intermediate,
                           .num_heads = p->v_heads,
                           .in_channels = 3,
                           .patch_size = 16,
                           .temporal_patch_size = 2,
                           .spatial_merge_size = 2,
                           .out_hidden_size = p->hidden,
                           .num_position_embeddings = 2304,
                           .n_deepstack = p->n_deepstack};
    for (int k = 0; k < p->n_deepstack; k++) c.deepstack_visual_indexes[k] = p->deepstack[k];
    twn_vision *v;
    twn_err e;
    if (twn_vision_new(&c, &v, &e)) {
        fprintf(stderr, "bench_vision: %s\n", e.msg);
        exit(1);
    }
    const int Hv = v->Hv, Iv = v->Iv;
    fill(v->patch_w, (size_t)Hv * v->patch_dim, 0.f, 1.f / sqrtf((float)v->patch_dim), 1);
    fill(v->patch_b, (size_t)Hv, 0.f, 0.02f, 2);
    fill(v->pos_embed, (size_t)2304 * Hv, 0.f, 0.5f, 3);
    for (int l = 0; l < v->depth; l++) {
        twn_vision_block *b = &v->blocks[l];
        uint64_t s = 100 + 20 * (uint64_t)l;
        fill(b->norm1_w, Hv, 1.f, 0.1f, s + 1);
        fill(b->norm1_b, Hv, 0.f, 0.02f, s + 2);
        fill(b->qkv_w, (size_t)3 * Hv * Hv, 0.f, 1.f / sqrtf((float)Hv), s + 3);
        fill(b->qkv_b, (size_t)3 * Hv, 0.f, 0.02f, s + 4);
        fill(b->proj_w, (size_t)Hv * Hv, 0.f, 1.f / sqrtf((float)Hv), s + 5);
        fill(b->proj_b, Hv, 0.f, 0.02f, s + 6);
        fill(b->norm2_w, Hv, 1.f, 0.1f, s + 7);
        fill(b->norm2_b, Hv, 0.f, 0.02f, s + 8);
        fill(b->fc1_w, (size_t)Iv * Hv, 0.f, 1.f / sqrtf((float)Hv), s + 9);
        fill(b->fc1_b, Iv, 0.f, 0.02f, s + 10);
        fill(b->fc2_w, (size_t)Hv * Iv, 0.f, 1.f / sqrtf((float)Iv), s + 11);
        fill(b->fc2_b, Hv, 0.f, 0.02f, s + 12);
    }
    fill_merger(v, &v->merger, 1000);
    for (int k = 0; k < c.n_deepstack; k++) fill_merger(v, &v->ds_mergers[k], 2000 + 10 * k);
    return v;
}

// ------------------------------------------------------------------------------------------------
// The GEMM-only floor: the forward's sgemm calls, same shapes, on scratch buffers.

typedef struct {
    float *x, *xn, *qkv, *att, *mlp, *S, *m1, *m2, *out, *pix;
} scratch;

static void gemm_nt(const float *X, int M, int K, const float *W, int N, float *Y) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, X, K, W, K, 1.f, Y, N);
}

static void gemm_floor(const twn_vision *v, int B, int per_image, scratch *s) {
    const int Hv = v->Hv, Iv = v->Iv, hd = v->hd, N = B * per_image, NT = N / v->unit;
    const int M = v->unit * Hv;
    for (int i = 0; i < B; i++) /* patch embed, per image */
        gemm_nt(s->pix, per_image, v->patch_dim, v->patch_w, Hv, s->x + (size_t)i * per_image * Hv);
    int feat = 0;
    for (int l = 0; l < v->depth; l++) {
        const twn_vision_block *b = &v->blocks[l];
        gemm_nt(s->xn, N, Hv, b->qkv_w, 3 * Hv, s->qkv);
        for (int i = 0; i < B; i++)
            for (int h = 0; h < v->nh; h++) {
                const float *q = s->qkv + (size_t)i * per_image * 3 * Hv + (size_t)h * hd;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, per_image, per_image, hd, 1.f,
                            q, 3 * Hv, q + Hv, 3 * Hv, 0.f, s->S, per_image);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, per_image, hd, per_image,
                            1.f, s->S, per_image, q + 2 * Hv, 3 * Hv, 0.f,
                            s->att + (size_t)i * per_image * Hv + (size_t)h * hd, Hv);
            }
        gemm_nt(s->att, N, Hv, b->proj_w, Hv, s->xn);
        gemm_nt(s->xn, N, Hv, b->fc1_w, Iv, s->mlp);
        gemm_nt(s->mlp, N, Iv, b->fc2_w, Hv, s->xn);
        if (feat < v->n_features && v->feat_block[feat] == l) {
            const twn_vision_merger *m = &v->ds_mergers[v->feat_merger[feat++]];
            gemm_nt(s->xn, NT, M, m->fc1_w, M, s->m1);
            gemm_nt(s->m1, NT, M, m->fc2_w, v->Hout, s->out);
        }
    }
    gemm_nt(s->xn, NT, M, v->merger.fc1_w, M, s->m1);
    gemm_nt(s->m1, NT, M, v->merger.fc2_w, v->Hout, s->out);
}

/* GFLOP of one forward's GEMMs (2 per multiply-add). */
static double gemm_gflop(const twn_vision *v, int B, int per_image) {
    const double Hv = v->Hv, Iv = v->Iv, N = (double)B * per_image, NT = N / v->unit;
    const double M = v->unit * Hv;
    double f = 2 * N * v->patch_dim * Hv;
    f += v->depth * (2 * N * Hv * (3 * Hv + Hv + 2 * Iv) + 4.0 * B * per_image * per_image * Hv);
    f += (1 + v->n_features) * 2 * NT * M * (M + v->Hout);
    return f / 1e9;
}

// ------------------------------------------------------------------------------------------------

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bench(const char *label, twn_vision *v, int px, int B, double seconds) {
    const int g = px / v->cfg.patch_size, per_image = g * g;
    if (g < v->merge || g % v->merge) {
        fprintf(stderr, "bench_vision: %d px is not a multiple of %d\n", px,
                v->cfg.patch_size * v->merge);
        exit(2);
    }
    float *pix = twn_malloc(sizeof(float) * (size_t)per_image * v->patch_dim);
    fill(pix, (size_t)per_image * v->patch_dim, 0.f, 0.5f, 7);
    twn_vision_image *im = twn_calloc((size_t)B, sizeof *im);
    for (int i = 0; i < B; i++) im[i] = (twn_vision_image){pix, 1, g, g};
    twn_vision_out o;
    twn_err e;

    /* GEMM floor scratch, then one warm-up of each */
    const size_t N = (size_t)B * per_image, Hv = (size_t)v->Hv, big = Hv > 64 ? Hv : 64;
    scratch s = {0};
    s.pix = pix;
    s.x = twn_calloc(N * Hv, sizeof(float));
    s.xn = twn_calloc(N * big, sizeof(float));
    s.qkv = twn_calloc(N * 3 * Hv, sizeof(float));
    s.att = twn_calloc(N * Hv, sizeof(float));
    s.mlp = twn_calloc(N * (size_t)v->Iv, sizeof(float));
    s.S = twn_calloc((size_t)per_image * per_image, sizeof(float));
    s.m1 = twn_calloc(N * Hv, sizeof(float));
    s.out = twn_calloc(N * (size_t)v->Hout, sizeof(float));
    if (twn_vision_forward(v, im, B, NULL, NULL, &o, &e)) {
        fprintf(stderr, "bench_vision: %s\n", e.msg);
        exit(1);
    }
    twn_vision_out_free(&o);
    gemm_floor(v, B, per_image, &s);

    /* Alternate tower and floor, so load from other processes hits both alike; medians. */
    enum { MAXREP = 64 };
    double tt[MAXREP], tg[MAXREP], start = twn_now();
    int reps = 0;
    do {
        double t0 = twn_now();
        twn_vision_forward(v, im, B, NULL, NULL, &o, &e);
        twn_vision_out_free(&o);
        double t1 = twn_now();
        gemm_floor(v, B, per_image, &s);
        tt[reps] = t1 - t0;
        tg[reps] = twn_now() - t1;
        reps++;
    } while (reps < MAXREP && (twn_now() - start < seconds || reps < 3));
    qsort(tt, (size_t)reps, sizeof(double), cmp_double);
    qsort(tg, (size_t)reps, sizeof(double), cmp_double);
    const double t_tower = tt[reps / 2], t_gemm = tg[reps / 2];

    const double gf = gemm_gflop(v, B, per_image);
    printf("%-11s %dx%d px, batch %d (%d patches/image, %lld tokens out), %d threads\n", label, px,
           px, B, per_image, (long long)twn_vision_tokens(v, 1, g, g), openblas_get_num_threads());
    printf("  tower      %8.4f s/forward  %8.3f images/s  %7.1f GFLOP/s  (median of %d; min "
           "%.4f s)\n",
           t_tower, B / t_tower, gf / t_tower, reps, tt[0]);
    printf("  GEMM floor %8.4f s/forward  %8.3f images/s  %7.1f GFLOP/s  (median of %d; min "
           "%.4f s; %.1f GFLOP)\n",
           t_gemm, B / t_gemm, gf / t_gemm, reps, tg[0], gf);
    printf("  ratio tower / GEMM floor: %.3f (medians), %.3f (minimums; steadier on a shared "
           "machine)\n",
           t_tower / t_gemm, tt[0] / tg[0]);
    twn_free(s.x), twn_free(s.xn), twn_free(s.qkv), twn_free(s.att), twn_free(s.mlp);
    twn_free(s.S), twn_free(s.m1), twn_free(s.out);
    twn_free(im);
    twn_free(pix);
}

int main(int argc, char **argv) {
    const char *preset = "all", *model = NULL;
    int px = 448, B = 1;
    double seconds = 3.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--preset") && i + 1 < argc)
            preset = argv[++i];
        else if (!strcmp(argv[i], "--size") && i + 1 < argc)
            px = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            B = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model = argv[++i];
        else {
            fprintf(stderr, "usage: bench_vision [--preset tiny|qwen3vl-2b|all] [--size PX] "
                            "[--batch B] [--seconds S] [--model BASE_DIR]\n");
            return 2;
        }
    }
    if (px < 32 || B < 1) {
        fprintf(stderr, "bench_vision: --size must be >= 32 and --batch >= 1\n");
        return 2;
    }
    if (model) {
        twn_vision *v;
        twn_err e;
        if (twn_vision_load(model, &v, &e)) {
            fprintf(stderr, "bench_vision: %s\n", e.msg);
            return 1;
        }
        bench(model, v, px, B, seconds);
        twn_vision_free(v);
        return 0;
    }
    const char *names[2] = {"tiny", "qwen3vl-2b"};
    for (int k = 0; k < 2; k++) {
        if (strcmp(preset, "all") && strcmp(preset, names[k])) continue;
        const twn_mkmodel_preset *p = twn_mkmodel_find(names[k]);
        twn_vision *v = random_tower(p);
        bench(names[k], v, px, B, seconds);
        twn_vision_free(v);
    }
    return 0;
}
