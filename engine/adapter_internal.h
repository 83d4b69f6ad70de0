/* adapter_internal.h — the parsed adapter_config.json and PEFT's module-selection rules.
 *
 * Split from adapter.h so the unit test and the fuzz target can drive the config parser and the
 * matching rules from memory, without an adapter directory.  Nothing outside engine/adapter.c,
 * tests/unit/test_adapter.c and tests/fuzz/fuzz_adapter_config.c should include it.
 *
 * Regexes follow Python's `re` semantics as far as module names can tell (PCRE2 with UTF + UCP):
 *   target_modules / exclude_modules string -> re.fullmatch(pattern, name)
 *                                              (tuners_utils.check_target_module_exists)
 *   rank_pattern / alpha_pattern key        -> re.match(rf"(.*\.)?({key})$", name), first key in
 *                                              file order wins (utils/other.get_pattern_key)
 *   layers_to_transform index               -> re.match(r".*\.[^.]*\.(\d+)\.", name), or
 *                                              rf".*\.{layers_pattern}\.(\d+)\." per pattern */
#ifndef TWN_ENGINE_ADAPTER_INTERNAL_H
#define TWN_ENGINE_ADAPTER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* A compiled regex with Python-like semantics (defined in adapter.c). */
typedef struct twn_pyre twn_pyre;

typedef enum {
    TWN_SEL_NONE,       /* exclude_modules absent / null / empty */
    TWN_SEL_LIST,       /* name == entry or name ends with "." + entry */
    TWN_SEL_REGEX,      /* re.fullmatch */
    TWN_SEL_ALL_LINEAR, /* every Linear except the output layer (target_modules only) */
} twn_sel_kind;

typedef struct {
    twn_sel_kind kind;
    char **names; /* TWN_SEL_LIST, file order */
    int n_names;
    char *src; /* TWN_SEL_REGEX source */
    twn_pyre *re;
} twn_module_sel;

typedef struct {
    char *key; /* as written in the file */
    twn_pyre *re;
    double value; /* rank (integral) or alpha */
} twn_pattern_entry;

typedef struct twn_adapter_config {
    int r;             /* default rank (config "r", default 8) */
    double lora_alpha; /* default alpha (default 8) */
    bool use_rslora;
    bool ensure_weight_tying;
    twn_module_sel target, exclude;
    /* layers_to_transform: applied only to list targets matched by suffix, as PEFT does. */
    int64_t *layers;
    int n_layers; /* 0 = not used */
    twn_pyre **layer_res;
    int n_layer_res;
    twn_pattern_entry *rank_pattern, *alpha_pattern;
    int n_rank_pattern, n_alpha_pattern;
} twn_adapter_config;

/* Parses adapter_config.json bytes.  `what` (usually the file path) prefixes every message.
 * Refuses unsupported features by key name; ignores keys it does not know. */
int twn_adapter_config_parse(const char *json, size_t len, const char *what,
                             twn_adapter_config **out, twn_err *err);
void twn_adapter_config_free(twn_adapter_config *c);

/* Would PEFT wrap `module`?  exclude_modules first, then target_modules, then
 * layers_to_transform.  *excluded (may be NULL) tells an exclusion from a plain miss. */
int twn_adapter_config_selects(const twn_adapter_config *c, const char *module, bool is_linear,
                               bool is_output, bool *selected, bool *excluded, twn_err *err);
/* The module's rank / alpha after rank_pattern / alpha_pattern; *key (may be NULL) is the
 * pattern key that decided it, or NULL for the default. */
int twn_adapter_config_rank(const twn_adapter_config *c, const char *module, int *r,
                            const char **key, twn_err *err);
int twn_adapter_config_alpha(const twn_adapter_config *c, const char *module, double *alpha,
                             const char **key, twn_err *err);
/* "q_proj,k_proj,v_proj (r=8, alpha=16, rslora=no)"; new string, twn_free it. */
char *twn_adapter_config_desc(const twn_adapter_config *c);

/* peft LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) with rsLoRA (computed in double,
 * like Python, then rounded once to float32, like the scalar multiply in the forward). */
float twn_lora_scaling(double alpha, int r, bool use_rslora);

#endif
