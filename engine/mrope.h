/* mrope.h — 3-stream (T, H, W) position ids of a prompt with images: Qwen3VLModel.get_rope_index.
 *
 * The processor turns each <|image_pad|> of a rendered prompt into t*(h/m)*(w/m) copies (m =
 * spatial_merge_size, (t, h, w) = image_grid_thw); get_rope_index then walks the ids:
 *   - a text token takes the next position p on all three streams, then p + 1;
 *   - an image's tokens, in row-major order over (t, h/m, w/m), take (p + ti, p + hi, p + wi),
 *     and the next position after it is p + max(t, h/m, w/m) (= max of all positions so far + 1);
 *   - <|vision_start|> / <|vision_end|> are ordinary text tokens.
 * Decoding continues at that next position (rope_deltas = next - prompt length), which is what
 * twn_kv.next_pos carries (lm.c sets it to max + 1 after a prefill with explicit positions).
 * Rows fed as embeddings (TWN_TOKEN_EMBED, the query vectors) count as text. */
#ifndef TWN_ENGINE_MROPE_H
#define TWN_ENGINE_MROPE_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"
#include "util/vec.h"

/* One image's (t, h, w) grid in patches, as the processor reports it. */
typedef struct {
    int t, h, w;
} twn_grid;

/* Replaces the j-th image token of ids[0..n) with counts[j] copies, appending to out (processing_
 * qwen3_vl's replace_image_token).  The number of image tokens must equal n_images; the message
 * says how many of each were found. */
int twn_mrope_expand(const int32_t *ids, size_t n, int32_t image_token_id, const int64_t *counts,
                     int n_images, twn_ivec *out, twn_err *err);

/* get_rope_index over ids[0..n) (already expanded), starting at position `start` (0 for a fresh
 * prompt).  pos is [3][n] stream-major: pos[s * n + i].  *next receives the position of the next
 * token.  Every run of image tokens must be exactly one image: t*(h/m)*(w/m) tokens of the next
 * grid (h, w multiples of m), and every grid must be used. */
int twn_mrope_positions(const int32_t *ids, size_t n, int32_t image_token_id, const twn_grid *grids,
                        int n_grids, int merge, int32_t start, int32_t *pos, int32_t *next,
                        twn_err *err);

#endif
