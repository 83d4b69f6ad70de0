/* fuzz_jsonl.c — arbitrary bytes as a JSONL source: planned, read by unit and by ref.
 *
 * The input size picks the unit size (1..4) and whether missing ids are derived, so seeds are
 * plain files.  source_check.h lists the invariants.  Each line of the file is also fed straight to
 * the record parser, which must either fill an item or say why, naming the file. Seeds:
 * hand-written JSONL (good items, every bad-record kind of test_source.c, CRLF, blank lines, a
 * missing final newline). */
#include "tests/fuzz/source_check.h"

#define NAME "fuzz/items.jsonl"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!size) return 0;
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 2048; /* reach the oversized path on small inputs */
    o.max_id_bytes = 64;
    o.derive_missing_id = (size >> 2) & 1;
    uint64_t per = 1 + (size & 3);
    fz_source_check(data, size, NAME, TWN_SRC_JSONL, per, &o);

    const char *p = (const char *)data, *end = (const char *)data + size;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        twn_src_item it = {.line = 1};
        int rc = twn_src_jsonl_parse(p, len, NAME, &o, &it);
        if (rc == 0)
            fz_check_item(&it, NAME, &o);
        else if (!it.fault || strncmp(it.err.msg, NAME ": ", sizeof NAME + 1))
            abort();
        twn_src_item_clear(&it);
        p += len + 1;
    }
    return 0;
}
