/* module.c — libtwn_cuda.so's entry point: the function table, the device probe, errors.
 *
 * The probe is what `--backend auto` relies on to fall back cleanly: with the CUDA runtime linked
 * statically, a machine without libcuda.so.1 answers cudaGetDeviceCount with
 * cudaErrorInsufficientDriver and driver version 0, which means "no NVIDIA driver here", not
 * "upgrade the driver" — the message says which of the two it is. */
#include <stdio.h>
#include <string.h>

#include "engine/cuda/cuda_internal.h"

#ifndef TWN_CUDA_ARCHS
#define TWN_CUDA_ARCHS "?"
#endif

/* The lowest compute capability this build has code for (sm_80 SASS; newer GPUs run the sm_90
 * SASS or JIT the compute_90 PTX). */
#define TWN_CUDA_MIN_CC 80

int twn_cu_err(twn_err *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int twn_cu_check(cudaError_t rc, twn_err *err, const char *what) {
    if (rc == cudaSuccess) return 0;
    return twn_cu_err(err, "%s: %s (%s)", what, cudaGetErrorName(rc), cudaGetErrorString(rc));
}

int twn_cu_blas_check(cublasStatus_t rc, twn_err *err, const char *what) {
    if (rc == CUBLAS_STATUS_SUCCESS) return 0;
    return twn_cu_err(err, "%s: cuBLAS status %d (%s)", what, (int)rc, cublasGetStatusString(rc));
}

static void ver(int v, int *maj, int *min) {
    *maj = v / 1000;
    *min = (v % 1000) / 10;
}

static int probe(int device, char *msg, size_t n) {
    int count = 0, drv = 0, rt = 0, a, b, c, d;
    cudaError_t rc = cudaGetDeviceCount(&count);
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    ver(drv, &a, &b);
    ver(rt, &c, &d);
    if (rc == cudaErrorInsufficientDriver && drv == 0) {
        snprintf(msg, n,
                 "no NVIDIA driver (libcuda.so.1 not found; cudaGetDeviceCount: "
                 "cudaErrorInsufficientDriver)");
        return -1;
    }
    if (rc == cudaErrorInsufficientDriver) {
        snprintf(msg, n,
                 "the NVIDIA driver supports CUDA %d.%d, this module was built with CUDA %d.%d "
                 "(update the driver)",
                 a, b, c, d);
        return -1;
    }
    if (rc == cudaErrorNoDevice || (rc == cudaSuccess && count == 0)) {
        snprintf(msg, n, "no CUDA device (driver for CUDA %d.%d is installed)", a, b);
        return -1;
    }
    if (rc != cudaSuccess) {
        snprintf(msg, n, "CUDA initialization failed: %s (%s)", cudaGetErrorName(rc),
                 cudaGetErrorString(rc));
        return -1;
    }
    if (device < 0 || device >= count) {
        snprintf(msg, n, "CUDA device %d requested; this machine has %d (0..%d)", device, count,
                 count - 1);
        return -1;
    }
    struct cudaDeviceProp p;
    rc = cudaGetDeviceProperties(&p, device);
    if (rc != cudaSuccess) {
        snprintf(msg, n, "cudaGetDeviceProperties(%d): %s", device, cudaGetErrorString(rc));
        return -1;
    }
    int cc = p.major * 10 + p.minor;
    if (cc < TWN_CUDA_MIN_CC) {
        snprintf(msg, n,
                 "CUDA device %d (%s) has compute capability %d.%d; this module is built for "
                 "%s (8.0 or newer)",
                 device, p.name, p.major, p.minor, TWN_CUDA_ARCHS);
        return -1;
    }
    snprintf(msg, n, "device %d: %s (sm_%d, %.1f GiB, driver CUDA %d.%d)", device, p.name, cc,
             (double)p.totalGlobalMem / (1024.0 * 1024 * 1024), a, b);
    return 0;
}

static const char *describe(const twn_cuda_ctx *c) {
    return c->desc;
}

static void kv_truncate(twn_cuda_kv *kv, int len) {
    if (len < kv->len) kv->len = len < 0 ? 0 : len;
}

static int kv_len(const twn_cuda_kv *kv) {
    return kv->len;
}

static int64_t kv_rows_free(const twn_cuda_ctx *c) {
    return (int64_t)c->n_free * c->page_rows;
}

static const twn_cuda_module the_module = {
    .abi_version = TWN_CUDA_ABI_VERSION,
    .size = sizeof(twn_cuda_module),
    .build_info = "CUDA runtime " TWN_CUDA_STR(CUDART_VERSION) ", architectures " TWN_CUDA_ARCHS,
    .probe = probe,
    .create = twn_cu_create,
    .destroy = twn_cu_destroy,
    .describe = describe,
    .kv_open = twn_cu_kv_open,
    .kv_close = twn_cu_kv_close,
    .kv_truncate = kv_truncate,
    .kv_len = kv_len,
    .kv_rows_free = kv_rows_free,
    .forward = twn_cu_forward,
    .kernels = &twn_cu_kernel_tests,
};

TWN_CUDA_EXPORT const twn_cuda_module *twn_cuda_module_get(int abi_version) {
    return abi_version == TWN_CUDA_ABI_VERSION ? &the_module : NULL;
}
