/* fuzz_journal.c — arbitrary bytes through coordinator journal replay.
 *
 * Each input is replayed three ways: as is (so the torn-tail detection sees every length and CRC
 * mutation); with every record's CRC recomputed first (the CRC would otherwise stop nearly every
 * mutated body before the decoder); and with a plan fingerprint to compare against.  Whatever
 * fails must say so naming the journal; whatever succeeds must keep replay's promises: the valid
 * prefix and the dropped tail add up to the input, replaying just the valid prefix gives the same
 * records with a clean tail, and every record handed out is within its documented bounds. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/journal.h"

#define NAME "fuzz.journal"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct seen {
    uint64_t records, hash;
} seen;

static int visit(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    seen *s = ctx;
    uint64_t h = s->hash * 31 + (uint64_t)r->type + r->offset;
    switch (r->type) {
    case TWN_JREC_JOB_START:
        if (strlen(r->fp.sources) > TWN_JOURNAL_MAX_STRING) abort();
        if (strlen(r->fp.model_hash) > TWN_JOURNAL_MAX_STRING) abort();
        h += r->fp.unit_size;
        break;
    case TWN_JREC_UNIT_DONE:
        if ((uint64_t)r->counts.easy + r->counts.hard + r->counts.dead != r->counts.n_items)
            abort();
        h += r->unit + r->counts.think_tokens;
        break;
    case TWN_JREC_DEAD_LETTER:
        if (r->stage < 1 || r->stage > TWN_STAGE_MAX || !r->reason) abort();
        h += r->unit + r->item + strlen(r->reason);
        break;
    case TWN_JREC_HARD_ROUTED:
        if (r->n_items > TWN_JOURNAL_MAX_HARD) abort();
        for (size_t i = 0; i < r->n_items; i++) h += r->items[i];
        break;
    case TWN_JREC_RESUME:
        h += r->epoch;
        break;
    case TWN_JREC_JOB_FINISHED:
        h += r->job.items;
        break;
    default:
        abort();
    }
    s->hash = h;
    s->records++;
    return 0;
}

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    }
    return c ^ 0xffffffffu;
}

static void replay(const uint8_t *data, size_t size, const twn_plan_fp *fp) {
    twn_err err = {{0}};
    twn_journal_info info;
    seen a = {0, 0};
    if (twn_journal_replay_mem(data, size, NAME, fp, visit, &a, &info, &err) != 0) {
        if (strncmp(err.msg, NAME ": ", sizeof NAME + 1) != 0) abort();
        return;
    }
    if (info.valid_bytes + info.torn_bytes != size || info.records != a.records) abort();
    if (!info.records || info.epoch < 2) abort();
    if (!info.torn_bytes != !info.torn_reason[0]) abort();
    seen b = {0, 0};
    twn_journal_info again;
    if (twn_journal_replay_mem(data, (size_t)info.valid_bytes, NAME, fp, visit, &b, &again, &err) !=
        0)
        abort();
    if (again.torn_bytes || b.records != a.records || b.hash != a.hash) abort();
    if (again.epoch != info.epoch || again.finished != info.finished) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    replay(data, size, NULL);
    /* The same bytes with every CRC made right, as far as the lengths chain. */
    uint8_t *fixed = malloc(size ? size : 1);
    memcpy(fixed, data, size);
    size_t at = TWN_JOURNAL_HEADER;
    while (size >= at && size - at >= 8) {
        uint32_t len = (uint32_t)fixed[at] | (uint32_t)fixed[at + 1] << 8 |
                       (uint32_t)fixed[at + 2] << 16 | (uint32_t)fixed[at + 3] << 24;
        if (len == 0 || len > TWN_JOURNAL_MAX_RECORD || size - at - 8 < len) break;
        uint32_t crc = crc32c(fixed + at + 8, len);
        for (int i = 0; i < 4; i++) fixed[at + 4 + i] = (uint8_t)(crc >> (8 * i));
        at += 8 + (size_t)len;
    }
    replay(fixed, size, NULL);
    const twn_plan_fp fp = {"corpus/a.jsonl", 1024, "sha256:0123"};
    replay(fixed, size, &fp);
    free(fixed);
    return 0;
}
