/* test_outdir_s3.c — index outputs published to S3 (index/outdir_s3.h) against s3rver behind
 * tests/tools/s3_front.mjs (SigV4 checked) on 127.0.0.1:
 *   - an output directory with a 12 MiB index goes up as a 3-part multipart upload (5 MiB parts),
 *     a 500 on one part is retried, every object comes back byte for byte, and manifest.json is
 *     the last request (after the index upload completed);
 *   - a directory missing a file fails before anything is sent, naming the file;
 *   - a job's output (two shards' CURRENT snapshots and the dead letters) lands under the prefix
 *     as exactly the expected keys;
 *   - the roles as processes with job.out = s3://: each `twn indexer` uploads its shard, the
 *     coordinator the dead letters (test_fleet_s3_out). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/s3.h"
#include "index/outdir_s3.h"
#include "tests/testutil.h"
#include "tests/unit/procs.h"
#include "tests/unit/s3_peer.h"
#include "util/mem.h"

#define AK     "TWNOUTAKID"
#define SECRET "twn-out/Secret+Key42"
#define BUCKET "twn-out"

static s3p g_s3;

static int group_setup(void **state) {
    (void)state;
    return s3p_start(&g_s3, "test_outdir_s3", "outdir-s3-front", AK, SECRET, NULL, 300);
}

static int group_teardown(void **state) {
    (void)state;
    s3p_stop(&g_s3);
    return 0;
}

/* A client with 5 MiB parts; creates the bucket. */
static twn_s3 *client(void) {
    twn_s3_config c = s3p_config(&g_s3);
    c.part_size = 5u << 20;
    twn_s3 *s = s3p_open(&c);
    s3p_bucket(s, BUCKET);
    return s;
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

static void test_upload_manifest_last(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("outdir-s3-one");
    make_outdir(dir, 12u << 20, 1);
    twn_s3 *s = client();
    json_decref(s3p_control_json(&g_s3, "/__twn/reset", "{}"));
    json_decref(s3p_control_json(&g_s3, "/__twn/fault",
                                 "{\"kind\": \"500\", \"count\": 1, \"method\": \"PUT\", "
                                 "\"match\": \"partNumber=2\"}"));
    twn_err err = {{0}};
    if (twn_outdir_upload(dir, s, "s3://" BUCKET "/jobs/a/shard-00000", &err))
        fail_msg("%s", err.msg);
    for (int i = 0; i < 5; i++) {
        char key[256], p[1200];
        snprintf(key, sizeof key, "jobs/a/shard-00000/%s", FILES[i]);
        snprintf(p, sizeof p, "%s/%s", dir, FILES[i]);
        s3p_same_object(s, BUCKET, key, p);
    }
    json_t *st = s3p_control_json(&g_s3, "/__twn/stats", NULL);
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
    json_decref(s3p_control_json(&g_s3, "/__twn/reset", "{}"));
    assert_int_equal(twn_outdir_upload(dir, s, "s3://" BUCKET "/jobs/b/", &err), -1);
    char want[1600];
    snprintf(want, sizeof want,
             "%s/faiss_ids.npy: missing; an output directory has index.faiss, embeddings.npy, "
             "faiss_ids.npy, items.jsonl and manifest.json",
             dir);
    assert_string_equal(err.msg, want);
    st = s3p_control_json(&g_s3, "/__twn/stats", NULL);
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
    twn_str keys = {0};
    s3p_keys(s, BUCKET, "runs/", &keys);
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
    s3p_same_object(s, BUCKET, "runs/nightly/shard-00001/items.jsonl", p);
    twn_str_free(&keys);

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

/* `twn coordinator|indexer|gate|worker` as processes with job.out = s3://...: each indexer
 * stages its shard in its indexer.dir and uploads its final snapshot (manifest last), the
 * coordinator stages the dead letters beside its journal and uploads them.  An indexer whose
 * indexer.dir would be derived from the s3:// job.out is refused. */
static void test_fleet_s3_out(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("outdir-s3-fleet");
    char in[1200], cfg[1200], yaml[4096], p[4200];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    FILE *f = fopen(in, "w");
    assert_non_null(f);
    for (int i = 0; i < 300; i++) fprintf(f, "{\"id\": \"f%04d\", \"text\": \"item %d\"}\n", i, i);
    fprintf(f, "{\"text\": \"no id\"}\n");
    fclose(f);
    snprintf(yaml, sizeof yaml,
             "job:\n  inputs: [%s]\n  out: s3://" BUCKET "/fleet/run1\n  engine: null\n"
             "  dim: 16\n  shards: 2\n  unit_items: 50\n"
             "coordinator:\n  listen: ipc://%s/ctl\n  journal: %s/stage/journal\n"
             "  heartbeat_ms: 200\n  connect_timeout_ms: 60000\n"
             "indexer:\n  endpoints: [ipc://%s/s0, ipc://%s/s1]\n"
             "s3:\n  endpoint: %s\n  access_key_id: " AK "\n  secret_access_key: " SECRET "\n"
             "  region: us-east-1\n",
             in, dir, dir, dir, dir, g_s3.front.endpoint);
    snprintf(cfg, sizeof cfg, "%s/job.yaml", dir);
    tu_write(cfg, yaml, strlen(yaml));
    twn_s3 *s = client(); /* creates the bucket */

    /* indexer.dir derived from job.out would be s3://...: refused */
    tp_proc *bad = tp_spawn("ix-bad", dir, TWN_BIN, "indexer", "--config", cfg, NULL);
    assert_int_equal(tp_wait(bad, 30), 0);
    assert_int_equal(bad->status, 2);
    char *log = tp_log(bad);
    assert_non_null(strstr(log, "twn indexer: job.out is s3://" BUCKET "/fleet/run1: set "
                                "indexer.dir to a local directory; the shard is staged there and "
                                "uploaded at the end"));
    free(log);

    char ixdir[2][1300];
    tp_proc *ix[2];
    for (int k = 0; k < 2; k++) {
        char name[16], shard[8];
        snprintf(name, sizeof name, "indexer-%d", k);
        snprintf(shard, sizeof shard, "%d", k);
        snprintf(ixdir[k], sizeof ixdir[k], "%s/ix%d/shard", dir, k);
        ix[k] = tp_spawn(name, dir, TWN_BIN, "indexer", "--config", cfg, "--shard", shard,
                         "--indexer.dir", ixdir[k], NULL);
    }
    tp_proc *gate = tp_spawn("gate", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_proc *worker = tp_spawn("worker", dir, TWN_BIN, "worker", "--config", cfg, NULL);
    tp_proc *coord = tp_spawn("coordinator", dir, TWN_BIN, "coordinator", "--config", cfg, NULL);
    if (tp_wait_all(120)) fail_msg("processes did not end by themselves:%s", tp_report());
    tp_proc *all[] = {ix[0], ix[1], gate, worker, coord};
    for (size_t i = 0; i < 5; i++)
        if (all[i]->status)
            fail_msg("%s exited with %d:%s", all[i]->name, all[i]->status, tp_report());
    log = tp_log(coord);
    assert_non_null(strstr(log, "units 7 items 301 "));
    assert_non_null(strstr(log, "bytes to s3://" BUCKET "/fleet/run1/dead_letter.jsonl\n"));
    free(log);
    for (int k = 0; k < 2; k++) {
        char want[128];
        snprintf(want, sizeof want, "bytes to s3://" BUCKET "/fleet/run1/shard-%05d/\n", k);
        log = tp_log(ix[k]);
        if (!strstr(log, want)) fail_msg("indexer-%d: no \"%s\" in:\n%s", k, want, log);
        free(log);
    }
    twn_str keys = {0};
    s3p_keys(s, BUCKET, "fleet/", &keys);
    assert_string_equal(keys.v, "fleet/run1/dead_letter.jsonl\n"
                                "fleet/run1/shard-00000/embeddings.npy\n"
                                "fleet/run1/shard-00000/faiss_ids.npy\n"
                                "fleet/run1/shard-00000/index.faiss\n"
                                "fleet/run1/shard-00000/items.jsonl\n"
                                "fleet/run1/shard-00000/manifest.json\n"
                                "fleet/run1/shard-00001/embeddings.npy\n"
                                "fleet/run1/shard-00001/faiss_ids.npy\n"
                                "fleet/run1/shard-00001/index.faiss\n"
                                "fleet/run1/shard-00001/items.jsonl\n"
                                "fleet/run1/shard-00001/manifest.json\n");
    /* byte for byte: the staged dead letters and each shard's current snapshot */
    snprintf(p, sizeof p, "%s/stage/dead_letter.jsonl", dir);
    s3p_same_object(s, BUCKET, "fleet/run1/dead_letter.jsonl", p);
    size_t n_items = 0;
    for (int k = 0; k < 2; k++) {
        char snap[4200];
        size_t n;
        tp_snapshot_dir(ixdir[k], snap, sizeof snap);
        for (int i = 0; i < 5; i++) {
            char key[128], fp[4400];
            snprintf(key, sizeof key, "fleet/run1/shard-%05d/%s", k, FILES[i]);
            snprintf(fp, sizeof fp, "%s/%s", snap, FILES[i]);
            s3p_same_object(s, BUCKET, key, fp);
            if (i == 3) {
                char *items = tu_read(fp, &n);
                for (char *c = items; *c; c++) n_items += *c == '\n';
                free(items);
            }
        }
    }
    assert_int_equal(n_items, 300); /* every good item, in one shard or the other */
    twn_str_free(&keys);
    twn_s3_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_upload_manifest_last),
        cmocka_unit_test(test_upload_job),
        cmocka_unit_test_teardown(test_fleet_s3_out, tp_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
