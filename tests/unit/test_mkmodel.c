/* test_mkmodel.c — `twn mkmodel` checkpoints: determinism, the file set, and that every file
 * holds what the real formats hold (config values, tensor names and shapes, PEFT keys, .pt
 * layouts).  The expected tensor lists are written out here independently of engine/mkmodel.c. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/config.h"
#include "engine/manifest.h"
#include "engine/mkmodel.h"
#include "engine/ptfile.h"
#include "engine/safetensors.h"
#include "tests/testutil.h"
#include "util/fileio.h"
#include "util/mem.h"

static char dir_a[1024], dir_b[1024], dir_seed2[1024], dir_alt[1024];

static const char *const FILES[] = {
    "base/config.json",
    "base/generation_config.json",
    "base/model.safetensors",
    "base/preprocessor_config.json",
    "base/tokenizer.json",
    "base/tokenizer_config.json",
    "embedding/adapter_config.json",
    "embedding/adapter_model.safetensors",
    "gate_mlp.pt",
    "queries.pt",
    "reasoning/adapter_config.json",
    "reasoning/adapter_model.safetensors",
    "twn.json",
};
#define N_FILES (sizeof FILES / sizeof *FILES)

static void make(char *dst, const char *tag, const char *preset, uint64_t seed) {
    snprintf(dst, 1024, "%s", tu_tmpdir(tag));
    twn_err err = {{0}};
    if (twn_mkmodel_write(dst, preset, seed, TWN_DT_BF16, NULL, &err) != 0)
        fail_msg("mkmodel %s: %s", preset, err.msg);
}

static int setup(void **state) {
    make(dir_a, "mk-a", "tiny", 1);
    make(dir_b, "mk-b", "tiny", 1);
    make(dir_seed2, "mk-seed2", "tiny", 2);
    make(dir_alt, "mk-alt", "tiny-alt", 1);
    return 0;
}

static char *path2(const char *dir, const char *rel) {
    static char buf[4][2048];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 2048, "%s/%s", dir, rel);
    return p;
}

/* Every regular file under dir, as relative paths, into out (sorted). */
static void list_files(const char *dir, const char *rel, char **out, size_t *n) {
    char full[2048];
    snprintf(full, sizeof full, "%s%s%s", dir, *rel ? "/" : "", rel);
    DIR *d = opendir(full);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char r[1024], f[3072];
        snprintf(r, sizeof r, "%s%s%s", rel, *rel ? "/" : "", e->d_name);
        snprintf(f, sizeof f, "%s/%s", dir, r);
        struct stat st;
        assert_int_equal(stat(f, &st), 0);
        if (S_ISDIR(st.st_mode))
            list_files(dir, r, out, n);
        else
            out[(*n)++] = strdup(r);
    }
    closedir(d);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void test_file_set(void **state) {
    char *got[64];
    size_t n = 0;
    list_files(dir_a, "", got, &n);
    qsort(got, n, sizeof *got, cmp_str);
    for (size_t i = 0; i < n; i++)
        if (i >= N_FILES || strcmp(got[i], FILES[i]))
            fail_msg("unexpected file set: got %s at %zu, expected %s", got[i], i,
                     i < N_FILES ? FILES[i] : "(nothing)");
    assert_int_equal(n, N_FILES);
    for (size_t i = 0; i < n; i++) free(got[i]);
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *x = tu_read(a, &na), *y = tu_read(b, &nb);
    int same = na == nb && !memcmp(x, y, na);
    free(x);
    free(y);
    return same;
}

static void test_same_seed_same_bytes(void **state) {
    for (size_t i = 0; i < N_FILES; i++)
        if (!same_file(path2(dir_a, FILES[i]), path2(dir_b, FILES[i])))
            fail_msg("%s differs between two runs with seed 1", FILES[i]);
}

static void test_other_seed_other_weights(void **state) {
    static const char *const weights[] = {
        "base/model.safetensors", "embedding/adapter_model.safetensors",
        "reasoning/adapter_model.safetensors", "gate_mlp.pt", "queries.pt"};
    for (size_t i = 0; i < 5; i++)
        if (same_file(path2(dir_a, weights[i]), path2(dir_seed2, weights[i])))
            fail_msg("%s is the same for seeds 1 and 2", weights[i]);
    /* ...and only the weights: configs do not depend on the seed */
    assert_true(same_file(path2(dir_a, "base/config.json"), path2(dir_seed2, "base/config.json")));
    assert_true(same_file(path2(dir_a, "twn.json"), path2(dir_seed2, "twn.json")));
    /* every tensor differs, not just one */
    twn_st_file *a, *b;
    twn_err err = {{0}};
    assert_int_equal(twn_st_open(path2(dir_a, "base/model.safetensors"), &a, &err), 0);
    assert_int_equal(twn_st_open(path2(dir_seed2, "base/model.safetensors"), &b, &err), 0);
    for (size_t i = 0; i < twn_st_count(a); i++) {
        const twn_tensor *x = twn_st_at(a, i), *y = twn_st_find(b, x->name);
        assert_non_null(y);
        if (!memcmp(x->data, y->data, x->nbytes)) fail_msg("%s equal for both seeds", x->name);
    }
    twn_st_close(a);
    twn_st_close(b);
}

static void test_config(void **state) {
    twn_config c;
    twn_err err = {{0}};
    if (twn_config_load(path2(dir_a, "base/config.json"), &c, &err) != 0) fail_msg("%s", err.msg);
    assert_string_equal(c.model_type, "qwen3_vl");
    assert_true(c.rope_v5);
    assert_string_equal(c.dtype, "bfloat16");
    assert_true(c.tie_word_embeddings);
    assert_int_equal(c.text.vocab_size, 151936);
    assert_int_equal(c.text.hidden_size, 64);
    assert_int_equal(c.text.intermediate_size, 128);
    assert_int_equal(c.text.num_hidden_layers, 2);
    assert_int_equal(c.text.num_attention_heads, 4);
    assert_int_equal(c.text.num_key_value_heads, 2);
    assert_int_equal(c.text.head_dim, 32);
    assert_int_equal(c.text.mrope_section[0], 6);
    assert_int_equal(c.text.mrope_section[1], 5);
    assert_int_equal(c.text.mrope_section[2], 5);
    assert_true(c.text.mrope_interleaved);
    assert_true(c.text.rope_theta == 5000000.0);
    assert_true(c.text.rms_norm_eps == 1e-6);
    assert_string_equal(c.text.hidden_act, "silu");
    assert_int_equal(c.text.bos_token_id, 151643);
    assert_int_equal(c.text.eos_token_id, 151645);
    assert_true(c.has_vision);
    assert_int_equal(c.vision.depth, 2);
    assert_int_equal(c.vision.hidden_size, 32);
    assert_int_equal(c.vision.intermediate_size, 64);
    assert_int_equal(c.vision.num_heads, 2);
    assert_int_equal(c.vision.patch_size, 16);
    assert_int_equal(c.vision.temporal_patch_size, 2);
    assert_int_equal(c.vision.spatial_merge_size, 2);
    assert_int_equal(c.vision.out_hidden_size, 64);
    assert_int_equal(c.vision.num_position_embeddings, 2304);
    assert_int_equal(c.vision.n_deepstack, 2);
    assert_int_equal(c.vision.deepstack_visual_indexes[0], 0);
    assert_int_equal(c.vision.deepstack_visual_indexes[1], 1);
    assert_string_equal(c.vision.hidden_act, "gelu_pytorch_tanh");
    assert_int_equal(c.image_token_id, 151655);
    assert_int_equal(c.vision_start_token_id, 151652);

    /* what twn_config does not keep: the v5 spelling transformers needs to pick the class */
    json_error_t je;
    json_t *root = json_load_file(path2(dir_a, "base/config.json"), 0, &je);
    assert_non_null(root);
    assert_string_equal(
        json_string_value(json_array_get(json_object_get(root, "architectures"), 0)),
        "Qwen3VLForConditionalGeneration");
    assert_string_equal(json_string_value(json_object_get(root, "transformers_version")), "5.17.0");
    json_t *text = json_object_get(root, "text_config");
    assert_true(json_is_true(json_object_get(text, "tie_word_embeddings")));
    assert_null(json_object_get(text, "rope_scaling"));
    json_t *rp = json_object_get(text, "rope_parameters");
    assert_string_equal(json_string_value(json_object_get(rp, "rope_type")), "default");
    assert_true(json_is_true(json_object_get(rp, "mrope_interleaved")));
    json_decref(root);

    root = json_load_file(path2(dir_a, "base/generation_config.json"), 0, &je);
    assert_int_equal(json_integer_value(json_object_get(root, "pad_token_id")), 151643);
    assert_int_equal(json_integer_value(json_array_get(json_object_get(root, "eos_token_id"), 1)),
                     151643);
    assert_true(json_is_false(json_object_get(root, "do_sample")));
    json_decref(root);
    root = json_load_file(path2(dir_a, "base/preprocessor_config.json"), 0, &je);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(root, "size"), "shortest_edge")), 65536);
    assert_int_equal(json_integer_value(json_object_get(root, "resample")), 3);
    assert_true(json_real_value(json_object_get(root, "rescale_factor")) == 1.0 / 255.0);
    assert_string_equal(json_string_value(json_object_get(root, "image_processor_type")),
                        "Qwen2VLImageProcessorFast");
    json_decref(root);
    /* the tokenizer is copied verbatim */
    assert_true(same_file(path2(dir_a, "base/tokenizer.json"), TWN_TOKENIZER_JSON));
}

/* The tiny preset's base tensors, written out from spec §1.2 / §2.2. */
typedef struct {
    char name[128];
    int ndim;
    int64_t shape[5];
} expect;

/* One expected tensor; fmt may or may not contain the %d for i. */
static void ex(expect *e, size_t *n, int ndim, int64_t d0, int64_t d1, const char *fmt, int i) {
    snprintf(e[*n].name, sizeof e[*n].name, fmt, i);
    e[*n].ndim = ndim;
    e[*n].shape[0] = d0;
    e[*n].shape[1] = d1;
    (*n)++;
}

static size_t tiny_expected(expect *e) {
    size_t n = 0;
    ex(e, &n, 2, 151936, 64, "model.language_model.embed_tokens.weight", 0);
    ex(e, &n, 1, 64, 0, "model.language_model.norm.weight", 0);
    for (int i = 0; i < 2; i++) {
        ex(e, &n, 1, 64, 0, "model.language_model.layers.%d.input_layernorm.weight", i);
        ex(e, &n, 2, 128, 64, "model.language_model.layers.%d.self_attn.q_proj.weight", i);
        ex(e, &n, 2, 64, 64, "model.language_model.layers.%d.self_attn.k_proj.weight", i);
        ex(e, &n, 2, 64, 64, "model.language_model.layers.%d.self_attn.v_proj.weight", i);
        ex(e, &n, 2, 64, 128, "model.language_model.layers.%d.self_attn.o_proj.weight", i);
        ex(e, &n, 1, 32, 0, "model.language_model.layers.%d.self_attn.q_norm.weight", i);
        ex(e, &n, 1, 32, 0, "model.language_model.layers.%d.self_attn.k_norm.weight", i);
        ex(e, &n, 1, 64, 0, "model.language_model.layers.%d.post_attention_layernorm.weight", i);
        ex(e, &n, 2, 128, 64, "model.language_model.layers.%d.mlp.gate_proj.weight", i);
        ex(e, &n, 2, 128, 64, "model.language_model.layers.%d.mlp.up_proj.weight", i);
        ex(e, &n, 2, 64, 128, "model.language_model.layers.%d.mlp.down_proj.weight", i);
    }
    ex(e, &n, 5, 32, 3, "model.visual.patch_embed.proj.weight", 0);
    e[n - 1].shape[2] = 2, e[n - 1].shape[3] = 16, e[n - 1].shape[4] = 16;
    ex(e, &n, 1, 32, 0, "model.visual.patch_embed.proj.bias", 0);
    ex(e, &n, 2, 2304, 32, "model.visual.pos_embed.weight", 0);
    for (int i = 0; i < 2; i++) {
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.norm1.weight", i);
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.norm1.bias", i);
        ex(e, &n, 2, 96, 32, "model.visual.blocks.%d.attn.qkv.weight", i);
        ex(e, &n, 1, 96, 0, "model.visual.blocks.%d.attn.qkv.bias", i);
        ex(e, &n, 2, 32, 32, "model.visual.blocks.%d.attn.proj.weight", i);
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.attn.proj.bias", i);
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.norm2.weight", i);
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.norm2.bias", i);
        ex(e, &n, 2, 64, 32, "model.visual.blocks.%d.mlp.linear_fc1.weight", i);
        ex(e, &n, 1, 64, 0, "model.visual.blocks.%d.mlp.linear_fc1.bias", i);
        ex(e, &n, 2, 32, 64, "model.visual.blocks.%d.mlp.linear_fc2.weight", i);
        ex(e, &n, 1, 32, 0, "model.visual.blocks.%d.mlp.linear_fc2.bias", i);
    }
    ex(e, &n, 1, 32, 0, "model.visual.merger.norm.weight", 0);
    ex(e, &n, 1, 32, 0, "model.visual.merger.norm.bias", 0);
    ex(e, &n, 2, 128, 128, "model.visual.merger.linear_fc1.weight", 0);
    ex(e, &n, 1, 128, 0, "model.visual.merger.linear_fc1.bias", 0);
    ex(e, &n, 2, 64, 128, "model.visual.merger.linear_fc2.weight", 0);
    ex(e, &n, 1, 64, 0, "model.visual.merger.linear_fc2.bias", 0);
    for (int k = 0; k < 2; k++) {
        ex(e, &n, 1, 128, 0, "model.visual.deepstack_merger_list.%d.norm.weight", k);
        ex(e, &n, 1, 128, 0, "model.visual.deepstack_merger_list.%d.norm.bias", k);
        ex(e, &n, 2, 128, 128, "model.visual.deepstack_merger_list.%d.linear_fc1.weight", k);
        ex(e, &n, 1, 128, 0, "model.visual.deepstack_merger_list.%d.linear_fc1.bias", k);
        ex(e, &n, 2, 64, 128, "model.visual.deepstack_merger_list.%d.linear_fc2.weight", k);
        ex(e, &n, 1, 64, 0, "model.visual.deepstack_merger_list.%d.linear_fc2.bias", k);
    }
    return n;
}

static void to_f32(const twn_tensor *t, float **out, int64_t *n) {
    *n = twn_tensor_numel(t);
    *out = malloc((size_t)*n * sizeof **out);
    twn_err err = {{0}};
    assert_int_equal(twn_tensor_to_f32(t, *out, &err), 0);
}

static void mean_std(const twn_tensor *t, double *mean, double *std) {
    float *v;
    int64_t n;
    to_f32(t, &v, &n);
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += v[i], ss += (double)v[i] * v[i];
    *mean = s / (double)n;
    *std = sqrt(fmax(ss / (double)n - *mean * *mean, 0));
    free(v);
}

static void test_base_tensors(void **state) {
    expect e[128];
    size_t n = tiny_expected(e);
    assert_int_equal(n, 69); /* 1 + 2 x 11 + 1 text, 3 + 2 x 12 + 6 + 2 x 6 vision */
    twn_st_file *f;
    twn_err err = {{0}};
    assert_int_equal(twn_st_open(path2(dir_a, "base/model.safetensors"), &f, &err), 0);
    assert_int_equal(twn_st_count(f), n);
    assert_string_equal(twn_st_metadata(f, "format"), "pt");
    for (size_t i = 0; i < n; i++) {
        const twn_tensor *t = twn_st_find(f, e[i].name);
        if (!t) fail_msg("missing %s", e[i].name);
        assert_int_equal(t->dtype, TWN_DT_BF16);
        if (twn_tensor_expect(t, "tiny", e[i].ndim, e[i].shape, &err) != 0) fail_msg("%s", err.msg);
    }
    assert_null(twn_st_find(f, "lm_head.weight")); /* tied */

    /* the init distributions: linear N(0, 1/in), embeddings N(0, 1/H), norms 1 + 0.1 N */
    double m, s;
    mean_std(twn_st_find(f, "model.language_model.embed_tokens.weight"), &m, &s);
    assert_true(fabs(m) < 0.002 && fabs(s - 0.125) < 0.002);
    mean_std(twn_st_find(f, "model.language_model.layers.1.mlp.down_proj.weight"), &m, &s);
    assert_true(fabs(m) < 0.01 && fabs(s - 1 / sqrt(128.0)) < 0.01);
    mean_std(twn_st_find(f, "model.language_model.layers.0.input_layernorm.weight"), &m, &s);
    assert_true(fabs(m - 1) < 0.05 && s > 0.05 && s < 0.15);
    mean_std(twn_st_find(f, "model.visual.blocks.0.attn.qkv.bias"), &m, &s);
    assert_true(s > 0.01 && s < 0.03);
    twn_st_close(f);
}

static const char *const TARGETS[7][2] = {
    {"self_attn", "q_proj"}, {"self_attn", "k_proj"}, {"self_attn", "v_proj"},
    {"self_attn", "o_proj"}, {"mlp", "gate_proj"},    {"mlp", "up_proj"},
    {"mlp", "down_proj"},
};

/* Checks one adapter's keys and shapes: in/out per target, ranks r (q_proj: rq). */
static void check_adapter(const char *dir, int layers, const int64_t in[7], const int64_t out[7],
                          int r, int rq) {
    twn_st_file *f;
    twn_err err = {{0}};
    assert_int_equal(twn_st_open(path2(dir, "adapter_model.safetensors"), &f, &err), 0);
    assert_int_equal(twn_st_count(f), (size_t)layers * 7 * 2);
    for (int i = 0; i < layers; i++)
        for (int t = 0; t < 7; t++) {
            char name[256];
            int rank = t == 0 ? rq : r;
            snprintf(name, sizeof name,
                     "base_model.model.model.language_model.layers.%d.%s.%s.lora_A.weight", i,
                     TARGETS[t][0], TARGETS[t][1]);
            const twn_tensor *a = twn_st_find(f, name);
            if (!a) fail_msg("missing %s", name);
            assert_int_equal(a->dtype, TWN_DT_F32);
            if (twn_tensor_expect(a, dir, 2, (int64_t[]){rank, in[t]}, &err))
                fail_msg("%s", err.msg);
            name[strlen(name) - 8] = 'B'; /* "lora_A.weight" -> "lora_B.weight" */
            const twn_tensor *b = twn_st_find(f, name);
            if (!b) fail_msg("missing %s", name);
            if (twn_tensor_expect(b, dir, 2, (int64_t[]){out[t], rank}, &err))
                fail_msg("%s", err.msg);
            double m, s;
            mean_std(b, &m, &s);
            assert_true(s > 0); /* B != 0: the adapter is not a no-op */
        }
    twn_st_close(f);
}

static json_t *load_json(const char *path) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) fail_msg("%s: %s", path, je.text);
    return j;
}

static void test_adapters(void **state) {
    const int64_t in[7] = {64, 64, 64, 128, 64, 64, 128}, out[7] = {128, 64, 64, 64, 128, 128, 64};
    check_adapter(path2(dir_a, "embedding"), 2, in, out, 4, 4);
    check_adapter(path2(dir_a, "reasoning"), 2, in, out, 4, 4);
    assert_false(same_file(path2(dir_a, "embedding/adapter_model.safetensors"),
                           path2(dir_a, "reasoning/adapter_model.safetensors")));

    json_t *c = load_json(path2(dir_a, "embedding/adapter_config.json"));
    assert_string_equal(json_string_value(json_object_get(c, "peft_type")), "LORA");
    assert_int_equal(json_integer_value(json_object_get(c, "r")), 4);
    assert_int_equal(json_integer_value(json_object_get(c, "lora_alpha")), 8);
    assert_true(json_number_value(json_object_get(c, "lora_dropout")) == 0.0);
    assert_string_equal(json_string_value(json_object_get(c, "bias")), "none");
    assert_true(json_is_false(json_object_get(c, "use_rslora")));
    assert_true(json_is_false(json_object_get(c, "use_dora")));
    assert_true(json_is_false(json_object_get(c, "fan_in_fan_out")));
    assert_true(json_is_true(json_object_get(c, "init_lora_weights")));
    assert_true(json_is_true(json_object_get(c, "inference_mode")));
    assert_true(json_is_null(json_object_get(c, "modules_to_save")));
    assert_int_equal(json_object_size(json_object_get(c, "rank_pattern")), 0);
    assert_int_equal(json_object_size(json_object_get(c, "alpha_pattern")), 0);
    json_t *tm = json_object_get(c, "target_modules");
    assert_int_equal(json_array_size(tm), 7);
    for (int t = 0; t < 7; t++) {
        int found = 0;
        for (size_t k = 0; k < 7; k++)
            found |= !strcmp(json_string_value(json_array_get(tm, k)), TARGETS[t][1]);
        assert_true(found);
    }
    json_decref(c);

    /* the LoRA delta is visible but small: |s B A|_F / |W|_F ~ 0.2 (s = alpha / r = 2) */
    twn_st_file *ad, *base;
    twn_err err = {{0}};
    assert_int_equal(twn_st_open(path2(dir_a, "embedding/adapter_model.safetensors"), &ad, &err),
                     0);
    assert_int_equal(twn_st_open(path2(dir_a, "base/model.safetensors"), &base, &err), 0);
    float *A, *B, *W;
    int64_t na, nb, nw;
    const char *pre = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
    char name[256];
    snprintf(name, sizeof name, "%s.lora_A.weight", pre);
    to_f32(twn_st_find(ad, name), &A, &na);
    snprintf(name, sizeof name, "%s.lora_B.weight", pre);
    to_f32(twn_st_find(ad, name), &B, &nb);
    to_f32(twn_st_find(base, "model.language_model.layers.0.self_attn.q_proj.weight"), &W, &nw);
    double dn = 0, wn = 0;
    for (int o = 0; o < 128; o++)
        for (int i = 0; i < 64; i++) {
            double d = 0;
            for (int k = 0; k < 4; k++) d += (double)B[o * 4 + k] * A[k * 64 + i];
            dn += 4.0 * d * d; /* (s * d)^2 with s = 2 */
            wn += (double)W[o * 64 + i] * W[o * 64 + i];
        }
    double ratio = sqrt(dn / wn);
    if (ratio < 0.1 || ratio > 0.35) fail_msg("LoRA delta ratio %.3f", ratio);
    free(A);
    free(B);
    free(W);
    twn_st_close(ad);
    twn_st_close(base);
}

static void test_pt_files(void **state) {
    twn_pt_file *g, *q;
    twn_err err = {{0}};
    if (twn_pt_load(path2(dir_a, "gate_mlp.pt"), &g, &err)) fail_msg("%s", err.msg);
    assert_false(twn_pt_is_bare(g));
    assert_int_equal(twn_pt_count(g), 4);
    static const char *const names[4] = {"0.weight", "0.bias", "2.weight", "2.bias"};
    static const int64_t shapes[4][2] = {{16, 64}, {16, 0}, {1, 16}, {1, 0}};
    for (int i = 0; i < 4; i++) {
        const twn_tensor *t = twn_pt_at(g, (size_t)i);
        assert_string_equal(t->name, names[i]); /* nn.Sequential order */
        assert_int_equal(t->dtype, TWN_DT_F32);
        if (twn_tensor_expect(t, "gate", shapes[i][1] ? 2 : 1, shapes[i], &err))
            fail_msg("%s", err.msg);
    }
    /* last layer zero-mean, bias 0: p_think centres on 0.5 */
    const float *w2 = twn_pt_find(g, "2.weight")->data;
    double s = 0, ss = 0;
    for (int i = 0; i < 16; i++) s += w2[i], ss += (double)w2[i] * w2[i];
    assert_true(fabs(s) < 1e-5 && ss > 0.5);
    assert_true(((const float *)twn_pt_find(g, "2.bias")->data)[0] == 0.0f);
    twn_pt_free(g);

    if (twn_pt_load(path2(dir_a, "queries.pt"), &q, &err)) fail_msg("%s", err.msg);
    assert_true(twn_pt_is_bare(q));
    assert_int_equal(twn_pt_count(q), 1);
    if (twn_tensor_expect(twn_pt_at(q, 0), "queries", 2, (int64_t[]){4, 64}, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(twn_pt_at(q, 0)->dtype, TWN_DT_F32);
    twn_pt_free(q);
}

static void test_manifest(void **state) {
    twn_manifest m;
    twn_err err = {{0}};
    if (twn_manifest_load(dir_a, &m, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m.max_think_tokens, 16);
    assert_int_equal(m.gate_activation, TWN_ACT_GELU);
    assert_true(twn_path_exists(m.gate_path));
    assert_true(twn_path_exists(m.queries_path));
    twn_manifest_free(&m);
    if (twn_manifest_load(dir_alt, &m, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m.gate_activation, TWN_ACT_RELU);
    twn_manifest_free(&m);
    /* exactly the default manifest text */
    char *want = twn_manifest_default_json(16, "gelu");
    char *got = tu_read(path2(dir_a, "twn.json"), NULL);
    assert_int_equal(strncmp(got, want, strlen(want)), 0);
    free(got);
    twn_free(want);
}

static void test_tiny_alt(void **state) {
    twn_config c;
    twn_err err = {{0}};
    if (twn_config_load(path2(dir_alt, "base/config.json"), &c, &err)) fail_msg("%s", err.msg);
    assert_false(c.tie_word_embeddings);
    assert_int_equal(c.text.hidden_size, 96);
    assert_int_equal(c.text.num_attention_heads, 6);
    assert_int_equal(c.text.num_key_value_heads, 2);
    assert_int_equal(c.text.head_dim, 16);
    assert_int_equal(c.text.mrope_section[0] + c.text.mrope_section[1] + c.text.mrope_section[2],
                     8);

    twn_st_file *f;
    assert_int_equal(twn_st_open(path2(dir_alt, "base/model.safetensors"), &f, &err), 0);
    const twn_tensor *head = twn_st_find(f, "lm_head.weight");
    assert_non_null(head);
    assert_int_equal(twn_tensor_expect(head, "alt", 2, (int64_t[]){151936, 96}, &err), 0);
    assert_int_equal(twn_st_count(f), 1 + 3 * 11 + 1 + 1 + 45);
    twn_st_close(f);

    const int64_t in[7] = {96, 96, 96, 96, 96, 96, 160}, out[7] = {96, 32, 32, 96, 160, 160, 96};
    check_adapter(path2(dir_alt, "embedding"), 3, in, out, 8, 4);
    check_adapter(path2(dir_alt, "reasoning"), 3, in, out, 8, 8);
    json_t *e = load_json(path2(dir_alt, "embedding/adapter_config.json"));
    assert_true(json_is_true(json_object_get(e, "use_rslora")));
    assert_true(json_is_string(json_object_get(e, "target_modules")));
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(e, "rank_pattern"), "q_proj")), 4);
    json_decref(e);
    json_t *r = load_json(path2(dir_alt, "reasoning/adapter_config.json"));
    assert_int_equal(json_object_size(json_object_get(r, "rank_pattern")), 0);
    json_decref(r);

    twn_pt_file *q;
    if (twn_pt_load(path2(dir_alt, "queries.pt"), &q, &err)) fail_msg("%s", err.msg);
    assert_int_equal(twn_tensor_expect(twn_pt_at(q, 0), "queries", 2, (int64_t[]){2, 96}, &err), 0);
    twn_pt_free(q);
}

static void test_plan(void **state) {
    twn_mkmodel_stats st;
    twn_err err = {{0}};
    assert_int_equal(twn_mkmodel_plan("tiny", TWN_DT_BF16, &st, &err), 0);
    expect e[128];
    size_t n = tiny_expected(e);
    int64_t params = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t k = 1;
        for (int d = 0; d < e[i].ndim; d++) k *= e[i].shape[d];
        params += k;
    }
    assert_int_equal(st.base_params, params);
    assert_int_equal(st.n_base_tensors, 69);
    assert_int_equal(st.n_shards, 1);
    /* 2 layers x (q 4*(64+128) + k,v 2 x 4*(64+64) + o 4*(128+64) + gate,up 2 x 4*(64+128) +
     * down 4*(128+64)) per adapter */
    assert_int_equal(st.adapter_params, 2 * 2 * (4 * 192 * 5 + 2 * 4 * 128));
    assert_int_equal(st.gate_params, 16 * 64 + 16 + 16 + 1);
    assert_int_equal(st.query_params, 4 * 64);

    /* Qwen3-VL-2B: ~1.72B text + ~0.41B vision, written as shards */
    assert_int_equal(twn_mkmodel_plan("qwen3vl-2b", TWN_DT_BF16, &st, &err), 0);
    assert_true(st.base_params > 2100000000 && st.base_params < 2150000000);
    assert_true(st.vision_params > 400000000 && st.vision_params < 420000000);
    assert_true(st.n_shards >= 2);
}

static void test_bad_preset(void **state) {
    twn_err err = {{0}};
    const char *d = tu_tmpdir("mk-bad");
    assert_int_equal(twn_mkmodel_write(d, "huge", 1, TWN_DT_BF16, NULL, &err), -1);
    assert_non_null(strstr(err.msg, "unknown preset 'huge'"));
    assert_non_null(strstr(err.msg, "tiny, tiny-alt, qwen3-0.5b, qwen3vl-2b"));

    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out '%s' --preset huge", TWN_BIN, d);
    assert_int_equal(tu_run(cmd, &out), 2);
    assert_non_null(strstr(out, "tiny, tiny-alt"));
    free(out);
}

static void test_unwritable_out(void **state) {
    const char *d = tu_tmpdir("mk-unwritable");
    char file[1200], outdir[1300];
    snprintf(file, sizeof file, "%s/a-file", d);
    tu_write(file, "x", 1);
    snprintf(outdir, sizeof outdir, "%s/model", file); /* a directory under a regular file */
    twn_err err = {{0}};
    assert_int_equal(twn_mkmodel_write(outdir, "tiny", 1, TWN_DT_BF16, NULL, &err), -1);
    assert_non_null(strstr(err.msg, "cannot create"));
    assert_non_null(strstr(err.msg, "Not a directory"));

    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out '%s'", TWN_BIN, outdir);
    assert_int_equal(tu_run(cmd, &out), 1);
    assert_non_null(strstr(out, "Not a directory"));
    free(out);
}

static void test_cli(void **state) {
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --help", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 0);
    assert_non_null(strstr(out, "qwen3vl-2b"));
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --seed 3", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 2);
    assert_non_null(strstr(out, "--out DIR is required"));
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out /tmp/x --dtype f16", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 2);
    assert_non_null(strstr(out, "bf16 or f32"));
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out /tmp/x --seed -1", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 2);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out /tmp/x --bogus", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 2);
    assert_non_null(strstr(out, "unknown option '--bogus'"));
    free(out);

    /* the command writes exactly what the library writes (here on one thread, so the bytes are
     * also independent of the thread count), and says so in one line */
    const char *d = tu_tmpdir("mk-cli");
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=1 '%s' mkmodel --out '%s' --seed=1", TWN_BIN, d);
    assert_int_equal(tu_run(cmd, &out), 0);
    assert_non_null(strstr(out, "tiny"));
    assert_non_null(strstr(out, d));
    free(out);
    for (size_t i = 0; i < N_FILES; i++)
        if (!same_file(path2(dir_a, FILES[i]), path2(d, FILES[i])))
            fail_msg("CLI and library differ in %s", FILES[i]);

    /* f32 base weights */
    snprintf(cmd, sizeof cmd, "'%s' mkmodel --out '%s' --seed 1 --dtype f32", TWN_BIN, d);
    assert_int_equal(tu_run(cmd, &out), 0);
    free(out);
    twn_config c;
    twn_err err = {{0}};
    assert_int_equal(twn_config_load(path2(d, "base/config.json"), &c, &err), 0);
    assert_string_equal(c.dtype, "float32");
    twn_st_file *f32, *bf;
    assert_int_equal(twn_st_open(path2(d, "base/model.safetensors"), &f32, &err), 0);
    assert_int_equal(twn_st_open(path2(dir_a, "base/model.safetensors"), &bf, &err), 0);
    const char *name = "model.language_model.layers.0.mlp.up_proj.weight";
    const twn_tensor *x = twn_st_find(f32, name), *y = twn_st_find(bf, name);
    assert_int_equal(x->dtype, TWN_DT_F32);
    /* the same draws, rounded to bf16 in one and not the other */
    const float *xf = x->data;
    const uint16_t *yb = y->data;
    for (int64_t i = 0; i < twn_tensor_numel(x); i++)
        assert_int_equal(twn_f32_to_bf16(xf[i]), yb[i]);
    twn_st_close(f32);
    twn_st_close(bf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_file_set),
        cmocka_unit_test(test_same_seed_same_bytes),
        cmocka_unit_test(test_other_seed_other_weights),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_base_tensors),
        cmocka_unit_test(test_adapters),
        cmocka_unit_test(test_pt_files),
        cmocka_unit_test(test_manifest),
        cmocka_unit_test(test_tiny_alt),
        cmocka_unit_test(test_plan),
        cmocka_unit_test(test_bad_preset),
        cmocka_unit_test(test_unwritable_out),
        cmocka_unit_test(test_cli),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
