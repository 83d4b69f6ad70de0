/* image_decode.c — JPEG (TurboJPEG), PNG (libpng) and WebP (libwebp) to RGB8, the way
 * transformers' load_image sees a file: PIL.Image.open → ImageOps.exif_transpose → convert("RGB").
 * The Pillow conventions reproduced here are listed in image.h; each converter below names the
 * Pillow mode/rawmode it mirrors.
 *
 * Defence: every decoder reads the dimensions from the header first and refuses sizes over
 * max_side / max_decoded_pixels before any pixel buffer exists; libpng gets the same limits and a
 * cap on ancillary-chunk memory; TurboJPEG limits progressive scans; the EXIF reader is a bounded
 * walk of IFD0 only.  Every message starts with the item's name. */
#define _GNU_SOURCE /* memmem */
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <turbojpeg.h>
#include <webp/decode.h>
#include <webp/demux.h>

#include "engine/image.h"
#include "util/fileio.h"
#include "util/mem.h"

/* An encoded image larger than this is refused before reading (a decodable image under the
 * default pixel limit is far smaller). */
#define IMAGE_MAX_FILE_BYTES ((size_t)1 << 30)
/* libpng: memory for one ancillary chunk (iCCP, zTXt, eXIf, ...) and how many it caches. */
#define PNG_CHUNK_MALLOC_MAX (8u << 20)
#define PNG_CHUNK_CACHE_MAX  1000

#define EXPECTED             "expected JPEG, PNG or WebP"

static const char *nm(const char *name) {
    return name && *name ? name : "image";
}

// ------------------------------------------------------------------------------------------------
// Format sniffing

typedef enum { FMT_UNKNOWN, FMT_JPEG, FMT_PNG, FMT_WEBP } fmt;

static int starts(const uint8_t *b, size_t n, const char *s, size_t k) {
    return n >= k && memcmp(b, s, k) == 0;
}

/* What a non-supported file looks like, or NULL. */
static const char *other_format(const uint8_t *b, size_t n) {
    if (starts(b, n, "GIF87a", 6) || starts(b, n, "GIF89a", 6)) return "GIF";
    if (starts(b, n, "BM", 2) && n >= 14) return "BMP";
    if (starts(b, n, "II*\0", 4) || starts(b, n, "MM\0*", 4)) return "TIFF";
    if (starts(b, n, "\0\0\1\0", 4)) return "ICO";
    if (n >= 12 && memcmp(b + 4, "ftyp", 4) == 0) {
        if (!memcmp(b + 8, "avif", 4) || !memcmp(b + 8, "avis", 4)) return "AVIF";
        if (!memcmp(b + 8, "heic", 4) || !memcmp(b + 8, "heix", 4) || !memcmp(b + 8, "mif1", 4) ||
            !memcmp(b + 8, "msf1", 4) || !memcmp(b + 8, "hevc", 4))
            return "HEIF";
        return "an ISO media file (MP4/MOV)";
    }
    if (starts(b, n, "\0\0\0\x0cjP  \r\n\x87\n", 12) || starts(b, n, "\xff\x4f\xff\x51", 4))
        return "JPEG 2000";
    if (starts(b, n, "\xff\x0a", 2) || starts(b, n, "\0\0\0\x0cJXL \r\n\x87\n", 12))
        return "JPEG XL";
    if (starts(b, n, "RIFF", 4)) return "RIFF (but not WebP)";
    if (starts(b, n, "8BPS", 4)) return "PSD";
    if (starts(b, n, "qoif", 4)) return "QOI";
    if (starts(b, n, "%PDF", 4)) return "PDF";
    if (starts(b, n, "\x76\x2f\x31\x01", 4)) return "OpenEXR";
    if (starts(b, n, "#?RADIANCE", 10) || starts(b, n, "#?RGBE", 6)) return "Radiance HDR";
    if (starts(b, n, "DDS ", 4)) return "DDS";
    if (n >= 2 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7') return "PNM";
    if (starts(b, n, "\x1f\x8b", 2)) return "gzip data";
    if (starts(b, n, "PK\x03\x04", 4)) return "a ZIP archive";
    /* Text: HTML error pages and SVG are common in scraped collections. */
    size_t i = 0;
    if (starts(b, n, "\xef\xbb\xbf", 3)) i = 3;
    while (i < n && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n')) i++;
    if (i < n && b[i] == '<') {
        const char *t = (const char *)b + i;
        size_t k = n - i;
        if ((k >= 4 && !strncasecmp(t, "<svg", 4)) ||
            (k >= 5 && !strncasecmp(t, "<?xml", 5) && memmem(t, k < 512 ? k : 512, "<svg", 4)))
            return "SVG";
        if ((k >= 9 && !strncasecmp(t, "<!doctype", 9)) || (k >= 5 && !strncasecmp(t, "<html", 5)))
            return "HTML";
        if (k >= 5 && !strncasecmp(t, "<?xml", 5)) return "XML";
    }
    return NULL;
}

static fmt sniff(const uint8_t *b, size_t n) {
    if (starts(b, n, "\xff\xd8\xff", 3)) return FMT_JPEG;
    if (starts(b, n, "\x89PNG\r\n\x1a\n", 8)) return FMT_PNG;
    if (n >= 12 && !memcmp(b, "RIFF", 4) && !memcmp(b + 8, "WEBP", 4)) return FMT_WEBP;
    return FMT_UNKNOWN;
}

static int refuse_format(const uint8_t *b, size_t n, const char *name, twn_err *err) {
    if (n == 0) return twn_err_set(err, "%s: empty file (0 bytes); " EXPECTED, nm(name));
    const char *what = other_format(b, n);
    if (what) return twn_err_set(err, "%s: %s is not supported; " EXPECTED, nm(name), what);
    char hex[3 * 8 + 1] = {0};
    size_t k = n < 8 ? n : 8, at = 0;
    for (size_t i = 0; i < k; i++) at += (size_t)snprintf(hex + at, 4, i ? " %02x" : "%02x", b[i]);
    return twn_err_set(err, "%s: unrecognized image format (first bytes %s); " EXPECTED, nm(name),
                       hex);
}

// ------------------------------------------------------------------------------------------------
// Limits, allocation

static int check_size(const char *name, const char *f, int64_t w, int64_t h,
                      const twn_image_config *c, twn_err *err) {
    if (w <= 0 || h <= 0)
        return twn_err_set(err, "%s: %s image has zero size (%lldx%lld)", nm(name), f, (long long)w,
                           (long long)h);
    if (w > c->max_side || h > c->max_side)
        return twn_err_set(err,
                           "%s: %s image is %lldx%lld; sides over %d pixels are refused "
                           "(max_side)",
                           nm(name), f, (long long)w, (long long)h, c->max_side);
    if (w * h > c->max_decoded_pixels)
        return twn_err_set(err,
                           "%s: %s image is %lldx%lld = %lld pixels, over the limit of %lld "
                           "decoded pixels (max_decoded_pixels); refused before decoding",
                           nm(name), f, (long long)w, (long long)h, (long long)(w * h),
                           (long long)c->max_decoded_pixels);
    return 0;
}

static uint8_t *alloc_rgb(const char *name, int w, int h, size_t bpp, twn_err *err) {
    size_t bytes = (size_t)w * (size_t)h * bpp; /* w*h <= max_decoded_pixels: no overflow */
    uint8_t *p = twn_try_alloc(bytes ? bytes : 1);
    if (!p)
        twn_err_set(err, "%s: cannot allocate %zu bytes for a %dx%d image", nm(name), bytes, w, h);
    return p;
}

// ------------------------------------------------------------------------------------------------
// EXIF orientation: IFD0 tag 0x0112 of a TIFF block ("Exif\0\0" prefix optional, as Pillow's
// Exif.load strips it).  Returns 1..8, 1 when absent or malformed.

static uint32_t rd16(const uint8_t *p, int le) {
    return le ? p[0] | p[1] << 8 : p[0] << 8 | p[1];
}
static uint32_t rd32(const uint8_t *p, int le) {
    return le ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24
              : (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int exif_orientation(const uint8_t *d, size_t n) {
    if (n >= 6 && !memcmp(d, "Exif\0\0", 6)) d += 6, n -= 6;
    if (n < 8) return 1;
    int le;
    if (d[0] == 'I' && d[1] == 'I')
        le = 1;
    else if (d[0] == 'M' && d[1] == 'M')
        le = 0;
    else
        return 1;
    if (rd16(d + 2, le) != 42) return 1;
    uint32_t off = rd32(d + 4, le);
    if (off > n || n - off < 2) return 1;
    uint32_t count = rd16(d + off, le);
    for (uint32_t i = 0; i < count; i++) {
        size_t e = (size_t)off + 2 + (size_t)i * 12;
        if (e + 12 > n) break;
        if (rd16(d + e, le) != 0x0112) continue;
        uint32_t type = rd16(d + e + 2, le), cnt = rd32(d + e + 4, le);
        if (cnt != 1) return 1; /* Pillow gets a tuple, which is no orientation */
        int64_t v;
        switch (type) {
        case 1:
            v = d[e + 8];
            break; /* BYTE */
        case 3:
            v = rd16(d + e + 8, le);
            break; /* SHORT */
        case 4:
            v = rd32(d + e + 8, le);
            break; /* LONG */
        case 8:
            v = (int16_t)rd16(d + e + 8, le);
            break; /* SSHORT */
        case 9:
            v = (int32_t)rd32(d + e + 8, le);
            break; /* SLONG */
        default:
            return 1;
        }
        return v >= 1 && v <= 8 ? (int)v : 1;
    }
    return 1;
}

/* First APP1 "Exif\0\0" segment before the first scan. */
static int jpeg_orientation(const uint8_t *b, size_t n) {
    size_t i = 2;
    while (i + 4 <= n) {
        if (b[i] != 0xFF) return 1;
        uint8_t m = b[i + 1];
        if (m == 0xFF) {
            i++;
            continue;
        }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) {
            i += 2;
            continue;
        }
        if (m == 0xDA || m == 0xD9) return 1;
        size_t len = (size_t)b[i + 2] << 8 | b[i + 3];
        if (len < 2 || len > n - i - 2) return 1;
        if (m == 0xE1 && len >= 8 && !memcmp(b + i + 4, "Exif\0\0", 6))
            return exif_orientation(b + i + 4, len - 2);
        i += 2 + len;
    }
    return 1;
}

/* Offset of the first top-level SOS marker, 0 if the segments end before one. */
static size_t jpeg_first_sos(const uint8_t *b, size_t n) {
    size_t i = 2;
    while (i + 4 <= n) {
        if (b[i] != 0xFF) return 0;
        uint8_t m = b[i + 1];
        if (m == 0xFF) {
            i++;
            continue;
        }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) {
            i += 2;
            continue;
        }
        if (m == 0xDA) return i;
        if (m == 0xD9) return 0;
        size_t len = (size_t)b[i + 2] << 8 | b[i + 3];
        if (len < 2 || len > n - i - 2) return 0;
        i += 2 + len;
    }
    return 0;
}

/* The "EXIF" chunk of a RIFF/WEBP container. */
static int webp_orientation(const uint8_t *b, size_t n) {
    size_t off = 12;
    while (off + 8 <= n) {
        uint32_t sz = rd32(b + off + 4, 1);
        if (sz > n - off - 8) return 1;
        if (!memcmp(b + off, "EXIF", 4)) return exif_orientation(b + off + 8, sz);
        off += 8 + (size_t)sz + (sz & 1);
    }
    return 1;
}

/* ImageOps.exif_transpose: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE,
 * 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90 (PIL rotations are counter-clockwise). */
static int apply_orientation(twn_rgb_image *img, int o, const char *name, twn_err *err) {
    if (o <= 1 || o > 8) return 0;
    const int W = img->width, H = img->height, swap = o >= 5;
    const int ow = swap ? H : W, oh = swap ? W : H;
    uint8_t *dst = alloc_rgb(name, ow, oh, 3, err);
    if (!dst) return -1;
    const uint8_t *src = img->rgb;
    for (int oy = 0; oy < oh; oy++) {
        uint8_t *d = dst + (size_t)oy * ow * 3;
        for (int ox = 0; ox < ow; ox++, d += 3) {
            int ix, iy;
            switch (o) {
            case 2:
                ix = W - 1 - ox, iy = oy;
                break;
            case 3:
                ix = W - 1 - ox, iy = H - 1 - oy;
                break;
            case 4:
                ix = ox, iy = H - 1 - oy;
                break;
            case 5:
                ix = oy, iy = ox;
                break;
            case 6:
                ix = oy, iy = H - 1 - ox;
                break;
            case 7:
                ix = W - 1 - oy, iy = H - 1 - ox;
                break;
            default:
                ix = W - 1 - oy, iy = ox;
                break; /* 8 */
            }
            const uint8_t *s = src + ((size_t)iy * W + ix) * 3;
            d[0] = s[0], d[1] = s[1], d[2] = s[2];
        }
    }
    twn_free(img->rgb);
    img->rgb = dst;
    img->width = ow;
    img->height = oh;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// JPEG

/* Pillow's MULDIV255 and cmyk2rgb (libImaging/Convert.c) on "CMYK;I" (inverted) input. */
static void cmyk_inverted_to_rgb(const uint8_t *in, uint8_t *out, size_t npix) {
    for (size_t i = 0; i < npix; i++, in += 4, out += 3) {
        int nk = in[3]; /* 255 - (255 - k) */
        for (int c = 0; c < 3; c++) {
            int tmp = (255 - in[c]) * nk + 128;
            int v = nk - (((tmp >> 8) + tmp) >> 8);
            out[c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

static int decode_jpeg(const uint8_t *b, size_t n, const char *name, const twn_image_config *c,
                       twn_rgb_image *out, twn_err *err) {
    if (n > (size_t)0xffffffffu)
        return twn_err_set(err, "%s: JPEG of %zu bytes is too large", nm(name), n);
    tjhandle tj = tjInitDecompress();
    if (!tj) return twn_err_set(err, "%s: cannot create a TurboJPEG decoder", nm(name));
    /* TurboJPEG 2.1 returns 0 without touching these when the header holds no frame. */
    int rc = -1, w = 0, h = 0, samp = -1, cs = -1;
    uint8_t *tmp = NULL;
    if (tjDecompressHeader3(tj, b, (unsigned long)n, &w, &h, &samp, &cs) != 0) {
        twn_err_set(err, "%s: not a readable JPEG header: %s", nm(name), tjGetErrorStr2(tj));
        goto done;
    }
    if (w <= 0 || h <= 0) { /* libjpeg ends a short header with a fake EOI: no frame */
        twn_err_set(err, "%s: not a readable JPEG header: no frame size (truncated or empty)",
                    nm(name));
        goto done;
    }
    if (check_size(name, "JPEG", w, h, c, err) != 0) goto done;
    const int cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
    uint8_t *rgb = alloc_rgb(name, w, h, 3, err);
    if (!rgb) goto done;
    out->rgb = rgb;
    uint8_t *dst = rgb;
    if (cmyk && !(dst = tmp = alloc_rgb(name, w, h, 4, err))) goto done;
    int flags = TJFLAG_LIMITSCANS | (c->jpeg_warnings_fatal ? TJFLAG_STOPONWARNING : 0);
    if (tjDecompress2(tj, b, (unsigned long)n, dst, w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB, flags) !=
        0) {
        const char *msg = tjGetErrorStr2(tj);
        /* Pillow ignores libjpeg warnings except running out of data ("image file is
         * truncated"), which libjpeg reports as "Premature end of JPEG file".  TurboJPEG keeps
         * only the first warning, so a file that is corrupt and also cut short is recognized by
         * the missing EOI marker (entropy-coded data cannot contain FF D9). */
        size_t sos = jpeg_first_sos(b, n);
        int truncated = strstr(msg, "Premature end") != NULL || !sos ||
                        !memmem(b + sos, n - sos, "\xff\xd9", 2);
        int fatal = tjGetErrorCode(tj) == TJERR_FATAL || c->jpeg_warnings_fatal || truncated;
        if (fatal) {
            twn_err_set(err, "%s: corrupt or truncated JPEG (%dx%d): %s", nm(name), w, h, msg);
            goto done;
        }
    }
    if (cmyk) cmyk_inverted_to_rgb(tmp, rgb, (size_t)w * h);
    out->width = w;
    out->height = h;
    out->format = "JPEG";
    out->exif_orientation = jpeg_orientation(b, n);
    rc = 0;
done:
    twn_free(tmp);
    tjDestroy(tj);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// PNG

typedef struct {
    const uint8_t *p;
    size_t n, off;
    const char *name;
    char msg[256], warn[256];
    int truncated, in_end;
    png_uint_32 w, h; /* set after setjmp, read after a longjmp: kept in memory */
    /* owned buffers, freed by the caller after a longjmp */
    uint8_t *row, *raw, *rgb;
} png_ctx;

static void png_read_cb(png_structp png, png_bytep out, size_t len) {
    png_ctx *s = png_get_io_ptr(png);
    if (len > s->n - s->off) {
        s->truncated = 1;
        png_error(png, "data ends early");
    }
    memcpy(out, s->p + s->off, len);
    s->off += len;
}

static void png_error_cb(png_structp png, png_const_charp msg) {
    png_ctx *s = png_get_error_ptr(png);
    snprintf(s->msg, sizeof s->msg, "%s", msg);
    png_longjmp(png, 1);
}

/* Warnings are not failures (Pillow reads such files too); the last one explains an error. */
static void png_warn_cb(png_structp png, png_const_charp msg) {
    png_ctx *s = png_get_error_ptr(png);
    snprintf(s->warn, sizeof s->warn, "%s", msg);
}

/* One decoded row (after png_set_packing: one byte per sample below 8 bits; 16-bit samples big
 * endian) to RGB8, as Pillow's PNG modes convert("RGB"):
 *   gray 1/2/4/8 ("1", "L;2", "L;4", "L"): v * 255/(2^bd - 1);  gray 16 ("I;16B"): min(v, 255);
 *   gray+alpha ("LA", "LA;16B"): high byte of L;  RGB(A) 8/16 ("RGB", "RGB;16B", "RGBA;16B"):
 *   high bytes, alpha dropped;  palette ("P"): the palette entry. */
static void png_row_to_rgb(const uint8_t *in, uint8_t *o, int w, int ct, int bd,
                           const uint8_t pal[256][3]) {
    const int bps = bd == 16 ? 2 : 1;
    switch (ct) {
    case PNG_COLOR_TYPE_GRAY:
        for (int x = 0; x < w; x++, o += 3) {
            unsigned v;
            if (bd == 16) {
                v = (unsigned)in[2 * x] << 8 | in[2 * x + 1];
                v = v > 255 ? 255 : v;
            } else {
                v = in[x] * (bd == 1 ? 255u : bd == 2 ? 85u : bd == 4 ? 17u : 1u);
            }
            o[0] = o[1] = o[2] = (uint8_t)v;
        }
        break;
    case PNG_COLOR_TYPE_GRAY_ALPHA:
        for (int x = 0; x < w; x++, o += 3) o[0] = o[1] = o[2] = in[2 * bps * x];
        break;
    case PNG_COLOR_TYPE_RGB:
    case PNG_COLOR_TYPE_RGB_ALPHA: {
        const int spp = ct == PNG_COLOR_TYPE_RGB ? 3 : 4;
        for (int x = 0; x < w; x++, o += 3) {
            const uint8_t *p = in + (size_t)x * spp * bps;
            o[0] = p[0], o[1] = p[bps], o[2] = p[2 * bps];
        }
        break;
    }
    default: /* palette */
        for (int x = 0; x < w; x++, o += 3) memcpy(o, pal[in[x]], 3);
        break;
    }
}

static int decode_png(const uint8_t *b, size_t n, const char *name, const twn_image_config *c,
                      twn_rgb_image *out, twn_err *err) {
    png_ctx s = {.p = b, .n = n, .name = name};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &s, png_error_cb, png_warn_cb);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_read_struct(png ? &png : NULL, NULL, NULL);
        return twn_err_set(err, "%s: cannot create a libpng decoder", nm(name));
    }
    int rc = -1;
    /* Only fields of `s` (memory) are written after setjmp, so they survive the longjmp. */
    if (setjmp(png_jmpbuf(png))) {
        if (s.in_end) goto finish; /* pixels complete; only trailing chunks were bad */
        if (s.truncated)
            twn_err_set(err, "%s: PNG data truncated after %zu of %zu bytes", nm(name), s.off, n);
        else if (s.warn[0])
            twn_err_set(err, "%s: corrupt PNG: %s (%s)", nm(name), s.msg, s.warn);
        else
            twn_err_set(err, "%s: corrupt PNG: %s", nm(name), s.msg);
        goto done;
    }
    png_set_read_fn(png, &s, png_read_cb);
    /* check_size below gives the message; libpng's own default limit (1e6) would come first. */
    png_set_user_limits(png, 0x7fffffffu, 0x7fffffffu);
    png_set_chunk_malloc_max(png, PNG_CHUNK_MALLOC_MAX);
    png_set_chunk_cache_max(png, PNG_CHUNK_CACHE_MAX);
    png_set_sig_bytes(png, 0);
    png_read_info(png, info);
    const png_uint_32 w = s.w = png_get_image_width(png, info);
    const png_uint_32 h = s.h = png_get_image_height(png, info);
    const int bd = png_get_bit_depth(png, info), ct = png_get_color_type(png, info);
    if (check_size(name, "PNG", w, h, c, err) != 0) goto done;
    /* Pillow's palette starts as grayscale 0..255; PLTE overwrites its first entries. */
    uint8_t pal[256][3];
    for (int i = 0; i < 256; i++) pal[i][0] = pal[i][1] = pal[i][2] = (uint8_t)i;
    if (ct == PNG_COLOR_TYPE_PALETTE) {
        png_colorp plte = NULL;
        int np = 0;
        if (!png_get_PLTE(png, info, &plte, &np)) {
            twn_err_set(err, "%s: corrupt PNG: palette image without PLTE", nm(name));
            goto done;
        }
        for (int i = 0; i < np && i < 256; i++)
            pal[i][0] = plte[i].red, pal[i][1] = plte[i].green, pal[i][2] = plte[i].blue;
    }
    if (bd < 8) png_set_packing(png);
    int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t rowbytes = png_get_rowbytes(png, info);
    if (!(s.rgb = alloc_rgb(name, (int)w, (int)h, 3, err))) goto done;
    if (passes > 1) {
        size_t total;
        if (twn_mul_size(rowbytes, h, &total) != 0 || !(s.raw = twn_try_alloc(total))) {
            twn_err_set(err, "%s: cannot allocate %zu x %u bytes for an interlaced PNG", nm(name),
                        rowbytes, (unsigned)h);
            goto done;
        }
        for (int pass = 0; pass < passes; pass++)
            for (png_uint_32 y = 0; y < h; y++)
                png_read_row(png, s.raw + (size_t)y * rowbytes, NULL);
        for (png_uint_32 y = 0; y < h; y++)
            png_row_to_rgb(s.raw + (size_t)y * rowbytes, s.rgb + (size_t)y * w * 3, (int)w, ct, bd,
                           (const uint8_t(*)[3])pal);
    } else {
        if (!(s.row = twn_try_alloc(rowbytes ? rowbytes : 1))) {
            twn_err_set(err, "%s: cannot allocate a PNG row of %zu bytes", nm(name), rowbytes);
            goto done;
        }
        for (png_uint_32 y = 0; y < h; y++) {
            png_read_row(png, s.row, NULL);
            png_row_to_rgb(s.row, s.rgb + (size_t)y * w * 3, (int)w, ct, bd,
                           (const uint8_t(*)[3])pal);
        }
    }
    /* Chunks after IDAT may hold eXIf (Pillow reads them too); their errors do not matter. */
    s.in_end = 1;
    png_read_end(png, info);
finish:;
    png_uint_32 nexif = 0;
    png_bytep exif = NULL;
    out->exif_orientation = 1;
    if (png_get_eXIf_1(png, info, &nexif, &exif) && exif)
        out->exif_orientation = exif_orientation(exif, nexif);
    out->rgb = s.rgb;
    s.rgb = NULL;
    out->width = (int)s.w;
    out->height = (int)s.h;
    out->format = "PNG";
    rc = 0;
done:
    twn_free(s.row);
    twn_free(s.raw);
    twn_free(s.rgb);
    png_destroy_read_struct(&png, &info, NULL);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// WebP

static const char *vp8_status(VP8StatusCode st) {
    switch (st) {
    case VP8_STATUS_OUT_OF_MEMORY:
        return "out of memory";
    case VP8_STATUS_INVALID_PARAM:
        return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR:
        return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE:
        return "unsupported feature";
    case VP8_STATUS_SUSPENDED:
        return "suspended";
    case VP8_STATUS_USER_ABORT:
        return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA:
        return "truncated data";
    default:
        return "error";
    }
}

static int decode_webp(const uint8_t *b, size_t n, const char *name, const twn_image_config *c,
                       twn_rgb_image *out, twn_err *err) {
    WebPBitstreamFeatures ft;
    VP8StatusCode st = WebPGetFeatures(b, n, &ft);
    if (st != VP8_STATUS_OK)
        return twn_err_set(err, "%s: not a readable WebP header: %s", nm(name), vp8_status(st));
    if (check_size(name, "WebP", ft.width, ft.height, c, err) != 0) return -1;
    uint8_t *rgb = alloc_rgb(name, ft.width, ft.height, 3, err);
    if (!rgb) return -1;
    const size_t npix = (size_t)ft.width * ft.height;
    if (!ft.has_animation) {
        if (!WebPDecodeRGBInto(b, n, rgb, npix * 3, ft.width * 3)) {
            /* WebPDecodeRGBInto does not say why; ask the full decoder. */
            WebPDecoderConfig cfg;
            const char *why = "corrupt data";
            if (WebPInitDecoderConfig(&cfg)) {
                cfg.output.colorspace = MODE_RGB;
                cfg.output.is_external_memory = 1;
                cfg.output.u.RGBA.rgba = rgb;
                cfg.output.u.RGBA.stride = ft.width * 3;
                cfg.output.u.RGBA.size = npix * 3;
                why = vp8_status(WebPDecode(b, n, &cfg));
                WebPFreeDecBuffer(&cfg.output);
            }
            twn_free(rgb);
            return twn_err_set(err, "%s: corrupt WebP (%dx%d): %s", nm(name), ft.width, ft.height,
                               why);
        }
    } else {
        /* Pillow opens WebP through WebPAnimDecoder (RGBA, canvas cleared to transparent black)
         * and shows frame 1; convert("RGB") then drops alpha. */
        WebPAnimDecoderOptions o;
        WebPAnimDecoder *dec = NULL;
        WebPAnimInfo ai;
        uint8_t *frame = NULL;
        int ts = 0;
        WebPData wd = {b, n};
        if (!WebPAnimDecoderOptionsInit(&o)) goto anim_fail;
        o.color_mode = MODE_RGBA;
        o.use_threads = 0;
        if (!(dec = WebPAnimDecoderNew(&wd, &o)) || !WebPAnimDecoderGetInfo(dec, &ai) ||
            (int)ai.canvas_width != ft.width || (int)ai.canvas_height != ft.height ||
            !WebPAnimDecoderGetNext(dec, &frame, &ts) || !frame)
            goto anim_fail;
        for (size_t i = 0; i < npix; i++) memcpy(rgb + 3 * i, frame + 4 * i, 3);
        WebPAnimDecoderDelete(dec);
        goto ok;
    anim_fail:
        WebPAnimDecoderDelete(dec);
        twn_free(rgb);
        return twn_err_set(err, "%s: corrupt animated WebP (%dx%d): cannot decode its first frame",
                           nm(name), ft.width, ft.height);
    }
ok:
    out->rgb = rgb;
    out->width = ft.width;
    out->height = ft.height;
    out->format = "WebP";
    out->exif_orientation = webp_orientation(b, n);
    return 0;
}

// ------------------------------------------------------------------------------------------------

int twn_image_decode_mem(const void *bytes, size_t n, const char *name, const twn_image_config *c,
                         twn_rgb_image *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    const uint8_t *b = bytes;
    if (!b && n) return twn_err_set(err, "%s: no data", nm(name));
    int rc;
    switch (sniff(b, n)) {
    case FMT_JPEG:
        rc = decode_jpeg(b, n, name, c, out, err);
        break;
    case FMT_PNG:
        rc = decode_png(b, n, name, c, out, err);
        break;
    case FMT_WEBP:
        rc = decode_webp(b, n, name, c, out, err);
        break;
    default:
        return refuse_format(b, n, name, err);
    }
    if (rc == 0 && c->apply_exif_orientation &&
        apply_orientation(out, out->exif_orientation, name, err) != 0)
        rc = -1;
    if (rc != 0) twn_rgb_image_free(out);
    return rc;
}

int twn_image_decode_file(const char *path, const twn_image_config *c, twn_rgb_image *out,
                          twn_err *err) {
    memset(out, 0, sizeof *out);
    char *data = NULL;
    size_t len = 0;
    if (twn_read_file(path, IMAGE_MAX_FILE_BYTES, &data, &len, err) != 0) return -1;
    int rc = twn_image_decode_mem(data, len, path, c, out, err);
    twn_free(data);
    return rc;
}
