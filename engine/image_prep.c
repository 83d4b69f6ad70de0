/* image_prep.c — the Qwen3-VL image processor after decode: preprocessor_config.json, smart_resize,
 * rescale + normalize, patchify (qwen3vl-spec.md §2.5; the choice of reference is in image.h).
 *
 * Patchify mirrors the reference's
 *   view(grid_t, T, C, gh/m, m, p, gw/m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
 * so row r = ((t * gh/m + bh) * gw/m + bw) * m² + ih * m + iw holds the patch whose top-left
 * pixel is ((bh*m + ih) * p, (bw*m + iw) * p), and column (c * T + tt) * p² + y * p + x holds
 * channel c of frame tt at (y, x).  A still image is its own T frames (the reference repeats the
 * last frame), so the T blocks of a row are equal.
 *
 * Normalization is a per-channel table of the 256 possible uint8 values, computed with the
 * reference's float arithmetic, so every output float is exactly the reference's. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "engine/image.h"
#include "util/fileio.h"
#include "util/mem.h"

/* preprocessor_config.json is a few hundred bytes; this only stops a wrong path. */
#define PREPROC_MAX_BYTES (1u << 20)
/* smart_resize refuses max(h, w) / min(h, w) above this (transformers' constant). */
#define MAX_ASPECT_RATIO 200.0
/* PIL.Image.Resampling.BICUBIC */
#define RESAMPLE_BICUBIC 3

void twn_image_config_default(twn_image_config *c) {
    memset(c, 0, sizeof *c);
    c->min_pixels = 65536;    /* size.shortest_edge = 256² */
    c->max_pixels = 16777216; /* size.longest_edge = 4096² */
    c->patch_size = 16;
    c->temporal_patch_size = 2;
    c->merge_size = 2;
    for (int i = 0; i < 3; i++) c->mean[i] = c->std[i] = 0.5f;
    c->rescale_factor = 1.0 / 255.0;
    c->max_decoded_pixels = 89478485; /* Pillow's Image.MAX_IMAGE_PIXELS */
    c->max_side = 65500;              /* largest JPEG side */
    c->do_resize = c->do_rescale = c->do_normalize = 1;
    c->backend = TWN_IMAGE_BACKEND_TORCHVISION;
    c->apply_exif_orientation = 1;
    c->jpeg_warnings_fatal = 0;
}

// ------------------------------------------------------------------------------------------------
// preprocessor_config.json

static json_t *member(const json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    return v && !json_is_null(v) ? v : NULL;
}

static int get_int(const json_t *obj, const char *key, int64_t lo, int64_t hi, int64_t *out,
                   const char *name, twn_err *err) {
    json_t *v = member(obj, key);
    if (!v) return 0;
    double d = json_is_integer(v) ? (double)json_integer_value(v)
               : json_is_real(v)  ? json_real_value(v)
                                  : NAN;
    if (!(d == floor(d)) || d < (double)lo || d > (double)hi)
        return twn_err_set(err, "%s: %s must be an integer in [%lld, %lld]", name, key,
                           (long long)lo, (long long)hi);
    *out = (int64_t)d;
    return 0;
}

static int get_bool(const json_t *obj, const char *key, int *out, const char *name, twn_err *err) {
    json_t *v = member(obj, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return twn_err_set(err, "%s: %s must be true or false", name, key);
    *out = json_is_true(v);
    return 0;
}

/* A number or a list of 3 numbers (transformers accepts both). */
static int get_triple(const json_t *obj, const char *key, float out[3], int nonzero,
                      const char *name, twn_err *err) {
    json_t *v = member(obj, key);
    if (!v) return 0;
    double d[3];
    if (json_is_number(v)) {
        d[0] = d[1] = d[2] = json_number_value(v);
    } else if (json_is_array(v) && json_array_size(v) == 3) {
        for (int i = 0; i < 3; i++) {
            json_t *e = json_array_get(v, (size_t)i);
            if (!json_is_number(e))
                return twn_err_set(err, "%s: %s[%d] must be a number", name, key, i);
            d[i] = json_number_value(e);
        }
    } else {
        return twn_err_set(err, "%s: %s must be a number or a list of 3 numbers", name, key);
    }
    for (int i = 0; i < 3; i++) {
        if (!isfinite(d[i]) || (nonzero && d[i] == 0.0))
            return twn_err_set(err, "%s: %s[%d] = %g is not a usable value", name, key, i, d[i]);
        out[i] = (float)d[i];
    }
    return 0;
}

int twn_image_config_parse(twn_image_config *c, const char *json, size_t len, const char *name,
                           twn_err *err) {
    twn_image_config_default(c);
    json_error_t je;
    json_t *root = json_loadb(json, len, 0, &je);
    if (!root) return twn_err_set(err, "%s: invalid JSON at line %d: %s", name, je.line, je.text);
    int rc = -1;
    if (!json_is_object(root)) {
        twn_err_set(err, "%s: expected a JSON object", name);
        goto done;
    }
    int64_t v;
    json_t *size = member(root, "size");
    if (size && !json_is_object(size)) {
        twn_err_set(err, "%s: size must be an object with shortest_edge and longest_edge", name);
        goto done;
    }
    const int64_t PIX_MAX = (int64_t)1 << 40;
    if (size) {
        v = -1;
        if (get_int(size, "shortest_edge", 1, PIX_MAX, &v, name, err)) goto done;
        if (v > 0) c->min_pixels = v;
        v = -1;
        if (get_int(size, "longest_edge", 1, PIX_MAX, &v, name, err)) goto done;
        if (v > 0) c->max_pixels = v;
    }
    /* Backward-compatible top-level keys override size (as in the processors' __init__). */
    v = -1;
    if (get_int(root, "min_pixels", 1, PIX_MAX, &v, name, err)) goto done;
    if (v > 0) c->min_pixels = v;
    v = -1;
    if (get_int(root, "max_pixels", 1, PIX_MAX, &v, name, err)) goto done;
    if (v > 0) c->max_pixels = v;
    if (c->min_pixels > c->max_pixels) {
        twn_err_set(err, "%s: min pixels %lld is above max pixels %lld", name,
                    (long long)c->min_pixels, (long long)c->max_pixels);
        goto done;
    }
    v = c->patch_size;
    if (get_int(root, "patch_size", 1, 1024, &v, name, err)) goto done;
    c->patch_size = (int)v;
    v = c->temporal_patch_size;
    if (get_int(root, "temporal_patch_size", 1, 64, &v, name, err)) goto done;
    c->temporal_patch_size = (int)v;
    v = c->merge_size;
    if (get_int(root, "merge_size", 1, 64, &v, name, err)) goto done;
    c->merge_size = (int)v;
    if (get_triple(root, "image_mean", c->mean, 0, name, err) ||
        get_triple(root, "image_std", c->std, 1, name, err))
        goto done;
    json_t *rf = member(root, "rescale_factor");
    if (rf) {
        if (!json_is_number(rf) || !(json_number_value(rf) > 0) ||
            !isfinite(json_number_value(rf))) {
            twn_err_set(err, "%s: rescale_factor must be a positive number", name);
            goto done;
        }
        c->rescale_factor = json_number_value(rf);
    }
    int convert_rgb = 1;
    if (get_bool(root, "do_resize", &c->do_resize, name, err) ||
        get_bool(root, "do_rescale", &c->do_rescale, name, err) ||
        get_bool(root, "do_normalize", &c->do_normalize, name, err) ||
        get_bool(root, "do_convert_rgb", &convert_rgb, name, err))
        goto done;
    /* do_convert_rgb = false changes nothing here: decode always yields RGB, which is what the
     * processor gets from load_image anyway. */
    v = RESAMPLE_BICUBIC;
    if (get_int(root, "resample", 0, 5, &v, name, err)) goto done;
    if (v != RESAMPLE_BICUBIC) {
        twn_err_set(err, "%s: resample = %lld is not supported; expected 3 (bicubic)", name,
                    (long long)v);
        goto done;
    }
    json_t *type = member(root, "image_processor_type");
    if (type && json_is_string(type)) {
        const char *t = json_string_value(type);
        size_t n = strlen(t);
        if (n >= 3 && strcmp(t + n - 3, "Pil") == 0) c->backend = TWN_IMAGE_BACKEND_PIL;
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

int twn_image_config_load(twn_image_config *c, const char *path, twn_err *err) {
    char *text = NULL;
    size_t len = 0;
    twn_image_config_default(c);
    if (twn_read_file(path, PREPROC_MAX_BYTES, &text, &len, err) != 0) return -1;
    int rc = twn_image_config_parse(c, text, len, path, err);
    twn_free(text);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// smart_resize (transformers.models.qwen2_vl.image_processing_qwen2_vl, v5)

int twn_image_smart_resize(int height, int width, int factor, int64_t min_pixels,
                           int64_t max_pixels, int *out_h, int *out_w, twn_err *err) {
    if (height <= 0 || width <= 0)
        return twn_err_set(err, "image %dx%d has no pixels", width, height);
    if (factor <= 0) return twn_err_set(err, "smart_resize: factor %d must be positive", factor);
    int lo = height < width ? height : width, hi = height < width ? width : height;
    double ratio = (double)hi / (double)lo;
    if (ratio > MAX_ASPECT_RATIO)
        return twn_err_set(err,
                           "image %dx%d: aspect ratio %.6g is over %g, which the reference "
                           "processor refuses",
                           width, height, ratio, MAX_ASPECT_RATIO);
    /* Python's round() on a float is round-half-to-even: nearbyint in the default mode. */
    int64_t h_bar = (int64_t)nearbyint((double)height / factor) * factor;
    int64_t w_bar = (int64_t)nearbyint((double)width / factor) * factor;
    const int64_t area = (int64_t)height * width; /* < 2^62: exact; < 2^53 for real images */
    if (h_bar * w_bar > max_pixels) {
        double beta = sqrt((double)area / (double)max_pixels);
        h_bar = (int64_t)floor((double)height / beta / factor) * factor;
        w_bar = (int64_t)floor((double)width / beta / factor) * factor;
        if (h_bar < factor) h_bar = factor;
        if (w_bar < factor) w_bar = factor;
    } else if (h_bar * w_bar < min_pixels) {
        double beta = sqrt((double)min_pixels / (double)area);
        double hh = ceil((double)height * beta / factor), ww = ceil((double)width * beta / factor);
        if (hh * factor > 1e9 || ww * factor > 1e9)
            return twn_err_set(err, "image %dx%d: min pixels %lld makes it too large", width,
                               height, (long long)min_pixels);
        h_bar = (int64_t)hh * factor;
        w_bar = (int64_t)ww * factor;
    }
    if (h_bar <= 0 || w_bar <= 0 || h_bar > INT32_MAX || w_bar > INT32_MAX)
        return twn_err_set(err, "image %dx%d: smart_resize gives %lldx%lld", width, height,
                           (long long)w_bar, (long long)h_bar);
    *out_h = (int)h_bar;
    *out_w = (int)w_bar;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// rescale + normalize + patchify

/* pixel_values of a large image are tens of MB written once: with 4 KB pages the first-touch
 * faults cost as much as the writing.  Ask for transparent huge pages on the 2 MB-aligned inside
 * of the buffer (a hint; without THP it changes nothing). */
static void advise_huge(void *p, size_t n) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + n) & ~(huge - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* lut[c][v] = the reference's float for uint8 value v of channel c. */
static void build_lut(const twn_image_config *c, float lut[3][256]) {
    for (int ch = 0; ch < 3; ch++) {
        for (int v = 0; v < 256; v++) {
            float x;
            if (c->backend == TWN_IMAGE_BACKEND_TORCHVISION) {
                /* TorchvisionBackend._rescale_and_normalize: with both steps, mean and std are
                 * float32 tensors times (1 / rescale_factor), then (x - mean) / std; otherwise
                 * only one of normalize(x.float()) or x * rescale_factor. */
                if (c->do_rescale && c->do_normalize) {
                    float inv = (float)(1.0 / c->rescale_factor);
                    float m = c->mean[ch] * inv, s = c->std[ch] * inv;
                    x = ((float)v - m) / s;
                } else if (c->do_normalize) {
                    x = ((float)v - c->mean[ch]) / c->std[ch];
                } else if (c->do_rescale) {
                    x = (float)v * (float)c->rescale_factor;
                } else {
                    x = (float)v;
                }
            } else {
                /* image_transforms.rescale: float64 multiply, cast to float32; normalize in
                 * float32. */
                x = c->do_rescale ? (float)((double)v * c->rescale_factor) : (float)v;
                if (c->do_normalize) x = (x - c->mean[ch]) / c->std[ch];
            }
            lut[ch][v] = x;
        }
    }
}

int twn_image_patchify(const twn_rgb_image *img, const twn_image_config *c, twn_image_patches *out,
                       twn_err *err) {
    memset(out, 0, sizeof *out);
    const int p = c->patch_size, m = c->merge_size, T = c->temporal_patch_size;
    if (p <= 0 || m <= 0 || T <= 0)
        return twn_err_set(err,
                           "patchify: patch_size %d, merge_size %d, temporal_patch_size %d "
                           "must be positive",
                           p, m, T);
    const int f = p * m;
    if (!img || !img->rgb || img->width <= 0 || img->height <= 0 || img->width % f ||
        img->height % f)
        return twn_err_set(err, "patchify: image %dx%d: sides must be positive multiples of %d",
                           img ? img->width : 0, img ? img->height : 0, f);
    const int gh = img->height / p, gw = img->width / p;
    const int64_t n = (int64_t)gh * gw;
    const int dim = 3 * T * p * p;
    size_t count, bytes;
    if (twn_mul_size((size_t)n, (size_t)dim, &count) != 0 ||
        twn_mul_size(count, sizeof(float), &bytes) != 0)
        return twn_err_set(err, "patchify: image %dx%d: output size overflows", img->width,
                           img->height);
    float *px = twn_try_alloc(bytes);
    if (px) advise_huge(px, bytes);
    if (!px)
        return twn_err_set(err, "patchify: image %dx%d: cannot allocate %zu bytes of pixel_values",
                           img->width, img->height, bytes);
    float lut[3][256];
    build_lut(c, lut);
    const size_t stride = (size_t)img->width * 3, plane = (size_t)p * p;
    float *row = px;
    for (int bh = 0; bh < gh / m; bh++) {
        for (int bw = 0; bw < gw / m; bw++) {
            for (int ih = 0; ih < m; ih++) {
                for (int iw = 0; iw < m; iw++, row += dim) {
                    const uint8_t *src = img->rgb + (size_t)(bh * m + ih) * p * stride +
                                         (size_t)(bw * m + iw) * p * 3;
                    for (int ch = 0; ch < 3; ch++) {
                        float *dst = row + (size_t)ch * T * plane;
                        const float *l = lut[ch];
                        for (int y = 0; y < p; y++) {
                            const uint8_t *s = src + (size_t)y * stride + ch;
                            float *d = dst + (size_t)y * p;
                            for (int x = 0; x < p; x++) d[x] = l[s[3 * x]];
                        }
                        for (int t = 1; t < T; t++)
                            memcpy(dst + t * plane, dst, plane * sizeof *dst);
                    }
                }
            }
        }
    }
    out->pixels = px;
    out->n_patches = n;
    out->patch_dim = dim;
    out->grid_t = 1;
    out->grid_h = gh;
    out->grid_w = gw;
    return 0;
}

// ------------------------------------------------------------------------------------------------

int twn_image_preprocess(const twn_rgb_image *img, const twn_image_config *c,
                         twn_image_patches *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    if (!img || !img->rgb) return twn_err_set(err, "preprocess: no image");
    if (!c->do_resize) return twn_image_patchify(img, c, out, err);
    int h, w;
    if (twn_image_smart_resize(img->height, img->width, c->patch_size * c->merge_size,
                               c->min_pixels, c->max_pixels, &h, &w, err) != 0)
        return -1;
    if (h == img->height && w == img->width) return twn_image_patchify(img, c, out, err);
    twn_rgb_image r;
    if (twn_image_resize(img, w, h, c->backend, &r, err) != 0) return -1;
    int rc = twn_image_patchify(&r, c, out, err);
    twn_rgb_image_free(&r);
    return rc;
}

int twn_image_prepare_mem(const void *bytes, size_t n, const char *name, const twn_image_config *c,
                          twn_image_patches *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    twn_rgb_image img;
    if (twn_image_decode_mem(bytes, n, name, c, &img, err) != 0) return -1;
    int rc = twn_image_preprocess(&img, c, out, err);
    twn_rgb_image_free(&img);
    if (rc != 0) twn_err_wrap(err, "%s", name ? name : "image");
    return rc;
}

int twn_image_prepare_file(const char *path, const twn_image_config *c, twn_image_patches *out,
                           twn_err *err) {
    memset(out, 0, sizeof *out);
    twn_rgb_image img;
    if (twn_image_decode_file(path, c, &img, err) != 0) return -1;
    int rc = twn_image_preprocess(&img, c, out, err);
    twn_rgb_image_free(&img);
    if (rc != 0) twn_err_wrap(err, "%s", path);
    return rc;
}

void twn_rgb_image_free(twn_rgb_image *img) {
    if (!img) return;
    twn_free(img->rgb);
    memset(img, 0, sizeof *img);
}

void twn_image_patches_free(twn_image_patches *p) {
    if (!p) return;
    twn_free(p->pixels);
    memset(p, 0, sizeof *p);
}
