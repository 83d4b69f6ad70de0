/* test_outdir_s3.c — index outputs published to S3 (index/outdir_s3.h) against s3rver behind
 * tests/tools/s3_front.mjs (SigV4 checked) on 127.0.0.1:
 *   - an output directory with a 12 MiB index goes up as a 3-part multipart upload (5 MiB parts),
 *     a 500 on one part is retried, every object comes back byte for byte, and manifest.json is
 *     the last request (after the index upload completed);
 *   - a directory missing a file fails before anything is sent, naming the file;
 *   - a job's output (two shards' CURRENT snapshots and the dead letters) lands under the prefix
 *     as exactly the expected keys. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/s3.h"
#include "index/outdir_s3.h"
#include "tests/testutil.h"
#include "tests/tools/s3_front.h"
#include "util/mem.h"

#define AK     "TWNOUTAKID"
#define SECRET "twn-out/Secret+Key42"
#define BUCKET "twn-out"

static s3_front g_front;

static int group_setup(void **state) {
    (void)state;
    char why[1400];
    if (s3_front_start(&g_front, TWN_SOURCE_DIR, tu_tmpdir("outdir-s3-front"), AK, SECRET, 300, why,
                       sizeof why)) {
        fprintf(stderr, "test_outdir_s3: %s\n", why);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    s3_front_stop(&g_front);
    return 0;
}

static twn_s3 *client(void) {
    twn_s3_config c = twn_s3_config_default();
    c.endpoint = g_front.endpoint;
    c.region = "us-east-1";
    c.access_key = AK;
    c.secret_key = SECRET;
    c.backoff_base_s = 0.01;
    c.backoff_max_s = 0.05;
    c.part_size = 5u << 20;
    twn_s3 *s;
    twn_err err = {{0}};
    if (twn_s3_open(&c, &s, &err)) fail_msg("%s", err.msg);
    if (twn_s3_create_bucket(s, BUCKET, &err)) fail_msg("%s", err.msg);
    return s;
}

static json_t *front(const char *path, const char *post) {
    twn_str r = {0};
    long st = s3_front_control(&g_front, path, post, &r);
    if (st != 200) fail_msg("%s -> %ld", path, st);
    json_error_t je;
    json_t *j = json_loads(r.v, 0, &je);
    twn_str_free(&r);
    assert_non_null(j);
    return j;
}

static const char *const FILES[] = {"index.faiss", "embeddings.npy", "faiss_ids.npy", "items.jsonl",
                                    "manifest.json"};

/* Writes the five files into dir; index.faiss has index_bytes pseudo-random bytes. */
static void make_outdir(const char *dir, size_t index_bytes, uint32_t seed) {
    mkdir(dir, 0755);
    for (int i = 0; i < 5; i++) {
        size_t n = i == 0 ? index_bytes : 1000 + 37 * (size_t)i;
        uint8_t *b = twn_malloc(n);
        uint32_t x = seed * 2654435761u + (uint32_t)i + 1;
        for (size_t k = 0; k < n; k++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            b[k] = (uint8_t)x;
        }
        char p[1200];
        snprintf(p, sizeof p, "%s/%s", dir, FILES[i]);
        tu_write(p, b, n);
        twn_free(b);
    }
}

/* The object equals the local file. */
static void same_object(twn_s3 *s, const char *key, const char *path) {
    size_t n;
    char *want = tu_read(path, &n);
    uint8_t *got;
    size_t gn;
    twn_err err = {{0}};
    if (twn_s3_get(s, BUCKET, key, 64u << 20, &got, &gn, &err)) fail_msg("%s", err.msg);
    assert_int_equal(gn, n);
    assert_memory_equal(got, want, n);
    twn_free(got);
    free(want);
}

static void test_upload_manifest_last(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("outdir-s3-one");
    make_outdir(dir, 12u << 20, 1);
    twn_s3 *s = client();
    json_decref(front("/__twn/reset", "{}"));
    json_decref(front("/__twn/fault", "{\"kind\": \"500\", \"count\": 1, \"method\": \"PUT\", "
                                      "\"match\": \"partNumber=2\"}"));
    twn_err err = {{0}};
    if (twn_outdir_upload(dir, s, "s3://" BUCKET "/jobs/a/shard-00000", &err))
        fail_msg("%s", err.msg);
    for (int i = 0; i < 5; i++) {
        char key[256], p[1200];
        snprintf(key, sizeof key, "jobs/a/shard-00000/%s", FILES[i]);
        snprintf(p, sizeof p, "%s/%s", dir, FILES[i]);
        same_object(s, key, p);
    }
    json_t *st = front("/__twn/stats", NULL);
    assert_int_equal(json_integer_value(json_object_get(st, "faults")), 1);
    json_t *log = json_object_get(st, "log");
    /* the upload's requests: index.faiss as initiate + 3 parts (one retried) + complete, then one
     * PUT each for the small files, the manifest last (the GETs above come after it) */
    int parts = 0, complete_at = -1, manifest_at = -1, last_put = -1;
    size_t i;
    json_t *e;
    json_array_foreach(log, i, e) {
        const char *m = json_string_value(json_object_get(e, "method"));
        const char *p = json_string_value(json_object_get(e, "path"));
        if (!strcmp(m, "PUT") && strstr(p, "index.faiss?partNumber=") &&
            json_integer_value(json_object_get(e, "status")) == 200)
            parts++;
        if (!strcmp(m, "POST") && strstr(p, "index.faiss?uploadId=")) complete_at = (int)i;
        if (!strcmp(m, "PUT") && strstr(p, "/manifest.json")) manifest_at = (int)i;
        if (!strcmp(m, "PUT") || !strcmp(m, "POST")) last_put = (int)i;
    }
    assert_int_equal(parts, 3);
    assert_true(complete_at >= 0 && manifest_at > complete_at);
    assert_int_equal(manifest_at, last_put);
    json_decref(st);

    /* a missing file: an error naming it, and nothing sent */
    char p[1200];
    snprintf(p, sizeof p, "%s/faiss_ids.npy", dir);
    remove(p);
    json_decref(front("/__twn/reset", "{}"));
    assert_int_equal(twn_outdir_upload(dir, s, "s3://" BUCKET "/jobs/b/", &err), -1);
    char want[1600];
    snprintf(want, sizeof want,
             "%s/faiss_ids.npy: missing; an output directory has index.faiss, embeddings.npy, "
             "faiss_ids.npy, items.jsonl and manifest.json",
             dir);
    assert_string_equal(err.msg, want);
    st = front("/__twn/stats", NULL);
    assert_int_equal(json_integer_value(json_object_get(st, "requests")), 0);
    json_decref(st);
    twn_s3_close(s);
}

static void test_upload_job(void **state) {
    (void)state;
    const char *out = tu_tmpdir("outdir-s3-job");
    char p[1200];
    for (int k = 0; k < 2; k++) {
        snprintf(p, sizeof p, "%s/shard-%05d", out, k);
        mkdir(p, 0755);
        snprintf(p, sizeof p, "%s/shard-%05d/CURRENT", out, k);
        tu_write(p, "snap-000007\n", 12);
        snprintf(p, sizeof p, "%s/shard-%05d/snap-000007", out, k);
        make_outdir(p, 4096, (uint32_t)(10 + k));
        snprintf(p, sizeof p, "%s/shard-%05d/snap-000006", out, k); /* an older one: not sent */
        make_outdir(p, 100, 99);
    }
    snprintf(p, sizeof p, "%s/dead_letter.jsonl", out);
    tu_write(p, "{\"reason\": \"x\"}\n", 16);
    twn_s3 *s = client();
    twn_err err = {{0}};
    unsigned long long bytes = 0;
    if (twn_outdir_upload_job(out, 2, s, "s3://" BUCKET "/runs/nightly", &bytes, &err))
        fail_msg("%s", err.msg);
    twn_s3_objects l = {0};
    if (twn_s3_list(s, BUCKET, "runs/", &l, &err)) fail_msg("%s", err.msg);
    twn_str keys = {0};
    for (size_t i = 0; i < l.n; i++) twn_str_printf(&keys, "%s\n", l.v[i].key);
    assert_string_equal(keys.v, "runs/nightly/dead_letter.jsonl\n"
                                "runs/nightly/shard-00000/embeddings.npy\n"
                                "runs/nightly/shard-00000/faiss_ids.npy\n"
                                "runs/nightly/shard-00000/index.faiss\n"
                                "runs/nightly/shard-00000/items.jsonl\n"
                                "runs/nightly/shard-00000/manifest.json\n"
                                "runs/nightly/shard-00001/embeddings.npy\n"
                                "runs/nightly/shard-00001/faiss_ids.npy\n"
                                "runs/nightly/shard-00001/index.faiss\n"
                                "runs/nightly/shard-00001/items.jsonl\n"
                                "runs/nightly/shard-00001/manifest.json\n");
    /* 2 x (4096 + 1037 + 1074 + 1111 + 1148) + 16 */
    assert_int_equal(bytes, 2ull * (4096 + 1037 + 1074 + 1111 + 1148) + 16);
    snprintf(p, sizeof p, "%s/shard-00001/snap-000007/items.jsonl", out);
    same_object(s, "runs/nightly/shard-00001/items.jsonl", p);
    twn_str_free(&keys);
    twn_s3_objects_free(&l);

    /* a shard without a snapshot */
    assert_int_equal(twn_outdir_upload_job(out, 3, s, "s3://" BUCKET "/runs/x", NULL, &err), -1);
    char want[1400];
    snprintf(want, sizeof want,
             "%s/shard-00002/CURRENT: cannot open (the shard has no snapshot): No such file or "
             "directory",
             out);
    assert_string_equal(err.msg, want);
    twn_s3_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_upload_manifest_last),
        cmocka_unit_test(test_upload_job),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
