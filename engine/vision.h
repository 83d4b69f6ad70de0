/* vision.h — the Qwen3-VL vision tower (Qwen3VLVisionModel) on the CPU backend.
 *
 * Images in, text-width embeddings out: pixel_values rows (the processor's patches, in merge-block
 * order) become one embedding per merge_size x merge_size block of patches, plus one DeepStack
 * feature set per entry of vision_config.deepstack_visual_indexes, to be added to the output of
 * the first decoder layers at the image token rows (lm.h, twn_lm_deepstack).
 *
 * Math mirrors transformers' modeling_qwen3_vl.py in fp32 (weights upcast at load):
 *   patch_embed   Conv3d with kernel = stride = (T, P, P), i.e. one GEMM over the rows
 *                 [C*T*P*P] against the weight flattened in the same (c, t, y, x) order, + bias;
 *   pos_embed     fast_pos_embed_interpolate: the learned n x n grid bilinearly sampled at
 *                 linspace(0, n-1, h) x linspace(0, n-1, w), repeated per frame, reordered into
 *                 merge-block order (t, block_row, block_col, in_row, in_col);
 *   rot_pos_emb   2-D RoPE in fp32: head dims [0, hd/4) rotate with the patch row, [hd/4, hd/2)
 *                 with the column (theta 10000 over hd/2 dims), rotate_half layout;
 *   blocks        h += proj(attn(LN1(h))), h += fc2(gelu_tanh(fc1(LN2(h)))), LayerNorm eps 1e-6,
 *                 attention full within one frame (cu_seqlens) and never across images;
 *   deepstack     after block i in deepstack_visual_indexes: view(-1, 4 Hv) -> LN(4 Hv) -> fc1
 *                 -> erf GELU -> fc2 (use_postshuffle_norm=True), features listed in block order;
 *   merger        LN(Hv) -> view(-1, 4 Hv) -> fc1 -> erf GELU -> fc2 -> [tokens, out_hidden].
 *
 * A forward takes any number of images of any sizes at once: every projection runs over the
 * patches of all images as one matrix, attention runs image by image (frame by frame), so an
 * image's output does not depend on what else is in the batch. */
#ifndef TWN_ENGINE_VISION_H
#define TWN_ENGINE_VISION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/config.h"
#include "util/err.h"

/* LayerNorm eps of every vision norm (nn.LayerNorm(..., eps=1e-6) in the reference). */
#define TWN_VISION_LN_EPS 1e-6f
/* theta of the vision 2-D RoPE (Qwen3VLVisionRotaryEmbedding's default). */
#define TWN_VISION_ROPE_THETA 10000.0f

typedef struct {
    float *norm1_w, *norm1_b; /* [Hv] */
    float *qkv_w, *qkv_b;     /* [3 Hv, Hv], [3 Hv]: rows q | k | v, each head-major */
    float *proj_w, *proj_b;   /* [Hv, Hv], [Hv] */
    float *norm2_w, *norm2_b; /* [Hv] */
    float *fc1_w, *fc1_b;     /* [Iv, Hv], [Iv] */
    float *fc2_w, *fc2_b;     /* [Hv, Iv], [Hv] */
} twn_vision_block;

typedef struct {
    bool postshuffle;       /* DeepStack mergers: LayerNorm over 4 Hv after the 2x2 regroup */
    float *norm_w, *norm_b; /* [Hv] (main merger) or [4 Hv] (postshuffle) */
    float *fc1_w, *fc1_b;   /* [4 Hv, 4 Hv], [4 Hv] */
    float *fc2_w, *fc2_b;   /* [Hout, 4 Hv], [Hout] */
} twn_vision_merger;

typedef struct twn_vision {
    twn_vision_config cfg;
    int Hv, Iv, nh, hd, Hout, depth;
    int merge, unit;          /* spatial_merge_size and its square (patches per output token) */
    int patch_dim;            /* in_channels * temporal_patch_size * patch_size^2 */
    int grid_side;            /* sqrt(num_position_embeddings) */
    float *patch_w;           /* [Hv, patch_dim] (Conv3d weight [Hv, C, T, P, P] flattened) */
    float *patch_b;           /* [Hv] */
    float *pos_embed;         /* [grid_side^2, Hv] */
    twn_vision_block *blocks; /* [depth] */
    twn_vision_merger merger;
    twn_vision_merger *ds_mergers; /* [cfg.n_deepstack], deepstack_merger_list order */
    /* DeepStack features come out in block order (the reference appends them while walking the
     * blocks): feature f is taken after block feat_block[f] by merger feat_merger[f]. */
    int n_features;
    int feat_block[TWN_MAX_DEEPSTACK], feat_merger[TWN_MAX_DEEPSTACK];
    float *rope_inv_freq; /* [hd / 4] */
    int64_t n_params;
    size_t weight_bytes; /* fp32 bytes held */
} twn_vision;

/* A tower with every weight allocated (zeroed) for this config, the derived tables filled in.
 * The loader fills it from a checkpoint; tests and benchmarks fill it with their own numbers.
 * Fails (naming the config value) when the config cannot be run or memory is short. */
int twn_vision_new(const twn_vision_config *c, twn_vision **out, twn_err *err);
/* Loads the vision weights of a Qwen3-VL model directory (config.json with vision_config +
 * safetensors, single or sharded), upcasting bf16/f16 to fp32.  Tensor names and shapes are the
 * checkpoint's (model.visual.*); a missing or misshapen tensor is refused by name. */
int twn_vision_load(const char *dir, twn_vision **out, twn_err *err);
void twn_vision_free(twn_vision *v);

/* One image (or video clip) as the processor hands it over. */
typedef struct {
    const float *pixels;        /* [grid_t * grid_h * grid_w, patch_dim], pixel_values row order */
    int grid_t, grid_h, grid_w; /* image_grid_thw */
} twn_vision_image;

/* Output embeddings per merged token: tokens of image 0, then image 1, ... */
typedef struct {
    int n_images;
    int64_t n_tokens;
    int64_t *offsets; /* [n_images + 1]: image i owns tokens [offsets[i], offsets[i+1]) */
    int dim;          /* out_hidden_size */
    int n_features;   /* DeepStack feature sets */
    float *embeds;    /* [n_tokens, dim]: merger output (replaces the <|image_pad|> rows) */
    float *deepstack; /* [n_features][n_tokens][dim]: feature f goes after decoder layer f */
} twn_vision_out;

/* Tokens (= <|image_pad|> copies) an image of this grid becomes: t * h * w / merge^2. */
int64_t twn_vision_tokens(const twn_vision *v, int grid_t, int grid_h, int grid_w);

/* Observer of intermediates (golden tests), named as the reference's hooks: "vis.patch_embed"
 * (before the position embedding is added), "vis.block.<i>", "vis.deepstack.<k>" (k in
 * deepstack_merger_list order), "vis.merger".  rows x cols fp32, all images concatenated. */
typedef void (*twn_vision_trace_fn)(void *ctx, const char *name, const float *x, int64_t rows,
                                    int cols);

/* Runs the tower over n images (n >= 1).  Each grid must be positive with grid_h and grid_w
 * multiples of merge_size; an image that breaks this fails the call with a message naming the
 * image index and its grid.  out is overwritten (free it with twn_vision_out_free). */
int twn_vision_forward(const twn_vision *v, const twn_vision_image *imgs, int n,
                       twn_vision_trace_fn trace, void *trace_ctx, twn_vision_out *out,
                       twn_err *err);
void twn_vision_out_free(twn_vision_out *o);

/* Building blocks, exposed for tests and the benchmark. */

/* fast_pos_embed_interpolate for one frame of grid h x w, in raster order (row-major over h, w):
 * out [h * w, Hv]. */
void twn_vision_pos_interp(const twn_vision *v, int h, int w, float *out);
/* (row, col) in patch units of every token of one image in merge-block order (repeated per
 * frame): rows/cols [t * h * w]. */
void twn_vision_rot_coords(int t, int h, int w, int merge, int32_t *rows, int32_t *cols);

#endif
