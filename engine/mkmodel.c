/* mkmodel.c — deterministic random TWN checkpoints (see mkmodel.h for the contract).
 *
 * The work is split the way the files are: a *plan* (the list of tensors with shape and init
 * distribution, built from the preset alone, so counting parameters and writing agree by
 * construction), a generator that fills one tensor from its own seed, and one writer per file.
 * JSON files are built with jansson, keys sorted and indented like Python's
 * json.dumps(indent=2, sort_keys=True) that transformers and peft use, so a diff against a real
 * checkpoint shows only real differences. */
#include "engine/mkmodel.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/manifest.h"
#include "engine/ptfile.h"
#include "engine/safetensors.h"
#include "util/fileio.h"
#include "util/hash.h"
#include "util/mem.h"
#include "util/rng.h"
#include "util/vec.h"

#ifndef TWN_TOKENIZER_JSON
#define TWN_TOKENIZER_JSON ""
#endif

/* Fixed by the Qwen3-VL family (spec §1.1, §2.1, §3.1); not preset knobs. */
#define QWEN_VOCAB           151936
#define QWEN_MAX_POS         262144
#define QWEN_ROPE_THETA      5000000.0
#define QWEN_RMS_EPS         1e-6
#define QWEN_BOS             151643 /* <|endoftext|> */
#define QWEN_EOS             151645 /* <|im_end|> */
#define QWEN_PAD             151643
#define QWEN_IMAGE_TOKEN     151655
#define QWEN_VIDEO_TOKEN     151656
#define QWEN_VISION_START    151652
#define QWEN_VISION_END      151653
#define VIS_PATCH            16
#define VIS_TEMPORAL         2
#define VIS_MERGE            2
#define VIS_IN_CHANNELS      3
#define VIS_POS_EMBEDDINGS   2304 /* 48 x 48 learned grid */
#define TRANSFORMERS_VERSION "5.17.0"
#define PEFT_VERSION         "0.18.1"

/* Init scales (see the header comment in mkmodel.h). */
#define NORM_STD        0.1f  /* norm weights: 1 + NORM_STD * N */
#define BIAS_STD        0.02f /* biases */
#define VIS_POS_STD     0.5f  /* learned positions, comparable to the patch embedding output */
#define LORA_DELTA_FRAC 0.2   /* |s * B A x| / |W x| aimed for */
#define GATE_OUT_GAIN   2.0f  /* last gate layer std = GAIN / sqrt(G): logits O(1) */

/* Elements per generator block: each block has its own sub-seed, so a tensor's bytes do not
 * depend on how blocks are spread over threads. */
#define FILL_BLOCK 65536

static const char *const LM_TARGETS[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                         "gate_proj", "up_proj", "down_proj"};
#define N_LM_TARGETS 7

/* ------------------------------------------------------------------------------------------------
 * Presets */

/* One line per concern: text decoder; vision tower; LoRA; TWN head. */
// clang-format off
static const twn_mkmodel_preset presets[] = {
    {.name = "tiny",
     .desc = "test model: hidden 64, 2 layers, tied head, 2-block ViT, LoRA r=4",
     .hidden = 64, .intermediate = 128, .layers = 2, .heads = 4, .kv_heads = 2, .head_dim = 32,
     .mrope_section = {6, 5, 5}, .tied = true,
     .v_depth = 2, .v_hidden = 32, .v_intermediate = 64, .v_heads = 2,
     .deepstack = {0, 1}, .n_deepstack = 2,
     .lora_r = 4, .lora_alpha = 8,
     .gate_hidden = 16, .gate_act = "gelu", .n_queries = 4, .max_think_tokens = 16},
    {.name = "tiny-alt",
     .desc = "test variant: hidden 96, 3 layers, GQA 3, untied head, rsLoRA r=8 with regex "
             "targets and rank_pattern, relu gate",
     .hidden = 96, .intermediate = 160, .layers = 3, .heads = 6, .kv_heads = 2, .head_dim = 16,
     .mrope_section = {4, 2, 2}, .tied = false,
     .v_depth = 2, .v_hidden = 32, .v_intermediate = 64, .v_heads = 2,
     .deepstack = {0, 1}, .n_deepstack = 2,
     .lora_r = 8, .lora_alpha = 16, .use_rslora = true, .regex_targets = true, .emb_q_rank = 4,
     .gate_hidden = 16, .gate_act = "relu", .n_queries = 2, .max_think_tokens = 16},
    {.name = "qwen3-0.5b",
     .desc = "CPU benchmark: Qwen3-0.6B-shaped text (hidden 1024, 28 layers), tiny ViT, LoRA r=16",
     .hidden = 1024, .intermediate = 3072, .layers = 28, .heads = 16, .kv_heads = 8,
     .head_dim = 128, .mrope_section = {24, 20, 20}, .tied = true,
     .v_depth = 2, .v_hidden = 32, .v_intermediate = 64, .v_heads = 2,
     .deepstack = {0, 1}, .n_deepstack = 2,
     .lora_r = 16, .lora_alpha = 32,
     .gate_hidden = 256, .gate_act = "gelu", .n_queries = 8, .max_think_tokens = 256},
    {.name = "qwen3vl-2b",
     .desc = "Qwen3-VL-2B-Instruct shapes (text and vision), random weights, LoRA r=32, sharded",
     .hidden = 2048, .intermediate = 6144, .layers = 28, .heads = 16, .kv_heads = 8,
     .head_dim = 128, .mrope_section = {24, 20, 20}, .tied = true,
     .v_depth = 24, .v_hidden = 1024, .v_intermediate = 4096, .v_heads = 16,
     .deepstack = {5, 11, 17}, .n_deepstack = 3,
     .lora_r = 32, .lora_alpha = 64,
     .gate_hidden = 512, .gate_act = "gelu", .n_queries = 16, .max_think_tokens = 256,
     .max_shard_bytes = 2ull << 30},
};
// clang-format on
#define N_PRESETS (sizeof presets / sizeof *presets)

size_t twn_mkmodel_preset_count(void) {
    return N_PRESETS;
}

const twn_mkmodel_preset *twn_mkmodel_preset_at(size_t i) {
    return i < N_PRESETS ? &presets[i] : NULL;
}

const twn_mkmodel_preset *twn_mkmodel_find(const char *name) {
    for (size_t i = 0; i < N_PRESETS; i++)
        if (!strcmp(presets[i].name, name)) return &presets[i];
    return NULL;
}

const char *twn_mkmodel_preset_names(void) {
    static char buf[256];
    if (!buf[0]) {
        size_t k = 0;
        for (size_t i = 0; i < N_PRESETS && k < sizeof buf; i++)
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%s", i ? ", " : "", presets[i].name);
    }
    return buf;
}

static int lookup(const char *name, const twn_mkmodel_preset **p, twn_err *err) {
    *p = name ? twn_mkmodel_find(name) : &presets[0];
    if (!*p)
        return twn_err_set(err, "unknown preset '%s' (presets: %s)", name,
                           twn_mkmodel_preset_names());
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Tensor plan: name, shape and init distribution (value = mean + std * N(0,1)) of every tensor of
 * one file, in the order transformers would list them. */

typedef struct {
    char *name;
    int ndim;
    int64_t shape[5];
    float mean, std;
    bool zero_mean; /* subtract the drawn values' mean afterwards (f32 only) */
} wspec;

typedef struct {
    wspec *v;
    size_t n, cap;
} wlist;

static wspec *wl_add(wlist *L, float mean, float std, int ndim, const int64_t *shape,
                     const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static wspec *wl_add(wlist *L, float mean, float std, int ndim, const int64_t *shape,
                     const char *fmt, ...) {
    if (L->n == L->cap) {
        L->cap = L->cap ? 2 * L->cap : 64;
        L->v = twn_realloc(L->v, L->cap * sizeof *L->v);
    }
    wspec *w = &L->v[L->n++];
    memset(w, 0, sizeof *w);
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    w->name = twn_strdup(name);
    w->ndim = ndim;
    memcpy(w->shape, shape, (size_t)ndim * sizeof *shape);
    w->mean = mean;
    w->std = std;
    return w;
}

static void wl_free(wlist *L) {
    for (size_t i = 0; i < L->n; i++) twn_free(L->v[i].name);
    twn_free(L->v);
    memset(L, 0, sizeof *L);
}

static int64_t ws_numel(const wspec *w) {
    int64_t n = 1;
    for (int i = 0; i < w->ndim; i++) n *= w->shape[i];
    return n;
}

/* Shorthands: a Linear weight [out, in] with std 1/sqrt(in); a norm weight; a bias. */
#define LINEAR(L, out, in, ...)                                                                    \
    wl_add(L, 0.0f, 1.0f / sqrtf((float)(in)), 2, (const int64_t[]){out, in}, __VA_ARGS__)
#define NORM(L, n, ...) wl_add(L, 1.0f, NORM_STD, 1, (const int64_t[]){n}, __VA_ARGS__)
#define BIAS(L, n, ...) wl_add(L, 0.0f, BIAS_STD, 1, (const int64_t[]){n}, __VA_ARGS__)

/* Text decoder, spec §1.2. */
static void plan_text(const twn_mkmodel_preset *p, wlist *L) {
    const int64_t H = p->hidden, I = p->intermediate, D = p->head_dim;
    const int64_t Q = (int64_t)p->heads * D, KV = (int64_t)p->kv_heads * D;
    const char *pre = "model.language_model";
    /* Embedding rows with std 1/sqrt(H): a tied head then gives logits of std ~1. */
    wl_add(L, 0.0f, 1.0f / sqrtf((float)H), 2, (const int64_t[]){QWEN_VOCAB, H},
           "%s.embed_tokens.weight", pre);
    for (int i = 0; i < p->layers; i++) {
        NORM(L, H, "%s.layers.%d.input_layernorm.weight", pre, i);
        LINEAR(L, Q, H, "%s.layers.%d.self_attn.q_proj.weight", pre, i);
        LINEAR(L, KV, H, "%s.layers.%d.self_attn.k_proj.weight", pre, i);
        LINEAR(L, KV, H, "%s.layers.%d.self_attn.v_proj.weight", pre, i);
        LINEAR(L, H, Q, "%s.layers.%d.self_attn.o_proj.weight", pre, i);
        NORM(L, D, "%s.layers.%d.self_attn.q_norm.weight", pre, i);
        NORM(L, D, "%s.layers.%d.self_attn.k_norm.weight", pre, i);
        NORM(L, H, "%s.layers.%d.post_attention_layernorm.weight", pre, i);
        LINEAR(L, I, H, "%s.layers.%d.mlp.gate_proj.weight", pre, i);
        LINEAR(L, I, H, "%s.layers.%d.mlp.up_proj.weight", pre, i);
        LINEAR(L, H, I, "%s.layers.%d.mlp.down_proj.weight", pre, i);
    }
    NORM(L, H, "%s.norm.weight", pre);
    if (!p->tied) LINEAR(L, QWEN_VOCAB, H, "lm_head.weight");
}

/* Vision tower, spec §2.2. */
static void plan_vision(const twn_mkmodel_preset *p, wlist *L) {
    const int64_t Hv = p->v_hidden, Iv = p->v_intermediate, M = 4 * Hv, Ho = p->hidden;
    const int64_t patch_in = (int64_t)VIS_IN_CHANNELS * VIS_TEMPORAL * VIS_PATCH * VIS_PATCH;
    const char *pre = "model.visual";
    wl_add(L, 0.0f, 1.0f / sqrtf((float)patch_in), 5,
           (const int64_t[]){Hv, VIS_IN_CHANNELS, VIS_TEMPORAL, VIS_PATCH, VIS_PATCH},
           "%s.patch_embed.proj.weight", pre);
    BIAS(L, Hv, "%s.patch_embed.proj.bias", pre);
    wl_add(L, 0.0f, VIS_POS_STD, 2, (const int64_t[]){VIS_POS_EMBEDDINGS, Hv},
           "%s.pos_embed.weight", pre);
    for (int i = 0; i < p->v_depth; i++) {
        NORM(L, Hv, "%s.blocks.%d.norm1.weight", pre, i);
        BIAS(L, Hv, "%s.blocks.%d.norm1.bias", pre, i);
        LINEAR(L, 3 * Hv, Hv, "%s.blocks.%d.attn.qkv.weight", pre, i);
        BIAS(L, 3 * Hv, "%s.blocks.%d.attn.qkv.bias", pre, i);
        LINEAR(L, Hv, Hv, "%s.blocks.%d.attn.proj.weight", pre, i);
        BIAS(L, Hv, "%s.blocks.%d.attn.proj.bias", pre, i);
        NORM(L, Hv, "%s.blocks.%d.norm2.weight", pre, i);
        BIAS(L, Hv, "%s.blocks.%d.norm2.bias", pre, i);
        LINEAR(L, Iv, Hv, "%s.blocks.%d.mlp.linear_fc1.weight", pre, i);
        BIAS(L, Iv, "%s.blocks.%d.mlp.linear_fc1.bias", pre, i);
        LINEAR(L, Hv, Iv, "%s.blocks.%d.mlp.linear_fc2.weight", pre, i);
        BIAS(L, Hv, "%s.blocks.%d.mlp.linear_fc2.bias", pre, i);
    }
    /* The main merger normalizes before the 2x2 shuffle (LayerNorm over Hv); the DeepStack
     * mergers after it (over 4 Hv). */
    NORM(L, Hv, "%s.merger.norm.weight", pre);
    BIAS(L, Hv, "%s.merger.norm.bias", pre);
    LINEAR(L, M, M, "%s.merger.linear_fc1.weight", pre);
    BIAS(L, M, "%s.merger.linear_fc1.bias", pre);
    LINEAR(L, Ho, M, "%s.merger.linear_fc2.weight", pre);
    BIAS(L, Ho, "%s.merger.linear_fc2.bias", pre);
    for (int k = 0; k < p->n_deepstack; k++) {
        NORM(L, M, "%s.deepstack_merger_list.%d.norm.weight", pre, k);
        BIAS(L, M, "%s.deepstack_merger_list.%d.norm.bias", pre, k);
        LINEAR(L, M, M, "%s.deepstack_merger_list.%d.linear_fc1.weight", pre, k);
        BIAS(L, M, "%s.deepstack_merger_list.%d.linear_fc1.bias", pre, k);
        LINEAR(L, Ho, M, "%s.deepstack_merger_list.%d.linear_fc2.weight", pre, k);
        BIAS(L, Ho, "%s.deepstack_merger_list.%d.linear_fc2.bias", pre, k);
    }
}

/* Rank of one target in one adapter, after rank_pattern. */
static int lora_rank(const twn_mkmodel_preset *p, bool embedding, int target) {
    if (embedding && p->emb_q_rank > 0 && target == 0) return p->emb_q_rank;
    return p->lora_r;
}

static double lora_scaling(const twn_mkmodel_preset *p, int r) {
    return p->use_rslora ? p->lora_alpha / sqrt((double)r) : (double)p->lora_alpha / r;
}

/* PEFT LoRA tensors for the seven LM projections of every layer, spec §4.3.  A ~ N(0, 1/in) keeps
 * A x at the scale of x; B is scaled so that s * B A x is LORA_DELTA_FRAC of W x. */
static void plan_adapter(const twn_mkmodel_preset *p, bool embedding, wlist *L) {
    const int64_t H = p->hidden, I = p->intermediate;
    const int64_t Q = (int64_t)p->heads * p->head_dim, KV = (int64_t)p->kv_heads * p->head_dim;
    const int64_t in[N_LM_TARGETS] = {H, H, H, Q, H, H, I};
    const int64_t out[N_LM_TARGETS] = {Q, KV, KV, H, I, I, H};
    for (int i = 0; i < p->layers; i++)
        for (int t = 0; t < N_LM_TARGETS; t++) {
            const char *blk = t < 4 ? "self_attn" : "mlp";
            int r = lora_rank(p, embedding, t);
            float bstd = (float)(LORA_DELTA_FRAC / (lora_scaling(p, r) * sqrt((double)r)));
            const char *fmt =
                "base_model.model.model.language_model.layers.%d.%s.%s.lora_%c.weight";
            wl_add(L, 0.0f, 1.0f / sqrtf((float)in[t]), 2, (const int64_t[]){r, in[t]}, fmt, i, blk,
                   LM_TARGETS[t], 'A');
            wl_add(L, 0.0f, bstd, 2, (const int64_t[]){out[t], r}, fmt, i, blk, LM_TARGETS[t], 'B');
        }
}

/* gate_mlp.pt: nn.Sequential(Linear(H,G), act, Linear(G,1)).  The last layer is zero-mean with
 * bias 0, so the activation's common offset cancels and p_think centres on 0.5. */
static void plan_gate(const twn_mkmodel_preset *p, wlist *L) {
    const int64_t H = p->hidden, G = p->gate_hidden;
    LINEAR(L, G, H, "0.weight");
    BIAS(L, G, "0.bias");
    wl_add(L, 0.0f, GATE_OUT_GAIN / sqrtf((float)G), 2, (const int64_t[]){1, G}, "2.weight")
        ->zero_mean = true;
    wl_add(L, 0.0f, 0.0f, 1, (const int64_t[]){1}, "2.bias");
}

/* queries.pt: [K, H] at the embedding rows' scale. */
static void plan_queries(const twn_mkmodel_preset *p, wlist *L) {
    wl_add(L, 0.0f, 1.0f / sqrtf((float)p->hidden), 2, (const int64_t[]){p->n_queries, p->hidden},
           "queries");
}

/* ------------------------------------------------------------------------------------------------
 * Deterministic generation */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* One stream per (seed, scope, tensor name): the scope keeps the two adapters' identically named
 * tensors apart. */
static uint64_t tensor_seed(uint64_t seed, const char *scope, const char *name) {
    uint64_t h = twn_hash64(scope, strlen(scope));
    h = mix64(h ^ twn_hash64(name, strlen(name)) * 0x9e3779b97f4a7c15ull);
    return mix64(h ^ mix64(seed + 0x632be59bd9b4e019ull));
}

/* Fills dst (F32 or BF16, n elements) with mean + std * N(0,1).  Box-Muller as in
 * twn_rng_normal, but keeping both values of each pair: the trigonometry is most of the time
 * spent on a 2B-parameter model. */
static void fill(void *dst, twn_dtype dt, int64_t n, uint64_t tseed, float mean, float std) {
    int64_t nblocks = (n + FILL_BLOCK - 1) / FILL_BLOCK;
#pragma omp parallel for schedule(dynamic, 4) if (nblocks > 8)
    for (int64_t b = 0; b < nblocks; b++) {
        twn_rng r;
        twn_rng_seed(&r, mix64(tseed ^ mix64((uint64_t)b + 1)));
        int64_t lo = b * FILL_BLOCK, hi = lo + FILL_BLOCK < n ? lo + FILL_BLOCK : n;
        for (int64_t i = lo; i < hi; i += 2) {
            double z[2] = {0, 0};
            if (std != 0.0f) {
                double u1 = twn_rng_uniform(&r), u2 = twn_rng_uniform(&r);
                double rad = sqrt(-2.0 * log(u1 < 1e-300 ? 1e-300 : u1));
                z[0] = rad * cos(2.0 * M_PI * u2);
                z[1] = rad * sin(2.0 * M_PI * u2);
            }
            for (int k = 0; k < 2 && i + k < hi; k++) {
                float v = (float)(mean + std * z[k]);
                if (dt == TWN_DT_BF16)
                    ((uint16_t *)dst)[i + k] = twn_f32_to_bf16(v);
                else
                    ((float *)dst)[i + k] = v;
            }
        }
    }
}

/* Materializes one planned tensor into a new buffer of dtype dt (twn_free it). */
static void *make_tensor(const wspec *w, twn_dtype dt, uint64_t seed, const char *scope,
                         size_t *nbytes, twn_err *err) {
    int64_t n = ws_numel(w);
    size_t bytes = (size_t)n * twn_dtype_size(dt);
    void *buf = twn_try_alloc(bytes ? bytes : 1);
    if (!buf) {
        twn_err_set(err, "cannot allocate %zu bytes for %s", bytes, w->name);
        return NULL;
    }
    fill(buf, dt, n, tensor_seed(seed, scope, w->name), w->mean, w->std);
    if (w->zero_mean && dt == TWN_DT_F32) {
        float *f = buf;
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += f[i];
        for (int64_t i = 0; i < n; i++) f[i] = (float)(f[i] - s / (double)n);
    }
    *nbytes = bytes;
    return buf;
}

/* ------------------------------------------------------------------------------------------------
 * Files */

static int write_json(const char *dir, const char *name, json_t *root, size_t flags, twn_err *err) {
    char *s = json_dumps(root, flags | JSON_INDENT(2) | JSON_REAL_PRECISION(15));
    json_decref(root);
    if (!s) return twn_err_set(err, "cannot serialize %s", name);
    twn_str text = {0};
    twn_str_puts(&text, s);
    twn_str_puts(&text, "\n");
    free(s);
    char *path = twn_path_join(dir, name);
    int rc = twn_write_file_atomic(path, text.v, text.n, err);
    twn_free(path);
    twn_str_free(&text);
    return rc;
}

static json_t *int_list(const int *v, int n) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

/* config.json as transformers 5.x saves a Qwen3VLConfig (rope_parameters form). */
static json_t *config_json(const twn_mkmodel_preset *p, twn_dtype dt) {
    const char *dtype = dt == TWN_DT_BF16 ? "bfloat16" : "float32";
    json_t *rope =
        json_pack("{s:s, s:f, s:o, s:b}", "rope_type", "default", "rope_theta", QWEN_ROPE_THETA,
                  "mrope_section", int_list(p->mrope_section, 3), "mrope_interleaved", 1);
    json_t *text = json_pack(
        "{s:b, s:f, s:i, s:s, s:i, s:i, s:s, s:i, s:f, s:i, s:i, s:s, s:i, s:i, s:i, s:f, s:o, "
        "s:b, s:b, s:i}",
        "attention_bias", 0, "attention_dropout", 0.0, "bos_token_id", QWEN_BOS, "dtype", dtype,
        "eos_token_id", QWEN_EOS, "head_dim", p->head_dim, "hidden_act", "silu", "hidden_size",
        p->hidden, "initializer_range", 0.02, "intermediate_size", p->intermediate,
        "max_position_embeddings", QWEN_MAX_POS, "model_type", "qwen3_vl_text",
        "num_attention_heads", p->heads, "num_hidden_layers", p->layers, "num_key_value_heads",
        p->kv_heads, "rms_norm_eps", QWEN_RMS_EPS, "rope_parameters", rope, "tie_word_embeddings",
        p->tied, "use_cache", 1, "vocab_size", QWEN_VOCAB);
    json_t *vision = json_pack(
        "{s:o, s:i, s:s, s:i, s:i, s:f, s:i, s:s, s:i, s:i, s:i, s:i, s:i, s:i}",
        "deepstack_visual_indexes", int_list(p->deepstack, p->n_deepstack), "depth", p->v_depth,
        "hidden_act", "gelu_pytorch_tanh", "hidden_size", p->v_hidden, "in_channels",
        VIS_IN_CHANNELS, "initializer_range", 0.02, "intermediate_size", p->v_intermediate,
        "model_type", "qwen3_vl", "num_heads", p->v_heads, "num_position_embeddings",
        VIS_POS_EMBEDDINGS, "out_hidden_size", p->hidden, "patch_size", VIS_PATCH,
        "spatial_merge_size", VIS_MERGE, "temporal_patch_size", VIS_TEMPORAL);
    return json_pack("{s:[s], s:s, s:i, s:s, s:o, s:b, s:s, s:i, s:o, s:i, s:i}", "architectures",
                     "Qwen3VLForConditionalGeneration", "dtype", dtype, "image_token_id",
                     QWEN_IMAGE_TOKEN, "model_type", "qwen3_vl", "text_config", text,
                     "tie_word_embeddings", p->tied, "transformers_version", TRANSFORMERS_VERSION,
                     "video_token_id", QWEN_VIDEO_TOKEN, "vision_config", vision,
                     "vision_end_token_id", QWEN_VISION_END, "vision_start_token_id",
                     QWEN_VISION_START);
}

static json_t *generation_json(void) {
    return json_pack("{s:i, s:b, s:[i,i], s:i, s:s}", "bos_token_id", QWEN_BOS, "do_sample", 0,
                     "eos_token_id", QWEN_EOS, QWEN_BOS, "pad_token_id", QWEN_PAD,
                     "transformers_version", TRANSFORMERS_VERSION);
}

/* The released Qwen3-VL processor settings (spec §2.5), expanded to every key the fast image
 * processor reads. */
static json_t *preprocessor_json(void) {
    return json_pack("{s:b, s:b, s:b, s:b, s:[f,f,f], s:s, s:[f,f,f], s:i, s:i, s:s, s:i, s:f, "
                     "s:{s:i, s:i}, s:i}",
                     "do_convert_rgb", 1, "do_normalize", 1, "do_rescale", 1, "do_resize", 1,
                     "image_mean", 0.5, 0.5, 0.5, "image_processor_type",
                     "Qwen2VLImageProcessorFast", "image_std", 0.5, 0.5, 0.5, "merge_size",
                     VIS_MERGE, "patch_size", VIS_PATCH, "processor_class", "Qwen3VLProcessor",
                     "resample", 3, "rescale_factor", 1.0 / 255.0, "size", "longest_edge", 16777216,
                     "shortest_edge", 65536, "temporal_patch_size", VIS_TEMPORAL);
}

/* Used only when the tokenizer.json has no tokenizer_config.json beside it. */
static json_t *tokenizer_config_json(void) {
    return json_pack("{s:b, s:b, s:n, s:b, s:s, s:s, s:i, s:s, s:b, s:s, s:n}", "add_bos_token", 0,
                     "add_prefix_space", 0, "bos_token", "clean_up_tokenization_spaces", 0,
                     "eos_token", "<|im_end|>", "errors", "replace", "model_max_length", 262144,
                     "pad_token", "<|endoftext|>", "split_special_tokens", 0, "tokenizer_class",
                     "Qwen2Tokenizer", "unk_token");
}

/* adapter_config.json with every field peft 0.18 writes for a plain LoRA. */
static json_t *adapter_config_json(const twn_mkmodel_preset *p, bool embedding) {
    json_t *targets;
    if (p->regex_targets) {
        targets = json_string(".*language_model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)_proj|"
                              "mlp\\.(gate|up|down)_proj)");
    } else {
        /* peft keeps target_modules as a set; it lands on disk in no particular order. */
        static const char *const sorted[N_LM_TARGETS] = {
            "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"};
        targets = json_array();
        for (int i = 0; i < N_LM_TARGETS; i++)
            json_array_append_new(targets, json_string(sorted[i]));
    }
    json_t *rank_pattern = json_object();
    if (embedding && p->emb_q_rank > 0)
        json_object_set_new(rank_pattern, "q_proj", json_integer(p->emb_q_rank));
    json_t *c = json_object();
    json_object_set_new(c, "alora_invocation_tokens", json_null());
    json_object_set_new(c, "alpha_pattern", json_object());
    json_object_set_new(c, "arrow_config", json_null());
    json_object_set_new(c, "auto_mapping", json_null());
    json_object_set_new(c, "base_model_name_or_path", json_null());
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "corda_config", json_null());
    json_object_set_new(c, "ensure_weight_tying", json_false());
    json_object_set_new(c, "eva_config", json_null());
    json_object_set_new(c, "exclude_modules", json_null());
    json_object_set_new(c, "fan_in_fan_out", json_false());
    json_object_set_new(c, "inference_mode", json_true());
    json_object_set_new(c, "init_lora_weights", json_true());
    json_object_set_new(c, "layer_replication", json_null());
    json_object_set_new(c, "layers_pattern", json_null());
    json_object_set_new(c, "layers_to_transform", json_null());
    json_object_set_new(c, "loftq_config", json_object());
    json_object_set_new(c, "lora_alpha", json_integer(p->lora_alpha));
    json_object_set_new(c, "lora_bias", json_false());
    json_object_set_new(c, "lora_dropout", json_real(0.0));
    json_object_set_new(c, "megatron_config", json_null());
    json_object_set_new(c, "megatron_core", json_string("megatron.core"));
    json_object_set_new(c, "modules_to_save", json_null());
    json_object_set_new(c, "peft_type", json_string("LORA"));
    json_object_set_new(c, "peft_version", json_string(PEFT_VERSION));
    json_object_set_new(c, "qalora_group_size", json_integer(16));
    json_object_set_new(c, "r", json_integer(p->lora_r));
    json_object_set_new(c, "rank_pattern", rank_pattern);
    json_object_set_new(c, "revision", json_null());
    json_object_set_new(c, "target_modules", targets);
    json_object_set_new(c, "target_parameters", json_null());
    json_object_set_new(c, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(c, "trainable_token_indices", json_null());
    json_object_set_new(c, "use_dora", json_false());
    json_object_set_new(c, "use_qalora", json_false());
    json_object_set_new(c, "use_rslora", json_boolean(p->use_rslora));
    return c;
}

static int copy_file(const char *src, const char *dst, twn_err *err) {
    char *data;
    size_t len;
    if (twn_read_file(src, (size_t)1 << 30, &data, &len, err) != 0) return -1;
    int rc = twn_write_file_atomic(dst, data, len, err);
    twn_free(data);
    return rc;
}

/* Removes what a previous run into the same directory may have left that a loader would prefer
 * over the new files: the manifest (written last), and model*.safetensors + the shard index (a
 * stale index would shadow a new single file). */
static int clear_stale(const char *out_dir, const char *base_dir, twn_err *err) {
    char *m = twn_path_join(out_dir, "twn.json");
    int rc = unlink(m) != 0 && errno != ENOENT ? twn_err_errno(err, "cannot remove %s", m) : 0;
    twn_free(m);
    if (rc) return rc;
    DIR *d = opendir(base_dir);
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        bool st = n > 12 && !strncmp(e->d_name, "model", 5) &&
                  !strcmp(e->d_name + n - 12, ".safetensors");
        if (!st && strcmp(e->d_name, "model.safetensors.index.json")) continue;
        char *f = twn_path_join(base_dir, e->d_name);
        if (unlink(f) != 0 && errno != ENOENT) rc = twn_err_errno(err, "cannot remove %s", f);
        twn_free(f);
        if (rc) break;
    }
    closedir(d);
    return rc;
}

/* Writes planned tensors [lo, hi) of L into one safetensors file. */
static int write_st(const char *path, const wlist *L, size_t lo, size_t hi, twn_dtype dt,
                    uint64_t seed, const char *scope, twn_err *err) {
    twn_st_writer *w = twn_st_writer_new();
    twn_st_writer_meta(w, "format", "pt");
    int rc = 0;
    for (size_t i = lo; i < hi && !rc; i++) {
        size_t nb;
        void *buf = make_tensor(&L->v[i], dt, seed, scope, &nb, err);
        if (!buf) {
            rc = -1;
            break;
        }
        rc = twn_st_writer_add(w, L->v[i].name, dt, L->v[i].ndim, L->v[i].shape, buf, err);
        twn_free(buf);
    }
    if (!rc) rc = twn_st_writer_write(w, path, err);
    twn_st_writer_free(w);
    return rc;
}

/* Shard boundaries: greedy in plan order, a new shard when the next tensor would pass max_bytes
 * (a tensor larger than max_bytes gets a shard of its own).  bounds[0..n] with n = return. */
static int shard_bounds(const wlist *L, twn_dtype dt, uint64_t max_bytes, size_t *bounds) {
    int n = 0;
    uint64_t cur = 0;
    bounds[0] = 0;
    for (size_t i = 0; i < L->n; i++) {
        uint64_t b = (uint64_t)ws_numel(&L->v[i]) * twn_dtype_size(dt);
        if (max_bytes && cur > 0 && cur + b > max_bytes) {
            bounds[++n] = i;
            cur = 0;
        }
        cur += b;
    }
    bounds[++n] = L->n;
    return n;
}

static int write_base_weights(const char *base_dir, const twn_mkmodel_preset *p, const wlist *L,
                              twn_dtype dt, uint64_t seed, twn_err *err) {
    size_t *bounds = twn_malloc((L->n + 2) * sizeof *bounds);
    int n = shard_bounds(L, dt, p->max_shard_bytes, bounds);
    int rc = 0;
    if (n == 1) {
        char *path = twn_path_join(base_dir, "model.safetensors");
        rc = write_st(path, L, 0, L->n, dt, seed, "base", err);
        twn_free(path);
        twn_free(bounds);
        return rc;
    }
    json_t *map = json_object();
    int64_t params = 0;
    uint64_t bytes = 0;
    for (int s = 0; s < n && !rc; s++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, n);
        char *path = twn_path_join(base_dir, name);
        rc = write_st(path, L, bounds[s], bounds[s + 1], dt, seed, "base", err);
        twn_free(path);
        for (size_t i = bounds[s]; i < bounds[s + 1]; i++) {
            json_object_set_new(map, L->v[i].name, json_string(name));
            params += ws_numel(&L->v[i]);
            bytes += (uint64_t)ws_numel(&L->v[i]) * twn_dtype_size(dt);
        }
    }
    twn_free(bounds);
    if (rc) {
        json_decref(map);
        return rc;
    }
    json_t *index =
        json_pack("{s:{s:I, s:I}, s:o}", "metadata", "total_parameters", (json_int_t)params,
                  "total_size", (json_int_t)bytes, "weight_map", map);
    return write_json(base_dir, "model.safetensors.index.json", index, JSON_SORT_KEYS, err);
}

static int write_adapter(const char *dir, const twn_mkmodel_preset *p, bool embedding,
                         uint64_t seed, twn_err *err) {
    if (twn_mkdirs(dir, err) != 0) return -1;
    if (write_json(dir, "adapter_config.json", adapter_config_json(p, embedding), JSON_SORT_KEYS,
                   err) != 0)
        return -1;
    wlist L = {0};
    plan_adapter(p, embedding, &L);
    char *path = twn_path_join(dir, "adapter_model.safetensors");
    int rc =
        write_st(path, &L, 0, L.n, TWN_DT_F32, seed, embedding ? "embedding" : "reasoning", err);
    twn_free(path);
    wl_free(&L);
    return rc;
}

/* A planned list of float32 tensors as a .pt file (state_dict, or a bare tensor). */
static int write_pt(const char *path, const wlist *L, bool bare, uint64_t seed, const char *scope,
                    twn_err *err) {
    twn_tensor *t = twn_calloc(L->n, sizeof *t);
    int rc = 0;
    for (size_t i = 0; i < L->n && !rc; i++) {
        size_t nb;
        void *buf = make_tensor(&L->v[i], TWN_DT_F32, seed, scope, &nb, err);
        if (!buf) {
            rc = -1;
            break;
        }
        t[i] = (twn_tensor){.name = bare ? "" : L->v[i].name,
                            .dtype = TWN_DT_F32,
                            .ndim = L->v[i].ndim,
                            .data = buf,
                            .nbytes = nb};
        memcpy(t[i].shape, L->v[i].shape, (size_t)L->v[i].ndim * sizeof(int64_t));
    }
    if (!rc) rc = twn_pt_write(path, t, L->n, bare, err);
    for (size_t i = 0; i < L->n; i++) twn_free((void *)t[i].data);
    twn_free(t);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Public entry points */

static int64_t wl_params(const wlist *L, const char *prefix) {
    int64_t n = 0;
    for (size_t i = 0; i < L->n; i++)
        if (!prefix || !strncmp(L->v[i].name, prefix, strlen(prefix))) n += ws_numel(&L->v[i]);
    return n;
}

int twn_mkmodel_plan(const char *preset, twn_dtype dtype, twn_mkmodel_stats *st, twn_err *err) {
    const twn_mkmodel_preset *p;
    if (lookup(preset, &p, err) != 0) return -1;
    if (dtype != TWN_DT_BF16 && dtype != TWN_DT_F32)
        return twn_err_set(err, "dtype %s not supported (bf16 or f32)", twn_dtype_name(dtype));
    memset(st, 0, sizeof *st);
    wlist base = {0}, ad = {0}, gate = {0}, q = {0};
    plan_text(p, &base);
    plan_vision(p, &base);
    plan_adapter(p, true, &ad);
    plan_gate(p, &gate);
    plan_queries(p, &q);
    st->base_params = wl_params(&base, NULL);
    st->vision_params = wl_params(&base, "model.visual.");
    /* The reasoning adapter has no rank_pattern, so its size may differ from the embedding one. */
    wlist ad2 = {0};
    plan_adapter(p, false, &ad2);
    st->adapter_params = wl_params(&ad, NULL) + wl_params(&ad2, NULL);
    st->gate_params = wl_params(&gate, NULL);
    st->query_params = wl_params(&q, NULL);
    st->n_base_tensors = (int)base.n;
    st->n_adapter_tensors = (int)ad.n;
    size_t *bounds = twn_malloc((base.n + 2) * sizeof *bounds);
    st->n_shards = shard_bounds(&base, dtype, p->max_shard_bytes, bounds);
    twn_free(bounds);
    st->tensor_bytes = (uint64_t)st->base_params * twn_dtype_size(dtype) +
                       4ull * (uint64_t)(st->adapter_params + st->gate_params + st->query_params);
    wl_free(&base);
    wl_free(&ad);
    wl_free(&ad2);
    wl_free(&gate);
    wl_free(&q);
    return 0;
}

int twn_mkmodel_write(const char *out_dir, const char *preset, uint64_t seed, twn_dtype dtype,
                      const char *tokenizer_json, twn_err *err) {
    const twn_mkmodel_preset *p;
    if (lookup(preset, &p, err) != 0) return -1;
    if (dtype != TWN_DT_BF16 && dtype != TWN_DT_F32)
        return twn_err_set(err, "dtype %s not supported (bf16 or f32)", twn_dtype_name(dtype));
    if (!tokenizer_json || !*tokenizer_json) tokenizer_json = TWN_TOKENIZER_JSON;
    if (!*tokenizer_json)
        return twn_err_set(err, "no tokenizer.json given and the build has no default");
    if (!twn_path_exists(tokenizer_json))
        return twn_err_set(err,
                           "tokenizer %s does not exist (scripts/setup.sh fetches the default; "
                           "or pass another tokenizer.json)",
                           tokenizer_json);

    int rc = -1;
    char *base_dir = twn_path_join(out_dir, "base");
    char *emb_dir = twn_path_join(out_dir, "embedding");
    char *rsn_dir = twn_path_join(out_dir, "reasoning");
    char *tok_dir = twn_path_dirname(tokenizer_json);
    char *tok_cfg = twn_path_join(tok_dir, "tokenizer_config.json");
    char *path = NULL, *manifest = NULL;
    wlist L = {0};

    if (twn_mkdirs(out_dir, err) != 0 || twn_mkdirs(base_dir, err) != 0) goto out;
    if (clear_stale(out_dir, base_dir, err) != 0) goto out;

    /* base/: config, tokenizer and processor files, then the weights */
    if (write_json(base_dir, "config.json", config_json(p, dtype), JSON_SORT_KEYS, err) != 0 ||
        write_json(base_dir, "generation_config.json", generation_json(), JSON_SORT_KEYS, err) !=
            0 ||
        write_json(base_dir, "preprocessor_config.json", preprocessor_json(), JSON_SORT_KEYS,
                   err) != 0)
        goto out;
    path = twn_path_join(base_dir, "tokenizer.json");
    if (copy_file(tokenizer_json, path, err) != 0) goto out;
    twn_free(path);
    path = twn_path_join(base_dir, "tokenizer_config.json");
    if (twn_path_exists(tok_cfg) ? copy_file(tok_cfg, path, err)
                                 : write_json(base_dir, "tokenizer_config.json",
                                              tokenizer_config_json(), JSON_SORT_KEYS, err))
        goto out;
    plan_text(p, &L);
    plan_vision(p, &L);
    if (write_base_weights(base_dir, p, &L, dtype, seed, err) != 0) goto out;

    /* adapters, gate, queries */
    if (write_adapter(emb_dir, p, true, seed, err) != 0 ||
        write_adapter(rsn_dir, p, false, seed, err) != 0)
        goto out;
    wl_free(&L);
    plan_gate(p, &L);
    twn_free(path);
    path = twn_path_join(out_dir, "gate_mlp.pt");
    if (write_pt(path, &L, false, seed, "gate", err) != 0) goto out;
    wl_free(&L);
    plan_queries(p, &L);
    twn_free(path);
    path = twn_path_join(out_dir, "queries.pt");
    if (write_pt(path, &L, true, seed, "queries", err) != 0) goto out;

    /* the manifest last: its presence means the checkpoint is complete */
    manifest = twn_manifest_default_json(p->max_think_tokens, p->gate_act);
    twn_free(path);
    path = twn_path_join(out_dir, "twn.json");
    {
        twn_str text = {0};
        twn_str_puts(&text, manifest);
        twn_str_puts(&text, "\n");
        rc = twn_write_file_atomic(path, text.v, text.n, err);
        twn_str_free(&text);
    }

out:
    if (rc) twn_err_wrap(err, "mkmodel %s into %s", p->name, out_dir);
    wl_free(&L);
    twn_free(manifest);
    twn_free(path);
    twn_free(tok_cfg);
    twn_free(tok_dir);
    twn_free(rsn_dir);
    twn_free(emb_dir);
    twn_free(base_dir);
    return rc;
}
