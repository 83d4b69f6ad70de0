/* bench_image.c — image preprocessing throughput, one core: decode, resize, normalize + patchify.
 *
 * usage: bench_image [SECONDS] [FILE...]
 *   default files: the committed photographs
 * tests/data/images/{hubble_deep_field,retina,rocket}.jpg (0.87, 2.0 and 0.27 MP JPEGs) and
 * chelsea.png. For each file and each backend, runs decode -> smart_resize -> resize -> patchify
 * for about SECONDS (default 2) and prints ms per stage, images/s and input MP/s.  The baselines
 * measured in the same run: TurboJPEG decode alone (the floor for a JPEG), a memcpy of the
 * pixel_values bytes (the floor for writing the output), and, when /usr/bin/python3 has Pillow and
 * numpy, the reference slow processor itself (PIL open + exif_transpose + convert + resize + numpy
 * normalize/patchify, tests/tools/pil_reference.py bench).  Not a test: it only reports. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/image.h"
#include "util/clock.h"
#include "util/fileio.h"
#include "util/mem.h"

#ifndef TWN_SOURCE_DIR
#define TWN_SOURCE_DIR "."
#endif

typedef struct {
    double decode, resize, patchify, n;
} stage_t;

static void run_file(const char *path, double seconds, twn_image_backend backend) {
    char *data = NULL;
    size_t len = 0;
    twn_err err = {{0}};
    if (twn_read_file(path, (size_t)1 << 30, &data, &len, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(1);
    }
    twn_image_config c;
    twn_image_config_default(&c);
    c.backend = backend;
    stage_t s = {0};
    int in_w = 0, in_h = 0, out_w = 0, out_h = 0;
    int64_t npatch = 0;
    double t_end = twn_now() + seconds, memcpy_s = 0;
    for (int iter = 0; iter < 2 || twn_now() < t_end; iter++) {
        twn_rgb_image img, rs;
        twn_image_patches p;
        double t0 = twn_now();
        if (twn_image_decode_mem(data, len, path, &c, &img, &err) != 0) goto fail;
        double t1 = twn_now();
        if (twn_image_smart_resize(img.height, img.width, c.patch_size * c.merge_size, c.min_pixels,
                                   c.max_pixels, &out_h, &out_w, &err) != 0 ||
            twn_image_resize(&img, out_w, out_h, c.backend, &rs, &err) != 0)
            goto fail;
        double t2 = twn_now();
        if (twn_image_patchify(&rs, &c, &p, &err) != 0) goto fail;
        double t3 = twn_now();
        /* output-bandwidth floor: copy the same number of bytes once */
        size_t bytes = (size_t)p.n_patches * p.patch_dim * sizeof(float);
        float *copy = twn_try_alloc(bytes);
        double t4 = twn_now();
        if (copy) memcpy(copy, p.pixels, bytes);
        double t5 = twn_now();
        twn_free(copy);
        if (iter >= 1) { /* the first is warm-up */
            s.decode += t1 - t0, s.resize += t2 - t1, s.patchify += t3 - t2, s.n += 1;
            memcpy_s += t5 - t4;
        }
        in_w = img.width, in_h = img.height, npatch = p.n_patches;
        twn_image_patches_free(&p);
        twn_rgb_image_free(&rs);
        twn_rgb_image_free(&img);
    }
    double total = (s.decode + s.resize + s.patchify) / s.n;
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    printf("%-22s %-11s %5dx%-5d -> %5dx%-5d %6lld  %7.2f %7.2f %7.2f %8.2f  %7.1f  %6.1f  %5.2f\n",
           base, backend == TWN_IMAGE_BACKEND_PIL ? "pil" : "torchvision", in_w, in_h, out_w, out_h,
           (long long)npatch, 1e3 * s.decode / s.n, 1e3 * s.resize / s.n, 1e3 * s.patchify / s.n,
           1e3 * total, 1.0 / total, in_w * (double)in_h / total / 1e6,
           (s.patchify / s.n) / (memcpy_s / s.n));
    twn_free(data);
    return;
fail:
    fprintf(stderr, "%s\n", err.msg);
    exit(1);
}

static void pillow_baseline(const char *path, double seconds) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 '%s/tests/tools/pil_reference.py' bench '%s' %g 2>/dev/null",
             TWN_SOURCE_DIR, path, seconds);
    FILE *p = popen(cmd, "r");
    char line[256] = {0};
    if (!p || !fgets(line, sizeof line, p)) {
        if (p) pclose(p);
        printf("  (Pillow baseline unavailable)\n");
        return;
    }
    pclose(p);
    double ms = atof(line);
    printf("%-22s %-11s %37s %37.2f  %7.1f\n", "", "Pillow+numpy", "(reference slow processor)", ms,
           1e3 / ms);
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 2.0;
    if (seconds <= 0) seconds = 2.0;
    const char *defaults[] = {TWN_SOURCE_DIR "/tests/data/images/hubble_deep_field.jpg",
                              TWN_SOURCE_DIR "/tests/data/images/retina.jpg",
                              TWN_SOURCE_DIR "/tests/data/images/rocket.jpg",
                              TWN_SOURCE_DIR "/tests/data/images/chelsea.png"};
    const char **files = argc > 2 ? (const char **)argv + 2 : defaults;
    int nfiles = argc > 2 ? argc - 2 : (int)(sizeof defaults / sizeof *defaults);
    printf("image preprocessing, 1 thread, %.1f s per row (Qwen3-VL defaults: patch 16, merge 2, "
           "min 65536, max 16777216 pixels)\n",
           seconds);
    printf("%-22s %-11s %-27s %6s  %7s %7s %7s %8s  %7s  %6s  %5s\n", "file", "backend",
           "input -> resized", "patches", "dec ms", "rsz ms", "pat ms", "total ms", "img/s", "MP/s",
           "pat/memcpy");
    for (int i = 0; i < nfiles; i++) {
        run_file(files[i], seconds, TWN_IMAGE_BACKEND_TORCHVISION);
        run_file(files[i], seconds, TWN_IMAGE_BACKEND_PIL);
        pillow_baseline(files[i], seconds);
    }
    return 0;
}
