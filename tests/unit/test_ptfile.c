/* test_ptfile.c — the .pt reader and writer (engine/ptfile.c).
 *
 * Three kinds of evidence: round trips through our own writer; fixtures under tests/data/pt/
 * made by make_fixtures.py with CPython's real pickle module and stand-ins registered under
 * torch's names, so their opcodes are the ones torch.save emits (values asserted exactly); and
 * hostile files and hand-written pickles, each refused with a message naming the file and the
 * problem.  The writer is checked byte-for-byte against Python's pickle of the same tensors. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zip.h>

#include "engine/ptfile.h"
#include "engine/ptfile_internal.h"
#include "tests/testutil.h"
#include "util/fileio.h"
#include "util/mem.h"

#define FIX(name) TWN_SOURCE_DIR "/tests/data/pt/" name

/* ---------------------------------------------------------------------------------------- */
/* helpers */

static twn_pt_file *load_ok(const char *path) {
    twn_err err = {{0}};
    twn_pt_file *f = NULL;
    if (twn_pt_load(path, &f, &err) != 0) fail_msg("loading %s: %s", path, err.msg);
    assert_non_null(f);
    return f;
}

/* The load fails, *out stays NULL, and the message has `want` and the file's base name. */
static void expect_load_error(const char *path, const char *want) {
    twn_err err = {{0}};
    twn_pt_file *f = NULL;
    assert_int_equal(twn_pt_load(path, &f, &err), -1);
    assert_null(f);
    if (!strstr(err.msg, want)) fail_msg("error \"%s\" lacks \"%s\"", err.msg, want);
    const char *base = strrchr(path, '/');
    if (!strstr(err.msg, base ? base + 1 : path))
        fail_msg("error \"%s\" does not name the file %s", err.msg, path);
}

/* Checks name/dtype/shape of tensor i and returns it. */
static const twn_tensor *expect_tensor(const twn_pt_file *f, size_t i, const char *name,
                                       twn_dtype dt, int ndim, const int64_t *shape) {
    const twn_tensor *t = twn_pt_at(f, i);
    assert_non_null(t);
    assert_string_equal(t->name, name);
    assert_ptr_equal(twn_pt_find(f, name), t);
    if (t->dtype != dt)
        fail_msg("%s: dtype %s, expected %s", name, twn_dtype_name(t->dtype), twn_dtype_name(dt));
    assert_int_equal(t->ndim, ndim);
    for (int d = 0; d < ndim; d++) assert_int_equal(t->shape[d], shape[d]);
    assert_int_equal(t->nbytes, (size_t)twn_tensor_numel(t) * twn_dtype_size(dt));
    return t;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define EXPECT_DATA(t, type, ...)                                                                  \
    do {                                                                                           \
        const type want_[] = {__VA_ARGS__};                                                        \
        assert_int_equal((t)->nbytes, sizeof want_);                                               \
        assert_memory_equal((t)->data, want_, sizeof want_);                                       \
    } while (0)

static uint8_t *zip_entry(const char *path, const char *name, size_t *n) {
    int e = 0;
    zip_t *za = zip_open(path, ZIP_RDONLY, &e);
    assert_non_null(za);
    zip_stat_t st;
    if (zip_stat(za, name, 0, &st) != 0) fail_msg("%s has no entry %s", path, name);
    uint8_t *buf = malloc(st.size + 1);
    zip_file_t *zf = zip_fopen(za, name, 0);
    assert_non_null(zf);
    assert_int_equal(zip_fread(zf, buf, st.size), (zip_int64_t)st.size);
    zip_fclose(zf);
    zip_discard(za);
    *n = st.size;
    return buf;
}

static uint32_t le(const uint8_t *p, int k) {
    uint32_t v = 0;
    for (int i = 0; i < k; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

/* Walks the local headers: every record stored, no data descriptor, data on a 64-byte
 * boundary.  Returns the number of records. */
static int expect_aligned_records(const char *path) {
    size_t n;
    uint8_t *b = (uint8_t *)tu_read(path, &n);
    size_t pos = 0;
    int count = 0;
    while (pos + 30 <= n && !memcmp(b + pos, "PK\3\4", 4)) {
        uint32_t nl = le(b + pos + 26, 2), el = le(b + pos + 28, 2);
        assert_int_equal(le(b + pos + 6, 2) & 8, 0); /* no data descriptor */
        assert_int_equal(le(b + pos + 8, 2), 0);     /* stored */
        size_t data = pos + 30 + nl + el;
        if (data % 64)
            fail_msg("%s: record %.*s has its data at offset %zu", path, (int)nl, b + pos + 30,
                     data);
        pos = data + le(b + pos + 18, 4);
        count++;
    }
    assert_memory_equal(b + pos, "PK\1\2", 4); /* then the central directory */
    free(b);
    return count;
}

/* ---------------------------------------------------------------------------------------- */
/* round trips */

static void test_roundtrip_state_dict(void **state) {
    (void)state;
    float a[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
    uint16_t b[4], h[3];
    const float bf[4] = {1.0f, -2.0f, 0.5f, 3.0f}, hf[3] = {0.25f, -1.0f, 65504.0f};
    for (int i = 0; i < 4; i++) b[i] = twn_f32_to_bf16(bf[i]);
    for (int i = 0; i < 3; i++) h[i] = twn_f32_to_f16(hf[i]);
    int64_t l[3] = {-1, (int64_t)1 << 40, INT64_MIN};
    float s = 42.5f;
    uint8_t mask[2] = {1, 0};
    /* names deliberately not sorted: the file must keep insertion order */
    twn_tensor ts[] = {
        {.name = "z.last",
         .dtype = TWN_DT_F32,
         .ndim = 2,
         .shape = {2, 3},
         .data = a,
         .nbytes = 24},
        {.name = "a.bf16", .dtype = TWN_DT_BF16, .ndim = 1, .shape = {4}, .data = b, .nbytes = 8},
        {.name = "m.f16", .dtype = TWN_DT_F16, .ndim = 1, .shape = {3}, .data = h, .nbytes = 6},
        {.name = "i64", .dtype = TWN_DT_I64, .ndim = 1, .shape = {3}, .data = l, .nbytes = 24},
        {.name = "scalar", .dtype = TWN_DT_F32, .ndim = 0, .data = &s, .nbytes = 4},
        {.name = "empty", .dtype = TWN_DT_F32, .ndim = 2, .shape = {0, 5}, .nbytes = 0},
        {.name = "mask", .dtype = TWN_DT_BOOL, .ndim = 1, .shape = {2}, .data = mask, .nbytes = 2},
    };
    size_t n = sizeof ts / sizeof ts[0];
    char path[1024];
    snprintf(path, sizeof path, "%s/rt.pt", tu_tmpdir("ptfile_rt"));
    twn_err err = {{0}};
    if (twn_pt_write(path, ts, n, false, &err) != 0) fail_msg("%s", err.msg);

    twn_pt_file *f = load_ok(path);
    assert_false(twn_pt_is_bare(f));
    assert_int_equal(twn_pt_count(f), n);
    for (size_t i = 0; i < n; i++) {
        const twn_tensor *t = expect_tensor(f, i, ts[i].name, ts[i].dtype, ts[i].ndim, ts[i].shape);
        assert_int_equal(t->nbytes, ts[i].nbytes);
        if (t->nbytes) assert_memory_equal(t->data, ts[i].data, t->nbytes);
    }
    assert_null(twn_pt_find(f, "nope"));
    assert_null(twn_pt_at(f, n));
    float back[4];
    assert_int_equal(twn_tensor_to_f32(twn_pt_find(f, "a.bf16"), back, &err), 0);
    assert_memory_equal(back, bf, sizeof bf);
    twn_pt_free(f);
    assert_int_equal(expect_aligned_records(path), 4 + (int)n + 1);
}

static void test_roundtrip_bare(void **state) {
    (void)state;
    float v[3] = {0.5f, -0.25f, 8.0f};
    twn_tensor t = {.name = "ignored",
                    .dtype = TWN_DT_F32,
                    .ndim = 2,
                    .shape = {3, 1},
                    .data = v,
                    .nbytes = 12};
    char path[1024];
    snprintf(path, sizeof path, "%s/bare.pt", tu_tmpdir("ptfile_bare"));
    twn_err err = {{0}};
    if (twn_pt_write(path, &t, 1, true, &err) != 0) fail_msg("%s", err.msg);
    twn_pt_file *f = load_ok(path);
    assert_true(twn_pt_is_bare(f));
    assert_int_equal(twn_pt_count(f), 1);
    const twn_tensor *r = expect_tensor(f, 0, "", TWN_DT_F32, 2, SHAPE(3, 1));
    EXPECT_DATA(r, float, 0.5f, -0.25f, 8.0f);
    twn_pt_free(f);
}

/* 300 tensors push memo indices past 255 (LONG_BINPUT / LONG_BINGET), and a 70000-element
 * storage needs BININT for its numel. */
static void test_roundtrip_mem_many(void **state) {
    (void)state;
    enum { N = 300 };
    static twn_tensor ts[N + 1];
    static int32_t vals[N];
    static char names[N][16];
    for (int i = 0; i < N; i++) {
        vals[i] = i * 1000 - 7;
        snprintf(names[i], sizeof names[i], "layer.%d.w", i);
        ts[i] = (twn_tensor){.name = names[i],
                             .dtype = TWN_DT_I32,
                             .ndim = 1,
                             .shape = {1},
                             .data = &vals[i],
                             .nbytes = 4};
    }
    uint8_t *big = calloc(70000, 1);
    big[69999] = 9;
    ts[N] = (twn_tensor){.name = "big",
                         .dtype = TWN_DT_U8,
                         .ndim = 1,
                         .shape = {70000},
                         .data = big,
                         .nbytes = 70000};
    void *zip;
    size_t len;
    twn_err err = {{0}};
    if (twn_pt_write_mem(ts, N + 1, false, &zip, &len, &err) != 0) fail_msg("%s", err.msg);
    twn_pt_file *f = NULL;
    if (twn_pt_load_mem(zip, len, "mem.pt", &f, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(twn_pt_count(f), N + 1);
    for (int i = 0; i < N; i++) {
        const twn_tensor *t = expect_tensor(f, (size_t)i, names[i], TWN_DT_I32, 1, SHAPE(1));
        assert_int_equal(*(const int32_t *)t->data, vals[i]);
    }
    const twn_tensor *t = expect_tensor(f, N, "big", TWN_DT_U8, 1, SHAPE(70000));
    assert_memory_equal(t->data, big, 70000);
    twn_pt_free(f);
    twn_free(zip);
    free(big);
}

/* ---------------------------------------------------------------------------------------- */
/* writer layout and bytes */

static void test_writer_layout(void **state) {
    (void)state;
    float v[2] = {1, 2};
    int64_t w[1] = {3};
    twn_tensor ts[] = {
        {.name = "v", .dtype = TWN_DT_F32, .ndim = 1, .shape = {2}, .data = v, .nbytes = 8},
        {.name = "w", .dtype = TWN_DT_I64, .ndim = 0, .data = w, .nbytes = 8},
    };
    char path[1024];
    snprintf(path, sizeof path, "%s/my.model.pt", tu_tmpdir("ptfile_layout"));
    twn_err err = {{0}};
    if (twn_pt_write(path, ts, 2, false, &err) != 0) fail_msg("%s", err.msg);

    static const char *const want[] = {
        "my.model/data.pkl",  "my.model/.format_version", "my.model/.storage_alignment",
        "my.model/byteorder", "my.model/data/0",          "my.model/data/1",
        "my.model/version"};
    int e = 0;
    zip_t *za = zip_open(path, ZIP_RDONLY, &e);
    assert_non_null(za);
    assert_int_equal(zip_get_num_entries(za, 0), 7);
    for (int i = 0; i < 7; i++) {
        assert_string_equal(zip_get_name(za, (zip_uint64_t)i, 0), want[i]);
        zip_stat_t st;
        assert_int_equal(zip_stat_index(za, (zip_uint64_t)i, 0, &st), 0);
        assert_int_equal(st.comp_method, ZIP_CM_STORE);
    }
    zip_discard(za);
    static const struct {
        const char *name, *body;
    } small[] = {{"my.model/.format_version", "1"},
                 {"my.model/.storage_alignment", "64"},
                 {"my.model/byteorder", "little"},
                 {"my.model/version", "3\n"}};
    for (size_t i = 0; i < 4; i++) {
        size_t n;
        uint8_t *b = zip_entry(path, small[i].name, &n);
        assert_int_equal(n, strlen(small[i].body));
        assert_memory_equal(b, small[i].body, n);
        free(b);
    }
    size_t n;
    uint8_t *b = zip_entry(path, "my.model/data/1", &n);
    assert_int_equal(n, 8);
    assert_memory_equal(b, w, 8);
    free(b);
    assert_int_equal(expect_aligned_records(path), 7);
    /* the Python-made fixtures use the same padding scheme */
    assert_int_equal(expect_aligned_records(FIX("writer_ref.pt")), 11);
}

/* data.pkl of twn_pt_write == CPython's pickle of the same tensors as torch.save does it. */
static void test_writer_matches_python_pickle(void **state) {
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6}, d[6] = {0, 1, 2, 3, 4, 5}, e[1] = {7};
    uint16_t b[4] = {0x3F80, 0x4000, 0x4040, 0x4080};
    int64_t c = -5;
    twn_tensor ts[] = {
        {.name = "a", .dtype = TWN_DT_F32, .ndim = 2, .shape = {2, 3}, .data = a, .nbytes = 24},
        {.name = "b", .dtype = TWN_DT_BF16, .ndim = 1, .shape = {4}, .data = b, .nbytes = 8},
        {.name = "c", .dtype = TWN_DT_I64, .ndim = 0, .data = &c, .nbytes = 8},
        {.name = "d",
         .dtype = TWN_DT_F32,
         .ndim = 4,
         .shape = {2, 1, 3, 1},
         .data = d,
         .nbytes = 24},
        {.name = "e", .dtype = TWN_DT_F32, .ndim = 1, .shape = {1}, .data = e, .nbytes = 4},
    };
    const char *dir = tu_tmpdir("ptfile_pyref");
    char path[1024], bpath[1024];
    snprintf(path, sizeof path, "%s/writer_ref.pt", dir);
    snprintf(bpath, sizeof bpath, "%s/writer_bare_ref.pt", dir);
    twn_err err = {{0}};
    if (twn_pt_write(path, ts, 5, false, &err) != 0) fail_msg("%s", err.msg);
    uint16_t h[3] = {twn_f32_to_f16(1), twn_f32_to_f16(2), twn_f32_to_f16(3)};
    twn_tensor bt = {.dtype = TWN_DT_F16, .ndim = 1, .shape = {3}, .data = h, .nbytes = 6};
    if (twn_pt_write(bpath, &bt, 1, true, &err) != 0) fail_msg("%s", err.msg);

    static const struct {
        const char *ours, *ref, *entry;
    } cmp[] = {
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data.pkl"},
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data/0"},
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data/1"},
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data/2"},
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data/3"},
        {"writer_ref.pt", FIX("writer_ref.pt"), "writer_ref/data/4"},
        {"writer_bare_ref.pt", FIX("writer_bare_ref.pt"), "writer_bare_ref/data.pkl"},
        {"writer_bare_ref.pt", FIX("writer_bare_ref.pt"), "writer_bare_ref/data/0"},
    };
    for (size_t i = 0; i < sizeof cmp / sizeof cmp[0]; i++) {
        char ours[1100];
        snprintf(ours, sizeof ours, "%s/%s", dir, cmp[i].ours);
        size_t n1, n2;
        uint8_t *x = zip_entry(ours, cmp[i].entry, &n1),
                *y = zip_entry(cmp[i].ref, cmp[i].entry, &n2);
        if (n1 != n2 || memcmp(x, y, n1))
            fail_msg("%s differs from the Python reference", cmp[i].entry);
        free(x);
        free(y);
    }
}

static void test_writer_errors(void **state) {
    (void)state;
    uint16_t u[2] = {1, 2};
    float v[2] = {1, 2};
    const char *dir = tu_tmpdir("ptfile_werr");
    char path[1024];
    snprintf(path, sizeof path, "%s/x.pt", dir);
    twn_err err = {{0}};
    twn_tensor t = {
        .name = "u", .dtype = TWN_DT_U16, .ndim = 1, .shape = {2}, .data = u, .nbytes = 4};
    assert_int_equal(twn_pt_write(path, &t, 1, false, &err), -1);
    assert_non_null(strstr(err.msg, "no torch storage class"));
    assert_non_null(strstr(err.msg, "x.pt"));
    t = (twn_tensor){
        .name = "v", .dtype = TWN_DT_F32, .ndim = 1, .shape = {3}, .data = v, .nbytes = 8};
    assert_int_equal(twn_pt_write(path, &t, 1, false, &err), -1);
    assert_non_null(strstr(err.msg, "has 8 bytes"));
    twn_tensor two[2] = {
        {.name = "a", .dtype = TWN_DT_F32, .ndim = 1, .shape = {2}, .data = v, .nbytes = 8},
        {.name = "b", .dtype = TWN_DT_F32, .ndim = 1, .shape = {2}, .data = v, .nbytes = 8}};
    assert_int_equal(twn_pt_write(path, two, 2, true, &err), -1);
    assert_non_null(strstr(err.msg, "exactly one tensor"));
    assert_int_equal(twn_pt_write("/nonexistent-twn-dir/y.pt", two, 2, false, &err), -1);
    assert_non_null(strstr(err.msg, "/nonexistent-twn-dir/y.pt"));
    assert_false(twn_path_exists(path));
}

/* ---------------------------------------------------------------------------------------- */
/* torch-shaped fixtures */

static void test_fixture_state_dict(void **state) {
    (void)state;
    twn_pt_file *f = load_ok(FIX("state_dict.pt"));
    assert_false(twn_pt_is_bare(f));
    assert_int_equal(twn_pt_count(f), 12);
    const twn_tensor *t;
    t = expect_tensor(f, 0, "w.f32", TWN_DT_F32, 2, SHAPE(2, 3));
    EXPECT_DATA(t, float, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f);
    t = expect_tensor(f, 1, "w.bf16", TWN_DT_BF16, 1, SHAPE(3));
    EXPECT_DATA(t, uint16_t, 0x3F80, 0xC000, 0x3E80);
    t = expect_tensor(f, 2, "w.f16", TWN_DT_F16, 1, SHAPE(2));
    EXPECT_DATA(t, uint16_t, 0x3C00, 0xC400);
    t = expect_tensor(f, 3, "n.i64", TWN_DT_I64, 1, SHAPE(4));
    EXPECT_DATA(t, int64_t, 1, -2, 3000000000LL, -9000000000000000000LL);
    t = expect_tensor(f, 4, "m.bool", TWN_DT_BOOL, 1, SHAPE(3));
    EXPECT_DATA(t, uint8_t, 1, 0, 1);
    t = expect_tensor(f, 5, "m.u8", TWN_DT_U8, 1, SHAPE(2));
    EXPECT_DATA(t, uint8_t, 0, 255);
    t = expect_tensor(f, 6, "m.i8", TWN_DT_I8, 1, SHAPE(2));
    EXPECT_DATA(t, int8_t, -128, 127);
    t = expect_tensor(f, 7, "m.i16", TWN_DT_I16, 1, SHAPE(2));
    EXPECT_DATA(t, int16_t, -300, 300);
    t = expect_tensor(f, 8, "m.i32", TWN_DT_I32, 1, SHAPE(2));
    EXPECT_DATA(t, int32_t, -70000, 70000);
    t = expect_tensor(f, 9, "m.f64", TWN_DT_F64, 1, SHAPE(2));
    EXPECT_DATA(t, double, 0.1, -2.5);
    t = expect_tensor(f, 10, "s.scalar", TWN_DT_F32, 0, NULL);
    EXPECT_DATA(t, float, 3.25f);
    t = expect_tensor(f, 11, "x.empty", TWN_DT_F32, 2, SHAPE(0, 3));
    assert_int_equal(t->nbytes, 0);
    twn_pt_free(f);
}

/* Five views of one 12-float storage holding 0..11. */
static void test_fixture_views(void **state) {
    (void)state;
    twn_pt_file *f = load_ok(FIX("views.pt"));
    assert_int_equal(twn_pt_count(f), 5);
    const twn_tensor *full = expect_tensor(f, 0, "full", TWN_DT_F32, 2, SHAPE(3, 4));
    EXPECT_DATA(full, float, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
    const twn_tensor *t = expect_tensor(f, 1, "t", TWN_DT_F32, 2, SHAPE(3, 2));
    EXPECT_DATA(t, float, 1, 5, 2, 6, 3, 7); /* offset 1, strides (1, 4) */
    const twn_tensor *row = expect_tensor(f, 2, "row", TWN_DT_F32, 1, SHAPE(4));
    EXPECT_DATA(row, float, 4, 5, 6, 7);
    /* contiguous views share the storage bytes, as in torch */
    assert_ptr_equal((const float *)row->data, (const float *)full->data + 4);
    t = expect_tensor(f, 3, "col", TWN_DT_F32, 1, SHAPE(3));
    EXPECT_DATA(t, float, 2, 6, 10);
    t = expect_tensor(f, 4, "bcast", TWN_DT_F32, 2, SHAPE(2, 3));
    EXPECT_DATA(t, float, 11, 11, 11, 11, 11, 11);
    twn_pt_free(f);
}

static void test_fixture_bare_and_param(void **state) {
    (void)state;
    twn_pt_file *f = load_ok(FIX("bare.pt"));
    assert_true(twn_pt_is_bare(f));
    assert_int_equal(twn_pt_count(f), 1);
    const twn_tensor *t = expect_tensor(f, 0, "", TWN_DT_F32, 2, SHAPE(2, 2));
    EXPECT_DATA(t, float, 1, 2, 3, 4);
    twn_pt_free(f);
    f = load_ok(FIX("param.pt"));
    assert_true(twn_pt_is_bare(f));
    t = expect_tensor(f, 0, "", TWN_DT_F32, 1, SHAPE(3));
    EXPECT_DATA(t, float, 0.5f, 1.5f, 2.5f);
    twn_pt_free(f);
}

static void test_fixture_proto4_deflated_mixed(void **state) {
    (void)state;
    twn_pt_file *f = load_ok(FIX("proto4.pt"));
    assert_int_equal(twn_pt_count(f), 2);
    const twn_tensor *t = expect_tensor(f, 0, "a", TWN_DT_F32, 1, SHAPE(2));
    EXPECT_DATA(t, float, 1, 2);
    t = expect_tensor(f, 1, "b", TWN_DT_I32, 1, SHAPE(2));
    EXPECT_DATA(t, int32_t, 7, -7);
    twn_pt_free(f);

    f = load_ok(FIX("deflated.pt"));
    assert_int_equal(twn_pt_count(f), 1);
    t = expect_tensor(f, 0, "d", TWN_DT_F32, 2, SHAPE(8, 8));
    for (int i = 0; i < 64; i++) assert_true(((const float *)t->data)[i] == i * 0.25f);
    twn_pt_free(f);

    /* ints, strings, floats, None, bools, a 2**70 int and nested containers are skipped */
    f = load_ok(FIX("mixed.pt"));
    assert_int_equal(twn_pt_count(f), 1);
    t = expect_tensor(f, 0, "t", TWN_DT_F32, 1, SHAPE(2));
    EXPECT_DATA(t, float, 1, -1);
    twn_pt_free(f);
}

static void test_load_mem_names_messages(void **state) {
    (void)state;
    size_t n;
    char *data = tu_read(FIX("state_dict.pt"), &n);
    twn_pt_file *f = NULL;
    twn_err err = {{0}};
    if (twn_pt_load_mem(data, n, "mem:state_dict", &f, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(twn_pt_count(f), 12);
    twn_pt_free(f);
    free(data);
    data = tu_read(FIX("bad_global.pt"), &n);
    assert_int_equal(twn_pt_load_mem(data, n, "mem:evil", &f, &err), -1);
    assert_null(f);
    assert_non_null(strstr(err.msg, "mem:evil"));
    assert_non_null(strstr(err.msg, "os.system"));
    free(data);
    /* a flipped bit in a storage record is caught by the zip CRC */
    data = tu_read(FIX("bare.pt"), &n);
    static const float four[4] = {1, 2, 3, 4};
    char *at = NULL;
    for (size_t i = 0; !at && i + sizeof four <= n; i++)
        if (!memcmp(data + i, four, sizeof four)) at = data + i;
    assert_non_null(at);
    at[5] ^= 0x10;
    assert_int_equal(twn_pt_load_mem(data, n, "mem:flipped", &f, &err), -1);
    if (!strstr(err.msg, "mem:flipped: cannot read record bare/data/0") || !strstr(err.msg, "CRC"))
        fail_msg("unexpected error: %s", err.msg);
    free(data);
    assert_int_equal(twn_pt_load_mem("PK", 2, "tiny", &f, &err), -1);
    assert_non_null(strstr(err.msg, "tiny: not a zip archive"));
}

/* ---------------------------------------------------------------------------------------- */
/* files the reader must refuse */

static void test_refuses_bad_files(void **state) {
    (void)state;
    expect_load_error(FIX("bad_not_zip.pt"), "not a zip archive");
    expect_load_error(FIX("bad_legacy.pt"), "legacy");
    expect_load_error(FIX("bad_no_pkl.pt"), "no <prefix>/data.pkl record");
    expect_load_error(FIX("bad_storage_key.pt"),
                      "storage key '0' has no record bad_storage_key/data/0");
    expect_load_error(FIX("bad_strides.pt"), "view out of bounds");
    expect_load_error(FIX("bad_strides.pt"), "reach element 9, but storage '0' has 6 elements");
    expect_load_error(FIX("bad_storage_short.pt"), "has 16 bytes, but the pickle declares 8");
    expect_load_error(FIX("bad_truncated.pt"), "truncated pickle");
    expect_load_error(FIX("bad_opcode.pt"), "unknown or unsupported pickle opcode 0xff");
    expect_load_error(FIX("bad_big_endian.pt"), "big-endian");
    expect_load_error(TWN_SOURCE_DIR "/tests/data/pt/does_not_exist.pt", "cannot open");
}

/* os.system must be refused at GLOBAL, never resolved or run. */
static void test_refuses_os_system(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("ptfile_evil");
    char cwd[4096];
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(dir), 0);
    expect_load_error(FIX("bad_global.pt"), "refusing global os.system");
    assert_int_not_equal(access("twn_ptfile_pwned_marker", F_OK), 0);
    assert_int_equal(chdir(cwd), 0);
}

/* ---------------------------------------------------------------------------------------- */
/* hand-written pickles against a real storage zip (archive/data/0: 16 floats 0..15) */

typedef struct {
    uint8_t b[1 << 16];
    size_t n;
} pk;

static void put(pk *p, const void *s, size_t n) {
    assert_true(p->n + n <= sizeof p->b);
    memcpy(p->b + p->n, s, n);
    p->n += n;
}
#define PUT(p, lit) put(p, lit, sizeof(lit) - 1)

/* A bare tensor: _rebuild_tensor_v2 of storage '0' (FloatStorage, 16 elements) at element
 * `offset` with the given size and stride tuples (already-encoded opcodes). */
static void pk_tensor(pk *p, uint8_t offset, const char *size_ops, size_t sn,
                      const char *stride_ops, size_t tn) {
    PUT(p, "\x80\x02"
           "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\0\0\0storage"
           "ctorch\nFloatStorage\nX\x01\0\0\0"
           "0X\x03\0\0\0cpuK\x10tQK");
    put(p, &offset, 1);
    put(p, size_ops, sn);
    put(p, stride_ops, tn);
    PUT(p, "\x89}tR.");
}

static int run_pickle(const pk *p, twn_pt_file **f, twn_err *err) {
    static void *zip;
    static size_t len;
    if (!zip) {
        static float v[16];
        for (int i = 0; i < 16; i++) v[i] = (float)i;
        twn_tensor t = {.dtype = TWN_DT_F32, .ndim = 1, .shape = {16}, .data = v, .nbytes = 64};
        assert_int_equal(twn_pt_write_mem(&t, 1, true, &zip, &len, err), 0);
    }
    return twn_pt_load_mem_pickle(zip, len, p->b, p->n, "crafted", f, err);
}

static void expect_pickle_error(const pk *p, const char *want) {
    twn_pt_file *f = NULL;
    twn_err err = {{0}};
    assert_int_equal(run_pickle(p, &f, &err), -1);
    assert_null(f);
    if (!strstr(err.msg, want)) fail_msg("error \"%s\" lacks \"%s\"", err.msg, want);
    assert_memory_equal(err.msg, "crafted: ", 9);
}

static void test_crafted_pickles(void **state) {
    (void)state;
    static pk p;
    twn_pt_file *f = NULL;
    twn_err err = {{0}};

    /* a stride-0 broadcast of element 3, and a stride-2 view */
    p.n = 0;
    pk_tensor(&p, 3, "K\x02K\x02\x86", 5, "K\x00K\x00\x86", 5);
    if (run_pickle(&p, &f, &err) != 0) fail_msg("%s", err.msg);
    EXPECT_DATA(twn_pt_at(f, 0), float, 3, 3, 3, 3);
    twn_pt_free(f);
    p.n = 0;
    pk_tensor(&p, 0, "K\x08\x85", 3, "K\x02\x85", 3);
    if (run_pickle(&p, &f, &err) != 0) fail_msg("%s", err.msg);
    EXPECT_DATA(twn_pt_at(f, 0), float, 0, 2, 4, 6, 8, 10, 12, 14);
    twn_pt_free(f);

    /* stride 0 cannot turn 64 bytes into 256 MiB */
    p.n = 0;
    pk_tensor(&p, 0, "J\0\0\x10\0K\x40\x86", 8, "K\x00K\x00\x86", 5);
    expect_pickle_error(&p, "limit on stride-0/overlapping views");
    /* one past the end */
    p.n = 0;
    pk_tensor(&p, 0, "K\x09\x85", 3, "K\x02\x85", 3);
    expect_pickle_error(&p, "reach element 16, but storage '0' has 16 elements");
    /* strides that overflow int64 */
    p.n = 0;
    pk_tensor(&p, 0, "K\x03\x85", 3, "\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f\x85", 11);
    expect_pickle_error(&p, "view out of bounds");

    p.n = 0;
    PUT(&p, "\x80\x02\x8c\x08"
            "builtins\x8c\x04"
            "eval\x93.");
    expect_pickle_error(&p, "refusing global builtins.eval");
    p.n = 0;
    PUT(&p, "\x80\x02"
            "ctorch\nFloatStorage\n)R.");
    expect_pickle_error(&p, "torch.FloatStorage cannot be called");
    p.n = 0;
    PUT(&p, "\x80\x02N)R.");
    expect_pickle_error(&p, "call of a None");
    p.n = 0;
    PUT(&p, "\x80\x02]q\x00h\x00"
            "a."); /* a list containing itself */
    expect_pickle_error(&p, "top-level object is a list");
    p.n = 0;
    PUT(&p, "\x80\x02h\x05.");
    expect_pickle_error(&p, "memo entry 5 is not defined");
    p.n = 0;
    PUT(&p, "\x80\x02Nr\xff\xff\xff\xff.");
    expect_pickle_error(&p, "memo index 4294967295 is beyond the limit");
    p.n = 0;
    PUT(&p, "\x80\x02X\xff\xff\xff\x7f");
    expect_pickle_error(&p, "truncated pickle");
    p.n = 0;
    PUT(&p, "\x80\x02}");
    expect_pickle_error(&p, "no STOP opcode");
    p.n = 0;
    PUT(&p, "\x80\x02.");
    expect_pickle_error(&p, "stack underflow");
    p.n = 0;
    PUT(&p, "\x80\x02(Q.");
    expect_pickle_error(&p, "stack underflow");
    p.n = 0;
    PUT(&p, "\x80\x02(X\x07\0\0\0storagectorch\nFloatStorage\nX\x01\0\0\0"
            "9X\0\0\0\0K\x01tQ.");
    expect_pickle_error(&p, "storage key '9' has no record archive/data/9");
    p.n = 0;
    PUT(&p, "\x80\x02(X\x01\0\0\0xK\x01tQ.");
    expect_pickle_error(&p, "persistent id is not");
    p.n = 0;
    PUT(&p, "\x80\x09.");
    expect_pickle_error(&p, "unsupported pickle protocol 9");
    p.n = 0;
    PUT(&p, "\x80\x02}K\x01\x8a\x09\0\0\0\0\0\0\0\0\x01s.");
    if (run_pickle(&p, &f, &err) != 0) fail_msg("%s", err.msg); /* an int key, a big int: fine */
    assert_int_equal(twn_pt_count(f), 0);
    twn_pt_free(f);

    p.n = 0;
    PUT(&p, "\x80\x02");
    for (int i = 0; i < 5000; i++) PUT(&p, "(");
    expect_pickle_error(&p, "more than 4096 nested MARKs");
}

static void test_stack_limit(void **state) {
    (void)state;
    size_t n = ((size_t)1 << 20) + 16;
    uint8_t *b = malloc(n);
    memset(b, 'N', n);
    b[0] = 0x80;
    b[1] = 2;
    static float v[1];
    twn_tensor t = {.dtype = TWN_DT_F32, .ndim = 1, .shape = {1}, .data = v, .nbytes = 4};
    void *zip;
    size_t len;
    twn_err err = {{0}};
    assert_int_equal(twn_pt_write_mem(&t, 1, true, &zip, &len, &err), 0);
    twn_pt_file *f = NULL;
    assert_int_equal(twn_pt_load_mem_pickle(zip, len, b, n, "deep", &f, &err), -1);
    assert_non_null(strstr(err.msg, "pickle stack deeper than"));
    twn_free(zip);
    free(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_state_dict),
        cmocka_unit_test(test_roundtrip_bare),
        cmocka_unit_test(test_roundtrip_mem_many),
        cmocka_unit_test(test_writer_layout),
        cmocka_unit_test(test_writer_matches_python_pickle),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_fixture_state_dict),
        cmocka_unit_test(test_fixture_views),
        cmocka_unit_test(test_fixture_bare_and_param),
        cmocka_unit_test(test_fixture_proto4_deflated_mixed),
        cmocka_unit_test(test_load_mem_names_messages),
        cmocka_unit_test(test_refuses_bad_files),
        cmocka_unit_test(test_refuses_os_system),
        cmocka_unit_test(test_crafted_pickles),
        cmocka_unit_test(test_stack_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
