/* tensor.c — dtype tables and float conversions shared by the loaders (see tensor.h). */
#include "engine/tensor.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtypes[TWN_DT_COUNT] = {
    [TWN_DT_BOOL] = {"BOOL", 1},       [TWN_DT_U8] = {"U8", 1},
    [TWN_DT_I8] = {"I8", 1},           [TWN_DT_F8_E5M2] = {"F8_E5M2", 1},
    [TWN_DT_F8_E4M3] = {"F8_E4M3", 1}, [TWN_DT_I16] = {"I16", 2},
    [TWN_DT_U16] = {"U16", 2},         [TWN_DT_F16] = {"F16", 2},
    [TWN_DT_BF16] = {"BF16", 2},       [TWN_DT_I32] = {"I32", 4},
    [TWN_DT_U32] = {"U32", 4},         [TWN_DT_F32] = {"F32", 4},
    [TWN_DT_F64] = {"F64", 8},         [TWN_DT_I64] = {"I64", 8},
    [TWN_DT_U64] = {"U64", 8},
};

size_t twn_dtype_size(twn_dtype dt) {
    return (unsigned)dt < TWN_DT_COUNT ? dtypes[dt].size : 0;
}

const char *twn_dtype_name(twn_dtype dt) {
    return (unsigned)dt < TWN_DT_COUNT ? dtypes[dt].name : "?";
}

int twn_dtype_parse(const char *name, twn_dtype *dt) {
    for (int i = 0; i < TWN_DT_COUNT; i++)
        if (!strcmp(name, dtypes[i].name)) {
            *dt = (twn_dtype)i;
            return 0;
        }
    return -1;
}

int64_t twn_tensor_numel(const twn_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

const char *twn_shape_str(const twn_tensor *t, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int i = 0; i < t->ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

int twn_tensor_to_f32(const twn_tensor *t, float *dst, twn_err *err) {
    int64_t n = twn_tensor_numel(t);
    switch (t->dtype) {
    case TWN_DT_F32:
        memcpy(dst, t->data, (size_t)n * 4);
        return 0;
    case TWN_DT_BF16: {
        const uint16_t *s = t->data;
        for (int64_t i = 0; i < n; i++) dst[i] = twn_bf16_to_f32(s[i]);
        return 0;
    }
    case TWN_DT_F16: {
        const uint16_t *s = t->data;
        for (int64_t i = 0; i < n; i++) dst[i] = twn_f16_to_f32(s[i]);
        return 0;
    }
    case TWN_DT_F64: {
        const double *s = t->data;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
        return 0;
    }
    default:
        return twn_err_set(err, "tensor %s has dtype %s; expected F32, F16, BF16 or F64",
                           t->name ? t->name : "?", twn_dtype_name(t->dtype));
    }
}

int twn_tensor_expect(const twn_tensor *t, const char *what, int ndim, const int64_t *shape,
                      twn_err *err) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = shape[i] < 0 || shape[i] == t->shape[i];
    if (ok) return 0;
    char got[128], want[128];
    twn_tensor w = {.ndim = ndim};
    for (int i = 0; i < ndim; i++) w.shape[i] = shape[i];
    twn_shape_str(t, got, sizeof got);
    twn_shape_str(&w, want, sizeof want);
    return twn_err_set(err, "%s: %s has shape %s, expected %s (-1 = any)", what,
                       t->name ? t->name : "?", got, want);
}

uint16_t twn_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* RNE */
    return (uint16_t)(u >> 16);
}

float twn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0)
            u = sign;
        else { /* subnormal: value = man * 2^-24 */
            float f = ldexpf((float)man, -24);
            memcpy(&u, &f, 4);
            u |= sign;
        }
    } else if (exp == 31)
        u = sign | 0x7f800000u | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t twn_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow -> inf (RNE boundary) */
    if (a < 0x38800000u) {                                   /* subnormal or zero in f16 */
        float af;
        memcpy(&af, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f)); /* 2^24, RNE */
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u; /* rebias 127->15, RNE */
    return (uint16_t)(sign | (r >> 13));
}
