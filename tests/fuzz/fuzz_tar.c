/* fuzz_tar.c — arbitrary bytes as a WebDataset tar shard: planned, read by unit and by ref.
 *
 * The input size picks the unit size (1..4) and a small or the default item limit, so seeds are
 * plain shards.  source_check.h lists the invariants: whatever the headers say (bad checksums,
 * sizes past the end, pax/long-name headers, truncation), the planner and both readers agree on
 * every item, never read outside the input (ASan), and name the file in every message. Seeds: small
 * shards written by Python's tarfile (GNU, pax with a long name, ustar with a prefix;
 * jpg/png/webp/txt/json members, a directory, a key-less member, bad records), one with a corrupted
 * header checksum, one truncated inside member data and one inside a header. */
#include "tests/fuzz/source_check.h"

#define NAME "fuzz/shard.tar"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!size) return 0;
    twn_src_opts o = twn_src_opts_default();
    if ((size >> 10) & 1) o.max_item_bytes = 4096;
    o.max_id_bytes = 64;
    uint64_t per = 1 + ((size ^ size >> 9) & 3);
    fz_source_check(data, size, NAME, TWN_SRC_TAR, per, &o);
    return 0;
}
