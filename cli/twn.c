/* twn.c — the multi-command binary: `twn <command> [options]`. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} command;

static const command commands[] = {
    /* one line per command; keep alphabetical */
    {"config", twn_cmd_config, "print the job config keys (--defaults) or check a config file"},
    {"coordinator", twn_cmd_coordinator, "run the coordinator role as a process (--config FILE)"},
    {"embed", twn_cmd_embed, "embed a JSONL file of items with a TWN checkpoint"},
    {"gate", twn_cmd_gate, "run a gate service as a process (--config FILE)"},
    {"indexer", twn_cmd_indexer, "run the indexer of one shard as a process (--config FILE)"},
    {"inspect", twn_cmd_inspect, "print what a TWN checkpoint holds; refuse a broken one"},
    {"keygen", twn_cmd_keygen, "write a CURVE keypair (PREFIX.key 0600, PREFIX.pub) for tcp://"},
    {"mkmodel", twn_cmd_mkmodel, "write a deterministic random TWN checkpoint"},
    {"run", twn_cmd_run, "run the whole pipeline in one process (threads over inproc://)"},
    {"search", twn_cmd_search, "embed a query with the model and merge top-k over index shards"},
    {"status", twn_cmd_status, "print a summary of a running job from its coordinator's URL"},
    {"tokenize", twn_cmd_tokenize, "print the token ids of a text (tokenizer.json)"},
    {"version", NULL, "print the version"},
    {"worker", twn_cmd_worker, "run a reasoning worker as a process (--config FILE)"},
};

static void usage(FILE *f) {
    fprintf(f,
            "twn %s — adaptive-reasoning multimodal embeddings (TWN) at fleet scale\n\n"
            "usage: twn <command> [options]   (twn <command> --help for its options)\n\n",
            TWN_VERSION);
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("twn %s\n", TWN_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(argv[1], commands[i].name) && commands[i].run)
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "twn: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
