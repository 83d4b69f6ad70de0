/* vision.c — loading and running the Qwen3-VL vision tower (see vision.h for the math).
 *
 * Every weight is listed once, in `walk`, with its checkpoint name and shape; allocating,
 * loading, counting and freeing all go through that list, so they cannot disagree.  The forward
 * keeps all images' patches in one [N, Hv] matrix (projections are one GEMM each, whatever the
 * image sizes) and splits only where the reference splits: attention per cu_seqlens segment and
 * the 2x2 merge, which regroups 4 consecutive rows because patches arrive in merge-block order. */
#include "engine/vision.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "engine/cpu/ops.h"
#include "engine/safetensors.h"
#include "engine/tensor.h"
#include "util/fileio.h"
#include "util/mem.h"

/* Largest patch count one forward accepts (all images together); keeps every index and
 * buffer size far from int overflow. */
#define VISION_MAX_PATCHES (1 << 22)

// ------------------------------------------------------------------------------------------------
// The weight list

typedef int (*weight_fn)(void *ctx, const char *name, int ndim, const int64_t *shape, float **slot);

/* Calls fn for every weight of the tower, in checkpoint naming (spec §2.2). */
static int walk(twn_vision *v, weight_fn fn, void *ctx) {
    const int64_t Hv = v->Hv, Iv = v->Iv, M = (int64_t)v->unit * v->Hv, Ho = v->Hout;
    const twn_vision_config *c = &v->cfg;
    char nm[256];
#define W(slot, nd, ...)                                                                           \
    do {                                                                                           \
        const int64_t shp_[] = {__VA_ARGS__};                                                      \
        if (fn(ctx, nm, (nd), shp_, &(slot))) return -1;                                           \
    } while (0)
#define NAME(...) snprintf(nm, sizeof nm, __VA_ARGS__)
    NAME("model.visual.patch_embed.proj.weight");
    W(v->patch_w, 5, Hv, c->in_channels, c->temporal_patch_size, c->patch_size, c->patch_size);
    NAME("model.visual.patch_embed.proj.bias");
    W(v->patch_b, 1, Hv);
    NAME("model.visual.pos_embed.weight");
    W(v->pos_embed, 2, c->num_position_embeddings, Hv);
    for (int i = 0; i < v->depth; i++) {
        twn_vision_block *b = &v->blocks[i];
        const char *p = "model.visual.blocks";
        NAME("%s.%d.norm1.weight", p, i);
        W(b->norm1_w, 1, Hv);
        NAME("%s.%d.norm1.bias", p, i);
        W(b->norm1_b, 1, Hv);
        NAME("%s.%d.attn.qkv.weight", p, i);
        W(b->qkv_w, 2, 3 * Hv, Hv);
        NAME("%s.%d.attn.qkv.bias", p, i);
        W(b->qkv_b, 1, 3 * Hv);
        NAME("%s.%d.attn.proj.weight", p, i);
        W(b->proj_w, 2, Hv, Hv);
        NAME("%s.%d.attn.proj.bias", p, i);
        W(b->proj_b, 1, Hv);
        NAME("%s.%d.norm2.weight", p, i);
        W(b->norm2_w, 1, Hv);
        NAME("%s.%d.norm2.bias", p, i);
        W(b->norm2_b, 1, Hv);
        NAME("%s.%d.mlp.linear_fc1.weight", p, i);
        W(b->fc1_w, 2, Iv, Hv);
        NAME("%s.%d.mlp.linear_fc1.bias", p, i);
        W(b->fc1_b, 1, Iv);
        NAME("%s.%d.mlp.linear_fc2.weight", p, i);
        W(b->fc2_w, 2, Hv, Iv);
        NAME("%s.%d.mlp.linear_fc2.bias", p, i);
        W(b->fc2_b, 1, Hv);
    }
    for (int k = -1; k < c->n_deepstack; k++) {
        twn_vision_merger *m = k < 0 ? &v->merger : &v->ds_mergers[k];
        char pre[64];
        if (k < 0)
            snprintf(pre, sizeof pre, "model.visual.merger");
        else
            snprintf(pre, sizeof pre, "model.visual.deepstack_merger_list.%d", k);
        const int64_t nd = m->postshuffle ? M : Hv;
        NAME("%s.norm.weight", pre);
        W(m->norm_w, 1, nd);
        NAME("%s.norm.bias", pre);
        W(m->norm_b, 1, nd);
        NAME("%s.linear_fc1.weight", pre);
        W(m->fc1_w, 2, M, M);
        NAME("%s.linear_fc1.bias", pre);
        W(m->fc1_b, 1, M);
        NAME("%s.linear_fc2.weight", pre);
        W(m->fc2_w, 2, Ho, M);
        NAME("%s.linear_fc2.bias", pre);
        W(m->fc2_b, 1, Ho);
    }
#undef W
#undef NAME
    return 0;
}

static int64_t numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

static int alloc_one(void *ctx, const char *name, int ndim, const int64_t *shape, float **slot) {
    twn_vision *v = ctx;
    size_t n = (size_t)numel(ndim, shape);
    *slot = twn_try_calloc(n ? n : 1, sizeof(float));
    if (!*slot) return -1;
    v->n_params += (int64_t)n;
    v->weight_bytes += n * sizeof(float);
    return 0;
}

static int free_one(void *ctx, const char *name, int ndim, const int64_t *shape, float **slot) {
    twn_free(*slot);
    *slot = NULL;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Construction, loading

int twn_vision_new(const twn_vision_config *c, twn_vision **out, twn_err *err) {
    *out = NULL;
    if (c->depth < 1 || c->hidden_size < 1 || c->intermediate_size < 1 || c->num_heads < 1 ||
        c->in_channels < 1 || c->patch_size < 1 || c->temporal_patch_size < 1 ||
        c->spatial_merge_size < 1 || c->out_hidden_size < 1 || c->num_position_embeddings < 1)
        return twn_err_set(err, "vision config has a dimension < 1 (depth %d, hidden %d, heads %d)",
                           c->depth, c->hidden_size, c->num_heads);
    if (c->hidden_size % c->num_heads || (c->hidden_size / c->num_heads) % 4)
        return twn_err_set(err,
                           "vision hidden_size %d / num_heads %d must be a whole head size that is "
                           "a multiple of 4 (2-D RoPE)",
                           c->hidden_size, c->num_heads);
    int side = (int)lround(sqrt((double)c->num_position_embeddings));
    if (side * side != c->num_position_embeddings)
        return twn_err_set(err, "vision num_position_embeddings %d is not a square",
                           c->num_position_embeddings);
    if (c->n_deepstack < 0 || c->n_deepstack > TWN_MAX_DEEPSTACK)
        return twn_err_set(err, "vision config has %d deepstack indexes (at most %d)",
                           c->n_deepstack, TWN_MAX_DEEPSTACK);
    for (int k = 0; k < c->n_deepstack; k++)
        if (c->deepstack_visual_indexes[k] < 0 || c->deepstack_visual_indexes[k] >= c->depth)
            return twn_err_set(err, "deepstack_visual_indexes[%d] = %d is not a block in [0, %d)",
                               k, c->deepstack_visual_indexes[k], c->depth);

    twn_vision *v = twn_calloc(1, sizeof *v);
    v->cfg = *c;
    v->Hv = c->hidden_size;
    v->Iv = c->intermediate_size;
    v->nh = c->num_heads;
    v->hd = c->hidden_size / c->num_heads;
    v->Hout = c->out_hidden_size;
    v->depth = c->depth;
    v->merge = c->spatial_merge_size;
    v->unit = v->merge * v->merge;
    v->patch_dim = c->in_channels * c->temporal_patch_size * c->patch_size * c->patch_size;
    v->grid_side = side;
    v->blocks = twn_calloc((size_t)v->depth, sizeof *v->blocks);
    v->ds_mergers =
        twn_calloc((size_t)(c->n_deepstack ? c->n_deepstack : 1), sizeof *v->ds_mergers);
    for (int k = 0; k < c->n_deepstack; k++) v->ds_mergers[k].postshuffle = true;
    /* `if layer_num in deepstack_visual_indexes: merger_list[indexes.index(layer_num)]`, appended
     * while walking the blocks: block order, first matching merger. */
    for (int b = 0; b < v->depth; b++)
        for (int k = 0; k < c->n_deepstack; k++)
            if (c->deepstack_visual_indexes[k] == b) {
                v->feat_block[v->n_features] = b;
                v->feat_merger[v->n_features++] = k;
                break;
            }
    /* Qwen3VLVisionRotaryEmbedding(hd / 2): inv_freq = 1 / theta^(arange(0, d, 2) / d), fp32. */
    int d = v->hd / 2;
    v->rope_inv_freq = twn_malloc(sizeof(float) * (size_t)(d / 2));
    for (int j = 0; j < d / 2; j++)
        v->rope_inv_freq[j] = 1.0f / powf(TWN_VISION_ROPE_THETA, (float)(2 * j) / (float)d);
    if (walk(v, alloc_one, v)) {
        size_t bytes = v->weight_bytes;
        twn_vision_free(v);
        return twn_err_set(err, "cannot allocate the vision tower's weights (%zu bytes so far)",
                           bytes);
    }
    *out = v;
    return 0;
}

void twn_vision_free(twn_vision *v) {
    if (!v) return;
    if (v->blocks && v->ds_mergers) walk(v, free_one, NULL);
    twn_free(v->blocks);
    twn_free(v->ds_mergers);
    twn_free(v->rope_inv_freq);
    twn_free(v);
}

typedef struct {
    const twn_st_set *st;
    twn_err *err;
} load_ctx;

static int load_one(void *ctx, const char *name, int ndim, const int64_t *shape, float **slot) {
    load_ctx *lc = ctx;
    const twn_tensor *t = twn_st_set_find(lc->st, name);
    if (!t) return twn_err_set(lc->err, "tensor %s is missing from the checkpoint", name);
    const char *file = twn_st_set_file_of(lc->st, name);
    if (twn_tensor_expect(t, file, ndim, shape, lc->err)) return -1;
    if (twn_tensor_to_f32(t, *slot, lc->err)) return twn_err_wrap(lc->err, "%s", file);
    return 0;
}

int twn_vision_load(const char *dir, twn_vision **out, twn_err *err) {
    *out = NULL;
    twn_config cfg;
    char *cfg_path = twn_path_join(dir, "config.json");
    int rc = twn_config_load(cfg_path, &cfg, err);
    if (!rc && !cfg.has_vision)
        rc = twn_err_set(err, "%s has no vision_config (a text-only model)", cfg_path);
    twn_free(cfg_path);
    if (rc) return -1;
    twn_vision *v = NULL;
    twn_st_set *st = NULL;
    if (twn_vision_new(&cfg.vision, &v, err) || twn_st_set_open_dir(dir, &st, err)) goto fail;
    load_ctx lc = {st, err};
    if (walk(v, load_one, &lc)) goto fail;
    twn_st_set_close(st);
    *out = v;
    return 0;
fail:
    twn_st_set_close(st);
    twn_vision_free(v);
    return twn_err_wrap(err, "loading the vision tower of %s", dir);
}

// ------------------------------------------------------------------------------------------------
// Positions

int64_t twn_vision_tokens(const twn_vision *v, int grid_t, int grid_h, int grid_w) {
    return (int64_t)grid_t * grid_h * grid_w / v->unit;
}

/* torch.linspace(start, end, steps) in fp32 as the CPU kernel computes it: the first half counts
 * up from start, the second half down from end, with step = (end - start) / (steps - 1). */
static float linspace_at(float start, float end, int steps, int i) {
    if (steps == 1) return start;
    const float step = (end - start) / (float)(steps - 1);
    return i < steps / 2 ? start + step * (float)i : end - step * (float)(steps - 1 - i);
}

/* One axis of fast_pos_embed_interpolate: sample i sits at linspace(0, n-1, steps)[i], between
 * table rows f = int(x) (truncation) and c = min(f + 1, n - 1), at fraction d = x - f. */
typedef struct {
    int f, c;
    float d;
} interp_at;

static void interp_axis(int steps, int n, interp_at *a) {
    for (int i = 0; i < steps; i++) {
        float x = linspace_at(0.f, (float)(n - 1), steps, i);
        a[i].f = (int)x;
        a[i].c = a[i].f + 1 < n - 1 ? a[i].f + 1 : n - 1;
        a[i].d = x - (float)a[i].f;
    }
}

/* The embedding at (row r, column c): weights as the reference builds them (fp32 products), the
 * four corner terms summed p0 + p1 + p2 + p3; written to o, or added to it (add). */
static void blend(const float *E, int n, int Hv, interp_at r, interp_at c, float *o, bool add) {
    const float w00 = (1.f - r.d) * (1.f - c.d), w01 = (1.f - r.d) * c.d;
    const float w10 = r.d * (1.f - c.d), w11 = r.d * c.d;
    const float *e00 = E + ((size_t)r.f * n + c.f) * Hv, *e01 = E + ((size_t)r.f * n + c.c) * Hv;
    const float *e10 = E + ((size_t)r.c * n + c.f) * Hv, *e11 = E + ((size_t)r.c * n + c.c) * Hv;
#pragma omp simd
    for (int k = 0; k < Hv; k++) {
        float p0 = e00[k] * w00, p1 = e01[k] * w01, p2 = e10[k] * w10, p3 = e11[k] * w11;
        float pe = ((p0 + p1) + p2) + p3;
        o[k] = add ? o[k] + pe : pe;
    }
}

void twn_vision_pos_interp(const twn_vision *v, int h, int w, float *out) {
    interp_at *ra = twn_malloc(sizeof *ra * (size_t)h), *ca = twn_malloc(sizeof *ca * (size_t)w);
    interp_axis(h, v->grid_side, ra);
    interp_axis(w, v->grid_side, ca);
    for (int i = 0; i < h; i++)
        for (int j = 0; j < w; j++)
            blend(v->pos_embed, v->grid_side, v->Hv, ra[i], ca[j],
                  out + ((size_t)i * w + j) * v->Hv, false);
    twn_free(ra);
    twn_free(ca);
}

void twn_vision_rot_coords(int t, int h, int w, int merge, int32_t *rows, int32_t *cols) {
    int64_t k = 0;
    for (int f = 0; f < t; f++)
        for (int br = 0; br < h / merge; br++)
            for (int bc = 0; bc < w / merge; bc++)
                for (int ir = 0; ir < merge; ir++)
                    for (int ic = 0; ic < merge; ic++, k++) {
                        rows[k] = br * merge + ir;
                        cols[k] = bc * merge + ic;
                    }
}

// ------------------------------------------------------------------------------------------------
// Forward

/* Y[M, N] = X[M, K] W^T + b. */
static void linear_bias(const float *X, int64_t M, int K, const float *W, const float *b, int N,
                        float *Y) {
    for (int64_t r = 0; r < M; r++) memcpy(Y + r * N, b, sizeof(float) * (size_t)N);
    twn_cpu_linear(X, (int)M, K, K, W, N, Y, N, 1.f, 1.f);
}

/* Patch merger over n merged tokens: in_rows [n * unit, Hv] viewed as [n, unit * Hv]; out [n,
 * Hout]. ln [n, unit * Hv] and h1 [n, unit * Hv] are scratch. */
static void run_merger(const twn_vision *v, const twn_vision_merger *m, const float *in, int64_t n,
                       float *ln, float *h1, float *out) {
    const int M = v->unit * v->Hv;
    if (m->postshuffle)
        twn_cpu_layernorm(ln, in, m->norm_w, m->norm_b, (int)n, M, M, TWN_VISION_LN_EPS);
    else
        twn_cpu_layernorm(ln, in, m->norm_w, m->norm_b, (int)(n * v->unit), v->Hv, v->Hv,
                          TWN_VISION_LN_EPS);
    linear_bias(ln, n, M, m->fc1_w, m->fc1_b, M, h1);
    twn_cpu_gelu_erf(h1, n * M);
    linear_bias(h1, n, M, m->fc2_w, m->fc2_b, v->Hout, out);
}

void twn_vision_out_free(twn_vision_out *o) {
    twn_free(o->offsets);
    twn_free(o->embeds);
    twn_free(o->deepstack);
    memset(o, 0, sizeof *o);
}

int twn_vision_forward(const twn_vision *v, const twn_vision_image *imgs, int n,
                       twn_vision_trace_fn trace, void *trace_ctx, twn_vision_out *out,
                       twn_err *err) {
    memset(out, 0, sizeof *out);
    if (n < 1) return twn_err_set(err, "vision forward needs at least one image, got %d", n);
    const int Hv = v->Hv, Iv = v->Iv, nh = v->nh, hd = v->hd, half = hd / 2, quarter = hd / 4;
    const int unit = v->unit, Ho = v->Hout;
    int64_t N = 0;
    for (int i = 0; i < n; i++) {
        const twn_vision_image *im = &imgs[i];
        if (im->grid_t < 1 || im->grid_h < 1 || im->grid_w < 1 || im->grid_h % v->merge ||
            im->grid_w % v->merge)
            return twn_err_set(err,
                               "image %d: grid (t %d, h %d, w %d) must be positive with h and w "
                               "multiples of spatial_merge_size %d",
                               i, im->grid_t, im->grid_h, im->grid_w, v->merge);
        if (!im->pixels) return twn_err_set(err, "image %d: no pixel values", i);
        int64_t p = (int64_t)im->grid_t * im->grid_h * im->grid_w;
        if (p > VISION_MAX_PATCHES || N + p > VISION_MAX_PATCHES)
            return twn_err_set(err,
                               "image %d: %lld patches (%lld in the call so far); the tower takes "
                               "at most %d per call",
                               i, (long long)p, (long long)N, VISION_MAX_PATCHES);
        N += p;
    }
    const int64_t NT = N / unit;
    float *x = twn_try_alloc((size_t)N * Hv * sizeof(float));
    float *xn = twn_try_alloc((size_t)N * Hv * sizeof(float));
    float *qkv = twn_try_alloc((size_t)N * 3 * Hv * sizeof(float));
    float *att = twn_try_alloc((size_t)N * Hv * sizeof(float));
    float *mlp = twn_try_alloc((size_t)N * (Iv > Hv ? Iv : Hv) * sizeof(float));
    float *cs = twn_try_alloc((size_t)N * half * sizeof(float));
    float *sn = twn_try_alloc((size_t)N * half * sizeof(float));
    int32_t *rc_rows = twn_try_alloc((size_t)N * sizeof(int32_t));
    int32_t *rc_cols = twn_try_alloc((size_t)N * sizeof(int32_t));
    out->offsets = twn_malloc(sizeof(int64_t) * (size_t)(n + 1));
    out->embeds = twn_try_alloc((size_t)NT * Ho * sizeof(float));
    out->deepstack =
        twn_try_alloc((size_t)(v->n_features ? v->n_features : 1) * NT * Ho * sizeof(float));
    int rc = -1;
    if (!x || !xn || !qkv || !att || !mlp || !cs || !sn || !rc_rows || !rc_cols || !out->embeds ||
        !out->deepstack) {
        twn_err_set(err, "cannot allocate the vision activations for %d image(s), %lld patches", n,
                    (long long)N);
        goto out;
    }
    out->n_images = n;
    out->n_tokens = NT;
    out->dim = Ho;
    out->n_features = v->n_features;

    /* Patch embedding, learned positions, rotary tables: image by image. */
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        const twn_vision_image *im = &imgs[i];
        const int t = im->grid_t, h = im->grid_h, w = im->grid_w, m = v->merge;
        const int64_t p = (int64_t)t * h * w;
        out->offsets[i] = off / unit;
        linear_bias(im->pixels, p, v->patch_dim, v->patch_w, v->patch_b, Hv, x + off * Hv);
        twn_vision_rot_coords(t, h, w, m, rc_rows + off, rc_cols + off);
        off += p;
    }
    out->offsets[n] = NT;
    if (trace) trace(trace_ctx, "vis.patch_embed", x, N, Hv);
    /* learned positions: token k of an image sits at raster (row, col) = its rot coords, and
     * every frame repeats the grid; blended straight into x, no [h * w, Hv] table */
    off = 0;
    for (int i = 0; i < n; i++) {
        const twn_vision_image *im = &imgs[i];
        const int h = im->grid_h, w = im->grid_w;
        const int64_t p = (int64_t)im->grid_t * h * w;
        interp_at *ra = twn_malloc(sizeof *ra * (size_t)h),
                  *ca = twn_malloc(sizeof *ca * (size_t)w);
        interp_axis(h, v->grid_side, ra);
        interp_axis(w, v->grid_side, ca);
#pragma omp parallel for schedule(static) if (p * Hv >= (1 << 18))
        for (int64_t k = off; k < off + p; k++)
            blend(v->pos_embed, v->grid_side, Hv, ra[rc_rows[k]], ca[rc_cols[k]], x + k * Hv, true);
        twn_free(ra);
        twn_free(ca);
        off += p;
    }
#pragma omp parallel for schedule(static) if (N >= 256)
    for (int64_t k = 0; k < N; k++)
        for (int j = 0; j < half; j++) {
            const float ang = j < quarter ? (float)rc_rows[k] * v->rope_inv_freq[j]
                                          : (float)rc_cols[k] * v->rope_inv_freq[j - quarter];
            cs[k * half + j] = cosf(ang);
            sn[k * half + j] = sinf(ang);
        }

    const float scale = (float)(1.0 / sqrt((double)hd));
    int feat = 0;
    for (int l = 0; l < v->depth; l++) {
        const twn_vision_block *b = &v->blocks[l];
        twn_cpu_layernorm(xn, x, b->norm1_w, b->norm1_b, (int)N, Hv, Hv, TWN_VISION_LN_EPS);
        linear_bias(xn, N, Hv, b->qkv_w, b->qkv_b, 3 * Hv, qkv);
        twn_cpu_rope(qkv, (int)N, nh, hd, 3 * Hv, cs, sn);      /* q */
        twn_cpu_rope(qkv + Hv, (int)N, nh, hd, 3 * Hv, cs, sn); /* k */
        off = 0;
        for (int i = 0; i < n; i++) {
            const int64_t frame = (int64_t)imgs[i].grid_h * imgs[i].grid_w;
            for (int f = 0; f < imgs[i].grid_t; f++, off += frame) {
                const float *q = qkv + off * 3 * Hv;
                if (twn_cpu_attention_full(q, 3 * Hv, q + Hv, 3 * Hv, q + 2 * Hv, 3 * Hv,
                                           att + off * Hv, Hv, (int)frame, nh, hd, scale)) {
                    twn_err_set(err,
                                "cannot allocate attention scores for image %d (%lld patches "
                                "per frame)",
                                i, (long long)frame);
                    goto out;
                }
            }
        }
        linear_bias(att, N, Hv, b->proj_w, b->proj_b, Hv, xn);
#pragma omp parallel for simd schedule(static) if (N * Hv >= 65536)
        for (int64_t k = 0; k < N * Hv; k++) x[k] += xn[k];
        twn_cpu_layernorm(xn, x, b->norm2_w, b->norm2_b, (int)N, Hv, Hv, TWN_VISION_LN_EPS);
        linear_bias(xn, N, Hv, b->fc1_w, b->fc1_b, Iv, mlp);
        twn_cpu_gelu_tanh(mlp, N * Iv);
        linear_bias(mlp, N, Iv, b->fc2_w, b->fc2_b, Hv, xn);
#pragma omp parallel for simd schedule(static) if (N * Hv >= 65536)
        for (int64_t k = 0; k < N * Hv; k++) x[k] += xn[k];
        if (trace) {
            char name[32];
            snprintf(name, sizeof name, "vis.block.%d", l);
            trace(trace_ctx, name, x, N, Hv);
        }
        if (feat < v->n_features && v->feat_block[feat] == l) {
            const int k = v->feat_merger[feat];
            float *dst = out->deepstack + (size_t)feat * NT * Ho;
            /* xn and att are [N, Hv] = [NT, unit * Hv]: free scratch here */
            run_merger(v, &v->ds_mergers[k], x, NT, xn, att, dst);
            if (trace) {
                char name[32];
                snprintf(name, sizeof name, "vis.deepstack.%d", k);
                trace(trace_ctx, name, dst, NT, Ho);
            }
            feat++;
        }
    }
    run_merger(v, &v->merger, x, NT, xn, att, out->embeds);
    if (trace) trace(trace_ctx, "vis.merger", out->embeds, NT, Ho);
    rc = 0;
out:
    twn_free(x);
    twn_free(xn);
    twn_free(qkv);
    twn_free(att);
    twn_free(mlp);
    twn_free(cs);
    twn_free(sn);
    twn_free(rc_rows);
    twn_free(rc_cols);
    if (rc) twn_vision_out_free(out);
    return rc;
}
