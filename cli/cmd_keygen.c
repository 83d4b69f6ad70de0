/* cmd_keygen.c — `twn keygen`: a CURVE keypair for the tcp:// sockets (common/curve.h).
 *
 * Writes PREFIX.key (the secret, mode 0600, never printed) and PREFIX.pub, and prints the public
 * key: that line goes into the servers' allow-list (security.allowed_clients_file) for a client
 * key, or into security.server_public_key_file for the shared server key. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "common/curve.h"

static void usage(FILE *f) {
    fprintf(f, "usage: twn keygen [--out PREFIX]\n\n"
               "Writes a new CURVE keypair: PREFIX.key (secret, mode 0600) and PREFIX.pub, and\n"
               "prints the public key.  Existing files are never overwritten.\n\n"
               "  --out PREFIX  path prefix of the two files (default: twn)\n\n"
               "One keypair is shared by the servers (coordinator, indexers); every client\n"
               "process (gate, worker, indexer) gets its own, and its .pub line goes into the\n"
               "servers' security.allowed_clients_file.\n");
}

int twn_cmd_keygen(int argc, char **argv) {
    const char *prefix = "twn";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--out") && i + 1 < argc) {
            prefix = argv[++i];
            continue;
        }
        fprintf(stderr, "twn keygen: %s '%s'\n\n",
                strcmp(argv[i], "--out") ? "unknown option" : "missing value for", argv[i]);
        usage(stderr);
        return 2;
    }
    char pub[TWN_CURVE_Z85_LEN + 1];
    twn_err err;
    if (twn_curve_write_keys(prefix, pub, &err)) {
        fprintf(stderr, "twn keygen: %s\n", err.msg);
        return 1;
    }
    printf("%s\n", pub);
    fprintf(stderr, "twn keygen: wrote %s.key (secret, 0600) and %s.pub\n", prefix, prefix);
    return 0;
}
