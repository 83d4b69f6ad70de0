/* cmd_config.c — `twn config --defaults` and `twn config --check FILE [flags]`.
 *
 * --defaults prints every key of the job config with its default, what it accepts and what it
 * means, grouped by section, as a YAML template.  --check loads FILE the way every role does
 * (file < TWN_* environment < flags), prints the effective config with where each value came
 * from and secrets as <redacted>, and exits 2 with the error when the config is invalid — a
 * config can be checked before a fleet is started with it. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "common/jobconf.h"
#include "util/mem.h"

extern char **environ;

static int usage(FILE *f) {
    fprintf(f, "usage: twn config --defaults\n"
               "       twn config --check FILE [--section.key value ...]\n");
    return f == stdout ? 0 : 2;
}

int twn_cmd_config(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "--defaults")) {
        twn_conf_print_defaults(stdout);
        return 0;
    }
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) return usage(stdout);
    if (argc < 3 || strcmp(argv[1], "--check")) return usage(stderr);
    /* the same argv twn_conf_load reads, with --check FILE turned into --config FILE */
    char **args = twn_calloc((size_t)argc + 1, sizeof *args);
    for (int i = 0; i < argc; i++) args[i] = argv[i];
    args[1] = "--config";
    twn_conf c;
    twn_err err = {{0}};
    int status = 0;
    if (twn_conf_load(&c, argc, args, (const char *const *)environ, &err)) {
        fprintf(stderr, "twn config: %s\n", err.msg);
        status = 2;
    } else {
        twn_conf_print(&c, stdout);
    }
    twn_conf_free(&c);
    twn_free(args);
    return status;
}
