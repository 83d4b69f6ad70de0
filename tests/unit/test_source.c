/* test_source.c — JSONL and WebDataset tar sources: planner determinism and coverage for several
 * unit sizes, unit reads identical to ref reads, every kind of bad record with its exact message
 * (and the records after it still read), corrupt and truncated tar shards made by Python's tarfile
 * in the test, stale refs, files changed since planning, and the protobuf conversions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/source.h"
#include "tests/testutil.h"
#include "util/mem.h"

static const char *in_dir(const char *dir, const char *name) {
    static char buf[8][2048];
    static int k = 0;
    char *p = buf[k++ % 8];
    snprintf(p, 2048, "%s/%s", dir, name);
    return p;
}

/* Items read from a source: owned copies, so they can be compared after the reader is gone. */
typedef struct {
    twn_src_item *v;
    size_t n, cap;
} item_list;

static void push_item(item_list *l, twn_src_item *it) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 32;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = *it;
    memset(it, 0, sizeof *it);
}

static void free_items(item_list *l) {
    for (size_t i = 0; i < l->n; i++) twn_src_item_clear(&l->v[i]);
    free(l->v);
    memset(l, 0, sizeof *l);
}

static void str_eq(const char *a, const char *b, const char *what, uint64_t index) {
    if (!a != !b || (a && strcmp(a, b)))
        fail_msg("item %llu: %s differs: '%s' vs '%s'", (unsigned long long)index, what,
                 a ? a : "(null)", b ? b : "(null)");
}

static void expect_same_item(const twn_src_item *a, const twn_src_item *b) {
    assert_int_equal(a->index, b->index);
    assert_int_equal(a->offset, b->offset);
    assert_int_equal(a->length, b->length);
    assert_int_equal(a->line, b->line);
    assert_int_equal(a->fault, b->fault);
    str_eq(a->err.msg, b->err.msg, "message", a->index);
    str_eq(a->id, b->id, "id", a->index);
    str_eq(a->text, b->text, "text", a->index);
    str_eq(a->instruction, b->instruction, "instruction", a->index);
    str_eq(a->key, b->key, "key", a->index);
    assert_int_equal(a->n_images, b->n_images);
    for (size_t i = 0; i < a->n_images; i++) {
        str_eq(a->images[i].path, b->images[i].path, "image path", a->index);
        str_eq(a->images[i].member, b->images[i].member, "image member", a->index);
        assert_int_equal(a->images[i].size, b->images[i].size);
        if (a->images[i].size)
            assert_memory_equal(a->images[i].data, b->images[i].data, a->images[i].size);
    }
}

/* Plans `path` with `per` items per unit, reads every unit, checks the plan's shape (contiguous,
 * counts, sequential ids, deterministic), re-reads every item by its ref, and returns the items. */
static void read_all(const char *path, uint64_t per, const twn_src_opts *o, item_list *out,
                     size_t *n_units) {
    twn_err err = {{0}};
    twn_src_units a = {0}, b = {0};
    const char *paths[1] = {path};
    if (twn_src_plan_files(paths, 1, TWN_SRC_AUTO, per, &a, &err)) fail_msg("%s", err.msg);
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_AUTO, per, &b, &err), 0);
    assert_int_equal(a.n, b.n); /* deterministic */
    for (size_t i = 0; i < a.n; i++) {
        assert_int_equal(a.v[i].id, i);
        assert_int_equal(a.v[i].start, b.v[i].start);
        assert_int_equal(a.v[i].end, b.v[i].end);
        assert_int_equal(a.v[i].first_index, b.v[i].first_index);
        assert_int_equal(a.v[i].count, b.v[i].count);
        assert_int_equal(a.v[i].first_line, b.v[i].first_line);
        assert_true(a.v[i].count >= 1 && a.v[i].count <= per);
        if (i + 1 < a.n) {
            assert_int_equal(a.v[i].count, per); /* only the last unit may be short */
            assert_int_equal(a.v[i].end, a.v[i + 1].start);
            assert_int_equal(a.v[i].first_index + a.v[i].count, a.v[i + 1].first_index);
        }
    }
    twn_blob *blob;
    assert_int_equal(twn_blob_open_file(path, &blob, &err), 0);
    uint64_t next_index = 0;
    for (size_t u = 0; u < a.n; u++) {
        twn_src_reader *r;
        assert_int_equal(twn_src_reader_open(blob, &a.v[u], o, &r, &err), 0);
        twn_src_item it = {0};
        int rc;
        uint64_t got = 0;
        while ((rc = twn_src_reader_next(r, &it, &err)) == 1) {
            assert_int_equal(it.index, next_index); /* every item once, in order */
            next_index++;
            got++;
            assert_true(it.offset >= a.v[u].start && it.offset + it.length <= a.v[u].end);
            twn_src_ref ref = twn_src_ref_of(&a.v[u], &it);
            twn_src_item byref = {0};
            assert_int_equal(twn_src_read_ref(blob, &ref, o, &byref, &err), 0);
            expect_same_item(&it, &byref);
            twn_src_item_clear(&byref);
            push_item(out, &it);
        }
        if (rc) fail_msg("%s", err.msg);
        assert_int_equal(got, a.v[u].count);
        twn_src_item_clear(&it);
        twn_src_reader_close(r);
    }
    twn_blob_close(blob);
    if (n_units) *n_units = a.n;
    twn_src_units_free(&a);
    twn_src_units_free(&b);
}

/* The same items whatever the unit size. */
static void read_all_sizes(const char *path, const twn_src_opts *o, item_list *out) {
    read_all(path, 1000000, o, out, NULL);
    const uint64_t sizes[] = {1, 2, 3, 7};
    for (size_t s = 0; s < 4; s++) {
        item_list other = {0};
        size_t units;
        read_all(path, sizes[s], o, &other, &units);
        assert_int_equal(other.n, out->n);
        assert_int_equal(units, (out->n + sizes[s] - 1) / sizes[s]);
        for (size_t i = 0; i < out->n; i++) expect_same_item(&other.v[i], &out->v[i]);
        free_items(&other);
    }
}

static void expect_bad(const item_list *l, size_t i, twn_src_fault f, const char *msg) {
    assert_true(i < l->n);
    if (l->v[i].fault != f)
        fail_msg("item %zu: fault %s, expected %s (%s)", i, twn_src_fault_name(l->v[i].fault),
                 twn_src_fault_name(f), l->v[i].err.msg);
    if (strcmp(l->v[i].err.msg, msg))
        fail_msg("item %zu:\n  %s\nis not\n  %s", i, l->v[i].err.msg, msg);
}

static void expect_good(const item_list *l, size_t i, const char *id, const char *text) {
    assert_true(i < l->n);
    if (l->v[i].fault) fail_msg("item %zu is bad: %s", i, l->v[i].err.msg);
    str_eq(l->v[i].id, id, "id", i);
    str_eq(l->v[i].text, text, "text", i);
}

/* Byte offset of 1-based line `line` in s. */
static size_t line_off(const char *s, int line) {
    size_t off = 0;
    for (int l = 1; l < line; l++) off = (size_t)(strchr(s + off, '\n') - s) + 1;
    return off;
}

// ------------------------------------------------------------------------------------------------
// JSONL

static void test_jsonl_good(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("tp_src_jsonl");
    const char *path = in_dir(dir, "items.jsonl");
    const char *data = "{\"id\": \"a\", \"text\": \"first\", \"instruction\": \"Represent\"}\n"
                       "   \n"
                       "{\"id\": 7, \"text\": \"int id\", \"image\": \"img/x.jpg\"}\n"
                       "\n"
                       "{\"id\": \"c\", \"image\": [\"/abs/y.png\", \"z.webp\"], \"extra\": 1}\r\n"
                       "{\"id\": \"d\", \"text\": \"caf\xc3\xa9 \\u00e9\", \"image\": null}";
    tu_write(path, data, strlen(data));
    twn_src_opts o = twn_src_opts_default();
    item_list l = {0};
    read_all_sizes(path, &o, &l);
    assert_int_equal(l.n, 4);
    expect_good(&l, 0, "a", "first");
    assert_string_equal(l.v[0].instruction, "Represent");
    assert_int_equal(l.v[0].line, 1);
    assert_int_equal(l.v[0].offset, 0);
    assert_int_equal(l.v[0].length, strchr(data, '\n') - data);
    assert_int_equal(l.v[0].n_images, 0);
    expect_good(&l, 1, "7", "int id");
    assert_int_equal(l.v[1].line, 3);
    assert_int_equal(l.v[1].offset, line_off(data, 3));
    assert_int_equal(l.v[1].n_images, 1);
    assert_string_equal(l.v[1].images[0].path, in_dir(dir, "img/x.jpg"));
    expect_good(&l, 2, "c", NULL);
    assert_int_equal(l.v[2].line, 5);
    assert_int_equal(l.v[2].n_images, 2);
    assert_string_equal(l.v[2].images[0].path, "/abs/y.png");
    assert_string_equal(l.v[2].images[1].path, in_dir(dir, "z.webp"));
    assert_int_equal(l.v[2].length, line_off(data, 6) - line_off(data, 5) - 1); /* CR kept */
    expect_good(&l, 3, "d", "caf\xc3\xa9 \xc3\xa9");
    assert_int_equal(l.v[3].line, 6);
    assert_int_equal(l.v[3].offset + l.v[3].length, strlen(data)); /* no final newline */
    free_items(&l);

    /* Units: with 3 per unit, the second starts at line 6 (item 3). */
    twn_src_units ul = {0};
    twn_err err = {{0}};
    const char *paths[1] = {path};
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_AUTO, 3, &ul, &err), 0);
    assert_int_equal(ul.n, 2);
    assert_int_equal(ul.v[0].start, 0);
    assert_int_equal(ul.v[0].first_line, 1);
    assert_int_equal(ul.v[1].start, line_off(data, 6));
    assert_int_equal(ul.v[1].end, strlen(data));
    assert_int_equal(ul.v[1].first_index, 3);
    assert_int_equal(ul.v[1].first_line, 6);
    assert_int_equal(ul.v[1].format, TWN_SRC_JSONL);
    /* Planning a second file continues the ids. */
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_JSONL, 10, &ul, &err), 0);
    assert_int_equal(ul.n, 3);
    assert_int_equal(ul.v[2].id, 2);
    assert_int_equal(ul.v[2].count, 4);
    twn_src_units_free(&ul);

    /* Empty and blank-only files have no units. */
    const char *blank = in_dir(dir, "blank.jsonl");
    tu_write(blank, " \n\n\t\r\n", 6);
    paths[0] = blank;
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_AUTO, 3, &ul, &err), 0);
    assert_int_equal(ul.n, 0);
    paths[0] = in_dir(dir, "missing.jsonl");
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_AUTO, 3, &ul, &err), -1);
    assert_non_null(strstr(err.msg, "missing.jsonl: cannot open: No such file or directory"));
}

/* A line longer than the reader's 256 KiB window: scanned across refills, loaded on its own. */
static void test_jsonl_long_line(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("tp_src_long");
    const char *path = in_dir(dir, "long.jsonl");
    size_t big = 300000;
    char *data = malloc(big + 200);
    int n = sprintf(data, "{\"id\": \"a\", \"text\": \"short\"}\n{\"id\": \"b\", \"text\": \"");
    memset(data + n, 'w', big);
    n += (int)big;
    n += sprintf(data + n, "\"}\n{\"id\": \"c\", \"text\": \"after\"}\n");
    tu_write(path, data, (size_t)n);
    twn_src_opts o = twn_src_opts_default();
    item_list l = {0};
    read_all_sizes(path, &o, &l);
    assert_int_equal(l.n, 3);
    expect_good(&l, 0, "a", "short");
    assert_string_equal(l.v[1].id, "b");
    assert_int_equal(strlen(l.v[1].text), big);
    assert_int_equal(l.v[1].text[big - 1], 'w');
    expect_good(&l, 2, "c", "after");
    free_items(&l);
    free(data);
}

static void test_jsonl_bad_records(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("tp_src_jsonl_bad");
    const char *path = in_dir(dir, "bad.jsonl");
    char big[700];
    memset(big, 'x', 600);
    big[600] = 0;
    char longid[301];
    memset(longid, 'q', 300);
    longid[300] = 0;
    char data[4096];
    snprintf(data, sizeof data,
             "{\"id\": \"g1\", \"text\": \"good one\"}\n"             /* 1 */
             "{\"id\": \"b1\", \"text\": }\n"                         /* 2 */
             "[1, 2]\n"                                               /* 3 */
             "{\"text\": \"no id\"}\n"                                /* 4 */
             "{\"id\": \"%s\", \"text\": \"t\"}\n"                    /* 5 */
             "{\"id\": 1.5, \"text\": \"t\"}\n"                       /* 6 */
             "{\"id\": \"\", \"text\": \"t\"}\n"                      /* 7 */
             "{\"id\": \"u\", \"text\": \"bad \xff byte\"}\n"         /* 8 */
             "{\"id\": \"t\", \"text\": 5}\n"                         /* 9 */
             "{\"id\": \"i\", \"image\": 3}\n"                        /* 10 */
             "{\"id\": \"j\", \"image\": [\"a.jpg\", 4]}\n"           /* 11 */
             "{\"id\": \"e\", \"instruction\": \"x\"}\n"              /* 12 */
             "{\"id\": \"big\", \"text\": \"%s\"}\n"                  /* 13 */
             "{\"id\": \"dup\", \"id\": \"dup2\", \"text\": \"t\"}\n" /* 14 */
             "{\"id\": \"s\", \"text\": \"\\ud800\"}\n"               /* 15 */
             "{\"id\": \"g2\", \"text\": \"good two\"}\n",            /* 16 */
             longid, big);
    tu_write(path, data, strlen(data));
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 512;
    item_list l = {0};
    read_all_sizes(path, &o, &l);
    assert_int_equal(l.n, 16);
    char want[1024];
#define AT(line) path, line, line_off(data, line)
    expect_good(&l, 0, "g1", "good one");
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): invalid JSON at column 22: unexpected token near '}'", AT(2));
    expect_bad(&l, 1, TWN_SRC_BAD_JSON, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): the record is a JSON array; expected a JSON object", AT(3));
    expect_bad(&l, 2, TWN_SRC_BAD_JSON, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): no \"id\"; expected a string or an integer id (or "
             "derive_missing_id)",
             AT(4));
    expect_bad(&l, 3, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): \"id\" \"qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq...\" is 300 bytes; "
             "the limit is 256",
             AT(5));
    expect_bad(&l, 4, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): \"id\" is a JSON number; expected a string or an integer",
             AT(6));
    expect_bad(&l, 5, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want, "%s: line %d (byte %zu): \"id\" is empty; expected 1..256 bytes",
             AT(7));
    expect_bad(&l, 6, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): invalid UTF-8 at column 26 (byte 0xff); expected UTF-8 text",
             AT(8));
    expect_bad(&l, 7, TWN_SRC_BAD_UTF8, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): \"text\" is a JSON integer; expected a string or null",
             AT(9));
    expect_bad(&l, 8, TWN_SRC_BAD_FIELD, want);
    snprintf(
        want, sizeof want,
        "%s: line %d (byte %zu): \"image\" is a JSON integer; expected a path or a list of paths",
        AT(10));
    expect_bad(&l, 9, TWN_SRC_BAD_FIELD, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): \"image\"[1] is a JSON integer; expected a path string",
             AT(11));
    expect_bad(&l, 10, TWN_SRC_BAD_FIELD, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): the item has neither \"text\" nor \"image\"; expected at "
             "least one",
             AT(12));
    expect_bad(&l, 11, TWN_SRC_EMPTY, want);
    snprintf(want, sizeof want, "%s: line %d (byte %zu): the line is 625 bytes; the limit is 512",
             AT(13));
    expect_bad(&l, 12, TWN_SRC_TOO_BIG, want);
    snprintf(
        want, sizeof want,
        "%s: line %d (byte %zu): invalid JSON at column 18: duplicate object key near '\"id\"'",
        AT(14));
    expect_bad(&l, 13, TWN_SRC_BAD_JSON, want);
    snprintf(want, sizeof want,
             "%s: line %d (byte %zu): invalid JSON at column 28: invalid Unicode '\\uD800' near "
             "'\"\\ud800\"'",
             AT(15));
    expect_bad(&l, 14, TWN_SRC_BAD_JSON, want);
    expect_good(&l, 15, "g2", "good two");
    /* The id, when it was readable, stays with the bad record for the dead letter. */
    assert_string_equal(l.v[8].id, "t");
    assert_null(l.v[1].id);
    free_items(&l);

    /* derive_missing_id names the record "<path>:<line>". */
    o.derive_missing_id = 1;
    read_all(path, 5, &o, &l, NULL);
    snprintf(want, sizeof want, "%s:4", path);
    expect_good(&l, 3, want, "no id");
    free_items(&l);
#undef AT
}

static void test_jsonl_parse_direct(void **state) {
    (void)state;
    twn_src_opts o = twn_src_opts_default();
    twn_src_item it = {.index = 3, .offset = 99};
    const char *rec = "{\"id\": 12, \"text\": \"x\"}";
    assert_int_equal(twn_src_jsonl_parse(rec, strlen(rec), "dir/f.jsonl", &o, &it), 0);
    assert_string_equal(it.id, "12");
    twn_src_item_clear(&it);
    it.index = 3, it.offset = 99;
    assert_int_equal(twn_src_jsonl_parse("{", 1, "dir/f.jsonl", &o, &it), -1);
    /* Without a line number the message names the item and byte. */
    assert_string_equal(it.err.msg, "dir/f.jsonl: item 3 at byte 99: invalid JSON at column 1: "
                                    "string or '}' expected near end of file");
    twn_src_item_clear(&it);
    const char *nul = "{\"id\": \"n\", \"text\": \"a\\u0000b\"}";
    it.line = 2;
    assert_int_equal(twn_src_jsonl_parse(nul, strlen(nul), "f.jsonl", &o, &it), -1);
    assert_int_equal(it.fault, TWN_SRC_BAD_JSON);
    assert_string_equal(it.err.msg, "f.jsonl: line 2 (byte 0): invalid JSON at column 30: \\u0000 "
                                    "is not allowed without JSON_ALLOW_NUL near '\"a\\u0000b\"'");
    twn_src_item_clear(&it);
}

static void test_jsonl_stale(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("tp_src_stale");
    const char *path = in_dir(dir, "s.jsonl");
    const char *data = "{\"id\": \"a\", \"text\": \"one\"}\n{\"id\": \"b\", \"text\": \"two\"}\n"
                       "{\"id\": \"c\", \"text\": \"three\"}\n";
    tu_write(path, data, strlen(data));
    twn_err err = {{0}};
    twn_src_opts o = twn_src_opts_default();
    twn_src_units ul = {0};
    const char *paths[1] = {path};
    assert_int_equal(twn_src_plan_files(paths, 1, TWN_SRC_AUTO, 10, &ul, &err), 0);
    twn_blob *b;
    assert_int_equal(twn_blob_open_file(path, &b, &err), 0);
    /* A ref shifted by one byte is not a whole line. */
    twn_src_ref ref = {
        .format = TWN_SRC_JSONL, .path = path, .offset = 1, .length = 26, .index = 0, .line = 1};
    twn_src_item it = {0};
    assert_int_equal(twn_src_read_ref(b, &ref, &o, &it, &err), 0);
    assert_int_equal(it.fault, TWN_SRC_STALE_REF);
    char want[1024];
    snprintf(want, sizeof want,
             "%s: line 1 (byte 1): the ref [1, +26) is not a whole line; the file changed since "
             "planning",
             path);
    assert_string_equal(it.err.msg, want);
    ref.offset = 0, ref.length = 60; /* two lines */
    assert_int_equal(twn_src_read_ref(b, &ref, &o, &it, &err), 0);
    assert_int_equal(it.fault, TWN_SRC_STALE_REF);
    ref.offset = 1000;
    assert_int_equal(twn_src_read_ref(b, &ref, &o, &it, &err), 0);
    snprintf(want, sizeof want,
             "%s: line 1 (byte 1000): the ref [1000, +60) lies past the end of the file (83 bytes)",
             path);
    assert_string_equal(it.err.msg, want);
    twn_src_item_clear(&it);
    twn_blob_close(b);

    /* The file loses its last line after planning: the reader says so instead of inventing. */
    tu_write(path, data, 54);
    assert_int_equal(twn_blob_open_file(path, &b, &err), 0);
    twn_src_reader *r;
    assert_int_equal(twn_src_reader_open(b, &ul.v[0], &o, &r, &err), 0);
    int n = 0, rc;
    while ((rc = twn_src_reader_next(r, &it, &err)) == 1) n++;
    assert_int_equal(rc, -1);
    assert_int_equal(n, 2);
    snprintf(want, sizeof want,
             "%s: unit 0 has 2 of its 3 items in bytes [0, 83) (the file is 54 bytes); the file "
             "changed since planning",
             path);
    assert_string_equal(err.msg, want);
    twn_src_item_clear(&it);
    twn_src_reader_close(r);
    twn_blob_close(b);
    twn_src_units_free(&ul);
}

// ------------------------------------------------------------------------------------------------
// Tar (made by Python's tarfile)

static const char *MAKE_TARS =
    "import io, json, sys, tarfile\n"
    "out = sys.argv[1]\n"
    "def blob(n, seed): return bytes((i * 31 + seed) % 251 for i in range(n))\n"
    "def add(t, name, data, kind=tarfile.REGTYPE):\n"
    "    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0; ti.type = kind\n"
    "    ti.uname = ti.gname = ''\n"
    "    t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)\n"
    "def good(t, long_dir):\n"
    "    add(t, '000000.jpg', blob(1000, 0)); add(t, '000000.txt', b'a cat')\n"
    "    add(t, '000000.json', json.dumps({'id': 'img-0', 'instruction': 'Describe'}).encode())\n"
    "    add(t, '000001.png', blob(600, 1)); add(t, '000001.txt', b'dog')\n"
    "    ti = tarfile.TarInfo('sub'); ti.type = tarfile.DIRTYPE; ti.mtime = 0; t.addfile(ti)\n"
    "    add(t, 'sub/000002.webp', blob(2000, 2)); add(t, 'sub/000002.txt', 'ünïcödé'.encode())\n"
    "    add(t, 'README', b'not an item member')\n"
    "    add(t, '000003.txt', b'only text')\n"
    "    add(t, long_dir + '/000004.jpg', blob(10, 4)); add(t, long_dir + '/000004.txt', b'long')\n"
    "    add(t, '000005.JPG', blob(700, 5))\n"
    "    add(t, '000006.json', json.dumps({'id': 12345, 'text': 'from json'}).encode())\n"
    "def bad(t):\n"
    "    add(t, '000007.txt', b'bad \\xff text')\n"
    "    add(t, '000008.jpg', blob(50, 8)); add(t, '000008.json', b'{not json')\n"
    "    add(t, '000009.json', b'{\"id\": [1]}'); add(t, '000009.txt', b'x')\n"
    "    add(t, '000010.cls', b'3')\n"
    "    add(t, '000011.txt', b'one'); add(t, '000011.txt', b'two')\n"
    "    add(t, '000012.txt', b'y'); add(t, '000012.json', b'{\"instruction\": 5}')\n"
    "    add(t, '000013.json', json.dumps({'id': 'k' * 300}).encode()); add(t, '000013.txt', "
    "b'z')\n"
    "    add(t, '000014.jpg', blob(20000, 14)); add(t, '000014.txt', b'huge')\n"
    "    add(t, '000015.txt', b'nul \\x00 inside')\n"
    "    add(t, '000016.txt', b'last good')\n"
    "with tarfile.open(out + '/pax.tar', 'w', format=tarfile.PAX_FORMAT) as t:\n"
    "    good(t, 'd' * 120); bad(t)\n"
    "with tarfile.open(out + '/gnu.tar', 'w', format=tarfile.GNU_FORMAT) as t:\n"
    "    good(t, 'd' * 120)\n"
    "with tarfile.open(out + '/ustar.tar', 'w', format=tarfile.USTAR_FORMAT) as t:\n"
    "    good(t, 'p' * 60 + '/' + 'q' * 50)\n"
    "with tarfile.open(out + '/pax.tar') as t:\n"
    "    for m in t.getmembers(): print(m.name[-20:], m.offset, m.offset_data, m.size)\n";

static const char *make_tars(void) {
    const char *dir = tu_tmpdir("tp_src_tar");
    const char *script = in_dir(dir, "make_tars.py");
    tu_write(script, MAKE_TARS, strlen(MAKE_TARS));
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s", script, dir);
    if (tu_run(cmd, &out)) fail_msg("python tarfile failed:\n%s", out);
    free(out);
    return dir;
}

static void blob_bytes(uint8_t *p, size_t n, int seed) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)((i * 31 + (size_t)seed) % 251);
}

static void expect_image(const twn_src_item *it, size_t k, const char *member, size_t n, int seed) {
    assert_true(k < it->n_images);
    assert_string_equal(it->images[k].member, member);
    assert_null(it->images[k].path);
    assert_int_equal(it->images[k].size, n);
    uint8_t *want = malloc(n);
    blob_bytes(want, n, seed);
    assert_memory_equal(it->images[k].data, want, n);
    free(want);
}

/* The seven good items every shard starts with (6 items: 000000..000006 minus README). */
static void expect_good_tar_items(const item_list *l, const char *long_dir) {
    expect_good(l, 0, "img-0", "a cat");
    assert_string_equal(l->v[0].key, "000000");
    assert_string_equal(l->v[0].instruction, "Describe");
    assert_int_equal(l->v[0].n_images, 1);
    expect_image(&l->v[0], 0, "000000.jpg", 1000, 0);
    assert_int_equal(l->v[0].offset, 0);
    assert_int_equal(l->v[0].line, 0);
    expect_good(l, 1, "000001", "dog");
    expect_image(&l->v[1], 0, "000001.png", 600, 1);
    expect_good(l, 2, "sub/000002", "\xc3\xbc\x6e\xc3\xaf\x63\xc3\xb6\x64\xc3\xa9");
    expect_image(&l->v[2], 0, "sub/000002.webp", 2000, 2);
    expect_good(l, 3, "000003", "only text");
    assert_int_equal(l->v[3].n_images, 0);
    char key[300];
    snprintf(key, sizeof key, "%s/000004", long_dir);
    expect_good(l, 4, key, "long");
    snprintf(key, sizeof key, "%s/000004.jpg", long_dir);
    expect_image(&l->v[4], 0, key, 10, 4);
    expect_good(l, 5, "000005", NULL);
    expect_image(&l->v[5], 0, "000005.JPG", 700, 5);
    expect_good(l, 6, "12345", "from json");
    assert_string_equal(l->v[6].key, "000006");
    /* Items tile the archive: each starts where the previous ended. */
    for (size_t i = 1; i < 7; i++)
        assert_int_equal(l->v[i].offset, l->v[i - 1].offset + l->v[i - 1].length);
}

static void test_tar_formats(void **state) {
    (void)state;
    const char *dir = make_tars();
    twn_src_opts o = twn_src_opts_default();
    const char *names[2] = {"gnu.tar", "ustar.tar"};
    const char *dirs[2] = {
        "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"
        "dddddddddddddddddddddddddddddddd",
        "pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp/qqqqqqqqqqqqqqqqqqqqqqqqqqqqq"
        "qqqqqqqqqqqqqqqqqqqqq"};
    for (int f = 0; f < 2; f++) {
        item_list l = {0};
        read_all_sizes(in_dir(dir, names[f]), &o, &l);
        assert_int_equal(l.n, 7);
        expect_good_tar_items(&l, dirs[f]);
        free_items(&l);
    }
}

static void test_tar_bad_records(void **state) {
    (void)state;
    const char *dir = make_tars();
    const char *path = in_dir(dir, "pax.tar");
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 16384;
    item_list l = {0};
    read_all_sizes(path, &o, &l);
    assert_int_equal(l.n, 17);
    expect_good_tar_items(&l, "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"
                              "dddddddddddddddddddddddddddddddddddddddddddddddddddd");
    char want[1024];
#define AT(i) path, (i), l.v[i].key, (unsigned long long)l.v[i].offset
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000007.txt' is not valid UTF-8 at byte 4 "
             "(0xff); expected UTF-8 text",
             AT(7));
    expect_bad(&l, 7, TWN_SRC_BAD_UTF8, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000008.json': invalid JSON at line 1 column "
             "4: string or '}' expected near 'not'",
             AT(8));
    expect_bad(&l, 8, TWN_SRC_BAD_JSON, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000009.json': \"id\" is a JSON array; "
             "expected a string or an integer",
             AT(9));
    expect_bad(&l, 9, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: the item has no text (.txt) and no image "
             "(.jpg/.png/.webp); expected at least one",
             AT(10));
    expect_bad(&l, 10, TWN_SRC_EMPTY, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000011.txt' appears twice; expected one .txt "
             "per item",
             AT(11));
    expect_bad(&l, 11, TWN_SRC_BAD_FIELD, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000012.json': \"instruction\" is a JSON "
             "integer; expected a string or null",
             AT(12));
    expect_bad(&l, 12, TWN_SRC_BAD_FIELD, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: \"id\" \"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...\" is 300 "
             "bytes; the limit is 256",
             AT(13));
    expect_bad(&l, 13, TWN_SRC_BAD_ID, want);
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: the item is 22016 bytes; the limit is 16384", AT(14));
    expect_bad(&l, 14, TWN_SRC_TOO_BIG, want);
    assert_int_equal(l.v[14].n_images, 0); /* nothing loaded */
    snprintf(want, sizeof want,
             "%s: item %d '%s' at byte %llu: member '000015.txt' contains a NUL byte at byte 4 "
             "(0x00); expected text",
             AT(15));
    expect_bad(&l, 15, TWN_SRC_BAD_UTF8, want);
    expect_good(&l, 16, "000016", "last good");
#undef AT
    free_items(&l);
}

/* Corrupts byte `at` of `src` into `dst`, or truncates it to `cut` bytes. */
static void derive(const char *src, const char *dst, long at, long cut) {
    size_t n;
    char *d = tu_read(src, &n);
    if (at >= 0) d[at] ^= 0x20;
    tu_write(dst, d, cut >= 0 ? (size_t)cut : n);
    free(d);
}

static unsigned long long header_sum(const char *path, size_t off, unsigned long long *stored) {
    size_t n;
    unsigned char *d = (unsigned char *)tu_read(path, &n);
    unsigned long long s = 0;
    for (size_t i = 0; i < 512; i++) s += (i >= 148 && i < 156) ? ' ' : d[off + i];
    *stored = strtoull((char *)d + off + 148, NULL, 8);
    free(d);
    return s;
}

static void test_tar_corrupt(void **state) {
    (void)state;
    const char *dir = make_tars();
    const char *good = in_dir(dir, "gnu.tar");
    twn_src_opts o = twn_src_opts_default();
    item_list base = {0};
    read_all(good, 100, &o, &base, NULL);
    assert_int_equal(base.n, 7);

    /* A flipped name byte in the header of 000001.png: its checksum fails, the reader skips to the
     * next valid header (000001.txt, 512 + 1024 bytes later), and that member becomes item 2. */
    const char *bad = in_dir(dir, "checksum.tar");
    long at = (long)base.v[1].offset;
    derive(good, bad, at + 3, -1);
    item_list l = {0};
    read_all_sizes(bad, &o, &l);
    assert_int_equal(l.n, 8);
    unsigned long long stored, sum = header_sum(bad, (size_t)at, &stored);
    char want[1024];
    snprintf(want, sizeof want,
             "%s: item 1 at byte %ld: bad tar header checksum at byte %ld: the field says 0%llo, "
             "the header sums to 0%llo (octal); skipped 1536 bytes to the next valid header",
             bad, at, at, stored, sum);
    expect_bad(&l, 1, TWN_SRC_BAD_TAR, want);
    assert_int_equal(l.v[1].length, 1536);
    expect_good(&l, 2, "000001", "dog");
    assert_int_equal(l.v[2].n_images, 0);
    for (size_t i = 2; i < 7; i++) {
        expect_good(&l, i + 1, base.v[i].id, base.v[i].text);
        assert_int_equal(l.v[i + 1].offset, base.v[i].offset);
    }
    free_items(&l);

    /* The last member's header corrupted: the skip ends at the archive's empty end blocks, or at
     * the end of the file when those are gone too. */
    long last_at = (long)base.v[6].offset;
    derive(good, bad, last_at + 3, -1);
    read_all_sizes(bad, &o, &l);
    assert_int_equal(l.n, 7);
    sum = header_sum(bad, (size_t)last_at, &stored);
    snprintf(want, sizeof want,
             "%s: item 6 at byte %ld: bad tar header checksum at byte %ld: the field says 0%llo, "
             "the header sums to 0%llo (octal); skipped 1024 bytes to an empty block",
             bad, last_at, last_at, stored, sum);
    expect_bad(&l, 6, TWN_SRC_BAD_TAR, want);
    free_items(&l);
    derive(good, bad, last_at + 3, last_at + 1024);
    read_all_sizes(bad, &o, &l);
    snprintf(want, sizeof want,
             "%s: item 6 at byte %ld: bad tar header checksum at byte %ld: the field says 0%llo, "
             "the header sums to 0%llo (octal); skipped 1024 bytes to the end of the file",
             bad, last_at, last_at, stored, sum);
    expect_bad(&l, 6, TWN_SRC_BAD_TAR, want);
    free_items(&l);

    /* Truncated inside the data of the last member (000006.json). */
    const char *cut = in_dir(dir, "cut_data.tar");
    long last = (long)base.v[6].offset;
    derive(good, cut, -1, last + 512 + 3);
    read_all_sizes(cut, &o, &l);
    assert_int_equal(l.n, 7);
    snprintf(want, sizeof want,
             "%s: item 6 '000006' at byte %ld: member '000006.json' at byte %ld declares 34 bytes "
             "but the file ends after 3",
             cut, last, last);
    expect_bad(&l, 6, TWN_SRC_TRUNCATED, want);
    assert_int_equal(l.v[6].length, 515);
    for (size_t i = 0; i < 6; i++) expect_same_item(&l.v[i], &base.v[i]);
    free_items(&l);

    /* Truncated inside the last header. */
    derive(good, cut, -1, last + 100);
    read_all_sizes(cut, &o, &l);
    assert_int_equal(l.n, 7);
    snprintf(want, sizeof want,
             "%s: item 6 at byte %ld: the file ends inside the tar header at byte %ld (100 of 512 "
             "bytes)",
             cut, last, last);
    expect_bad(&l, 6, TWN_SRC_TRUNCATED, want);
    free_items(&l);

    /* Two archives concatenated (`cat a.tar a.tar`): the end blocks between them are skipped. */
    size_t n;
    char *d = tu_read(good, &n);
    char *dd = malloc(2 * n);
    memcpy(dd, d, n);
    memcpy(dd + n, d, n);
    const char *cat = in_dir(dir, "cat.tar");
    tu_write(cat, dd, 2 * n);
    read_all_sizes(cat, &o, &l);
    assert_int_equal(l.n, 14);
    for (size_t i = 0; i < 7; i++) {
        expect_good(&l, 7 + i, base.v[i].id, base.v[i].text);
        assert_int_equal(l.v[7 + i].offset, base.v[i].offset + n);
    }
    free_items(&l);
    free(d);
    free(dd);

    /* A ref that does not match the item there. */
    twn_blob *b;
    twn_err err = {{0}};
    assert_int_equal(twn_blob_open_file(good, &b, &err), 0);
    twn_src_ref ref = {.format = TWN_SRC_TAR,
                       .path = good,
                       .offset = base.v[1].offset,
                       .length = base.v[1].length + base.v[2].length,
                       .index = 1};
    twn_src_item it = {0};
    assert_int_equal(twn_src_read_ref(b, &ref, &o, &it, &err), 0);
    snprintf(want, sizeof want,
             "%s: item 1 at byte %llu: the ref [%llu, +%llu) does not match the item there (bytes "
             "[%llu, %llu)); the file changed since planning",
             good, (unsigned long long)ref.offset, (unsigned long long)ref.offset,
             (unsigned long long)ref.length, (unsigned long long)ref.offset,
             (unsigned long long)(base.v[1].offset + base.v[1].length));
    assert_int_equal(it.fault, TWN_SRC_STALE_REF);
    assert_string_equal(it.err.msg, want);
    twn_src_item_clear(&it);
    twn_blob_close(b);
    free_items(&base);
}

static int collect_unit(const twn_src_unit *u, void *user, twn_err *err) {
    (void)err;
    twn_src_units *l = user;
    l->v = realloc(l->v, (l->n + 1) * sizeof *l->v);
    l->v[l->n] = *u;
    l->v[l->n].path = twn_strdup(u->path);
    l->n++;
    return 0;
}

/* The same planner and reader over a memory blob (what the S3 reader will look like). */
static void test_mem_blob_and_proto(void **state) {
    (void)state;
    const char *data = "{\"id\": \"m1\", \"text\": \"a\"}\n{\"id\": \"m2\", \"text\": \"b\"}\n";
    twn_blob *b = twn_blob_mem(data, strlen(data), "mem.jsonl");
    twn_src_units ul = {0};
    uint64_t next = 40;
    twn_err err = {{0}};
    assert_int_equal(
        twn_src_plan_blob(b, "mem.jsonl", TWN_SRC_AUTO, 1, &next, collect_unit, &ul, &err), 0);
    assert_int_equal(ul.n, 2);
    assert_int_equal(next, 42);
    assert_int_equal(ul.v[1].id, 41);

    /* Unit -> SourceRef -> unit. */
    Twn__SourceRef s;
    twn_src_unit_to_proto(&ul.v[1], &s);
    assert_int_equal(s.store, TWN__STORE__STORE_FILE);
    assert_int_equal(s.format, TWN__FORMAT__FORMAT_JSONL);
    assert_int_equal(s.start, 26);
    twn_src_unit u;
    assert_int_equal(twn_src_unit_from_proto(41, &s, &u, &err), 0);
    assert_int_equal(u.start, ul.v[1].start);
    assert_int_equal(u.end, ul.v[1].end);
    assert_int_equal(u.first_index, 1);
    assert_int_equal(u.first_line, 2);
    assert_string_equal(u.path, "mem.jsonl");
    twn_src_reader *r;
    assert_int_equal(twn_src_reader_open(b, &u, NULL, &r, &err), 0);
    twn_src_item it = {0};
    assert_int_equal(twn_src_reader_next(r, &it, &err), 1);
    assert_string_equal(it.id, "m2");
    /* Item -> ItemRef -> ref -> the same item. */
    Twn__ItemRef pr;
    Twn__SourceRef ps;
    twn_src_ref_to_proto(&u, &it, &pr, &ps);
    assert_int_equal(pr.unit_id, 41);
    assert_int_equal(pr.item_index, 1);
    assert_string_equal(pr.item_id, "m2");
    assert_int_equal(pr.line, 2);
    twn_src_ref ref;
    assert_int_equal(twn_src_ref_from_proto(&pr, &ref, &err), 0);
    twn_src_item again = {0};
    assert_int_equal(twn_src_read_ref(b, &ref, NULL, &again, &err), 0);
    expect_same_item(&it, &again);
    twn_src_item_clear(&again);
    assert_int_equal(twn_src_reader_next(r, &it, &err), 0);
    twn_src_reader_close(r);
    twn_free(u.path);

    s.store = TWN__STORE__STORE_S3;
    assert_int_equal(twn_src_unit_from_proto(1, &s, &u, &err), -1);
    assert_string_equal(err.msg,
                        "source 'mem.jsonl': store 2 is not a local file (STORE_FILE = 1)");
    s.store = TWN__STORE__STORE_FILE;
    s.format = TWN__FORMAT__FORMAT_KAFKA_JSON;
    assert_int_equal(twn_src_unit_from_proto(1, &s, &u, &err), -1);
    assert_string_equal(
        err.msg, "source 'mem.jsonl': format 3; expected FORMAT_JSONL (1) or FORMAT_TAR (2)");
    twn_src_item_clear(&it);
    twn_src_units_free(&ul);
    twn_blob_close(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jsonl_good),         cmocka_unit_test(test_jsonl_long_line),
        cmocka_unit_test(test_jsonl_bad_records),  cmocka_unit_test(test_jsonl_parse_direct),
        cmocka_unit_test(test_jsonl_stale),        cmocka_unit_test(test_tar_formats),
        cmocka_unit_test(test_tar_bad_records),    cmocka_unit_test(test_tar_corrupt),
        cmocka_unit_test(test_mem_blob_and_proto),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
