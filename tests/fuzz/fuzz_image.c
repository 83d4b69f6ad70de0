/* fuzz_image.c — arbitrary bytes through image decode (JPEG, PNG, WebP, EXIF) and the processor.
 *
 * Small limits keep each run fast (at most 64 K decoded pixels, 128x128 after smart_resize).
 * What decodes must keep the decoder's promises: positive sides within the limits, a buffer of
 * exactly w*h*3 bytes (every byte is read so ASan sees an overrun), a JPEG/PNG/WebP format and an
 * orientation 1..8.  What preprocesses must give grid_t*grid_h*grid_w rows of finite values in
 * [-1, 1], at most 4 x max_pixels (smart_resize may exceed max_pixels: when shrinking, a side is
 * never below the factor, e.g. 24x530 -> 32x576 with max 128²).  Every failure names the item. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/image.h"

#define NAME "fuzz.img"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_image_config c;
    twn_image_config_default(&c);
    c.max_decoded_pixels = 1 << 16;
    c.max_side = 4096;
    c.min_pixels = 32 * 32;
    c.max_pixels = 128 * 128;
    c.backend = size & 1 ? TWN_IMAGE_BACKEND_PIL : TWN_IMAGE_BACKEND_TORCHVISION;
    c.jpeg_warnings_fatal = (size & 2) != 0;
    twn_rgb_image img;
    twn_err err = {{0}};
    if (twn_image_decode_mem(data, size, NAME, &c, &img, &err) != 0) {
        if (strncmp(err.msg, NAME ": ", sizeof NAME + 1) != 0 || img.rgb) abort();
        return 0;
    }
    if (img.width <= 0 || img.height <= 0 || img.width > c.max_side || img.height > c.max_side ||
        (int64_t)img.width * img.height > c.max_decoded_pixels || !img.format ||
        img.exif_orientation < 1 || img.exif_orientation > 8)
        abort();
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < (size_t)img.width * img.height * 3; i++) sink ^= img.rgb[i];
    (void)sink;
    twn_image_patches p;
    if (twn_image_preprocess(&img, &c, &p, &err) == 0) {
        if (p.grid_t != 1 || p.n_patches != (int64_t)p.grid_h * p.grid_w || p.patch_dim != 1536 ||
            (int64_t)p.grid_h * p.grid_w * 256 > 4 * c.max_pixels || p.grid_h % 2 || p.grid_w % 2)
            abort();
        for (int64_t i = 0; i < p.n_patches * p.patch_dim; i++)
            if (!(fabsf(p.pixels[i]) <= 1.0f)) abort();
        twn_image_patches_free(&p);
    } else if (!strstr(err.msg, "aspect ratio") || p.pixels) {
        abort();
    }
    twn_rgb_image_free(&img);
    return 0;
}
