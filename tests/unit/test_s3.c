/* test_s3.c — the S3 client and the S3 source against s3rver behind tests/tools/s3_front.mjs (a
 * front that checks SigV4 like S3 and injects faults on demand), on 127.0.0.1:
 *   - a wrong secret fails with 403 SignatureDoesNotMatch naming bucket, key and the request id,
 *     never the secret; session tokens are sent and signed; credentials from AWS_* variables;
 *   - keys with spaces, '+', '=', '&', '%' and UTF-8 sign and round-trip; ranged reads are
 *     byte-exact (also past the end); one client reuses one connection;
 *   - ListObjectsV2 over 1100 objects across continuation pages (max-keys 250 and the default);
 *   - a JSONL and a WebDataset tar object (the tar uploaded in multipart) planned and read through
 *     the common/source planner and readers via the S3 blob give exactly the local files' units
 *     and items; a ref re-read fetches only that item's bytes;
 *   - injected 500s, resets, truncated and stalled bodies are retried (a truncated range resumes
 *     at the first missing byte), Retry-After is honored, persistent 500s give up with a clear
 *     message; 404s and changed objects give clear errors. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/s3.h"
#include "common/source_s3.h"
#include "tests/testutil.h"
#include "tests/unit/s3_peer.h"
#include "util/clock.h"
#include "util/mem.h"

#define AK     "TWNTESTAKID"
#define SECRET "twn-Secret/Key+0123456789abcdefXYZ"
#define BUCKET "twn-test"

static s3p g_s3;

static int group_setup(void **state) {
    (void)state;
    return s3p_start(&g_s3, "test_s3", "s3", AK, SECRET, NULL, 300);
}

static int group_teardown(void **state) {
    (void)state;
    s3p_stop(&g_s3);
    return 0;
}

static twn_s3_config cfg_for(const char *secret) {
    twn_s3_config c = s3p_config(&g_s3);
    c.secret_key = secret;
    return c;
}

static twn_s3 *client(const char *secret) {
    twn_s3_config c = cfg_for(secret);
    return s3p_open(&c);
}

static long long stat_int(json_t *j, const char *k) {
    return json_integer_value(json_object_get(j, k));
}

static uint8_t *random_bytes(size_t n, uint32_t seed) {
    uint8_t *p = malloc(n);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)x;
    }
    return p;
}

// ------------------------------------------------------------------------------------------------
// Configuration and URIs

static void test_uri_and_config(void **state) {
    (void)state;
    twn_s3_uri u;
    twn_err err = {{0}};
    assert_int_equal(twn_s3_uri_parse("s3://my-bucket/a/b/c.jsonl", &u, &err), 0);
    assert_string_equal(u.bucket, "my-bucket");
    assert_string_equal(u.key, "a/b/c.jsonl");
    twn_s3_uri_free(&u);
    assert_int_equal(twn_s3_uri_parse("s3://bkt", &u, &err), 0);
    assert_string_equal(u.bucket, "bkt");
    assert_string_equal(u.key, "");
    twn_s3_uri_free(&u);
    assert_int_equal(twn_s3_uri_parse("s3://bkt/", &u, &err), 0);
    assert_string_equal(u.key, "");
    twn_s3_uri_free(&u);
    assert_int_equal(twn_s3_uri_parse("http://bkt/x", &u, &err), -1);
    assert_string_equal(err.msg, "'http://bkt/x' is not an S3 URI; expected s3://bucket[/prefix]");
    assert_int_equal(twn_s3_uri_parse("s3://Bad_Bucket/x", &u, &err), -1);
    assert_string_equal(err.msg,
                        "'s3://Bad_Bucket/x': bucket 'Bad_Bucket' is not a valid S3 bucket name; "
                        "expected 3..63 characters of a-z 0-9 . - starting and ending with a "
                        "letter or digit");
    assert_int_equal(twn_s3_uri_parse("s3://ab", &u, &err), -1);

    /* no credentials anywhere */
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    twn_s3_config c = twn_s3_config_default();
    twn_s3 *s;
    assert_int_equal(twn_s3_open(&c, &s, &err), -1);
    assert_string_equal(err.msg, "s3: no credentials: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or the client config)");
    /* an endpoint with a user part is refused without echoing it */
    c.access_key = AK;
    c.secret_key = SECRET;
    c.endpoint = "http://user:hunter2@127.0.0.1:9";
    assert_int_equal(twn_s3_open(&c, &s, &err), -1);
    assert_null(strstr(err.msg, "hunter2"));
    assert_string_equal(err.msg, "s3: endpoint must be scheme://host[:port] with no user or path "
                                 "part");
    c.endpoint = "ftp://127.0.0.1:9";
    assert_int_equal(twn_s3_open(&c, &s, &err), -1);
    assert_string_equal(err.msg, "s3: endpoint 'ftp://127.0.0.1:9' must start with http:// or "
                                 "https://");
    c.endpoint = g_s3.front.endpoint;
    c.part_size = 1 << 20;
    assert_int_equal(twn_s3_open(&c, &s, &err), -1);
    assert_string_equal(err.msg, "s3: part_size 1048576 is below S3's minimum part size 5242880");

    /* everything from the environment */
    setenv("AWS_ACCESS_KEY_ID", AK, 1);
    setenv("AWS_SECRET_ACCESS_KEY", SECRET, 1);
    setenv("AWS_REGION", "us-east-1", 1);
    setenv("AWS_ENDPOINT_URL", g_s3.front.endpoint, 1);
    assert_int_equal(twn_s3_open(NULL, &s, &err), 0);
    s3p_bucket(s, BUCKET);
    s3p_put(s, BUCKET, "env/hello.txt", "hello", 5);
    uint64_t size = 0;
    char etag[128];
    if (twn_s3_head(s, BUCKET, "env/hello.txt", &size, etag, sizeof etag, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(size, 5);
    assert_string_equal(etag, "\"5d41402abc4b2a76b9719d911017c592\""); /* md5("hello") */
    twn_s3_close(s);
    /* a wrong region in the environment is a signature failure at the front */
    setenv("AWS_REGION", "eu-west-1", 1);
    assert_int_equal(twn_s3_open(NULL, &s, &err), 0);
    assert_int_equal(twn_s3_head(s, BUCKET, "env/hello.txt", &size, NULL, 0, &err), -1);
    assert_non_null(strstr(err.msg, "HEAD s3://twn-test/env/hello.txt: HTTP 403"));
    twn_s3_close(s);
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    unsetenv("AWS_REGION");
    unsetenv("AWS_ENDPOINT_URL");
}

// ------------------------------------------------------------------------------------------------
// Signatures

static void test_wrong_secret(void **state) {
    (void)state;
    twn_s3 *good = client(SECRET);
    s3p_bucket(good, BUCKET);
    s3p_put(good, BUCKET, "sig/data.jsonl", "{\"id\": 1, \"text\": \"x\"}\n", 23);
    twn_s3_close(good);

    const char *wrong = "WRONG-secret-7f3a9c2e1d";
    twn_s3 *s = client(wrong);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    char buf[16];
    size_t got = 99;
    twn_err err = {{0}};
    assert_int_equal(twn_s3_get_range(s, BUCKET, "sig/data.jsonl", NULL, 0, 10, buf, &got, &err),
                     -1);
    json_t *st = s3p_stats(&g_s3);
    const char *rid = json_string_value(json_object_get(st, "last_request_id"));
    char want[512];
    snprintf(want, sizeof want,
             "s3: GET s3://twn-test/sig/data.jsonl (bytes 0-9): HTTP 403 SignatureDoesNotMatch: "
             "The request signature we calculated does not match the signature you provided. "
             "Check your key and signing method. (x-amz-request-id %s)",
             rid);
    assert_string_equal(err.msg, want);
    assert_null(strstr(err.msg, wrong));
    assert_null(strstr(err.msg, SECRET));
    assert_int_equal(stat_int(st, "requests"), 1); /* a 403 is not retried */
    assert_int_equal(stat_int(st, "auth_failures"), 1);
    json_decref(st);
    /* listing and PUT fail the same way */
    twn_s3_objects objs = {0};
    assert_int_equal(twn_s3_list(s, BUCKET, "sig/", &objs, &err), -1);
    assert_non_null(strstr(err.msg, "s3: list s3://twn-test/sig/: HTTP 403 SignatureDoesNotMatch"));
    assert_null(strstr(err.msg, wrong));
    assert_int_equal(twn_s3_put(s, BUCKET, "sig/new", "x", 1, &err), -1);
    assert_non_null(
        strstr(err.msg, "s3: PUT s3://twn-test/sig/new: HTTP 403 SignatureDoesNotMatch"));
    twn_s3_close(s);

    /* session tokens: required by the front from now on, sent and signed by the client */
    s3p_post(&g_s3, "/__twn/config", "{\"token\": \"TOKEN-abc/123+=\"}");
    s = client(SECRET);
    assert_int_equal(twn_s3_get_range(s, BUCKET, "sig/data.jsonl", NULL, 0, 10, buf, &got, &err),
                     -1);
    assert_non_null(strstr(err.msg, "HTTP 403 InvalidToken"));
    twn_s3_close(s);
    twn_s3_config c = cfg_for(SECRET);
    c.session_token = "TOKEN-abc/123+=";
    assert_int_equal(twn_s3_open(&c, &s, &err), 0);
    if (twn_s3_get_range(s, BUCKET, "sig/data.jsonl", NULL, 0, 10, buf, &got, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(got, 10);
    assert_memory_equal(buf, "{\"id\": 1, ", 10);
    twn_s3_close(s);
    s3p_post(&g_s3, "/__twn/config", "{\"token\": \"\"}");
}

static void test_keys_ranges_reuse(void **state) {
    (void)state;
    twn_s3 *s = client(SECRET);
    s3p_bucket(s, BUCKET);
    const char *keys[] = {"odd/a b+c=d&e%f~g.bin", "odd/caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac.bin",
                          "odd/semi;colon,comma!(paren)*'q'.bin"};
    size_t n = 300000;
    uint8_t *data = random_bytes(n, 7);
    twn_err err = {{0}};
    for (size_t i = 0; i < 3; i++) s3p_put(s, BUCKET, keys[i], data, n);
    twn_s3_objects objs = {0};
    if (twn_s3_list(s, BUCKET, "odd/", &objs, &err)) fail_msg("%s", err.msg);
    assert_int_equal(objs.n, 3);
    assert_string_equal(objs.v[0].key, keys[0]); /* binary key order */
    assert_string_equal(objs.v[1].key, keys[1]);
    assert_string_equal(objs.v[2].key, keys[2]);
    for (size_t i = 0; i < 3; i++) assert_int_equal(objs.v[i].size, n);
    twn_s3_objects_free(&objs);

    twn_s3 *r = client(SECRET);
    struct {
        uint64_t off;
        size_t len, want;
    } cases[] = {{0, 1, 1},        {100, 16, 16}, {n - 1, 1, 1},     {12345, 100000, 100000},
                 {n - 10, 64, 10}, {n, 10, 0},    {n + 5000, 10, 0}, {0, n, n}};
    uint8_t *buf = malloc(n + 100);
    for (size_t k = 0; k < 3; k++)
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
            size_t got = 12345;
            if (twn_s3_get_range(r, BUCKET, keys[k], NULL, cases[i].off, cases[i].len, buf, &got,
                                 &err))
                fail_msg("%s", err.msg);
            assert_int_equal(got, cases[i].want);
            if (got) assert_memory_equal(buf, data + cases[i].off, got);
        }
    twn_s3_stats st = twn_s3_get_stats(r);
    assert_int_equal(st.requests, 24);
    assert_int_equal(st.retries, 0);
    assert_int_equal(st.connects, 1); /* one kept-alive connection for all 24 requests */
    assert_int_equal(st.bytes_in, 3 * (1 + 16 + 1 + 100000 + 10 + n));

    /* the blob: sequential 4 KiB reads fetch ahead (two GETs for the 300000 bytes), a read that
     * does not continue the previous one fetches exactly its bytes */
    twn_blob *b;
    size_t got;
    if (twn_blob_open_s3(r, BUCKET, keys[2], n, "", &b, &err)) fail_msg("%s", err.msg);
    twn_s3_stats s0 = twn_s3_get_stats(r);
    for (size_t off = 0; off < n; off += 4096) {
        size_t k = n - off < 4096 ? n - off : 4096;
        assert_int_equal(b->read_at(b, off, buf, k, &got, &err), 0);
        assert_int_equal(got, k);
        assert_memory_equal(buf, data + off, k);
    }
    twn_s3_stats s1 = twn_s3_get_stats(r);
    assert_int_equal(s1.requests - s0.requests, 2);
    assert_int_equal(s1.bytes_in - s0.bytes_in, n);
    twn_blob_close(b);
    if (twn_blob_open_s3(r, BUCKET, keys[2], n, "", &b, &err)) fail_msg("%s", err.msg);
    assert_int_equal(b->read_at(b, 5000, buf, 100, &got, &err), 0);
    assert_int_equal(b->read_at(b, 200000, buf, 100, &got, &err), 0);
    assert_memory_equal(buf, data + 200000, 100);
    assert_int_equal(b->read_at(b, 5050, buf, 10, &got, &err), 0); /* only the last is kept */
    assert_memory_equal(buf, data + 5050, 10);
    s0 = twn_s3_get_stats(r);
    assert_int_equal(s0.requests - s1.requests, 3);
    assert_int_equal(s0.bytes_in - s1.bytes_in, 210);
    twn_blob_close(b);

    /* whole-object GET with a size limit */
    uint8_t *all;
    size_t all_n;
    if (twn_s3_get(r, BUCKET, keys[1], n, &all, &all_n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(all_n, n);
    assert_memory_equal(all, data, n);
    twn_free(all);
    assert_int_equal(twn_s3_get(r, BUCKET, keys[1], n - 1, &all, &all_n, &err), -1);
    assert_string_equal(err.msg,
                        "s3: GET s3://twn-test/odd/caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac.bin: "
                        "the object is larger than the 299999-byte limit");
    free(buf);
    free(data);
    twn_s3_close(r);
    twn_s3_close(s);
}

// ------------------------------------------------------------------------------------------------
// Listing

static void test_list_pages(void **state) {
    (void)state;
    twn_s3 *s = client(SECRET);
    s3p_bucket(s, BUCKET);
    char key[64];
    for (int i = 0; i < 1100; i++) {
        snprintf(key, sizeof key, "many/obj-%05d.txt", i);
        s3p_put(s, BUCKET, key, key, strlen(key));
    }
    s3p_put(s, BUCKET, "manyx/not-under-the-prefix", "x", 1);
    twn_s3_close(s);

    for (int pass = 0; pass < 2; pass++) {
        twn_s3_config c = cfg_for(SECRET);
        c.list_page_keys = pass == 0 ? 250 : 0; /* 0: the server's 1000 */
        twn_s3 *l;
        twn_err err = {{0}};
        assert_int_equal(twn_s3_open(&c, &l, &err), 0);
        s3p_post(&g_s3, "/__twn/reset", "{}");
        twn_s3_objects objs = {0};
        if (twn_s3_list(l, BUCKET, "many/", &objs, &err)) fail_msg("%s", err.msg);
        assert_int_equal(objs.n, 1100);
        for (int i = 0; i < 1100; i++) {
            snprintf(key, sizeof key, "many/obj-%05d.txt", i);
            assert_string_equal(objs.v[i].key, key);
            assert_int_equal(objs.v[i].size, strlen(key));
            assert_int_equal(strlen(objs.v[i].etag), 34);
        }
        json_t *st = s3p_stats(&g_s3);
        assert_int_equal(stat_int(st, "requests"), pass == 0 ? 5 : 2);
        json_t *log = json_object_get(st, "log");
        const char *p0 = json_string_value(json_object_get(json_array_get(log, 0), "path"));
        const char *p1 = json_string_value(json_object_get(json_array_get(log, 1), "path"));
        if (pass == 0) {
            assert_string_equal(p0, "/twn-test?list-type=2&max-keys=250&prefix=many%2F");
            assert_non_null(strstr(p1, "/twn-test?continuation-token="));
            assert_non_null(strstr(p1, "&list-type=2&max-keys=250&prefix=many%2F"));
        } else {
            assert_string_equal(p0, "/twn-test?list-type=2&prefix=many%2F");
        }
        json_decref(st);
        twn_s3_objects_free(&objs);
        twn_s3_close(l);
    }
}

// ------------------------------------------------------------------------------------------------
// Planner and readers through the S3 blob

typedef struct {
    twn_src_item *v;
    size_t n, cap;
} items;

static void push(items *l, twn_src_item *it) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = *it;
    memset(it, 0, sizeof *it);
}

static void free_items(items *l) {
    for (size_t i = 0; i < l->n; i++) twn_src_item_clear(&l->v[i]);
    free(l->v);
}

/* Reads every unit of `units` from blobs opened by path, re-reading every item by its ref. */
static void read_units(twn_s3 *s, const twn_src_units *units, items *out) {
    twn_err err = {{0}};
    twn_src_opts o = twn_src_opts_default();
    for (size_t u = 0; u < units->n; u++) {
        twn_blob *b;
        if (twn_blob_open_path(s, units->v[u].path, &b, &err)) fail_msg("%s", err.msg);
        twn_src_reader *r;
        if (twn_src_reader_open(b, &units->v[u], &o, &r, &err)) fail_msg("%s", err.msg);
        twn_src_item it = {0};
        int rc;
        while ((rc = twn_src_reader_next(r, &it, &err)) == 1) push(out, &it);
        if (rc) fail_msg("%s", err.msg);
        twn_src_reader_close(r);
        twn_blob_close(b);
    }
}

/* The local and the S3 rendering of a message/path differ only in the file name. */
static void same_modulo_path(const char *a, const char *b, const char *la, const char *lb) {
    if (!a || !b) {
        assert_true(!a && !b);
        return;
    }
    char x[4096];
    const char *p = strstr(a, la);
    if (!p) {
        assert_string_equal(a, b);
        return;
    }
    snprintf(x, sizeof x, "%.*s%s%s", (int)(p - a), a, lb, p + strlen(la));
    assert_string_equal(x, b);
}

static void compare_items(const items *a, const items *b, const char *la, const char *lb) {
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        const twn_src_item *x = &a->v[i], *y = &b->v[i];
        assert_int_equal(x->index, y->index);
        assert_int_equal(x->offset, y->offset);
        assert_int_equal(x->length, y->length);
        assert_int_equal(x->line, y->line);
        assert_int_equal(x->fault, y->fault);
        same_modulo_path(x->err.msg[0] ? x->err.msg : NULL, y->err.msg[0] ? y->err.msg : NULL, la,
                         lb);
        same_modulo_path(x->id, y->id, la, lb);
        same_modulo_path(x->text, y->text, la, lb);
        same_modulo_path(x->instruction, y->instruction, la, lb);
        same_modulo_path(x->key, y->key, la, lb);
        assert_int_equal(x->n_images, y->n_images);
        for (size_t k = 0; k < x->n_images; k++) {
            same_modulo_path(x->images[k].path, y->images[k].path, la, lb);
            same_modulo_path(x->images[k].member, y->images[k].member, la, lb);
            assert_int_equal(x->images[k].size, y->images[k].size);
            if (x->images[k].size)
                assert_memory_equal(x->images[k].data, y->images[k].data, x->images[k].size);
        }
    }
}

static void compare_units(const twn_src_units *a, const twn_src_units *b) {
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        assert_int_equal(a->v[i].id, b->v[i].id);
        assert_int_equal(a->v[i].format, b->v[i].format);
        assert_int_equal(a->v[i].start, b->v[i].start);
        assert_int_equal(a->v[i].end, b->v[i].end);
        assert_int_equal(a->v[i].first_index, b->v[i].first_index);
        assert_int_equal(a->v[i].count, b->v[i].count);
        assert_int_equal(a->v[i].first_line, b->v[i].first_line);
    }
}

static const char TAR_PY[] =
    "import io, json, random, sys, tarfile\n"
    "random.seed(5)\n"
    "with tarfile.open(sys.argv[1], 'w', format=tarfile.GNU_FORMAT) as t:\n"
    "    def add(name, data):\n"
    "        ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 1700000000\n"
    "        t.addfile(ti, io.BytesIO(data))\n"
    "    for i in range(200):\n"
    "        k = 'shard/%05d' % i\n"
    "        add(k + '.jpg', random.randbytes(60000 + 97 * i))\n"
    "        add(k + '.txt', ('caption %d \\u00e9' % i).encode())\n"
    "        if i % 3 == 0: add(k + '.json', json.dumps({'id': 'item-%d' % i,\n"
    "                                                    'instruction': 'describe'}).encode())\n"
    "        if i == 50: add(k + '.txt', b'duplicate member')\n"
    "        if i == 70: add(k + '.txt', b'\\xff\\xfe not utf-8')\n";

static void write_jsonl(const char *path) {
    twn_str s = {0};
    for (int i = 0; i < 300; i++) {
        if (i == 17) twn_str_puts(&s, "   \n"); /* blank: not an item */
        if (i == 40)
            twn_str_puts(&s, "{\"id\": \"broken\", \"text\": \n");
        else if (i == 41)
            twn_str_puts(&s, "{\"text\": \"no id here\"}\n");
        else if (i == 42)
            twn_str_puts(&s, "{\"id\": \"u\", \"text\": \"bad \xff utf8\"}\n");
        else if (i % 5 == 0)
            twn_str_printf(&s, "{\"id\": %d, \"text\": \"text %d\", \"image\": \"img/%d.jpg\"}\n",
                           i, i, i);
        else
            twn_str_printf(&s,
                           "{\"id\": \"j%d\", \"text\": \"caf\xc3\xa9 %d\", \"instruction\": "
                           "\"q\"}\n",
                           i, i);
    }
    twn_str_puts(&s, "{\"id\": \"last\", \"text\": \"no newline\"}");
    tu_write(path, s.v, s.n);
    twn_str_free(&s);
}

static void upload_file(twn_s3 *s, const char *path, const char *key, unsigned *parts) {
    size_t n;
    char *data = tu_read(path, &n);
    twn_s3_upload *u;
    twn_err err = {{0}};
    if (twn_s3_upload_begin(s, BUCKET, key, &u, &err)) fail_msg("%s", err.msg);
    /* odd-sized writes so parts are assembled across calls */
    for (size_t off = 0; off < n; off += 777777) {
        size_t k = n - off < 777777 ? n - off : 777777;
        if (twn_s3_upload_write(u, data + off, k, &err)) fail_msg("%s", err.msg);
    }
    *parts = twn_s3_upload_parts(u);
    if (twn_s3_upload_finish(u, &err)) fail_msg("%s", err.msg);
    uint8_t *back;
    size_t back_n;
    if (twn_s3_get(s, BUCKET, key, 64u << 20, &back, &back_n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(back_n, n);
    assert_memory_equal(back, data, n);
    twn_free(back);
    free(data);
}

static void test_plan_and_read(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("s3-local");
    char local_dir[1024], jsonl[1100], tar[1100], cmd[4096], py[1100];
    snprintf(local_dir, sizeof local_dir, "%s", dir);
    snprintf(jsonl, sizeof jsonl, "%s/docs/part-0.jsonl", local_dir);
    snprintf(tar, sizeof tar, "%s/docs/shard-0.tar", local_dir);
    snprintf(py, sizeof py, "%s/mk.py", local_dir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/docs", local_dir);
    assert_int_equal(system(cmd), 0);
    write_jsonl(jsonl);
    tu_write(py, TAR_PY, strlen(TAR_PY));
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s", py, tar);
    char *out = NULL;
    if (tu_run(cmd, &out)) fail_msg("python tarfile failed:\n%s", out);
    free(out);

    twn_s3 *s = client(SECRET);
    s3p_bucket(s, BUCKET);
    unsigned parts_j = 9, parts_t = 0;
    upload_file(s, jsonl, "docs/part-0.jsonl", &parts_j);
    upload_file(s, tar, "docs/shard-0.tar", &parts_t);
    assert_int_equal(parts_j, 0); /* small: one PUT */
    assert_int_equal(parts_t, 1); /* ~13.6 MiB: one 8 MiB part before finish, the rest at finish */
    s3p_put(s, BUCKET, "docs/", "", 0); /* a console folder marker: skipped */

    for (uint64_t per = 1; per <= 64; per *= 8) {
        twn_src_units lu = {0}, su = {0};
        twn_err err = {{0}};
        const char *paths[2] = {jsonl, tar};
        if (twn_src_plan_files(paths, 2, TWN_SRC_AUTO, per, &lu, &err)) fail_msg("%s", err.msg);
        if (twn_src_plan_s3_units(s, "s3://" BUCKET "/docs/", TWN_SRC_AUTO, per, &su, &err))
            fail_msg("%s", err.msg);
        compare_units(&lu, &su);
        for (size_t i = 0; i < su.n; i++)
            assert_string_equal(su.v[i].path, lu.v[i].format == TWN_SRC_TAR
                                                  ? "s3://" BUCKET "/docs/shard-0.tar"
                                                  : "s3://" BUCKET "/docs/part-0.jsonl");
        if (per == 8) {
            items li = {0}, si = {0};
            read_units(NULL, &lu, &li);
            read_units(s, &su, &si);
            assert_int_equal(li.n, 301 + 200);
            compare_items(&li, &si, local_dir, "s3://" BUCKET);
            /* spot checks of what came through S3 */
            assert_string_equal(si.v[5].images[0].path, "s3://" BUCKET "/docs/img/5.jpg");
            assert_int_equal(si.v[40].fault, TWN_SRC_BAD_JSON);
            assert_int_equal(si.v[41].fault, TWN_SRC_BAD_ID);
            assert_int_equal(si.v[42].fault, TWN_SRC_BAD_UTF8);
            assert_string_equal(si.v[41].err.msg,
                                "s3://twn-test/docs/part-0.jsonl: line 43 (byte 2160): no \"id\"; "
                                "expected a string or an integer id (or derive_missing_id)");
            assert_string_equal(si.v[300].id, "last");
            assert_string_equal(si.v[301].id, "item-0");
            assert_int_equal(si.v[301].images[0].size, 60000);

            /* ref re-reads through S3: identical items, and only the item's own bytes fetched */
            twn_blob *bj, *bt;
            assert_int_equal(
                twn_blob_open_s3_uri(s, "s3://" BUCKET "/docs/part-0.jsonl", &bj, &err), 0);
            assert_int_equal(twn_blob_open_s3_uri(s, "s3://" BUCKET "/docs/shard-0.tar", &bt, &err),
                             0);
            size_t k = 0;
            for (size_t u = 0; u < su.n; u++)
                for (uint64_t j = 0; j < su.v[u].count; j++, k++) {
                    if (k % 7 && k != 42 && k != 350) continue;
                    twn_src_ref ref = twn_src_ref_of(&su.v[u], &si.v[k]);
                    twn_blob *b = su.v[u].format == TWN_SRC_TAR ? bt : bj;
                    twn_s3_stats before = twn_s3_get_stats(s);
                    twn_src_item it = {0};
                    if (twn_src_read_ref(b, &ref, NULL, &it, &err)) fail_msg("%s", err.msg);
                    twn_s3_stats after = twn_s3_get_stats(s);
                    items one = {.v = &it, .n = 1}, want = {.v = &si.v[k], .n = 1};
                    compare_items(&want, &one, "", "");
                    /* JSONL: the line plus the byte before and after; tar: the item's span */
                    uint64_t fetched = after.bytes_in - before.bytes_in;
                    if (su.v[u].format == TWN_SRC_TAR) /* + the reader's 1 KiB look-ahead */
                        assert_true(fetched <= si.v[k].length + 1024);
                    else /* + the '\n' before and after */
                        assert_true(fetched <= si.v[k].length + 2);
                    assert_true(fetched >= si.v[k].length);
                    twn_src_item_clear(&it);
                }
            twn_blob_close(bj);
            twn_blob_close(bt);
            free_items(&li);
            free_items(&si);
        }
        twn_src_units_free(&lu);
        twn_src_units_free(&su);
    }

    /* protobuf round trip of an S3 unit and item ref */
    twn_src_units su = {0};
    twn_err err = {{0}};
    assert_int_equal(
        twn_src_plan_s3_units(s, "s3://" BUCKET "/docs/shard", TWN_SRC_AUTO, 50, &su, &err), 0);
    assert_int_equal(su.n, 4);
    Twn__SourceRef sr;
    twn_s3_proto_buf pb;
    assert_int_equal(twn_src_s3_unit_to_proto(&su.v[1], &sr, &pb, &err), 0);
    assert_int_equal(sr.store, TWN__STORE__STORE_S3);
    assert_string_equal(sr.bucket, BUCKET);
    assert_string_equal(sr.path, "docs/shard-0.tar");
    twn_src_unit back;
    assert_int_equal(twn_src_s3_unit_from_proto(su.v[1].id, &sr, &back, &err), 0);
    assert_string_equal(back.path, su.v[1].path);
    assert_int_equal(back.start, su.v[1].start);
    assert_int_equal(back.end, su.v[1].end);
    assert_int_equal(back.count, su.v[1].count);
    twn_free(back.path);
    sr.store = TWN__STORE__STORE_FILE;
    assert_int_equal(twn_src_s3_unit_from_proto(1, &sr, &back, &err), -1);
    assert_string_equal(err.msg, "source 'docs/shard-0.tar': store 1 is not S3 (STORE_S3 = 2)");
    twn_src_item it = {.index = 60, .offset = su.v[1].start, .length = 512, .id = "item-60"};
    Twn__ItemRef ir;
    assert_int_equal(twn_src_s3_ref_to_proto(&su.v[1], &it, &ir, &sr, &pb, &err), 0);
    twn_src_ref ref;
    char *rpath;
    assert_int_equal(twn_src_s3_ref_from_proto(&ir, &ref, &rpath, &err), 0);
    assert_string_equal(ref.path, "s3://" BUCKET "/docs/shard-0.tar");
    assert_int_equal(ref.offset, su.v[1].start);
    assert_int_equal(ref.index, 60);
    twn_free(rpath);
    twn_src_units_free(&su);
    twn_s3_close(s);
}

// ------------------------------------------------------------------------------------------------
// Faults

static void test_retries(void **state) {
    (void)state;
    twn_s3 *s = client(SECRET);
    s3p_bucket(s, BUCKET);
    size_t n = 200000;
    uint8_t *data = random_bytes(n, 11), *buf = malloc(n);
    s3p_put(s, BUCKET, "faults/obj.bin", data, n);
    twn_err err = {{0}};
    size_t got;

    /* two 500s, then success */
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault", "{\"kind\": \"500\", \"count\": 2, \"match\": \"faults/obj\"}");
    twn_s3_stats b0 = twn_s3_get_stats(s);
    if (twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 1000, 5000, buf, &got, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(got, 5000);
    assert_memory_equal(buf, data + 1000, 5000);
    twn_s3_stats b1 = twn_s3_get_stats(s);
    assert_int_equal(b1.retries - b0.retries, 2);
    assert_int_equal(b1.requests - b0.requests, 3);

    /* connection resets before any byte, twice (curl itself retries the first reset of a
     * reused connection once on a fresh one, so the client counts one or two retries) */
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"reset\", \"count\": 2, \"match\": \"faults/obj\"}");
    if (twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 0, n, buf, &got, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(got, n);
    assert_memory_equal(buf, data, n);
    b0 = twn_s3_get_stats(s);
    assert_true(b0.retries - b1.retries >= 1);
    json_t *st = s3p_stats(&g_s3);
    assert_int_equal(stat_int(st, "requests"), 3);
    assert_int_equal(stat_int(st, "faults"), 2);
    json_decref(st);

    /* a body cut in half: the retry asks only for the missing second half */
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"truncate\", \"count\": 1, \"match\": \"faults/obj\"}");
    memset(buf, 0, n);
    if (twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 10000, 100000, buf, &got, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(got, 100000);
    assert_memory_equal(buf, data + 10000, 100000);
    st = s3p_stats(&g_s3);
    json_t *log = json_object_get(st, "log");
    assert_int_equal(json_array_size(log), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(log, 0), "range")),
                        "bytes=10000-109999");
    assert_string_equal(json_string_value(json_object_get(json_array_get(log, 1), "range")),
                        "bytes=60000-109999");
    json_decref(st);

    /* 503 SlowDown with Retry-After: 1 -> waits at least a second although backoff is 10 ms */
    s3p_post(&g_s3, "/__twn/fault", "{\"kind\": \"503\", \"count\": 1, \"retry_after\": \"1\"}");
    double t0 = twn_now();
    if (twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 0, 100, buf, &got, &err))
        fail_msg("%s", err.msg);
    double dt = twn_now() - t0;
    assert_true(dt >= 1.0);
    assert_true(dt < 5.0);
    assert_memory_equal(buf, data, 100);
    twn_s3_close(s);

    /* a stalled body: the 1 s stall timeout fires, the retry gets the bytes */
    twn_s3_config c = cfg_for(SECRET);
    c.stall_timeout_s = 1;
    assert_int_equal(twn_s3_open(&c, &s, &err), 0);
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"slow\", \"count\": 1, \"delay_ms\": 8000, \"match\": \"faults/\"}");
    t0 = twn_now();
    if (twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 0, n, buf, &got, &err))
        fail_msg("%s", err.msg);
    dt = twn_now() - t0;
    assert_int_equal(got, n);
    assert_memory_equal(buf, data, n);
    assert_int_equal(twn_s3_get_stats(s).retries, 1);
    assert_true(dt < 6.0);
    twn_s3_close(s);

    /* persistent 500s: gives up after max_retries + 1 attempts, naming the last failure */
    c = cfg_for(SECRET);
    c.max_retries = 2;
    assert_int_equal(twn_s3_open(&c, &s, &err), 0);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"500\", \"count\": 100, \"match\": \"faults/obj\"}");
    assert_int_equal(twn_s3_get_range(s, BUCKET, "faults/obj.bin", NULL, 0, 10, buf, &got, &err),
                     -1);
    st = s3p_stats(&g_s3);
    char want[512];
    snprintf(want, sizeof want,
             "s3: GET s3://twn-test/faults/obj.bin (bytes 0-9): gave up after 3 attempts; last: "
             "HTTP 500 InternalError: We encountered an internal error. Please try again. "
             "(x-amz-request-id %s)",
             json_string_value(json_object_get(st, "last_request_id")));
    assert_string_equal(err.msg, want);
    assert_int_equal(stat_int(st, "requests"), 3);
    json_decref(st);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    twn_s3_close(s);

    /* nothing listening: connection refused is retried, then reported */
    c = cfg_for(SECRET);
    c.max_retries = 1;
    c.endpoint = "http://127.0.0.1:1";
    assert_int_equal(twn_s3_open(&c, &s, &err), 0);
    assert_int_equal(twn_s3_get_range(s, BUCKET, "x", NULL, 0, 10, buf, &got, &err), -1);
    assert_non_null(strstr(err.msg, "s3: GET s3://twn-test/x (bytes 0-9): gave up after 2 "
                                    "attempts; last: curl error 7 (Couldn't connect to server)"));
    twn_s3_close(s);
    free(buf);
    free(data);
}

static void test_not_found_and_changed(void **state) {
    (void)state;
    twn_s3 *s = client(SECRET);
    s3p_bucket(s, BUCKET);
    twn_err err = {{0}};
    char buf[64];
    size_t got;
    s3p_post(&g_s3, "/__twn/reset", "{}");
    assert_int_equal(twn_s3_get_range(s, BUCKET, "missing/x.jsonl", NULL, 0, 10, buf, &got, &err),
                     -1);
    json_t *st = s3p_stats(&g_s3);
    char want[512];
    snprintf(want, sizeof want,
             "s3: GET s3://twn-test/missing/x.jsonl (bytes 0-9): HTTP 404 NoSuchKey: The "
             "specified key does not exist. (x-amz-request-id %s)",
             json_string_value(json_object_get(st, "last_request_id")));
    assert_string_equal(err.msg, want);
    assert_int_equal(stat_int(st, "requests"), 1);
    json_decref(st);
    assert_int_equal(twn_s3_get_range(s, "no-such-bucket", "k", NULL, 0, 10, buf, &got, &err), -1);
    assert_non_null(strstr(err.msg, "s3: GET s3://no-such-bucket/k (bytes 0-9): HTTP 404 "
                                    "NoSuchBucket: The specified bucket does not exist"));
    twn_blob *b;
    assert_int_equal(twn_blob_open_s3_uri(s, "s3://" BUCKET "/missing/y.tar", &b, &err), -1);
    assert_non_null(strstr(err.msg, "s3: HEAD s3://twn-test/missing/y.tar: HTTP 404 Not Found (no "
                                    "such bucket or key) (x-amz-request-id TWN"));
    twn_src_units units = {0};
    assert_int_equal(
        twn_src_plan_s3_units(s, "s3://no-such-bucket/p", TWN_SRC_AUTO, 10, &units, &err), -1);
    assert_non_null(strstr(err.msg, "s3: list s3://no-such-bucket/p: HTTP 404 NoSuchBucket"));
    /* an empty prefix plans nothing */
    assert_int_equal(
        twn_src_plan_s3_units(s, "s3://" BUCKET "/nothing-here/", TWN_SRC_AUTO, 10, &units, &err),
        0);
    assert_int_equal(units.n, 0);
    assert_int_equal(twn_blob_open_path(NULL, "s3://" BUCKET "/k", &b, &err), -1);
    assert_string_equal(err.msg, "s3://twn-test/k: an S3 object, but no S3 client was configured");

    /* an object replaced after the blob was opened: the read names both ETags */
    s3p_put(s, BUCKET, "chg/a.jsonl", "{\"id\": 1, \"text\": \"one\"}\n", 25);
    assert_int_equal(twn_blob_open_s3_uri(s, "s3://" BUCKET "/chg/a.jsonl", &b, &err), 0);
    s3p_put(s, BUCKET, "chg/a.jsonl", "{\"id\": 2, \"text\": \"two\"}\n", 25);
    assert_int_equal(b->read_at(b, 0, buf, 10, &got, &err), -1);
    assert_non_null(strstr(err.msg, "s3: GET s3://twn-test/chg/a.jsonl (bytes 0-9): the object "
                                    "changed: its ETag is now \""));
    assert_non_null(strstr(err.msg, "\", expected \""));
    twn_blob_close(b);

    /* multipart upload of 12 MiB: an 8 MiB part, then 4 MiB at finish; read back exactly */
    twn_s3_upload *u;
    size_t n = 12u << 20;
    uint8_t *data = random_bytes(n, 3);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    assert_int_equal(twn_s3_upload_begin(s, BUCKET, "out/emb.npy", &u, &err), 0);
    assert_int_equal(twn_s3_upload_write(u, data, n, &err), 0);
    assert_int_equal(twn_s3_upload_parts(u), 1);
    if (twn_s3_upload_finish(u, &err)) fail_msg("%s", err.msg);
    uint64_t size;
    char etag[128];
    assert_int_equal(twn_s3_head(s, BUCKET, "out/emb.npy", &size, etag, sizeof etag, &err), 0);
    assert_int_equal(size, n);
    /* initiate, two parts, complete (then the HEAD) */
    json_t *st2 = s3p_stats(&g_s3);
    json_t *log = json_object_get(st2, "log");
    assert_int_equal(json_array_size(log), 5);
    const char *want_req[4][2] = {{"POST", "/twn-test/out/emb.npy?uploads="},
                                  {"PUT", "/twn-test/out/emb.npy?partNumber=1&uploadId="},
                                  {"PUT", "/twn-test/out/emb.npy?partNumber=2&uploadId="},
                                  {"POST", "/twn-test/out/emb.npy?uploadId="}};
    for (size_t i = 0; i < 4; i++) {
        json_t *e = json_array_get(log, i);
        assert_string_equal(json_string_value(json_object_get(e, "method")), want_req[i][0]);
        const char *path = json_string_value(json_object_get(e, "path"));
        assert_memory_equal(path, want_req[i][1], strlen(want_req[i][1]));
        assert_int_equal(json_integer_value(json_object_get(e, "status")), 200);
    }
    json_decref(st2);
    /* an abandoned upload (a part already sent) leaves nothing under the key */
    assert_int_equal(twn_s3_upload_begin(s, BUCKET, "out/abandoned.npy", &u, &err), 0);
    assert_int_equal(twn_s3_upload_write(u, data, (9u << 20), &err), 0);
    assert_int_equal(twn_s3_upload_parts(u), 1);
    twn_s3_upload_abort(u);
    assert_int_equal(twn_s3_head(s, BUCKET, "out/abandoned.npy", &size, NULL, 0, &err), -1);
    assert_non_null(strstr(err.msg, "HEAD s3://twn-test/out/abandoned.npy: HTTP 404"));
    uint8_t *back = malloc(n);
    assert_int_equal(twn_s3_get_range(s, BUCKET, "out/emb.npy", etag, 0, n, back, &got, &err), 0);
    assert_int_equal(got, n);
    assert_memory_equal(back, data, n);
    free(back);
    free(data);
    twn_s3_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uri_and_config),        cmocka_unit_test(test_wrong_secret),
        cmocka_unit_test(test_keys_ranges_reuse),     cmocka_unit_test(test_list_pages),
        cmocka_unit_test(test_plan_and_read),         cmocka_unit_test(test_retries),
        cmocka_unit_test(test_not_found_and_changed),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
