/* test_wal.c — the write-ahead log on real files: round trips, group commit from many threads,
 * a crash cut at every byte of the last block, flipped bits (tail vs. mid-log), rotation, trim
 * and the snapshot position, each asserting record contents, counts and the exact messages. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/crc32c.h"
#include "index/wal.h"
#include "tests/testutil.h"
#include "util/hash.h"

#define DIM 8

static void expect_contains(const char *msg, const char *want) {
    if (!strstr(msg, want)) fail_msg("message\n  %s\ndoes not contain\n  %s", msg, want);
}

/* Deterministic record i: id "item-<i>", route i%2, p_think i/1000, think_tokens 3i, vector
 * components i + j/8 (or constant when compressible, so zstd has something to do). */
typedef struct {
    char id[32];
    float vec[DIM];
    twn_index_item it;
} rec_buf;

static const twn_index_item *make_item(rec_buf *b, int i, int compressible) {
    snprintf(b->id, sizeof b->id, "item-%d", i);
    for (int j = 0; j < DIM; j++) b->vec[j] = compressible ? 0.5f : (float)i + (float)j / 8.0f;
    b->it = (twn_index_item){.id = b->id,
                             .vec = b->vec,
                             .route = (uint8_t)(i % 2),
                             .p_think = (float)(i % 1000) / 1000.0f,
                             .think_tokens = (uint32_t)(3 * i)};
    return &b->it;
}

/* Collects replayed records. */
typedef struct {
    int n;
    uint64_t seq[4096];
    char id[4096][32];
    int64_t fid[4096];
    float vec0[4096], vec7[4096];
    uint8_t route[4096];
    float p_think[4096];
    uint32_t think[4096];
} sink;

static int collect(void *ctx, const twn_wal_rec *r, twn_err *err) {
    sink *s = ctx;
    if (s->n >= 4096) return twn_err_set(err, "sink full");
    int k = s->n++;
    s->seq[k] = r->seq;
    snprintf(s->id[k], 32, "%.*s", (int)r->item.id_len, r->item.id);
    s->fid[k] = r->faiss_id;
    s->vec0[k] = r->item.vec[0];
    s->vec7[k] = r->item.vec[DIM - 1];
    s->route[k] = r->item.route;
    s->p_think[k] = r->item.p_think;
    s->think[k] = r->item.think_tokens;
    return 0;
}

static void check_record(const sink *s, int k, int i) {
    char id[32];
    snprintf(id, sizeof id, "item-%d", i);
    assert_string_equal(s->id[k], id);
    assert_int_equal(s->fid[k], (int64_t)twn_hash64(id, strlen(id)));
    assert_true(s->vec0[k] == (float)i);
    assert_true(s->vec7[k] == (float)i + 7.0f / 8.0f);
    assert_int_equal(s->route[k], i % 2);
    assert_true(s->p_think[k] == (float)(i % 1000) / 1000.0f);
    assert_int_equal(s->think[k], 3 * i);
}

static twn_wal *open_wal(const char *dir, const twn_wal_opts *o, sink *s,
                         twn_wal_replay_info *info) {
    twn_wal *w;
    twn_err err = {{0}};
    if (s) memset(s, 0, sizeof *s);
    if (twn_wal_open(dir, o, s ? collect : NULL, s, &w, info, &err) != 0) fail_msg("%s", err.msg);
    return w;
}

static void append_n(twn_wal *w, int from, int to, int commit_each) {
    twn_err err = {{0}};
    for (int i = from; i < to; i++) {
        rec_buf b;
        const twn_index_item *it = make_item(&b, i, 0);
        uint64_t seq;
        assert_int_equal(twn_wal_append(w, (int64_t)twn_hash64(b.id, strlen(b.id)), it, &seq, &err),
                         0);
        assert_int_equal(seq, (uint64_t)i + 1);
        if (commit_each) assert_int_equal(twn_wal_commit(w, NULL, &err), 0);
    }
}

static const char *seg(const char *dir, uint64_t first) {
    static char buf[4][1100];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 1100, "%s/%020llu.wal", dir, (unsigned long long)first);
    return p;
}

static long fsize(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void copy_prefix(const char *src, const char *dst, size_t n) {
    size_t len;
    char *data = tu_read(src, &len);
    assert_true(n <= len);
    tu_write(dst, data, n);
    free(data);
}

// ------------------------------------------------------------------------------------------------

static void test_crc32c(void **state) {
    (void)state;
    assert_int_equal(twn_crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(twn_crc32c_sw(0, "123456789", 9), 0xE3069283u);
    unsigned char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (unsigned char)(i * 7 + 3);
    for (size_t n = 0; n < 1000; n += 37) {
        assert_int_equal(twn_crc32c(0, buf, n), twn_crc32c_sw(0, buf, n));
        /* Incremental == one shot. */
        assert_int_equal(twn_crc32c(twn_crc32c(0, buf, n / 3), buf + n / 3, n - n / 3),
                         twn_crc32c(0, buf, n));
    }
}

static void test_round_trip(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_round_trip");
    twn_wal_opts o = {.dim = DIM};
    twn_wal_replay_info info;
    sink *s = calloc(1, sizeof *s);
    twn_wal *w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 0);
    assert_int_equal(info.last_seq, 0);
    assert_int_equal(twn_wal_last_seq(w), 0);
    append_n(w, 0, 300, 0);
    twn_err err = {{0}};
    assert_int_equal(twn_wal_commit(w, NULL, &err), 0);
    twn_wal_stats st;
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.blocks, 1);
    assert_true(st.written_bytes < st.raw_bytes); /* zstd at work */
    assert_int_equal(twn_wal_close(w, &err), 0);

    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 300);
    assert_int_equal(info.first_seq, 1);
    assert_int_equal(info.last_seq, 300);
    assert_int_equal(info.dropped_bytes, 0);
    assert_int_equal(info.segments, 1);
    assert_int_equal(s->n, 300);
    for (int k = 0; k < 300; k++) {
        assert_int_equal(s->seq[k], (uint64_t)k + 1);
        check_record(s, k, k);
    }
    /* Appends continue the sequence in the same segment. */
    append_n(w, 300, 310, 0);
    assert_int_equal(twn_wal_close(w, &err), 0);
    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 310);
    check_record(s, 309, 309);
    assert_int_equal(info.segments, 1);
    twn_wal_close(w, &err);

    /* The snapshot position: only later records are replayed. */
    o.after_seq = 305;
    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 5);
    assert_int_equal(s->seq[0], 306);
    check_record(s, 0, 305);
    twn_wal_close(w, &err);
    free(s);
}

static void test_group_commit(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_group_commit");
    twn_wal_opts o = {.dim = DIM};
    twn_wal *w = open_wal(dir, &o, NULL, NULL);
    append_n(w, 0, 50, 0);
    assert_int_equal(twn_wal_last_seq(w), 50);
    assert_int_equal(twn_wal_durable_seq(w), 0); /* buffered, not yet durable */
    twn_wal_stats st;
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.fsyncs, 0);
    assert_int_equal(st.blocks, 0);
    uint64_t durable = 0;
    twn_err err = {{0}};
    assert_int_equal(twn_wal_commit(w, &durable, &err), 0);
    assert_int_equal(durable, 50);
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.blocks, 1); /* 50 appends, one block ... */
    assert_int_equal(st.fsyncs, 1); /* ... one fsync */
    assert_int_equal(st.appended, 50);
    /* A commit with nothing new writes and syncs nothing. */
    assert_int_equal(twn_wal_commit(w, &durable, &err), 0);
    assert_int_equal(durable, 50);
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.fsyncs, 1);
    assert_int_equal(st.commits, 2);
    /* Blocks fill up before a commit: block_bytes bounds the buffer, durability still waits. */
    twn_wal_close(w, &err);
    o.block_bytes = 1000; /* ~15 records of 66 bytes */
    w = open_wal(dir, &o, NULL, NULL);
    assert_int_equal(twn_wal_durable_seq(w), 50);
    append_n(w, 50, 100, 0);
    twn_wal_get_stats(w, &st);
    assert_true(st.blocks >= 3);
    assert_int_equal(st.fsyncs, 1); /* the reopen's sync of the surviving segment */
    assert_int_equal(twn_wal_durable_seq(w), 50);
    assert_int_equal(twn_wal_commit(w, &durable, &err), 0);
    assert_int_equal(durable, 100);
    twn_wal_close(w, &err);
}

typedef struct {
    twn_wal *w;
    int t;
    int bad;
} thread_arg;

static void *appender(void *p) {
    thread_arg *a = p;
    twn_err err = {{0}};
    for (int i = 0; i < 200; i++) {
        rec_buf b;
        const twn_index_item *it = make_item(&b, a->t * 1000 + i, 0);
        uint64_t seq, durable;
        if (twn_wal_append(a->w, (int64_t)twn_hash64(b.id, strlen(b.id)), it, &seq, &err)) a->bad++;
        if (i % 10 == 9) {
            if (twn_wal_commit(a->w, &durable, &err)) a->bad++;
            if (durable < seq) a->bad++; /* an ack would be unsafe */
        }
    }
    return NULL;
}

static void test_group_commit_threads(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_threads");
    twn_wal_opts o = {.dim = DIM, .block_bytes = 4096};
    twn_wal *w = open_wal(dir, &o, NULL, NULL);
    pthread_t th[4];
    thread_arg a[4];
    for (int t = 0; t < 4; t++) {
        a[t] = (thread_arg){w, t, 0};
        pthread_create(&th[t], NULL, appender, &a[t]);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(a[t].bad, 0);
    }
    twn_wal_stats st;
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.appended, 800);
    assert_int_equal(st.durable_seq, 800);
    assert_true(st.fsyncs <= st.commits);
    twn_err err = {{0}};
    assert_int_equal(twn_wal_close(w, &err), 0);

    sink *s = calloc(1, sizeof *s);
    twn_wal_replay_info info;
    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 800);
    /* Every record exactly once, in sequence order, intact. */
    static int seen[4][200];
    memset(seen, 0, sizeof seen);
    for (int k = 0; k < 800; k++) {
        assert_int_equal(s->seq[k], (uint64_t)k + 1);
        int i = atoi(s->id[k] + 5);
        seen[i / 1000][i % 1000]++;
        check_record(s, k, i);
    }
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 200; i++) assert_int_equal(seen[t][i], 1);
    twn_wal_close(w, &err);
    free(s);
}

/* Five blocks of per_block records each (ids item-0, item-1, ... in order); sizes[b] is the
 * segment size after block b (sizes[0] = the header). */
static void write_five(const char *dir, long sizes[6], int per_block) {
    twn_wal_opts o = {.dim = DIM};
    twn_wal *w = open_wal(dir, &o, NULL, NULL);
    twn_err err = {{0}};
    sizes[0] = TWN_WAL_HEADER;
    for (int i = 0; i < 5; i++) {
        for (int r = 0; r < per_block; r++) {
            rec_buf b;
            const twn_index_item *it = make_item(&b, i * per_block + r, 0);
            assert_int_equal(
                twn_wal_append(w, (int64_t)twn_hash64(b.id, strlen(b.id)), it, NULL, &err), 0);
        }
        assert_int_equal(twn_wal_commit(w, NULL, &err), 0);
        sizes[i + 1] = fsize(seg(dir, 1));
    }
    twn_wal_close(w, &err);
}

static void test_torn_tail_every_offset(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_torn_src");
    long sz[6];
    write_five(dir, sz, 1);
    char src[1100];
    snprintf(src, sizeof src, "%s", seg(dir, 1));
    assert_int_equal(sz[5] - sz[4], TWN_WAL_BLOCK_HEADER + TWN_WAL_REC_HEADER + 6 + 4 * DIM);
    sink *s = calloc(1, sizeof *s);
    twn_err err = {{0}};
    for (long cut = sz[4]; cut < sz[5]; cut++) {
        const char *d = tu_tmpdir("wal_torn");
        copy_prefix(src, seg(d, 1), (size_t)cut);
        twn_wal_replay_info info;
        twn_wal *w = open_wal(d, &(twn_wal_opts){.dim = DIM}, s, &info);
        assert_int_equal(info.replayed, 4); /* exactly the complete records */
        for (int k = 0; k < 4; k++) check_record(s, k, k);
        assert_int_equal(info.dropped_bytes, (uint64_t)(cut - sz[4]));
        assert_int_equal(info.last_seq, 4);
        assert_int_equal(fsize(seg(d, 1)), sz[4]); /* the tail is gone from disk */
        if (cut > sz[4]) expect_contains(info.dropped_reason, "block");
        /* The log continues cleanly after the cut. */
        rec_buf b;
        uint64_t seq;
        assert_int_equal(twn_wal_append(w, 42, make_item(&b, 4, 0), &seq, &err), 0);
        assert_int_equal(seq, 5);
        assert_int_equal(twn_wal_close(w, &err), 0);
        w = open_wal(d, &(twn_wal_opts){.dim = DIM}, s, &info);
        assert_int_equal(info.replayed, 5);
        assert_int_equal(info.dropped_bytes, 0);
        assert_int_equal(s->fid[4], 42);
        twn_wal_close(w, &err);
    }
    /* A cut inside the segment header of the only segment drops the file. */
    for (long cut = 0; cut < TWN_WAL_HEADER; cut++) {
        const char *d = tu_tmpdir("wal_torn");
        copy_prefix(src, seg(d, 1), (size_t)cut);
        twn_wal_replay_info info;
        twn_wal *w = open_wal(d, &(twn_wal_opts){.dim = DIM}, s, &info);
        assert_int_equal(info.replayed, 0);
        assert_int_equal(info.dropped_bytes, (uint64_t)cut);
        assert_int_equal(info.segments, 0);
        assert_int_equal(fsize(seg(d, 1)), -1);
        expect_contains(info.dropped_reason, "shorter than its 32-byte header");
        twn_wal_close(w, &err);
    }
    free(s);
}

static void flip(const char *path, long off, int bit) {
    size_t n;
    char *d = tu_read(path, &n);
    d[off] ^= (char)(1 << bit);
    tu_write(path, d, n);
    free(d);
}

static void test_bit_flips(void **state) {
    (void)state;
    sink *s = calloc(1, sizeof *s);
    twn_err err = {{0}};
    for (int per = 1; per <= 20; per += 19) {
        const char *src_dir = tu_tmpdir("wal_flip_src");
        long sz[6];
        write_five(src_dir, sz, per);
        /* 20 records make a block zstd can shrink, so flips hit compressed payloads too. */
        if (per == 20)
            assert_true(sz[5] - sz[4] <
                        TWN_WAL_BLOCK_HEADER + 20 * (TWN_WAL_REC_HEADER + 7 + 4 * DIM));
        size_t n;
        char *orig = tu_read(seg(src_dir, 1), &n);

        /* Every bit of the last block: a corrupt tail, truncated, never replayed. */
        for (long off = sz[4]; off < sz[5]; off++) {
            const char *d = tu_tmpdir("wal_flip");
            tu_write(seg(d, 1), orig, n);
            flip(seg(d, 1), off, (int)(off % 8));
            twn_wal_replay_info info;
            twn_wal *w = open_wal(d, &(twn_wal_opts){.dim = DIM}, s, &info);
            assert_int_equal(info.replayed, 4 * per);
            assert_int_equal(info.dropped_bytes, (uint64_t)(sz[5] - sz[4]));
            for (int k = 0; k < 4 * per; k++) check_record(s, k, k);
            twn_wal_close(w, &err);
        }
        /* A payload bit of block 2 (record 1) with valid blocks after it: mid-log damage. */
        const char *d = tu_tmpdir("wal_flip");
        tu_write(seg(d, 1), orig, n);
        long off = sz[1] + TWN_WAL_BLOCK_HEADER + 2;
        flip(seg(d, 1), off, 3);
        twn_wal *w = (twn_wal *)1;
        memset(s, 0, sizeof *s);
        assert_int_equal(twn_wal_open(d, &(twn_wal_opts){.dim = DIM}, collect, s, &w, NULL, &err),
                         -1);
        assert_null(w);
        char want[512];
        snprintf(want, sizeof want, "%s: block at offset %ld fails its CRC", seg(d, 1), sz[1]);
        expect_contains(err.msg, want);
        snprintf(want, sizeof want,
                 "and a valid block follows at offset %ld: records from seq %d on are damaged in "
                 "the middle of the log (acknowledged data may be lost); reopen with repair to "
                 "drop everything from offset %ld on",
                 sz[2], per + 1, sz[1]);
        expect_contains(err.msg, want);
        assert_int_equal(fsize(seg(d, 1)), sz[5]); /* nothing was cut without being asked */
        /* repair: keep what precedes the damage. */
        twn_wal_replay_info info;
        w = open_wal(d, &(twn_wal_opts){.dim = DIM, .repair = 1}, s, &info);
        assert_int_equal(info.replayed, per);
        for (int k = 0; k < per; k++) check_record(s, k, k);
        assert_int_equal(info.dropped_bytes, (uint64_t)(sz[5] - sz[1]));
        assert_int_equal(fsize(seg(d, 1)), sz[1]);
        twn_wal_close(w, &err);
        free(orig);
    }
    free(s);
}

static void test_rotation_trim(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_rotation");
    twn_wal_opts o = {.dim = DIM, .segment_bytes = 400};
    twn_wal *w = open_wal(dir, &o, NULL, NULL);
    append_n(w, 0, 40, 1); /* 98-byte blocks: a new segment every 4 records */
    twn_wal_stats st;
    twn_wal_get_stats(w, &st);
    assert_int_equal(st.segments, 10);
    assert_true(fsize(seg(dir, 1)) > 0 && fsize(seg(dir, 5)) > 0 && fsize(seg(dir, 37)) > 0);
    twn_err err = {{0}};
    /* Trim: segments whose last record <= 10 go (1..4, 5..8), the one holding 9..12 stays. */
    assert_int_equal(twn_wal_trim(w, 10, &err), 0);
    assert_int_equal(fsize(seg(dir, 1)), -1);
    assert_int_equal(fsize(seg(dir, 5)), -1);
    assert_true(fsize(seg(dir, 9)) > 0);
    assert_int_equal(twn_wal_close(w, &err), 0);

    sink *s = calloc(1, sizeof *s);
    twn_wal_replay_info info;
    o.after_seq = 10;
    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 30);
    assert_int_equal(info.first_seq, 9);
    assert_int_equal(info.segments, 8);
    for (int k = 0; k < 30; k++) check_record(s, k, k + 10);
    /* Rotation on demand: the next block starts a new segment. */
    assert_int_equal(twn_wal_rotate(w, &err), 0);
    append_n(w, 40, 41, 1);
    assert_true(fsize(seg(dir, 41)) > 0);
    twn_wal_close(w, &err);

    /* Without the snapshot position the trimmed records are missing: refuse. */
    o.after_seq = 0;
    w = (twn_wal *)1;
    assert_int_equal(twn_wal_open(dir, &o, NULL, NULL, &w, NULL, &err), -1);
    char want[1400];
    snprintf(want, sizeof want,
             "%s: segment starts at seq 9 but the snapshot and earlier segments cover only up to "
             "seq 0: records 1..8 are missing",
             seg(dir, 9));
    assert_string_equal(err.msg, want);
    /* A missing middle segment is also refused. */
    unlink(seg(dir, 17));
    o.after_seq = 10;
    assert_int_equal(twn_wal_open(dir, &o, NULL, NULL, &w, NULL, &err), -1);
    expect_contains(err.msg, "records 17..20 are missing");
    /* ... unless the snapshot covers it. */
    o.after_seq = 20;
    w = open_wal(dir, &o, s, &info);
    assert_int_equal(info.replayed, 21);
    twn_wal_close(w, &err);
    free(s);
}

static void test_snapshot_position_and_errors(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_errors");
    twn_err err = {{0}};
    /* A snapshot newer than the log: appends continue after it, in a new segment. */
    twn_wal *w = open_wal(dir, &(twn_wal_opts){.dim = DIM}, NULL, NULL);
    append_n(w, 0, 3, 1);
    twn_wal_close(w, &err);
    w = open_wal(dir, &(twn_wal_opts){.dim = DIM, .after_seq = 10}, NULL, NULL);
    rec_buf b;
    uint64_t seq;
    assert_int_equal(twn_wal_append(w, 7, make_item(&b, 10, 0), &seq, &err), 0);
    assert_int_equal(seq, 11);
    twn_wal_close(w, &err);
    assert_true(fsize(seg(dir, 11)) > 0);
    sink *s = calloc(1, sizeof *s);
    twn_wal_replay_info info;
    w = open_wal(dir, &(twn_wal_opts){.dim = DIM, .after_seq = 10}, s, &info);
    assert_int_equal(info.replayed, 1);
    assert_int_equal(s->seq[0], 11);
    assert_int_equal(info.last_seq, 11);

    /* Bad items are refused with a message naming them. */
    float v[DIM] = {0};
    v[3] = NAN;
    twn_index_item it = {.id = "bad\"one", .vec = v};
    assert_int_equal(twn_wal_append(w, 1, &it, &seq, &err), -1);
    assert_string_equal(err.msg,
                        "item \"bad\\\"one\": vector component 3 is nan; expected a finite value");
    v[3] = 0;
    it.route = 5;
    assert_int_equal(twn_wal_append(w, 1, &it, &seq, &err), -1);
    assert_string_equal(err.msg, "item \"bad\\\"one\": route 5 is not 0 (easy) or 1 (hard)");
    it = (twn_index_item){.id = "caf\xc3", .vec = v};
    assert_int_equal(twn_wal_append(w, 1, &it, &seq, &err), -1);
    assert_string_equal(err.msg, "item \"caf\xc3\": id is not valid UTF-8 (byte 0xc3 at offset 3)");
    assert_int_equal(twn_wal_last_seq(w), 11); /* nothing was appended */
    twn_wal_close(w, &err);

    /* Another dimension. */
    w = (twn_wal *)1;
    assert_int_equal(twn_wal_open(dir, &(twn_wal_opts){.dim = 16}, NULL, NULL, &w, NULL, &err), -1);
    char want[1400];
    snprintf(want, sizeof want,
             "%s: segment holds dim 8 vectors, expected 16 (the shard was created with another "
             "dimension?)",
             seg(dir, 1));
    assert_string_equal(err.msg, want);
    free(s);
}

static void test_scan_segment_in_memory(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("wal_scan");
    long sz[6];
    write_five(dir, sz, 1);
    size_t n;
    char *d = tu_read(seg(dir, 1), &n);
    twn_wal_scan r;
    twn_err err = {{0}};
    assert_int_equal(twn_wal_scan_segment(d, n, 0, NULL, NULL, &r, &err), 0);
    assert_int_equal(r.status, TWN_WAL_SCAN_CLEAN);
    assert_int_equal(r.records, 5);
    assert_int_equal(r.blocks, 5);
    assert_int_equal(r.dim, DIM);
    assert_int_equal(r.first_seq, 1);
    assert_int_equal(r.next_seq, 6);
    assert_int_equal(r.good_end, n);
    /* Renumbered header: the first block no longer continues it. */
    unsigned char hdr[TWN_WAL_HEADER];
    twn_wal_encode_header(hdr, DIM, 7);
    memcpy(d, hdr, sizeof hdr);
    assert_int_equal(twn_wal_scan_segment(d, n, DIM, NULL, NULL, &r, &err), 0);
    assert_int_equal(r.status, TWN_WAL_SCAN_CORRUPT);
    assert_string_equal(r.reason, "block at offset 32 starts at seq 1, expected 7");
    assert_int_equal(r.records, 0);
    assert_int_equal(r.resume_offset, (size_t)sz[1]); /* the next block with a valid frame */
    free(d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_group_commit),
        cmocka_unit_test(test_group_commit_threads),
        cmocka_unit_test(test_torn_tail_every_offset),
        cmocka_unit_test(test_bit_flips),
        cmocka_unit_test(test_rotation_trim),
        cmocka_unit_test(test_snapshot_position_and_errors),
        cmocka_unit_test(test_scan_segment_in_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
