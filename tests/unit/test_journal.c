/* test_journal.c — the coordinator journal: round trip of every record type, group commit,
 * epochs, a torn tail cut at every byte offset of the last record (and every byte of it
 * flipped), fingerprint mismatch, and the messages for files that are not journals. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "coordinator/journal.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "util/fileio.h"
#include "util/mem.h"

static const twn_plan_fp FP = {"data/a.jsonl\ndata/b.tar", 1024, "sha256:0123abcd"};

static twn_journal_cfg cfg(void) {
    twn_journal_cfg c;
    twn_journal_cfg_default(&c);
    return c;
}

/* Replayed records, flattened into a string for exact comparison. */
typedef struct log {
    char s[8192];
    size_t n;
    int records;
} log_t;

static int collect(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    log_t *l = ctx;
    char line[512];
    switch (r->type) {
    case TWN_JREC_JOB_START:
        snprintf(line, sizeof line, "start [%s] %llu [%s]\n", r->fp.sources,
                 (unsigned long long)r->fp.unit_size, r->fp.model_hash);
        break;
    case TWN_JREC_RESUME:
        snprintf(line, sizeof line, "resume %u\n", r->epoch);
        break;
    case TWN_JREC_UNIT_DONE:
        snprintf(line, sizeof line, "done %llx %u %u/%u/%u %llu\n", (unsigned long long)r->unit,
                 r->counts.n_items, r->counts.easy, r->counts.hard, r->counts.dead,
                 (unsigned long long)r->counts.think_tokens);
        break;
    case TWN_JREC_DEAD_LETTER:
        snprintf(line, sizeof line, "dead %llx %u %s [%s]\n", (unsigned long long)r->unit, r->item,
                 twn_stage_name(r->stage), r->reason);
        break;
    case TWN_JREC_HARD_ROUTED: {
        int n = snprintf(line, sizeof line, "hard %llx", (unsigned long long)r->unit);
        for (size_t i = 0; i < r->n_items && i < 8; i++)
            n += snprintf(line + n, sizeof line - (size_t)n, " %u", r->items[i]);
        if (r->n_items > 8) n += snprintf(line + n, sizeof line - (size_t)n, " ...%zu", r->n_items);
        snprintf(line + n, sizeof line - (size_t)n, "\n");
        break;
    }
    case TWN_JREC_JOB_FINISHED:
        snprintf(line, sizeof line, "finished %llu %llu %llu %llu %llu %llu\n",
                 (unsigned long long)r->job.units, (unsigned long long)r->job.items,
                 (unsigned long long)r->job.easy, (unsigned long long)r->job.hard,
                 (unsigned long long)r->job.rejected, (unsigned long long)r->job.think_tokens);
        break;
    }
    size_t k = strlen(line);
    if (l->n + k < sizeof l->s) {
        memcpy(l->s + l->n, line, k + 1);
        l->n += k;
    }
    l->records++;
    return 0;
}

static twn_journal *open_ok(const char *path, log_t *l, twn_journal_info *info) {
    twn_journal *j;
    twn_err err = {{0}};
    twn_journal_cfg c = cfg();
    if (l) memset(l, 0, sizeof *l);
    if (twn_journal_open(path, &FP, &c, l ? collect : NULL, l, &j, info, &err) != 0)
        fail_msg("open %s: %s", path, err.msg);
    return j;
}

static long file_size(const char *path) {
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (long)st.st_size;
}

static void close_ok(twn_journal *j) {
    twn_err err = {{0}};
    if (twn_journal_close(j, &err) != 0) fail_msg("close: %s", err.msg);
}

// ------------------------------------------------------------------------------------------------

static void test_round_trip(void **state) {
    (void)state;
    const char *path = tc_tmp_path("journal_round_trip", "journal");
    twn_journal_info info;
    twn_journal *j = open_ok(path, NULL, &info);
    assert_int_equal(info.created, 1);
    assert_int_equal(info.epoch, 1);
    assert_int_equal(info.records, 1);
    assert_int_equal(info.torn_bytes, 0);
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_false(twn_path_exists(tmp));
    twn_err err = {{0}};
    twn_unit_counts c = {100, 60, 30, 10, 4567};
    assert_int_equal(twn_journal_unit_done(j, 0xfeed, &c, &err), 0);
    assert_int_equal(
        twn_journal_dead_letter(j, 0xbeef, 17, TWN_STAGE_READ, "invalid UTF-8 at byte 3", &err), 0);
    uint32_t items[20];
    for (int i = 0; i < 20; i++) items[i] = (uint32_t)(i * 3);
    assert_int_equal(twn_journal_hard_routed(j, 0xbeef, items, 3, &err), 0);
    assert_int_equal(twn_journal_hard_routed(j, 0xcafe, items, 20, &err), 0);
    assert_int_equal(twn_journal_dead_letter(j, 0xbeef, 3, TWN_STAGE_REASON, NULL, &err), 0);
    twn_job_counts jc = {2, 200, 120, 60, 20, 9000};
    assert_int_equal(twn_journal_job_finished(j, &jc, &err), 0);
    /* Group commit: six records, nothing written until the commit, then one write + fsync. */
    assert_int_equal(twn_journal_appended(j), 6);
    assert_int_equal(twn_journal_durable(j), 0);
    assert_int_equal(twn_journal_commits(j), 0);
    long before = file_size(path);
    assert_true(twn_journal_buffered_bytes(j) > 0);
    assert_int_equal(twn_journal_commit(j, &err), 0);
    assert_int_equal(twn_journal_commits(j), 1);
    assert_int_equal(twn_journal_durable(j), 6);
    assert_int_equal(file_size(path), before + 41 + 47 + 24 + 41 + 24 + 57);
    close_ok(j);

    log_t l;
    j = open_ok(path, &l, &info);
    assert_int_equal(info.created, 0);
    assert_int_equal(info.epoch, 2);
    assert_int_equal(info.finished, 1);
    assert_int_equal(info.records, 7);
    assert_string_equal(l.s, "start [data/a.jsonl\ndata/b.tar] 1024 [sha256:0123abcd]\n"
                             "done feed 100 60/30/10 4567\n"
                             "dead beef 17 read [invalid UTF-8 at byte 3]\n"
                             "hard beef 0 3 6\n"
                             "hard cafe 0 3 6 9 12 15 18 21 ...20\n"
                             "dead beef 3 reason []\n"
                             "finished 2 200 120 60 20 9000\n");
    /* Items in any order, at the ends of the u32 range (zigzag deltas of up to 34 bits). */
    const uint32_t odd[5] = {4294967295u, 0, 7, 4294967294u, 3};
    assert_int_equal(twn_journal_hard_routed(j, 0xd00d, odd, 5, &err), 0);
    close_ok(j);
    /* Each open adds a RESUME with the next epoch. */
    j = open_ok(path, &l, &info);
    assert_int_equal(info.epoch, 3);
    assert_non_null(strstr(l.s, "finished 2 200 120 60 20 9000\nresume 2\n"
                                "hard d00d 4294967295 0 7 4294967294 3\n"));
    close_ok(j);
}

static void test_maybe_commit(void **state) {
    (void)state;
    const char *path = tc_tmp_path("journal_maybe_commit", "journal");
    twn_journal *j;
    twn_err err = {{0}};
    twn_journal_cfg c = cfg();
    c.group_commit_s = 0.010;
    c.group_commit_bytes = 200;
    assert_int_equal(twn_journal_open(path, &FP, &c, NULL, NULL, &j, NULL, &err), 0);
    int did;
    assert_int_equal(twn_journal_maybe_commit(j, 1.000, &did, &err), 0);
    twn_unit_counts k = {1, 1, 0, 0, 0};
    assert_int_equal(twn_journal_unit_done(j, 1, &k, &err), 0);
    assert_int_equal(twn_journal_maybe_commit(j, 1.005, &did, &err), 0);
    assert_int_equal(did, 0);
    assert_int_equal(twn_journal_maybe_commit(j, 1.010, &did, &err), 0);
    assert_int_equal(did, 1);
    assert_int_equal(twn_journal_durable(j), 1);
    /* A full buffer commits from the append itself: 200 bytes = 5 UNIT_DONE records (41 each). */
    for (uint64_t u = 2; u < 7; u++) assert_int_equal(twn_journal_unit_done(j, u, &k, &err), 0);
    assert_int_equal(twn_journal_commits(j), 2);
    assert_int_equal(twn_journal_durable(j), 6);
    assert_int_equal(twn_journal_buffered_bytes(j), 0);
    /* abandon drops what is buffered, as a crash would. */
    assert_int_equal(twn_journal_unit_done(j, 99, &k, &err), 0);
    twn_journal_abandon(j);
    log_t l;
    twn_journal_info info;
    j = open_ok(path, &l, &info);
    assert_int_equal(info.records, 7);
    assert_null(strstr(l.s, "done 63"));
    close_ok(j);
}

/* The last record cut at every byte offset, then every byte of it flipped: the valid prefix is
 * kept, the tail is truncated and reported, and the journal goes on from there. */
static void test_torn_tail(void **state) {
    (void)state;
    const char *path = tc_tmp_path("journal_torn", "journal");
    twn_journal *j = open_ok(path, NULL, NULL);
    twn_err err = {{0}};
    twn_unit_counts k = {8, 5, 2, 1, 77};
    assert_int_equal(twn_journal_unit_done(j, 0x1111, &k, &err), 0);
    assert_int_equal(twn_journal_commit(j, &err), 0);
    long good = file_size(path);
    assert_int_equal(
        twn_journal_dead_letter(j, 0x2222, 5, TWN_STAGE_GATE, "lease expired 3 times", &err), 0);
    close_ok(j);
    size_t full_n;
    char *full = tu_read(path, &full_n);
    size_t last = full_n - (size_t)good; /* bytes of the last record */
    assert_int_equal(last, 8 + 1 + 8 + 4 + 1 + 2 + 21);
    int cuts = 0, flips = 0;
    for (size_t cut = (size_t)good; cut <= full_n; cut++) {
        tu_write(path, full, cut);
        log_t l;
        twn_journal_info info;
        j = open_ok(path, &l, &info);
        int complete = cut == full_n;
        assert_int_equal(info.records, complete ? 3 : 2);
        assert_int_equal(info.torn_bytes, cut - (size_t)(complete ? full_n : (size_t)good));
        if (!complete && cut > (size_t)good) {
            char want[160];
            size_t got = cut - (size_t)good;
            if (got < 8)
                snprintf(want, sizeof want, "record at offset %ld: %zu of its 8 header bytes", good,
                         got);
            else
                snprintf(want, sizeof want, "record at offset %ld: %zu of its %zu bytes", good,
                         got - 8, last - 8);
            assert_string_equal(info.torn_reason, want);
        }
        /* Truncated to the valid prefix, then a RESUME (13 bytes) appended. */
        assert_int_equal(file_size(path), (long)info.valid_bytes + 13);
        close_ok(j);
        j = open_ok(path, &l, &info);
        assert_int_equal(info.torn_bytes, 0);
        assert_int_equal(info.records, complete ? 4 : 3);
        assert_int_equal(info.epoch, 3);
        assert_non_null(strstr(l.s, "done 1111 8 5/2/1 77\n"));
        assert_true((strstr(l.s, "dead 2222 5 gate [lease expired 3 times]") != NULL) == complete);
        close_ok(j);
        cuts++;
    }
    for (size_t at = (size_t)good; at < full_n; at++) {
        full[at] ^= 0x20;
        tu_write(path, full, full_n);
        full[at] ^= 0x20;
        log_t l;
        twn_journal_info info;
        j = open_ok(path, &l, &info);
        assert_int_equal(info.records, 2);
        assert_int_equal(info.torn_bytes, last);
        assert_null(strstr(l.s, "dead"));
        close_ok(j);
        flips++;
    }
    assert_int_equal(cuts, (int)last + 1);
    assert_int_equal(flips, (int)last);
    free(full);
}

static void test_fingerprint_mismatch(void **state) {
    (void)state;
    const char *path = tc_tmp_path("journal_fp", "journal");
    close_ok(open_ok(path, NULL, NULL));
    twn_journal *j = (twn_journal *)1;
    twn_err err = {{0}};
    twn_journal_cfg c = cfg();
    twn_plan_fp other = {"data/c.jsonl", 1024, "sha256:0123abcd"};
    assert_int_equal(twn_journal_open(path, &other, &c, NULL, NULL, &j, NULL, &err), -1);
    assert_null(j);
    char want[1024];
    snprintf(want, sizeof want,
             "%s: journal was written for a different plan (sources: journal has "
             "\"data/a.jsonl\\ndata/b.tar\", this run has \"data/c.jsonl\"); restart with the "
             "original plan or use a new journal",
             path);
    assert_string_equal(err.msg, want);
    twn_plan_fp other2 = {FP.sources, 512, "sha256:ffff"};
    assert_int_equal(twn_journal_open(path, &other2, &c, NULL, NULL, &j, NULL, &err), -1);
    snprintf(want, sizeof want,
             "%s: journal was written for a different plan (unit size: journal has 1024, this "
             "run has 512; model manifest hash: journal has \"sha256:0123abcd\", this run has "
             "\"sha256:ffff\"); restart with the original plan or use a new journal",
             path);
    assert_string_equal(err.msg, want);
    /* Refusing did not touch the file: the original plan still opens, at epoch 2. */
    twn_journal_info info;
    j = open_ok(path, NULL, &info);
    assert_int_equal(info.epoch, 2);
    close_ok(j);
}

/* Builds a record by hand (for bodies the writer would never produce). */
static size_t raw_record(uint8_t *out, uint8_t type, const uint8_t *body, size_t n, int good_crc);

static uint32_t crc32c_ref(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    }
    return c ^ 0xffffffffu;
}

static size_t raw_record(uint8_t *out, uint8_t type, const uint8_t *body, size_t n, int good_crc) {
    uint32_t len = (uint32_t)n + 1;
    out[8] = type;
    memcpy(out + 9, body, n);
    uint32_t crc = crc32c_ref(out + 8, len) ^ (good_crc ? 0 : 1);
    for (int i = 0; i < 4; i++) {
        out[i] = (uint8_t)(len >> (8 * i));
        out[4 + i] = (uint8_t)(crc >> (8 * i));
    }
    return 8 + len;
}

/* The journal's checksum is standard CRC-32C: the reference above has the catalogue check value,
 * and every hand-built record it signs is accepted by replay. */
static void test_crc_is_crc32c(void **state) {
    (void)state;
    assert_int_equal(crc32c_ref((const uint8_t *)"123456789", 9), 0xe3069283u);
    uint8_t buf[64];
    memcpy(buf, TWN_JOURNAL_MAGIC, 8);
    uint8_t js[16] = {0};
    size_t n = 8 + raw_record(buf + 8, TWN_JREC_JOB_START, js, 16, 1);
    twn_journal_info info;
    assert_int_equal(twn_journal_replay_mem(buf, n, "j", NULL, NULL, NULL, &info, NULL), 0);
    assert_int_equal(info.records, 1);
    assert_int_equal(info.torn_bytes, 0);
}

static void expect_replay_error(const uint8_t *data, size_t n, const char *want) {
    twn_err err = {{0}};
    twn_journal_info info;
    assert_int_equal(twn_journal_replay_mem(data, n, "j", NULL, NULL, NULL, &info, &err), -1);
    if (strcmp(err.msg, want) != 0) fail_msg("error\n  %s\nexpected\n  %s", err.msg, want);
}

static void test_not_a_journal(void **state) {
    (void)state;
    uint8_t buf[256];
    expect_replay_error((const uint8_t *)"TWNJ", 4,
                        "j: 4 bytes, shorter than the 8-byte journal header");
    expect_replay_error((const uint8_t *)"{\"id\": 1}\n", 10,
                        "j: not a twn journal (starts with 7b 22 69 64, expected \"TWNJRNL1\")");
    memcpy(buf, TWN_JOURNAL_MAGIC, 8);
    expect_replay_error(buf, 8, "j: no valid JOB_START record after the header (no records)");
    /* A well-formed UNIT_DONE first. */
    uint8_t body[40] = {0};
    body[8] = 1;  /* n_items = 1 */
    body[12] = 1; /* easy = 1 */
    size_t n = raw_record(buf + 8, TWN_JREC_UNIT_DONE, body, 32, 1);
    expect_replay_error(buf, 8 + n, "j: first record (offset 8) is UNIT_DONE, expected JOB_START");
    /* The same with a bad CRC is a torn tail with nothing before it. */
    n = raw_record(buf + 8, TWN_JREC_UNIT_DONE, body, 32, 0);
    expect_replay_error(buf, 8 + n,
                        "j: no valid JOB_START record after the header (record at offset 8: CRC "
                        "mismatch)");
    /* A valid JOB_START, then CRC-valid records that do not decode: refused, not truncated. */
    uint8_t js[64] = {0};
    js[0] = 4; /* unit size 4, empty sources and hash */
    size_t a = 8 + raw_record(buf + 8, TWN_JREC_JOB_START, js, 16, 1);
    n = raw_record(buf + a, 9, body, 3, 1);
    expect_replay_error(buf, a + n,
                        "j: record at offset 33 has unknown type 9 (written by a newer twn?)");
    n = raw_record(buf + a, TWN_JREC_UNIT_DONE, body, 20, 1);
    expect_replay_error(buf, a + n, "j: UNIT_DONE record at offset 33 is malformed (21 bytes)");
    n = raw_record(buf + a, TWN_JREC_UNIT_DONE, body, 34, 1);
    expect_replay_error(buf, a + n, "j: UNIT_DONE record at offset 33 has 35 bytes, expected 33");
    body[16] = 1; /* hard = 1 too: 1 + 1 + 0 != 1 */
    n = raw_record(buf + a, TWN_JREC_UNIT_DONE, body, 32, 1);
    expect_replay_error(buf, a + n,
                        "j: UNIT_DONE record at offset 33 for unit 0000000000000000: easy 1 + hard "
                        "1 + dead 0 != 1 items");
    uint8_t dl[16] = {0};
    dl[12] = 7; /* stage 7 */
    n = raw_record(buf + a, TWN_JREC_DEAD_LETTER, dl, 15, 1);
    expect_replay_error(buf, a + n, "j: DEAD_LETTER record at offset 33: stage 7, expected 1..4");
    n = raw_record(buf + a, TWN_JREC_JOB_START, js, 16, 1);
    expect_replay_error(buf, a + n, "j: second JOB_START record at offset 33");
    /* HARD_ROUTED: one item, a delta of -1 from 0; then a varint that never ends. */
    uint8_t hr[32] = {0};
    hr[8] = 1;     /* n = 1 */
    hr[12] = 0x01; /* zigzag(-1) */
    n = raw_record(buf + a, TWN_JREC_HARD_ROUTED, hr, 13, 1);
    expect_replay_error(buf, a + n,
                        "j: HARD_ROUTED record at offset 33: item 0 decodes out of range");
    memset(hr + 12, 0x80, 6);
    n = raw_record(buf + a, TWN_JREC_HARD_ROUTED, hr, 18, 1);
    expect_replay_error(buf, a + n, "j: HARD_ROUTED record at offset 33 is malformed (19 bytes)");
    /* A length beyond the limit is a torn tail, not an error. */
    memset(buf + a, 0xff, 12);
    twn_journal_info info;
    assert_int_equal(twn_journal_replay_mem(buf, a + 12, "j", NULL, NULL, NULL, &info, NULL), 0);
    assert_int_equal(info.records, 1);
    assert_int_equal(info.torn_bytes, 12);
    assert_string_equal(info.torn_reason,
                        "record at offset 33: length 4294967295 out of range 1..1048576");
}

static void test_open_errors(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("journal_open_errors");
    char path[1100];
    snprintf(path, sizeof path, "%s/notajournal", dir);
    tu_write(path, "hello world\n", 12);
    twn_journal *j;
    twn_err err = {{0}};
    twn_journal_cfg c = cfg();
    assert_int_equal(twn_journal_open(path, &FP, &c, NULL, NULL, &j, NULL, &err), -1);
    char want[1400];
    snprintf(want, sizeof want,
             "%s: not a twn journal (starts with 68 65 6c 6c, expected \"TWNJRNL1\")", path);
    assert_string_equal(err.msg, want);
    /* The file was left alone. */
    assert_int_equal(file_size(path), 12);
    snprintf(path, sizeof path, "%s/missing/dir/journal", dir);
    assert_int_equal(twn_journal_open(path, &FP, &c, NULL, NULL, &j, NULL, &err), -1);
    snprintf(want, sizeof want, "cannot create journal %s.tmp: No such file or directory", path);
    assert_string_equal(err.msg, want);
    /* An empty file (e.g. touched by an operator) starts a new journal. */
    snprintf(path, sizeof path, "%s/empty", dir);
    tu_write(path, "", 0);
    twn_journal_info info;
    j = open_ok(path, NULL, &info);
    assert_int_equal(info.created, 1);
    close_ok(j);
}

/* A failed write poisons the journal: that commit and every later call fail with the first
 * error, and what reached the disk is a torn tail the next open truncates. */
static void test_write_failure_poisons(void **state) {
    (void)state;
    const char *path = tc_tmp_path("journal_poison", "journal");
    twn_journal *j = open_ok(path, NULL, NULL);
    long size = file_size(path);
    struct rlimit old = tc_fsize_limit((rlim_t)size + 100);
    twn_err err = {{0}};
    twn_unit_counts k = {1, 1, 0, 0, 0};
    for (uint64_t u = 0; u < 5; u++) assert_int_equal(twn_journal_unit_done(j, u, &k, &err), 0);
    int rc = twn_journal_commit(j, &err);
    tc_fsize_limit_end(old);
    char want[1200];
    snprintf(want, sizeof want, "cannot write journal %s: File too large", path);
    assert_int_equal(rc, -1);
    assert_string_equal(err.msg, want);
    twn_err err2 = {{0}};
    assert_int_equal(twn_journal_unit_done(j, 9, &k, &err2), -1);
    assert_string_equal(err2.msg, want);
    assert_int_equal(twn_journal_maybe_commit(j, 100.0, NULL, &err2), -1);
    assert_int_equal(twn_journal_durable(j), 0);
    assert_int_equal(twn_journal_close(j, &err2), -1);
    /* 100 bytes made it: two whole UNIT_DONE records and 18 bytes of a third. */
    assert_int_equal(file_size(path), size + 100);
    twn_journal_info info;
    log_t l;
    j = open_ok(path, &l, &info);
    assert_int_equal(info.records, 3);
    assert_int_equal(info.torn_bytes, 18);
    close_ok(j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_maybe_commit),
        cmocka_unit_test(test_torn_tail),
        cmocka_unit_test(test_fingerprint_mismatch),
        cmocka_unit_test(test_write_failure_poisons),
        cmocka_unit_test(test_crc_is_crc32c),
        cmocka_unit_test(test_not_a_journal),
        cmocka_unit_test(test_open_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
