/* test_prefetch.c — the S3 read-ahead pool (common/prefetch.h, the job config's s3.readers)
 * against s3rver behind tests/tools/s3_front.mjs on 127.0.0.1:
 *
 *  - with every object GET slowed by the front (headers, then 250 ms of silence, then the body),
 *    16 units fetched by 4 readers take about a quarter of the time one reader takes; the
 *    front's request log shows 4 GETs under way at once (and never more than the readers), and
 *    the items read from the fetched windows are every item exactly once, as read directly;
 *  - memory is bounded: a job that finds less than 64 KiB of room under max_bytes is refused, a
 *    unit larger than the room gets a cut window and reads the rest from S3 itself (same items),
 *    and the bytes held return to 0 when the blobs are closed; a missing object makes take()
 *    return NULL (the gate then reads the unit the ordinary way, naming the failure). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/prefetch.h"
#include "common/source_io.h"
#include "common/source_s3.h"
#include "tests/testutil.h"
#include "tests/unit/s3_peer.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"

#define AK     "TWNPFAKID"
#define SECRET "twn-prefetch/Secret+Key01"
#define BUCKET "twn-pf"

static s3p g_s3;

static int group_setup(void **state) {
    (void)state;
    return s3p_start(&g_s3, "test_prefetch", "prefetch-s3", AK, SECRET, BUCKET, 300);
}

static int group_teardown(void **state) {
    (void)state;
    s3p_stop(&g_s3);
    return 0;
}

/* `files` JSONL objects of `lines` lines under prefix ("<prefix>-<f>-<i>" ids, padded text). */
static void put_objects(const char *prefix, int files, int lines, int pad) {
    twn_s3 *s = s3p_client(&g_s3);
    twn_str b = {0};
    for (int f = 0; f < files; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < lines; i++) {
            twn_str_printf(&b, "{\"id\": \"%s-%d-%03d\", \"text\": \"item %d ", prefix, f, i, i);
            for (int k = 0; k < pad; k++) twn_str_append(&b, "x", 1);
            twn_str_printf(&b, "\"}\n");
        }
        char key[128];
        snprintf(key, sizeof key, "%s/part-%02d.jsonl", prefix, f);
        s3p_put(s, BUCKET, key, b.v, b.n);
    }
    twn_str_free(&b);
    twn_s3_close(s);
}

static twn_src_units plan(const char *prefix, uint64_t unit_items) {
    twn_s3 *s = s3p_client(&g_s3);
    twn_src_units units = {0};
    twn_err err = {{0}};
    char uri[128];
    snprintf(uri, sizeof uri, "s3://" BUCKET "/%s/", prefix);
    if (twn_src_plan_s3_units(s, uri, TWN_SRC_AUTO, unit_items, &units, &err))
        fail_msg("%s", err.msg);
    twn_s3_close(s);
    return units;
}

/* Reads every item of unit u from blob b (owned) into ids (each id once). */
static size_t read_unit(twn_blob *b, const twn_src_unit *u, json_t *ids) {
    twn_srcio_reader *r;
    twn_err err = {{0}};
    if (twn_srcio_reader_open_blob(b, u, NULL, &r, &err)) fail_msg("%s", err.msg);
    twn_src_item it = {0};
    size_t n = 0;
    int got;
    while ((got = twn_srcio_reader_next(r, &it, &err)) == 1) {
        assert_int_equal(it.fault, TWN_SRC_OK);
        if (json_object_get(ids, it.id)) fail_msg("%s read twice", it.id);
        json_object_set_new(ids, it.id, json_true());
        n++;
    }
    if (got < 0) fail_msg("%s", err.msg);
    twn_src_item_clear(&it);
    twn_srcio_reader_close(r);
    return n;
}

/* Fetches every unit with a pool of `readers`, reads them; returns the seconds the fetches took
 * (start of the first to the last take). */
static double fetch_all(const twn_src_units *units, int readers, json_t *ids, int *busy_max) {
    twn_prefetch *p;
    twn_err err = {{0}};
    twn_s3_config cfg = s3p_config(&g_s3);
    assert_int_equal(twn_prefetch_open(&cfg, readers, 0, &p, &err), 0);
    twn_prefetch_job **jobs = twn_calloc(units->n, sizeof *jobs);
    double t0 = twn_now();
    for (size_t i = 0; i < units->n; i++)
        assert_non_null(jobs[i] = twn_prefetch_start(p, &units->v[i]));
    twn_blob **blobs = twn_calloc(units->n, sizeof *blobs);
    for (size_t i = 0; i < units->n; i++)
        assert_non_null(blobs[i] = twn_prefetch_take(jobs[i], NULL));
    double secs = twn_now() - t0;
    for (size_t i = 0; i < units->n; i++)
        assert_int_equal(read_unit(blobs[i], &units->v[i], ids), units->v[i].count);
    twn_prefetch_stats st = twn_prefetch_get_stats(p);
    assert_int_equal(st.started, units->n);
    assert_int_equal(st.fetched, units->n);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.held, 0); /* every blob closed */
    *busy_max = st.busy_max;
    twn_prefetch_close(p);
    twn_free(jobs);
    twn_free(blobs);
    return secs;
}

static void test_readers_fetch_concurrently(void **state) {
    (void)state;
    put_objects("par", 8, 60, 40);
    twn_src_units units = plan("par", 30); /* 16 units */
    assert_int_equal(units.n, 16);
    /* every object GET from now on: headers, 250 ms of silence, the body */
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"slow\", \"count\": 1000, \"delay_ms\": 250, "
             "\"method\": \"GET\", \"match\": \"/par/\"}");
    json_t *ids1 = json_object(), *ids4 = json_object();
    int busy1, busy4, gets1, gets4;
    double t1 = fetch_all(&units, 1, ids1, &busy1);
    int over1 = s3p_max_overlap(&g_s3, "/par/", &gets1);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"slow\", \"count\": 1000, \"delay_ms\": 250, "
             "\"method\": \"GET\", \"match\": \"/par/\"}");
    double t4 = fetch_all(&units, 4, ids4, &busy4);
    int over4 = s3p_max_overlap(&g_s3, "/par/", &gets4);
    printf("prefetch: 16 units, 250 ms per GET: 1 reader %.2f s (%d GETs, at most %d at once), "
           "4 readers %.2f s (%d GETs, at most %d at once): %.1fx\n",
           t1, gets1, over1, t4, gets4, over4, t1 / t4);
    assert_int_equal(gets1, 16); /* one ranged GET per unit */
    assert_int_equal(gets4, 16);
    assert_int_equal(busy1, 1);
    assert_int_equal(busy4, 4);
    assert_int_equal(over1, 1);
    assert_int_equal(over4, 4);
    assert_true(t1 >= 16 * 0.25);
    /* the speed-up itself is printed, not asserted (a shared CI machine is no stopwatch): the
     * overlap counts above are what shows the 4 readers fetch at once */
    /* every item exactly once, the same set either way */
    assert_int_equal(json_object_size(ids1), 8 * 60);
    assert_true(json_equal(ids1, ids4));
    json_decref(ids1);
    json_decref(ids4);
    twn_src_units_free(&units);
    s3p_post(&g_s3, "/__twn/reset", "{}");
}

static void test_bounded_and_fallbacks(void **state) {
    (void)state;
    put_objects("bnd", 2, 100, 900); /* ~93 KB objects, one unit each */
    twn_src_units units = plan("bnd", 1000);
    assert_int_equal(units.n, 2);
    uint64_t len = units.v[0].end - units.v[0].start;
    assert_true(len > 90000 && len < 100000);
    twn_prefetch *p;
    twn_err err = {{0}};
    twn_s3_config cfg = s3p_config(&g_s3);
    size_t cap = 120000; /* room for one unit, not for its look-ahead too */
    assert_int_equal(twn_prefetch_open(&cfg, 2, cap, &p, &err), 0);
    twn_prefetch_job *a = twn_prefetch_start(p, &units.v[0]);
    assert_non_null(a);
    /* the unit and as much again past it (the reader's look-ahead) do not fit: the window is
     * cut to the room, and none is left -> refused */
    assert_null(twn_prefetch_start(p, &units.v[1]));
    twn_prefetch_stats st = twn_prefetch_get_stats(p);
    assert_int_equal(st.held, cap);
    assert_int_equal(st.refused, 1);
    twn_s3 *s = s3p_client(&g_s3);
    json_t *ids = json_object();
    assert_int_equal(read_unit(twn_prefetch_take(a, s), &units.v[0], ids), 100);
    assert_int_equal(twn_prefetch_get_stats(p).held, 0);

    /* a cut window: 70000 bytes fetched, the rest of the unit read through s */
    twn_prefetch_close(p);
    assert_int_equal(twn_prefetch_open(&cfg, 2, 70000, &p, &err), 0);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    twn_prefetch_job *b = twn_prefetch_start(p, &units.v[1]);
    assert_non_null(b);
    assert_int_equal(twn_prefetch_get_stats(p).held, 70000);
    twn_blob *bb = twn_prefetch_take(b, s);
    assert_non_null(bb);
    assert_int_equal(read_unit(bb, &units.v[1], ids), 100);
    assert_int_equal(json_object_size(ids), 200);
    st = twn_prefetch_get_stats(p);
    assert_int_equal(st.bytes, 70000);
    assert_int_equal(st.held, 0);

    /* dropped jobs (queued, under way or done) give their room back */
    twn_prefetch_job *d1 = twn_prefetch_start(p, &units.v[0]);
    assert_non_null(d1);
    twn_prefetch_drop(d1);
    /* a job a reader has taken up already is freed by it when its fetch ends */
    for (int i = 0; i < 500 && twn_prefetch_get_stats(p).held; i++) s3_front_nap(0.01);
    assert_int_equal(twn_prefetch_get_stats(p).held, 0);

    /* a local file or an object that is gone: nothing queued / NULL from take */
    twn_src_unit local = {.format = TWN_SRC_JSONL, .path = (char *)"/tmp/x.jsonl", .end = 10};
    assert_null(twn_prefetch_start(p, &local));
    twn_src_unit gone = units.v[0];
    gone.path = (char *)"s3://" BUCKET "/bnd/nothing-here.jsonl";
    twn_prefetch_job *g = twn_prefetch_start(p, &gone);
    assert_non_null(g);
    assert_null(twn_prefetch_take(g, s));
    st = twn_prefetch_get_stats(p);
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.held, 0);
    twn_prefetch_close(p);
    twn_prefetch *q = NULL;
    assert_int_equal(twn_prefetch_open(&cfg, 0, 0, &q, &err), -1);
    assert_null(q);
    assert_string_equal(err.msg, "prefetch: 0 readers; expected 1..256 (s3.readers)");
    twn_s3_close(s);
    json_decref(ids);
    twn_src_units_free(&units);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_readers_fetch_concurrently),
        cmocka_unit_test(test_bounded_and_fallbacks),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
