/* lm.h — the Qwen3-VL text decoder with unmerged, per-row LoRA, on the CPU backend.
 *
 * A forward step takes a *ragged* batch: any number of sequences, each contributing any number of
 * new rows (a whole prompt for a prefill, one token for a decode step), each with its own adapter.
 * All rows of all sequences go through the projections as one matrix, so a gate prefill, a CoT
 * decode step and an embedding pass share every weight read.  There is no padding anywhere: each
 * sequence's attention only sees its own KV cache, so "padding changes nothing" holds by
 * construction.
 *
 * Math mirrors transformers' Qwen3VLTextModel in fp32 (modeling_qwen3_vl.py): RMSNorm
 * (x * rsqrt(mean(x^2) + eps) * w), q/k RMSNorm per head before RoPE, interleaved M-RoPE
 * (apply_interleaved_mrope), GQA (query head h reads kv head h / (nh / nkv)), causal softmax
 * attention with scale head_dim^-0.5, SwiGLU MLP, final norm.  LoRA (peft tuners/lora/layer.py):
 * y = x W^T + scaling * (x A^T) B^T for the rows whose sequence uses that adapter. */
#ifndef TWN_ENGINE_LM_H
#define TWN_ENGINE_LM_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/adapter.h"
#include "engine/config.h"
#include "util/err.h"

/* Projection slots of a decoder layer, in the order LoRA lookups use. */
enum { TWN_Q, TWN_K, TWN_V, TWN_O, TWN_GATE, TWN_UP, TWN_DOWN, TWN_NPROJ };

#define TWN_MAX_ADAPTERS 4

typedef struct {
    float *in_norm, *post_norm, *q_norm, *k_norm; /* [H], [H], [D], [D] */
    float *w[TWN_NPROJ];                          /* [out, in] row-major, as in the checkpoint */
    const twn_lora *lora[TWN_MAX_ADAPTERS][TWN_NPROJ];
} twn_lm_layer;

typedef struct twn_lm {
    twn_text_config cfg;
    int H, I, nh, nkv, D, V, L;
    float *embed;      /* [V, H] */
    float *lm_head;    /* [V, H]; == embed when tied */
    float *final_norm; /* [H] */
    twn_lm_layer *layers;
    float *inv_freq;      /* [D/2] */
    uint8_t *rope_stream; /* [D/2]: which position stream (0 T, 1 H, 2 W) drives frequency j */
    const twn_adapter *adapters[TWN_MAX_ADAPTERS];
    const twn_lora *embed_lora[TWN_MAX_ADAPTERS];
    int n_adapters;
    int64_t n_params;
    size_t weight_bytes; /* fp32 bytes held */
} twn_lm;

/* Loads the text weights of a Qwen3-VL model directory (config.json + safetensors, single or
 * sharded), upcasting to fp32.  Vision weights are not read here. */
int twn_lm_load(const char *dir, twn_lm **out, twn_err *err);
void twn_lm_free(twn_lm *lm);
/* Attaches an adapter; returns its index (0..TWN_MAX_ADAPTERS-1).  Every LoRA must target a text
 * projection of this model with matching shapes (or embed_tokens); others are refused by name. */
int twn_lm_attach_adapter(twn_lm *lm, const twn_adapter *a, int *index, twn_err *err);

/* One sequence's KV cache: per layer, K and V rows [cap, nkv*D]. */
typedef struct {
    int len, cap, n_layers, kvdim;
    float **k, **v;
    int32_t next_pos; /* position stream value for the next text token (rope delta applied) */
} twn_kv;

void twn_kv_init(twn_kv *kv, const twn_lm *lm);
void twn_kv_free(twn_kv *kv);
/* Makes room for `need` rows (capacity doubles from 64 otherwise, and each growth copies the
 * cache); callers that know a sequence's final length (prompt + max_think_tokens) reserve it. */
void twn_kv_reserve(twn_kv *kv, int need);
/* Forgets everything after the first `len` rows. */
void twn_kv_truncate(twn_kv *kv, int len);

#define TWN_NO_ADAPTER  (-1)
#define TWN_TOKEN_EMBED (-1) /* ids[i] == this: take the row from embeds */

/* DeepStack features of one sequence's prefill (Qwen3VLTextModel._deepstack_process): right
 * after decoder layer l (l < n_layers) returns, feat[l][j] is added to the hidden state of row
 * rows[j] (the image token rows, in order).  Only a prefill that carries the image's vision
 * output passes them; decode steps and text rows never get any (the reference drops pixel values
 * once the prompt is cached). */
typedef struct {
    int n_layers; /* feature sets, one per decoder layer from layer 0; <= the model's L */
    int n_rows;
    const int32_t *rows; /* [n_rows] row indices within this step's n rows, each in [0, n) */
    const float *feat;   /* [n_layers][n_rows][H] */
} twn_lm_deepstack;

/* One sequence's part of a forward step. */
typedef struct {
    twn_kv *kv;          /* appended to */
    int n;               /* new rows */
    const int32_t *ids;  /* [n] token ids, or TWN_TOKEN_EMBED for rows taken from embeds */
    const float *embeds; /* [n, H]; only rows whose id is TWN_TOKEN_EMBED are read */
    const int32_t *pos;  /* [3][n] (T, H, W streams) or NULL: kv->next_pos + i on all streams */
    int adapter;         /* TWN_NO_ADAPTER or an attached index */
    float *hidden;       /* out [n, H] final-norm hidden states, or NULL */
    float *logits;       /* out [V] logits of the last new row, or NULL */
    const twn_lm_deepstack *deepstack; /* NULL: none */
} twn_lm_seq;

/* Observer of per-layer hidden states (golden tests): called after each decoder layer with the
 * rows of every sequence ([n, H] each), before that layer's DeepStack features are added (where
 * the reference's forward hook on the decoder layer sees them). */
typedef void (*twn_lm_trace_fn)(void *ctx, int seq, int layer, const float *h, int n, int H);

int twn_lm_forward(const twn_lm *lm, twn_lm_seq *seqs, int n_seqs, twn_lm_trace_fn trace,
                   void *trace_ctx, twn_err *err);

#endif
