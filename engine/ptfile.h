/* ptfile.h — PyTorch .pt files: the zip container + the pickle subset of plain tensors.
 *
 * Reads what torch.save writes for a state_dict of plain tensors (OrderedDict or dict, possibly
 * with a `_metadata` BUILD), a bare tensor, or an nn.Parameter (_rebuild_parameter): a zip
 * (libzip) with "<prefix>/data.pkl", "<prefix>/data/<key>" storages, "<prefix>/byteorder".
 * Pickle protocol 2 opcodes plus the protocol-4 framing ones; GLOBALs allowed only from a
 * whitelist (collections.OrderedDict, torch._utils._rebuild_tensor_v2, _rebuild_parameter,
 * torch.*Storage, torch.Size); anything else is refused by name.  Tensors are materialized
 * contiguous (storage_offset and strides applied, bounds checked against the storage size).
 *
 * The writer produces the same layout torch.save does (archive name = file stem, stored
 * records, data aligned to 64 bytes, protocol 2 pickle, .format_version, .storage_alignment,
 * byteorder, version), so torch.load(weights_only=True) reads it. */
#ifndef TWN_ENGINE_PTFILE_H
#define TWN_ENGINE_PTFILE_H

#include <stdbool.h>
#include <stddef.h>

#include "engine/tensor.h"
#include "util/err.h"

typedef struct twn_pt_file twn_pt_file;

int twn_pt_load(const char *path, twn_pt_file **out, twn_err *err);
/* Same from memory (used by the fuzz target); `name` is used in messages. */
int twn_pt_load_mem(const void *data, size_t len, const char *name, twn_pt_file **out,
                    twn_err *err);
void twn_pt_free(twn_pt_file *f);
/* Number of tensors; a bare tensor file has one tensor named "". */
size_t twn_pt_count(const twn_pt_file *f);
const twn_tensor *twn_pt_at(const twn_pt_file *f, size_t i); /* in file (insertion) order */
const twn_tensor *twn_pt_find(const twn_pt_file *f, const char *name);
bool twn_pt_is_bare(const twn_pt_file *f);

/* Writes tensors (contiguous views) as a state_dict (OrderedDict, insertion order) or, when
 * bare is true and n == 1, as a bare tensor. */
int twn_pt_write(const char *path, const twn_tensor *tensors, size_t n, bool bare, twn_err *err);

#endif
