/* twn.h — TWN inference: gate pass, routing, chain-of-thought, embedding pass (DESIGN §2).
 *
 * twn_embed_items runs a set of items through one continuous-batching loop.  Every step is one
 * ragged forward (lm.h) that may mix gate prefills (embedding adapter), CoT prefills and decode
 * steps (reasoning adapter) and CoT-conditioned embedding passes (embedding adapter): items enter
 * and leave the step set independently, so a long CoT never holds up easy items.
 *
 * Images: each item's files are decoded and preprocessed (image.h), then the vision tower
 * (vision.h) runs over the images of all items of the call together, in calls of at most
 * max_vision_patches patches.  An item's <|image_pad|> tokens are expanded to its images' token
 * counts, its image rows take the tower's embeddings, its prefills (gate, CoT prompt, embedding
 * pass) get 3-stream M-RoPE positions (mrope.h) and the DeepStack features at the image rows;
 * CoT decode steps continue from max position + 1 and get no features.
 *
 * Backends: every decoder step goes through the model's twn_backend (backend.h): cpu (the
 * default twn_model_load opens, engine/lm.c, bit-identical to calling twn_lm_forward) or cuda
 * (twn_model_set_backend).  The scheduler asks the backend for the two reductions it needs
 * instead of whole rows: the argmax of a greedy decode's logits and the query_mean / last_token
 * pooled vector, so a GPU copies back one int or one [H] row per sequence.  KV caches are the
 * backend's (a paged pool on cuda; a row budget on cpu when kv_budget_bytes is set): a sequence
 * whose KV reservation (prompt + max_think_tokens) cannot be supplied waits for rows to be
 * returned; when nothing else of the call holds any, the item fails with the pool's message.
 * The vision tower and the gate MLP run on the CPU.
 *
 * Per-item failures (an over-long prompt, text the tokenizer refuses, an image that cannot be
 * read) are reported in that item's result and do not stop the others. */
#ifndef TWN_ENGINE_TWN_H
#define TWN_ENGINE_TWN_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/adapter.h"
#include "engine/backend.h"
#include "engine/image.h"
#include "engine/lm.h"
#include "engine/manifest.h"
#include "engine/tokenizer.h"
#include "engine/vision.h"
#include "util/err.h"

#define TWN_MAX_GATE_LAYERS 8

typedef struct {
    twn_manifest man;
    twn_lm *lm;
    twn_adapter *embedding, *reasoning;
    int emb_idx, rsn_idx;
    twn_tokenizer *tok;
    float *queries; /* [K, H] */
    int K;
    struct {
        float *w, *b; /* [out, in], [out] */
        int in, out;
    } gate[TWN_MAX_GATE_LAYERS];
    int n_gate;
    int64_t gate_params;
    int32_t pool_token_id;
    bool has_vision_weights;
    twn_vision *vision;         /* the base's vision tower; NULL for a text-only base */
    twn_image_config image_cfg; /* base/preprocessor_config.json (defaults when absent) */
    int32_t image_token_id;     /* <|image_pad|> (config.json image_token_id) */
    twn_backend *backend;       /* runs the decoder steps; cpu after twn_model_load */
} twn_model;

typedef enum { TWN_MODE_ADAPTIVE, TWN_MODE_NEVER, TWN_MODE_ALWAYS, TWN_MODE_BUDGET } twn_mode;

/* Which part of TWN a call runs.  The pipeline splits an item's work between roles: the gate
 * service runs TWN_PASS_GATE (easy items come back embedded; hard ones come back with hard and
 * deferred set and no embedding) and a reasoning worker runs TWN_PASS_REASON on the hard ones (no
 * gate pass: items are hard, their p_think is carried in twn_item.p_think).  Together they give
 * exactly what TWN_PASS_ALL gives. */
typedef enum { TWN_PASS_ALL = 0, TWN_PASS_GATE, TWN_PASS_REASON } twn_pass;

typedef struct {
    twn_mode mode;
    twn_pass pass;          /* TWN_PASS_ALL unless a pipeline role splits the work */
    double budget;          /* TWN_MODE_BUDGET: fraction of items that may think */
    int max_step_rows;      /* rows (tokens) per forward step; prompts longer than this run alone */
    int max_active;         /* sequences decoding at once (bounds KV memory) */
    int max_prompt_tokens;  /* longer prompts fail the item */
    int max_vision_patches; /* patches per vision-tower call (bounds its activations); a larger
                               image runs alone */
} twn_opts;

void twn_opts_default(twn_opts *o);
/* "adaptive" | "never" | "always" | "budget=F" (0 <= F <= 1). */
int twn_mode_parse(const char *s, twn_opts *o, twn_err *err);

typedef struct {
    const char *id;
    const char *text;          /* may be NULL */
    const char *instruction;   /* NULL: the manifest's default_instruction */
    const char *const *images; /* image file paths (JPEG, PNG, WebP), in prompt order */
    int n_images;
    /* In-memory encoded images (WebDataset members), used instead of files when not NULL:
     * image_data[i] of image_size[i] bytes, named images[i] in messages (may be NULL). */
    const void *const *image_data;
    const size_t *image_size;
    float p_think; /* TWN_PASS_REASON: the gate's p_think, reported back unchanged */
} twn_item;

typedef struct {
    float *embedding; /* [dim], owned; NULL when the item failed */
    int dim;
    bool hard;
    bool deferred;    /* TWN_PASS_GATE: hard, left for a reasoning worker (no embedding) */
    float p_think;    /* NaN in mode never */
    int think_tokens; /* tokens decoded for the CoT (including the stop token) */
    int32_t *cot_ids;
    int n_cot;
    char *cot;   /* decoded CoT text */
    char *error; /* why the item failed, or NULL */
} twn_result;

/* Loads a TWN checkpoint; its decoder runs on the cpu backend until twn_model_set_backend. */
int twn_model_load(const char *manifest_path, twn_model **out, twn_err *err);
void twn_model_free(twn_model *m);
/* Replaces the model's backend with one opened under o (backend.h: kind cpu, cuda or auto; auto
 * falls back to cpu and says why in twn_backend_describe(m->backend)).  On failure (kind cuda
 * without a usable GPU: the message names the missing module, driver or device) the model keeps
 * its current backend.  Not while a twn_embed_items call on m is running. */
int twn_model_set_backend(twn_model *m, const twn_backend_opts *o, twn_err *err);
int twn_model_dim(const twn_model *m);

/* Fills res[0..n) (zero them first or reuse after twn_result_free).  Returns -1 only for failures
 * that are not any one item's fault (out of memory, a broken model); per-item failures are in
 * res[i].error. */
int twn_embed_items(const twn_model *m, const twn_item *items, int n, const twn_opts *o,
                    twn_result *res, twn_err *err);
void twn_result_free(twn_result *r);

/* Token ids of a template rendered for an item (exposed for tests and `twn inspect`). */
int twn_render_ids(const twn_model *m, const char *tpl, const twn_item *it, twn_ivec *out,
                   twn_err *err);

#endif
