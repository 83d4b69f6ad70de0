/* image.h — image input for the vision tower: decode JPEG/PNG/WebP into RGB8, then the Qwen3-VL
 * image processor (smart_resize, bicubic resize, rescale + normalize, patchify) so that
 * `pixel_values` and `image_grid_thw` equal what transformers computes for the same file.
 *
 * Which reference (qwen3vl-spec.md §2.5).  preprocessor_config.json of Qwen3-VL names
 * "Qwen2VLImageProcessorFast".  transformers 4.57's AutoImageProcessor loads the Fast class when
 * the saved type ends in "Fast" and torchvision is installed; 5.x loads the torchvision backend
 * (`Qwen2VLImageProcessor(TorchvisionBackend)`) by default.  So the default here is the
 * torchvision path, TWN_IMAGE_BACKEND_TORCHVISION:
 *   - resize = torchvision `resize(uint8 CHW, BICUBIC, antialias=True)`, which on CPU runs torch's
 *     native uint8 kernel (`upsample_avx_bilinear_bicubic_uint8`, a Pillow-SIMD port): Keys cubic
 *     a = -0.5, support scaled by the downscale factor, weights computed in double, normalized,
 *     quantized to int16 with a per-pass precision (largest weight < 2^15), horizontal pass then
 *     vertical pass, each rounded (+2^(prec-1), >>prec) and clamped to uint8;
 *   - rescale + normalize fused: (x - mean/rescale) / (std/rescale) in float32.
 * TWN_IMAGE_BACKEND_PIL reproduces the slow/PIL processor (4.57 `Qwen2VLImageProcessor`, 5.x
 * `Qwen2VLImageProcessorPil`): Pillow's ImagingResample (same filter, 22-bit int32 weights, uint8
 * after each pass) and float32(float64(x) * rescale) then (x - mean) / std in float32.  Each
 * backend is bit-exact with its reference (tests/unit/test_image.c); the two resizes differ from
 * each other by 1, rarely 2, uint8 levels on about 0.1-0.5% of values (rounding of the uint8
 * intermediate compounds across the two passes).
 *
 * Decode follows what transformers' load_image does with a file: PIL.Image.open,
 * ImageOps.exif_transpose, convert("RGB"):
 *   - EXIF orientation 2..8 is applied (JPEG APP1, PNG eXIf, WebP EXIF; a small bounded TIFF
 *     reader); apply_exif_orientation = 0 matches a caller who hands PIL images to the processor.
 *   - convert("RGB") drops alpha (no compositing), expands palette / gray, takes the high byte of
 *     16-bit RGB(A) and gray+alpha, and clips 16-bit gray (no alpha) to 255 as Pillow's I;16->RGB
 *     does; CMYK/YCCK JPEGs are read as Adobe-inverted CMYK ("CMYK;I") and converted with Pillow's
 *     cmyk2rgb.  tRNS, gamma and ICC profiles are ignored, as Pillow's convert ignores them.
 *   - Animated WebP: the first frame as Pillow shows it (the canvas after frame 1, alpha dropped).
 *   - JPEG: libjpeg warnings (e.g. corrupt entropy data) are tolerated as Pillow tolerates them,
 *     except premature end of data, which Pillow refuses as "image file is truncated".
 *   - Anything else is refused naming what the magic bytes look like.
 * Size limits are checked from the header before any pixel buffer is allocated.
 *
 * smart_resize is transformers 5.x's: no minimum side (4.57 refused sides < factor), aspect ratio
 * above 200 refused, Python's round-half-to-even, max(factor, ...) when shrinking. */
#ifndef TWN_ENGINE_IMAGE_H
#define TWN_ENGINE_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

typedef enum {
    /* transformers' default: the Fast / torchvision processor */
    TWN_IMAGE_BACKEND_TORCHVISION = 0,
    /* the slow / PIL processor */
    TWN_IMAGE_BACKEND_PIL = 1,
} twn_image_backend;

typedef struct twn_image_config {
    int64_t min_pixels, max_pixels; /* smart_resize bounds from preprocessor_config.json */
    int patch_size, temporal_patch_size, merge_size;
    float mean[3], std[3];
    double rescale_factor; /* 1/255 */
    /* decode limits, checked from the header BEFORE any pixel buffer is allocated */
    int64_t max_decoded_pixels;
    int max_side;
    /* processor switches (preprocessor_config.json do_resize / do_rescale / do_normalize) */
    int do_resize, do_rescale, do_normalize;
    twn_image_backend backend;
    int apply_exif_orientation; /* 1: as transformers' load_image (ImageOps.exif_transpose) */
    int jpeg_warnings_fatal;    /* 1: refuse JPEGs that libjpeg decodes with a warning */
} twn_image_config;

/* Qwen3-VL defaults: min 65536, max 16777216 pixels, patch 16, temporal 2, merge 2, mean = std =
 * 0.5, rescale 1/255, torchvision backend, EXIF applied; limits max_decoded_pixels = 89478485
 * (Pillow's MAX_IMAGE_PIXELS) and max_side = 65500 (the JPEG maximum). */
void twn_image_config_default(twn_image_config *c);
/* Defaults, then the keys of preprocessor_config.json: size.{shortest_edge,longest_edge} (or
 * min_pixels/max_pixels), patch_size, temporal_patch_size, merge_size, image_mean, image_std,
 * rescale_factor, do_resize, do_rescale, do_normalize, resample (must be 3 = bicubic),
 * image_processor_type (a name ending in "Pil" selects the PIL backend).  Errors name the key. */
int twn_image_config_load(twn_image_config *c, const char *preprocessor_config_path, twn_err *err);
/* Same, from JSON text; `name` is used in messages. */
int twn_image_config_parse(twn_image_config *c, const char *json, size_t len, const char *name,
                           twn_err *err);

typedef struct twn_image_patches {
    float *pixels; /* [n_patches][patch_dim], row-major, exactly the reference pixel_values order */
    int64_t n_patches;          /* = grid_t * grid_h * grid_w */
    int patch_dim;              /* = 3 * temporal_patch_size * patch_size * patch_size */
    int grid_t, grid_h, grid_w; /* image_grid_thw */
} twn_image_patches;

/* Decoded RGB8 image, rows top to bottom, RGBRGB...; rgb is 64-byte aligned (twn_free). */
typedef struct twn_rgb_image {
    uint8_t *rgb;
    int width, height;
    const char *format;   /* "JPEG", "PNG" or "WebP" (static string); NULL if not decoded */
    int exif_orientation; /* 1..8 as found in the file (1 when absent), applied or not */
} twn_rgb_image;

/* Decodes bytes (JPEG, PNG, WebP) to RGB8.  `name` (a path or item id) starts every message. */
int twn_image_decode_mem(const void *bytes, size_t n, const char *name, const twn_image_config *c,
                         twn_rgb_image *out, twn_err *err);
int twn_image_decode_file(const char *path, const twn_image_config *c, twn_rgb_image *out,
                          twn_err *err);
/* smart_resize + resize + rescale/normalize + patchify. */
int twn_image_preprocess(const twn_rgb_image *img, const twn_image_config *c,
                         twn_image_patches *out, twn_err *err);
int twn_image_prepare_file(const char *path, const twn_image_config *c, twn_image_patches *out,
                           twn_err *err); /* decode + preprocess */
int twn_image_prepare_mem(const void *bytes, size_t n, const char *name, const twn_image_config *c,
                          twn_image_patches *out, twn_err *err);
void twn_rgb_image_free(twn_rgb_image *img);
void twn_image_patches_free(twn_image_patches *p);

/* smart_resize exactly as the reference (round-half-to-even) */
int twn_image_smart_resize(int height, int width, int factor, int64_t min_pixels,
                           int64_t max_pixels, int *out_h, int *out_w, twn_err *err);

/* The two steps of twn_image_preprocess, exposed for tests and tools. */
/* Bicubic antialiased resize of RGB8 to out_w x out_h with the backend's arithmetic; a same-size
 * "resize" is a copy, as in both references. */
int twn_image_resize(const twn_rgb_image *img, int out_w, int out_h, twn_image_backend backend,
                     twn_rgb_image *out, twn_err *err);
/* Rescale/normalize and patchify an image whose sides are multiples of patch_size * merge_size. */
int twn_image_patchify(const twn_rgb_image *img, const twn_image_config *c, twn_image_patches *out,
                       twn_err *err);

#endif
