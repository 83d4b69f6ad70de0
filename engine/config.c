/* config.c — reading a Qwen3-VL config.json into twn_config (see config.h).
 *
 * The integer fields are tables (key, offset, lower bound) rather than code, so adding a field is
 * one line and every field gets the same "missing / wrong type / out of range" messages.  Fields
 * that transformers always writes for this model are required; there is deliberately no fallback
 * to transformers' class defaults, which are not the values of any checkpoint (spec §1.1).  The
 * few true defaults (special token ids, RoPE section, activations) are named here.
 *
 * Both RoPE spellings end in the same struct: 4.57's text_config.{rope_theta, rope_scaling} and
 * v5's text_config.rope_parameters; only rope_v5 records which one was read. */
#include "engine/config.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "util/fileio.h"
#include "util/mem.h"

/* config.json is a few KB; this only stops a wrong path from reading a checkpoint. */
#define CONFIG_MAX_BYTES (16u << 20)

/* Defaults: Qwen3VLConfig's special ids (CFG5), 4.57's mrope_section fallback, HF activations. */
#define DEFAULT_IMAGE_TOKEN_ID        151655
#define DEFAULT_VIDEO_TOKEN_ID        151656
#define DEFAULT_VISION_START_TOKEN_ID 151652
#define DEFAULT_VISION_END_TOKEN_ID   151653
static const int default_mrope_section[3] = {24, 20, 20};
#define TEXT_ACT   "silu"
#define VISION_ACT "gelu_pytorch_tanh"

/* What the parser is working on: the name for messages and where errors go. */
typedef struct {
    const char *name;
    twn_err *err;
} ctx;

static int cfail(const ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Every error is "<file>: <key> <problem>". */
static int cfail(const ctx *c, const char *fmt, ...) {
    char msg[TWN_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return twn_err_set(c->err, "%s: %s", c->name, msg);
}

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* A present, non-null member (JSON null counts as absent, as it does for transformers). */
static json_t *member(const json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    return v && !json_is_null(v) ? v : NULL;
}

// ------------------------------------------------------------------------------------------------
// Typed getters: sect is the dotted prefix for messages ("text_config."), "" at the top level.

static int get_int(const ctx *c, const json_t *obj, const char *sect, const char *key, int required,
                   int def, int min, int *out) {
    json_t *v = member(obj, key);
    if (!v) {
        if (required) return cfail(c, "%s%s is missing", sect, key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v))
        return cfail(c, "%s%s is %s, expected an integer", sect, key, json_kind(v));
    json_int_t x = json_integer_value(v);
    if (x < min || x > INT32_MAX)
        return cfail(c, "%s%s = %lld is out of range (%d..%d)", sect, key, (long long)x, min,
                     INT32_MAX);
    *out = (int)x;
    return 0;
}

static int get_positive_double(const ctx *c, const json_t *obj, const char *sect, const char *key,
                               double *out) {
    json_t *v = member(obj, key);
    if (!v) return cfail(c, "%s%s is missing", sect, key);
    if (!json_is_number(v))
        return cfail(c, "%s%s is %s, expected a number", sect, key, json_kind(v));
    double x = json_number_value(v);
    if (!(x > 0) || !isfinite(x)) return cfail(c, "%s%s = %g must be positive", sect, key, x);
    *out = x;
    return 0;
}

/* Returns 1 and sets *out when present, 0 when absent, -1 on a non-boolean. */
static int get_bool(const ctx *c, const json_t *obj, const char *sect, const char *key, bool *out) {
    json_t *v = member(obj, key);
    if (!v) return 0;
    if (!json_is_boolean(v))
        return cfail(c, "%s%s is %s, expected true or false", sect, key, json_kind(v));
    *out = json_is_true(v);
    return 1;
}

/* Copies a string member into buf (def when absent). */
static int get_str(const ctx *c, const json_t *obj, const char *sect, const char *key,
                   const char *def, char *buf, size_t n) {
    json_t *v = member(obj, key);
    const char *s = def;
    if (v) {
        if (!json_is_string(v))
            return cfail(c, "%s%s is %s, expected a string", sect, key, json_kind(v));
        s = json_string_value(v);
    }
    if (strlen(s) >= n) return cfail(c, "%s%s \"%.64s...\" is too long", sect, key, s);
    snprintf(buf, n, "%s", s);
    return 0;
}

/* A token id, or a list of them (the first is kept); -1 when absent or an empty list. */
static int get_token_id(const ctx *c, const json_t *obj, const char *sect, const char *key,
                        int *out) {
    json_t *v = member(obj, key);
    *out = -1;
    if (!v) return 0;
    if (json_is_array(v)) {
        if (!json_array_size(v)) return 0;
        v = json_array_get(v, 0);
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
        return cfail(c, "%s%s must be a token id >= 0 or a list of them", sect, key);
    *out = (int)json_integer_value(v);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// The tables

typedef struct {
    const char *key;
    size_t off; /* offsetof the int field */
} int_field;

/* Required, each >= 1. */
static const int_field text_ints[] = {
    {"vocab_size", offsetof(twn_text_config, vocab_size)},
    {"hidden_size", offsetof(twn_text_config, hidden_size)},
    {"intermediate_size", offsetof(twn_text_config, intermediate_size)},
    {"num_hidden_layers", offsetof(twn_text_config, num_hidden_layers)},
    {"num_attention_heads", offsetof(twn_text_config, num_attention_heads)},
    {"num_key_value_heads", offsetof(twn_text_config, num_key_value_heads)},
    {"head_dim", offsetof(twn_text_config, head_dim)},
    {"max_position_embeddings", offsetof(twn_text_config, max_position_embeddings)},
};

static const int_field vision_ints[] = {
    {"depth", offsetof(twn_vision_config, depth)},
    {"hidden_size", offsetof(twn_vision_config, hidden_size)},
    {"intermediate_size", offsetof(twn_vision_config, intermediate_size)},
    {"num_heads", offsetof(twn_vision_config, num_heads)},
    {"in_channels", offsetof(twn_vision_config, in_channels)},
    {"patch_size", offsetof(twn_vision_config, patch_size)},
    {"temporal_patch_size", offsetof(twn_vision_config, temporal_patch_size)},
    {"spatial_merge_size", offsetof(twn_vision_config, spatial_merge_size)},
    {"out_hidden_size", offsetof(twn_vision_config, out_hidden_size)},
    {"num_position_embeddings", offsetof(twn_vision_config, num_position_embeddings)},
};

static int get_ints(const ctx *c, const json_t *obj, const char *sect, const int_field *f, size_t n,
                    void *base) {
    for (size_t i = 0; i < n; i++)
        if (get_int(c, obj, sect, f[i].key, 1, 0, 1, (int *)((char *)base + f[i].off)) != 0)
            return -1;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Sections

/* rope_type, mrope_interleaved and mrope_section of a rope_scaling / rope_parameters object. */
static int parse_rope_fields(const ctx *c, const json_t *rp, const char *sect, twn_text_config *t) {
    char rope_type[32];
    const char *type_key = member(rp, "rope_type") ? "rope_type" : "type"; /* "type": legacy */
    if (get_str(c, rp, sect, type_key, "default", rope_type, sizeof rope_type) != 0) return -1;
    if (strcmp(rope_type, "default"))
        return cfail(c, "%s%s \"%s\" is not supported (only \"default\")", sect, type_key,
                     rope_type);
    if (get_bool(c, rp, sect, "mrope_interleaved", &t->mrope_interleaved) < 0) return -1;
    json_t *ms = member(rp, "mrope_section");
    if (ms) {
        if (!json_is_array(ms) || json_array_size(ms) != 3)
            return cfail(c, "%smrope_section must be a list of 3 integers", sect);
        for (int i = 0; i < 3; i++) {
            json_t *x = json_array_get(ms, (size_t)i);
            if (!json_is_integer(x) || json_integer_value(x) < 0 ||
                json_integer_value(x) > INT32_MAX / 4)
                return cfail(c, "%smrope_section[%d] must be an integer >= 0", sect, i);
            t->mrope_section[i] = (int)json_integer_value(x);
        }
    }
    return 0;
}

/* RoPE: v5 rope_parameters if present, else 4.57 rope_theta + rope_scaling. */
static int parse_rope(const ctx *c, const json_t *tc, twn_config *cfg) {
    twn_text_config *t = &cfg->text;
    json_t *rp = member(tc, "rope_parameters");
    const char *sect;
    if (rp) {
        cfg->rope_v5 = true;
        sect = "text_config.rope_parameters.";
        if (!json_is_object(rp))
            return cfail(c, "text_config.rope_parameters is %s, expected an object", json_kind(rp));
        /* rope_theta moved into rope_parameters in v5; text_config.rope_theta is the fallback. */
        if (member(rp, "rope_theta")) {
            if (get_positive_double(c, rp, sect, "rope_theta", &t->rope_theta) != 0) return -1;
        } else if (get_positive_double(c, tc, "text_config.", "rope_theta", &t->rope_theta) != 0)
            return -1;
    } else {
        rp = member(tc, "rope_scaling");
        sect = "text_config.rope_scaling.";
        if (rp && !json_is_object(rp))
            return cfail(c, "text_config.rope_scaling is %s, expected an object", json_kind(rp));
        if (get_positive_double(c, tc, "text_config.", "rope_theta", &t->rope_theta) != 0)
            return -1;
    }
    memcpy(t->mrope_section, default_mrope_section, sizeof t->mrope_section);
    t->mrope_interleaved = true; /* 4.57 always interleaves */
    if (rp && parse_rope_fields(c, rp, sect, t) != 0) return -1;
    int sum = t->mrope_section[0] + t->mrope_section[1] + t->mrope_section[2];
    if (sum != t->head_dim / 2)
        return cfail(
            c, "%smrope_section [%d, %d, %d]%s sums to %d, but text_config.head_dim / 2 = %d", sect,
            t->mrope_section[0], t->mrope_section[1], t->mrope_section[2],
            rp && member(rp, "mrope_section") ? "" : " (the default)", sum, t->head_dim / 2);
    return 0;
}

static int parse_text(const ctx *c, const json_t *tc, twn_config *cfg) {
    twn_text_config *t = &cfg->text;
    const char *sect = "text_config.";
    if (get_ints(c, tc, sect, text_ints, sizeof text_ints / sizeof *text_ints, t) != 0) return -1;
    if (t->head_dim % 2)
        return cfail(c, "text_config.head_dim = %d must be even (RoPE rotates pairs)", t->head_dim);
    if (t->num_attention_heads % t->num_key_value_heads)
        return cfail(c,
                     "text_config.num_attention_heads = %d is not a multiple of "
                     "text_config.num_key_value_heads = %d",
                     t->num_attention_heads, t->num_key_value_heads);
    if (get_positive_double(c, tc, sect, "rms_norm_eps", &t->rms_norm_eps) != 0) return -1;
    if (parse_rope(c, tc, cfg) != 0) return -1;

    t->attention_bias = false;
    if (get_bool(c, tc, sect, "attention_bias", &t->attention_bias) < 0) return -1;
    if (t->attention_bias)
        return cfail(c, "text_config.attention_bias = true is not supported (Qwen3-VL has no "
                        "attention biases)");
    if (get_str(c, tc, sect, "hidden_act", TEXT_ACT, t->hidden_act, sizeof t->hidden_act) != 0)
        return -1;
    if (strcmp(t->hidden_act, TEXT_ACT))
        return cfail(c, "text_config.hidden_act \"%s\" is not supported (only \"" TEXT_ACT "\")",
                     t->hidden_act);
    if (get_token_id(c, tc, sect, "bos_token_id", &t->bos_token_id) != 0) return -1;
    if (get_token_id(c, tc, sect, "eos_token_id", &t->eos_token_id) != 0) return -1;
    return 0;
}

static int parse_vision(const ctx *c, const json_t *vc, twn_config *cfg) {
    twn_vision_config *v = &cfg->vision;
    const char *sect = "vision_config.";
    if (get_ints(c, vc, sect, vision_ints, sizeof vision_ints / sizeof *vision_ints, v) != 0)
        return -1;
    if (v->hidden_size % v->num_heads)
        return cfail(
            c, "vision_config.hidden_size = %d is not a multiple of vision_config.num_heads = %d",
            v->hidden_size, v->num_heads);
    /* The 2-D vision RoPE gives each of (row, column) a quarter of the head dims. */
    if ((v->hidden_size / v->num_heads) % 4)
        return cfail(c,
                     "vision_config.hidden_size / vision_config.num_heads = %d must be a multiple "
                     "of 4 (2-D RoPE)",
                     v->hidden_size / v->num_heads);
    int side = (int)lround(sqrt((double)v->num_position_embeddings));
    if ((long long)side * side != v->num_position_embeddings)
        return cfail(
            c, "vision_config.num_position_embeddings = %d is not a square (the grid is n x n)",
            v->num_position_embeddings);
    json_t *ds = member(vc, "deepstack_visual_indexes");
    if (!ds) return cfail(c, "vision_config.deepstack_visual_indexes is missing");
    if (!json_is_array(ds) || json_array_size(ds) > TWN_MAX_DEEPSTACK)
        return cfail(
            c, "vision_config.deepstack_visual_indexes must be a list of at most %d block indexes",
            TWN_MAX_DEEPSTACK);
    v->n_deepstack = (int)json_array_size(ds);
    for (int i = 0; i < v->n_deepstack; i++) {
        json_t *x = json_array_get(ds, (size_t)i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= v->depth)
            return cfail(
                c,
                "vision_config.deepstack_visual_indexes[%d] must be a block index in [0, depth %d)",
                i, v->depth);
        v->deepstack_visual_indexes[i] = (int)json_integer_value(x);
    }
    if (get_str(c, vc, sect, "hidden_act", VISION_ACT, v->hidden_act, sizeof v->hidden_act) != 0)
        return -1;
    if (strcmp(v->hidden_act, VISION_ACT))
        return cfail(c,
                     "vision_config.hidden_act \"%s\" is not supported (only \"" VISION_ACT "\")",
                     v->hidden_act);
    /* The merger's output is added into the text stream, and deepstack feature k goes into the
     * output of decoder layer k. */
    if (v->out_hidden_size != cfg->text.hidden_size)
        return cfail(c,
                     "vision_config.out_hidden_size = %d differs from text_config.hidden_size = %d",
                     v->out_hidden_size, cfg->text.hidden_size);
    if (v->n_deepstack > cfg->text.num_hidden_layers)
        return cfail(c,
                     "vision_config.deepstack_visual_indexes has %d entries, more than "
                     "text_config.num_hidden_layers = %d",
                     v->n_deepstack, cfg->text.num_hidden_layers);
    return 0;
}

/* Special ids, tie_word_embeddings and dtype: top level first, then text_config. */
static int parse_top(const ctx *c, const json_t *root, const json_t *tc, twn_config *cfg) {
    static const struct {
        const char *key;
        size_t off;
        int def;
    } ids[] = {
        {"image_token_id", offsetof(twn_config, image_token_id), DEFAULT_IMAGE_TOKEN_ID},
        {"video_token_id", offsetof(twn_config, video_token_id), DEFAULT_VIDEO_TOKEN_ID},
        {"vision_start_token_id", offsetof(twn_config, vision_start_token_id),
         DEFAULT_VISION_START_TOKEN_ID},
        {"vision_end_token_id", offsetof(twn_config, vision_end_token_id),
         DEFAULT_VISION_END_TOKEN_ID},
    };
    for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) {
        int *id = (int *)((char *)cfg + ids[i].off);
        if (get_int(c, root, "", ids[i].key, 0, ids[i].def, 0, id) != 0) return -1;
        /* Only an image prompt uses these, so only a vision model needs them in the vocabulary
         * (a text-only test model may shrink the vocabulary and keep the defaults). */
        if (cfg->has_vision && *id >= cfg->text.vocab_size)
            return cfail(c, "%s = %d is outside text_config.vocab_size = %d", ids[i].key, *id,
                         cfg->text.vocab_size);
    }
    if (cfg->text.bos_token_id >= cfg->text.vocab_size)
        return cfail(c, "text_config.bos_token_id = %d is outside text_config.vocab_size = %d",
                     cfg->text.bos_token_id, cfg->text.vocab_size);
    if (cfg->text.eos_token_id >= cfg->text.vocab_size)
        return cfail(c, "text_config.eos_token_id = %d is outside text_config.vocab_size = %d",
                     cfg->text.eos_token_id, cfg->text.vocab_size);

    cfg->tie_word_embeddings = false; /* Qwen3VLConfig's default */
    int r = get_bool(c, root, "", "tie_word_embeddings", &cfg->tie_word_embeddings);
    if (r < 0) return -1;
    if (r == 0 &&
        get_bool(c, tc, "text_config.", "tie_word_embeddings", &cfg->tie_word_embeddings) < 0)
        return -1;

    /* v5 writes "dtype", 4.57 "torch_dtype"; some files only have it inside text_config. */
    static const char *const dtype_keys[] = {"dtype", "torch_dtype"};
    const json_t *where[] = {root, tc};
    const char *sects[] = {"", "text_config."};
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 2; k++)
            if (member(where[w], dtype_keys[k]))
                return get_str(c, where[w], sects[w], dtype_keys[k], "", cfg->dtype,
                               sizeof cfg->dtype);
    return 0;
}

static int parse_root(const ctx *c, const json_t *root, twn_config *cfg) {
    if (!json_is_object(root))
        return cfail(c, "the top level is %s, expected an object", json_kind(root));
    json_t *mt = member(root, "model_type");
    if (!mt || !json_is_string(mt))
        return cfail(c, "model_type is missing or not a string (only \"qwen3_vl\" is supported)");
    if (strcmp(json_string_value(mt), "qwen3_vl"))
        return cfail(c, "model_type \"%.64s\" is not supported (only \"qwen3_vl\")",
                     json_string_value(mt));
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", json_string_value(mt));

    json_t *tc = member(root, "text_config");
    if (!tc) return cfail(c, "text_config is missing");
    if (!json_is_object(tc))
        return cfail(c, "text_config is %s, expected an object", json_kind(tc));
    if (parse_text(c, tc, cfg) != 0) return -1;

    json_t *vc = member(root, "vision_config");
    if (vc) {
        if (!json_is_object(vc))
            return cfail(c, "vision_config is %s, expected an object", json_kind(vc));
        if (parse_vision(c, vc, cfg) != 0) return -1;
        cfg->has_vision = true;
    }
    return parse_top(c, root, tc, cfg);
}

// ------------------------------------------------------------------------------------------------
// Public entry points

int twn_config_parse(const char *json, size_t len, const char *name, twn_config *cfg,
                     twn_err *err) {
    memset(cfg, 0, sizeof *cfg);
    ctx c = {name, err};
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_DECODE_ANY, &je);
    if (!root)
        return cfail(&c, "invalid JSON at line %d, column %d: %s", je.line, je.column, je.text);
    int rc = parse_root(&c, root, cfg);
    json_decref(root);
    if (rc != 0) memset(cfg, 0, sizeof *cfg);
    return rc;
}

int twn_config_load(const char *path, twn_config *cfg, twn_err *err) {
    char *text = NULL;
    size_t len = 0;
    if (twn_read_file(path, CONFIG_MAX_BYTES, &text, &len, err) != 0) return -1;
    int rc = twn_config_parse(text, len, path, cfg, err);
    twn_free(text);
    return rc;
}
