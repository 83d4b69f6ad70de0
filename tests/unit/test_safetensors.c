/* test_safetensors.c — writer/reader round trips, sharded directories, and one test per way a
 * file can be corrupt, each asserting the exact message a user would see. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/safetensors.h"
#include "tests/testutil.h"
#include "util/mem.h"

static const char *in_dir(const char *dir, const char *name) {
    static char buf[4][2048];
    static int k = 0;
    char *p = buf[k++ % 4];
    snprintf(p, 2048, "%s/%s", dir, name);
    return p;
}

/* A hand-made file: u64 LE header length, the header as given (no padding), then data. */
static void write_raw(const char *path, const char *header, const void *data, size_t n) {
    size_t h = strlen(header);
    unsigned char *buf = malloc(8 + h + n + 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((unsigned long long)h >> (8 * i));
    memcpy(buf + 8, header, h);
    if (n) memcpy(buf + 8 + h, data, n);
    tu_write(path, buf, 8 + h + n);
    free(buf);
}

static void expect_error_contains(int rc, const twn_err *err, const char *want) {
    assert_int_equal(rc, -1);
    if (!strstr(err->msg, want)) fail_msg("error\n  %s\ndoes not contain\n  %s", err->msg, want);
}

static void expect_open_error(const char *path, const char *want) {
    twn_st_file *f = (twn_st_file *)1;
    twn_err err = {{0}};
    expect_error_contains(twn_st_open(path, &f, &err), &err, want);
    assert_null(f);
}

// ------------------------------------------------------------------------------------------------
// Round trips

static void test_round_trip(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_round_trip");
    const char *path = in_dir(dir, "model.safetensors");
    twn_err err = {{0}};
    twn_st_writer *w = twn_st_writer_new();

    const float a[6] = {1, -2.5f, 3.25f, 0, 1e-3f, -65504};
    const float h[4] = {1, -2, 0.5f, 65504};   /* exact in f16 */
    const float b[4] = {1, -3, 0.15625f, 256}; /* exact in bf16 */
    const int64_t scalar = -1234567890123ll;
    const unsigned char u[3] = {7, 0, 255};
    const int64_t s23[2] = {2, 3}, s4[1] = {4}, s22[2] = {2, 2}, s05[2] = {0, 5}, s3[1] = {3};
    assert_int_equal(twn_st_writer_add_f32(w, "a.f32", TWN_DT_F32, 2, s23, a, &err), 0);
    assert_int_equal(twn_st_writer_add_f32(w, "b.f16", TWN_DT_F16, 1, s4, h, &err), 0);
    assert_int_equal(twn_st_writer_add_f32(w, "c.bf16", TWN_DT_BF16, 2, s22, b, &err), 0);
    assert_int_equal(twn_st_writer_add(w, "d.scalar", TWN_DT_I64, 0, NULL, &scalar, &err), 0);
    assert_int_equal(twn_st_writer_add(w, "e.empty", TWN_DT_F32, 2, s05, NULL, &err), 0);
    assert_int_equal(twn_st_writer_add(w, "f.u8", TWN_DT_U8, 1, s3, u, &err), 0);
    twn_st_writer_meta(w, "format", "np");
    twn_st_writer_meta(w, "format", "pt"); /* overwrites */
    twn_st_writer_meta(w, "note", "round \"trip\"");
    assert_int_equal(twn_st_writer_bytes(w), 24 + 8 + 8 + 8 + 0 + 3);
    assert_int_equal(twn_st_writer_write(w, path, &err), 0);
    twn_st_writer_free(w);

    /* Header padded with spaces so the data starts on an 8-byte boundary. */
    size_t n;
    char *raw = tu_read(path, &n);
    unsigned long long hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | (unsigned char)raw[i];
    assert_int_equal(hl % 8, 0);
    assert_int_equal(n, 8 + hl + 51);
    assert_int_equal(raw[8], '{');
    size_t end = 8 + hl;
    while (raw[end - 1] == ' ') end--;
    assert_int_equal(raw[end - 1], '}');
    free(raw);

    twn_st_file *f;
    assert_int_equal(twn_st_open(path, &f, &err), 0);
    assert_string_equal(twn_st_path(f), path);
    assert_int_equal(twn_st_count(f), 6);
    const char *names[6] = {"a.f32", "b.f16", "c.bf16", "d.scalar", "e.empty", "f.u8"};
    for (size_t i = 0; i < 6; i++) {
        const twn_tensor *t = twn_st_at(f, i);
        assert_string_equal(t->name, names[i]);
        assert_ptr_equal(twn_st_find(f, names[i]), t);
        assert_int_equal((uintptr_t)t->data % twn_dtype_size(t->dtype), 0);
    }
    assert_null(twn_st_at(f, 6));
    assert_null(twn_st_find(f, "a"));
    assert_null(twn_st_find(f, "zzz"));

    float got[6];
    const twn_tensor *t = twn_st_find(f, "a.f32");
    assert_int_equal(t->dtype, TWN_DT_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->nbytes, 24);
    assert_int_equal(twn_tensor_to_f32(t, got, &err), 0);
    assert_memory_equal(got, a, sizeof a);

    t = twn_st_find(f, "b.f16");
    assert_int_equal(t->dtype, TWN_DT_F16);
    assert_int_equal(t->nbytes, 8);
    assert_int_equal(((const uint16_t *)t->data)[0], 0x3c00); /* 1.0 in f16 */
    assert_int_equal(twn_tensor_to_f32(t, got, &err), 0);
    assert_memory_equal(got, h, sizeof h);

    t = twn_st_find(f, "c.bf16");
    assert_int_equal(t->dtype, TWN_DT_BF16);
    assert_int_equal(((const uint16_t *)t->data)[0], 0x3f80); /* 1.0 in bf16 */
    assert_int_equal(twn_tensor_to_f32(t, got, &err), 0);
    assert_memory_equal(got, b, sizeof b);

    t = twn_st_find(f, "d.scalar");
    assert_int_equal(t->dtype, TWN_DT_I64);
    assert_int_equal(t->ndim, 0);
    assert_int_equal(twn_tensor_numel(t), 1);
    assert_int_equal(t->nbytes, 8);
    int64_t sv;
    memcpy(&sv, t->data, 8);
    assert_int_equal(sv, scalar);

    t = twn_st_find(f, "e.empty");
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 0);
    assert_int_equal(t->shape[1], 5);
    assert_int_equal(twn_tensor_numel(t), 0);
    assert_int_equal(t->nbytes, 0);

    t = twn_st_find(f, "f.u8");
    assert_int_equal(t->dtype, TWN_DT_U8);
    assert_memory_equal(t->data, u, 3);

    assert_string_equal(twn_st_metadata(f, "format"), "pt");
    assert_string_equal(twn_st_metadata(f, "note"), "round \"trip\"");
    assert_null(twn_st_metadata(f, "missing"));
    twn_st_close(f);

    /* The same file as a model directory. */
    twn_st_set *s;
    assert_int_equal(twn_st_set_open_dir(dir, &s, &err), 0);
    assert_int_equal(twn_st_set_count(s), 6);
    assert_string_equal(twn_st_set_at(s, 3)->name, "d.scalar");
    assert_string_equal(twn_st_set_file_of(s, "f.u8"), path);
    assert_null(twn_st_set_find(s, "nope"));
    assert_null(twn_st_set_file_of(s, "nope"));
    twn_st_set_close(s);
}

/* An empty writer makes the smallest valid file: "{}" padded to 8 bytes. */
static void test_empty_file(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_empty"), "empty.safetensors");
    twn_err err = {{0}};
    twn_st_writer *w = twn_st_writer_new();
    assert_int_equal(twn_st_writer_write(w, path, &err), 0);
    twn_st_writer_free(w);
    size_t n;
    char *raw = tu_read(path, &n);
    assert_int_equal(n, 16);
    assert_memory_equal(raw, "\x08\0\0\0\0\0\0\0{}      ", 16);
    free(raw);
    twn_st_file *f;
    assert_int_equal(twn_st_open(path, &f, &err), 0);
    assert_int_equal(twn_st_count(f), 0);
    assert_null(twn_st_metadata(f, "format"));
    twn_st_close(f);
}

/* A legal file whose F32 tensor sits at an odd offset gets an aligned copy. */
static void test_misaligned_tensor_is_realigned(void **state) {
    (void)state;
    const char *hdr = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]}}";
    size_t h = strlen(hdr);
    unsigned char *buf = twn_try_alloc(8 + h + 9);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(h >> (8 * i));
    memcpy(buf + 8, hdr, h);
    const float v[2] = {1.5f, -7};
    buf[8 + h] = 42;
    memcpy(buf + 8 + h + 1, v, 8);
    twn_st_file *f;
    twn_err err = {{0}};
    assert_int_equal(twn_st_open_mem(buf, 8 + h + 9, "mem.safetensors", &f, &err), 0);
    assert_string_equal(twn_st_path(f), "mem.safetensors");
    const twn_tensor *a = twn_st_find(f, "a"), *b = twn_st_find(f, "b");
    assert_ptr_equal(a->data, buf + 8 + h); /* borrowed, not copied */
    assert_int_equal((uintptr_t)b->data % 4, 0);
    assert_memory_equal(b->data, v, 8);
    twn_st_close(f);
    twn_free(buf);
}

static void write_shards(const char *dir) {
    twn_err err = {{0}};
    const float w0[2] = {0.5f, -1}, b0[2] = {2, 3}, lm[4] = {1, 2, 3, 4};
    const int64_t s2[1] = {2}, s22[2] = {2, 2};
    twn_st_writer *w = twn_st_writer_new();
    assert_int_equal(twn_st_writer_add_f32(w, "layer.0.w", TWN_DT_F32, 1, s2, w0, &err), 0);
    assert_int_equal(twn_st_writer_add_f32(w, "layer.0.b", TWN_DT_BF16, 1, s2, b0, &err), 0);
    assert_int_equal(twn_st_writer_write(w, in_dir(dir, "model-00001-of-00002.safetensors"), &err),
                     0);
    twn_st_writer_free(w);
    w = twn_st_writer_new();
    assert_int_equal(twn_st_writer_add_f32(w, "lm_head.weight", TWN_DT_F32, 2, s22, lm, &err), 0);
    assert_int_equal(twn_st_writer_write(w, in_dir(dir, "model-00002-of-00002.safetensors"), &err),
                     0);
    twn_st_writer_free(w);
}

static void write_index(const char *dir, const char *weight_map) {
    char json[2048];
    snprintf(json, sizeof json, "{\"metadata\": {\"total_size\": 28}, \"weight_map\": {%s}}",
             weight_map);
    tu_write(in_dir(dir, "model.safetensors.index.json"), json, strlen(json));
}

#define MAP_OK                                                                                     \
    "\"layer.0.w\": \"model-00001-of-00002.safetensors\", "                                        \
    "\"layer.0.b\": \"model-00001-of-00002.safetensors\", "                                        \
    "\"lm_head.weight\": \"model-00002-of-00002.safetensors\""

static void test_sharded_dir(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_sharded");
    twn_err err = {{0}};
    write_shards(dir);
    write_index(dir, MAP_OK);
    /* A stray single file next to the index must be ignored: the index wins. */
    twn_st_writer *w = twn_st_writer_new();
    const int64_t s1[1] = {1};
    const float one = 1;
    assert_int_equal(twn_st_writer_add_f32(w, "decoy", TWN_DT_F32, 1, s1, &one, &err), 0);
    assert_int_equal(twn_st_writer_write(w, in_dir(dir, "model.safetensors"), &err), 0);
    twn_st_writer_free(w);

    twn_st_set *s;
    if (twn_st_set_open_dir(dir, &s, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(twn_st_set_count(s), 3);
    assert_string_equal(twn_st_set_at(s, 0)->name, "layer.0.b");
    assert_string_equal(twn_st_set_at(s, 1)->name, "layer.0.w");
    assert_string_equal(twn_st_set_at(s, 2)->name, "lm_head.weight");
    assert_null(twn_st_set_at(s, 3));
    assert_null(twn_st_set_find(s, "decoy"));
    assert_string_equal(twn_st_set_file_of(s, "layer.0.b"),
                        in_dir(dir, "model-00001-of-00002.safetensors"));
    assert_string_equal(twn_st_set_file_of(s, "lm_head.weight"),
                        in_dir(dir, "model-00002-of-00002.safetensors"));
    float got[4];
    const twn_tensor *t = twn_st_set_find(s, "lm_head.weight");
    assert_int_equal(twn_tensor_to_f32(t, got, &err), 0);
    assert_true(got[0] == 1 && got[3] == 4);
    t = twn_st_set_find(s, "layer.0.b");
    assert_int_equal(t->dtype, TWN_DT_BF16);
    assert_int_equal(twn_tensor_to_f32(t, got, &err), 0);
    assert_true(got[0] == 2 && got[1] == 3);
    twn_st_set_close(s);
}

// ------------------------------------------------------------------------------------------------
// Corrupt files: one test each, with the message a user sees

static void test_truncated_file(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_truncated"), "model.safetensors");
    twn_err err = {{0}};
    const float v[4] = {1, 2, 3, 4};
    const int64_t s4[1] = {4};
    twn_st_writer *w = twn_st_writer_new();
    assert_int_equal(twn_st_writer_add_f32(w, "x", TWN_DT_F32, 1, s4, v, &err), 0);
    assert_int_equal(twn_st_writer_write(w, path, &err), 0);
    twn_st_writer_free(w);
    size_t n;
    char *raw = tu_read(path, &n);
    tu_write(path, raw, n - 3);
    free(raw);
    expect_open_error(path, "model.safetensors: tensor data ends at byte 16 of the data buffer, "
                            "but the file has only 13 bytes after the header (truncated?)");
    tu_write(path, "\x10\0\0\0", 4);
    expect_open_error(path, "model.safetensors: file is 4 bytes, too short for the 8-byte header "
                            "length");
}

static void test_header_length_past_eof(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_hdr_eof"), "model.safetensors");
    tu_write(path, "\xe8\x03\0\0\0\0\0\0{}", 10); /* claims 1000 header bytes */
    expect_open_error(
        path, "model.safetensors: header length 1000 runs past the end of the file (10 bytes)");
    tu_write(path, "\x00\xc2\xeb\x0b\0\0\0\0{}", 10); /* 200,000,000 */
    expect_open_error(path, "header length 200000000 is over the 100000000-byte limit");
}

static void test_overlapping_offsets(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_overlap"), "model.safetensors");
    char data[16] = {0};
    write_raw(path,
              "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
              "\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}",
              data, 16);
    expect_open_error(path, "model.safetensors: tensor \"b\" data_offsets [8, 16] overlaps tensor "
                            "\"a\" data_offsets [0, 12]");
}

static void test_gap(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_gap"), "model.safetensors");
    char data[20] = {0};
    write_raw(path,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
              data, 20);
    expect_open_error(path, "model.safetensors: gap of 4 bytes before tensor \"b\" data_offsets "
                            "[12, 20] (the previous data ends at 8)");
}

static void test_wrong_byte_length(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_len"), "model.safetensors");
    char data[12] = {0};
    write_raw(path, "{\"x\":{\"dtype\":\"BF16\",\"shape\":[2,4],\"data_offsets\":[0,12]}}", data,
              12);
    expect_open_error(
        path, "model.safetensors: tensor \"x\" data_offsets [0, 12] is 12 bytes, but BF16 [2, 4] "
              "needs 16");
}

static void test_unknown_dtype(void **state) {
    (void)state;
    const char *path = in_dir(tu_tmpdir("st_dtype"), "model.safetensors");
    char data[4] = {0};
    write_raw(path, "{\"x\":{\"dtype\":\"F12\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4);
    expect_open_error(path, "model.safetensors: tensor \"x\" has unknown dtype \"F12\"");
}

static void test_non_object_header(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_nonobj");
    write_raw(in_dir(dir, "a.safetensors"), "[1, 2]", NULL, 0);
    expect_open_error(in_dir(dir, "a.safetensors"),
                      "a.safetensors: header is a JSON array, not an object");
    write_raw(in_dir(dir, "b.safetensors"), "{\"x\": ", NULL, 0);
    expect_open_error(in_dir(dir, "b.safetensors"), "b.safetensors: header is not valid JSON");
    write_raw(in_dir(dir, "c.safetensors"), "{\"x\": 1, \"x\": 2}", NULL, 0);
    expect_open_error(in_dir(dir, "c.safetensors"), "duplicate object key");
}

/* The other per-entry checks, via the in-memory entry point. */
static void test_bad_entries(void **state) {
    (void)state;
    static const struct {
        const char *header;
        size_t datalen;
        const char *want;
    } cases[] = {
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2,-2],\"data_offsets\":[0,0]}}", 0,
         "m.st: tensor \"x\" shape[1] = -2 is negative"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
         "tensor \"x\" has 9 dims; at most 8 are supported"},
        {"{\"x\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
         "tensor \"x\" U8 [4294967296, 4294967296] has more bytes than fit in 64 bits"},
        {"{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,0]}}", 2,
         "tensor \"x\" data_offsets [2, 0] end before they begin"},
        {"{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0]}}", 2,
         "tensor \"x\" needs \"data_offsets\": [begin, end]"},
        {"{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 5,
         "m.st: 3 stray bytes after the last tensor (data ends at 2, the buffer holds 5)"},
        {"{\"x\":[1]}", 0, "tensor \"x\" is a JSON array, not an object"},
        {"{\"__metadata__\":{\"format\":1}}", 0,
         "m.st: __metadata__ \"format\" is a JSON integer, not a string"},
        {"{\"__metadata__\":[]}", 0, "__metadata__ is a JSON array, not an object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t h = strlen(cases[i].header), n = 8 + h + cases[i].datalen;
        unsigned char *buf = calloc(1, n);
        for (int k = 0; k < 8; k++) buf[k] = (unsigned char)(h >> (8 * k));
        memcpy(buf + 8, cases[i].header, h);
        twn_st_file *f = NULL;
        twn_err err = {{0}};
        expect_error_contains(twn_st_open_mem(buf, n, "m.st", &f, &err), &err, cases[i].want);
        assert_null(f);
        free(buf);
    }
}

static void test_missing_shard(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_missing_shard");
    write_shards(dir);
    remove(in_dir(dir, "model-00002-of-00002.safetensors"));
    write_index(dir, MAP_OK);
    twn_st_set *s = (twn_st_set *)1;
    twn_err err = {{0}};
    int rc = twn_st_set_open_dir(dir, &s, &err);
    expect_error_contains(rc, &err,
                          "model.safetensors.index.json: weight_map puts tensor \"lm_head.weight\" "
                          "in model-00002-of-00002.safetensors: cannot open ");
    expect_error_contains(rc, &err, "/model-00002-of-00002.safetensors: No such file or directory");
    assert_null(s);
}

static void test_weight_map_names_absent_tensor(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_absent_tensor");
    write_shards(dir);
    write_index(dir, MAP_OK ", \"z\": \"model-00001-of-00002.safetensors\"");
    twn_st_set *s = (twn_st_set *)1;
    twn_err err = {{0}};
    expect_error_contains(twn_st_set_open_dir(dir, &s, &err), &err,
                          "model.safetensors.index.json: weight_map puts tensor \"z\" in "
                          "model-00001-of-00002.safetensors, but that file has no tensor \"z\"");
    assert_null(s);

    write_index(dir, "\"layer.0.w\": \"../elsewhere.safetensors\"");
    expect_error_contains(twn_st_set_open_dir(dir, &s, &err), &err,
                          "weight_map entry \"layer.0.w\" must be a shard file name inside the "
                          "model directory");
    tu_write(in_dir(dir, "model.safetensors.index.json"), "{\"metadata\": {}}", 16);
    expect_error_contains(twn_st_set_open_dir(dir, &s, &err), &err,
                          "model.safetensors.index.json: no \"weight_map\" object");
}

static void test_empty_dir(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("st_empty_dir");
    twn_st_set *s;
    twn_err err = {{0}};
    expect_error_contains(twn_st_set_open_dir(dir, &s, &err), &err,
                          "neither model.safetensors.index.json nor model.safetensors exists");
    expect_open_error(in_dir(dir, "nope.safetensors"),
                      "cannot open " /* then the path and strerror */);
    expect_open_error(dir, "not a regular file");
}

static void test_writer_refuses(void **state) {
    (void)state;
    twn_err err = {{0}};
    twn_st_writer *w = twn_st_writer_new();
    const float v[2] = {1, 2};
    const int64_t s2[1] = {2}, neg[1] = {-1};
    assert_int_equal(twn_st_writer_add_f32(w, "x", TWN_DT_F32, 1, s2, v, &err), 0);
    expect_error_contains(twn_st_writer_add_f32(w, "x", TWN_DT_BF16, 1, s2, v, &err), &err,
                          "safetensors writer: tensor \"x\" added twice");
    expect_error_contains(twn_st_writer_add_f32(w, "y", TWN_DT_I64, 1, s2, v, &err), &err,
                          "cannot convert float32 to I64");
    expect_error_contains(twn_st_writer_add(w, "y", TWN_DT_U8, 1, neg, v, &err), &err,
                          "tensor \"y\" shape[0] = -1 is negative");
    expect_error_contains(twn_st_writer_add(w, "__metadata__", TWN_DT_U8, 0, NULL, v, &err), &err,
                          "\"__metadata__\" cannot be a tensor name");
    expect_error_contains(twn_st_writer_add(w, "bad\xff", TWN_DT_U8, 0, NULL, v, &err), &err,
                          "tensor name is not valid UTF-8");
    assert_int_equal(twn_st_writer_bytes(w), 8);
    expect_error_contains(twn_st_writer_write(w, "/nonexistent-dir/x.safetensors", &err), &err,
                          "cannot create /nonexistent-dir/x.safetensors.tmp.");
    twn_st_writer_free(w);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_misaligned_tensor_is_realigned),
        cmocka_unit_test(test_sharded_dir),
        cmocka_unit_test(test_truncated_file),
        cmocka_unit_test(test_header_length_past_eof),
        cmocka_unit_test(test_overlapping_offsets),
        cmocka_unit_test(test_gap),
        cmocka_unit_test(test_wrong_byte_length),
        cmocka_unit_test(test_unknown_dtype),
        cmocka_unit_test(test_non_object_header),
        cmocka_unit_test(test_bad_entries),
        cmocka_unit_test(test_missing_shard),
        cmocka_unit_test(test_weight_map_names_absent_tensor),
        cmocka_unit_test(test_empty_dir),
        cmocka_unit_test(test_writer_refuses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
