/* backend.h — the one seam between the TWN scheduler and the machine that runs the decoder.
 *
 * A backend holds a loaded model (twn_lm with its adapters attached) and runs ragged,
 * mixed-adapter forward steps with exactly twn_lm_forward's semantics (lm.h): any set of
 * sequences, each adding any number of rows with its own adapter, each attending only to its own
 * KV cache.  Two implementations, chosen in one place (twn_backend_open):
 *   cpu   engine/lm.c on OpenBLAS, fp32 — the reference;
 *   cuda  libtwn_cuda.so (engine/cuda/), bf16 weights on the GPU, paged KV, loaded with dlopen()
 *         so that the same binary runs on machines without CUDA.
 * `auto` takes cuda when the module loads and a device answers, else cpu, and keeps the reason
 * (twn_backend_describe), e.g. "cpu (CUDA unavailable: no NVIDIA driver ...)".
 *
 * Where the module is looked for, first hit wins: opts.cuda_module (only that, when set); the
 * TWN_CUDA_MODULE environment variable; the running executable's directory; ../lib next to it;
 * the build tree's path (compiled in); then the dynamic loader's search (LD_LIBRARY_PATH).
 * The module is loaded once per process and never unloaded (the CUDA runtime it carries
 * registers exit handlers). */
#ifndef TWN_ENGINE_BACKEND_H
#define TWN_ENGINE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/lm.h"
#include "util/err.h"

typedef enum { TWN_BACKEND_AUTO, TWN_BACKEND_CPU, TWN_BACKEND_CUDA } twn_backend_kind;

typedef struct {
    twn_backend_kind kind;
    const char *cuda_module; /* path of libtwn_cuda.so; NULL: search (above) */
    int device;              /* CUDA device ordinal */
    size_t kv_budget_bytes;  /* KV memory: cuda, the paged pool (0: 80% of the device memory
                                the weights leave, minus 1 GiB for activations); cpu, rows of
                                fp32 K and V handed out the same way (0: unbounded) */
    int kv_page_rows;        /* rows per KV page; 0: 16 */
    bool cuda_graphs;        /* replay decode-only steps from CUDA graphs (default true) */
} twn_backend_opts;

void twn_backend_opts_default(twn_backend_opts *o);
/* "cpu" | "cuda" | "auto". */
int twn_backend_kind_parse(const char *s, twn_backend_kind *kind, twn_err *err);
const char *twn_backend_kind_name(twn_backend_kind kind);

typedef struct twn_backend twn_backend;
typedef struct twn_bkv twn_bkv; /* one sequence's KV cache, owned by its backend */

/* One sequence's part of a step: twn_lm_seq (lm.h) with a backend KV cache, plus two optional
 * reductions that save copying big rows back from a device:
 *   argmax: out, the index of the largest logit of the last row (lowest index on ties); the
 *           logits themselves are copied only where `logits` is set;
 *   pooled: out [H], the mean of the last pool_rows final-norm hidden rows (1 <= pool_rows <= n):
 *           rows summed in order, then divided by pool_rows (engine/twn.c's query_mean, bit for
 *           bit on cpu); pool_rows 1 is the last row itself (last_token pooling).
 * Threads: a cpu backend may run steps from several threads at once (twn_lm_forward only reads
 * the model); a cuda backend serializes its calls (one stream and one KV pool per context). */
typedef struct {
    twn_bkv *kv;
    int n;
    const int32_t *ids;
    const float *embeds;
    const int32_t *pos;
    int adapter;
    float *hidden;
    float *logits;
    int32_t *argmax;
    int pool_rows;
    float *pooled;
    const twn_lm_deepstack *deepstack;
} twn_bseq;

/* Opens a backend for lm, which must outlive it (cpu runs on it; cuda copies it to the device,
 * so adapters must be attached before).  kind cuda fails when CUDA is unavailable, with the
 * reason; kind auto falls back to cpu and says why in twn_backend_describe. */
int twn_backend_open(const twn_lm *lm, const twn_backend_opts *o, twn_backend **out, twn_err *err);
void twn_backend_close(twn_backend *b);
/* TWN_BACKEND_CPU or TWN_BACKEND_CUDA (never AUTO). */
twn_backend_kind twn_backend_which(const twn_backend *b);
/* One line for logs: "cuda: NVIDIA H100 ... " or "cpu (CUDA unavailable: ...)". */
const char *twn_backend_describe(const twn_backend *b);

/* A KV cache with room for `reserve` rows (the scheduler reserves prompt + max_think_tokens).
 * On cuda the rows come from the paged pool, on cpu from kv_budget_bytes when set; opening (or a
 * step that grows a cache past its rows) fails when they are exhausted, and the scheduler then
 * defers the sequence (twn.h). */
int twn_backend_kv_open(twn_backend *b, int reserve, twn_bkv **out, twn_err *err);
void twn_backend_kv_close(twn_backend *b, twn_bkv *kv);
/* Forgets everything after the first `len` rows. */
void twn_backend_kv_truncate(twn_backend *b, twn_bkv *kv, int len);
int twn_backend_kv_len(const twn_backend *b, const twn_bkv *kv);
/* Rows the KV pool can still hand out (INT64_MAX on cpu without a KV budget). */
int64_t twn_backend_kv_rows_free(const twn_backend *b);

/* One step, twn_lm_forward's semantics (no trace callback: golden traces use the cpu backend). */
int twn_backend_forward(twn_backend *b, twn_bseq *seqs, int n_seqs, twn_err *err);

/* Whether the CUDA backend could be used under o (module, driver, device): 1, or 0 with the
 * reason in why.  Loads the module if needed. */
int twn_backend_cuda_available(const twn_backend_opts *o, char *why, size_t n);

/* The loaded CUDA module's function table (engine/cuda/cuda_abi.h), for the kernel tests and
 * benchmarks; NULL with the reason in why when it cannot be loaded.  path NULL: search. */
const struct twn_cuda_module *twn_backend_cuda_module(const char *path, char *why, size_t n);

#endif
