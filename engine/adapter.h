/* adapter.h — PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).
 *
 * Supports plain LoRA on nn.Linear modules: r, lora_alpha, use_rslora (scaling = alpha/sqrt(r)
 * instead of alpha/r), target_modules as a list (module name equals an entry or ends with
 * "."+entry), a regex string (full match, PCRE2) or "all-linear" (every Linear except lm_head),
 * exclude_modules, rank_pattern / alpha_pattern (key matches via (.*\.)?(key)$), fan_in_fan_out
 * (accepted and ignored: it describes Conv1D base weights; PEFT saves A [r,in] / B [out,r] either
 * way), bias "none", and embedding LoRA on embed_tokens (lora_embedding_A [r, vocab],
 * lora_embedding_B [hidden, r]).
 *
 * Refused by name, with the file: use_dora, lora_bias, bias != "none", layer_replication,
 * target_parameters, trainable_token_indices, use_qalora, alora_invocation_tokens,
 * modules_to_save, peft_type other than "LORA", init_lora_weights variants that change the
 * forward (e.g. "mica").
 *
 * Tensor keys: "base_model.model.<module>.lora_A.weight" / ".lora_B.weight" (the prefix is also
 * accepted absent).  Every tensor must belong to a targeted module; A [r,in] and B [out,r] must
 * agree in r; dtype F32/F16/BF16 (held as float32 after load, like peft's autocast).
 *
 * The forward this represents (peft tuners/lora/layer.py): y = W x + scaling * B (A x). */
#ifndef TWN_ENGINE_ADAPTER_H
#define TWN_ENGINE_ADAPTER_H

#include <stdbool.h>
#include <stdint.h>

#include "util/err.h"

typedef struct {
    char *module; /* full module path, e.g. "model.language_model.layers.3.self_attn.q_proj" */
    int r;
    int in_features, out_features;
    float scaling;
    bool embedding; /* embed_tokens LoRA: A is [r, vocab], B is [hidden, r] */
    float *A;       /* [r, in_features] row-major float32 */
    float *B;       /* [out_features, r] row-major float32 */
} twn_lora;

typedef struct {
    char *name; /* adapter name, e.g. "embedding" */
    char *dir;
    int r;
    double lora_alpha;
    bool use_rslora;
    char *target_desc; /* human-readable targets for `twn inspect` */
    twn_lora *loras;
    int n_loras;
    int64_t n_params; /* sum of A and B element counts */
    /* module -> index into loras, built by twn_adapter_load.  NULL in an adapter built by
     * hand, where twn_adapter_find falls back to a linear scan. */
    struct twn_strmap *index;
} twn_adapter;

/* Loads dir/adapter_config.json and dir/adapter_model.safetensors. */
int twn_adapter_load(const char *dir, const char *name, twn_adapter **out, twn_err *err);
void twn_adapter_free(twn_adapter *a);
/* The LoRA for a full module path, or NULL when the adapter does not touch it. */
const twn_lora *twn_adapter_find(const twn_adapter *a, const char *module);

/* Does PEFT's target_modules rule select `module`?  `spec_json` is the JSON value of
 * target_modules (a list, a string regex, or "all-linear"); `is_linear` and `is_output` describe
 * the module.  Exposed for tests. */
int twn_adapter_targets(const char *spec_json, const char *module, bool is_linear, bool is_output,
                        bool *selected, twn_err *err);

#endif
