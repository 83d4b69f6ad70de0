/* tensor.h — dtypes and borrowed tensor views shared by every loader.
 *
 * A twn_tensor is a *view*: name, dtype, shape and a pointer to contiguous little-endian C-order
 * bytes owned by someone else (an mmap'd safetensors file, a .pt file's storage copy, a writer's
 * buffer).  Loaders validate that nbytes == numel * dtype size before handing one out, so code that
 * consumes a view may rely on it. */
#ifndef TWN_ENGINE_TENSOR_H
#define TWN_ENGINE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

#define TWN_MAX_DIMS 8

typedef enum {
    TWN_DT_BOOL,
    TWN_DT_U8,
    TWN_DT_I8,
    TWN_DT_F8_E5M2,
    TWN_DT_F8_E4M3,
    TWN_DT_I16,
    TWN_DT_U16,
    TWN_DT_F16,
    TWN_DT_BF16,
    TWN_DT_I32,
    TWN_DT_U32,
    TWN_DT_F32,
    TWN_DT_F64,
    TWN_DT_I64,
    TWN_DT_U64,
    TWN_DT_COUNT
} twn_dtype;

typedef struct {
    const char *name;
    twn_dtype dtype;
    int ndim;
    int64_t shape[TWN_MAX_DIMS];
    const void *data;
    size_t nbytes;
} twn_tensor;

/* Bytes per element. */
size_t twn_dtype_size(twn_dtype dt);
/* Safetensors spelling ("BF16", "F32", ...). */
const char *twn_dtype_name(twn_dtype dt);
/* Parses the safetensors spelling; returns -1 for an unknown name. */
int twn_dtype_parse(const char *name, twn_dtype *dt);

int64_t twn_tensor_numel(const twn_tensor *t);
/* "[151936, 64]" into buf. */
const char *twn_shape_str(const twn_tensor *t, char *buf, size_t n);

/* Converts F32/F16/BF16/F64 elements to float32 (bf16 -> f32 is exact: bits << 16). */
int twn_tensor_to_f32(const twn_tensor *t, float *dst, twn_err *err);

/* Checks ndim and each dim (-1 = any); on mismatch the message names `what`, the tensor and both
 * shapes, e.g. "base/model.safetensors: lm_head.weight has shape [10, 4], expected [151936, 64]".
 */
int twn_tensor_expect(const twn_tensor *t, const char *what, int ndim, const int64_t *shape,
                      twn_err *err);

static inline float twn_bf16_to_f32(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v = {.u = (uint32_t)h << 16};
    return v.f;
}
/* Round-to-nearest-even, NaN kept quiet — the same as torch's float->bfloat16 cast. */
uint16_t twn_f32_to_bf16(float f);
float twn_f16_to_f32(uint16_t h);
uint16_t twn_f32_to_f16(float f);

#endif
