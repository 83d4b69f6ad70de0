/* s3_peer.h — the S3 peer of the tests: s3rver behind tests/tools/s3_front.mjs (SigV4 checked,
 * faults injected on demand, see tests/tools/s3_front.h) on 127.0.0.1, with the client side the
 * tests share: a config with the front's keys and short backoffs, clients, PUTs, the front's
 * control paths and object checks.
 *
 * Header-only (static inline) so a test includes it without a CMake change.  Prefix s3p_.
 * Start it from a cmocka group setup and stop it from the group teardown (s3p_stop always stops
 * the node process, also after a failed start); the front also exits on its own when the test
 * process is gone or after max_seconds.
 *
 *     static s3p g_s3;
 *     static int group_setup(void **st) {
 *         return s3p_start(&g_s3, "test_x", "x-s3", AK, SECRET, BUCKET, 600);
 *     }
 *     static int group_teardown(void **st) { s3p_stop(&g_s3); return 0; }
 *     ...
 *     twn_s3 *s = s3p_client(&g_s3);
 *     s3p_put(s, BUCKET, "in/a.jsonl", data, n);
 *     s3p_post(&g_s3, "/__twn/fault", "{\"kind\": \"500\", \"count\": 1}");
 *     json_t *st = s3p_stats(&g_s3); */
#ifndef TWN_TESTS_UNIT_S3_PEER_H
#define TWN_TESTS_UNIT_S3_PEER_H

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/s3.h"
#include "tests/testutil.h"
#include "tests/tools/s3_front.h"
#include "util/mem.h"
#include "util/vec.h"

typedef struct s3p {
    s3_front front;     /* front.endpoint: http://127.0.0.1:PORT */
    const char *ak;     /* the access key id the front accepts */
    const char *secret; /* and its secret */
} s3p;

/* Starts the front under tu_tmpdir(tag) for max_seconds and creates `bucket` (NULL: none).
 * 0, or -1 with the reason on stderr after "who: " (a cmocka group setup's return value). */
static inline int s3p_start(s3p *p, const char *who, const char *tag, const char *ak,
                            const char *secret, const char *bucket, int max_seconds);

/* Stops the front (SIGTERM, SIGKILL after 5 s); a no-op when it is not running. */
static inline void s3p_stop(s3p *p) {
    s3_front_stop(&p->front);
}

/* A client config for the front: its endpoint and keys, us-east-1, backoff 0.01 to 0.05 s. */
static inline twn_s3_config s3p_config(const s3p *p) {
    twn_s3_config c = twn_s3_config_default();
    c.endpoint = p->front.endpoint;
    c.region = "us-east-1";
    c.access_key = p->ak;
    c.secret_key = p->secret;
    c.backoff_base_s = 0.01;
    c.backoff_max_s = 0.05;
    return c;
}

/* A client with config c; fails the test naming the reason. */
static inline twn_s3 *s3p_open(const twn_s3_config *c) {
    twn_s3 *s;
    twn_err err = {{0}};
    if (twn_s3_open(c, &s, &err)) fail_msg("%s", err.msg);
    return s;
}

/* A client with s3p_config(p); twn_s3_close it. */
static inline twn_s3 *s3p_client(const s3p *p) {
    twn_s3_config c = s3p_config(p);
    return s3p_open(&c);
}

/* Creates a bucket (an existing one of ours is fine); fails the test on an error. */
static inline void s3p_bucket(twn_s3 *s, const char *bucket) {
    twn_err err = {{0}};
    if (twn_s3_create_bucket(s, bucket, &err)) fail_msg("%s", err.msg);
}

/* PUTs n bytes to s3://bucket/key; fails the test on an error. */
static inline void s3p_put(twn_s3 *s, const char *bucket, const char *key, const void *data,
                           size_t n) {
    twn_err err = {{0}};
    if (twn_s3_put(s, bucket, key, data, n, &err)) fail_msg("%s", err.msg);
}

/* POSTs json to a control path of the front (/__twn/reset, /__twn/fault); fails unless 200. */
static inline void s3p_post(const s3p *p, const char *path, const char *json) {
    twn_str r = {0};
    long st = s3_front_control(&p->front, path, json, &r);
    if (st != 200) fail_msg("%s -> %ld %s", path, st, r.v ? r.v : "");
    twn_str_free(&r);
}

/* GET (post NULL) or POST a control path; its JSON reply (json_decref); fails unless 200. */
static inline json_t *s3p_control_json(const s3p *p, const char *path, const char *post) {
    twn_str r = {0};
    long st = s3_front_control(&p->front, path, post, &r);
    if (st != 200) fail_msg("%s -> %ld", path, st);
    json_error_t je;
    json_t *j = json_loads(r.v, 0, &je);
    twn_str_free(&r);
    assert_non_null(j);
    return j;
}

/* The front's /__twn/stats (requests, bytes_out, faults, the request log); json_decref it. */
static inline json_t *s3p_stats(const s3p *p) {
    twn_str r = {0};
    assert_int_equal(s3_front_control(&p->front, "/__twn/stats", NULL, &r), 200);
    json_error_t je;
    json_t *j = json_loads(r.v, 0, &je);
    twn_str_free(&r);
    assert_non_null(j);
    return j;
}

/* From the front's request log: the most GETs with `match` in their path that were under way at
 * one time (each one's [t0, t1) checked to be an interval; one still under way, t1 0, counts as
 * over); *n_gets: how many there were, under way or not. */
static inline int s3p_max_overlap(const s3p *p, const char *match, int *n_gets) {
    json_t *st = s3p_stats(p);
    json_t *log = json_object_get(st, "log");
    size_t n = json_array_size(log);
    double *t0 = twn_calloc(n + 1, sizeof *t0), *t1 = twn_calloc(n + 1, sizeof *t1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(log, i);
        if (strcmp(json_string_value(json_object_get(e, "method")), "GET") ||
            !strstr(json_string_value(json_object_get(e, "path")), match))
            continue;
        t0[k] = json_number_value(json_object_get(e, "t0"));
        t1[k] = json_number_value(json_object_get(e, "t1"));
        assert_true(t1[k] >= t0[k] || t1[k] == 0);
        k++;
    }
    int most = 0;
    for (size_t i = 0; i < k; i++) { /* at each start: how many are under way */
        int c = 0;
        for (size_t j = 0; j < k; j++) c += t0[j] <= t0[i] && t1[j] > t0[i];
        if (c > most) most = c;
    }
    *n_gets = (int)k;
    twn_free(t0);
    twn_free(t1);
    json_decref(st);
    return most;
}

/* The keys under s3://bucket/prefix, one "key\n" each in listing order, appended to *keys. */
static inline void s3p_keys(twn_s3 *s, const char *bucket, const char *prefix, twn_str *keys) {
    twn_s3_objects l = {0};
    twn_err err = {{0}};
    if (twn_s3_list(s, bucket, prefix, &l, &err)) fail_msg("%s", err.msg);
    for (size_t i = 0; i < l.n; i++) twn_str_printf(keys, "%s\n", l.v[i].key);
    twn_s3_objects_free(&l);
}

/* The object s3://bucket/key is byte for byte the local file at path (at most 64 MiB). */
static inline void s3p_same_object(twn_s3 *s, const char *bucket, const char *key,
                                   const char *path) {
    size_t n;
    char *want = tu_read(path, &n);
    uint8_t *got;
    size_t gn;
    twn_err err = {{0}};
    if (twn_s3_get(s, bucket, key, 64u << 20, &got, &gn, &err)) fail_msg("%s", err.msg);
    assert_int_equal(gn, n);
    assert_memory_equal(got, want, n);
    twn_free(got);
    free(want);
}

static inline int s3p_start(s3p *p, const char *who, const char *tag, const char *ak,
                            const char *secret, const char *bucket, int max_seconds) {
    memset(p, 0, sizeof *p);
    p->ak = ak;
    p->secret = secret;
    char why[1400];
    if (s3_front_start(&p->front, TWN_SOURCE_DIR, tu_tmpdir(tag), ak, secret, max_seconds, why,
                       sizeof why)) {
        fprintf(stderr, "%s: %s\n", who, why);
        return -1;
    }
    if (!bucket) return 0;
    twn_s3_config c = s3p_config(p);
    twn_s3 *s;
    twn_err err = {{0}};
    int rc = twn_s3_open(&c, &s, &err);
    if (!rc) {
        rc = twn_s3_create_bucket(s, bucket, &err);
        twn_s3_close(s);
    }
    if (rc) fprintf(stderr, "%s: %s\n", who, err.msg);
    return rc;
}

#endif
