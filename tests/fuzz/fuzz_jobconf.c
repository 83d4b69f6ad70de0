/* fuzz_jobconf.c — arbitrary bytes as a job config file (common/jobconf.h).
 *
 * What fails must say so in the config's own voice: a message starting "config: " (never a crash,
 * a leak or a silent default).  What loads must survive its own printout: `twn config --check`'s
 * YAML, loaded again, gives the same values for the keys the roles size things by, so the
 * printout an operator copies into a file means what it showed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jobconf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_conf c;
    twn_err err = {{0}};
    twn_conf_init(&c);
    if (twn_conf_load_yaml(&c, (const char *)data, size, "fuzz.yaml", &err) ||
        twn_conf_resolve(&c, &err)) {
        if (strncmp(err.msg, "config: ", 8)) abort();
        twn_conf_free(&c);
        return 0;
    }
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) abort();
    twn_conf_print(&c, f);
    fclose(f);
    twn_conf d;
    twn_conf_init(&d);
    if (twn_conf_load_yaml(&d, buf, n, "printed.yaml", &err) || twn_conf_resolve(&d, &err)) {
        fprintf(stderr, "printout does not load: %s\n%s\n", err.msg, buf);
        abort();
    }
    if (d.job.shards != c.job.shards || d.job.inputs.n != c.job.inputs.n ||
        d.indexer.endpoints.n != c.indexer.endpoints.n ||
        d.kafka.properties.n != c.kafka.properties.n || strcmp(d.job.out, c.job.out) ||
        strcmp(d.coordinator.connect, c.coordinator.connect))
        abort();
    for (size_t i = 0; i < c.job.inputs.n; i++)
        if (strcmp(c.job.inputs.v[i], d.job.inputs.v[i])) abort();
    free(buf);
    twn_conf_free(&c);
    twn_conf_free(&d);
    return 0;
}
