/* manifest.h — twn.json, the model manifest: every choice the TWN paper leaves open.
 *
 * A TWN checkpoint directory holds twn.json next to (or pointing at) the base model, the two PEFT
 * adapters, the gate and the queries.  Paths are relative to the manifest's directory.
 *
 *   {
 *     "format": "twn/1",
 *     "base": "base",                                   Qwen3-VL HF directory
 *     "adapters": {"embedding": "embedding", "reasoning": "reasoning"},
 *     "gate": {"path": "gate_mlp.pt",
 *              "activation": "gelu",                    gelu | gelu_tanh | relu | silu | tanh
 *              "input": "pooled"},                      pooled | pooled_normalized
 *     "queries": "queries.pt",                          tensor [K, hidden] (bare or 1-entry dict)
 *     "pooling": "query_mean",                          query_mean | last_token | token:<text>
 *     "normalize": true,                                L2-normalize the final embedding
 *     "threshold": 0.5,                                 think when p_think >= threshold
 *     "max_think_tokens": 256,
 *     "stop": ["</think>", "<|im_end|>"],              CoT stops after any of these
 *     "sampling": {"temperature": 0, "top_k": 0, "top_p": 1.0, "seed": 0},   0 = greedy
 *     "default_instruction": "",                       used when an item has none
 *     "templates": {
 *       "embed":
 * "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n", "reason":
 * "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n",
 *       "embed_cot":
 * "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n{cot}</think>\n\n",
 *       "image":     "<|vision_start|><|image_pad|><|vision_end|>"
 *     }
 *   }
 *
 * Semantics (scripts/reference/twn_reference.py implements exactly the same):
 *  - A template is rendered by substituting {instruction}, {images} (the "image" template once
 *    per image), {text}; the whole string is tokenized once (special tokens parsed), as
 *    transformers does with a rendered chat template.  For embed_cot, the template is split at
 *    {cot}: prefix tokens + the generated CoT token ids (not re-tokenized) + suffix tokens.
 *  - Gate pass (embedding adapter): ids(embed) followed by the K query vectors as input
 *    embeddings (positions continue sequentially).  Pool the final-norm hidden states → e0.
 *    query_mean = mean over the K query rows; last_token = the last row; token:<t> = the row of the
 *    last occurrence of token <t> among the pass's ids (an item without it fails).  gate MLP on e0
 * (or e0/|e0| for pooled_normalized) → logit, p_think = sigmoid(logit).
 *  - Gate MLP: the .pt state_dict holds Linear layers "<i>.weight" [out,in] / "<i>.bias" [out]
 *    (nn.Sequential numbering; any common key prefix like "net." is accepted); layers are applied
 *    in index order with the activation between them (not after the last); the last has out = 1.
 *  - easy (p_think < threshold, or mode never): embedding = normalize(e0).
 *  - hard: reasoning adapter, prefill ids(reason), then decode (greedy unless sampling says
 *    otherwise) until a stop string is produced or max_think_tokens tokens are generated.  Stop
 *    strings are matched in the raw bytes of the generated tokens (never the prompt) after each
 *    token; the earliest-starting occurrence wins and the CoT is the generated tokens before the
 *    one holding its first byte.  think_tokens counts all generated tokens, stops included.
 *    Then embedding adapter over embed_cot ids + queries, pooled and normalized → the embedding.
 *  - Mode always skips the gate's decision (still reports p_think); budget=F thinks for the
 *    ceil(F * n - 1e-9) highest-p_think items of the batch of n items that passed the gate (ties:
 *    earlier item first; the threshold is not applied). */
#ifndef TWN_ENGINE_MANIFEST_H
#define TWN_ENGINE_MANIFEST_H

#include <stdbool.h>
#include <stdint.h>

#include "util/err.h"

typedef enum { TWN_POOL_QUERY_MEAN, TWN_POOL_LAST_TOKEN, TWN_POOL_TOKEN } twn_pooling;
typedef enum {
    TWN_ACT_GELU,
    TWN_ACT_GELU_TANH,
    TWN_ACT_RELU,
    TWN_ACT_SILU,
    TWN_ACT_TANH
} twn_activation;

#define TWN_MAX_STOPS 8

typedef struct {
    char *path; /* the twn.json path */
    char *dir;  /* its directory */
    char *base_dir, *embedding_dir, *reasoning_dir, *gate_path, *queries_path; /* resolved */
    twn_activation gate_activation;
    bool gate_input_normalized;
    twn_pooling pooling;
    char *pool_token; /* for TWN_POOL_TOKEN */
    bool normalize;
    double threshold;
    int max_think_tokens;
    char *stop[TWN_MAX_STOPS];
    int n_stop;
    double temperature, top_p;
    int top_k;
    uint64_t seed;
    char *default_instruction;
    char *tpl_embed, *tpl_reason, *tpl_embed_cot, *tpl_image;
    char sha256[65]; /* of the twn.json bytes, for output manifests */
} twn_manifest;

/* Loads and validates twn.json (path to the file, or a directory containing it).  Unknown keys
 * are an error naming the key (a typo must not silently fall back to a default). */
int twn_manifest_load(const char *path, twn_manifest *m, twn_err *err);
void twn_manifest_free(twn_manifest *m);
/* The default manifest text that `twn mkmodel` writes (with the given max_think_tokens). */
char *twn_manifest_default_json(int max_think_tokens, const char *gate_activation);

#endif
