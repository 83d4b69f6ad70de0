/* mkmodel.h — deterministic random TWN checkpoints in the real on-disk formats.
 *
 * `twn mkmodel` writes a checkpoint that transformers 5.x + peft load unchanged: a Qwen3-VL base
 * directory (config.json, model.safetensors, tokenizer and processor files), two PEFT LoRA adapter
 * directories, gate_mlp.pt, queries.pt and twn.json.  Every test, golden script and CPU benchmark
 * starts from one of these, so the contract is:
 *
 *  - Same (preset, seed, dtype, tokenizer) -> byte-identical files.  Each tensor draws from its own
 *    generator seeded by (seed, file, tensor name), in fixed-size blocks with their own sub-seeds,
 *    so values depend neither on write order nor on the thread count.
 *  - Weights are non-trivial everywhere: linear weights N(0, 1/in_features) so activations stay
 *    O(1) through the layers, norm weights 1 + 0.1 N, biases 0.02 N, and LoRA A *and* B non-zero
 *    with B scaled so the LoRA delta is about 20% of the base projection (PEFT's B = 0 init would
 *    make an adapter invisible to tests).  The gate's last layer is zero-mean with bias 0, so
 *    p_think spreads around 0.5.
 *  - twn.json is written last: a directory without it is an interrupted run, never a checkpoint.
 *
 * Large presets keep memory bounded by writing the base model as shards
 * (model-0000k-of-0000n.safetensors + model.safetensors.index.json, the transformers layout), each
 * one held by the safetensors writer only while it is being written. */
#ifndef TWN_ENGINE_MKMODEL_H
#define TWN_ENGINE_MKMODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"
#include "util/err.h"

typedef struct {
    const char *name;
    const char *desc;
    /* text decoder (config.json text_config) */
    int hidden, intermediate, layers, heads, kv_heads, head_dim;
    int mrope_section[3]; /* sums to head_dim / 2 */
    bool tied;            /* tie_word_embeddings: no lm_head.weight in the file */
    /* vision tower (vision_config); out_hidden_size is always `hidden` */
    int v_depth, v_hidden, v_intermediate, v_heads;
    int deepstack[3];
    int n_deepstack;
    /* LoRA, the same shape for both adapters (their weights differ) */
    int lora_r;
    int lora_alpha;
    bool use_rslora;
    bool regex_targets; /* target_modules as one regex string instead of a list */
    int emb_q_rank;     /* > 0: embedding adapter's rank_pattern {"q_proj": emb_q_rank} */
    /* TWN head */
    int gate_hidden;      /* G in Linear(H,G) -> act -> Linear(G,1) */
    const char *gate_act; /* manifest activation name */
    int n_queries;        /* K */
    int max_think_tokens;
    uint64_t max_shard_bytes; /* 0: one model.safetensors */
} twn_mkmodel_preset;

/* Presets in table order; the first is the default. */
size_t twn_mkmodel_preset_count(void);
const twn_mkmodel_preset *twn_mkmodel_preset_at(size_t i);
/* NULL when unknown. */
const twn_mkmodel_preset *twn_mkmodel_find(const char *name);
/* "tiny, tiny-alt, ..." (static storage). */
const char *twn_mkmodel_preset_names(void);

typedef struct {
    int64_t base_params, vision_params; /* vision_params is included in base_params */
    int64_t adapter_params;             /* both adapters */
    int64_t gate_params, query_params;
    uint64_t tensor_bytes; /* all tensor data written (base + adapters + .pt payloads) */
    int n_base_tensors, n_adapter_tensors; /* per adapter */
    int n_shards;                          /* 1: a single model.safetensors */
} twn_mkmodel_stats;

/* What a preset writes, without writing it.  Unknown preset: error listing the presets. */
int twn_mkmodel_plan(const char *preset, twn_dtype dtype, twn_mkmodel_stats *st, twn_err *err);

/* Writes the checkpoint into out_dir (created; existing files are replaced).  preset NULL = the
 * default; dtype TWN_DT_BF16 or TWN_DT_F32 (base weights only: adapters and .pt files are always
 * float32, as peft and torch.save write them); tokenizer_json NULL = the build's default
 * (TWN_TOKENIZER_JSON); its sibling tokenizer_config.json is copied when present. */
int twn_mkmodel_write(const char *out_dir, const char *preset, uint64_t seed, twn_dtype dtype,
                      const char *tokenizer_json, twn_err *err);

#endif
