/* fuzz_ptfile.c — whole .pt files (zip + pickle) into twn_pt_load_mem.
 *
 * Reaches the zip layer (libzip), record reads and byteorder handling; mutations that survive
 * the zip CRC checks into the pickle are rare, which is what fuzz_pickle is for.  Every tensor
 * of a loaded file is read end to end so ASan sees any view that escapes its storage. */
#include <stddef.h>
#include <stdint.h>

#include "engine/ptfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_pt_file *f = NULL;
    twn_err err;
    if (twn_pt_load_mem(data, size, "fuzz.pt", &f, &err) != 0) return 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < twn_pt_count(f); i++) {
        const twn_tensor *t = twn_pt_at(f, i);
        const uint8_t *p = t->data;
        for (size_t k = 0; k < t->nbytes; k++) sink ^= p[k];
        (void)twn_pt_find(f, t->name);
    }
    (void)sink;
    twn_pt_free(f);
    return 0;
}
