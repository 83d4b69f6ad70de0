/* test_config.c — config.json parsing: the real Qwen3-VL 2B/4B/8B values (spec §1.1, §2.1) in
 * both the transformers 4.57 and the v5 RoPE spelling must give the same struct, and every
 * refusal names its key and value. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/config.h"
#include "tests/testutil.h"

/* The checkpoint values of spec §1.1 / §2.1. */
typedef struct {
    const char *name;
    int hidden, layers, heads, kv, inter;
    bool tied;
    int vdepth, vhidden, vinter, ds[3];
} qwen_size;

static const qwen_size sizes[] = {
    {"2B", 2048, 28, 16, 8, 6144, true, 24, 1024, 4096, {5, 11, 17}},
    {"4B", 2560, 36, 32, 8, 9728, true, 24, 1024, 4096, {5, 11, 17}},
    {"8B", 4096, 36, 32, 8, 12288, false, 27, 1152, 4304, {8, 16, 24}},
};

/* A config.json as the released checkpoints spell it (v5 = false: transformers 4.57 with
 * rope_theta + rope_scaling and torch_dtype) or as transformers 5 saves it (rope_parameters,
 * dtype). */
static json_t *make_config(const qwen_size *s, bool v5) {
    json_t *rope = json_pack("{s:b, s:[i,i,i], s:s}", "mrope_interleaved", 1, "mrope_section", 24,
                             20, 20, "rope_type", "default");
    json_t *text = json_pack(
        "{s:b, s:f, s:i, s:s, s:i, s:i, s:s, s:i, s:f, s:i, s:i, s:s, s:i, s:i, s:i, s:f,"
        " s:b, s:b, s:i}",
        "attention_bias", 0, "attention_dropout", 0.0, "bos_token_id", 151643, "dtype", "bfloat16",
        "eos_token_id", 151645, "head_dim", 128, "hidden_act", "silu", "hidden_size", s->hidden,
        "initializer_range", 0.02, "intermediate_size", s->inter, "max_position_embeddings", 262144,
        "model_type", "qwen3_vl_text", "num_attention_heads", s->heads, "num_hidden_layers",
        s->layers, "num_key_value_heads", s->kv, "rms_norm_eps", 1e-6, "tie_word_embeddings",
        s->tied, "use_cache", 1, "vocab_size", 151936);
    if (v5) {
        json_object_set_new(rope, "rope_theta", json_real(5000000.0));
        json_object_set_new(text, "rope_parameters", rope);
    } else {
        json_object_set_new(text, "rope_scaling", rope);
        json_object_set_new(text, "rope_theta", json_integer(5000000));
    }
    json_t *vision =
        json_pack("{s:[i,i,i], s:i, s:s, s:i, s:i, s:f, s:i, s:s, s:i, s:i, s:i, s:i, s:i, s:i}",
                  "deepstack_visual_indexes", s->ds[0], s->ds[1], s->ds[2], "depth", s->vdepth,
                  "hidden_act", "gelu_pytorch_tanh", "hidden_size", s->vhidden, "in_channels", 3,
                  "initializer_range", 0.02, "intermediate_size", s->vinter, "model_type",
                  "qwen3_vl", "num_heads", 16, "num_position_embeddings", 2304, "out_hidden_size",
                  s->hidden, "patch_size", 16, "spatial_merge_size", 2, "temporal_patch_size", 2);
    json_t *root = json_pack(
        "{s:[s], s:i, s:s, s:o, s:b, s:s, s:i, s:o, s:i, s:i}", "architectures",
        "Qwen3VLForConditionalGeneration", "image_token_id", 151655, "model_type", "qwen3_vl",
        "text_config", text, "tie_word_embeddings", s->tied, "transformers_version",
        v5 ? "5.17.0" : "4.57.0.dev0", "video_token_id", 151656, "vision_config", vision,
        "vision_end_token_id", 151653, "vision_start_token_id", 151652);
    json_object_set_new(root, v5 ? "dtype" : "torch_dtype", json_string("bfloat16"));
    assert_non_null(root);
    return root;
}

static json_t *text_of(json_t *root) {
    return json_object_get(root, "text_config");
}

static int parse_json(json_t *root, twn_config *cfg, twn_err *err) {
    char *s = json_dumps(root, JSON_INDENT(2));
    int rc = twn_config_parse(s, strlen(s), "Qwen3-VL/config.json", cfg, err);
    free(s);
    return rc;
}

static void parse_ok(json_t *root, twn_config *cfg) {
    twn_err err = {{0}};
    if (parse_json(root, cfg, &err) != 0) fail_msg("%s", err.msg);
}

/* Parses and expects failure with every given substring in the message. */
static void parse_fails(json_t *root, const char *want1, const char *want2) {
    twn_config cfg;
    twn_err err = {{0}};
    assert_int_equal(parse_json(root, &cfg, &err), -1);
    if (!strstr(err.msg, "Qwen3-VL/config.json: "))
        fail_msg("error does not name the file: %s", err.msg);
    if (!strstr(err.msg, want1)) fail_msg("error\n  %s\ndoes not contain\n  %s", err.msg, want1);
    if (want2 && !strstr(err.msg, want2))
        fail_msg("error\n  %s\ndoes not contain\n  %s", err.msg, want2);
    json_decref(root);
}

static void assert_configs_equal(const twn_config *a, const twn_config *b) {
    const twn_text_config *x = &a->text, *y = &b->text;
    assert_string_equal(a->model_type, b->model_type);
    assert_int_equal(x->vocab_size, y->vocab_size);
    assert_int_equal(x->hidden_size, y->hidden_size);
    assert_int_equal(x->intermediate_size, y->intermediate_size);
    assert_int_equal(x->num_hidden_layers, y->num_hidden_layers);
    assert_int_equal(x->num_attention_heads, y->num_attention_heads);
    assert_int_equal(x->num_key_value_heads, y->num_key_value_heads);
    assert_int_equal(x->head_dim, y->head_dim);
    assert_true(x->rope_theta == y->rope_theta);
    assert_true(x->rms_norm_eps == y->rms_norm_eps);
    assert_memory_equal(x->mrope_section, y->mrope_section, sizeof x->mrope_section);
    assert_int_equal(x->mrope_interleaved, y->mrope_interleaved);
    assert_int_equal(x->max_position_embeddings, y->max_position_embeddings);
    assert_int_equal(x->attention_bias, y->attention_bias);
    assert_string_equal(x->hidden_act, y->hidden_act);
    assert_int_equal(x->bos_token_id, y->bos_token_id);
    assert_int_equal(x->eos_token_id, y->eos_token_id);
    const twn_vision_config *v = &a->vision, *w = &b->vision;
    assert_int_equal(a->has_vision, b->has_vision);
    assert_int_equal(v->depth, w->depth);
    assert_int_equal(v->hidden_size, w->hidden_size);
    assert_int_equal(v->intermediate_size, w->intermediate_size);
    assert_int_equal(v->num_heads, w->num_heads);
    assert_int_equal(v->in_channels, w->in_channels);
    assert_int_equal(v->patch_size, w->patch_size);
    assert_int_equal(v->temporal_patch_size, w->temporal_patch_size);
    assert_int_equal(v->spatial_merge_size, w->spatial_merge_size);
    assert_int_equal(v->out_hidden_size, w->out_hidden_size);
    assert_int_equal(v->num_position_embeddings, w->num_position_embeddings);
    assert_int_equal(v->n_deepstack, w->n_deepstack);
    assert_memory_equal(v->deepstack_visual_indexes, w->deepstack_visual_indexes,
                        sizeof v->deepstack_visual_indexes);
    assert_string_equal(v->hidden_act, w->hidden_act);
    assert_int_equal(a->tie_word_embeddings, b->tie_word_embeddings);
    assert_int_equal(a->image_token_id, b->image_token_id);
    assert_int_equal(a->video_token_id, b->video_token_id);
    assert_int_equal(a->vision_start_token_id, b->vision_start_token_id);
    assert_int_equal(a->vision_end_token_id, b->vision_end_token_id);
    assert_string_equal(a->dtype, b->dtype);
}

static void assert_real_values(const twn_config *c, const qwen_size *s) {
    assert_string_equal(c->model_type, "qwen3_vl");
    assert_int_equal(c->text.vocab_size, 151936);
    assert_int_equal(c->text.hidden_size, s->hidden);
    assert_int_equal(c->text.intermediate_size, s->inter);
    assert_int_equal(c->text.num_hidden_layers, s->layers);
    assert_int_equal(c->text.num_attention_heads, s->heads);
    assert_int_equal(c->text.num_key_value_heads, s->kv);
    assert_int_equal(c->text.head_dim, 128);
    assert_true(c->text.rope_theta == 5000000.0);
    assert_true(c->text.rms_norm_eps == 1e-6);
    assert_int_equal(c->text.mrope_section[0], 24);
    assert_int_equal(c->text.mrope_section[1], 20);
    assert_int_equal(c->text.mrope_section[2], 20);
    assert_true(c->text.mrope_interleaved);
    assert_int_equal(c->text.max_position_embeddings, 262144);
    assert_false(c->text.attention_bias);
    assert_string_equal(c->text.hidden_act, "silu");
    assert_int_equal(c->text.bos_token_id, 151643);
    assert_int_equal(c->text.eos_token_id, 151645);
    assert_true(c->has_vision);
    assert_int_equal(c->vision.depth, s->vdepth);
    assert_int_equal(c->vision.hidden_size, s->vhidden);
    assert_int_equal(c->vision.intermediate_size, s->vinter);
    assert_int_equal(c->vision.num_heads, 16);
    assert_int_equal(c->vision.in_channels, 3);
    assert_int_equal(c->vision.patch_size, 16);
    assert_int_equal(c->vision.temporal_patch_size, 2);
    assert_int_equal(c->vision.spatial_merge_size, 2);
    assert_int_equal(c->vision.out_hidden_size, s->hidden);
    assert_int_equal(c->vision.num_position_embeddings, 2304);
    assert_int_equal(c->vision.n_deepstack, 3);
    for (int i = 0; i < 3; i++) assert_int_equal(c->vision.deepstack_visual_indexes[i], s->ds[i]);
    assert_string_equal(c->vision.hidden_act, "gelu_pytorch_tanh");
    assert_int_equal(c->tie_word_embeddings, s->tied);
    assert_int_equal(c->image_token_id, 151655);
    assert_int_equal(c->video_token_id, 151656);
    assert_int_equal(c->vision_start_token_id, 151652);
    assert_int_equal(c->vision_end_token_id, 151653);
    assert_string_equal(c->dtype, "bfloat16");
}

// ------------------------------------------------------------------------------------------------

static void test_real_configs_both_rope_forms(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        twn_config old, v5;
        json_t *a = make_config(&sizes[i], false), *b = make_config(&sizes[i], true);
        parse_ok(a, &old);
        parse_ok(b, &v5);
        assert_false(old.rope_v5);
        assert_true(v5.rope_v5);
        assert_real_values(&old, &sizes[i]);
        assert_configs_equal(&old, &v5);
        json_decref(a);
        json_decref(b);
    }
}

static void test_load_from_file(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("config_load");
    char path[2048];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_t *root = make_config(&sizes[1], false);
    assert_int_equal(json_dump_file(root, path, JSON_INDENT(2)), 0);
    json_decref(root);
    twn_config cfg;
    twn_err err = {{0}};
    if (twn_config_load(path, &cfg, &err) != 0) fail_msg("%s", err.msg);
    assert_real_values(&cfg, &sizes[1]);
    snprintf(path, sizeof path, "%s/missing.json", dir);
    assert_int_equal(twn_config_load(path, &cfg, &err), -1);
    assert_non_null(strstr(err.msg, "missing.json"));
}

static void test_tied_and_untied(void **state) {
    (void)state;
    twn_config cfg;
    json_t *root = make_config(&sizes[2], false); /* 8B: untied at both levels */
    parse_ok(root, &cfg);
    assert_false(cfg.tie_word_embeddings);
    /* The top level wins over text_config. */
    json_object_set_new(text_of(root), "tie_word_embeddings", json_true());
    parse_ok(root, &cfg);
    assert_false(cfg.tie_word_embeddings);
    /* Only text_config says it. */
    json_object_del(root, "tie_word_embeddings");
    parse_ok(root, &cfg);
    assert_true(cfg.tie_word_embeddings);
    /* Neither: Qwen3VLConfig's default, untied. */
    json_object_del(text_of(root), "tie_word_embeddings");
    parse_ok(root, &cfg);
    assert_false(cfg.tie_word_embeddings);
    json_decref(root);

    root = make_config(&sizes[0], true); /* 2B: tied */
    parse_ok(root, &cfg);
    assert_true(cfg.tie_word_embeddings);
    json_object_set_new(root, "tie_word_embeddings", json_string("yes"));
    parse_fails(root, "tie_word_embeddings is a string, expected true or false", NULL);
}

static void test_defaults(void **state) {
    (void)state;
    twn_config cfg;
    json_t *root = make_config(&sizes[0], false);
    const char *ids[] = {"image_token_id", "video_token_id", "vision_start_token_id",
                         "vision_end_token_id", "torch_dtype"};
    for (int i = 0; i < 5; i++) json_object_del(root, ids[i]);
    json_object_del(text_of(root), "dtype");
    json_object_del(text_of(root), "bos_token_id");
    json_object_set_new(text_of(root), "eos_token_id", json_pack("[i,i]", 151645, 151643));
    json_object_del(text_of(root), "rope_scaling"); /* 4.57 fallback [24,20,20] */
    json_object_del(text_of(root), "hidden_act");
    json_object_del(json_object_get(root, "vision_config"), "hidden_act");
    parse_ok(root, &cfg);
    assert_int_equal(cfg.image_token_id, 151655);
    assert_int_equal(cfg.video_token_id, 151656);
    assert_int_equal(cfg.vision_start_token_id, 151652);
    assert_int_equal(cfg.vision_end_token_id, 151653);
    assert_string_equal(cfg.dtype, "");
    assert_int_equal(cfg.text.bos_token_id, -1);
    assert_int_equal(cfg.text.eos_token_id, 151645);
    assert_int_equal(cfg.text.mrope_section[0], 24);
    assert_int_equal(cfg.text.mrope_section[1], 20);
    assert_int_equal(cfg.text.mrope_section[2], 20);
    assert_true(cfg.text.mrope_interleaved);
    assert_string_equal(cfg.text.hidden_act, "silu");
    assert_string_equal(cfg.vision.hidden_act, "gelu_pytorch_tanh");
    json_object_del(text_of(root), "eos_token_id");
    parse_ok(root, &cfg);
    assert_int_equal(cfg.text.eos_token_id, -1);
    /* No vision_config: a text-only model. */
    json_object_del(root, "vision_config");
    parse_ok(root, &cfg);
    assert_false(cfg.has_vision);
    assert_int_equal(cfg.vision.depth, 0);
    json_decref(root);
}

/* The tiny model of spec §6.2, as transformers 5 saves it. */
static void test_tiny_v5_config(void **state) {
    (void)state;
    const char *js =
        "{\"model_type\": \"qwen3_vl\", \"tie_word_embeddings\": true, \"dtype\": \"float32\","
        " \"text_config\": {\"vocab_size\": 151936, \"hidden_size\": 32, \"intermediate_size\": 64,"
        "  \"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,"
        "  \"head_dim\": 32, \"hidden_act\": \"silu\", \"max_position_embeddings\": 4096,"
        "  \"rms_norm_eps\": 1e-06, \"attention_bias\": false, \"bos_token_id\": 151643,"
        "  \"eos_token_id\": 151645, \"rope_parameters\": {\"rope_type\": \"default\","
        "  \"mrope_section\": [6, 5, 5], \"mrope_interleaved\": true, \"rope_theta\": 5000000.0}},"
        " \"vision_config\": {\"depth\": 4, \"hidden_size\": 32, \"intermediate_size\": 64,"
        "  \"num_heads\": 2, \"in_channels\": 3, \"patch_size\": 16, \"temporal_patch_size\": 2,"
        "  \"spatial_merge_size\": 2, \"out_hidden_size\": 32, \"num_position_embeddings\": 2304,"
        "  \"deepstack_visual_indexes\": [0, 2, 3], \"hidden_act\": \"gelu_pytorch_tanh\"}}";
    twn_config cfg;
    twn_err err = {{0}};
    if (twn_config_parse(js, strlen(js), "tiny/config.json", &cfg, &err) != 0)
        fail_msg("%s", err.msg);
    assert_true(cfg.rope_v5);
    assert_int_equal(cfg.text.head_dim, 32);
    assert_int_equal(cfg.text.mrope_section[0], 6);
    assert_int_equal(cfg.text.mrope_section[1], 5);
    assert_int_equal(cfg.text.mrope_section[2], 5);
    assert_true(cfg.text.rope_theta == 5e6);
    assert_int_equal(cfg.vision.depth, 4);
    assert_int_equal(cfg.vision.n_deepstack, 3);
    assert_int_equal(cfg.vision.deepstack_visual_indexes[0], 0);
    assert_int_equal(cfg.vision.deepstack_visual_indexes[2], 3);
    assert_true(cfg.tie_word_embeddings);
    assert_string_equal(cfg.dtype, "float32");
    assert_int_equal(cfg.image_token_id, 151655);
}

// ------------------------------------------------------------------------------------------------
// Refusals

static void test_unknown_model_type(void **state) {
    (void)state;
    json_t *root = make_config(&sizes[0], false);
    json_object_set_new(root, "model_type", json_string("llama"));
    parse_fails(root, "model_type \"llama\" is not supported (only \"qwen3_vl\")", NULL);
    root = make_config(&sizes[0], false);
    json_object_del(root, "model_type");
    parse_fails(root, "model_type is missing", NULL);
}

static void test_bad_head_dim(void **state) {
    (void)state;
    json_t *root = make_config(&sizes[1], true);
    json_object_set_new(text_of(root), "head_dim", json_integer(127));
    parse_fails(root, "text_config.head_dim = 127 must be even", NULL);
    root = make_config(&sizes[1], true);
    json_object_set_new(text_of(root), "head_dim", json_integer(0));
    parse_fails(root, "text_config.head_dim = 0 is out of range", NULL);
    root = make_config(&sizes[1], true);
    json_object_set_new(text_of(root), "head_dim", json_string("128"));
    parse_fails(root, "text_config.head_dim is a string, expected an integer", NULL);
    root = make_config(&sizes[1], true);
    json_object_del(text_of(root), "head_dim");
    parse_fails(root, "text_config.head_dim is missing", NULL);
}

static void test_heads_not_divisible(void **state) {
    (void)state;
    json_t *root = make_config(&sizes[2], false);
    json_object_set_new(text_of(root), "num_attention_heads", json_integer(30));
    parse_fails(root,
                "text_config.num_attention_heads = 30 is not a multiple of "
                "text_config.num_key_value_heads = 8",
                NULL);
    root = make_config(&sizes[2], false);
    json_object_set_new(json_object_get(root, "vision_config"), "num_heads", json_integer(10));
    parse_fails(
        root, "vision_config.hidden_size = 1152 is not a multiple of vision_config.num_heads = 10",
        NULL);
}

static void test_mrope_sum_mismatch(void **state) {
    (void)state;
    json_t *root = make_config(&sizes[0], false);
    json_t *rs = json_object_get(text_of(root), "rope_scaling");
    json_object_set_new(rs, "mrope_section", json_pack("[i,i,i]", 24, 20, 24));
    parse_fails(root,
                "text_config.rope_scaling.mrope_section [24, 20, 24] sums to 68, but "
                "text_config.head_dim / 2 = 64",
                NULL);
    root = make_config(&sizes[0], true);
    rs = json_object_get(text_of(root), "rope_parameters");
    json_object_set_new(rs, "mrope_section", json_pack("[i,i,i]", 16, 16, 16));
    parse_fails(root, "text_config.rope_parameters.mrope_section [16, 16, 16] sums to 48", NULL);
    root = make_config(&sizes[0], true);
    rs = json_object_get(text_of(root), "rope_parameters");
    json_object_set_new(rs, "mrope_section", json_pack("[i,i]", 32, 32));
    parse_fails(root, "text_config.rope_parameters.mrope_section must be a list of 3 integers",
                NULL);
    /* head_dim 64 with no rope_scaling: the default section no longer fits. */
    root = make_config(&sizes[0], false);
    json_object_del(text_of(root), "rope_scaling");
    json_object_set_new(text_of(root), "head_dim", json_integer(64));
    parse_fails(root, "mrope_section [24, 20, 20] (the default) sums to 64", "head_dim / 2 = 32");
}

static void test_other_refusals(void **state) {
    (void)state;
    json_t *root = make_config(&sizes[0], false);
    json_object_set_new(json_object_get(text_of(root), "rope_scaling"), "rope_type",
                        json_string("yarn"));
    parse_fails(root, "text_config.rope_scaling.rope_type \"yarn\" is not supported", NULL);
    root = make_config(&sizes[0], true);
    json_object_del(json_object_get(text_of(root), "rope_parameters"), "rope_theta");
    parse_fails(root, "text_config.rope_theta is missing", NULL);
    root = make_config(&sizes[0], false);
    json_object_set_new(text_of(root), "rope_theta", json_real(-1));
    parse_fails(root, "text_config.rope_theta = -1 must be positive", NULL);
    root = make_config(&sizes[0], false);
    json_object_set_new(text_of(root), "attention_bias", json_true());
    parse_fails(root, "text_config.attention_bias = true is not supported", NULL);
    root = make_config(&sizes[0], false);
    json_object_set_new(text_of(root), "hidden_act", json_string("gelu"));
    parse_fails(root, "text_config.hidden_act \"gelu\" is not supported", NULL);
    root = make_config(&sizes[0], false);
    json_object_set_new(text_of(root), "hidden_size", json_integer(5000000000ll));
    parse_fails(root, "text_config.hidden_size = 5000000000 is out of range", NULL);
    root = make_config(&sizes[0], false);
    json_object_set_new(text_of(root), "rms_norm_eps", json_integer(0));
    parse_fails(root, "text_config.rms_norm_eps = 0 must be positive", NULL);
    root = make_config(&sizes[0], false);
    json_object_del(root, "text_config");
    parse_fails(root, "text_config is missing", NULL);
    root = make_config(&sizes[1], false);
    json_object_set_new(json_object_get(root, "vision_config"), "out_hidden_size",
                        json_integer(2048));
    parse_fails(root,
                "vision_config.out_hidden_size = 2048 differs from text_config.hidden_size = 2560",
                NULL);
    root = make_config(&sizes[1], false);
    json_object_set_new(json_object_get(root, "vision_config"), "deepstack_visual_indexes",
                        json_pack("[i,i,i]", 5, 11, 24));
    parse_fails(root,
                "vision_config.deepstack_visual_indexes[2] must be a block index in [0, depth 24)",
                NULL);
    root = make_config(&sizes[1], false);
    json_object_set_new(json_object_get(root, "vision_config"), "num_position_embeddings",
                        json_integer(2300));
    parse_fails(root, "vision_config.num_position_embeddings = 2300 is not a square", NULL);
    root = make_config(&sizes[1], false);
    json_object_set_new(root, "image_token_id", json_integer(151936));
    parse_fails(root, "image_token_id = 151936 is outside text_config.vocab_size = 151936", NULL);

    twn_config cfg;
    twn_err err = {{0}};
    assert_int_equal(twn_config_parse("{\"model_type\": ", 15, "c.json", &cfg, &err), -1);
    assert_non_null(strstr(err.msg, "c.json: invalid JSON at line 1"));
    assert_int_equal(twn_config_parse("[1]", 3, "c.json", &cfg, &err), -1);
    assert_string_equal(err.msg, "c.json: the top level is an array, expected an object");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_real_configs_both_rope_forms),
        cmocka_unit_test(test_load_from_file),
        cmocka_unit_test(test_tied_and_untied),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_tiny_v5_config),
        cmocka_unit_test(test_unknown_model_type),
        cmocka_unit_test(test_bad_head_dim),
        cmocka_unit_test(test_heads_not_divisible),
        cmocka_unit_test(test_mrope_sum_mismatch),
        cmocka_unit_test(test_other_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
