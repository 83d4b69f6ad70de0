/* test_vision.c — the Qwen3-VL vision tower (engine/vision.c), get_rope_index (engine/mrope.c)
 * and DeepStack injection in the decoder (engine/lm.c).
 *
 * There is no torch here, so the tower is checked against a second, deliberately literal
 * implementation written in this file from transformers' code (double precision, the reference's
 * own index lists, view/permute done by index arithmetic), plus self-consistency: a batch equals
 * each image alone, order inside a batch does not matter, one image never sees another.
 * Positions are checked against tables worked out by hand from the spec's algorithm. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cpu/ops.h"
#include "engine/cpu/vexp.h"
#include "engine/lm.h"
#include "engine/mkmodel.h"
#include "engine/mrope.h"
#include "engine/safetensors.h"
#include "engine/twn.h"
#include "engine/vision.h"
#include "tests/testutil.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "util/rng.h"

// ------------------------------------------------------------------------------------------------
// A small random tower

/* patch 2, temporal 2, 3 channels -> patch_dim 24; 8x8 learned grid; deepstack indexes listed
 * out of block order on purpose ({2, 0}: features come out as block 0 (merger 1), block 2
 * (merger 0)). */
static twn_vision_config small_cfg(void) {
    twn_vision_config c = {.depth = 3,
                           .hidden_size = 32,
                           .intermediate_size = 48,
                           .num_heads = 2,
                           .in_channels = 3,
                           .patch_size = 2,
                           .temporal_patch_size = 2,
                           .spatial_merge_size = 2,
                           .out_hidden_size = 24,
                           .num_position_embeddings = 64,
                           .deepstack_visual_indexes = {2, 0},
                           .n_deepstack = 2};
    snprintf(c.hidden_act, sizeof c.hidden_act, "gelu_pytorch_tanh");
    return c;
}

static void randn_into(twn_rng *g, float *p, size_t n, float mean, float std) {
    for (size_t i = 0; i < n; i++) p[i] = mean + std * (float)twn_rng_normal(g);
}

static void fill_merger(twn_rng *g, const twn_vision *v, twn_vision_merger *m) {
    const int M = v->unit * v->Hv, nd = m->postshuffle ? M : v->Hv;
    randn_into(g, m->norm_w, (size_t)nd, 1.f, 0.1f);
    randn_into(g, m->norm_b, (size_t)nd, 0.f, 0.05f);
    randn_into(g, m->fc1_w, (size_t)M * M, 0.f, 1.f / sqrtf((float)M));
    randn_into(g, m->fc1_b, (size_t)M, 0.f, 0.05f);
    randn_into(g, m->fc2_w, (size_t)v->Hout * M, 0.f, 1.f / sqrtf((float)M));
    randn_into(g, m->fc2_b, (size_t)v->Hout, 0.f, 0.05f);
}

static twn_vision *make_tower(const twn_vision_config *c, uint64_t seed) {
    twn_vision *v = NULL;
    twn_err e;
    if (twn_vision_new(c, &v, &e)) fail_msg("%s", e.msg);
    twn_rng g;
    twn_rng_seed(&g, seed);
    const int Hv = v->Hv, Iv = v->Iv;
    randn_into(&g, v->patch_w, (size_t)Hv * v->patch_dim, 0.f, 1.f / sqrtf((float)v->patch_dim));
    randn_into(&g, v->patch_b, (size_t)Hv, 0.f, 0.05f);
    randn_into(&g, v->pos_embed, (size_t)c->num_position_embeddings * Hv, 0.f, 0.5f);
    for (int l = 0; l < v->depth; l++) {
        twn_vision_block *b = &v->blocks[l];
        randn_into(&g, b->norm1_w, Hv, 1.f, 0.1f);
        randn_into(&g, b->norm1_b, Hv, 0.f, 0.05f);
        randn_into(&g, b->qkv_w, (size_t)3 * Hv * Hv, 0.f, 1.f / sqrtf((float)Hv));
        randn_into(&g, b->qkv_b, (size_t)3 * Hv, 0.f, 0.05f);
        randn_into(&g, b->proj_w, (size_t)Hv * Hv, 0.f, 1.f / sqrtf((float)Hv));
        randn_into(&g, b->proj_b, Hv, 0.f, 0.05f);
        randn_into(&g, b->norm2_w, Hv, 1.f, 0.1f);
        randn_into(&g, b->norm2_b, Hv, 0.f, 0.05f);
        randn_into(&g, b->fc1_w, (size_t)Iv * Hv, 0.f, 1.f / sqrtf((float)Hv));
        randn_into(&g, b->fc1_b, Iv, 0.f, 0.05f);
        randn_into(&g, b->fc2_w, (size_t)Hv * Iv, 0.f, 1.f / sqrtf((float)Iv));
        randn_into(&g, b->fc2_b, Hv, 0.f, 0.05f);
    }
    fill_merger(&g, v, &v->merger);
    for (int k = 0; k < c->n_deepstack; k++) fill_merger(&g, v, &v->ds_mergers[k]);
    return v;
}

/* Pixels in [-1, 1] (what the processor's normalize gives). */
static float *make_pixels(const twn_vision *v, int t, int h, int w, uint64_t seed) {
    size_t n = (size_t)t * h * w * v->patch_dim;
    float *p = twn_malloc(n * sizeof(float));
    twn_rng g;
    twn_rng_seed(&g, seed);
    for (size_t i = 0; i < n; i++) p[i] = (float)(2.0 * twn_rng_uniform(&g) - 1.0);
    return p;
}

// ------------------------------------------------------------------------------------------------
// The literal reference (modeling_qwen3_vl.py, Qwen3VLVisionModel.forward for one image)

static void ref_layernorm(const double *x, int dim, const float *w, const float *b, double *o) {
    double m = 0, var = 0;
    for (int i = 0; i < dim; i++) m += x[i];
    m /= dim;
    for (int i = 0; i < dim; i++) var += (x[i] - m) * (x[i] - m);
    var /= dim;
    for (int i = 0; i < dim; i++) o[i] = (x[i] - m) / sqrt(var + 1e-6) * w[i] + b[i];
}

static void ref_linear(const double *x, int in, const float *W, const float *b, int out,
                       double *y) {
    for (int o = 0; o < out; o++) {
        double s = b[o];
        for (int i = 0; i < in; i++) s += (double)W[(size_t)o * in + i] * x[i];
        y[o] = s;
    }
}

/* torch.linspace in fp32 (see vision.c; the reference's own arithmetic). */
static float ref_linspace(int steps, float end, int i) {
    if (steps == 1) return 0.f;
    float step = end / (float)(steps - 1);
    return i < steps / 2 ? step * (float)i : end - step * (float)(steps - 1 - i);
}

static void ref_merger(const twn_vision *v, const twn_vision_merger *m, const double *hs, int NT,
                       double *out) {
    const int Hv = v->Hv, M = v->unit * Hv;
    double *ln = malloc(sizeof(double) * M), *h1 = malloc(sizeof(double) * M);
    for (int r = 0; r < NT; r++) {
        const double *in = hs + (size_t)r * M;
        if (m->postshuffle)
            ref_layernorm(in, M, m->norm_w, m->norm_b, ln);
        else
            for (int u = 0; u < v->unit; u++)
                ref_layernorm(in + u * Hv, Hv, m->norm_w, m->norm_b, ln + u * Hv);
        ref_linear(ln, M, m->fc1_w, m->fc1_b, M, h1);
        for (int i = 0; i < M; i++) h1[i] = 0.5 * h1[i] * (1.0 + erf(h1[i] / sqrt(2.0)));
        ref_linear(h1, M, m->fc2_w, m->fc2_b, v->Hout, out + (size_t)r * v->Hout);
    }
    free(ln);
    free(h1);
}

/* out: [NT, Hout] embeds, then n_features x [NT, Hout]. */
static double *ref_forward(const twn_vision *v, const float *pix, int t, int h, int w) {
    const int Hv = v->Hv, Iv = v->Iv, nh = v->nh, hd = v->hd, m = v->merge, G = v->grid_side;
    const int N = t * h * w, NT = N / v->unit, Ho = v->Hout;
    double *x = calloc((size_t)N * Hv, sizeof(double));
    double *row = malloc(sizeof(double) * v->patch_dim);
    for (int r = 0; r < N; r++) { /* Conv3d, stride = kernel: one dot product per output */
        for (int k = 0; k < v->patch_dim; k++) row[k] = pix[(size_t)r * v->patch_dim + k];
        ref_linear(row, v->patch_dim, v->patch_w, v->patch_b, Hv, x + (size_t)r * Hv);
    }
    /* fast_pos_embed_interpolate: idx/weight lists over (h, w) raster, p0+p1+p2+p3, repeat(t),
     * view(t, h/m, m, w/m, m, C).permute(0, 1, 3, 2, 4, 5).flatten */
    double *pe = calloc((size_t)h * w * Hv, sizeof(double));
    for (int i = 0; i < h; i++)
        for (int j = 0; j < w; j++) {
            float hs = ref_linspace(h, (float)(G - 1), i), ws = ref_linspace(w, (float)(G - 1), j);
            int hf = (int)hs, wf = (int)ws;
            int hc = hf + 1 > G - 1 ? G - 1 : hf + 1, wc = wf + 1 > G - 1 ? G - 1 : wf + 1;
            float dh = hs - (float)hf, dw = ws - (float)wf;
            int idx[4] = {hf * G + wf, hf * G + wc, hc * G + wf, hc * G + wc};
            float wt[4] = {(1 - dh) * (1 - dw), (1 - dh) * dw, dh * (1 - dw), dh * dw};
            for (int q = 0; q < 4; q++)
                for (int c = 0; c < Hv; c++)
                    pe[((size_t)i * w + j) * Hv + c] +=
                        (double)v->pos_embed[(size_t)idx[q] * Hv + c] * wt[q];
        }
    int dst = 0;
    int *prow = malloc(sizeof(int) * N), *pcol = malloc(sizeof(int) * N);
    for (int a = 0; a < t; a++)
        for (int br = 0; br < h / m; br++)
            for (int bc = 0; bc < w / m; bc++)
                for (int ir = 0; ir < m; ir++)
                    for (int ic = 0; ic < m; ic++, dst++) {
                        int src = (br * m + ir) * w + (bc * m + ic);
                        for (int c = 0; c < Hv; c++)
                            x[(size_t)dst * Hv + c] += pe[(size_t)src * Hv + c];
                        prow[dst] = br * m + ir; /* rot_pos_emb's row_idx / col_idx */
                        pcol[dst] = bc * m + ic;
                    }
    /* rotary: freq_table[p] = p * inv_freq (fp32 outer), emb = cat(rot, rot) */
    const int d = hd / 2;
    double *cs = malloc(sizeof(double) * (size_t)N * hd),
           *sn = malloc(sizeof(double) * (size_t)N * hd);
    for (int r = 0; r < N; r++)
        for (int k = 0; k < hd; k++) {
            int j = k % d; /* cat(rot, rot) */
            float invf = 1.0f / powf(10000.0f, (float)(2 * (j % (d / 2))) / (float)d);
            float ang = j < d / 2 ? (float)prow[r] * invf : (float)pcol[r] * invf;
            cs[(size_t)r * hd + k] = cos((double)ang);
            sn[(size_t)r * hd + k] = sin((double)ang);
        }
    double *xn = malloc(sizeof(double) * (size_t)N * Hv),
           *qkv = malloc(sizeof(double) * (size_t)N * 3 * Hv);
    double *att = calloc((size_t)N * Hv, sizeof(double)),
           *tmp = malloc(sizeof(double) * (size_t)N * (Iv > 3 * Hv ? Iv : 3 * Hv));
    double *sc = malloc(sizeof(double) * N);
    double *res = calloc((size_t)(1 + v->n_features) * NT * Ho, sizeof(double));
    int feat = 0;
    for (int l = 0; l < v->depth; l++) {
        const twn_vision_block *b = &v->blocks[l];
        for (int r = 0; r < N; r++) {
            ref_layernorm(x + (size_t)r * Hv, Hv, b->norm1_w, b->norm1_b, xn + (size_t)r * Hv);
            ref_linear(xn + (size_t)r * Hv, Hv, b->qkv_w, b->qkv_b, 3 * Hv,
                       qkv + (size_t)r * 3 * Hv);
        }
        /* reshape(S, 3, heads, hd); q, k rotated: x*cos + rotate_half(x)*sin */
        for (int r = 0; r < N; r++)
            for (int part = 0; part < 2; part++)
                for (int hh = 0; hh < nh; hh++) {
                    double *p = qkv + (size_t)r * 3 * Hv + part * Hv + hh * hd, o[256];
                    for (int k = 0; k < hd; k++) {
                        double rh = k < d ? -p[k + d] : p[k - d];
                        o[k] = p[k] * cs[(size_t)r * hd + k] + rh * sn[(size_t)r * hd + k];
                    }
                    memcpy(p, o, sizeof(double) * hd);
                }
        /* cu_seqlens: one segment per frame */
        for (int f = 0; f < t; f++)
            for (int hh = 0; hh < nh; hh++)
                for (int a = f * h * w; a < (f + 1) * h * w; a++) {
                    const double *q = qkv + (size_t)a * 3 * Hv + hh * hd;
                    double mx = -INFINITY, sum = 0;
                    for (int bb = f * h * w; bb < (f + 1) * h * w; bb++) {
                        const double *k = qkv + (size_t)bb * 3 * Hv + Hv + hh * hd;
                        double s = 0;
                        for (int c = 0; c < hd; c++) s += q[c] * k[c];
                        sc[bb] = s / sqrt((double)hd);
                        mx = sc[bb] > mx ? sc[bb] : mx;
                    }
                    for (int bb = f * h * w; bb < (f + 1) * h * w; bb++)
                        sum += (sc[bb] = exp(sc[bb] - mx));
                    for (int c = 0; c < hd; c++) {
                        double o = 0;
                        for (int bb = f * h * w; bb < (f + 1) * h * w; bb++)
                            o += sc[bb] / sum * qkv[(size_t)bb * 3 * Hv + 2 * Hv + hh * hd + c];
                        att[(size_t)a * Hv + hh * hd + c] = o;
                    }
                }
        for (int r = 0; r < N; r++) {
            double *xr = x + (size_t)r * Hv;
            ref_linear(att + (size_t)r * Hv, Hv, b->proj_w, b->proj_b, Hv, tmp);
            for (int c = 0; c < Hv; c++) xr[c] += tmp[c];
            ref_layernorm(xr, Hv, b->norm2_w, b->norm2_b, xn + (size_t)r * Hv);
            ref_linear(xn + (size_t)r * Hv, Hv, b->fc1_w, b->fc1_b, Iv, tmp);
            for (int c = 0; c < Iv; c++) {
                double u = tmp[c];
                tmp[c] = 0.5 * u * (1.0 + tanh(sqrt(2.0 / M_PI) * (u + 0.044715 * u * u * u)));
            }
            double o2[512];
            ref_linear(tmp, Iv, b->fc2_w, b->fc2_b, Hv, o2);
            for (int c = 0; c < Hv; c++) xr[c] += o2[c];
        }
        int k = -1;
        for (int q = 0; q < v->cfg.n_deepstack && k < 0; q++)
            if (v->cfg.deepstack_visual_indexes[q] == l) k = q; /* list.index(layer_num) */
        if (k >= 0) ref_merger(v, &v->ds_mergers[k], x, NT, res + (size_t)(1 + feat++) * NT * Ho);
    }
    ref_merger(v, &v->merger, x, NT, res);
    free(x), free(row), free(pe), free(prow), free(pcol), free(cs), free(sn), free(xn), free(qkv);
    free(att), free(tmp), free(sc);
    return res;
}

/* max |a - b| / (max |b| over the tensor): a relative error that ignores near-zero elements. */
static double rel_to_max(const float *a, const double *b, size_t n) {
    double mx = 0, d = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(b[i]));
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d / mx;
}

/* The same for two float tensors: max |a - b| / max |b|. */
static double rel_to_max_f(const float *a, const float *b, size_t n) {
    double mx = 0, d = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs((double)b[i]));
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d / mx;
}

static void run(const twn_vision *v, const twn_vision_image *im, int n, twn_vision_out *o) {
    twn_err e;
    if (twn_vision_forward(v, im, n, NULL, NULL, o, &e)) fail_msg("%s", e.msg);
}

// ------------------------------------------------------------------------------------------------
// Kernels

static void test_vexp_and_gelu(void **st) {
    double worst = 0;
    for (float x = -80.f; x <= 80.f; x += 0.0137f)
        worst = fmax(worst, fabs((double)twn_vexpf(x) - exp((double)x)) / exp((double)x));
    assert_true(worst < 4e-7); /* ~3 ulp */
    enum { n = 4001 };
    float *a = twn_malloc(sizeof(float) * n), *b = twn_malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) a[i] = b[i] = -12.f + 24.f * (float)i / (n - 1);
    float *in = twn_malloc(sizeof(float) * n);
    memcpy(in, a, sizeof(float) * n);
    twn_cpu_gelu_tanh(a, n);
    twn_cpu_gelu_erf(b, n);
    double et = 0, ee = 0;
    for (int i = 0; i < n; i++) {
        double x = in[i];
        double gt = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
        double ge = 0.5 * x * (1 + erf(x / sqrt(2.0)));
        et = fmax(et, fabs(a[i] - gt) / fmax(fabs(gt), 1e-3));
        /* torch's own float formula loses 1 + erf(x) to cancellation for x < -3; so does this
         * one, by design: compare those tails in absolute terms */
        ee = fmax(ee, fabs(b[i] - ge) / fmax(fabs(ge), 1.0));
    }
    assert_true(et < 2e-6);
    assert_true(ee < 2e-6);
    /* gelu_tanh(1) and gelu(1): 0.841191990607..., 0.841344746068... */
    float one[2] = {1.f, 1.f};
    twn_cpu_gelu_tanh(one, 1);
    twn_cpu_gelu_erf(one + 1, 1);
    assert_true(fabsf(one[0] - 0.8411920f) < 1e-6f);
    assert_true(fabsf(one[1] - 0.8413447f) < 1e-6f);
    twn_free(a);
    twn_free(b);
    twn_free(in);
}

static void test_layernorm(void **st) {
    float x[2][5] = {{1, 2, 3, 4, 5}, {-1, 0.5f, 0.5f, 2, 8}}, w[5] = {1, 2, 1, 0.5f, 1};
    float b[5] = {0, 0, 0.1f, 0, -1}, o[2][5];
    twn_cpu_layernorm(&o[0][0], &x[0][0], w, b, 2, 5, 5, 1e-6f);
    /* row 0: mean 3, var 2 -> (x - 3) / sqrt(2 + 1e-6) */
    double r = 1 / sqrt(2 + 1e-6);
    double want0[5] = {-2 * r, -1 * r * 2, 0.1, 0.5 * r, 2 * r - 1};
    for (int i = 0; i < 5; i++) assert_true(fabs(o[0][i] - want0[i]) < 1e-6);
    double xd[5], od[5];
    for (int i = 0; i < 5; i++) xd[i] = x[1][i];
    ref_layernorm(xd, 5, w, b, od);
    for (int i = 0; i < 5; i++) assert_true(fabs(o[1][i] - od[i]) < 1e-6);
}

/* Bidirectional attention over fused qkv rows vs a double-precision loop: a small segment, and
 * one long enough (5000 tokens) that the query rows are processed in blocks. */
static void test_attention_full(void **st) {
    const int ns[2] = {7, 5000}, nh = 2, D = 8, ld = 3 * nh * D;
    for (int c = 0; c < 2; c++) {
        const int n = ns[c];
        twn_rng g;
        twn_rng_seed(&g, 77 + c);
        float *qkv = twn_malloc(sizeof(float) * (size_t)n * ld);
        randn_into(&g, qkv, (size_t)n * ld, 0.f, 1.f);
        float *o = twn_malloc(sizeof(float) * (size_t)n * nh * D);
        assert_int_equal(twn_cpu_attention_full(qkv, ld, qkv + nh * D, ld, qkv + 2 * nh * D, ld, o,
                                                nh * D, n, nh, D, 0.35f),
                         0);
        const int check[6] = {0, 1, 3354, 3355, 3356, 4999};
        double *sc = malloc(sizeof(double) * n), worst = 0;
        for (int ci = 0; ci < 6; ci++) {
            const int t = c == 0 ? ci % n : check[ci];
            for (int h = 0; h < nh; h++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < n; j++) {
                    double d = 0;
                    for (int x = 0; x < D; x++)
                        d += (double)qkv[(size_t)t * ld + h * D + x] *
                             qkv[(size_t)j * ld + nh * D + h * D + x];
                    sc[j] = d * 0.35f;
                    mx = fmax(mx, sc[j]);
                }
                for (int j = 0; j < n; j++) sum += (sc[j] = exp(sc[j] - mx));
                for (int x = 0; x < D; x++) {
                    double want = 0;
                    for (int j = 0; j < n; j++)
                        want += sc[j] / sum * qkv[(size_t)j * ld + 2 * nh * D + h * D + x];
                    worst = fmax(worst, fabs(o[(size_t)t * nh * D + h * D + x] - want));
                }
            }
        }
        if (worst > 2e-5) fail_msg("n = %d: max abs err %g", n, worst);
        free(sc);
        twn_free(qkv);
        twn_free(o);
    }
}

// ------------------------------------------------------------------------------------------------
// Positions inside the tower

static void test_pos_interp(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 11);
    const int G = v->grid_side, Hv = v->Hv;
    /* identity-size grid: linspace(0, 7, 8) is 0..7 exactly, so every row is the table's own */
    float *o = twn_malloc(sizeof(float) * G * G * Hv);
    twn_vision_pos_interp(v, G, G, o);
    assert_memory_equal(o, v->pos_embed, sizeof(float) * G * G * Hv);
    /* 3 x 2 grid of an 8 x 8 table: rows at 0, 3.5, 7 and columns at 0, 7 */
    twn_vision_pos_interp(v, 3, 2, o);
    const float *E = v->pos_embed;
    for (int c2 = 0; c2 < Hv; c2++) {
        assert_true(o[0 * Hv + c2] == E[0 * Hv + c2]);
        assert_true(o[1 * Hv + c2] == E[7 * Hv + c2]);
        float mid = 0.5f * E[(3 * G + 0) * Hv + c2] + 0.5f * E[(4 * G + 0) * Hv + c2];
        assert_true(fabsf(o[2 * Hv + c2] - mid) <= 1e-6f * fmaxf(1.f, fabsf(mid)));
        assert_true(o[5 * Hv + c2] == E[(7 * G + 7) * Hv + c2]);
    }
    /* any grid vs the literal double version */
    float *p = twn_malloc(sizeof(float) * 6 * 10 * Hv);
    twn_vision_pos_interp(v, 6, 10, p);
    double worst = 0;
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 10; j++) {
            float hs = ref_linspace(6, 7.f, i), ws = ref_linspace(10, 7.f, j);
            int hf = (int)hs, wf = (int)ws, hc = hf + 1 > 7 ? 7 : hf + 1,
                wc = wf + 1 > 7 ? 7 : wf + 1;
            double dh = hs - hf, dw = ws - wf;
            for (int c2 = 0; c2 < Hv; c2++) {
                double want = E[(hf * G + wf) * Hv + c2] * (1 - dh) * (1 - dw) +
                              E[(hf * G + wc) * Hv + c2] * (1 - dh) * dw +
                              E[(hc * G + wf) * Hv + c2] * dh * (1 - dw) +
                              E[(hc * G + wc) * Hv + c2] * dh * dw;
                worst = fmax(worst, fabs(p[(i * 10 + j) * Hv + c2] - want));
            }
        }
    assert_true(worst < 1e-6);
    twn_free(o);
    twn_free(p);
    twn_vision_free(v);
}

static void test_rot_coords(void **st) {
    /* a 4 x 4 patch grid in merge-block order: block (0,0), (0,1), (1,0), (1,1), each 2 x 2 */
    int32_t r[16], c[16];
    twn_vision_rot_coords(1, 4, 4, 2, r, c);
    const int32_t want_r[16] = {0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3};
    const int32_t want_c[16] = {0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3};
    assert_memory_equal(r, want_r, sizeof r);
    assert_memory_equal(c, want_c, sizeof c);
    /* two frames of 2 x 4 repeat the frame's coordinates */
    int32_t r2[16], c2[16];
    twn_vision_rot_coords(2, 2, 4, 2, r2, c2);
    const int32_t wr2[8] = {0, 0, 1, 1, 0, 0, 1, 1}, wc2[8] = {0, 1, 0, 1, 2, 3, 2, 3};
    assert_memory_equal(r2, wr2, sizeof wr2);
    assert_memory_equal(r2 + 8, wr2, sizeof wr2);
    assert_memory_equal(c2 + 8, wc2, sizeof wc2);
}

// ------------------------------------------------------------------------------------------------
// The tower

static void test_tower_matches_literal_reference(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 3);
    assert_int_equal(v->n_features, 2);
    assert_int_equal(v->feat_block[0], 0);
    assert_int_equal(v->feat_merger[0], 1);
    assert_int_equal(v->feat_block[1], 2);
    assert_int_equal(v->feat_merger[1], 0);
    const int grids[3][3] = {{1, 4, 6}, {1, 6, 2}, {2, 4, 4}};
    for (int g = 0; g < 3; g++) {
        int t = grids[g][0], h = grids[g][1], w = grids[g][2];
        float *pix = make_pixels(v, t, h, w, 100 + g);
        twn_vision_image im = {pix, t, h, w};
        twn_vision_out o;
        run(v, &im, 1, &o);
        int NT = t * h * w / 4;
        assert_int_equal(o.n_tokens, NT);
        assert_int_equal(o.n_features, 2);
        assert_int_equal(o.dim, 24);
        double *ref = ref_forward(v, pix, t, h, w);
        double e0 = rel_to_max(o.embeds, ref, (size_t)NT * 24);
        double e1 = rel_to_max(o.deepstack, ref + NT * 24, (size_t)NT * 24);
        double e2 = rel_to_max(o.deepstack + NT * 24, ref + 2 * NT * 24, (size_t)NT * 24);
        if (e0 > 1e-5 || e1 > 1e-5 || e2 > 1e-5)
            fail_msg("grid %dx%dx%d: rel err embeds %g, deepstack %g %g", t, h, w, e0, e1, e2);
        free(ref);
        twn_free(pix);
        twn_vision_out_free(&o);
    }
    twn_vision_free(v);
}

#define NIMG 4
static const int batch_grids[NIMG][3] = {{1, 4, 6}, {1, 8, 4}, {1, 2, 2}, {2, 4, 4}};

static void test_batch_equals_alone(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 5);
    float *pix[NIMG];
    twn_vision_image im[NIMG];
    for (int i = 0; i < NIMG; i++) {
        pix[i] = make_pixels(v, batch_grids[i][0], batch_grids[i][1], batch_grids[i][2], 20 + i);
        im[i] = (twn_vision_image){pix[i], batch_grids[i][0], batch_grids[i][1], batch_grids[i][2]};
    }
    twn_vision_out all;
    run(v, im, NIMG, &all);
    const int64_t want_off[NIMG + 1] = {0, 6, 14, 15, 23};
    assert_memory_equal(all.offsets, want_off, sizeof want_off);
    assert_int_equal(all.n_tokens, 23);
    for (int i = 0; i < NIMG; i++) {
        twn_vision_out one;
        run(v, &im[i], 1, &one);
        size_t n = (size_t)one.n_tokens * 24;
        assert_int_equal(one.n_tokens, want_off[i + 1] - want_off[i]);
        double e = rel_to_max_f(all.embeds + want_off[i] * 24, one.embeds, n);
        for (int f = 0; f < 2; f++)
            e = fmax(e, rel_to_max_f(all.deepstack + ((size_t)f * 23 + want_off[i]) * 24,
                                     one.deepstack + (size_t)f * n, n));
        print_message("image %d (%dx%dx%d): batch vs alone %.3g of max |x|\n", i, batch_grids[i][0],
                      batch_grids[i][1], batch_grids[i][2], e);
        if (e > 2e-6) fail_msg("image %d: batch vs alone rel err %g", i, e);
        twn_vision_out_free(&one);
    }
    /* order inside the batch: (3, 0, 2, 1) gives the same per-image outputs */
    const int perm[NIMG] = {3, 0, 2, 1};
    twn_vision_image pim[NIMG];
    for (int i = 0; i < NIMG; i++) pim[i] = im[perm[i]];
    twn_vision_out po;
    run(v, pim, NIMG, &po);
    for (int i = 0; i < NIMG; i++) {
        int s = perm[i];
        size_t n = (size_t)(want_off[s + 1] - want_off[s]) * 24;
        assert_int_equal(po.offsets[i + 1] - po.offsets[i], want_off[s + 1] - want_off[s]);
        double e = rel_to_max_f(po.embeds + po.offsets[i] * 24, all.embeds + want_off[s] * 24, n);
        for (int f = 0; f < 2; f++)
            e = fmax(e, rel_to_max_f(po.deepstack + ((size_t)f * 23 + po.offsets[i]) * 24,
                                     all.deepstack + ((size_t)f * 23 + want_off[s]) * 24, n));
        print_message("permuted slot %d (image %d): %.3g of max |x|\n", i, s, e);
        if (e > 2e-6) fail_msg("permuted slot %d: rel err %g", i, e);
    }
    twn_vision_out_free(&po);
    twn_vision_out_free(&all);
    for (int i = 0; i < NIMG; i++) twn_free(pix[i]);
    twn_vision_free(v);
}

/* Changing image B changes B's outputs and not one bit of A's (attention is per image; every
 * other op is per row or per 2x2 block). */
static void test_block_diagonal(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 9);
    float *a = make_pixels(v, 1, 4, 4, 1), *b1 = make_pixels(v, 1, 6, 4, 2);
    float *b2 = make_pixels(v, 1, 6, 4, 3);
    twn_vision_image x[2] = {{a, 1, 4, 4}, {b1, 1, 6, 4}}, y[2] = {{a, 1, 4, 4}, {b2, 1, 6, 4}};
    twn_vision_out ox, oy;
    run(v, x, 2, &ox);
    run(v, y, 2, &oy);
    assert_memory_equal(ox.embeds, oy.embeds, sizeof(float) * 4 * 24);
    for (int f = 0; f < 2; f++)
        assert_memory_equal(ox.deepstack + (size_t)f * 10 * 24, oy.deepstack + (size_t)f * 10 * 24,
                            sizeof(float) * 4 * 24);
    assert_true(tu_max_abs(ox.embeds + 4 * 24, oy.embeds + 4 * 24, 6 * 24) > 1e-2);
    twn_vision_out_free(&ox);
    twn_vision_out_free(&oy);
    twn_free(a), twn_free(b1), twn_free(b2);
    twn_vision_free(v);
}

static void test_bad_grid(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 1);
    float *p = make_pixels(v, 1, 4, 4, 1);
    twn_vision_image im[2] = {{p, 1, 4, 4}, {p, 1, 3, 4}};
    twn_vision_out o;
    twn_err e;
    assert_int_equal(twn_vision_forward(v, im, 2, NULL, NULL, &o, &e), -1);
    assert_string_equal(e.msg, "image 1: grid (t 1, h 3, w 4) must be positive with h and w "
                               "multiples of spatial_merge_size 2");
    assert_null(o.embeds);
    twn_free(p);
    twn_vision_free(v);
}

// ------------------------------------------------------------------------------------------------
// Loading

static void add_t(twn_st_writer *w, const char *skip, twn_dtype dt, const char *name,
                  const float *p, int nd, const int64_t *shape) {
    twn_err e;
    if (skip && !strcmp(skip, name)) return;
    if (twn_st_writer_add_f32(w, name, dt, nd, shape, p, &e)) fail_msg("%s", e.msg);
}

/* A config.json for a vision model of the small tower, text part as small as allowed. */
static void write_model(const char *dir, twn_vision *v, twn_dtype dt, const char *skip) {
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    const char *cfg =
        "{\"model_type\": \"qwen3_vl\", \"image_token_id\": 5, \"video_token_id\": 6,"
        " \"vision_start_token_id\": 7, \"vision_end_token_id\": 8, \"tie_word_embeddings\": true,"
        " \"text_config\": {\"vocab_size\": 16, \"hidden_size\": 24, \"intermediate_size\": 32,"
        "  \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"num_key_value_heads\": 1,"
        "  \"head_dim\": 12, \"max_position_embeddings\": 128, \"rms_norm_eps\": 1e-6,"
        "  \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 10000.0,"
        "   \"mrope_section\": [2, 2, 2], \"mrope_interleaved\": true}},"
        " \"vision_config\": {\"depth\": 3, \"hidden_size\": 32, \"intermediate_size\": 48,"
        "  \"num_heads\": 2, \"in_channels\": 3, \"patch_size\": 2, \"temporal_patch_size\": 2,"
        "  \"spatial_merge_size\": 2, \"out_hidden_size\": 24, \"num_position_embeddings\": 64,"
        "  \"deepstack_visual_indexes\": [2, 0], \"hidden_act\": \"gelu_pytorch_tanh\"}}";
    tu_write(path, cfg, strlen(cfg));
    /* the tensors, through the same names the loader reads */
    twn_st_writer *w = twn_st_writer_new();
    const int Hv = 32, Iv = 48, M = 128, Ho = 24;
    add_t(w, skip, dt, "model.visual.patch_embed.proj.weight", v->patch_w, 5,
          (const int64_t[]){Hv, 3, 2, 2, 2});
    add_t(w, skip, dt, "model.visual.patch_embed.proj.bias", v->patch_b, 1, (const int64_t[]){Hv});
    add_t(w, skip, dt, "model.visual.pos_embed.weight", v->pos_embed, 2, (const int64_t[]){64, Hv});
    char nm[256];
#define ADD(sfx, ptr, nd, ...)                                                                     \
    do {                                                                                           \
        snprintf(nm, sizeof nm, "%s%s", p, sfx);                                                   \
        add_t(w, skip, dt, nm, ptr, nd, (const int64_t[]){__VA_ARGS__});                           \
    } while (0)
    for (int i = 0; i < 3; i++) {
        twn_vision_block *b = &v->blocks[i];
        char p[64];
        snprintf(p, sizeof p, "model.visual.blocks.%d", i);
        ADD(".norm1.weight", b->norm1_w, 1, Hv);
        ADD(".norm1.bias", b->norm1_b, 1, Hv);
        ADD(".attn.qkv.weight", b->qkv_w, 2, 3 * Hv, Hv);
        ADD(".attn.qkv.bias", b->qkv_b, 1, 3 * Hv);
        ADD(".attn.proj.weight", b->proj_w, 2, Hv, Hv);
        ADD(".attn.proj.bias", b->proj_b, 1, Hv);
        ADD(".norm2.weight", b->norm2_w, 1, Hv);
        ADD(".norm2.bias", b->norm2_b, 1, Hv);
        ADD(".mlp.linear_fc1.weight", b->fc1_w, 2, Iv, Hv);
        ADD(".mlp.linear_fc1.bias", b->fc1_b, 1, Iv);
        ADD(".mlp.linear_fc2.weight", b->fc2_w, 2, Hv, Iv);
        ADD(".mlp.linear_fc2.bias", b->fc2_b, 1, Hv);
    }
    for (int k = -1; k < 2; k++) {
        twn_vision_merger *m = k < 0 ? &v->merger : &v->ds_mergers[k];
        char p[64];
        if (k < 0)
            snprintf(p, sizeof p, "model.visual.merger");
        else
            snprintf(p, sizeof p, "model.visual.deepstack_merger_list.%d", k);
        ADD(".norm.weight", m->norm_w, 1, k < 0 ? Hv : M);
        ADD(".norm.bias", m->norm_b, 1, k < 0 ? Hv : M);
        ADD(".linear_fc1.weight", m->fc1_w, 2, M, M);
        ADD(".linear_fc1.bias", m->fc1_b, 1, M);
        ADD(".linear_fc2.weight", m->fc2_w, 2, Ho, M);
        ADD(".linear_fc2.bias", m->fc2_b, 1, Ho);
    }
#undef ADD
    twn_err e;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (twn_st_writer_write(w, path, &e)) fail_msg("%s", e.msg);
    twn_st_writer_free(w);
}

static void test_load(void **st) {
    twn_vision_config c = small_cfg();
    twn_vision *v = make_tower(&c, 21);
    const char *dir = tu_tmpdir("vision-load");
    write_model(dir, v, TWN_DT_F32, NULL);
    twn_vision *l = NULL;
    twn_err e;
    if (twn_vision_load(dir, &l, &e)) fail_msg("%s", e.msg);
    assert_int_equal(l->n_params, v->n_params);
    assert_memory_equal(l->patch_w, v->patch_w, sizeof(float) * 32 * 24);
    assert_memory_equal(l->blocks[2].fc2_w, v->blocks[2].fc2_w, sizeof(float) * 32 * 48);
    assert_memory_equal(l->ds_mergers[1].norm_w, v->ds_mergers[1].norm_w, sizeof(float) * 128);
    twn_vision_free(l);
    /* bf16 on disk: upcast, each value the bf16 rounding of the original */
    write_model(dir, v, TWN_DT_BF16, NULL);
    if (twn_vision_load(dir, &l, &e)) fail_msg("%s", e.msg);
    for (int i = 0; i < 32 * 48; i++)
        assert_true(l->blocks[1].fc1_w[i] ==
                    twn_bf16_to_f32(twn_f32_to_bf16(v->blocks[1].fc1_w[i])));
    twn_vision_free(l);
    /* a missing tensor is refused by name */
    write_model(dir, v, TWN_DT_F32, "model.visual.blocks.1.norm2.bias");
    assert_int_equal(twn_vision_load(dir, &l, &e), -1);
    char want[1200];
    snprintf(want, sizeof want,
             "loading the vision tower of %s: tensor model.visual.blocks.1.norm2.bias is missing "
             "from the checkpoint",
             dir);
    assert_string_equal(e.msg, want);
    assert_null(l);
    twn_vision_free(v);
}

/* The tiny checkpoint `twn mkmodel` writes loads, has the parameter count the plan promises, and
 * runs. */
static void test_load_mkmodel_tiny(void **st) {
    const char *dir = tu_tiny_model();
    char base[1100];
    snprintf(base, sizeof base, "%s/base", dir);
    twn_vision *v = NULL;
    twn_err e;
    if (twn_vision_load(base, &v, &e)) fail_msg("%s", e.msg);
    twn_mkmodel_stats s;
    assert_int_equal(twn_mkmodel_plan("tiny", TWN_DT_BF16, &s, &e), 0);
    assert_int_equal(v->n_params, s.vision_params);
    assert_int_equal(v->patch_dim, 1536);
    assert_int_equal(v->grid_side, 48);
    float *pix = make_pixels(v, 1, 4, 6, 7);
    twn_vision_image im = {pix, 1, 4, 6};
    twn_vision_out o;
    run(v, &im, 1, &o);
    assert_int_equal(o.n_tokens, 6);
    assert_int_equal(o.dim, 64);
    double *ref = ref_forward(v, pix, 1, 4, 6);
    assert_true(rel_to_max(o.embeds, ref, 6 * 64) < 1e-5);
    assert_true(rel_to_max(o.deepstack + 6 * 64, ref + 2 * 6 * 64, 6 * 64) < 1e-5);
    free(ref);
    twn_vision_out_free(&o);
    twn_free(pix);
    twn_vision_free(v);
}

// ------------------------------------------------------------------------------------------------
// get_rope_index

enum { IMG = 151655, VS = 151652, VE = 151653 };

static void test_mrope_tables(void **st) {
    twn_err e;
    /* text, one image of grid (1, 4, 6) = 2 x 3 merged tokens, text */
    {
        const int32_t ids[11] = {10, 11, VS, IMG, IMG, IMG, IMG, IMG, IMG, VE, 12};
        const twn_grid g[1] = {{1, 4, 6}};
        int32_t pos[33], next = -1;
        assert_int_equal(twn_mrope_positions(ids, 11, IMG, g, 1, 2, 0, pos, &next, &e), 0);
        const int32_t want[33] = {0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7,  /* T */
                                  0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7,  /* H */
                                  0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7}; /* W */
        assert_memory_equal(pos, want, sizeof want);
        assert_int_equal(next, 8);
    }
    /* two adjacent images (1,4,4) and (1,2,4), then two query rows, from position 5 */
    {
        const int32_t ids[10] = {
            VS, IMG, IMG, IMG, IMG, IMG, IMG, VE, TWN_TOKEN_EMBED, TWN_TOKEN_EMBED};
        const twn_grid g[2] = {{1, 4, 4}, {1, 2, 4}};
        int32_t pos[30], next = -1;
        assert_int_equal(twn_mrope_positions(ids, 10, IMG, g, 2, 2, 5, pos, &next, &e), 0);
        const int32_t want[30] = {5, 6, 6, 6, 6, 8, 8, 10, 11, 12,  /* T */
                                  5, 6, 6, 7, 7, 8, 8, 10, 11, 12,  /* H */
                                  5, 6, 7, 6, 7, 8, 9, 10, 11, 12}; /* W */
        assert_memory_equal(pos, want, sizeof want);
        assert_int_equal(next, 13);
    }
    /* a two-frame clip (2, 2, 2): one merged token per frame, T steps, next = p + 2 */
    {
        const int32_t ids[4] = {1, IMG, IMG, 2};
        const twn_grid g[1] = {{2, 2, 2}};
        int32_t pos[12], next = -1;
        assert_int_equal(twn_mrope_positions(ids, 4, IMG, g, 1, 2, 0, pos, &next, &e), 0);
        const int32_t want[12] = {0, 1, 2, 3, 0, 1, 1, 3, 0, 1, 1, 3};
        assert_memory_equal(pos, want, sizeof want);
        assert_int_equal(next, 4);
    }
    /* errors */
    const int32_t ids[5] = {1, IMG, IMG, IMG, 2};
    int32_t pos[15], next;
    const twn_grid g4[1] = {{1, 4, 4}}, g2[2] = {{1, 2, 2}, {1, 2, 2}}, g3[1] = {{1, 3, 4}};
    assert_int_equal(twn_mrope_positions(ids, 5, IMG, g4, 1, 2, 0, pos, &next, &e), -1);
    assert_string_equal(e.msg, "image 0 at row 1: 3 consecutive image tokens, expected 4 for grid "
                               "(t 1, h 4, w 4)");
    assert_int_equal(twn_mrope_positions(ids, 5, IMG, g2, 2, 2, 0, pos, &next, &e), -1);
    assert_string_equal(e.msg, "image 1 at row 2: 2 consecutive image tokens, expected 1 for grid "
                               "(t 1, h 2, w 2)");
    assert_int_equal(twn_mrope_positions(ids, 5, IMG, g3, 1, 2, 0, pos, &next, &e), -1);
    assert_string_equal(e.msg, "image 0: grid (t 1, h 3, w 4) is not positive with h and w "
                               "multiples of the merge size 2");
    const int32_t txt[2] = {1, 2};
    assert_int_equal(twn_mrope_positions(txt, 2, IMG, g4, 1, 2, 0, pos, &next, &e), -1);
    assert_string_equal(e.msg, "1 image grid(s) given but the ids hold 0 image(s)");
}

static void test_mrope_expand(void **st) {
    const int32_t ids[5] = {1, IMG, 2, IMG, 3};
    const int64_t counts[2] = {3, 1};
    twn_ivec out = {0};
    twn_err e;
    assert_int_equal(twn_mrope_expand(ids, 5, IMG, counts, 2, &out, &e), 0);
    const int32_t want[7] = {1, IMG, IMG, IMG, 2, IMG, 3};
    assert_int_equal(out.n, 7);
    assert_memory_equal(out.v, want, sizeof want);
    out.n = 0;
    assert_int_equal(twn_mrope_expand(ids, 5, IMG, counts, 1, &out, &e), -1);
    assert_string_equal(e.msg,
                        "the prompt has 2 image token(s) (id 151655) but the item has 1 image(s)");
    twn_ivec_free(&out);
}

// ------------------------------------------------------------------------------------------------
// DeepStack in the decoder

enum { LH = 32, LI = 48, LNH = 4, LNKV = 2, LD = 8, LV = 50, LL = 2 };

static twn_lm *make_lm(uint64_t seed) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    twn_lm *lm = twn_calloc(1, sizeof *lm);
    lm->H = LH, lm->I = LI, lm->nh = LNH, lm->nkv = LNKV, lm->D = LD, lm->V = LV, lm->L = LL;
    lm->cfg.rms_norm_eps = 1e-6;
    lm->embed = twn_malloc(sizeof(float) * LV * LH);
    randn_into(&g, lm->embed, (size_t)LV * LH, 0.f, 1.f);
    lm->lm_head = twn_malloc(sizeof(float) * LV * LH);
    randn_into(&g, lm->lm_head, (size_t)LV * LH, 0.f, 0.2f);
    lm->final_norm = twn_malloc(sizeof(float) * LH);
    randn_into(&g, lm->final_norm, LH, 1.f, 0.1f);
    lm->layers = twn_calloc(LL, sizeof *lm->layers);
    const int sh[TWN_NPROJ][2] = {{LNH * LD, LH}, {LNKV * LD, LH}, {LNKV * LD, LH}, {LH, LNH * LD},
                                  {LI, LH},       {LI, LH},        {LH, LI}};
    for (int l = 0; l < LL; l++) {
        twn_lm_layer *ly = &lm->layers[l];
        float **norms[4] = {&ly->in_norm, &ly->post_norm, &ly->q_norm, &ly->k_norm};
        for (int k = 0; k < 4; k++) {
            int n = k < 2 ? LH : LD;
            *norms[k] = twn_malloc(sizeof(float) * n);
            randn_into(&g, *norms[k], n, 1.f, 0.1f);
        }
        for (int j = 0; j < TWN_NPROJ; j++) {
            ly->w[j] = twn_malloc(sizeof(float) * sh[j][0] * sh[j][1]);
            randn_into(&g, ly->w[j], (size_t)sh[j][0] * sh[j][1], 0.f,
                       1.f / sqrtf((float)sh[j][1]));
        }
    }
    lm->inv_freq = twn_malloc(sizeof(float) * LD / 2);
    lm->rope_stream = twn_malloc(LD / 2);
    for (int j = 0; j < LD / 2; j++) {
        lm->inv_freq[j] = 1.0f / powf(10000.f, (float)(2 * j) / LD);
        lm->rope_stream[j] = (uint8_t)(j % 3); /* sections [2, 1, 1]: T H W T */
    }
    lm->rope_stream[3] = 0;
    return lm;
}

typedef struct {
    float *h[LL]; /* [n, LH] per layer, sequence 0 */
} trace_buf;

static void trace_fn(void *ctx, int seq, int layer, const float *h, int n, int H) {
    trace_buf *t = ctx;
    if (seq == 0) memcpy(t->h[layer], h, sizeof(float) * (size_t)n * H);
}

/* Prefill of n rows: ids with rows 3..6 taken from embeds (image features), explicit positions;
 * returns final hidden rows, layer traces and the KV cache. */
static void prefill(const twn_lm *lm, const int32_t *ids, const float *emb, const int32_t *pos,
                    int n, const twn_lm_deepstack *ds, twn_kv *kv, float *hid, trace_buf *tb,
                    float *logits) {
    twn_kv_init(kv, lm);
    twn_lm_seq s = {.kv = kv,
                    .n = n,
                    .ids = ids,
                    .embeds = emb,
                    .pos = pos,
                    .adapter = TWN_NO_ADAPTER,
                    .hidden = hid,
                    .logits = logits,
                    .deepstack = ds};
    twn_err e;
    if (twn_lm_forward(lm, &s, 1, tb ? trace_fn : NULL, tb, &e)) fail_msg("%s", e.msg);
}

static void test_deepstack_injection(void **st) {
    twn_lm *lm = make_lm(17);
    enum { n = 10, nr = 4 };
    /* text 0..2, 4 image rows (a 2 x 2 image), text 7..9 */
    int32_t ids[n + 1] = {
        1, 2, 3, TWN_TOKEN_EMBED, TWN_TOKEN_EMBED, TWN_TOKEN_EMBED, TWN_TOKEN_EMBED, 4, 5, 6, 7};
    const twn_grid grid = {1, 4, 4};
    int32_t pos[3 * n], next;
    twn_err e;
    assert_int_equal(twn_mrope_positions(ids, n, TWN_TOKEN_EMBED, &grid, 1, 2, 0, pos, &next, &e),
                     0);
    assert_int_equal(next, 8); /* 3 text, image at 3 spanning max(1, 2, 2) = 2, 3 text */
    twn_rng g;
    twn_rng_seed(&g, 5);
    float *emb = twn_calloc((size_t)(n + 1) * LH, sizeof(float));
    randn_into(&g, emb + 3 * LH, (size_t)nr * LH, 0.f, 1.f);
    float *feat = twn_malloc(sizeof(float) * LL * nr * LH);
    randn_into(&g, feat, (size_t)LL * nr * LH, 0.f, 1.f);
    const int32_t rows[nr] = {3, 4, 5, 6};
    twn_lm_deepstack ds = {.n_layers = LL, .n_rows = nr, .rows = rows, .feat = feat};

    twn_kv k0, k1;
    float h0[n * LH], h1[n * LH], lg1[LV];
    trace_buf t0, t1;
    for (int l = 0; l < LL; l++) {
        t0.h[l] = twn_malloc(sizeof(float) * n * LH);
        t1.h[l] = twn_malloc(sizeof(float) * n * LH);
    }
    prefill(lm, ids, emb, pos, n, NULL, &k0, h0, &t0, NULL);
    prefill(lm, ids, emb, pos, n, &ds, &k1, h1, &t1, lg1);
    assert_int_equal(k1.next_pos, 8);
    /* layer 0's output is traced before its features are added: identical */
    assert_memory_equal(t0.h[0], t1.h[0], sizeof(float) * n * LH);
    /* layer 1: rows before the image are untouched (causal), image and later rows are not */
    assert_memory_equal(t0.h[1], t1.h[1], sizeof(float) * 3 * LH);
    assert_true(tu_max_abs(t0.h[1] + 3 * LH, t1.h[1] + 3 * LH, (size_t)(n - 3) * LH) > 1e-3);
    /* after the last layer: final hidden = RMSNorm(layer output + feature at image rows only) */
    for (int r = 0; r < n; r++) {
        float x[LH], o[LH];
        for (int c = 0; c < LH; c++)
            x[c] = t1.h[LL - 1][r * LH + c] +
                   (r >= 3 && r < 7 ? feat[((size_t)(LL - 1) * nr + (r - 3)) * LH + c] : 0.f);
        twn_cpu_rmsnorm(o, x, lm->final_norm, 1, LH, LH, 1e-6f);
        assert_true(tu_max_rel(h1 + r * LH, o, LH, 1e-3) < 1e-6);
    }
    /* prefill only: a decode step without features on top of the prefill equals one prefill of
     * all 11 rows with the same features (decode position = next_pos = 8, the rope delta) */
    float lgd[LV];
    twn_lm_seq d = {.kv = &k1, .n = 1, .ids = &ids[n], .adapter = TWN_NO_ADAPTER, .logits = lgd};
    ids[n] = 9;
    assert_int_equal(twn_lm_forward(lm, &d, 1, NULL, NULL, &e), 0);
    assert_int_equal(k1.next_pos, 9);
    int32_t pos2[3 * (n + 1)];
    for (int s = 0; s < 3; s++) {
        memcpy(pos2 + s * (n + 1), pos + s * n, sizeof(int32_t) * n);
        pos2[s * (n + 1) + n] = 8;
    }
    twn_kv k2;
    float lg2[LV];
    prefill(lm, ids, emb, pos2, n + 1, &ds, &k2, NULL, NULL, lg2);
    assert_true(tu_max_rel(lgd, lg2, LV, 1e-2) < 1e-5);
    /* and a decode step that wrongly re-adds features would differ: a row index outside the
     * step is refused */
    twn_lm_seq bad = d;
    bad.deepstack = &ds;
    assert_int_equal(twn_lm_forward(lm, &bad, 1, NULL, NULL, &e), -1);
    assert_string_equal(e.msg, "sequence 0: DeepStack row 3 is outside the step's 1 row(s)");
    twn_kv_free(&k0);
    twn_kv_free(&k1);
    twn_kv_free(&k2);
    for (int l = 0; l < LL; l++) twn_free(t0.h[l]), twn_free(t1.h[l]);
    twn_free(emb);
    twn_free(feat);
    twn_lm_free(lm);
}

// ------------------------------------------------------------------------------------------------
// TWN with images, end to end on the tiny checkpoint

#define PHOTOS TWN_SOURCE_DIR "/tests/data/images/"

static twn_model *load_tiny(void) {
    twn_model *m = NULL;
    twn_err e;
    if (twn_model_load(tu_tiny_model(), &m, &e)) fail_msg("%s", e.msg);
    assert_non_null(m->vision);
    assert_true(m->has_vision_weights);
    assert_int_equal(m->image_token_id, IMG);
    return m;
}

static void embed(const twn_model *m, const twn_item *it, int n, const char *mode,
                  int max_vision_patches, twn_result *res) {
    twn_opts o;
    twn_opts_default(&o);
    if (max_vision_patches) o.max_vision_patches = max_vision_patches;
    twn_err e;
    assert_int_equal(twn_mode_parse(mode, &o, &e), 0);
    if (twn_embed_items(m, it, n, &o, res, &e)) fail_msg("%s", e.msg);
}

/* The gate pass of one item rebuilt from the parts, as the spec describes it (mode never):
 * expanded ids, the tower's embeddings at the image rows, K queries, get_rope_index positions,
 * DeepStack at the image rows, query-mean pooling, L2 norm.  `mrope` / `deepstack` switch the
 * two image-specific pieces off for negative controls. */
static void gate_by_hand(const twn_model *m, const twn_item *it, bool mrope, bool deepstack,
                         float *out) {
    const int H = m->lm->H, K = m->K, ni = it->n_images;
    twn_err e;
    twn_image_patches p[4];
    twn_vision_image im[4];
    twn_grid g[4];
    int64_t counts[4];
    assert_true(ni <= 4);
    for (int j = 0; j < ni; j++) {
        if (twn_image_prepare_file(it->images[j], &m->image_cfg, &p[j], &e)) fail_msg("%s", e.msg);
        im[j] = (twn_vision_image){p[j].pixels, p[j].grid_t, p[j].grid_h, p[j].grid_w};
        g[j] = (twn_grid){p[j].grid_t, p[j].grid_h, p[j].grid_w};
        counts[j] = (int64_t)p[j].grid_t * p[j].grid_h * p[j].grid_w / 4;
    }
    twn_ivec raw = {0}, ids = {0};
    assert_int_equal(twn_render_ids(m, m->man.tpl_embed, it, &raw, &e), 0);
    assert_int_equal(twn_mrope_expand(raw.v, raw.n, IMG, counts, ni, &ids, &e), 0);
    twn_vision_out vo = {0};
    if (ni && twn_vision_forward(m->vision, im, ni, NULL, NULL, &vo, &e)) fail_msg("%s", e.msg);
    const int n = (int)ids.n, need = n + K;
    int32_t *sid = malloc(sizeof(int32_t) * need), *pos = malloc(sizeof(int32_t) * 3 * need);
    int32_t *rows = malloc(sizeof(int32_t) * need), *pt = malloc(sizeof(int32_t) * 3 * n), next;
    float *emb = calloc((size_t)need * H, sizeof(float));
    int nr = 0;
    for (int i = 0; i < n; i++) {
        sid[i] = ids.v[i];
        if (ids.v[i] == IMG) {
            sid[i] = TWN_TOKEN_EMBED;
            memcpy(emb + (size_t)i * H, vo.embeds + (size_t)nr * H, sizeof(float) * H);
            rows[nr++] = i;
        }
    }
    assert_int_equal(nr, vo.n_tokens);
    for (int q = 0; q < K; q++) {
        sid[n + q] = TWN_TOKEN_EMBED;
        memcpy(emb + (size_t)(n + q) * H, m->queries + (size_t)q * H, sizeof(float) * H);
    }
    assert_int_equal(twn_mrope_positions(ids.v, ids.n, IMG, g, ni, 2, 0, pt, &next, &e), 0);
    for (int s2 = 0; s2 < 3; s2++)
        for (int i = 0; i < need; i++)
            pos[s2 * need + i] = !mrope ? i : i < n ? pt[s2 * n + i] : next + (i - n);
    twn_lm_deepstack ds = {vo.n_features, nr, rows, vo.deepstack};
    twn_kv kv;
    twn_kv_init(&kv, m->lm);
    float *hid = malloc(sizeof(float) * (size_t)need * H);
    twn_lm_seq sq = {.kv = &kv,
                     .n = need,
                     .ids = sid,
                     .embeds = emb,
                     .pos = pos,
                     .adapter = m->emb_idx,
                     .hidden = hid,
                     .deepstack = deepstack && ni ? &ds : NULL};
    if (twn_lm_forward(m->lm, &sq, 1, NULL, NULL, &e)) fail_msg("%s", e.msg);
    memset(out, 0, sizeof(float) * H);
    for (int q = 0; q < K; q++)
        for (int c = 0; c < H; c++) out[c] += hid[(size_t)(n + q) * H + c];
    for (int c = 0; c < H; c++) out[c] /= (float)K;
    twn_cpu_l2_normalize(out, H, 1e-12f);
    twn_kv_free(&kv);
    free(sid), free(pos), free(rows), free(pt), free(emb), free(hid);
    twn_vision_out_free(&vo);
    twn_ivec_free(&raw);
    twn_ivec_free(&ids);
    for (int j = 0; j < ni; j++) twn_image_patches_free(&p[j]);
}

static const char *const img_a[1] = {PHOTOS "chelsea.png"};
static const char *const img_c[2] = {PHOTOS "rocket.jpg", PHOTOS "palette_color.png"};
static const char *const img_bad[1] = {PHOTOS "truncated.jpg"};

static void test_twn_images(void **st) {
    twn_model *m = load_tiny();
    assert_int_equal(m->man.pooling, TWN_POOL_QUERY_MEAN);
    const int H = m->lm->H;
    twn_item it[5] = {
        {.id = "img", .images = img_a, .n_images = 1},
        {.id = "txt", .text = "a cat on a mat"},
        {.id = "both", .text = "Describe this image.", .images = img_c, .n_images = 2},
        {.id = "bad", .text = "x", .images = img_bad, .n_images = 1},
        {.id = "img-again", .images = img_a, .n_images = 1},
    };
    twn_result r[5];
    embed(m, it, 5, "never", 0, r);
    assert_non_null(r[3].error);
    assert_non_null(strstr(r[3].error, "image: "));
    assert_non_null(strstr(r[3].error, "truncated.jpg"));
    assert_null(r[3].embedding);
    for (int i = 0; i < 5; i++)
        if (i != 3 && r[i].error) fail_msg("item %d: %s", i, r[i].error);
    /* the same image twice in one batch: the same embedding */
    assert_true(tu_max_abs(r[0].embedding, r[4].embedding, H) < 1e-6);
    /* image, text, image+text: distinct */
    assert_true(tu_max_abs(r[0].embedding, r[1].embedding, H) > 1e-2);
    assert_true(tu_max_abs(r[0].embedding, r[2].embedding, H) > 1e-2);
    /* the scheduler's gate pass == the pass built by hand from the parts */
    float byhand[256], other[256];
    for (int i = 0; i < 3; i++) {
        gate_by_hand(m, &it[i], true, true, byhand);
        double d = tu_max_abs(r[i].embedding, byhand, H);
        if (d > 2e-6) fail_msg("item %s: scheduler vs by hand %g", it[i].id, d);
    }
    /* ...and both image pieces matter: without M-RoPE or without DeepStack it differs */
    gate_by_hand(m, &it[2], false, true, other);
    assert_true(tu_max_abs(byhand, other, H) > 1e-4);
    gate_by_hand(m, &it[2], true, false, other);
    assert_true(tu_max_abs(byhand, other, H) > 1e-4);
    /* each item alone == in the batch; vision calls split by a small patch budget == one call */
    twn_result one, split[5];
    for (int i = 0; i < 5; i++) {
        if (i == 3) continue;
        embed(m, &it[i], 1, "never", 0, &one);
        assert_null(one.error);
        assert_true(tu_max_abs(one.embedding, r[i].embedding, H) < 2e-6);
        twn_result_free(&one);
    }
    embed(m, it, 5, "never", 600, split); /* 504 + 1296 (alone) + 504 patches */
    for (int i = 0; i < 5; i++)
        if (i != 3) assert_true(tu_max_abs(split[i].embedding, r[i].embedding, H) < 2e-6);
    for (int i = 0; i < 5; i++) twn_result_free(&r[i]), twn_result_free(&split[i]);
    twn_model_free(m);
}

/* The hard path with images: the CoT prompt and the embedding pass carry the images; decode
 * continues from the rope delta.  A batch of image, text and image+text items == each alone. */
static void test_twn_images_always(void **st) {
    twn_model *m = load_tiny();
    const int H = m->lm->H;
    twn_item it[3] = {
        {.id = "img", .images = img_a, .n_images = 1},
        {.id = "txt", .text = "a cat on a mat"},
        {.id = "both", .text = "Describe this image.", .images = img_c, .n_images = 2},
    };
    twn_result r[3], one;
    embed(m, it, 3, "always", 0, r);
    for (int i = 0; i < 3; i++) {
        if (r[i].error) fail_msg("item %d: %s", i, r[i].error);
        assert_true(r[i].hard);
        assert_true(r[i].think_tokens > 0);
        embed(m, &it[i], 1, "always", 0, &one);
        assert_int_equal(one.n_cot, r[i].n_cot);
        assert_memory_equal(one.cot_ids, r[i].cot_ids, sizeof(int32_t) * (size_t)r[i].n_cot);
        assert_true(tu_max_abs(one.embedding, r[i].embedding, H) < 2e-6);
        twn_result_free(&one);
    }
    for (int i = 0; i < 3; i++) twn_result_free(&r[i]);
    twn_model_free(m);
}

/* A text-only item whose text holds <|image_pad|> has an image token and no image: refused. */
static void test_twn_image_token_without_image(void **st) {
    twn_model *m = load_tiny();
    twn_item it = {.id = "liar", .text = "look: <|image_pad|>"};
    twn_result r;
    embed(m, &it, 1, "never", 0, &r);
    assert_non_null(r.error);
    assert_string_equal(r.error, "tokenizing the prompt: the prompt has 1 image token(s) (id "
                                 "151655) but the item has 0 image(s)");
    twn_result_free(&r);
    twn_model_free(m);
}

static float *read_npy_f32(const char *path, int *rows, int *cols) {
    size_t n;
    char *b = tu_read(path, &n);
    assert_true(n > 10 && !memcmp(b, "\x93NUMPY", 6));
    size_t hl = (size_t)(unsigned char)b[8] | (size_t)(unsigned char)b[9] << 8;
    assert_non_null(strstr(b + 10, "'<f4'"));
    const char *sh = strstr(b + 10, "'shape': (");
    assert_non_null(sh);
    assert_int_equal(sscanf(sh, "'shape': (%d, %d)", rows, cols), 2);
    float *f = malloc(n - 10 - hl + 1);
    memcpy(f, b + 10 + hl, n - 10 - hl);
    free(b);
    return f;
}

static int count_lines(const char *path) {
    char *s = tu_read(path, NULL);
    int n = 0;
    for (char *p = s; *p; p++) n += *p == '\n';
    free(s);
    return n;
}

/* `twn embed` on a JSONL with image paths relative to the file: image, text and image+text
 * items, a list of two images, an unreadable and a missing image dead-lettered, the rest goes
 * on. */
static void test_embed_cli_images(void **st) {
    const char *dir = tu_tmpdir("vision-cli");
    char cmd[4096], path[1200], *out = NULL;
    snprintf(cmd, sizeof cmd,
             "mkdir -p '%s/img' && cp " PHOTOS "chelsea.png " PHOTOS "rocket.jpg " PHOTOS
             "palette_color.png " PHOTOS "truncated.jpg '%s/img/'",
             dir, dir);
    assert_int_equal(system(cmd), 0);
    const char *jsonl =
        "{\"id\": \"img\", \"image\": \"img/chelsea.png\"}\n"
        "{\"id\": \"txt\", \"text\": \"a cat on a mat\"}\n"
        "{\"id\": \"both\", \"text\": \"Describe this image.\", \"image\": [\"img/rocket.jpg\", "
        "\"img/palette_color.png\"]}\n"
        "{\"id\": \"bad\", \"image\": \"img/truncated.jpg\"}\n"
        "{\"id\": \"gone\", \"text\": \"where\", \"image\": \"img/nope.png\"}\n"
        "{\"id\": \"img-again\", \"image\": [\"img/chelsea.png\"]}\n";
    snprintf(path, sizeof path, "%s/items.jsonl", dir);
    tu_write(path, jsonl, strlen(jsonl));
    snprintf(cmd, sizeof cmd,
             "'%s' embed --model '%s' --input '%s' --out '%s/out' --mode always "
             "--max-vision-patches 600",
             TWN_BIN, tu_tiny_model(), path, dir);
    if (tu_run(cmd, &out) != 0) fail_msg("twn embed failed: %s", out);
    free(out);
    snprintf(path, sizeof path, "%s/out/items.jsonl", dir);
    assert_int_equal(count_lines(path), 4);
    char *items = tu_read(path, NULL);
    const char *order[4] = {"\"id\":\"img\"", "\"id\":\"txt\"", "\"id\":\"both\"",
                            "\"id\":\"img-again\""};
    const char *prev = items;
    for (int i = 0; i < 4; i++) {
        const char *at = strstr(prev, order[i]);
        if (!at) fail_msg("items.jsonl lacks %s in order: %s", order[i], items);
        prev = at;
    }
    assert_non_null(strstr(items, "\"route\":\"hard\""));
    free(items);
    snprintf(path, sizeof path, "%s/out/dead_letter.jsonl", dir);
    assert_int_equal(count_lines(path), 2);
    char *dl = tu_read(path, NULL);
    assert_non_null(strstr(dl, "\"id\":\"bad\""));
    assert_non_null(strstr(dl, "\"line\":4"));
    assert_non_null(strstr(dl, "img/truncated.jpg"));
    assert_non_null(strstr(dl, "\"id\":\"gone\""));
    assert_non_null(strstr(dl, "\"line\":5"));
    assert_non_null(strstr(dl, "img/nope.png"));
    free(dl);
    snprintf(path, sizeof path, "%s/out/embeddings.npy", dir);
    int rows, cols;
    float *emb = read_npy_f32(path, &rows, &cols);
    assert_int_equal(rows, 4);
    assert_int_equal(cols, 64);
    for (int r = 0; r < 4; r++) {
        double ss = 0;
        for (int c = 0; c < cols; c++) ss += (double)emb[r * cols + c] * emb[r * cols + c];
        assert_true(fabs(ss - 1.0) < 1e-5);
    }
    assert_true(tu_max_abs(emb, emb + 3 * cols, (size_t)cols) < 1e-6); /* img == img-again */
    assert_true(tu_max_abs(emb, emb + 2 * cols, (size_t)cols) > 1e-2);
    free(emb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vexp_and_gelu),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_attention_full),
        cmocka_unit_test(test_pos_interp),
        cmocka_unit_test(test_rot_coords),
        cmocka_unit_test(test_tower_matches_literal_reference),
        cmocka_unit_test(test_batch_equals_alone),
        cmocka_unit_test(test_block_diagonal),
        cmocka_unit_test(test_bad_grid),
        cmocka_unit_test(test_load),
        cmocka_unit_test(test_load_mkmodel_tiny),
        cmocka_unit_test(test_mrope_tables),
        cmocka_unit_test(test_mrope_expand),
        cmocka_unit_test(test_deepstack_injection),
        cmocka_unit_test(test_twn_images),
        cmocka_unit_test(test_twn_images_always),
        cmocka_unit_test(test_twn_image_token_without_image),
        cmocka_unit_test(test_embed_cli_images),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
