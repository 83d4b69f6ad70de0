/* test_bad_input.c — bad input never stops a job: `twn run` over a small real corpus mixed with
 * one item of every bad kind, in JSONL form and in WebDataset tar form, with the tiny TWN model
 * and with the null engine.
 *
 * Good items: the first 30 items of scripts/make_sample_corpus.py (Noto Color Emoji PNGs with
 * and without captions, license paragraphs as text-only items) plus a real JPEG photo
 * (tests/data/images/rocket.jpg, 640x427) with and without text.
 *
 * Bad items, each must give exactly one dead-letter record with its ref (file + line for JSONL,
 * file + item index for tar), its stage and a reason that names the value and what was expected:
 *
 *   reader level (stage "parse", or "read" for what is not in the record itself; the same with
 *   any engine):
 *     a line that is not JSON / a .json member that is not JSON; JSON without "id" (JSONL only:
 *     a tar item without .json is named by its key); an id that is not a string or an integer;
 *     an id over 256 bytes; an item with neither text nor image (JSONL, tar); an "image" that is
 *     not a path; invalid UTF-8 in the text (JSONL line, tar .txt member); a missing image file
 *     (JSONL); over limits.max_item_bytes (256 KiB here): a JSONL line, an image file a JSONL
 *     line names, a tar item; a tar member whose header checksum is wrong (the span up to the
 *     next valid header is one bad item); two .txt members in one tar item; a tar cut in the
 *     middle of a member's data (stage "read").
 *   image decoding (stage "decode"; only an engine that decodes images can see them, so with
 *   --engine null these items are embedded like good ones, and the test asserts that too):
 *     random bytes named .png; a JPEG cut short; a PNG with a bad IDAT CRC; a PNG whose header
 *     claims 30000x30000 pixels (a decompression bomb, refused before any pixel buffer exists).
 *
 * Every reader-level reason is asserted in full, with the reader's prefix naming the file and
 * the line and byte (JSONL) or the item index, key and byte (tar) of the dead-letter ref.
 *
 * A duplicate id (two adjacent JSONL records "dup-1", both routed easy, in one unit and one gate
 * batch) is not a bad item: the index replaces by id (DESIGN.md: re-embedding the same id
 * replaces the old vector), so the id is in the shards once, with the LAST record's vector.  The
 * order only holds within one path: a copy routed hard reaches the index later through a worker,
 * so across paths the copy that arrives last wins.  The tar has a duplicate too (a .json id that
 * another item has): asserted once in the index, not which copy.
 *
 * Also asserted: every good item is in the shards exactly once, nothing else is; the summary
 * line counts every item and rejects exactly the bad ones; the job exits 0.  ~4 s. */
#define _GNU_SOURCE /* vasprintf */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/procs.h"

#define PHOTOS   TWN_SOURCE_DIR "/tests/data/images"
#define MAX_ITEM 262144 /* limits.max_item_bytes in every run */
#define N_SAMPLE 30     /* items from make_sample_corpus.py */
/* Two records with one id: emoji images the tiny model routes easy (asserted with twn embed) */
#define ID32       "iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii"
#define ID300      ID32 ID32 ID32 ID32 ID32 ID32 ID32 ID32 ID32 "iiiiiiiiiiii"
#define DUP_FIRST  "{\"id\": \"dup-1\", \"image\": \"images/02195.png\"}\n"
#define DUP_SECOND "{\"id\": \"dup-1\", \"image\": \"images/02196.png\"}\n"

// ------------------------------------------------------------------------------------------------
// Fixtures

static uint8_t *file_bytes(const char *path, size_t *n) {
    return (uint8_t *)tu_read(path, n);
}

static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return c ^ 0xffffffffu;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* A decompression bomb's header: signature, IHDR (w x h, 8-bit RGB), a small IDAT and IEND, all
 * CRCs valid: BOMB_BYTES bytes that claim a huge image. */
enum { BOMB_BYTES = 66 };
static void bomb_png(uint8_t out[BOMB_BYTES], uint32_t w, uint32_t h) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    static const uint8_t z[9] = {0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01};
    memcpy(out, sig, 8);
    be32(out + 8, 13);
    memcpy(out + 12, "IHDR", 4);
    be32(out + 16, w);
    be32(out + 20, h);
    out[24] = 8; /* bit depth */
    out[25] = 2; /* RGB */
    out[26] = out[27] = out[28] = 0;
    be32(out + 29, crc32_of(out + 12, 17));
    be32(out + 33, sizeof z);
    memcpy(out + 37, "IDAT", 4);
    memcpy(out + 41, z, sizeof z);
    be32(out + 50, crc32_of(out + 37, 4 + sizeof z));
    be32(out + 54, 0);
    memcpy(out + 58, "IEND", 4);
    be32(out + 62, crc32_of(out + 58, 4));
}

/* A copy of a real PNG whose first IDAT chunk has a wrong CRC (its data intact). */
static uint8_t *bad_crc_png(const uint8_t *png, size_t n) {
    uint8_t *b = malloc(n);
    memcpy(b, png, n);
    for (size_t o = 8; o + 12 <= n;) {
        uint32_t len =
            (uint32_t)b[o] << 24 | (uint32_t)b[o + 1] << 16 | (uint32_t)b[o + 2] << 8 | b[o + 3];
        if (!memcmp(b + o + 4, "IDAT", 4)) {
            assert_true(o + 12 + len <= n);
            b[o + 8 + len] ^= 0x55;
            return b;
        }
        o += 12 + len;
    }
    fail_msg("no IDAT chunk");
    return NULL;
}

/* Deterministic junk (LCG) that starts with bytes no image format uses. */
static void junk(uint8_t *b, size_t n) {
    uint32_t s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1103515245u + 12345u;
        b[i] = (uint8_t)(s >> 16);
    }
    b[0] = 0x13;
    b[1] = 0x37;
}

/* A growing byte buffer holding a ustar archive. */
typedef struct {
    uint8_t *b;
    size_t n;
} tarbuf;

static void tb_grow(tarbuf *t, size_t add) {
    t->b = realloc(t->b, t->n + add);
    memset(t->b + t->n, 0, add);
}

/* Appends one regular-file member; returns the offset of its header. */
static size_t tar_add(tarbuf *t, const char *name, const void *data, size_t n) {
    size_t pad = (n + 511) / 512 * 512, at = t->n;
    tb_grow(t, 512 + pad);
    uint8_t *h = t->b + at;
    snprintf((char *)h, 100, "%s", name);
    memcpy(h + 100, "0000644", 8);
    memcpy(h + 108, "0000000", 8);
    memcpy(h + 116, "0000000", 8);
    snprintf((char *)h + 124, 12, "%011lo", (unsigned long)n);
    memcpy(h + 136, "00000000000", 12);
    h[156] = '0';
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++) sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
    if (n) memcpy(h + 512, data, n);
    t->n += 512 + pad;
    return at;
}

static void tar_end(tarbuf *t) {
    tb_grow(t, 1024);
    t->n += 1024;
}

static void add_text(tarbuf *t, const char *key, const char *text) {
    char name[128];
    snprintf(name, sizeof name, "%s.txt", key);
    tar_add(t, name, text, strlen(text));
}

static void add_bin(tarbuf *t, const char *key, const char *ext, const void *d, size_t n) {
    char name[128];
    snprintf(name, sizeof name, "%s.%s", key, ext);
    tar_add(t, name, d, n);
}

// ------------------------------------------------------------------------------------------------
// Expectations

typedef struct {
    const char *file; /* base name of the source object */
    long where;       /* JSONL: 1-based line; tar: item index */
    const char *stage;
    const char *reason;  /* an exact substring of the reason */
    int decode;          /* 1: found only by an engine that decodes images */
    const char *null_id; /* decode items: the id the null engine indexes */
} bad_item;

enum { MAX_BAD = 32, MAX_GOOD = 128 };

typedef struct {
    char dir[1024], out[1024];
    char inputs[4][1200];
    int n_inputs;
    bad_item bad[MAX_BAD];
    int n_bad;
    char *good[MAX_GOOD];
    int n_good;
    int n_items; /* every item the planner counts, bad ones included */
} corpus;

static void add_bad(corpus *c, const char *file, long where, const char *stage, const char *reason,
                    int decode, const char *null_id) {
    assert_true(c->n_bad < MAX_BAD);
    c->bad[c->n_bad++] = (bad_item){file, where, stage, reason, decode, null_id};
}

static void add_good(corpus *c, const char *id) {
    assert_true(c->n_good < MAX_GOOD);
    c->good[c->n_good++] = strdup(id);
}

static void corpus_free(corpus *c) {
    for (int i = 0; i < c->n_good; i++) free(c->good[i]);
    for (int i = 0; i < c->n_bad; i++) free((char *)c->bad[i].reason);
}

/* The sample corpus (once per process): DIR/sample/items.jsonl, its images and one tar shard. */
static const char *sample_dir(void) {
    static char dir[1024];
    if (dir[0]) return dir;
    snprintf(dir, sizeof dir, "%s/sample", tu_tmpdir("bad-input-sample"));
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 %s/scripts/make_sample_corpus.py %s --items %d --tar-shards 1 "
             ">/dev/null",
             TWN_SOURCE_DIR, dir, N_SAMPLE);
    assert_int_equal(tu_run(cmd, NULL), 0);
    return dir;
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    char *s = NULL;
    va_list ap;
    va_start(ap, f);
    assert_true(vasprintf(&s, f, ap) >= 0);
    va_end(ap);
    return s;
}

/* The first PNG of the sample corpus (a real emoji bitmap). */
static uint8_t *sample_png(size_t *n) {
    char p[1200];
    snprintf(p, sizeof p, "%s/images/000A9.png", sample_dir());
    return file_bytes(p, n);
}

// ------------------------------------------------------------------------------------------------
// JSONL form

static void make_jsonl(corpus *c) {
    const char *dir = tu_tmpdir("bad-input-jsonl");
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "%s", dir);
    snprintf(c->out, sizeof c->out, "%s/out", dir);
    char cmd[4096], p[1200];
    snprintf(cmd, sizeof cmd, "cp -r %s/images %s/items.jsonl %s/", sample_dir(), sample_dir(),
             dir);
    assert_int_equal(tu_run(cmd, NULL), 0);
    snprintf(c->inputs[c->n_inputs++], sizeof c->inputs[0], "%s/items.jsonl", dir);
    const char *in = c->inputs[0];
    /* the good ids, from the sample corpus */
    json_t *items = tp_jsonl_read(in);
    assert_int_equal((int)json_array_size(items), N_SAMPLE);
    size_t i;
    json_t *it;
    json_array_foreach(items, i, it) add_good(c, json_string_value(json_object_get(it, "id")));
    json_decref(items);

    /* image fixtures */
    size_t n_png, n_jpg;
    uint8_t *png = sample_png(&n_png), *jpg = file_bytes(PHOTOS "/rocket.jpg", &n_jpg);
    snprintf(p, sizeof p, "%s/images/rocket.jpg", dir);
    tu_write(p, jpg, n_jpg);
    snprintf(p, sizeof p, "%s/images/cut.jpg", dir);
    tu_write(p, jpg, 30000);
    uint8_t *crc = bad_crc_png(png, n_png);
    snprintf(p, sizeof p, "%s/images/badcrc.png", dir);
    tu_write(p, crc, n_png);
    uint8_t j[2000], bomb[BOMB_BYTES];
    junk(j, sizeof j);
    snprintf(p, sizeof p, "%s/images/junk.png", dir);
    tu_write(p, j, sizeof j);
    bomb_png(bomb, 30000, 30000);
    snprintf(p, sizeof p, "%s/images/bomb.png", dir);
    tu_write(p, bomb, sizeof bomb);
    free(png);
    free(jpg);
    free(crc);

    FILE *f = fopen(in, "a");
    assert_non_null(f);
    long line = N_SAMPLE, off;
    const char *F = "items.jsonl";
/* the reader's prefix: "<file>: line N (byte B): " */
#define AT(rest, ...) fmt("%s: line %ld (byte %ld): " rest, in, line, off, ##__VA_ARGS__)
#define PUT(s)        (off = ftell(f), fputs(s, f), line++)
    /* good: a real JPEG photo with and without text */
    PUT("{\"id\": \"rocket-text\", \"text\": \"a rocket launch\", \"image\": "
        "\"images/rocket.jpg\"}\n");
    add_good(c, "rocket-text");
    PUT("{\"id\": \"rocket\", \"image\": \"images/rocket.jpg\"}\n");
    add_good(c, "rocket");
    PUT("this is not JSON\n");
    add_bad(c, F, line, "parse", AT("invalid JSON at column 4: '[' or '{' expected near 'this'"), 0,
            NULL);
    PUT("{\"text\": \"no id here\"}\n");
    add_bad(c, F, line, "parse",
            AT("no \"id\"; expected a string or an integer id (or derive_missing_id)"), 0, NULL);
    PUT("{\"id\": [1, 2], \"text\": \"an array id\"}\n");
    add_bad(c, F, line, "parse", AT("\"id\" is a JSON array; expected a string or an integer"), 0,
            NULL);
    PUT("{\"id\": \"" ID300 "\", \"text\": \"a long id\"}\n");
    add_bad(c, F, line, "parse", AT("\"id\" \"" ID32 "...\" is 300 bytes; the limit is 256"), 0,
            NULL);
    PUT("{\"id\": \"empty\", \"text\": \"\"}\n");
    add_bad(c, F, line, "parse",
            AT("the item has neither \"text\" nor \"image\"; expected at least one"), 0, NULL);
    PUT("{\"id\": \"img-int\", \"text\": \"t\", \"image\": 5}\n");
    add_bad(c, F, line, "parse",
            AT("\"image\" is a JSON integer; expected a path or a list of paths"), 0, NULL);
    PUT("{\"id\": \"utf8\", \"text\": \"caf\xff\"}\n");
    add_bad(c, F, line, "parse", AT("invalid UTF-8 at column 28 (byte 0xff); expected UTF-8 text"),
            0, NULL);
    PUT("{\"id\": \"ghost\", \"text\": \"a ghost\", \"image\": \"images/none.png\"}\n");
    add_bad(c, F, line, "read",
            fmt("item 'ghost': image '%s/images/none.png' cannot be read: No such file or "
                "directory",
                dir),
            0, NULL);
    PUT("{\"id\": \"junk\", \"text\": \"random bytes\", \"image\": \"images/junk.png\"}\n");
    add_bad(c, F, line, "decode",
            fmt("image: %s/images/junk.png: unrecognized image format (first bytes 13 37 %02x "
                "%02x %02x %02x %02x %02x); expected JPEG, PNG or WebP",
                dir, j[2], j[3], j[4], j[5], j[6], j[7]),
            1, "junk");
    PUT("{\"id\": \"cut-jpeg\", \"image\": \"images/cut.jpg\"}\n");
    add_bad(c, F, line, "decode",
            fmt("image: %s/images/cut.jpg: corrupt or truncated JPEG (640x427): Premature end of "
                "JPEG file",
                dir),
            1, "cut-jpeg");
    PUT("{\"id\": \"bad-crc\", \"text\": \"crc\", \"image\": \"images/badcrc.png\"}\n");
    add_bad(c, F, line, "decode",
            fmt("image: %s/images/badcrc.png: corrupt PNG: IDAT: CRC error", dir), 1, "bad-crc");
    PUT("{\"id\": \"bomb\", \"image\": \"images/bomb.png\"}\n");
    add_bad(c, F, line, "decode",
            fmt("image: %s/images/bomb.png: PNG image is 30000x30000 = 900000000 pixels, over "
                "the limit of 89478485 decoded pixels (max_decoded_pixels); refused before "
                "decoding",
                dir),
            1, "bomb");
    /* over limits.max_item_bytes: an image file (a real 1000x872 JPEG photo), a line */
    snprintf(p, sizeof p, "%s/images/hubble.jpg", dir);
    size_t n_hubble;
    uint8_t *hubble = file_bytes(PHOTOS "/hubble_deep_field.jpg", &n_hubble);
    assert_true(n_hubble > MAX_ITEM);
    tu_write(p, hubble, n_hubble);
    free(hubble);
    PUT("{\"id\": \"big-image\", \"text\": \"a big photo\", \"image\": \"images/hubble.jpg\"}\n");
    add_bad(c, F, line, "read",
            fmt("item 'big-image': image '%s/images/hubble.jpg' is %zu bytes; the limit is %d "
                "(limits.max_item_bytes)",
                dir, n_hubble, MAX_ITEM),
            0, NULL);
    size_t big = MAX_ITEM + 100;
    char *t = malloc(big + 32);
    int tl = snprintf(t, 32, "{\"id\": \"huge\", \"text\": \"");
    memset(t + tl, 'a', big);
    strcpy(t + tl + big, "\"}\n");
    PUT(t);
    free(t);
    add_bad(c, F, line, "parse",
            AT("the line is %zu bytes; the limit is %d", (size_t)tl + big + 2, MAX_ITEM), 0, NULL);
    /* a duplicate id: the later record wins */
    PUT(DUP_FIRST);
    PUT(DUP_SECOND);
    add_good(c, "dup-1");
    PUT("{\"id\": \"last\", \"text\": \"a good item after every bad one\"}\n");
    add_good(c, "last");
#undef AT
#undef PUT
    fclose(f);
    c->n_items = (int)line;
}

// ------------------------------------------------------------------------------------------------
// Tar form: the sample shard, a tar with bad members among good ones, and a truncated tar

static void make_tar(corpus *c) {
    const char *dir = tu_tmpdir("bad-input-tar");
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "%s", dir);
    snprintf(c->out, sizeof c->out, "%s/out", dir);
    char p[1200];
    snprintf(c->inputs[c->n_inputs++], sizeof c->inputs[0], "%s/shards/shard-00000.tar",
             sample_dir());
    snprintf(p, sizeof p, "%s/items.jsonl", sample_dir());
    json_t *items = tp_jsonl_read(p);
    size_t i;
    json_t *it;
    json_array_foreach(items, i, it) add_good(c, json_string_value(json_object_get(it, "id")));
    json_decref(items);
    snprintf(c->inputs[c->n_inputs++], sizeof c->inputs[0], "%s/bad.tar", dir);
    snprintf(c->inputs[c->n_inputs++], sizeof c->inputs[0], "%s/trunc.tar", dir);
    const char *bad_tar = c->inputs[1], *trunc_tar = c->inputs[2];

    size_t n_png, n_jpg;
    uint8_t *png = sample_png(&n_png), *jpg = file_bytes(PHOTOS "/rocket.jpg", &n_jpg);
    uint8_t *crc = bad_crc_png(png, n_png);
    uint8_t j[2000], bomb[BOMB_BYTES];
    junk(j, sizeof j);
    bomb_png(bomb, 30000, 30000);

    tarbuf t = {0};
    const char *F = "bad.tar";
    long idx = -1;
    size_t at = 0;
/* the reader's prefix: "<file>: item N '<key>' at byte B: " */
#define AT(key, rest, ...)                                                                         \
    fmt("%s: item %ld '%s' at byte %zu: " rest, bad_tar, idx, key, at, ##__VA_ARGS__)
#define ITEM() (at = t.n, idx++)
    ITEM(), add_bin(&t, "b/g0", "png", png, n_png), add_text(&t, "b/g0", "an emoji");
    add_good(c, "b/g0");
    ITEM(), add_bin(&t, "b/g1", "jpg", jpg, n_jpg);
    add_good(c, "b/g1");
    ITEM(), add_text(&t, "b/notjson", "x"), tar_add(&t, "b/notjson.json", "{not json", 9);
    add_bad(c, F, idx, "parse",
            AT("b/notjson",
               "member 'b/notjson.json': invalid JSON at line 1 column 4: string or '}' "
               "expected near 'not'"),
            0, NULL);
    ITEM(), tar_add(&t, "b/arrid.json", "{\"id\": [1]}", 11), add_text(&t, "b/arrid", "array id");
    add_bad(c, F, idx, "parse",
            AT("b/arrid", "member 'b/arrid.json': \"id\" is a JSON array; expected a string or "
                          "an integer"),
            0, NULL);
    ITEM(), add_text(&t, "b/utf8", "caf\xff");
    add_bad(c, F, idx, "parse",
            AT("b/utf8",
               "member 'b/utf8.txt' is not valid UTF-8 at byte 3 (0xff); expected UTF-8 text"),
            0, NULL);
    ITEM(), add_bin(&t, "b/junk", "png", j, sizeof j);
    add_bad(c, F, idx, "decode",
            fmt("image: b/junk.png: unrecognized image format (first bytes 13 37 %02x %02x %02x "
                "%02x %02x %02x); expected JPEG, PNG or WebP",
                j[2], j[3], j[4], j[5], j[6], j[7]),
            1, "b/junk");
    ITEM(), add_bin(&t, "b/cut", "jpg", jpg, 30000);
    add_bad(c, F, idx, "decode",
            fmt("image: b/cut.jpg: corrupt or truncated JPEG (640x427): Premature end of JPEG "
                "file"),
            1, "b/cut");
    ITEM(), add_bin(&t, "b/badcrc", "png", crc, n_png);
    add_bad(c, F, idx, "decode", fmt("image: b/badcrc.png: corrupt PNG: IDAT: CRC error"), 1,
            "b/badcrc");
    ITEM(), add_bin(&t, "b/bomb", "png", bomb, sizeof bomb);
    add_bad(c, F, idx, "decode",
            fmt("image: b/bomb.png: PNG image is 30000x30000 = 900000000 pixels, over the limit "
                "of 89478485 decoded pixels (max_decoded_pixels); refused before decoding"),
            1, "b/bomb");
    size_t big = MAX_ITEM + 100;
    char *bt = malloc(big + 1);
    memset(bt, 'a', big);
    bt[big] = 0;
    ITEM(), add_text(&t, "b/huge", bt);
    free(bt);
    add_bad(c, F, idx, "parse",
            AT("b/huge", "the item is %zu bytes; the limit is %d", t.n - at, MAX_ITEM), 0, NULL);
    ITEM();
    size_t h = tar_add(&t, "b/badsum.txt", "a member with a broken header", 29);
    t.b[h + 150] ^= 1; /* one checksum digit off */
    add_bad(c, F, idx, "parse",
            fmt("%s: item %ld at byte %zu: bad tar header checksum at byte %zu: the field says "
                "011200, the header sums to 010200 (octal); skipped 1024 bytes to the next valid "
                "header",
                bad_tar, idx, at, at),
            0, NULL);
    ITEM(), add_text(&t, "b/g2", "a good item after a bad header");
    add_good(c, "b/g2");
    ITEM(), tar_add(&t, "b/onlyjson.json", "{\"id\": \"b/only\"}", 16);
    add_bad(c, F, idx, "parse",
            AT("b/onlyjson",
               "the item has no text (.txt) and no image (.jpg/.png/.webp); expected at "
               "least one"),
            0, NULL);
    ITEM(), add_text(&t, "b/twotxt", "one text"), add_text(&t, "b/twotxt", "and another");
    add_bad(c, F, idx, "parse",
            AT("b/twotxt", "member 'b/twotxt.txt' appears twice; expected one .txt per item"), 0,
            NULL);
    /* a .json id that another item has: the id is indexed once (which copy wins depends on the
     * route each takes; see the JSONL test for the order within one path) */
    ITEM(), tar_add(&t, "b/again.json", "{\"id\": \"b/g2\"}", 14),
        add_text(&t, "b/again", "b/g2 once more");
    tar_end(&t);
    tu_write(bad_tar, t.b, t.n);
    free(t.b);
    c->n_items = N_SAMPLE + (int)idx + 1;
#undef AT
#undef ITEM

    /* truncated in the middle of a member's data */
    tarbuf u = {0};
    add_text(&u, "t/g0", "good before the cut"), add_good(c, "t/g0");
    add_bin(&u, "t/g1", "png", png, n_png), add_good(c, "t/g1");
    at = u.n;
    add_bin(&u, "t/cut", "jpg", jpg, n_jpg);
    tu_write(trunc_tar, u.b, at + 512 + 10000);
    free(u.b);
    add_bad(c, "trunc.tar", 2, "read",
            fmt("%s: item 2 't/cut' at byte %zu: member 't/cut.jpg' at byte %zu declares %zu "
                "bytes but the file ends after 10000",
                trunc_tar, at, at, n_jpg),
            0, NULL);
    c->n_items += 3;
    free(png);
    free(jpg);
    free(crc);
}

// ------------------------------------------------------------------------------------------------
// Running and checking

/* An integer field; read as a real when some integer of the line is above INT64_MAX (the unit
 * keys are u64), see tp_jsonl_read. */
static long long jint(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_integer(v) ? (long long)json_integer_value(v) : (long long)json_real_value(v);
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Runs the job; returns its log (free()).  engine: "twn" (tiny model) or "null". */
static char *run_job(const corpus *c, const char *engine, const char *out) {
    char cmd[8192];
    int o = snprintf(cmd, sizeof cmd,
                     "rm -rf %s && %s run --out %s --shards 2 --unit-items 64 "
                     "--gate.batch 64 --limits.max_item_bytes %d",
                     out, TWN_BIN, out, MAX_ITEM);
    if (!strcmp(engine, "null"))
        o += snprintf(cmd + o, sizeof cmd - (size_t)o, " --engine null --dim 16");
    else
        o += snprintf(cmd + o, sizeof cmd - (size_t)o, " --model %s", tu_tiny_model());
    for (int i = 0; i < c->n_inputs; i++)
        o += snprintf(cmd + o, sizeof cmd - (size_t)o, " --input %s", c->inputs[i]);
    snprintf(cmd + o, sizeof cmd - (size_t)o, " 2>&1");
    char *log = NULL;
    int rc = tu_run(cmd, &log);
    if (rc) fail_msg("twn run (%s) exited %d:\n%s", engine, rc, log);
    return log;
}

static void check_job(const corpus *c, const char *engine, const char *out, const char *log) {
    int null = !strcmp(engine, "null");
    int n_rej = 0;
    for (int i = 0; i < c->n_bad; i++) n_rej += !(null && c->bad[i].decode);
    char want[128];
    snprintf(want, sizeof want, "items %d ", c->n_items);
    if (!strstr(log, want)) fail_msg("%s: no \"%s\" in the summary:\n%s", engine, want, log);
    snprintf(want, sizeof want, "rejected %d ", n_rej);
    if (!strstr(log, want)) fail_msg("%s: no \"%s\" in the summary:\n%s", engine, want, log);

    char p[1200];
    snprintf(p, sizeof p, "%s/dead_letter.jsonl", out);
    json_t *dl = tp_jsonl_read(p);
    char *all = json_dumps(dl, JSON_INDENT(1));
    int *seen = calloc(json_array_size(dl) + 1, sizeof *seen);
    int bad = 0;
    for (int b = 0; b < c->n_bad; b++) {
        const bad_item *x = &c->bad[b];
        if (null && x->decode) continue;
        int hits = 0;
        size_t i;
        json_t *r;
        json_array_foreach(dl, i, r) {
            json_t *ref = json_object_get(r, "ref");
            const char *path = json_string_value(json_object_get(ref, "path"));
            long w = (long)jint(ref, strstr(x->file, ".tar") ? "index" : "line");
            if (!path || strcmp(base_name(path), x->file) || w != x->where) continue;
            hits++;
            seen[i]++;
            const char *stage = json_string_value(json_object_get(r, "stage"));
            const char *reason = json_string_value(json_object_get(r, "reason"));
            if (!stage || strcmp(stage, x->stage)) {
                fprintf(stderr, "%s: %s #%ld: stage %s, expected %s\n", engine, x->file, x->where,
                        stage, x->stage);
                bad++;
            }
            if (!reason || !strstr(reason, x->reason)) {
                fprintf(stderr, "%s: %s #%ld: reason \"%s\" lacks \"%s\"\n", engine, x->file,
                        x->where, reason, x->reason);
                bad++;
            }
        }
        if (hits != 1) {
            fprintf(stderr, "%s: %s #%ld (%s): %d dead-letter records, expected 1\n", engine,
                    x->file, x->where, x->reason, hits);
            bad++;
        }
    }
    for (size_t i = 0; i < json_array_size(dl); i++)
        if (seen[i] != 1) {
            fprintf(stderr, "%s: unexpected dead-letter record %zu\n", engine, i);
            bad++;
        }
    if (bad) {
        fprintf(stderr, "dead letters (%s):\n%s\n", engine, all);
        fail_msg("%s: %d mismatches in %s (see above)", engine, bad, p);
    }
    assert_int_equal((int)json_array_size(dl), n_rej);
    free(seen);
    free(all);
    json_decref(dl);

    /* every good item once (tp_shards_read fails on an id seen twice); with the null engine the
     * items only an image decoder can refuse are embedded too */
    tp_shards s = tp_shards_read(out, 2);
    int n_good = c->n_good;
    for (int i = 0; i < c->n_good; i++)
        if (!json_object_get(s.items, c->good[i]))
            fail_msg("%s: good item %s is not in the index", engine, c->good[i]);
    for (int b = 0; null && b < c->n_bad; b++) {
        if (!c->bad[b].decode) continue;
        n_good++;
        if (!json_object_get(s.items, c->bad[b].null_id))
            fail_msg("null: %s is not in the index", c->bad[b].null_id);
    }
    assert_int_equal(s.all.rows, n_good);
    assert_int_equal((int)json_object_size(s.items), n_good);
    tp_shards_free(&s);
}

// ------------------------------------------------------------------------------------------------
// Tests

static void test_jsonl(void **st) {
    corpus c;
    make_jsonl(&c);
    char *log = run_job(&c, "twn", c.out);
    check_job(&c, "twn", c.out, log);
    free(log);

    /* dup-1: the second record's vector (twn embed, same model) won */
    char in[1200], emb[1200], cmd[4096], p[1300];
    snprintf(in, sizeof in, "%s/dup.jsonl", c.dir);
    snprintf(emb, sizeof emb, "%s/dup-embed", c.dir);
    FILE *f = fopen(in, "w");
    fputs(DUP_FIRST, f);
    fputs(DUP_SECOND, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s embed --model %s --input %s --out %s 2>&1", TWN_BIN,
             tu_tiny_model(), in, emb);
    assert_int_equal(tu_run(cmd, NULL), 0);
    snprintf(p, sizeof p, "%s/embeddings.npy", emb);
    tp_mat ref = tp_npy_read(p);
    snprintf(p, sizeof p, "%s/items.jsonl", emb);
    json_t *ri = tp_jsonl_read(p);
    assert_int_equal(ref.rows, 2);
    for (int k = 0; k < 2; k++) /* easy both: neither waits for the worker, so order holds */
        assert_string_equal(
            json_string_value(json_object_get(json_array_get(ri, (size_t)k), "route")), "easy");
    tp_shards s = tp_shards_read(c.out, 2);
    int row = (int)json_integer_value(json_object_get(json_object_get(s.items, "dup-1"), "row"));
    double d_first = 0, d_second = 0;
    for (int k = 0; k < ref.dim; k++) {
        float v = s.all.v[(size_t)row * ref.dim + k];
        d_first = fmax(d_first, fabs(v - ref.v[k]));
        d_second = fmax(d_second, fabs(v - ref.v[ref.dim + k]));
    }
    if (!(d_second < 2e-3 && d_first > 1e-2))
        fail_msg("dup-1: max |diff| to the first record %g, to the second %g", d_first, d_second);
    json_decref(ri);
    twn_free(ref.v);
    tp_shards_free(&s);

    /* the null engine: the same reader-level rejects, decode-level items embedded */
    snprintf(p, sizeof p, "%s/out-null", c.dir);
    log = run_job(&c, "null", p);
    check_job(&c, "null", p, log);
    free(log);
    corpus_free(&c);
}

static void test_tar(void **st) {
    corpus c;
    make_tar(&c);
    char *log = run_job(&c, "twn", c.out);
    check_job(&c, "twn", c.out, log);
    free(log);
    char p[1300];
    snprintf(p, sizeof p, "%s/out-null", c.dir);
    log = run_job(&c, "null", p);
    check_job(&c, "null", p, log);
    free(log);
    corpus_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jsonl),
        cmocka_unit_test(test_tar),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
