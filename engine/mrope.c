/* mrope.c — get_rope_index and <|image_pad|> expansion (see mrope.h). */
#include "engine/mrope.h"

int twn_mrope_expand(const int32_t *ids, size_t n, int32_t image_token_id, const int64_t *counts,
                     int n_images, twn_ivec *out, twn_err *err) {
    int found = 0;
    for (size_t i = 0; i < n; i++) found += ids[i] == image_token_id;
    if (found != n_images)
        return twn_err_set(err,
                           "the prompt has %d image token(s) (id %d) but the item has %d image(s)",
                           found, image_token_id, n_images);
    int j = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] != image_token_id) {
            twn_ivec_push(out, ids[i]);
            continue;
        }
        for (int64_t k = 0; k < counts[j]; k++) twn_ivec_push(out, image_token_id);
        j++;
    }
    return 0;
}

int twn_mrope_positions(const int32_t *ids, size_t n, int32_t image_token_id, const twn_grid *grids,
                        int n_grids, int merge, int32_t start, int32_t *pos, int32_t *next,
                        twn_err *err) {
    int32_t *T = pos, *Hs = pos + n, *Ws = pos + 2 * n;
    int32_t p = start;
    int g = 0;
    size_t i = 0;
    while (i < n) {
        if (ids[i] != image_token_id) {
            T[i] = Hs[i] = Ws[i] = p++;
            i++;
            continue;
        }
        if (g >= n_grids)
            return twn_err_set(err, "image tokens at row %zu but all %d image grid(s) are used", i,
                               n_grids);
        const twn_grid *G = &grids[g];
        if (G->t < 1 || G->h < 1 || G->w < 1 || merge < 1 || G->h % merge || G->w % merge)
            return twn_err_set(err,
                               "image %d: grid (t %d, h %d, w %d) is not positive with h and w "
                               "multiples of the merge size %d",
                               g, G->t, G->h, G->w, merge);
        const int lt = G->t, lh = G->h / merge, lw = G->w / merge;
        const size_t cnt = (size_t)lt * lh * lw;
        size_t run = 0;
        while (i + run < n && ids[i + run] == image_token_id) run++;
        if (run < cnt || (n_grids == g + 1 && run != cnt))
            return twn_err_set(err,
                               "image %d at row %zu: %zu consecutive image tokens, expected %zu "
                               "for grid (t %d, h %d, w %d)",
                               g, i, run, cnt, G->t, G->h, G->w);
        for (int a = 0; a < lt; a++)
            for (int b = 0; b < lh; b++)
                for (int c = 0; c < lw; c++, i++) {
                    T[i] = p + a;
                    Hs[i] = p + b;
                    Ws[i] = p + c;
                }
        int mx = lt > lh ? lt : lh;
        p += mx > lw ? mx : lw;
        g++;
    }
    if (g != n_grids)
        return twn_err_set(err, "%d image grid(s) given but the ids hold %d image(s)", n_grids, g);
    *next = p;
    return 0;
}
