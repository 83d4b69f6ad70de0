/* commands.h — the subcommands of the `twn` binary.  Each returns the process exit status:
 * 0 success, 1 runtime failure (message already printed), 2 usage error. */
#ifndef TWN_CLI_COMMANDS_H
#define TWN_CLI_COMMANDS_H

int twn_cmd_mkmodel(int argc, char **argv);
int twn_cmd_inspect(int argc, char **argv);
int twn_cmd_embed(int argc, char **argv);
int twn_cmd_tokenize(int argc, char **argv);
int twn_cmd_run(int argc, char **argv);
int twn_cmd_search(int argc, char **argv);
int twn_cmd_keygen(int argc, char **argv);
int twn_cmd_config(int argc, char **argv);
int twn_cmd_status(int argc, char **argv);
/* cmd_roles.c: one role per process */
int twn_cmd_coordinator(int argc, char **argv);
int twn_cmd_gate(int argc, char **argv);
int twn_cmd_worker(int argc, char **argv);
int twn_cmd_indexer(int argc, char **argv);

#endif
