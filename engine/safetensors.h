/* safetensors.h — reading and writing the safetensors format, single-file and sharded.
 *
 * Format (huggingface/safetensors): u64 LE header length N, N bytes of JSON header
 * {"name": {"dtype","shape","data_offsets":[b,e]}, "__metadata__": {str: str}}, then the byte
 * buffer.  Files are mmap'd read-only; tensor views point into the mapping.
 *
 * Validation on open (any failure = one error naming the file and the problem): header length
 * within the file and <= 100 MB, header is a JSON object, every dtype known, every dim >= 0,
 * offsets sorted without gaps or overlap (begin == previous end), end - begin == numel * dtype
 * size (overflow-checked), and the last end == buffer length.  Views are aligned to their dtype
 * size: a legal but oddly laid-out file whose tensor would sit misaligned gets that tensor copied
 * into an aligned buffer owned by the twn_st_file (files from this writer or from safetensors
 * never need it). */
#ifndef TWN_ENGINE_SAFETENSORS_H
#define TWN_ENGINE_SAFETENSORS_H

#include <stddef.h>

#include "engine/tensor.h"
#include "util/err.h"

typedef struct twn_st_file twn_st_file;

int twn_st_open(const char *path, twn_st_file **out, twn_err *err);
/* The same validation over bytes in memory, which are borrowed (they must outlive the file);
 * name is used in messages and returned by twn_st_path.  This is the fuzzing entry point. */
int twn_st_open_mem(const void *data, size_t len, const char *name, twn_st_file **out,
                    twn_err *err);
void twn_st_close(twn_st_file *f);
const char *twn_st_path(const twn_st_file *f);
size_t twn_st_count(const twn_st_file *f);
/* Tensors in name order. */
const twn_tensor *twn_st_at(const twn_st_file *f, size_t i);
const twn_tensor *twn_st_find(const twn_st_file *f, const char *name);
/* A "__metadata__" value, or NULL. */
const char *twn_st_metadata(const twn_st_file *f, const char *key);

/* A model directory: "model.safetensors.index.json" (weight_map name -> shard file; every shard
 * opened, every mapped name must exist in its shard) if present, else "model.safetensors". */
typedef struct twn_st_set twn_st_set;

int twn_st_set_open_dir(const char *dir, twn_st_set **out, twn_err *err);
void twn_st_set_close(twn_st_set *s);
size_t twn_st_set_count(const twn_st_set *s);
const twn_tensor *twn_st_set_at(const twn_st_set *s, size_t i);
const twn_tensor *twn_st_set_find(const twn_st_set *s, const char *name);
/* The file (path) a tensor came from, for error messages. */
const char *twn_st_set_file_of(const twn_st_set *s, const char *name);
/* Drops the resident pages of a tensor's bytes from this process (madvise MADV_DONTNEED on the
 * whole pages inside it) when they come from a file mapping; the data stays readable (it is paged
 * in again from the file).  Loaders call it after upcasting a tensor, so peak RSS stays near the
 * fp32 copy instead of fp32 + the mapped file.  No effect on borrowed or realigned memory. */
void twn_st_set_release(const twn_st_set *s, const char *name);

/* Writer: collects tensors (data is copied) and streams one file atomically (tmp file, fsync,
 * rename), header padded with spaces to a multiple of 8 bytes.  Tensors are laid out by dtype
 * size, largest first, then by name (as safetensors' own writer does), so every tensor starts
 * aligned to its dtype; readers never depend on the order. */
typedef struct twn_st_writer twn_st_writer;

twn_st_writer *twn_st_writer_new(void);
void twn_st_writer_free(twn_st_writer *w);
int twn_st_writer_add(twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                      const int64_t *shape, const void *data, twn_err *err);
/* Adds a float32 source converted to dt (F32, F16 or BF16). */
int twn_st_writer_add_f32(twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                          const int64_t *shape, const float *data, twn_err *err);
void twn_st_writer_meta(twn_st_writer *w, const char *key, const char *value);
size_t twn_st_writer_bytes(const twn_st_writer *w); /* tensor bytes so far */
int twn_st_writer_write(twn_st_writer *w, const char *path, twn_err *err);

#endif
