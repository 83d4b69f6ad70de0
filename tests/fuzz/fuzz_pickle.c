/* fuzz_pickle.c — raw bytes run as data.pkl against a fixed, valid storage zip.
 *
 * Mutating whole .pt files mostly trips the zip CRC before the pickle VM runs, so this target
 * hands the bytes straight to the VM (twn_pt_load_mem_pickle).  The zip holds storages "0".."15"
 * of 512 bytes each, enough for the data.pkl seeds taken from tests/data/pt/ to resolve their
 * storages and reach _rebuild_tensor_v2 and materialization. */
#include <stddef.h>
#include <stdint.h>

#include "engine/ptfile_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { N_STORAGES = 16, STORAGE_BYTES = 512 };

static const void *storage_zip(size_t *len) {
    static void *zip;
    static size_t zip_len;
    static uint8_t bytes[N_STORAGES][STORAGE_BYTES];
    if (!zip) {
        twn_tensor ts[N_STORAGES];
        static char names[N_STORAGES][8];
        for (int i = 0; i < N_STORAGES; i++) {
            for (int k = 0; k < STORAGE_BYTES; k++) bytes[i][k] = (uint8_t)(i * 31 + k);
            names[i][0] = (char)('a' + i);
            ts[i] = (twn_tensor){.name = names[i],
                                 .dtype = TWN_DT_U8,
                                 .ndim = 1,
                                 .shape = {STORAGE_BYTES},
                                 .data = bytes[i],
                                 .nbytes = STORAGE_BYTES};
        }
        twn_err err;
        if (twn_pt_write_mem(ts, N_STORAGES, false, &zip, &zip_len, &err) != 0) __builtin_trap();
    }
    *len = zip_len;
    return zip;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t zlen;
    const void *zip = storage_zip(&zlen);
    twn_pt_file *f = NULL;
    twn_err err;
    if (twn_pt_load_mem_pickle(zip, zlen, data, size, "fuzz.pkl", &f, &err) != 0) return 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < twn_pt_count(f); i++) {
        const twn_tensor *t = twn_pt_at(f, i);
        const uint8_t *p = t->data;
        for (size_t k = 0; k < t->nbytes; k++) sink ^= p[k];
    }
    (void)sink;
    twn_pt_free(f);
    return 0;
}
