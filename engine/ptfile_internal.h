/* ptfile_internal.h — seams of ptfile.c for its tests and fuzz targets, not for other modules.
 *
 * The zip layer checks CRCs, so a fuzzer mutating whole .pt files rarely gets a changed byte
 * past it into the pickle VM.  twn_pt_load_mem_pickle runs the VM over arbitrary bytes as if
 * they were the archive's data.pkl, with storages still read from a real zip; and
 * twn_pt_write_mem builds such a zip (or any .pt) in memory. */
#ifndef TWN_ENGINE_PTFILE_INTERNAL_H
#define TWN_ENGINE_PTFILE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "engine/ptfile.h"

/* Like twn_pt_load_mem, but the pickle program is `pkl` instead of the archive's data.pkl (which
 * must still exist: it names the record prefix).  Storages come from the archive. */
int twn_pt_load_mem_pickle(const void *zip, size_t zip_len, const void *pkl, size_t pkl_len,
                           const char *name, twn_pt_file **out, twn_err *err);

/* twn_pt_write into a new buffer (twn_free it); the archive prefix is "archive", as torch.save
 * uses for a BytesIO. */
int twn_pt_write_mem(const twn_tensor *tensors, size_t n, bool bare, void **data, size_t *len,
                     twn_err *err);

#endif
