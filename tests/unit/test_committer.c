/* test_committer.c — group commits on their own thread (index/committer.h) and the WAL's
 * deferred writes beneath them:
 *   - deferred appends do no I/O; the commit cuts what is pending into blocks by the same rule as
 *     inline writes (exact block count), replay returns every record; an append writes inline
 *     only once TWN_WAL_DEFER_MAX bytes are pending (exact record), still without an fsync;
 *   - a shard adding while the committer commits: the durable seq it reports never passes the
 *     WAL's, reaches the last seq, with fewer commits than batches; the reopened shard holds
 *     every item with its vector;
 *   - the interval: no commit before commit_ms after the previous one started;
 *   - a child adding under a committer and "acking" each durable seq through a pipe is killed
 *     with SIGKILL: every acked item is in the reopened shard, with its exact vector;
 *   - a failing commit (the WAL directory gone) is sticky: poll and stop return its message. */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "index/committer.h"
#include "index/shard.h"
#include "index/store.h"
#include "index/wal.h"
#include "tests/testutil.h"
#include "util/clock.h"

#define D 8

static void expect_contains(const char *msg, const char *want) {
    if (!strstr(msg, want)) fail_msg("message\n  %s\ndoes not contain\n  %s", msg, want);
}

/* Item i: id "k-<i>", vector components (i % 64) / 64 + j / 16: multiples of 1/64 below 2, exact
 * in float16, so the store's copy compares equal. */
typedef struct {
    char id[32];
    float vec[D];
} item_buf;

static void make(item_buf *b, int i, twn_index_item *it) {
    snprintf(b->id, sizeof b->id, "k-%d", i);
    for (int j = 0; j < D; j++) b->vec[j] = (float)(i % 64) / 64.0f + (float)j / 16.0f;
    *it = (twn_index_item){.id = b->id,
                           .vec = b->vec,
                           .route = (uint8_t)(i % 2),
                           .p_think = 0.5f,
                           .think_tokens = (uint32_t)i};
}

/* Adds items [first, first+n) as one batch. */
static void add_batch(twn_shard *s, int first, int n) {
    item_buf *b = calloc((size_t)n, sizeof *b);
    twn_index_item *it = calloc((size_t)n, sizeof *it);
    for (int k = 0; k < n; k++) make(&b[k], first + k, &it[k]);
    twn_err err = {{0}};
    if (twn_shard_add(s, it, (size_t)n, NULL, &err)) fail_msg("add: %s", err.msg);
    free(b);
    free(it);
}

static twn_shard *open_shard(const char *dir, int defer) {
    twn_shard_opts o = {.dim = D, .factory = "Flat", .model = "m", .model_hash = "h"};
    o.wal_defer_writes = defer;
    twn_shard *s = NULL;
    twn_err err = {{0}};
    if (twn_shard_open(dir, &o, &s, NULL, &err)) fail_msg("open %s: %s", dir, err.msg);
    return s;
}

/* Every item 0..n-1 is in s with its id, metadata and (float16) vector. */
static void check_items(twn_shard *s, int n) {
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    assert_true(st.items >= n);
    for (int i = 0; i < n; i++) {
        twn_store_row r;
        twn_err err = {{0}};
        assert_int_equal(twn_shard_get(s, i, &r, &err), 0);
        item_buf b;
        twn_index_item it;
        make(&b, i, &it);
        if (strcmp(r.id, b.id)) fail_msg("row %d holds \"%s\", expected \"%s\"", i, r.id, b.id);
        assert_int_equal(r.think_tokens, (uint32_t)i);
        assert_int_equal(r.route, i % 2);
        for (int j = 0; j < D; j++) assert_true(twn_half_to_float(r.vec[j]) == b.vec[j]);
    }
}

/* Waits until the committer's fd is readable and polls it (deadline 10 s). */
static uint64_t wait_commit(twn_committer *c) {
    struct pollfd p = {twn_committer_fd(c), POLLIN, 0};
    double t0 = twn_now();
    uint64_t durable = 0;
    twn_err err = {{0}};
    for (;;) {
        int r = poll(&p, 1, 100);
        if (r > 0) break;
        if (twn_now() - t0 > 10) fail_msg("no commit within 10 s");
    }
    if (twn_committer_poll(c, &durable, &err) != 1) fail_msg("poll: %s", err.msg);
    return durable;
}

// ------------------------------------------------------------------------------------------------

static size_t rec_size(int i, int dim) {
    char id[32];
    return (size_t)TWN_WAL_REC_HEADER + (size_t)snprintf(id, sizeof id, "k-%d", i) + 4u * dim;
}

static int count_rec(void *ctx, const twn_wal_rec *r, twn_err *err) {
    int *n = ctx;
    char want[32];
    snprintf(want, sizeof want, "k-%d", *n);
    if (r->seq != (uint64_t)*n + 1 || r->item.id_len != strlen(want) ||
        memcmp(r->item.id, want, r->item.id_len) != 0)
        return twn_err_set(err, "record %d: seq %llu id %.*s", *n, (unsigned long long)r->seq,
                           (int)r->item.id_len, r->item.id);
    (*n)++;
    return 0;
}

static void test_wal_deferred(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("committer_wal_deferred");
    twn_wal_opts o = {.dim = D, .block_bytes = 1000, .defer_writes = 1};
    twn_wal *w = NULL;
    twn_err err = {{0}};
    assert_int_equal(twn_wal_open(dir, &o, NULL, NULL, &w, NULL, &err), 0);
    size_t expect_blocks = 0, cur = 0;
    for (int i = 0; i < 300; i++) {
        item_buf b;
        twn_index_item it;
        make(&b, i, &it);
        uint64_t seq;
        assert_int_equal(twn_wal_append(w, i, &it, &seq, &err), 0);
        assert_int_equal(seq, (uint64_t)i + 1);
        cur += rec_size(i, D); /* a block closes with the record that reaches block_bytes */
        if (cur >= 1000) expect_blocks++, cur = 0;
    }
    if (cur) expect_blocks++;
    twn_wal_stats st;
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.blocks, 0); /* 300 deferred appends of ~42 bytes: no I/O at all */
    assert_int_equal(st.written_bytes, 0);
    uint64_t durable = 0;
    assert_int_equal(twn_wal_commit(w, &durable, &err), 0);
    assert_int_equal(durable, 300);
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.blocks, expect_blocks); /* 18 */
    assert_int_equal(st.fsyncs, 1);
    assert_int_equal(twn_wal_close(w, &err), 0);
    int n = 0;
    twn_wal_replay_info info;
    assert_int_equal(twn_wal_open(dir, &o, count_rec, &n, &w, &info, &err), 0);
    assert_int_equal(n, 300);
    assert_int_equal(info.replayed, 300);
    assert_int_equal(info.dropped_bytes, 0);
    assert_int_equal(twn_wal_close(w, &err), 0);

    /* The bound: dim 1024 records (~4.1 KB); the append that brings TWN_WAL_DEFER_MAX pending
       writes everything (no fsync: still not durable). */
    const char *dir2 = tu_tmpdir("committer_wal_deferred_max");
    twn_wal_opts o2 = {.dim = 1024, .defer_writes = 1};
    assert_int_equal(twn_wal_open(dir2, &o2, NULL, NULL, &w, NULL, &err), 0);
    float *v = calloc(1024, sizeof *v);
    size_t pending = 0;
    int i = 0;
    for (;; i++) {
        char id[32];
        snprintf(id, sizeof id, "k-%d", i);
        twn_index_item it = {.id = id, .vec = v, .p_think = NAN};
        assert_int_equal(twn_wal_append(w, i, &it, NULL, &err), 0);
        pending += rec_size(i, 1024);
        twn_wal_get_stats(w, &st);
        if (st.blocks || i == 9000) break;
    }
    /* 32 MiB / ~4,126 B per record: the append that reaches it (record 8,132) writes */
    assert_int_equal(i, 8132);
    assert_true(pending >= TWN_WAL_DEFER_MAX);
    assert_true(pending - rec_size(i, 1024) < TWN_WAL_DEFER_MAX);
    assert_int_equal(st.raw_bytes, pending);
    assert_true(st.blocks >= 32); /* cut into blocks of ~1 MiB (TWN_WAL_BLOCK_BYTES) */
    assert_int_equal(st.fsyncs, 0);
    assert_int_equal(twn_wal_durable_seq(w), 0);
    free(v);
    assert_int_equal(twn_wal_close(w, &err), 0);
}

static void test_acks_follow_commits(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("committer_acks");
    twn_shard *s = open_shard(dir, 1);
    twn_committer *c = NULL;
    twn_err err = {{0}};
    assert_int_equal(twn_committer_start(s, 2, NULL, &c, &err), 0);
    uint64_t last = 0;
    int nb = 200, per = 8;
    for (int k = 0; k < nb; k++) {
        add_batch(s, k * per, per);
        twn_committer_kick(c);
        uint64_t durable = 0;
        assert_true(twn_committer_poll(c, &durable, &err) >= 0);
        twn_shard_stats st;
        twn_shard_get_stats(s, &st);
        /* Never ahead of what the WAL has fsynced; never backwards. */
        assert_true(durable <= st.wal.durable_seq);
        assert_true(durable >= last);
        last = durable;
    }
    while (last < (uint64_t)nb * per) last = wait_commit(c);
    assert_int_equal(last, (uint64_t)nb * per);
    twn_committer_stats cs;
    twn_committer_get_stats(c, &cs);
    assert_true(cs.commits >= 1 && cs.commits < (uint64_t)nb); /* grouped */
    assert_int_equal(twn_committer_stop(c, &err), 0);
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    assert_true(st.wal.fsyncs >= 1 && st.wal.fsyncs <= cs.commits); /* one per commit at most */
    assert_int_equal(twn_shard_close(s, &err), 0);
    s = open_shard(dir, 0);
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, nb * per);
    check_items(s, nb * per);
    assert_int_equal(twn_shard_close(s, &err), 0);
}

static void test_interval(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("committer_interval");
    twn_shard *s = open_shard(dir, 1);
    twn_committer *c = NULL;
    twn_err err = {{0}};
    double t0 = twn_now();
    assert_int_equal(twn_committer_start(s, 100, NULL, &c, &err), 0);
    add_batch(s, 0, 4);
    twn_committer_kick(c);
    uint64_t d1 = wait_commit(c);
    double t1 = twn_now();
    assert_int_equal(d1, 4);
    assert_true(t1 - t0 >= 0.099); /* the first commit waits commit_ms from the start */
    add_batch(s, 4, 4);
    twn_committer_kick(c);
    uint64_t d2 = wait_commit(c);
    double t2 = twn_now();
    assert_int_equal(d2, 8);
    /* The second starts >= 100 ms after the first started (which was before t1). */
    assert_true(t2 - t0 >= 0.199);
    /* Nothing added: no commit, the thread sleeps. */
    usleep(250 * 1000);
    uint64_t d3 = 0;
    assert_int_equal(twn_committer_poll(c, &d3, &err), 0);
    assert_int_equal(d3, 8);
    twn_committer_stats cs;
    twn_committer_get_stats(c, &cs);
    assert_int_equal(cs.commits, 2);
    assert_int_equal(twn_committer_stop(c, &err), 0);
    assert_int_equal(twn_shard_close(s, &err), 0);
}

static void test_kill_after_acks(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("committer_kill");
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        twn_shard *s = open_shard(dir, 1);
        twn_committer *c = NULL;
        twn_err err = {{0}};
        if (twn_committer_start(s, 1, NULL, &c, &err)) _exit(2);
        uint64_t acked = 0;
        for (int k = 0;; k++) { /* until killed */
            add_batch(s, 4 * k, 4);
            twn_committer_kick(c);
            uint64_t durable = 0;
            if (twn_committer_poll(c, &durable, &err) < 0) _exit(3);
            if (durable > acked) { /* the "Ack" */
                acked = durable;
                if (write(fds[1], &acked, sizeof acked) != (ssize_t)sizeof acked) _exit(4);
            }
            if (k % 64 == 63) usleep(1000);
        }
    }
    close(fds[1]);
    uint64_t acked = 0, v;
    double t0 = twn_now();
    while (acked < 3000 && twn_now() - t0 < 20 && read(fds[0], &v, sizeof v) == sizeof v) acked = v;
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    while (read(fds[0], &v, sizeof v) == sizeof v) acked = v; /* acks sent before the kill */
    close(fds[0]);
    assert_true(WIFSIGNALED(status));
    assert_true(acked >= 3000);
    twn_shard *s = open_shard(dir, 0);
    check_items(s, (int)acked); /* every acked item, exactly (items are seqs 1..) */
    twn_err err = {{0}};
    assert_int_equal(twn_shard_close(s, &err), 0);
}

static void test_failure_is_sticky(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("committer_fail");
    twn_shard *s = open_shard(dir, 1);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s/wal'", dir); /* no segment yet: the first write fails */
    assert_int_equal(system(cmd), 0);
    twn_committer *c = NULL;
    twn_err err = {{0}};
    assert_int_equal(twn_committer_start(s, 1, NULL, &c, &err), 0);
    add_batch(s, 0, 4);
    twn_committer_kick(c);
    struct pollfd p = {twn_committer_fd(c), POLLIN, 0};
    assert_int_equal(poll(&p, 1, 10000), 1);
    uint64_t durable = 7;
    assert_int_equal(twn_committer_poll(c, &durable, &err), -1);
    assert_int_equal(durable, 0);
    char want[4200];
    snprintf(want, sizeof want,
             "cannot create WAL segment %s/wal/00000000000000000001.wal: No such file or "
             "directory",
             dir);
    expect_contains(err.msg, want);
    twn_err e2 = {{0}};
    assert_int_equal(twn_committer_poll(c, &durable, &e2), -1); /* sticky */
    assert_string_equal(e2.msg, err.msg);
    /* The log refuses further appends with the same message (reopen to recover). */
    item_buf b;
    twn_index_item it;
    make(&b, 4, &it);
    assert_int_equal(twn_shard_add(s, &it, 1, NULL, &e2), -1);
    expect_contains(e2.msg, want);
    assert_int_equal(twn_committer_stop(c, &e2), -1);
    assert_string_equal(e2.msg, err.msg);
    assert_int_equal(twn_shard_close(s, &e2), -1);
    expect_contains(e2.msg, "cannot create WAL segment");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wal_deferred),      cmocka_unit_test(test_acks_follow_commits),
        cmocka_unit_test(test_interval),          cmocka_unit_test(test_kill_after_acks),
        cmocka_unit_test(test_failure_is_sticky),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
