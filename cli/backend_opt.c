/* backend_opt.c — `--backend` / `--device` for the commands that run the model (backend_opt.h). */
#include "cli/backend_opt.h"

#include <stdio.h>

int twn_cli_backend_check(const char *prog, const char *kind, int device, twn_backend_opts *o) {
    twn_backend_opts_default(o);
    twn_err err;
    if (twn_backend_kind_parse(kind ? kind : "cpu", &o->kind, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 2;
    }
    if (device < 0) {
        fprintf(stderr, "%s: --device %d: expected a CUDA device ordinal >= 0\n", prog, device);
        return 2;
    }
    o->device = device;
    char why[TWN_ERR_MAX];
    if (o->kind == TWN_BACKEND_CUDA && !twn_backend_cuda_available(o, why, sizeof why)) {
        fprintf(stderr, "%s: backend cuda: %s\n", prog, why);
        return 1;
    }
    return 0;
}

int twn_cli_backend_apply(const char *prog, twn_model *m, const twn_backend_opts *o, bool quiet) {
    if (o->kind == TWN_BACKEND_CPU) return 0; /* twn_model_load's backend */
    twn_err err;
    if (twn_model_set_backend(m, o, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 1;
    }
    if (!quiet) fprintf(stderr, "%s: backend: %s\n", prog, twn_backend_describe(m->backend));
    return 0;
}
