/* backend_opt.h — the `--backend cpu|cuda|auto` and `--device N` options shared by the commands
 * that run the model (`twn embed`, `twn search`, `twn run`).
 *
 * Two halves, so that a missing GPU is reported before a model of many gigabytes is read:
 * twn_cli_backend_check parses the kind and, for cuda, asks whether the module, the driver and
 * the device are there; twn_cli_backend_apply opens the backend for the loaded model.  Messages
 * go to stderr prefixed with the command ("twn embed: ..."). */
#ifndef TWN_CLI_BACKEND_OPT_H
#define TWN_CLI_BACKEND_OPT_H

#include <stdbool.h>

#include "engine/backend.h"
#include "engine/twn.h"

/* Fills o from kind (NULL: "cpu") and device.  Returns 0; 2 for a bad kind or device (usage);
 * 1 when kind is cuda and CUDA cannot run here, after printing
 * "PROG: backend cuda: <which module, driver or device is missing>". */
int twn_cli_backend_check(const char *prog, const char *kind, int device, twn_backend_opts *o);

/* Opens the backend o for m.  Unless quiet, prints "PROG: backend: <twn_backend_describe>" when
 * the user asked for cuda or auto (so an auto that fell back to the CPU says why).  Returns 0,
 * or 1 after printing the error. */
int twn_cli_backend_apply(const char *prog, twn_model *m, const twn_backend_opts *o, bool quiet);

#endif
