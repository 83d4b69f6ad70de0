/* test_units.c — the unit table: the completion rule over every mix of routes, duplicate and late
 * acks counted once, refused reports with their messages, tags, low-water mark, memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/units.h"
#include "tests/testutil.h"

static void expect_err(int rc, const twn_err *err, const char *want) {
    assert_int_equal(rc, -1);
    if (strcmp(err->msg, want) != 0) fail_msg("error\n  %s\nexpected\n  %s", err->msg, want);
}

// ------------------------------------------------------------------------------------------------

/* Every item of a 3-item unit takes one of five paths to a terminal state; every combination, in
 * every order of the final events, completes the unit exactly at the last one, with exact counts.
 */
enum { P_EASY, P_DEAD, P_HARD, P_HARD_EASY, P_HARD_DEAD, NPATH };

static void test_every_mix(void **state) {
    (void)state;
    static const int perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                    {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    int combos = 0;
    for (int code = 0; code < NPATH * NPATH * NPATH; code++) {
        int path[3] = {code % NPATH, code / NPATH % NPATH, code / (NPATH * NPATH)};
        for (int p = 0; p < 6; p++) {
            twn_units *t = twn_units_new();
            uint32_t seq;
            int done_now;
            assert_int_equal(twn_units_add(t, 0xabc, 3, &seq, &done_now, NULL), 0);
            assert_int_equal(done_now, 0);
            /* Gate pass first: route the hard ones. */
            for (uint32_t i = 0; i < 3; i++) {
                if (path[i] < P_HARD) continue;
                twn_units_result r;
                assert_int_equal(twn_units_mark_hard(t, seq, &i, 1, NULL, NULL, &r, NULL), 0);
                assert_int_equal(r.applied, 1);
                assert_int_equal(twn_units_item(t, seq, i), TWN_ITEM_HARD_PENDING);
            }
            int want[3] = {0}; /* easy, hard, dead */
            for (int k = 0; k < 3; k++) {
                uint32_t i = (uint32_t)perms[p][k];
                twn_units_result r;
                uint32_t think = 10 + i;
                switch (path[i]) {
                case P_EASY:
                case P_HARD_EASY:
                    assert_int_equal(
                        twn_units_ack(t, seq, &i, &think, 1, TWN_ROUTE_EASY, NULL, NULL, &r, NULL),
                        0);
                    want[0]++;
                    break;
                case P_HARD:
                    assert_int_equal(
                        twn_units_ack(t, seq, &i, &think, 1, TWN_ROUTE_HARD, NULL, NULL, &r, NULL),
                        0);
                    want[1]++;
                    break;
                default:
                    assert_int_equal(twn_units_dead(t, seq, i, NULL, &r, NULL), 0);
                    want[2]++;
                    break;
                }
                assert_int_equal(r.applied, 1);
                assert_int_equal(r.duplicates, 0);
                assert_int_equal(r.unit_done, k == 2);
                assert_int_equal(twn_units_is_done(t, seq), k == 2);
                if (k < 2) {
                    twn_item_state st = twn_units_item(t, seq, i);
                    assert_true(st == TWN_ITEM_EASY || st == TWN_ITEM_HARD || st == TWN_ITEM_DEAD);
                }
            }
            twn_unit_counts c = twn_units_counts(t, seq);
            assert_int_equal(c.n_items, 3);
            assert_int_equal(c.easy, want[0]);
            assert_int_equal(c.hard, want[1]);
            assert_int_equal(c.dead, want[2]);
            uint64_t think = 0;
            for (uint32_t i = 0; i < 3; i++) think += path[i] == P_HARD ? 10 + i : 0;
            assert_int_equal(c.think_tokens, think);
            const twn_progress *pr = twn_units_progress(t);
            assert_int_equal(pr->items_done, 3);
            assert_int_equal(pr->easy + pr->hard + pr->rejected, 3);
            assert_int_equal(pr->hard_pending, 0);
            assert_int_equal(pr->units_done, 1);
            assert_int_equal(twn_units_item(t, seq, 0), TWN_ITEM_COMPLETED);
            assert_int_equal(twn_units_item_bytes(t), 0);
            twn_units_free(t);
            combos++;
        }
    }
    assert_int_equal(combos, 125 * 6);
}

static void test_duplicates_and_late_acks(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    uint32_t seq;
    assert_int_equal(twn_units_add(t, 7, 4, &seq, NULL, NULL), 0);
    const uint32_t a[3] = {0, 1, 1}; /* a duplicate inside one batch too */
    const uint32_t think[3] = {5, 6, 7};
    twn_units_result r;
    assert_int_equal(twn_units_ack(t, seq, a, think, 3, TWN_ROUTE_HARD, NULL, NULL, &r, NULL), 0);
    assert_int_equal(r.applied, 2);
    assert_int_equal(r.duplicates, 1);
    assert_int_equal(twn_units_progress(t)->think_tokens, 11); /* the duplicate's 7 not counted */
    /* The same items again, on the other route: nothing changes. */
    assert_int_equal(twn_units_ack(t, seq, a, think, 2, TWN_ROUTE_EASY, NULL, NULL, &r, NULL), 0);
    assert_int_equal(r.applied, 0);
    assert_int_equal(r.duplicates, 2);
    assert_int_equal(twn_units_item(t, seq, 1), TWN_ITEM_HARD);
    /* A dead letter for an acked item is a duplicate; hard routing of it too. */
    assert_int_equal(twn_units_dead(t, seq, 0, NULL, &r, NULL), 0);
    assert_int_equal(r.duplicates, 1);
    uint32_t zero = 0;
    assert_int_equal(twn_units_mark_hard(t, seq, &zero, 1, NULL, NULL, &r, NULL), 0);
    assert_int_equal(r.duplicates, 1);
    assert_int_equal(twn_units_ack_range(t, seq, 0, 4, TWN_ROUTE_EASY, NULL, NULL, &r, NULL), 0);
    assert_int_equal(r.applied, 2);
    assert_int_equal(r.duplicates, 2);
    assert_int_equal(r.unit_done, 1);
    /* Late acks after completion. */
    assert_int_equal(twn_units_ack_range(t, seq, 0, 4, TWN_ROUTE_HARD, NULL, NULL, &r, NULL), 0);
    assert_int_equal(r.applied, 0);
    assert_int_equal(r.duplicates, 4);
    assert_int_equal(r.unit_done, 0);
    const twn_progress *p = twn_units_progress(t);
    assert_int_equal(p->items_done, 4);
    assert_int_equal(p->easy, 2);
    assert_int_equal(p->hard, 2);
    assert_int_equal(p->rejected, 0);
    assert_int_equal(p->think_tokens, 11);
    assert_int_equal(p->duplicates, 1 + 2 + 1 + 1 + 2 + 4);
    assert_int_equal(p->units_done, 1);
    twn_units_free(t);
}

static void test_refused_reports(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    twn_err err = {{0}};
    uint32_t seq;
    assert_int_equal(twn_units_add(t, 0x1234, 10, &seq, NULL, NULL), 0);
    expect_err(twn_units_add(t, 0x1234, 3, NULL, NULL, &err), &err,
               "unit 0000000000001234: duplicate key (unit 0 has the same source range)");
    expect_err(twn_units_add(t, 0x55, TWN_UNIT_MAX_ITEMS + 1, NULL, NULL, &err), &err,
               "unit 0000000000000055: 16777217 items, more than the 16777216 allowed");
    expect_err(twn_units_lookup(t, 0xdead, &seq, &err), &err,
               "unknown unit 000000000000dead: not in the plan (1 units)");
    /* One bad index refuses the whole batch: item 3 stays PENDING. */
    const uint32_t items[2] = {3, 10};
    twn_units_result r;
    expect_err(twn_units_ack(t, 0, items, NULL, 2, TWN_ROUTE_EASY, NULL, NULL, &r, &err), &err,
               "ack for unit 0000000000001234 item 10: the unit has 10 items (0..9)");
    assert_int_equal(r.applied, 0);
    assert_int_equal(twn_units_item(t, 0, 3), TWN_ITEM_PENDING);
    expect_err(twn_units_ack_range(t, 0, 5, 11, TWN_ROUTE_EASY, NULL, NULL, &r, &err), &err,
               "ack for unit 0000000000001234 items [5, 11): the unit has 10 items");
    expect_err(twn_units_mark_hard(t, 0, items, 2, NULL, NULL, &r, &err), &err,
               "hard route for unit 0000000000001234 item 10: the unit has 10 items (0..9)");
    expect_err(twn_units_dead(t, 0, 99, NULL, &r, &err), &err,
               "dead letter for unit 0000000000001234 item 99: the unit has 10 items (0..9)");
    assert_int_equal(twn_units_progress(t)->bad_reports, 5);
    assert_int_equal(twn_units_progress(t)->items_done, 0);
    twn_units_free(t);
}

static void test_tags(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    uint32_t seq;
    assert_int_equal(twn_units_add(t, 1, 5, &seq, NULL, NULL), 0);
    twn_units_set_tag(t, seq, 77);
    const uint32_t hard[2] = {1, 3};
    uint32_t changed[2];
    size_t nc;
    twn_units_result r;
    assert_int_equal(twn_units_mark_hard(t, seq, hard, 2, changed, &nc, &r, NULL), 0);
    assert_int_equal(nc, 2);
    assert_int_equal(changed[1], 3);
    assert_int_equal(r.unit_tag, 0);
    twn_units_set_item_tag(t, seq, 1, 500);
    twn_units_set_item_tag(t, seq, 3, TWN_UNIT_MAX_TAG);
    assert_int_equal(twn_units_item_tag(t, seq, 3), TWN_UNIT_MAX_TAG);
    assert_int_equal(twn_units_item(t, seq, 3), TWN_ITEM_HARD_PENDING);
    /* Resolving the last PENDING items (0, 2, 4) hands back the unit tag, once. */
    const uint32_t easy[3] = {0, 2, 4};
    uint32_t tags[5];
    size_t nt;
    assert_int_equal(twn_units_ack(t, seq, easy, NULL, 2, TWN_ROUTE_EASY, tags, &nt, &r, NULL), 0);
    assert_int_equal(r.unit_tag, 0);
    assert_int_equal(nt, 0);
    assert_int_equal(twn_units_dead(t, seq, 4, NULL, &r, NULL), 0);
    assert_int_equal(r.unit_tag, 77);
    assert_int_equal(twn_units_tag(t, seq), 0);
    assert_int_equal(twn_units_pending(t, seq), 0);
    /* Acking the hard items hands back their tags. */
    const uint32_t both[3] = {3, 1, 3};
    assert_int_equal(twn_units_ack(t, seq, both, NULL, 3, TWN_ROUTE_HARD, tags, &nt, &r, NULL), 0);
    assert_int_equal(nt, 2);
    assert_int_equal(tags[0], TWN_UNIT_MAX_TAG);
    assert_int_equal(tags[1], 500);
    assert_int_equal(r.unit_done, 1);
    twn_units_free(t);
}

static void test_low_water_and_memory(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    int done_now;
    for (uint64_t k = 0; k < 5; k++)
        assert_int_equal(twn_units_add(t, 100 + k, k == 2 ? 0 : 1000, NULL, &done_now, NULL), 0);
    assert_int_equal(twn_units_count(t), 5);
    assert_int_equal(twn_units_low_water(t), 0);
    assert_true(twn_units_is_done(t, 2));         /* empty unit: done at once */
    assert_int_equal(twn_units_item_bytes(t), 0); /* nothing touched yet */
    twn_units_result r;
    assert_int_equal(twn_units_ack_range(t, 1, 0, 1000, TWN_ROUTE_EASY, NULL, NULL, &r, NULL), 0);
    assert_int_equal(twn_units_low_water(t), 0);
    assert_int_equal(twn_units_ack_range(t, 3, 0, 10, TWN_ROUTE_EASY, NULL, NULL, &r, NULL), 0);
    assert_int_equal(twn_units_item_bytes(t), 1000 * 4);
    assert_int_equal(twn_units_ack_range(t, 0, 0, 1000, TWN_ROUTE_EASY, NULL, NULL, &r, NULL), 0);
    assert_int_equal(twn_units_low_water(t), 3);
    twn_unit_counts c = {1000, 400, 500, 100, 12345};
    twn_units_restore_done(t, 3, &c);
    assert_int_equal(twn_units_low_water(t), 4);
    assert_int_equal(twn_units_item_bytes(t), 0);
    const twn_progress *p = twn_units_progress(t);
    assert_int_equal(p->items_done, 3000);
    assert_int_equal(p->easy, 2400);
    assert_int_equal(p->hard, 500);
    assert_int_equal(p->rejected, 100);
    assert_int_equal(p->think_tokens, 12345);
    assert_int_equal(p->units_done, 4);
    assert_int_equal(p->items_total, 4000);
    uint32_t seq;
    assert_int_equal(twn_units_find(t, 104, &seq), 1);
    assert_int_equal(seq, 4);
    assert_int_equal(twn_units_find(t, 105, &seq), 0);
    twn_units_free(t);
}

/* Many units: the key map grows and every key still finds its unit. */
static void test_many_units(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    for (uint32_t i = 0; i < 100000; i++)
        assert_int_equal(twn_units_add(t, (uint64_t)i * 0x9e3779b97f4a7c15ull, 1, NULL, NULL, NULL),
                         0);
    for (uint32_t i = 0; i < 100000; i += 7) {
        uint32_t seq;
        assert_int_equal(twn_units_find(t, (uint64_t)i * 0x9e3779b97f4a7c15ull, &seq), 1);
        assert_int_equal(seq, i);
    }
    twn_units_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_mix),
        cmocka_unit_test(test_duplicates_and_late_acks),
        cmocka_unit_test(test_refused_reports),
        cmocka_unit_test(test_tags),
        cmocka_unit_test(test_low_water_and_memory),
        cmocka_unit_test(test_many_units),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
