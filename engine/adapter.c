/* adapter.c — PEFT LoRA adapters: adapter_config.json rules and adapter_model.safetensors tensors.
 *
 * The goal is to accept exactly the adapters whose inference forward is the plain
 * y = W x + scaling * B (A x) of peft tuners/lora/layer.py, and to refuse everything else by key
 * name instead of silently computing something different.  PEFT grows new config keys with every
 * release, so unknown keys are ignored; known keys that switch on a different forward (DoRA,
 * aLoRA, QA-LoRA, Arrow, trained biases, replacement modules, ...) are refused when set to
 * anything but their default.
 *
 * Choices that differ from a literal reading of the config:
 *  - fan_in_fan_out is ignored.  It only says how the *base* weight is stored (Conv1D keeps
 *    [in, out]); lora_A / lora_B are nn.Linear in every case, so the saved A is [r, in] and B is
 *    [out, r] either way, and transposing them would be wrong.  Every Qwen3-VL target is an
 *    nn.Linear, for which PEFT itself resets fan_in_fan_out to False with a warning.
 *  - init_lora_weights: true / false / "gaussian" / "orthogonal" / "eva" only choose the starting
 *    A and B, so the trained adapter is a plain LoRA.  "pissa*", "olora", "corda*", "loftq" and
 *    "lora_ga" also rewrite the base weights at initialisation (W' = W - s*B0*A0, or a quantized
 *    W); the saved A and B are only correct on top of that modified W, which this engine does not
 *    have, so they are refused.  PEFT's save_pretrained(path_initial_model_for_weight_conversion=)
 *    turns such an adapter into a plain one (and writes init_lora_weights: true), which loads.
 *    Any other string is refused as unknown.
 *  - r comes from lora_A's shape and must equal what r / rank_pattern say for the module, since
 *    PEFT builds the layer from the config and would refuse a mismatching state dict.
 *  - ensure_weight_tying with an embedding LoRA is refused: on a tied model PEFT may then share
 *    the adapter with lm_head, which this loader cannot express.
 *
 * Regexes are PCRE2 patterns compiled to behave like Python's `re` on module names (see
 * adapter_internal.h), with match limits so a hostile pattern cannot stall the loader. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "engine/adapter.h"
#include "engine/adapter_internal.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "engine/safetensors.h"
#include "engine/tensor.h"
#include "util/fileio.h"
#include "util/hash.h"
#include "util/mem.h"
#include "util/vec.h"

/* adapter_config.json is a few KB; anything near this is not a PEFT config. */
#define ADAPTER_CONFIG_MAX_BYTES ((size_t)16 << 20)
/* PCRE2 limits per match: module names are < 200 bytes, so honest patterns stay far below. */
#define REGEX_MATCH_LIMIT    100000u
#define REGEX_DEPTH_LIMIT    10000u
#define REGEX_HEAP_LIMIT_KIB 65536u
/* target_desc lists targets up to this many characters, then "+N more". */
#define DESC_TARGETS_MAX 160

static const char KEY_PREFIX[] = "base_model.model.";

// ------------------------------------------------------------------------------------------------
// Python-semantics regexes

struct twn_pyre {
    pcre2_code *code;
};

/* Compiles `src` (UTF-8, Unicode classes like Python 3 str patterns) with extra options
 * (PCRE2_ANCHORED for re.match, plus PCRE2_ENDANCHORED for re.fullmatch).  `ctx` names the key
 * in the message. */
static int pyre_compile(const char *src, uint32_t opts, const char *what, const char *ctx,
                        twn_pyre **out, twn_err *err) {
    int ecode = 0;
    PCRE2_SIZE eoff = 0;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)src, PCRE2_ZERO_TERMINATED,
                                     PCRE2_UTF | PCRE2_UCP | opts, &ecode, &eoff, NULL);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof msg);
        return twn_err_set(err, "%s: %s is not a valid regex: %s at offset %zu", what, ctx,
                           (const char *)msg, (size_t)eoff);
    }
    twn_pyre *re = twn_malloc(sizeof *re);
    re->code = code;
    *out = re;
    return 0;
}

static void pyre_free(twn_pyre *re) {
    if (!re) return;
    pcre2_code_free(re->code);
    twn_free(re);
}

/* Returns 1 (match), 0 (no match) or -1 (error: match limit, bad UTF-8 subject).  When g1 is
 * non-NULL it receives capture group 1 as [start, end), or start == PCRE2_UNSET. */
static int pyre_match(const twn_pyre *re, const char *subject, size_t g1[2], twn_err *err) {
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re->code, NULL);
    pcre2_match_context *mc = pcre2_match_context_create(NULL);
    if (!md || !mc) {
        pcre2_match_data_free(md);
        pcre2_match_context_free(mc);
        return twn_err_set(err, "out of memory matching a regex");
    }
    pcre2_set_match_limit(mc, REGEX_MATCH_LIMIT);
    pcre2_set_depth_limit(mc, REGEX_DEPTH_LIMIT);
    pcre2_set_heap_limit(mc, REGEX_HEAP_LIMIT_KIB);
    int rc = pcre2_match(re->code, (PCRE2_SPTR)subject, strlen(subject), 0, 0, md, mc);
    int result;
    if (rc >= 0) {
        result = 1;
        if (g1) {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            g1[0] = g1[1] = PCRE2_UNSET;
            if (pcre2_get_ovector_count(md) > 1 && rc != 1) {
                g1[0] = ov[2];
                g1[1] = ov[3];
            }
        }
    } else if (rc == PCRE2_ERROR_NOMATCH) {
        result = 0;
    } else {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        result = twn_err_set(err, "matching \"%s\": %s", subject, (const char *)msg);
    }
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    return result;
}

// ------------------------------------------------------------------------------------------------
// JSON helpers

/* Python truthiness of a JSON value, since PEFT tests most options with a plain `if x:`. */
static bool py_truthy(const json_t *v) {
    if (!v) return false;
    switch (json_typeof(v)) {
    case JSON_TRUE:
        return true;
    case JSON_INTEGER:
        return json_integer_value(v) != 0;
    case JSON_REAL:
        return json_real_value(v) != 0.0;
    case JSON_STRING:
        return json_string_length(v) > 0;
    case JSON_ARRAY:
        return json_array_size(v) > 0;
    case JSON_OBJECT:
        return json_object_size(v) > 0;
    default:
        return false; /* null, false */
    }
}

/* A short rendering of a value for messages ("true", "[\"lm_head\"]", "{...}"). */
static const char *jshow(const json_t *v, char *buf, size_t n) {
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    if (!s) {
        snprintf(buf, n, "%s", v ? "?" : "absent");
        return buf;
    }
    if (strlen(s) >= n && n > 4)
        snprintf(buf, n, "%.*s...", (int)(n - 4), s);
    else
        snprintf(buf, n, "%s", s);
    free(s);
    return buf;
}

// ------------------------------------------------------------------------------------------------
// adapter_config.json

/* Keys that select something other than a plain LoRA forward.  `when_set`: refused when the
 * value is truthy (PEFT's `if cfg.x:`) or, for NOT_NULL keys, whenever it is not null (PEFT's
 * `if cfg.x is not None:`). */
typedef enum { WHEN_TRUTHY, WHEN_NOT_NULL } refuse_when;
static const struct {
    const char *key;
    refuse_when when;
    const char *why;
} refused_keys[] = {
    {"use_dora", WHEN_TRUTHY,
     "DoRA rescales every output row by a learned magnitude; only plain LoRA is implemented"},
    {"lora_bias", WHEN_TRUTHY, "lora_B carries a trained bias, which is not implemented"},
    {"modules_to_save", WHEN_TRUTHY,
     "whole trained copies of these modules would replace the base ones; not implemented"},
    {"layer_replication", WHEN_TRUTHY, "the adapter was trained on a model with replicated layers"},
    {"target_parameters", WHEN_TRUTHY,
     "LoRA on raw nn.Parameters (e.g. MoE experts) is not implemented"},
    {"trainable_token_indices", WHEN_TRUTHY,
     "trained embedding rows for selected tokens are not implemented"},
    {"use_qalora", WHEN_TRUTHY, "QA-LoRA pools lora_A's input in groups; not implemented"},
    {"alora_invocation_tokens", WHEN_NOT_NULL,
     "activated LoRA only applies after its invocation tokens; not implemented"},
    {"megatron_config", WHEN_TRUTHY, "Megatron tensor-parallel LoRA layers are not implemented"},
    {"arrow_config", WHEN_NOT_NULL, "Arrow routing between LoRA experts is not implemented"},
    {"use_bdlora", WHEN_NOT_NULL, "block-diagonal LoRA is not implemented"},
    {"kasa_config", WHEN_NOT_NULL, "the KaSA LoRA variant is not implemented"},
    {"velora_config", WHEN_NOT_NULL, "the VeLoRA LoRA variant is not implemented"},
    {"monteclora_config", WHEN_NOT_NULL, "the MonteCLoRA LoRA variant is not implemented"},
};

/* init_lora_weights values that rewrite the base weights when the adapter is created. */
static bool init_mutates_base(const char *s) {
    return !strncmp(s, "pissa", 5) || !strncmp(s, "corda", 5) || !strcasecmp(s, "olora") ||
           !strcmp(s, "loftq") || !strcmp(s, "lora_ga");
}

static void sel_free(twn_module_sel *s) {
    for (int i = 0; i < s->n_names; i++) twn_free(s->names[i]);
    twn_free(s->names);
    twn_free(s->src);
    pyre_free(s->re);
    memset(s, 0, sizeof *s);
}

/* target_modules / exclude_modules: a list of names, a regex string, or (target only)
 * "all-linear" in any case.  A falsy exclude_modules means no exclusion, as in PEFT. */
static int parse_sel(const json_t *v, const char *what, const char *key, bool is_target,
                     twn_module_sel *s, twn_err *err) {
    char show[96];
    memset(s, 0, sizeof *s);
    if (!is_target && !py_truthy(v)) return 0;
    if (!v || json_is_null(v))
        return twn_err_set(err,
                           "%s: %s is missing; PEFT has no default targets for Qwen3-VL, so the "
                           "adapter must name them",
                           what, key);
    if (json_is_string(v)) {
        const char *src = json_string_value(v);
        if (is_target && !strcasecmp(src, "all-linear")) {
            s->kind = TWN_SEL_ALL_LINEAR;
            return 0;
        }
        char ctx[160];
        snprintf(ctx, sizeof ctx, "%s %s", key, jshow(v, show, 80));
        s->kind = TWN_SEL_REGEX;
        s->src = twn_strdup(src);
        return pyre_compile(src, PCRE2_ANCHORED | PCRE2_ENDANCHORED, what, ctx, &s->re, err);
    }
    if (!json_is_array(v))
        return twn_err_set(err, "%s: %s = %s must be a list of module names or a regex string",
                           what, key, jshow(v, show, sizeof show));
    size_t n = json_array_size(v);
    if (n == 0)
        return twn_err_set(err, "%s: %s is an empty list, so the adapter targets nothing", what,
                           key);
    if (n > INT_MAX) return twn_err_set(err, "%s: %s has too many entries", what, key);
    s->kind = TWN_SEL_LIST;
    s->names = twn_calloc(n, sizeof *s->names);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(v, i);
        if (!json_is_string(e))
            return twn_err_set(err, "%s: %s[%zu] = %s is not a string", what, key, i,
                               jshow(e, show, sizeof show));
        s->names[s->n_names++] = twn_strdup(json_string_value(e));
    }
    return 0;
}

static int parse_patterns(const json_t *v, const char *what, const char *key, bool is_rank,
                          twn_pattern_entry **out, int *n_out, twn_err *err) {
    char show[96];
    *out = NULL;
    *n_out = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v))
        return twn_err_set(err, "%s: %s = %s must be an object {module pattern: value}", what, key,
                           jshow(v, show, sizeof show));
    size_t n = json_object_size(v);
    if (n == 0) return 0;
    if (n > INT_MAX) return twn_err_set(err, "%s: %s has too many entries", what, key);
    twn_pattern_entry *p = twn_calloc(n, sizeof *p);
    *out = p;
    const char *k;
    const json_t *val;
    /* jansson iterates objects in file order, which is the order get_pattern_key tries them. */
    json_object_foreach((json_t *)v, k, val) {
        twn_pattern_entry *e = &p[(*n_out)++];
        e->key = twn_strdup(k);
        if (is_rank) {
            if (!json_is_integer(val) || json_integer_value(val) <= 0 ||
                json_integer_value(val) > INT_MAX)
                return twn_err_set(err, "%s: %s[\"%s\"] = %s must be a positive integer", what, key,
                                   k, jshow(val, show, sizeof show));
            e->value = (double)json_integer_value(val);
        } else {
            if (!json_is_number(val))
                return twn_err_set(err, "%s: %s[\"%s\"] = %s must be a number", what, key, k,
                                   jshow(val, show, sizeof show));
            e->value = json_number_value(val);
        }
        /* re.match(rf"(.*\.)?({key})$", name): the key is pasted in raw, exactly as Python does. */
        twn_str src = {0};
        twn_str_printf(&src, "(.*\\.)?(%s)$", k);
        char ctx[200];
        snprintf(ctx, sizeof ctx, "%s key \"%.120s\"", key, k);
        int rc = pyre_compile(src.v, PCRE2_ANCHORED, what, ctx, &e->re, err);
        twn_str_free(&src);
        if (rc) return -1;
    }
    return 0;
}

static int parse_layers(const json_t *root, const char *what, twn_adapter_config *c, twn_err *err) {
    char show[96];
    const json_t *lt = json_object_get(root, "layers_to_transform");
    const json_t *lp = json_object_get(root, "layers_pattern");
    bool lt_set = lt && !json_is_null(lt), lp_set = lp && !json_is_null(lp);
    if (c->target.kind != TWN_SEL_LIST && (lt_set || lp_set))
        return twn_err_set(err,
                           "%s: %s cannot be used when target_modules is a string (PEFT "
                           "refuses this config too)",
                           what, lt_set ? "layers_to_transform" : "layers_pattern");
    if (py_truthy(lp) && !py_truthy(lt))
        return twn_err_set(err,
                           "%s: layers_pattern is set but layers_to_transform is not (PEFT "
                           "refuses this config too)",
                           what);
    if (!lt_set) return 0;
    if (json_is_integer(lt)) {
        c->layers = twn_malloc(sizeof *c->layers);
        c->layers[0] = json_integer_value(lt);
        c->n_layers = 1;
    } else if (json_is_array(lt)) {
        size_t n = json_array_size(lt);
        if (n == 0) return 0; /* PEFT: an empty list means "all layers" */
        if (n > INT_MAX) return twn_err_set(err, "%s: layers_to_transform is too long", what);
        c->layers = twn_calloc(n, sizeof *c->layers);
        for (size_t i = 0; i < n; i++) {
            const json_t *e = json_array_get(lt, i);
            if (!json_is_integer(e))
                return twn_err_set(err, "%s: layers_to_transform[%zu] = %s is not an integer", what,
                                   i, jshow(e, show, sizeof show));
            c->layers[c->n_layers++] = json_integer_value(e);
        }
    } else {
        return twn_err_set(err, "%s: layers_to_transform = %s must be an integer or a list", what,
                           jshow(lt, show, sizeof show));
    }

    /* PEFT: no (or an empty) layers_pattern means r".*\.[^.]*\.(\d+)\.", i.e. the number after
     * the last "<segment>." that is followed by ".", e.g. "layers.3." or "blocks.3.". */
    const char *dflt = ".*\\.[^.]*\\.(\\d+)\\.";
    if (!py_truthy(lp)) {
        c->layer_res = twn_calloc(1, sizeof *c->layer_res);
        c->n_layer_res = 1;
        return pyre_compile(dflt, PCRE2_ANCHORED, what, "the layer index regex", c->layer_res, err);
    }
    size_t n = json_is_array(lp) ? json_array_size(lp) : 1;
    if (n > INT_MAX) return twn_err_set(err, "%s: layers_pattern is too long", what);
    c->layer_res = twn_calloc(n, sizeof *c->layer_res);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_is_array(lp) ? json_array_get(lp, i) : lp;
        if (!json_is_string(e))
            return twn_err_set(err, "%s: layers_pattern %s must be a string or list of strings",
                               what, jshow(e, show, sizeof show));
        /* rf".*\.{pattern}\.(\d+)\." with the pattern pasted in raw and group 1 read, as PEFT. */
        twn_str src = {0};
        twn_str_printf(&src, ".*\\.%s\\.(\\d+)\\.", json_string_value(e));
        char ctx[160];
        snprintf(ctx, sizeof ctx, "layers_pattern %s", jshow(e, show, 80));
        int rc = pyre_compile(src.v, PCRE2_ANCHORED, what, ctx, &c->layer_res[c->n_layer_res], err);
        twn_str_free(&src);
        if (rc) return -1;
        c->n_layer_res++;
    }
    return 0;
}

static int parse_config(const json_t *root, const char *what, twn_adapter_config *c, twn_err *err) {
    char show[96];
    const json_t *v = json_object_get(root, "peft_type");
    if (!json_is_string(v) || strcmp(json_string_value(v), "LORA"))
        return twn_err_set(err, "%s: peft_type = %s; only \"LORA\" adapters are supported", what,
                           jshow(v, show, sizeof show));

    for (size_t i = 0; i < sizeof refused_keys / sizeof refused_keys[0]; i++) {
        v = json_object_get(root, refused_keys[i].key);
        bool set = refused_keys[i].when == WHEN_TRUTHY ? py_truthy(v) : v && !json_is_null(v);
        if (set)
            return twn_err_set(err, "%s: %s = %s is not supported: %s", what, refused_keys[i].key,
                               jshow(v, show, sizeof show), refused_keys[i].why);
    }

    v = json_object_get(root, "bias");
    if (v && !(json_is_string(v) && !strcmp(json_string_value(v), "none")))
        return twn_err_set(err,
                           "%s: bias = %s is not supported: only \"none\" (\"all\" and "
                           "\"lora_only\" train base biases that would replace the model's)",
                           what, jshow(v, show, sizeof show));

    v = json_object_get(root, "init_lora_weights");
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        if (init_mutates_base(s))
            return twn_err_set(err,
                               "%s: init_lora_weights = \"%.60s\" is not supported: it rewrites "
                               "the base weights when the adapter is created, so A and B only "
                               "fit that modified model; save the adapter with PEFT's "
                               "path_initial_model_for_weight_conversion to get a plain LoRA",
                               what, s);
        if (strcasecmp(s, "gaussian") && strcasecmp(s, "orthogonal") && strcmp(s, "eva"))
            return twn_err_set(err,
                               "%s: init_lora_weights = \"%.60s\" is not supported: only true, "
                               "false, \"gaussian\", \"orthogonal\" and \"eva\" are known to "
                               "leave a plain LoRA forward",
                               what, s);
    } else if (v && !json_is_boolean(v) && !json_is_null(v)) {
        return twn_err_set(err, "%s: init_lora_weights = %s must be a boolean or a string", what,
                           jshow(v, show, sizeof show));
    }

    v = json_object_get(root, "r");
    if (v) {
        if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > INT_MAX)
            return twn_err_set(err, "%s: r = %s must be a positive integer", what,
                               jshow(v, show, sizeof show));
        c->r = (int)json_integer_value(v);
    }
    v = json_object_get(root, "lora_alpha");
    if (v) {
        if (!json_is_number(v))
            return twn_err_set(err, "%s: lora_alpha = %s must be a number", what,
                               jshow(v, show, sizeof show));
        c->lora_alpha = json_number_value(v);
    }
    c->use_rslora = py_truthy(json_object_get(root, "use_rslora"));
    c->ensure_weight_tying = py_truthy(json_object_get(root, "ensure_weight_tying"));

    if (parse_sel(json_object_get(root, "target_modules"), what, "target_modules", true, &c->target,
                  err))
        return -1;
    if (parse_sel(json_object_get(root, "exclude_modules"), what, "exclude_modules", false,
                  &c->exclude, err))
        return -1;
    if (parse_layers(root, what, c, err)) return -1;
    if (parse_patterns(json_object_get(root, "rank_pattern"), what, "rank_pattern", true,
                       &c->rank_pattern, &c->n_rank_pattern, err))
        return -1;
    if (parse_patterns(json_object_get(root, "alpha_pattern"), what, "alpha_pattern", false,
                       &c->alpha_pattern, &c->n_alpha_pattern, err))
        return -1;
    return 0;
}

int twn_adapter_config_parse(const char *json, size_t len, const char *what,
                             twn_adapter_config **out, twn_err *err) {
    *out = NULL;
    if (!what) what = "adapter_config.json";
    json_error_t je;
    json_t *root = json_loadb(json, len, 0, &je);
    if (!root)
        return twn_err_set(err, "%s: invalid JSON at line %d, column %d: %s", what, je.line,
                           je.column, je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return twn_err_set(err, "%s: not a JSON object", what);
    }
    twn_adapter_config *c = twn_calloc(1, sizeof *c);
    c->r = 8; /* LoraConfig defaults */
    c->lora_alpha = 8;
    int rc = parse_config(root, what, c, err);
    json_decref(root);
    if (rc) {
        twn_adapter_config_free(c);
        return -1;
    }
    *out = c;
    return 0;
}

static void patterns_free(twn_pattern_entry *p, int n) {
    for (int i = 0; i < n; i++) {
        twn_free(p[i].key);
        pyre_free(p[i].re);
    }
    twn_free(p);
}

void twn_adapter_config_free(twn_adapter_config *c) {
    if (!c) return;
    sel_free(&c->target);
    sel_free(&c->exclude);
    twn_free(c->layers);
    for (int i = 0; i < c->n_layer_res; i++) pyre_free(c->layer_res[i]);
    twn_free(c->layer_res);
    /* parse_patterns may fail part-way; entries past the failure are zeroed by calloc. */
    patterns_free(c->rank_pattern, c->n_rank_pattern);
    patterns_free(c->alpha_pattern, c->n_alpha_pattern);
    twn_free(c);
}

// ------------------------------------------------------------------------------------------------
// Module selection (tuners_utils.check_target_module_exists) and per-module rank / alpha

/* `name` equals `entry` or ends with "." + entry. */
static bool list_hit(const char *name, const char *entry, bool *exact) {
    size_t n = strlen(name), m = strlen(entry);
    *exact = !strcmp(name, entry);
    return *exact || (n > m && name[n - m - 1] == '.' && !strcmp(name + n - m, entry));
}

/* Is the module's layer index (PEFT's regex, first layers_pattern that matches) listed? */
static int layer_allowed(const twn_adapter_config *c, const char *module, bool *ok, twn_err *err) {
    *ok = false;
    for (int i = 0; i < c->n_layer_res; i++) {
        size_t g[2];
        int m = pyre_match(c->layer_res[i], module, g, err);
        if (m < 0) return -1;
        if (!m) continue;
        if (g[0] == PCRE2_UNSET || g[1] <= g[0])
            return twn_err_set(err, "layers_pattern: no layer index captured in \"%s\"", module);
        /* int(group(1)); a number too big for int64 cannot be in the list. */
        int64_t idx = 0;
        bool big = false;
        for (size_t k = g[0]; k < g[1]; k++) {
            char ch = module[k];
            if (ch < '0' || ch > '9')
                return twn_err_set(err,
                                   "layers_pattern: layer index \"%.*s\" in \"%s\" is not "
                                   "a number",
                                   (int)(g[1] - g[0]), module + g[0], module);
            if (idx > (INT64_MAX - 9) / 10)
                big = true;
            else
                idx = idx * 10 + (ch - '0');
        }
        for (int j = 0; !big && j < c->n_layers; j++)
            if (c->layers[j] == idx) *ok = true;
        return 0;
    }
    return 0; /* no index in the name: PEFT does not target it */
}

int twn_adapter_config_selects(const twn_adapter_config *c, const char *module, bool is_linear,
                               bool is_output, bool *selected, bool *excluded, twn_err *err) {
    *selected = false;
    if (excluded) *excluded = false;
    const twn_module_sel *ex = &c->exclude;
    bool hit = false, exact;
    if (ex->kind == TWN_SEL_LIST) {
        for (int i = 0; i < ex->n_names && !hit; i++) hit = list_hit(module, ex->names[i], &exact);
    } else if (ex->kind == TWN_SEL_REGEX) {
        int m = pyre_match(ex->re, module, NULL, err);
        if (m < 0) return twn_err_wrap(err, "exclude_modules");
        hit = m;
    }
    if (hit) {
        if (excluded) *excluded = true;
        return 0;
    }

    const twn_module_sel *t = &c->target;
    switch (t->kind) {
    case TWN_SEL_ALL_LINEAR:
        *selected = is_linear && !is_output;
        return 0;
    case TWN_SEL_REGEX: {
        int m = pyre_match(t->re, module, NULL, err);
        if (m < 0) return twn_err_wrap(err, "target_modules");
        *selected = m;
        return 0;
    }
    case TWN_SEL_LIST: {
        bool any_exact = false;
        for (int i = 0; i < t->n_names && !any_exact; i++)
            if (list_hit(module, t->names[i], &exact)) {
                hit = true;
                any_exact = exact;
            }
        /* layers_to_transform only filters suffix matches; a full module name in the list is
         * always taken (PEFT checks `key in target_modules` first). */
        if (hit && !any_exact && c->n_layers > 0) return layer_allowed(c, module, selected, err);
        *selected = hit;
        return 0;
    }
    default:
        return 0;
    }
}

static int pattern_lookup(const twn_pattern_entry *p, int n, const char *module, double *value,
                          const char **key, twn_err *err) {
    for (int i = 0; i < n; i++) {
        int m = pyre_match(p[i].re, module, NULL, err);
        if (m < 0) return -1;
        if (m) {
            *value = p[i].value;
            if (key) *key = p[i].key;
            return 1;
        }
    }
    return 0;
}

int twn_adapter_config_rank(const twn_adapter_config *c, const char *module, int *r,
                            const char **key, twn_err *err) {
    double v;
    if (key) *key = NULL;
    int m = pattern_lookup(c->rank_pattern, c->n_rank_pattern, module, &v, key, err);
    if (m < 0) return twn_err_wrap(err, "rank_pattern");
    *r = m ? (int)v : c->r;
    return 0;
}

int twn_adapter_config_alpha(const twn_adapter_config *c, const char *module, double *alpha,
                             const char **key, twn_err *err) {
    double v;
    if (key) *key = NULL;
    int m = pattern_lookup(c->alpha_pattern, c->n_alpha_pattern, module, &v, key, err);
    if (m < 0) return twn_err_wrap(err, "alpha_pattern");
    *alpha = m ? v : c->lora_alpha;
    return 0;
}

float twn_lora_scaling(double alpha, int r, bool use_rslora) {
    return (float)(use_rslora ? alpha / sqrt((double)r) : alpha / (double)r);
}

static void desc_sel(twn_str *s, const twn_module_sel *sel) {
    if (sel->kind == TWN_SEL_ALL_LINEAR) {
        twn_str_puts(s, "all-linear");
    } else if (sel->kind == TWN_SEL_REGEX) {
        twn_str_printf(s, "regex \"%.*s%s\"", DESC_TARGETS_MAX, sel->src,
                       strlen(sel->src) > DESC_TARGETS_MAX ? "..." : "");
    } else {
        size_t start = s->n;
        for (int i = 0; i < sel->n_names; i++) {
            if (i && s->n - start + strlen(sel->names[i]) > DESC_TARGETS_MAX) {
                twn_str_printf(s, ",+%d more", sel->n_names - i);
                break;
            }
            twn_str_printf(s, "%s%s", i ? "," : "", sel->names[i]);
        }
    }
}

char *twn_adapter_config_desc(const twn_adapter_config *c) {
    twn_str s = {0};
    desc_sel(&s, &c->target);
    if (c->exclude.kind != TWN_SEL_NONE) {
        twn_str_puts(&s, " minus ");
        desc_sel(&s, &c->exclude);
    }
    twn_str_printf(&s, " (r=%d, alpha=%g, rslora=%s", c->r, c->lora_alpha,
                   c->use_rslora ? "yes" : "no");
    if (c->n_layers) {
        twn_str_puts(&s, ", layers=");
        for (int i = 0; i < c->n_layers && i < 16; i++)
            twn_str_printf(&s, "%s%lld", i ? "," : "", (long long)c->layers[i]);
        if (c->n_layers > 16) twn_str_puts(&s, ",...");
    }
    if (c->n_rank_pattern) twn_str_printf(&s, ", rank_pattern=%d", c->n_rank_pattern);
    if (c->n_alpha_pattern) twn_str_printf(&s, ", alpha_pattern=%d", c->n_alpha_pattern);
    twn_str_puts(&s, ")");
    return s.v;
}

int twn_adapter_targets(const char *spec_json, const char *module, bool is_linear, bool is_output,
                        bool *selected, twn_err *err) {
    *selected = false;
    json_error_t je;
    json_t *v = json_loads(spec_json, JSON_DECODE_ANY, &je);
    if (!v)
        return twn_err_set(err, "target_modules: invalid JSON at column %d: %s", je.column,
                           je.text);
    twn_adapter_config c = {.r = 8, .lora_alpha = 8};
    int rc = parse_sel(v, "target_modules", "target_modules", true, &c.target, err);
    json_decref(v);
    if (!rc) rc = twn_adapter_config_selects(&c, module, is_linear, is_output, selected, NULL, err);
    sel_free(&c.target);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// adapter_model.safetensors

/* The tensor kinds a plain LoRA saves (save_and_load.get_peft_model_state_dict). */
static const struct {
    const char *suffix;
    bool is_b, embedding;
} lora_suffixes[] = {
    {".lora_A.weight", false, false},
    {".lora_B.weight", true, false},
    {".lora_embedding_A", false, true},
    {".lora_embedding_B", true, true},
};

/* Why a tensor that is not a LoRA factor is in the file, for the refusal message. */
static const char *stray_tensor_reason(const char *key) {
    if (strstr(key, "lora_magnitude_vector")) return "a DoRA magnitude vector (use_dora)";
    if (strstr(key, ".lora_B.bias") || strstr(key, ".lora_embedding_B.bias"))
        return "a lora_B bias (lora_bias)";
    if (strstr(key, "trainable_tokens")) return "trained token embeddings";
    if (strstr(key, ".lora_A.") || strstr(key, ".lora_B."))
        return "a LoRA factor under an unexpected name (adapter name left in the key?)";
    if (strstr(key, "lora_")) return "a LoRA tensor of an unsupported variant";
    size_t n = strlen(key);
    if (n >= 5 && !strcmp(key + n - 5, ".bias")) return "a trained base bias (bias != \"none\")";
    return "not a LoRA factor (a modules_to_save copy?)";
}

typedef struct {
    char *module;
    const twn_tensor *t[2]; /* lora_A, lora_B */
    bool emb[2];
} pending_lora;

static bool is_output_module(const char *module) {
    const char *dot = strrchr(module, '.');
    return !strcmp(dot ? dot + 1 : module, "lm_head");
}

static bool float_dtype(twn_dtype dt) {
    return dt == TWN_DT_F32 || dt == TWN_DT_F16 || dt == TWN_DT_BF16;
}

/* One module's A and B: shapes, targeting, rank, scaling, float32 copies. */
static int build_lora(const twn_adapter_config *cfg, const pending_lora *p, const char *st_path,
                      const char *cfg_path, twn_lora *l, twn_err *err) {
    static const char *names[2][2] = {{"lora_A.weight", "lora_B.weight"},
                                      {"lora_embedding_A", "lora_embedding_B"}};
    for (int k = 0; k < 2; k++)
        if (!p->t[k]) {
            bool e = p->emb[!k];
            return twn_err_set(err, "%s: %s has %s but no %s", st_path, p->module, names[e][!k],
                               names[e][k]);
        }
    if (p->emb[0] != p->emb[1])
        return twn_err_set(err, "%s: %s mixes %s with %s", st_path, p->module, names[p->emb[0]][0],
                           names[p->emb[1]][1]);
    const twn_tensor *A = p->t[0], *B = p->t[1];
    char s1[64], s2[64];
    for (int k = 0; k < 2; k++) {
        const twn_tensor *t = p->t[k];
        if (!float_dtype(t->dtype))
            return twn_err_set(err, "%s: %s has dtype %s; expected F32, F16 or BF16", st_path,
                               t->name, twn_dtype_name(t->dtype));
        if (t->ndim != 2)
            return twn_err_set(err, "%s: %s has shape %s; expected 2 dimensions", st_path, t->name,
                               twn_shape_str(t, s1, sizeof s1));
        for (int d = 0; d < 2; d++)
            if (t->shape[d] <= 0 || t->shape[d] > INT_MAX)
                return twn_err_set(err, "%s: %s has shape %s; every dimension must be in 1..%d",
                                   st_path, t->name, twn_shape_str(t, s1, sizeof s1), INT_MAX);
    }
    int r = (int)A->shape[0];
    if (B->shape[1] != r)
        return twn_err_set(err, "%s: rank mismatch for %s: %s is %s (r=%d) but %s is %s (r=%lld)",
                           st_path, p->module, A->name, twn_shape_str(A, s1, sizeof s1), r, B->name,
                           twn_shape_str(B, s2, sizeof s2), (long long)B->shape[1]);

    int want_r;
    const char *rkey, *akey;
    double alpha;
    if (twn_adapter_config_rank(cfg, p->module, &want_r, &rkey, err) ||
        twn_adapter_config_alpha(cfg, p->module, &alpha, &akey, err))
        return twn_err_wrap(err, "%s", cfg_path);
    if (want_r != r) {
        char via[200] = "r";
        if (rkey) snprintf(via, sizeof via, "rank_pattern[\"%.150s\"]", rkey);
        return twn_err_set(err, "%s: %s has r=%d (shape %s) but %s: %s gives r=%d", st_path,
                           A->name, r, twn_shape_str(A, s1, sizeof s1), cfg_path, via, want_r);
    }

    l->module = twn_strdup(p->module);
    l->r = r;
    l->in_features = (int)A->shape[1];
    l->out_features = (int)B->shape[0];
    l->embedding = p->emb[0];
    l->scaling = twn_lora_scaling(alpha, r, cfg->use_rslora);
    size_t na = (size_t)r * (size_t)l->in_features, nb = (size_t)l->out_features * (size_t)r;
    size_t ba, bb;
    if (twn_mul_size(na, sizeof(float), &ba) || twn_mul_size(nb, sizeof(float), &bb))
        return twn_err_set(err, "%s: %s is too large", st_path, p->module);
    l->A = twn_try_alloc(ba);
    l->B = twn_try_alloc(bb);
    if (!l->A || !l->B)
        return twn_err_set(err, "cannot allocate %zu bytes for the LoRA of %s", ba + bb, p->module);
    if (twn_tensor_to_f32(A, l->A, err) || twn_tensor_to_f32(B, l->B, err))
        return twn_err_wrap(err, "%s", st_path);
    return 0;
}

/* Groups the file's tensors by module, refusing strays and untargeted modules, then builds one
 * twn_lora per module in tensor-name order. */
static int load_loras(twn_adapter *a, const twn_adapter_config *cfg, const twn_st_file *st,
                      const char *st_path, const char *cfg_path, twn_err *err) {
    size_t n = twn_st_count(st);
    twn_strmap *by_module = twn_strmap_new(n + 1);
    pending_lora *p = twn_calloc(n + 1, sizeof *p);
    size_t np = 0;
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        const twn_tensor *t = twn_st_at(st, i);
        const char *key = t->name;
        const char *mod =
            !strncmp(key, KEY_PREFIX, sizeof KEY_PREFIX - 1) ? key + sizeof KEY_PREFIX - 1 : key;
        size_t klen = strlen(mod), mlen = 0;
        int kind = -1;
        for (int s = 0; s < 4 && kind < 0; s++) {
            size_t sl = strlen(lora_suffixes[s].suffix);
            if (klen > sl && !strcmp(mod + klen - sl, lora_suffixes[s].suffix)) {
                kind = s;
                mlen = klen - sl;
            }
        }
        if (kind < 0) {
            twn_err_set(err, "%s: unexpected tensor %s: %s", st_path, key,
                        stray_tensor_reason(key));
            goto done;
        }
        int64_t at;
        if (!twn_strmap_get(by_module, mod, mlen, &at)) {
            char *module = twn_strndup(mod, mlen);
            bool sel, excl, emb = lora_suffixes[kind].embedding;
            if (twn_adapter_config_selects(cfg, module, !emb, is_output_module(module), &sel, &excl,
                                           err)) {
                twn_err_wrap(err, "%s", cfg_path);
                twn_free(module);
                goto done;
            }
            if (!sel) {
                char *desc = twn_adapter_config_desc(cfg);
                twn_err_set(
                    err, "%s: tensor %s is for module %s, which %s: %s", st_path, key, module,
                    excl ? "exclude_modules excludes" : "target_modules does not select", desc);
                twn_free(desc);
                twn_free(module);
                goto done;
            }
            if (emb && cfg->ensure_weight_tying) {
                twn_err_set(err,
                            "%s: ensure_weight_tying = true with an embedding LoRA (%s) is not "
                            "supported: PEFT may share it with a tied lm_head",
                            cfg_path, module);
                twn_free(module);
                goto done;
            }
            at = (int64_t)np;
            p[np++].module = module;
            twn_strmap_put(by_module, mod, mlen, at);
        }
        int which = lora_suffixes[kind].is_b;
        if (p[at].t[which]) {
            twn_err_set(err, "%s: %s and %s are the same LoRA factor of %s", st_path,
                        p[at].t[which]->name, key, p[at].module);
            goto done;
        }
        p[at].t[which] = t;
        p[at].emb[which] = lora_suffixes[kind].embedding;
    }
    if (np == 0) {
        twn_err_set(err, "%s: no LoRA tensors (expected <module>.lora_A.weight / .lora_B.weight)",
                    st_path);
        goto done;
    }
    if (np > INT_MAX) {
        twn_err_set(err, "%s: too many LoRA modules", st_path);
        goto done;
    }
    a->loras = twn_calloc(np, sizeof *a->loras);
    a->index = twn_strmap_new(np);
    for (size_t i = 0; i < np; i++) {
        twn_lora *l = &a->loras[a->n_loras++];
        if (build_lora(cfg, &p[i], st_path, cfg_path, l, err)) goto done;
        a->n_params += (int64_t)l->r * l->in_features + (int64_t)l->out_features * l->r;
        twn_strmap_put(a->index, l->module, strlen(l->module), (int64_t)i);
    }
    rc = 0;
done:
    for (size_t i = 0; i < np; i++) twn_free(p[i].module);
    twn_free(p);
    twn_strmap_free(by_module);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Public API

int twn_adapter_load(const char *dir, const char *name, twn_adapter **out, twn_err *err) {
    *out = NULL;
    char *cfg_path = twn_path_join(dir, "adapter_config.json");
    char *st_path = twn_path_join(dir, "adapter_model.safetensors");
    char *json = NULL;
    size_t len = 0;
    twn_adapter_config *cfg = NULL;
    twn_st_file *st = NULL;
    twn_adapter *a = NULL;
    int rc = -1;

    if (twn_read_file(cfg_path, ADAPTER_CONFIG_MAX_BYTES, &json, &len, err)) goto done;
    if (twn_adapter_config_parse(json, len, cfg_path, &cfg, err)) goto done;
    if (!twn_path_exists(st_path)) {
        char *bin = twn_path_join(dir, "adapter_model.bin");
        if (twn_path_exists(bin))
            twn_err_set(err,
                        "%s: not found; %s (a legacy torch pickle) is not read: re-save the "
                        "adapter with safe_serialization=True",
                        st_path, bin);
        else
            twn_err_set(err, "%s: not found", st_path);
        twn_free(bin);
        goto done;
    }
    if (twn_st_open(st_path, &st, err)) {
        if (err && !strstr(err->msg, st_path)) twn_err_wrap(err, "%s", st_path);
        goto done;
    }
    a = twn_calloc(1, sizeof *a);
    a->name = twn_strdup(name ? name : dir);
    a->dir = twn_strdup(dir);
    a->r = cfg->r;
    a->lora_alpha = cfg->lora_alpha;
    a->use_rslora = cfg->use_rslora;
    if (load_loras(a, cfg, st, st_path, cfg_path, err)) goto done;
    a->target_desc = twn_adapter_config_desc(cfg);
    rc = 0;
done:
    if (rc)
        twn_adapter_free(a);
    else
        *out = a;
    if (st) twn_st_close(st);
    twn_adapter_config_free(cfg);
    twn_free(json);
    twn_free(cfg_path);
    twn_free(st_path);
    return rc;
}

void twn_adapter_free(twn_adapter *a) {
    if (!a) return;
    for (int i = 0; i < a->n_loras; i++) {
        twn_free(a->loras[i].module);
        twn_free(a->loras[i].A);
        twn_free(a->loras[i].B);
    }
    twn_free(a->loras);
    if (a->index) twn_strmap_free(a->index);
    twn_free(a->name);
    twn_free(a->dir);
    twn_free(a->target_desc);
    twn_free(a);
}

const twn_lora *twn_adapter_find(const twn_adapter *a, const char *module) {
    if (!a || !module) return NULL;
    if (a->index) {
        int64_t i;
        return twn_strmap_get(a->index, module, strlen(module), &i) ? &a->loras[i] : NULL;
    }
    for (int i = 0; i < a->n_loras; i++) /* adapters built by hand, without an index */
        if (a->loras[i].module && !strcmp(a->loras[i].module, module)) return &a->loras[i];
    return NULL;
}
