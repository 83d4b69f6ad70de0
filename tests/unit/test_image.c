/* test_image.c — image decode and the Qwen3-VL processor against Pillow + numpy.
 *
 * The oracle is tests/tools/pil_reference.py run once by /usr/bin/python3 for all jobs: it writes
 * synthetic fixtures made from the committed photographs (tests/data/images, from Debian's
 * python3-skimage), decodes with Pillow (exif_transpose + convert("RGB")), and runs both processor
 * paths: Pillow's own resize (slow/PIL processor) and a port of torch's uint8 kernel (the
 * torchvision processor, the default), the port itself checked against Pillow on every call.
 * Same-backend results must be bit-identical: decoded bytes, resized bytes, every float of
 * pixel_values and grid_thw.  Across backends (our torchvision path vs Pillow) the resized bytes
 * differ by at most 2 levels on under 1% of values.
 *
 * Bad inputs are made here (hand-written PNG headers, patched JPEG/WebP headers, cut files) and
 * each must give one message naming the item and the problem. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/image.h"
#include "engine/mkmodel.h"
#include "tests/testutil.h"
#include "util/mem.h"

#define PY     "/usr/bin/python3"
#define SCRIPT TWN_SOURCE_DIR "/tests/tools/pil_reference.py"
#define PHOTOS TWN_SOURCE_DIR "/tests/data/images"

static const char *g_dir; /* fixtures and oracle outputs */
static char *g_results[512];
static int g_njobs;
static FILE *g_jobs;

static const char *path_in(const char *dir, const char *name) {
    static char buf[8][2048];
    static int k = 0;
    char *p = buf[k++ % 8];
    snprintf(p, 2048, "%s/%s", dir, name);
    return p;
}

static int add_job(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int add_job(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(g_jobs, fmt, ap);
    va_end(ap);
    fputc('\n', g_jobs);
    return g_njobs++;
}

static const char *result(int job) {
    assert_true(job >= 0 && job < g_njobs);
    if (!g_results[job]) fail_msg("oracle job %d gave no result", job);
    if (!strncmp(g_results[job], "exception", 9))
        fail_msg("oracle job %d: %s", job, g_results[job]);
    return g_results[job];
}

static twn_image_config cfg_default(void) {
    twn_image_config c;
    twn_image_config_default(&c);
    return c;
}

static twn_image_config cfg_backend(twn_image_backend b) {
    twn_image_config c = cfg_default();
    c.backend = b;
    return c;
}

static void expect_error(int rc, const twn_err *err, const char *want) {
    assert_int_equal(rc, -1);
    if (!strstr(err->msg, want)) fail_msg("error\n  %s\ndoes not contain\n  %s", err->msg, want);
}

static uint8_t *file_bytes(const char *path, size_t *n) {
    return (uint8_t *)tu_read(path, n);
}

// ------------------------------------------------------------------------------------------------
// Minimal PNG writer (stored deflate) for hand-made good and bad files

static uint32_t crc32_png(const uint8_t *p, size_t n, uint32_t c) {
    c = ~c;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    }
    return ~c;
}

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *d, size_t n) {
    if (b->n + n > b->cap) b->p = realloc(b->p, b->cap = (b->n + n) * 2 + 64);
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put32be(buf_t *b, uint32_t v) {
    uint8_t x[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, x, 4);
}
static void chunk(buf_t *b, const char *tag, const uint8_t *d, size_t n) {
    put32be(b, (uint32_t)n);
    size_t at = b->n;
    put(b, tag, 4);
    if (n) put(b, d, n);
    put32be(b, crc32_png(b->p + at, n + 4, 0));
}

/* 8-bit RGB PNG of w x h from `raw` rows (filter byte 0 each); raw may be NULL for a header-only
 * file whose IDAT holds a few bytes. */
static buf_t png_rgb(uint32_t w, uint32_t h, const uint8_t *rgb) {
    buf_t b = {0};
    put(&b, "\x89PNG\r\n\x1a\n", 8);
    uint8_t ihdr[13] = {w >> 24, w >> 16, w >> 8, w, h >> 24, h >> 16, h >> 8, h, 8, 2, 0, 0, 0};
    chunk(&b, "IHDR", ihdr, 13);
    buf_t z = {0};
    put(&z, "\x78\x01", 2);
    size_t raw_n = rgb ? (size_t)h * (1 + (size_t)w * 3) : 8;
    uint8_t *raw = calloc(raw_n, 1);
    if (rgb)
        for (uint32_t y = 0; y < h; y++)
            memcpy(raw + y * (1 + (size_t)w * 3) + 1, rgb + (size_t)y * w * 3, (size_t)w * 3);
    uint32_t a = 1, s = 0;
    for (size_t i = 0; i < raw_n; i++) a = (a + raw[i]) % 65521, s = (s + a) % 65521;
    for (size_t off = 0; off < raw_n || off == 0; off += 65535) {
        size_t len = raw_n - off < 65535 ? raw_n - off : 65535;
        uint8_t hdr[5] = {off + len >= raw_n, len, len >> 8, ~len, (~len) >> 8};
        put(&z, hdr, 5);
        put(&z, raw + off, len);
        if (off + len >= raw_n) break;
    }
    put32be(&z, s << 16 | a);
    chunk(&b, "IDAT", z.p, z.n);
    chunk(&b, "IEND", NULL, 0);
    free(z.p);
    free(raw);
    return b;
}

// ------------------------------------------------------------------------------------------------
// Setup: fixtures, bad files that Pillow also reads, and one oracle run for every job

/* Entropy-coded bytes of rocket.jpg damaged in place (no 0xFF created): libjpeg warns, Pillow and
 * we decode anyway. */
static void write_corrupt_huffman(const char *out) {
    size_t n;
    uint8_t *b = file_bytes(PHOTOS "/rocket.jpg", &n);
    size_t sos = 0;
    for (size_t i = 2; i + 1 < n; i++)
        if (b[i] == 0xFF && b[i + 1] == 0xDA) {
            sos = i;
            break;
        }
    assert_true(sos > 0);
    for (size_t i = sos + 2000; i < sos + 2400 && i < n - 2; i += 7)
        if (b[i] != 0xFF && b[i - 1] != 0xFF)
            b[i] = (uint8_t)(b[i] ^ 0x5a) == 0xFF ? 0 : b[i] ^ 0x5a;
    tu_write(out, b, n);
    free(b);
}

static const char *const DECODE_FILES[] = {
    /* photographs as packaged */
    PHOTOS "/chelsea.png", PHOTOS "/rocket.jpg", PHOTOS "/camera.png",
    PHOTOS "/hubble_deep_field.jpg", PHOTOS "/retina.jpg", PHOTOS "/palette_color.png",
    PHOTOS "/green_palette.png",
    /* fixtures */
    "cat.png", "cat_lossless.webp", "cat_lossy.webp", "cat_q90.jpg", "cat_progressive.jpg",
    "cat_420.jpg", "wide_1800x24.png", "tall_40x2400.jpg", "tiny_23x17.png", "tiny_5x3.png",
    "exact_256x320.png", "gray.png", "gray.jpg", "palette.png", "palette4.png", "palette_short.png",
    "rgba.png", "rgba_lossless.webp", "rgba_lossy.webp", "la.png", "cmyk.jpg", "bilevel.png",
    "rgb16.png", "rgba16.png", "gray16.png", "la16.png", "gray2.png", "gray4.png", "rgb_adam7.png",
    "exif1.jpg", "exif2.jpg", "exif3.jpg", "exif4.jpg", "exif5.jpg", "exif6.jpg", "exif7.jpg",
    "exif8.jpg", "exif6.png", "exif8.webp", "anim.webp", "corrupt_huffman.jpg"};
#define N_DECODE (int)(sizeof DECODE_FILES / sizeof *DECODE_FILES)
static int g_decode_job[N_DECODE], g_decode_noexif_job;

typedef struct {
    const char *file;
    int backend; /* twn_image_backend */
    int64_t min_pixels, max_pixels;
    int job;       /* same backend */
    int cross_job; /* the other backend (for the ±level check), -1 if none */
} prep_case;

static prep_case PREP[] = {
    {PHOTOS "/chelsea.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {PHOTOS "/chelsea.png", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {PHOTOS "/rocket.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {PHOTOS "/rocket.jpg", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {PHOTOS "/camera.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {PHOTOS "/hubble_deep_field.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {PHOTOS "/hubble_deep_field.jpg", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {PHOTOS "/retina.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    /* heavy downscale (support 14 taps) and upscale via custom bounds */
    {PHOTOS "/retina.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 4096, 40000, 0, 0},
    {PHOTOS "/retina.jpg", TWN_IMAGE_BACKEND_PIL, 4096, 40000, 0, -1},
    {PHOTOS "/hubble_deep_field.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 2000000, 16777216, 0, 0},
    {"wide_1800x24.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"wide_1800x24.png", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {"tall_40x2400.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"tiny_23x17.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"tiny_23x17.png", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {"tiny_5x3.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"exact_256x320.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"exact_256x320.png", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
    {"gray16.png", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"exif6.jpg", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"cat_lossless.webp", TWN_IMAGE_BACKEND_TORCHVISION, 65536, 16777216, 0, 0},
    {"anim.webp", TWN_IMAGE_BACKEND_PIL, 65536, 16777216, 0, -1},
};
#define N_PREP (int)(sizeof PREP / sizeof *PREP)

/* (height, width, factor, min, max) for smart_resize. */
static const int64_t SMART[][5] = {
    {300, 451, 32, 65536, 16777216},
    {427, 640, 32, 65536, 16777216},
    {48, 80, 32, 1, 16777216},
    {80, 112, 32, 1, 16777216}, /* .5 ties: to even */
    {16, 16, 32, 1, 16777216},
    {1, 1, 32, 65536, 16777216},
    {24, 1800, 32, 65536, 16777216},
    {2400, 40, 32, 65536, 16777216},
    {1, 200, 32, 65536, 16777216},
    {1, 201, 32, 65536, 16777216}, /* ratio limit */
    {17, 23, 32, 65536, 16777216},
    {4096, 4096, 32, 65536, 16777216},
    {4097, 4111, 32, 65536, 16777216},
    {10000, 7000, 32, 65536, 16777216},
    {60000, 300, 32, 65536, 16777216},
    {1411, 1411, 32, 4096, 40000},
    {872, 1000, 32, 2000000, 16777216},
    {1080, 1920, 28, 3136, 1003520},
    {1000, 10, 28, 3136, 12845056},
    {33, 65500, 32, 65536, 16777216},
    {50, 50, 14, 56 * 56, 28 * 28 * 1280},
    {720, 1280, 32, 65536, 65536},
    {999, 1001, 32, 1000000, 1000000},
    {65500, 65500, 32, 65536, 16777216},
};
#define N_SMART (int)(sizeof SMART / sizeof *SMART)
static int g_smart_job[N_SMART];

/* Direct resizes of the decoded chelsea.png (451x300) to sizes that are not multiples of 32, so
 * the row tails and the last-row paths of the passes run; both backends. */
static const int RESIZE[][2] = {{97, 61},   {450, 300}, {451, 299}, {1000, 7},  {3, 500},
                                {452, 301}, {1, 1},     {902, 600}, {150, 100}, {451, 300}};
#define N_RESIZE (int)(sizeof RESIZE / sizeof *RESIZE)
static int g_resize_job[N_RESIZE][2];

static const char *backend_name(int b) {
    return b == TWN_IMAGE_BACKEND_PIL ? "pil" : "torchvision";
}

static const char *fixture(const char *f) {
    return f[0] == '/' ? f : path_in(g_dir, f);
}

static int setup(void **state) {
    (void)state;
    g_dir = tu_tmpdir("image");
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s '%s' fixtures '%s' '%s'", PY, SCRIPT, g_dir, PHOTOS);
    if (tu_run(cmd, &out) != 0) fail_msg("pil_reference.py fixtures failed:\n%s", out);
    free(out);
    write_corrupt_huffman(path_in(g_dir, "corrupt_huffman.jpg"));

    char jobs[2048];
    snprintf(jobs, sizeof jobs, "%s/jobs.txt", g_dir);
    g_jobs = fopen(jobs, "w");
    assert_non_null(g_jobs);
    for (int i = 0; i < N_DECODE; i++)
        g_decode_job[i] = add_job("decode %s %s/dec%d.rgb", fixture(DECODE_FILES[i]), g_dir, i);
    g_decode_noexif_job =
        add_job("decode %s %s/dec_noexif.rgb noexif", fixture("exif6.jpg"), g_dir);
    for (int i = 0; i < N_PREP; i++) {
        prep_case *p = &PREP[i];
        p->job = add_job("prep %s %s/prep%d.f32 %s/prep%d.rgb %s %lld %lld", fixture(p->file),
                         g_dir, i, g_dir, i, backend_name(p->backend), (long long)p->min_pixels,
                         (long long)p->max_pixels);
        if (p->cross_job == 0)
            p->cross_job =
                add_job("prep %s %s/cross%d.f32 %s/cross%d.rgb pil %lld %lld", fixture(p->file),
                        g_dir, i, g_dir, i, (long long)p->min_pixels, (long long)p->max_pixels);
    }
    for (int i = 0; i < N_RESIZE; i++)
        for (int b = 0; b < 2; b++)
            g_resize_job[i][b] =
                add_job("resize %s/dec0.rgb 451 300 %d %d %s %s/rs%d_%d.rgb", g_dir, RESIZE[i][0],
                        RESIZE[i][1], backend_name(b), g_dir, i, b);
    for (int i = 0; i < N_SMART; i++)
        g_smart_job[i] = add_job("smart %lld %lld %lld %lld %lld", (long long)SMART[i][0],
                                 (long long)SMART[i][1], (long long)SMART[i][2],
                                 (long long)SMART[i][3], (long long)SMART[i][4]);
    fclose(g_jobs);
    assert_true(g_njobs <= (int)(sizeof g_results / sizeof *g_results));

    snprintf(cmd, sizeof cmd, "%s '%s' run '%s'", PY, SCRIPT, jobs);
    if (tu_run(cmd, &out) != 0) fail_msg("pil_reference.py run failed:\n%s", out);
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        char *sp = strchr(line, ' ');
        if (!sp) continue;
        int no = atoi(line);
        if (no >= 0 && no < g_njobs) g_results[no] = strdup(sp + 1);
    }
    free(out);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    for (int i = 0; i < g_njobs; i++) free(g_results[i]);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// smart_resize

static void test_smart_resize_matches_python(void **state) {
    (void)state;
    for (int i = 0; i < N_SMART; i++) {
        const int64_t *s = SMART[i];
        int h = -1, w = -1;
        twn_err err = {{0}};
        int rc = twn_image_smart_resize((int)s[0], (int)s[1], (int)s[2], s[3], s[4], &h, &w, &err);
        const char *want = result(g_smart_job[i]);
        if (!strcmp(want, "error")) {
            if (rc != -1)
                fail_msg("smart_resize(%lld, %lld): expected an error", (long long)s[0],
                         (long long)s[1]);
            assert_non_null(strstr(err.msg, "aspect ratio"));
            continue;
        }
        char got[64];
        snprintf(got, sizeof got, "%d %d", h, w);
        if (rc != 0 || strcmp(got, want))
            fail_msg("smart_resize(%lld, %lld, %lld, %lld, %lld) = %s (rc %d: %s), python %s",
                     (long long)s[0], (long long)s[1], (long long)s[2], (long long)s[3],
                     (long long)s[4], got, rc, err.msg, want);
    }
    /* A few by hand: round-half-to-even and both branches. */
    int h, w;
    assert_int_equal(twn_image_smart_resize(48, 80, 32, 1, 1 << 24, &h, &w, NULL), 0);
    assert_int_equal(h, 64); /* 1.5 -> 2 */
    assert_int_equal(w, 64); /* 2.5 -> 2 */
    assert_int_equal(twn_image_smart_resize(300, 451, 32, 65536, 16777216, &h, &w, NULL), 0);
    assert_int_equal(h, 288);
    assert_int_equal(w, 448);
    assert_int_equal(twn_image_smart_resize(17, 23, 32, 65536, 16777216, &h, &w, NULL), 0);
    assert_int_equal(h, 224);
    assert_int_equal(w, 320);
    twn_err err = {{0}};
    expect_error(twn_image_smart_resize(100000, 1, 32, 65536, 16777216, &h, &w, &err), &err,
                 "image 1x100000: aspect ratio 100000 is over 200");
}

// ------------------------------------------------------------------------------------------------
// Decode

static void compare_decode(const char *file, int job, int exif) {
    twn_image_config c = cfg_default();
    c.apply_exif_orientation = exif;
    twn_rgb_image img;
    twn_err err = {{0}};
    if (twn_image_decode_file(fixture(file), &c, &img, &err) != 0)
        fail_msg("decode %s: %s", file, err.msg);
    int w, h;
    if (sscanf(result(job), "%d %d", &w, &h) != 2) fail_msg("job %d: %s", job, result(job));
    if (img.width != w || img.height != h)
        fail_msg("%s: decoded %dx%d, Pillow %dx%d", file, img.width, img.height, w, h);
    size_t n;
    char p[2048];
    if (job == g_decode_noexif_job)
        snprintf(p, sizeof p, "%s/dec_noexif.rgb", g_dir);
    else
        for (int i = 0; i < N_DECODE; i++)
            if (g_decode_job[i] == job) snprintf(p, sizeof p, "%s/dec%d.rgb", g_dir, i);
    uint8_t *ref = file_bytes(p, &n);
    assert_int_equal(n, (size_t)w * h * 3);
    size_t ndiff = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (ref[i] != img.rgb[i] && !ndiff++) first = i;
    if (ndiff)
        fail_msg("%s: %zu of %zu bytes differ from Pillow (first at pixel %zu: %d vs %d)", file,
                 ndiff, n, first / 3, img.rgb[first], ref[first]);
    free(ref);
    twn_rgb_image_free(&img);
}

static void test_decode_matches_pillow(void **state) {
    (void)state;
    for (int i = 0; i < N_DECODE; i++) compare_decode(DECODE_FILES[i], g_decode_job[i], 1);
    compare_decode("exif6.jpg", g_decode_noexif_job, 0);
}

static void test_decode_reports_format_and_orientation(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    twn_rgb_image img;
    twn_err err = {{0}};
    for (int o = 1; o <= 8; o++) {
        char f[32];
        snprintf(f, sizeof f, "exif%d.jpg", o);
        assert_int_equal(twn_image_decode_file(fixture(f), &c, &img, &err), 0);
        assert_int_equal(img.exif_orientation, o);
        assert_string_equal(img.format, "JPEG");
        /* 96x64 photo; 5..8 swap the sides */
        assert_int_equal(img.width, o >= 5 ? 64 : 96);
        assert_int_equal(img.height, o >= 5 ? 96 : 64);
        twn_rgb_image_free(&img);
    }
    assert_int_equal(twn_image_decode_file(fixture("exif6.png"), &c, &img, &err), 0);
    assert_int_equal(img.exif_orientation, 6);
    assert_string_equal(img.format, "PNG");
    twn_rgb_image_free(&img);
    assert_int_equal(twn_image_decode_file(fixture("exif8.webp"), &c, &img, &err), 0);
    assert_int_equal(img.exif_orientation, 8);
    assert_string_equal(img.format, "WebP");
    twn_rgb_image_free(&img);
}

// ------------------------------------------------------------------------------------------------
// The processor

static void test_preprocess_matches_reference(void **state) {
    (void)state;
    for (int i = 0; i < N_PREP; i++) {
        const prep_case *pc = &PREP[i];
        twn_image_config c = cfg_backend((twn_image_backend)pc->backend);
        c.min_pixels = pc->min_pixels;
        c.max_pixels = pc->max_pixels;
        twn_err err = {{0}};
        twn_rgb_image img, rs;
        if (twn_image_decode_file(fixture(pc->file), &c, &img, &err) != 0)
            fail_msg("%s: %s", pc->file, err.msg);
        int gt, gh, gw, rh, rw;
        if (sscanf(result(pc->job), "%d %d %d %d %d", &gt, &gh, &gw, &rh, &rw) != 5)
            fail_msg("job %d: %s", pc->job, result(pc->job));
        /* resized bytes */
        assert_int_equal(twn_image_resize(&img, rw, rh, c.backend, &rs, &err), 0);
        size_t n;
        uint8_t *ref;
        char p[2048];
        snprintf(p, sizeof p, "%s/prep%d.rgb", g_dir, i);
        ref = file_bytes(p, &n);
        assert_int_equal(n, (size_t)rw * rh * 3);
        for (size_t k = 0; k < n; k++)
            if (ref[k] != rs.rgb[k])
                fail_msg("%s (%s, %dx%d -> %dx%d): resized byte %zu is %d, reference %d", pc->file,
                         backend_name(pc->backend), img.width, img.height, rw, rh, k, rs.rgb[k],
                         ref[k]);
        free(ref);
        /* pixel_values */
        twn_image_patches pt;
        if (twn_image_preprocess(&img, &c, &pt, &err) != 0) fail_msg("%s: %s", pc->file, err.msg);
        assert_int_equal(pt.grid_t, gt);
        assert_int_equal(pt.grid_h, gh);
        assert_int_equal(pt.grid_w, gw);
        assert_int_equal(pt.n_patches, (int64_t)gt * gh * gw);
        assert_int_equal(pt.patch_dim, 1536);
        snprintf(p, sizeof p, "%s/prep%d.f32", g_dir, i);
        float *pv = (float *)file_bytes(p, &n);
        assert_int_equal(n, (size_t)pt.n_patches * pt.patch_dim * sizeof(float));
        if (memcmp(pv, pt.pixels, n) != 0) {
            size_t k = 0;
            while (pv[k] == pt.pixels[k]) k++;
            fail_msg("%s (%s): pixel_values[%zu][%zu] = %.9g, reference %.9g", pc->file,
                     backend_name(pc->backend), k / 1536, k % 1536, pt.pixels[k], pv[k]);
        }
        free(pv);
        /* torchvision path against Pillow's: the brief's tolerance, measured */
        if (pc->cross_job > 0) {
            snprintf(p, sizeof p, "%s/cross%d.rgb", g_dir, i);
            ref = file_bytes(p, &n);
            assert_int_equal(n, (size_t)rw * rh * 3);
            size_t ndiff = 0;
            int maxd = 0;
            for (size_t k = 0; k < n; k++) {
                int d = abs((int)ref[k] - rs.rgb[k]);
                ndiff += d != 0;
                if (d > maxd) maxd = d;
            }
            free(ref);
            if (maxd > 2 || ndiff * 100 > n)
                fail_msg("%s: torchvision vs Pillow resize: max diff %d, %zu of %zu differ",
                         pc->file, maxd, ndiff, n);
            snprintf(p, sizeof p, "%s/cross%d.f32", g_dir, i);
            pv = (float *)file_bytes(p, &n);
            double md = 0;
            for (size_t k = 0; k < n / sizeof(float); k++)
                md = fmax(md, fabs(pv[k] - pt.pixels[k]));
            free(pv);
            if (md > 2.0 / 255 / 0.5 + 1e-6)
                fail_msg("%s: pixel_values vs Pillow path differ by %g", pc->file, md);
        }
        twn_image_patches_free(&pt);
        twn_rgb_image_free(&rs);
        twn_rgb_image_free(&img);
    }
}

static void test_resize_matches_reference_at_any_size(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    twn_rgb_image img;
    twn_err err = {{0}};
    assert_int_equal(twn_image_decode_file(PHOTOS "/chelsea.png", &c, &img, &err), 0);
    assert_int_equal(img.width, 451);
    for (int i = 0; i < N_RESIZE; i++) {
        for (int b = 0; b < 2; b++) {
            const int ow = RESIZE[i][0], oh = RESIZE[i][1];
            (void)result(g_resize_job[i][b]);
            twn_rgb_image rs;
            assert_int_equal(twn_image_resize(&img, ow, oh, (twn_image_backend)b, &rs, &err), 0);
            char p[2048];
            snprintf(p, sizeof p, "%s/rs%d_%d.rgb", g_dir, i, b);
            size_t n;
            uint8_t *ref = file_bytes(p, &n);
            assert_int_equal(n, (size_t)ow * oh * 3);
            for (size_t k = 0; k < n; k++)
                if (ref[k] != rs.rgb[k])
                    fail_msg("451x300 -> %dx%d (%s): byte %zu is %d, reference %d", ow, oh,
                             backend_name(b), k, rs.rgb[k], ref[k]);
            free(ref);
            twn_rgb_image_free(&rs);
        }
    }
    twn_rgb_image_free(&img);
}

static void test_png_and_lossless_webp_give_identical_patches(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    twn_image_patches a, b;
    twn_err err = {{0}};
    assert_int_equal(twn_image_prepare_file(fixture("cat.png"), &c, &a, &err), 0);
    assert_int_equal(twn_image_prepare_file(fixture("cat_lossless.webp"), &c, &b, &err), 0);
    assert_int_equal(a.n_patches, 9 * 14 * 4); /* 288x448 -> 18x28 patches */
    assert_int_equal(b.n_patches, a.n_patches);
    assert_memory_equal(a.pixels, b.pixels, (size_t)a.n_patches * a.patch_dim * sizeof(float));
    twn_image_patches_free(&a);
    twn_image_patches_free(&b);
}

/* Row/column order on an image whose pixel values encode their position. */
static void test_patch_layout(void **state) {
    (void)state;
    const int W = 64, H = 96; /* already multiples of 32: no resize */
    twn_rgb_image img = {twn_try_alloc((size_t)W * H * 3), W, H, NULL, 1};
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int c = 0; c < 3; c++)
                img.rgb[(y * W + x) * 3 + c] = (uint8_t)((x + 3 * y + 50 * c) % 256);
    twn_image_config c = cfg_default();
    c.min_pixels = 1;
    twn_image_patches p;
    twn_err err = {{0}};
    assert_int_equal(twn_image_preprocess(&img, &c, &p, &err), 0);
    assert_int_equal(p.grid_t, 1);
    assert_int_equal(p.grid_h, 6);
    assert_int_equal(p.grid_w, 4);
    for (int64_t r = 0; r < p.n_patches; r++) {
        int blk = (int)(r / 4), in = (int)(r % 4);
        int bh = blk / 2, bw = blk % 2, ih = in / 2, iw = in % 2;
        int y0 = (bh * 2 + ih) * 16, x0 = (bw * 2 + iw) * 16;
        for (int col = 0; col < 1536; col++) {
            int ch = col / 512, y = (col / 16) % 16, x = col % 16; /* (c, t, y, x) */
            uint8_t v = img.rgb[((y0 + y) * W + x0 + x) * 3 + ch];
            float want = ((float)v - 127.5f) / 127.5f;
            if (p.pixels[r * 1536 + col] != want)
                fail_msg("row %lld col %d: %g, want %g", (long long)r, col,
                         p.pixels[r * 1536 + col], want);
        }
    }
    twn_image_patches_free(&p);
    twn_rgb_image_free(&img);
}

// ------------------------------------------------------------------------------------------------
// preprocessor_config.json

static void test_config_from_mkmodel_checkpoint(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("image_mkmodel");
    twn_err err = {{0}};
    if (twn_mkmodel_write(dir, "tiny", 1, TWN_DT_F32, NULL, &err) != 0)
        fail_msg("mkmodel: %s", err.msg);
    twn_image_config c;
    assert_int_equal(twn_image_config_load(&c, path_in(dir, "base/preprocessor_config.json"), &err),
                     0);
    assert_int_equal(c.min_pixels, 65536);
    assert_int_equal(c.max_pixels, 16777216);
    assert_int_equal(c.patch_size, 16);
    assert_int_equal(c.temporal_patch_size, 2);
    assert_int_equal(c.merge_size, 2);
    assert_true(c.mean[0] == 0.5f && c.std[2] == 0.5f);
    assert_true(fabs(c.rescale_factor - 1.0 / 255) < 1e-15);
    assert_int_equal(c.backend, TWN_IMAGE_BACKEND_TORCHVISION);
}

static void test_config_parse_and_errors(void **state) {
    (void)state;
    twn_image_config c;
    twn_err err = {{0}};
    const char *ok = "{\"min_pixels\": 1024, \"size\": {\"shortest_edge\": 3136, \"longest_edge\": "
                     "1003520}, \"patch_size\": 14, \"image_mean\": [0.48145466, 0.4578275, "
                     "0.40821073], \"image_std\": 0.25, \"image_processor_type\": "
                     "\"Qwen2VLImageProcessorPil\", \"do_normalize\": false}";
    assert_int_equal(twn_image_config_parse(&c, ok, strlen(ok), "p.json", &err), 0);
    assert_int_equal(c.min_pixels, 1024); /* top-level key overrides size */
    assert_int_equal(c.max_pixels, 1003520);
    assert_int_equal(c.patch_size, 14);
    assert_true(c.mean[1] == 0.4578275f && c.std[0] == 0.25f && c.std[2] == 0.25f);
    assert_int_equal(c.backend, TWN_IMAGE_BACKEND_PIL);
    assert_int_equal(c.do_normalize, 0);
    const struct {
        const char *json, *msg;
    } bad[] = {
        {"[1]", "p.json: expected a JSON object"},
        {"{\"patch_size\": \"16\"}", "p.json: patch_size must be an integer in [1, 1024]"},
        {"{\"patch_size\": 0}", "p.json: patch_size must be an integer in [1, 1024]"},
        {"{\"resample\": 2}", "p.json: resample = 2 is not supported; expected 3 (bicubic)"},
        {"{\"image_std\": [0.5, 0, 0.5]}", "p.json: image_std[1] = 0 is not a usable value"},
        {"{\"image_mean\": [0.5, 0.5]}", "p.json: image_mean must be a number or a list of 3"},
        {"{\"size\": {\"shortest_edge\": 100, \"longest_edge\": 10}}",
         "p.json: min pixels 100 is above max pixels 10"},
        {"{\"do_resize\": 1}", "p.json: do_resize must be true or false"},
        {"{\"rescale_factor\": -1}", "p.json: rescale_factor must be a positive number"},
        {"{", "p.json: invalid JSON at line"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        expect_error(twn_image_config_parse(&c, bad[i].json, strlen(bad[i].json), "p.json", &err),
                     &err, bad[i].msg);
    expect_error(twn_image_config_load(&c, "/nonexistent/preprocessor_config.json", &err), &err,
                 "/nonexistent/preprocessor_config.json");
}

// ------------------------------------------------------------------------------------------------
// Bad inputs: one clear message each, never a crash (the ASan build runs this too)

static void expect_decode_error(const void *b, size_t n, const twn_image_config *c,
                                const char *want) {
    twn_rgb_image img = {(uint8_t *)1, 1, 1, NULL, 0};
    twn_err err = {{0}};
    int rc = twn_image_decode_mem(b, n, "item-7", c, &img, &err);
    if (rc == 0)
        fail_msg("decoding %zu bytes succeeded (%dx%d); expected: %s", n, img.width, img.height,
                 want);
    expect_error(rc, &err, want);
    assert_null(img.rgb);
    if (strncmp(err.msg, "item-7: ", 8))
        fail_msg("message does not start with the name: %s", err.msg);
}

static void test_bad_magic_is_named(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    expect_decode_error("", 0, &c, "item-7: empty file (0 bytes); expected JPEG, PNG or WebP");
    expect_decode_error("GIF89a\1\0\1\0\0\0\0;", 14, &c,
                        "item-7: GIF is not supported; expected JPEG, PNG or WebP");
    expect_decode_error("BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0", 16, &c,
                        "item-7: BMP is not supported");
    expect_decode_error("II*\0\x08\0\0\0", 8, &c, "item-7: TIFF is not supported");
    expect_decode_error("\0\0\0\x1c"
                        "ftypavif\0\0\0\0",
                        16, &c, "item-7: AVIF is not supported");
    expect_decode_error("\0\0\0\x18"
                        "ftypheic\0\0\0\0",
                        16, &c, "item-7: HEIF is not supported");
    expect_decode_error("<!DOCTYPE html><html>404</html>", 31, &c, "item-7: HTML is not supported");
    expect_decode_error("<svg xmlns='http://www.w3.org/2000/svg'/>", 41, &c,
                        "item-7: SVG is not supported");
    expect_decode_error("RIFF\4\0\0\0WAVE", 12, &c, "item-7: RIFF (but not WebP) is not supported");
    expect_decode_error("hello world", 11, &c,
                        "item-7: unrecognized image format (first bytes 68 65 6c 6c 6f 20 77 6f); "
                        "expected JPEG, PNG or WebP");
}

static void test_truncated_files_are_refused(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    size_t n;
    uint8_t *jpg = file_bytes(PHOTOS "/rocket.jpg", &n);
    expect_decode_error(jpg, n / 2, &c,
                        "item-7: corrupt or truncated JPEG (640x427): Premature end");
    expect_decode_error(jpg, 3, &c, "item-7: not a readable JPEG header");
    expect_decode_error(jpg, 200, &c, "item-7: not a readable JPEG header");
    free(jpg);
    /* skimage's own truncated.jpg, which Pillow refuses ("Truncated File Read") */
    jpg = file_bytes(PHOTOS "/truncated.jpg", &n);
    twn_rgb_image img;
    twn_err err = {{0}};
    expect_error(twn_image_decode_mem(jpg, n, "truncated.jpg", &c, &img, &err), &err,
                 "truncated.jpg: ");
    free(jpg);
    uint8_t *png = file_bytes(PHOTOS "/chelsea.png", &n);
    expect_decode_error(png, n / 2, &c, "item-7: PNG data truncated after");
    expect_decode_error(png, 20, &c, "item-7: PNG data truncated after 16 of 20 bytes");
    free(png);
    uint8_t *webp = file_bytes(fixture("cat_lossy.webp"), &n);
    expect_decode_error(webp, n / 2, &c, "item-7: corrupt WebP (451x300): truncated data");
    expect_decode_error(webp, 16, &c, "item-7: not a readable WebP header");
    free(webp);
    uint8_t *anim = file_bytes(fixture("anim.webp"), &n);
    expect_decode_error(anim, n / 3, &c, "item-7: corrupt animated WebP");
    free(anim);
}

static void test_zero_size_and_bombs_are_refused_from_the_header(void **state) {
    (void)state;
    twn_image_config c = cfg_default();
    buf_t b = png_rgb(0, 5, NULL);
    expect_decode_error(b.p, b.n, &c,
                        "item-7: corrupt PNG: Invalid IHDR data (Image width is zero in IHDR)");
    free(b.p);
    b = png_rgb(60000, 60000, NULL);
    expect_decode_error(b.p, b.n, &c,
                        "item-7: PNG image is 60000x60000 = 3600000000 pixels, over the limit of "
                        "89478485 decoded pixels (max_decoded_pixels); refused before decoding");
    free(b.p);
    b = png_rgb(70000, 1, NULL);
    expect_decode_error(
        b.p, b.n, &c,
        "item-7: PNG image is 70000x1; sides over 65500 pixels are refused (max_side)");
    free(b.p);
    /* JPEG: patch the SOF of a real file to 60000x60000, and to height 0 */
    size_t n;
    uint8_t *jpg = file_bytes(PHOTOS "/rocket.jpg", &n);
    size_t sof = 0;
    for (size_t i = 2; i + 9 < n; i++)
        if (jpg[i] == 0xFF && (jpg[i + 1] == 0xC0 || jpg[i + 1] == 0xC2)) {
            sof = i;
            break;
        }
    assert_true(sof > 0);
    jpg[sof + 5] = 60000 >> 8, jpg[sof + 6] = 60000 & 255, jpg[sof + 7] = 60000 >> 8,
              jpg[sof + 8] = 60000 & 255;
    expect_decode_error(jpg, n, &c,
                        "item-7: JPEG image is 60000x60000 = 3600000000 pixels, over the limit");
    jpg[sof + 5] = jpg[sof + 6] = 0;
    expect_decode_error(jpg, n, &c, "item-7: not a readable JPEG header");
    free(jpg);
    /* WebP: the VP8L header of a real lossless file set to 16384x16384 (14-bit fields) */
    uint8_t *webp = file_bytes(fixture("cat_lossless.webp"), &n);
    assert_memory_equal(webp + 12, "VP8L", 4);
    assert_int_equal(webp[20], 0x2f);
    uint32_t v = (uint32_t)webp[21] | (uint32_t)webp[22] << 8 | (uint32_t)webp[23] << 16 |
                 (uint32_t)webp[24] << 24;
    v = (v & ~((1u << 28) - 1)) | 16383u | 16383u << 14;
    for (int i = 0; i < 4; i++) webp[21 + i] = (uint8_t)(v >> (8 * i));
    expect_decode_error(webp, n, &c,
                        "item-7: WebP image is 16384x16384 = 268435456 pixels, over the limit of "
                        "89478485 decoded pixels");
    free(webp);
    /* A small limit, to show it is the configured one that counts */
    c.max_decoded_pixels = 1000;
    uint8_t *cat = file_bytes(fixture("cat.png"), &n);
    expect_decode_error(cat, n, &c,
                        "item-7: PNG image is 451x300 = 135300 pixels, over the limit of 1000 "
                        "decoded pixels");
    free(cat);
}

/* 1 x 100000 is over max_side; 1 x 30000 decodes and the processor refuses its aspect ratio. */
static void test_extreme_aspect_ratios_are_refused(void **state) {
    (void)state;
    enum { N = 100000 };
    uint8_t *px = calloc(N * 3, 1);
    for (int i = 0; i < N * 3; i++) px[i] = (uint8_t)(i * 7);
    twn_image_config c = cfg_default();
    buf_t b = png_rgb(1, N, px);
    expect_decode_error(b.p, b.n, &c,
                        "item-7: PNG image is 1x100000; sides over 65500 pixels are refused "
                        "(max_side)");
    free(b.p);
    b = png_rgb(1, 30000, px);
    twn_rgb_image img;
    twn_err err = {{0}};
    if (twn_image_decode_mem(b.p, b.n, "tall.png", &c, &img, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(img.width, 1);
    assert_int_equal(img.height, 30000);
    assert_memory_equal(img.rgb, px, 30000 * 3);
    twn_rgb_image_free(&img);
    twn_image_patches p = {(float *)1, 1, 1, 1, 1, 1};
    expect_error(twn_image_prepare_mem(b.p, b.n, "tall.png", &c, &p, &err), &err,
                 "tall.png: image 1x30000: aspect ratio 30000 is over 200, which the reference "
                 "processor refuses");
    assert_null(p.pixels);
    free(b.p);
    free(px);
}

static void test_corrupt_jpeg_data_is_decoded_like_pillow_or_refused_when_strict(void **state) {
    (void)state;
    /* test_decode_matches_pillow compared corrupt_huffman.jpg byte for byte with Pillow. */
    twn_image_config c = cfg_default();
    c.jpeg_warnings_fatal = 1;
    size_t n;
    uint8_t *jpg = file_bytes(fixture("corrupt_huffman.jpg"), &n);
    expect_decode_error(jpg, n, &c,
                        "item-7: corrupt or truncated JPEG (640x427): Corrupt JPEG data");
    /* Corrupt and cut short: the first libjpeg warning is the corruption, yet it is truncated. */
    c.jpeg_warnings_fatal = 0;
    expect_decode_error(jpg, n * 3 / 4, &c, "item-7: corrupt or truncated JPEG (640x427): ");
    free(jpg);
}

static void test_crc_error_in_png_is_refused(void **state) {
    (void)state;
    uint8_t px[4 * 4 * 3] = {0};
    buf_t b = png_rgb(4, 4, px);
    b.p[8 + 8 + 13 + 1] ^= 1; /* IHDR CRC */
    twn_image_config c = cfg_default();
    expect_decode_error(b.p, b.n, &c, "item-7: corrupt PNG: IHDR: CRC error");
    free(b.p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smart_resize_matches_python),
        cmocka_unit_test(test_decode_matches_pillow),
        cmocka_unit_test(test_decode_reports_format_and_orientation),
        cmocka_unit_test(test_preprocess_matches_reference),
        cmocka_unit_test(test_resize_matches_reference_at_any_size),
        cmocka_unit_test(test_png_and_lossless_webp_give_identical_patches),
        cmocka_unit_test(test_patch_layout),
        cmocka_unit_test(test_config_from_mkmodel_checkpoint),
        cmocka_unit_test(test_config_parse_and_errors),
        cmocka_unit_test(test_bad_magic_is_named),
        cmocka_unit_test(test_truncated_files_are_refused),
        cmocka_unit_test(test_zero_size_and_bombs_are_refused_from_the_header),
        cmocka_unit_test(test_extreme_aspect_ratios_are_refused),
        cmocka_unit_test(test_corrupt_jpeg_data_is_decoded_like_pillow_or_refused_when_strict),
        cmocka_unit_test(test_crc_error_in_png_is_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
