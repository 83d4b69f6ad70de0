/* fuzz_safetensors.c — arbitrary bytes through the full safetensors validation.
 *
 * Whatever opens must keep the reader's promise to consumers: every view lies inside the input
 * (or the realigned copy), is aligned to its dtype, and has nbytes == numel * dtype size; so the
 * target reads every byte of every tensor and converts the float ones, letting ASan catch any
 * view that points outside.  Whatever fails must say why, naming the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/safetensors.h"

#define NAME "fuzz.safetensors"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_st_file *f;
    twn_err err = {{0}};
    if (twn_st_open_mem(data, size, NAME, &f, &err) != 0) {
        if (strncmp(err.msg, NAME ": ", sizeof NAME + 1) != 0) abort();
        return 0;
    }
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < twn_st_count(f); i++) {
        const twn_tensor *t = twn_st_at(f, i);
        if (twn_st_find(f, t->name) != t) abort();
        if (i && strcmp(twn_st_at(f, i - 1)->name, t->name) >= 0) abort();
        int64_t numel = twn_tensor_numel(t);
        if (numel < 0 || (uint64_t)numel * twn_dtype_size(t->dtype) != t->nbytes) abort();
        if (t->nbytes && (uintptr_t)t->data % twn_dtype_size(t->dtype)) abort();
        const uint8_t *p = t->data;
        for (size_t k = 0; k < t->nbytes; k++) sink ^= p[k];
        if (t->dtype == TWN_DT_F32 || t->dtype == TWN_DT_F16 || t->dtype == TWN_DT_BF16 ||
            t->dtype == TWN_DT_F64) {
            float *out = malloc(numel ? (size_t)numel * sizeof *out : 1);
            if (twn_tensor_to_f32(t, out, &err) != 0) abort();
            for (int64_t k = 0; k < numel; k++) sink ^= (uint8_t)(out[k] == out[k]);
            free(out);
        }
    }
    (void)twn_st_metadata(f, "format");
    (void)sink;
    twn_st_close(f);
    return 0;
}
