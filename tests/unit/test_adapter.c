/* test_adapter.c — PEFT LoRA adapters (engine/adapter.c): the module-selection rules as PEFT
 * applies them (list suffixes, regex fullmatch, all-linear, exclude_modules, layers_to_transform),
 * rank_pattern / alpha_pattern lookups, scaling, loading an adapter directory written here (an
 * adapter_config.json with the full field set PEFT 0.17+ saves, tensors through the safetensors
 * writer), and one refusal per unsupported feature, each checked by its message. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/adapter.h"
#include "engine/adapter_internal.h"
#include "engine/safetensors.h"
#include "tests/testutil.h"
#include "util/mem.h"
#include "util/vec.h"

#define LM "model.language_model.layers."

static bool targets(const char *spec, const char *module, bool is_linear, bool is_output) {
    twn_err e = {{0}};
    bool sel = true;
    if (twn_adapter_targets(spec, module, is_linear, is_output, &sel, &e))
        fail_msg("twn_adapter_targets(%s, %s): %s", spec, module, e.msg);
    return sel;
}

static twn_adapter_config *parse(const char *json) {
    twn_err e = {{0}};
    twn_adapter_config *c = NULL;
    if (twn_adapter_config_parse(json, strlen(json), "cfg.json", &c, &e))
        fail_msg("parse failed: %s\n%s", e.msg, json);
    return c;
}

/* Parsing must fail with a message containing `needle`. */
static void parse_fails(const char *json, const char *needle) {
    twn_err e = {{0}};
    twn_adapter_config *c = NULL;
    assert_int_equal(twn_adapter_config_parse(json, strlen(json), "cfg.json", &c, &e), -1);
    assert_null(c);
    if (!strstr(e.msg, needle)) fail_msg("message \"%s\" lacks \"%s\"", e.msg, needle);
    assert_non_null(strstr(e.msg, "cfg.json"));
}

static bool selects(const twn_adapter_config *c, const char *module, bool *excluded) {
    twn_err e = {{0}};
    bool sel = true;
    if (twn_adapter_config_selects(c, module, true, false, &sel, excluded, &e))
        fail_msg("selects(%s): %s", module, e.msg);
    return sel;
}

// ------------------------------------------------------------------------------------------------
// Selection rules

static void test_list_suffix(void **state) {
    (void)state;
    /* A list entry matches the whole name or a "."-separated suffix, never a bare substring:
     * "proj" (the vision attention output) must not catch the decoder's o_proj. */
    assert_true(targets("[\"proj\"]", "model.visual.blocks.0.attn.proj", true, false));
    assert_false(targets("[\"proj\"]", LM "0.self_attn.o_proj", true, false));
    assert_true(targets("[\"q_proj\",\"v_proj\"]", LM "3.self_attn.v_proj", true, false));
    assert_false(targets("[\"q_proj\"]", LM "3.self_attn.xq_proj", true, false));
    assert_false(targets("[\"q_proj\"]", LM "3.self_attn.q_proj.base_layer", true, false));
    assert_true(targets("[\"q_proj\"]", "q_proj", true, false));
    /* Multi-segment entries and full names work the same way. */
    assert_true(targets("[\"attn.qkv\"]", "model.visual.blocks.7.attn.qkv", true, false));
    assert_false(targets("[\"attn.qkv\"]", "model.visual.blocks.7.xattn.qkv", true, false));
    assert_true(targets("[\"" LM "0.mlp.up_proj\"]", LM "0.mlp.up_proj", true, false));
    assert_false(targets("[\"" LM "0.mlp.up_proj\"]", LM "10.mlp.up_proj", true, false));
    /* A list names lm_head explicitly when it wants it. */
    assert_true(targets("[\"lm_head\"]", "lm_head", true, true));
}

static void test_regex_fullmatch(void **state) {
    (void)state;
    const char *re = "\"model\\\\.language_model\\\\..*\\\\.(q|k|v|o)_proj\"";
    assert_true(targets(re, LM "0.self_attn.q_proj", true, false));
    assert_true(targets(re, LM "27.self_attn.o_proj", true, false));
    assert_false(targets(re, LM "0.mlp.gate_proj", true, false));
    assert_false(targets(re, "model.visual.blocks.0.attn.proj", true, false));
    /* fullmatch: no match on a prefix or a suffix of the name alone. */
    assert_false(targets("\"q_proj\"", LM "0.self_attn.q_proj", true, false));
    assert_false(targets("\".*q_proj\"", LM "0.self_attn.q_proj.lora_A", true, false));
    assert_true(targets("\".*q_proj\"", LM "0.self_attn.q_proj", true, false));
    /* Python-style constructs a real config uses: non-capturing groups, lookahead, \d. */
    const char *unsloth = "\"(?:.*?(?:language|text).*?(?:self_attn|mlp).*?\\\\.(?:q_proj|v_proj))"
                          "|(?:\\\\bmodel\\\\.layers\\\\.[\\\\d]{1,}(?!.*\\\\.experts)\\\\..*?"
                          "(?:self_attn)\\\\.(?:q_proj))\"";
    assert_true(targets(unsloth, LM "4.self_attn.v_proj", true, false));
    assert_false(targets(unsloth, LM "4.self_attn.k_proj", true, false));
    assert_false(targets(unsloth, "model.visual.blocks.4.attn.qkv", true, false));
    assert_true(targets(unsloth, "model.layers.4.self_attn.q_proj", true, false));
    /* A bad regex is an error naming the pattern. */
    twn_err e = {{0}};
    bool sel;
    assert_int_equal(twn_adapter_targets("\"(q_proj\"", "q_proj", true, false, &sel, &e), -1);
    assert_non_null(strstr(e.msg, "(q_proj"));
    assert_non_null(strstr(e.msg, "not a valid regex"));
    assert_int_equal(twn_adapter_targets("{\"q\": 1}", "q", true, false, &sel, &e), -1);
    assert_non_null(strstr(e.msg, "must be a list of module names or a regex string"));
    assert_int_equal(twn_adapter_targets("[\"q\", 3]", "q", true, false, &sel, &e), -1);
    assert_non_null(strstr(e.msg, "target_modules[1] = 3 is not a string"));
}

static void test_all_linear(void **state) {
    (void)state;
    assert_true(targets("\"all-linear\"", LM "0.self_attn.q_proj", true, false));
    assert_true(targets("\"all-linear\"", "model.visual.blocks.0.mlp.linear_fc1", true, false));
    assert_true(targets("\"ALL-Linear\"", LM "0.mlp.down_proj", true, false));
    assert_false(targets("\"all-linear\"", "lm_head", true, true));
    assert_false(targets("\"all-linear\"", "model.language_model.embed_tokens", false, false));
}

static void test_exclude_modules(void **state) {
    (void)state;
    twn_adapter_config *c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"proj\",\"q_proj\","
                                  "\"qkv\"],\"exclude_modules\":[\"blocks.1.attn.proj\"]}");
    bool ex;
    assert_true(selects(c, "model.visual.blocks.0.attn.proj", &ex));
    assert_false(ex);
    assert_false(selects(c, "model.visual.blocks.1.attn.proj", &ex));
    assert_true(ex);
    assert_true(selects(c, "model.visual.blocks.11.attn.proj", &ex)); /* "blocks.1." no suffix */
    assert_false(ex);
    twn_adapter_config_free(c);

    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":\"all-linear\","
              "\"exclude_modules\":\".*\\\\.visual\\\\..*\"}");
    assert_false(selects(c, "model.visual.blocks.0.attn.qkv", &ex));
    assert_true(ex);
    assert_true(selects(c, LM "0.self_attn.q_proj", &ex));
    char *d = twn_adapter_config_desc(c);
    assert_string_equal(d, "all-linear minus regex \".*\\.visual\\..*\" (r=8, alpha=8, rslora=no)");
    twn_free(d);
    twn_adapter_config_free(c);

    /* An empty exclude list excludes nothing (PEFT tests it with `if exclude_modules:`). */
    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\"],\"exclude_modules\":[]}");
    assert_true(selects(c, LM "0.self_attn.q_proj", &ex));
    twn_adapter_config_free(c);
}

static void test_layers_to_transform(void **state) {
    (void)state;
    twn_adapter_config *c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\",\"" LM
                                  "5.mlp.up_proj\",\"up_proj\"],\"layers_to_transform\":[0,2]}");
    assert_true(selects(c, LM "0.self_attn.q_proj", NULL));
    assert_false(selects(c, LM "1.self_attn.q_proj", NULL));
    assert_true(selects(c, LM "2.self_attn.q_proj", NULL));
    assert_false(selects(c, LM "20.self_attn.q_proj", NULL));
    assert_true(selects(c, "q_proj", NULL)); /* the name itself is in the list: no filter */
    /* A full module name in the list bypasses the layer filter, as in PEFT. */
    assert_true(selects(c, LM "5.mlp.up_proj", NULL));
    assert_false(selects(c, LM "6.mlp.up_proj", NULL));
    /* The default index regex takes any "<segment>.<n>.": vision blocks count too. */
    assert_true(selects(c, "model.visual.blocks.2.attn.q_proj", NULL));
    twn_adapter_config_free(c);

    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\",\"qkv\"],"
              "\"layers_to_transform\":1,\"layers_pattern\":\"layers\"}");
    assert_true(selects(c, LM "1.self_attn.q_proj", NULL));
    assert_false(selects(c, LM "0.self_attn.q_proj", NULL));
    assert_false(selects(c, "model.visual.blocks.1.attn.qkv", NULL)); /* pattern "layers" only */
    char *d = twn_adapter_config_desc(c);
    assert_string_equal(d, "q_proj,qkv (r=8, alpha=8, rslora=no, layers=1)");
    twn_free(d);
    twn_adapter_config_free(c);

    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"qkv\"],"
              "\"layers_to_transform\":[3],\"layers_pattern\":[\"layers\",\"blocks\"]}");
    assert_true(selects(c, "model.visual.blocks.3.attn.qkv", NULL));
    assert_false(selects(c, "model.visual.blocks.4.attn.qkv", NULL));
    twn_adapter_config_free(c);

    parse_fails(
        "{\"peft_type\":\"LORA\",\"target_modules\":\".*q_proj\",\"layers_to_transform\":[0]}",
        "layers_to_transform cannot be used when target_modules is a string");
    parse_fails("{\"peft_type\":\"LORA\",\"target_modules\":[\"q\"],\"layers_pattern\":\"layers\"}",
                "layers_pattern is set but layers_to_transform is not");
    parse_fails(
        "{\"peft_type\":\"LORA\",\"target_modules\":[\"q\"],\"layers_to_transform\":[\"0\"]}",
        "layers_to_transform[0]");
}

static void test_rank_alpha_pattern(void **state) {
    (void)state;
    twn_adapter_config *c = parse(
        "{\"peft_type\":\"LORA\",\"r\":8,\"lora_alpha\":16,\"target_modules\":[\"q_proj\",\"k_"
        "proj\","
        "\"v_proj\"],\"rank_pattern\":{\"q_proj\":16,\"layers\\\\.0\\\\.self_attn\\\\.k_proj\":4},"
        "\"alpha_pattern\":{\"v_proj\":64.5}}");
    int r;
    double alpha;
    const char *key;
    twn_err e = {{0}};
    assert_int_equal(twn_adapter_config_rank(c, LM "3.self_attn.q_proj", &r, &key, &e), 0);
    assert_int_equal(r, 16);
    assert_string_equal(key, "q_proj");
    assert_int_equal(twn_adapter_config_rank(c, "q_proj", &r, &key, &e), 0); /* (.*\.)? optional */
    assert_int_equal(r, 16);
    assert_int_equal(twn_adapter_config_rank(c, LM "3.self_attn.xq_proj", &r, &key, &e), 0);
    assert_int_equal(r, 8);
    assert_null(key);
    assert_int_equal(twn_adapter_config_rank(c, LM "0.self_attn.k_proj", &r, &key, &e), 0);
    assert_int_equal(r, 4);
    assert_int_equal(twn_adapter_config_rank(c, LM "10.self_attn.k_proj", &r, &key, &e), 0);
    assert_int_equal(r, 8);
    assert_int_equal(twn_adapter_config_rank(c, LM "0.self_attn.v_proj", &r, &key, &e), 0);
    assert_int_equal(r, 8);
    assert_int_equal(twn_adapter_config_alpha(c, LM "0.self_attn.v_proj", &alpha, &key, &e), 0);
    assert_true(alpha == 64.5);
    assert_string_equal(key, "v_proj");
    assert_int_equal(twn_adapter_config_alpha(c, LM "0.self_attn.q_proj", &alpha, &key, &e), 0);
    assert_true(alpha == 16.0);
    assert_null(key);
    char *d = twn_adapter_config_desc(c);
    assert_string_equal(d, "q_proj,k_proj,v_proj (r=8, alpha=16, rslora=no, rank_pattern=2, "
                           "alpha_pattern=1)");
    twn_free(d);
    twn_adapter_config_free(c);

    /* get_pattern_key: the first key in file order that matches wins. */
    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\"],"
              "\"rank_pattern\":{\"proj\":4,\"q_proj\":16}}");
    assert_int_equal(twn_adapter_config_rank(c, LM "0.self_attn.q_proj", &r, &key, &e), 0);
    assert_int_equal(r, 16); /* "proj" needs a "." right before it: (.*\.)?(proj)$ */
    assert_string_equal(key, "q_proj");
    twn_adapter_config_free(c);
    c = parse("{\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\"],"
              "\"rank_pattern\":{\".*proj\":4,\"q_proj\":16}}");
    assert_int_equal(twn_adapter_config_rank(c, LM "0.self_attn.q_proj", &r, &key, &e), 0);
    assert_int_equal(r, 4);
    assert_string_equal(key, ".*proj");
    twn_adapter_config_free(c);

    parse_fails("{\"peft_type\":\"LORA\",\"target_modules\":[\"q\"],\"rank_pattern\":{\"q\":0}}",
                "rank_pattern[\"q\"]");
    parse_fails("{\"peft_type\":\"LORA\",\"target_modules\":[\"q\"],\"alpha_pattern\":{\"q(\":1}}",
                "not a valid regex");
}

static void test_scaling(void **state) {
    (void)state;
    assert_true(twn_lora_scaling(16, 8, false) == 2.0f);
    assert_true(twn_lora_scaling(16, 8, true) == (float)(16.0 / sqrt(8.0)));
    assert_true(fabsf(twn_lora_scaling(16, 8, true) - 5.656854249f) < 1e-6f);
    assert_true(twn_lora_scaling(32, 16, true) == 8.0f);
    assert_true(twn_lora_scaling(7, 3, false) == (float)(7.0 / 3.0));
}

// ------------------------------------------------------------------------------------------------
// Adapter directories

/* The field set PEFT 0.19 writes for a LoRA on Qwen3-VL (keys sorted, indent 2, as
 * save_pretrained does).  "%s" slots in order: alpha_pattern, lora_alpha, r, rank_pattern,
 * target_modules, use_rslora.  Tests change other fields with patch_config. */
static const char *CONFIG_FMT = "{\n"
                                "  \"alora_invocation_tokens\": null,\n"
                                "  \"alpha_pattern\": %s,\n"
                                "  \"arrow_config\": null,\n"
                                "  \"auto_mapping\": null,\n"
                                "  \"base_model_name_or_path\": \"Qwen/Qwen3-VL-2B-Instruct\",\n"
                                "  \"bias\": \"none\",\n"
                                "  \"corda_config\": null,\n"
                                "  \"ensure_weight_tying\": false,\n"
                                "  \"eva_config\": null,\n"
                                "  \"exclude_modules\": null,\n"
                                "  \"fan_in_fan_out\": false,\n"
                                "  \"inference_mode\": true,\n"
                                "  \"init_lora_weights\": true,\n"
                                "  \"layer_replication\": null,\n"
                                "  \"layers_pattern\": null,\n"
                                "  \"layers_to_transform\": null,\n"
                                "  \"loftq_config\": {},\n"
                                "  \"lora_alpha\": %s,\n"
                                "  \"lora_bias\": false,\n"
                                "  \"lora_dropout\": 0.05,\n"
                                "  \"lora_ga_config\": null,\n"
                                "  \"megatron_config\": null,\n"
                                "  \"megatron_core\": \"megatron.core\",\n"
                                "  \"modules_to_save\": null,\n"
                                "  \"peft_type\": \"LORA\",\n"
                                "  \"peft_version\": \"0.19.1\",\n"
                                "  \"qalora_group_size\": 16,\n"
                                "  \"r\": %s,\n"
                                "  \"rank_pattern\": %s,\n"
                                "  \"revision\": null,\n"
                                "  \"target_modules\": %s,\n"
                                "  \"target_parameters\": null,\n"
                                "  \"task_type\": \"CAUSAL_LM\",\n"
                                "  \"trainable_token_indices\": null,\n"
                                "  \"use_bdlora\": null,\n"
                                "  \"use_dora\": false,\n"
                                "  \"use_qalora\": false,\n"
                                "  \"use_rslora\": %s\n"
                                "}\n";

static const char *STD_TARGETS = "[\n    \"q_proj\",\n    \"k_proj\",\n    \"v_proj\",\n"
                                 "    \"o_proj\",\n    \"gate_proj\",\n    \"up_proj\",\n"
                                 "    \"down_proj\"\n  ]";

static void write_config(const char *dir, const char *r, const char *alpha,
                         const char *targets_json, const char *rslora, const char *rank_pattern,
                         const char *alpha_pattern) {
    twn_str s = {0};
    twn_str_printf(&s, CONFIG_FMT, alpha_pattern, alpha, r, rank_pattern, targets_json, rslora);
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    tu_write(path, s.v, s.n);
    twn_str_free(&s);
}

/* Replaces the first occurrence of `from` in dir/adapter_config.json by `to`. */
static void patch_config(const char *dir, const char *from, const char *to) {
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    size_t n;
    char *s = tu_read(path, &n);
    char *at = strstr(s, from);
    if (!at) fail_msg("patch_config: \"%s\" not in config", from);
    twn_str o = {0};
    twn_str_append(&o, s, (size_t)(at - s));
    twn_str_puts(&o, to);
    twn_str_puts(&o, at + strlen(from));
    tu_write(path, o.v, o.n);
    twn_str_free(&o);
    free(s);
}

static void fill(float *x, size_t n, float base) {
    for (size_t i = 0; i < n; i++) x[i] = base + 0.125f * (float)i - 0.5f * (float)(i % 3);
}

static void add_f32(twn_st_writer *w, const char *name, twn_dtype dt, int64_t d0, int64_t d1,
                    const float *x) {
    twn_err e = {{0}};
    int64_t shape[2] = {d0, d1};
    if (twn_st_writer_add_f32(w, name, dt, 2, shape, x, &e)) fail_msg("%s", e.msg);
}

static void write_st(twn_st_writer *w, const char *dir) {
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    twn_err e = {{0}};
    if (twn_st_writer_write(w, path, &e)) fail_msg("%s", e.msg);
    twn_st_writer_free(w);
}

/* A plain q_proj/v_proj LoRA for layer 0 (r=4, in=16, q out=16, v out=8), F32. */
static void write_plain_tensors(const char *dir) {
    twn_st_writer *w = twn_st_writer_new();
    float a[4 * 16], bq[16 * 4], bv[8 * 4];
    fill(a, 64, 1), fill(bq, 64, -2), fill(bv, 32, 3);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, bq);
    add_f32(w, "base_model.model." LM "0.self_attn.v_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.v_proj.lora_B.weight", TWN_DT_F32, 8, 4, bv);
    write_st(w, dir);
}

static void test_load_full(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-full");
    write_config(dir, "4", "16", STD_TARGETS, "false", "{\n    \"v_proj\": 2\n  }",
                 "{\n    \"v_proj\": 3\n  }");

    twn_st_writer *w = twn_st_writer_new();
    /* q_proj layer 0: F32, r=4, in=16, out=16. */
    float qa[4 * 16], qb[16 * 4];
    fill(qa, 64, 0.25f), fill(qb, 64, -1);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, qa);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, qb);
    /* v_proj layer 0: BF16 written as raw bits (rank_pattern r=2, alpha_pattern 3), in=16,
     * out=8; values must come back as bits << 16 exactly. */
    uint16_t va[2 * 16], vb[8 * 2];
    for (int i = 0; i < 32; i++) va[i] = (uint16_t)(0x3c00 + 37 * i);  /* ~0.0078 .. */
    for (int i = 0; i < 16; i++) vb[i] = (uint16_t)(0xbf80 + 129 * i); /* negative, ~-1 .. */
    twn_err e = {{0}};
    int64_t sva[2] = {2, 16}, svb[2] = {8, 2};
    assert_int_equal(twn_st_writer_add(w, "base_model.model." LM "0.self_attn.v_proj.lora_A.weight",
                                       TWN_DT_BF16, 2, sva, va, &e),
                     0);
    assert_int_equal(twn_st_writer_add(w, "base_model.model." LM "0.self_attn.v_proj.lora_B.weight",
                                       TWN_DT_BF16, 2, svb, vb, &e),
                     0);
    /* down_proj layer 1 without the base_model.model. prefix, F16, in=24, out=16. */
    float da[4 * 24], db[16 * 4];
    fill(da, 96, 0.5f), fill(db, 64, 0.75f);
    add_f32(w, LM "1.mlp.down_proj.lora_A.weight", TWN_DT_F16, 4, 24, da);
    add_f32(w, LM "1.mlp.down_proj.lora_B.weight", TWN_DT_F16, 16, 4, db);
    write_st(w, dir);

    twn_adapter *a = NULL;
    if (twn_adapter_load(dir, "embedding", &a, &e)) fail_msg("%s", e.msg);
    assert_string_equal(a->name, "embedding");
    assert_string_equal(a->dir, dir);
    assert_int_equal(a->r, 4);
    assert_true(a->lora_alpha == 16.0);
    assert_false(a->use_rslora);
    assert_string_equal(a->target_desc, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                                        "(r=4, alpha=16, rslora=no, rank_pattern=1, "
                                        "alpha_pattern=1)");
    assert_int_equal(a->n_loras, 3);
    assert_int_equal(a->n_params, 4 * 16 + 16 * 4 + 2 * 16 + 8 * 2 + 4 * 24 + 16 * 4);

    const twn_lora *q = twn_adapter_find(a, LM "0.self_attn.q_proj");
    assert_non_null(q);
    assert_string_equal(q->module, LM "0.self_attn.q_proj");
    assert_int_equal(q->r, 4);
    assert_int_equal(q->in_features, 16);
    assert_int_equal(q->out_features, 16);
    assert_false(q->embedding);
    assert_true(q->scaling == 4.0f);
    assert_memory_equal(q->A, qa, sizeof qa);
    assert_memory_equal(q->B, qb, sizeof qb);

    const twn_lora *v = twn_adapter_find(a, LM "0.self_attn.v_proj");
    assert_non_null(v);
    assert_int_equal(v->r, 2);
    assert_int_equal(v->in_features, 16);
    assert_int_equal(v->out_features, 8);
    assert_true(v->scaling == 1.5f); /* alpha_pattern 3 / rank_pattern 2 */
    for (int i = 0; i < 32; i++) {
        uint32_t bits;
        memcpy(&bits, &v->A[i], 4);
        assert_int_equal(bits, (uint32_t)va[i] << 16);
    }
    for (int i = 0; i < 16; i++) assert_true(v->B[i] == twn_bf16_to_f32(vb[i]));
    assert_true(v->B[0] == -1.0f);

    const twn_lora *d = twn_adapter_find(a, LM "1.mlp.down_proj");
    assert_non_null(d);
    assert_int_equal(d->in_features, 24);
    assert_int_equal(d->out_features, 16);
    for (int i = 0; i < 96; i++) assert_true(d->A[i] == twn_f16_to_f32(twn_f32_to_f16(da[i])));
    for (int i = 0; i < 64; i++) assert_true(d->B[i] == db[i]); /* exact in f16 */

    assert_null(twn_adapter_find(a, LM "1.self_attn.q_proj"));
    assert_null(twn_adapter_find(a, "base_model.model." LM "0.self_attn.q_proj"));
    twn_adapter_free(a);
}

static void test_load_rslora_embedding(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-emb");
    write_config(dir, "8", "16", "[\"embed_tokens\", \"q_proj\"]", "true", "{}", "{}");
    twn_st_writer *w = twn_st_writer_new();
    float ea[8 * 50], eb[12 * 8], qa[8 * 12], qb[12 * 8];
    fill(ea, 400, 0), fill(eb, 96, 1), fill(qa, 96, 2), fill(qb, 96, 3);
    add_f32(w, "base_model.model.model.language_model.embed_tokens.lora_embedding_A", TWN_DT_F32, 8,
            50, ea);
    add_f32(w, "base_model.model.model.language_model.embed_tokens.lora_embedding_B", TWN_DT_F32,
            12, 8, eb);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_BF16, 8, 12, qa);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_BF16, 12, 8, qb);
    write_st(w, dir);

    twn_adapter *a = NULL;
    twn_err e = {{0}};
    if (twn_adapter_load(dir, "r", &a, &e)) fail_msg("%s", e.msg);
    assert_true(a->use_rslora);
    assert_string_equal(a->target_desc, "embed_tokens,q_proj (r=8, alpha=16, rslora=yes)");
    const twn_lora *emb = twn_adapter_find(a, "model.language_model.embed_tokens");
    assert_non_null(emb);
    assert_true(emb->embedding);
    assert_int_equal(emb->in_features, 50);
    assert_int_equal(emb->out_features, 12);
    assert_true(emb->scaling == (float)(16.0 / sqrt(8.0)));
    assert_memory_equal(emb->A, ea, sizeof ea);
    const twn_lora *q = twn_adapter_find(a, LM "0.self_attn.q_proj");
    assert_non_null(q);
    assert_false(q->embedding);
    for (int i = 0; i < 96; i++) {
        assert_true(q->A[i] == twn_bf16_to_f32(twn_f32_to_bf16(qa[i])));
        assert_true(q->B[i] == twn_bf16_to_f32(twn_f32_to_bf16(qb[i])));
    }
    twn_adapter_free(a);
}

/* Loading `dir` must fail with a message containing needle (and needle2 unless NULL). */
static void load_fails(const char *dir, const char *needle, const char *needle2) {
    twn_adapter *a = (twn_adapter *)(uintptr_t)1;
    twn_err e = {{0}};
    assert_int_equal(twn_adapter_load(dir, "x", &a, &e), -1);
    assert_null(a);
    if (!strstr(e.msg, needle)) fail_msg("message \"%s\" lacks \"%s\"", e.msg, needle);
    if (needle2 && !strstr(e.msg, needle2)) fail_msg("message \"%s\" lacks \"%s\"", e.msg, needle2);
}

/* A standard adapter dir (q_proj/v_proj tensors) with one config field patched. */
static const char *refusal_dir(const char *tag, const char *from, const char *to) {
    const char *dir = tu_tmpdir(tag);
    write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
    if (from) patch_config(dir, from, to);
    write_plain_tensors(dir);
    return dir;
}

static void test_refuse_config_features(void **state) {
    (void)state;
    static const struct {
        const char *from, *to, *needle;
    } cases[] = {
        {"\"use_dora\": false", "\"use_dora\": true", "use_dora"},
        {"\"modules_to_save\": null", "\"modules_to_save\": [\"lm_head\"]", "modules_to_save"},
        {"\"lora_bias\": false", "\"lora_bias\": true", "lora_bias"},
        {"\"bias\": \"none\"", "\"bias\": \"lora_only\"", "bias = \"lora_only\""},
        {"\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "peft_type = \"IA3\""},
        {"\"layer_replication\": null", "\"layer_replication\": [[0, 4], [2, 5]]",
         "layer_replication"},
        {"\"target_parameters\": null", "\"target_parameters\": [\"experts.gate_up_proj\"]",
         "target_parameters"},
        {"\"trainable_token_indices\": null", "\"trainable_token_indices\": [151665]",
         "trainable_token_indices"},
        {"\"use_qalora\": false", "\"use_qalora\": true", "use_qalora"},
        {"\"alora_invocation_tokens\": null", "\"alora_invocation_tokens\": [151644, 77091]",
         "alora_invocation_tokens"},
        {"\"megatron_config\": null", "\"megatron_config\": {\"tensor_model_parallel_size\": 2}",
         "megatron_config"},
        {"\"arrow_config\": null", "\"arrow_config\": {\"top_k\": 3}", "arrow_config"},
        {"\"use_bdlora\": null", "\"use_bdlora\": {\"nblocks\": 2}", "use_bdlora"},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"pissa_niter_16\"",
         "path_initial_model_for_weight_conversion"},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"olora\"", "\"olora\""},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"loftq\"", "\"loftq\""},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"corda\"", "\"corda\""},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"mica\"", "\"mica\""},
        {"\"r\": 4", "\"r\": 0", "r = 0"},
        {"\"lora_alpha\": 8", "\"lora_alpha\": \"8\"", "lora_alpha"},
        {"\"target_modules\": [", "\"target_modules\": null, \"x\": [",
         "target_modules is missing"},
        {"\"peft_version\"", "\"peft_version\": 1,, \"y\"", "invalid JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char tag[64];
        snprintf(tag, sizeof tag, "adapter-refuse-%zu", i);
        const char *dir = refusal_dir(tag, cases[i].from, cases[i].to);
        load_fails(dir, cases[i].needle, "adapter_config.json");
    }
}

static void test_accept_benign_values(void **state) {
    (void)state;
    /* Settings that leave the plain forward: non-default but harmless values load. */
    static const struct {
        const char *from, *to;
    } cases[] = {
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"gaussian\""},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": \"eva\""},
        {"\"init_lora_weights\": true", "\"init_lora_weights\": false"},
        {"\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true"},
        {"\"inference_mode\": true", "\"inference_mode\": false"},
        {"\"modules_to_save\": null", "\"modules_to_save\": []"},
        {"\"task_type\": \"CAUSAL_LM\"", "\"task_type\": null, \"some_future_key\": {\"a\": 1}"},
        {"\"use_qalora\": false", "\"use_qalora\": 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char tag[64];
        snprintf(tag, sizeof tag, "adapter-accept-%zu", i);
        const char *dir = refusal_dir(tag, cases[i].from, cases[i].to);
        twn_adapter *a = NULL;
        twn_err e = {{0}};
        if (twn_adapter_load(dir, "x", &a, &e)) fail_msg("case %zu: %s", i, e.msg);
        const twn_lora *q = twn_adapter_find(a, LM "0.self_attn.q_proj");
        assert_non_null(q);
        assert_int_equal(q->in_features, 16); /* fan_in_fan_out never transposes A/B */
        assert_int_equal(q->out_features, 16);
        assert_true(q->scaling == 2.0f);
        twn_adapter_free(a);
    }
}

static void test_refuse_untargeted_module(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-untargeted");
    write_config(dir, "4", "8", "[\"q_proj\", \"v_proj\"]", "false", "{}", "{}");
    twn_st_writer *w = twn_st_writer_new();
    float a[4 * 16], b[16 * 4];
    fill(a, 64, 1), fill(b, 64, 2);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
    add_f32(w, "base_model.model." LM "0.self_attn.o_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.o_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
    write_st(w, dir);
    load_fails(dir, LM "0.self_attn.o_proj", "target_modules does not select");

    /* Excluded modules are named as such. */
    patch_config(dir, "\"exclude_modules\": null",
                 "\"exclude_modules\": [\"layers.0.self_attn.q_proj\"]");
    patch_config(dir, "\"q_proj\", \"v_proj\"", "\"q_proj\", \"o_proj\"");
    load_fails(dir, "exclude_modules excludes", LM "0.self_attn.q_proj");
}

static void test_refuse_rank_mismatch(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-rank");
    write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
    twn_st_writer *w = twn_st_writer_new();
    float a[4 * 16], b[16 * 2];
    fill(a, 64, 1), fill(b, 32, 2);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 2, b);
    write_st(w, dir);
    load_fails(dir, "rank mismatch", "[16, 2]");

    /* A consistent pair whose r disagrees with rank_pattern. */
    write_config(dir, "4", "8", STD_TARGETS, "false", "{\"q_proj\": 16}", "{}");
    write_plain_tensors(dir);
    load_fails(dir, "r=4", "rank_pattern[\"q_proj\"]");
}

static void test_refuse_missing_factor(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-missing-b");
    write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
    twn_st_writer *w = twn_st_writer_new();
    float a[4 * 16], b[16 * 4];
    fill(a, 64, 1), fill(b, 64, 2);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
    add_f32(w, "base_model.model." LM "0.self_attn.k_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
    write_st(w, dir);
    load_fails(dir, LM "0.self_attn.k_proj has lora_A.weight but no lora_B.weight", NULL);

    w = twn_st_writer_new();
    add_f32(w, "base_model.model." LM "0.self_attn.k_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
    write_st(w, dir);
    load_fails(dir, "has lora_B.weight but no lora_A.weight", NULL);
}

static void test_refuse_stray_tensors(void **state) {
    (void)state;
    static const struct {
        const char *name, *needle;
    } cases[] = {
        {"base_model.model." LM "0.self_attn.q_proj.lora_magnitude_vector", "DoRA"},
        {"base_model.model." LM "0.self_attn.q_proj.lora_B.bias", "lora_bias"},
        {"base_model.model.lm_head.weight", "modules_to_save"},
        {"base_model.model." LM "0.self_attn.q_proj.base_layer.bias", "bias != \"none\""},
        {"base_model.model." LM "0.self_attn.k_proj.lora_A.default.weight", "adapter name"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char tag[64];
        snprintf(tag, sizeof tag, "adapter-stray-%zu", i);
        const char *dir = tu_tmpdir(tag);
        write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
        twn_st_writer *w = twn_st_writer_new();
        float a[4 * 16], b[16 * 4];
        fill(a, 64, 1), fill(b, 64, 2);
        add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight", TWN_DT_F32, 4, 16, a);
        add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
        add_f32(w, cases[i].name, TWN_DT_F32, 4, 4, a);
        write_st(w, dir);
        load_fails(dir, cases[i].needle, cases[i].name);
    }
}

static void test_refuse_bad_tensor(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("adapter-dtype");
    write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
    twn_st_writer *w = twn_st_writer_new();
    int32_t ai[4 * 16] = {0};
    float b[16 * 4];
    fill(b, 64, 2);
    int64_t sa[2] = {4, 16};
    twn_err e = {{0}};
    assert_int_equal(twn_st_writer_add(w, "base_model.model." LM "0.self_attn.q_proj.lora_A.weight",
                                       TWN_DT_I32, 2, sa, ai, &e),
                     0);
    add_f32(w, "base_model.model." LM "0.self_attn.q_proj.lora_B.weight", TWN_DT_F32, 16, 4, b);
    write_st(w, dir);
    load_fails(dir, "dtype I32", "q_proj.lora_A.weight");

    /* An embedding LoRA with ensure_weight_tying. */
    dir = tu_tmpdir("adapter-tying");
    write_config(dir, "4", "8", "[\"embed_tokens\"]", "false", "{}", "{}");
    patch_config(dir, "\"ensure_weight_tying\": false", "\"ensure_weight_tying\": true");
    w = twn_st_writer_new();
    float ea[4 * 10], eb[6 * 4];
    fill(ea, 40, 0), fill(eb, 24, 1);
    add_f32(w, "base_model.model.model.language_model.embed_tokens.lora_embedding_A", TWN_DT_F32, 4,
            10, ea);
    add_f32(w, "base_model.model.model.language_model.embed_tokens.lora_embedding_B", TWN_DT_F32, 6,
            4, eb);
    write_st(w, dir);
    load_fails(dir, "ensure_weight_tying", "embed_tokens");
}

static void test_refuse_files(void **state) {
    (void)state;
    const char *dir = refusal_dir("adapter-trunc", NULL, NULL);
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    size_t n;
    char *bytes = tu_read(path, &n);
    tu_write(path, bytes, n - 7);
    free(bytes);
    load_fails(dir, path, NULL);

    /* No safetensors but a legacy .bin: named, with the way out. */
    remove(path);
    snprintf(path, sizeof path, "%s/adapter_model.bin", dir);
    tu_write(path, "PK", 2);
    load_fails(dir, "adapter_model.safetensors: not found", "safe_serialization");

    /* No config at all. */
    dir = tu_tmpdir("adapter-empty");
    load_fails(dir, "adapter_config.json", NULL);

    /* A file with no LoRA tensors. */
    dir = tu_tmpdir("adapter-none");
    write_config(dir, "4", "8", STD_TARGETS, "false", "{}", "{}");
    write_st(twn_st_writer_new(), dir);
    load_fails(dir, "no LoRA tensors", NULL);
}

static void test_find_without_index(void **state) {
    (void)state;
    /* Adapters built by hand (other modules' tests) have no index; find still works. */
    twn_lora l[2] = {{.module = "a.q_proj"}, {.module = "a.v_proj"}};
    twn_adapter a = {.loras = l, .n_loras = 2};
    assert_ptr_equal(twn_adapter_find(&a, "a.v_proj"), &l[1]);
    assert_null(twn_adapter_find(&a, "a.k_proj"));
    assert_null(twn_adapter_find(NULL, "a.k_proj"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_list_suffix),
        cmocka_unit_test(test_regex_fullmatch),
        cmocka_unit_test(test_all_linear),
        cmocka_unit_test(test_exclude_modules),
        cmocka_unit_test(test_layers_to_transform),
        cmocka_unit_test(test_rank_alpha_pattern),
        cmocka_unit_test(test_scaling),
        cmocka_unit_test(test_load_full),
        cmocka_unit_test(test_load_rslora_embedding),
        cmocka_unit_test(test_refuse_config_features),
        cmocka_unit_test(test_accept_benign_values),
        cmocka_unit_test(test_refuse_untargeted_module),
        cmocka_unit_test(test_refuse_rank_mismatch),
        cmocka_unit_test(test_refuse_missing_factor),
        cmocka_unit_test(test_refuse_stray_tensors),
        cmocka_unit_test(test_refuse_bad_tensor),
        cmocka_unit_test(test_refuse_files),
        cmocka_unit_test(test_find_without_index),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
