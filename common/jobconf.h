/* jobconf.h — the job configuration: one table of keys, four layers, errors that name the key.
 *
 * Every setting a twn process reads (what to embed, where the roles meet, timeouts, batch sizes,
 * limits, credentials) is one row of the table in jobconf.c: a dotted name, a type, a default,
 * the allowed values and a one-line meaning — the Redis way, so `twn config --defaults` prints the
 * whole surface and nothing hides as a literal in a role.  Dotted names are nested YAML maps:
 * `job.shards: 4` is `job:\n  shards: 4` (a dotted key at any level works as well).
 *
 * Layers, later wins: the defaults < the YAML file (`--config FILE`) < the environment
 * (`TWN_JOB_SHARDS=4`: "TWN_" + the name upper-cased with dots as '_') < CLI flags
 * (`--job.shards 4`, `--job.shards=4`, or a short alias such as `--shards 4`).  A list or map
 * given by a layer replaces the lower layers' value; repeated flags for one list append
 * (`--input a --input b c` is three inputs), repeated map flags merge.  In the environment a list
 * is comma-separated and a map is `k=v,k=v`.  TWN_* variables that name no key are ignored (the
 * environment is shared with other programs); unknown keys in a file and unknown flags are errors.
 *
 * Errors read: `config: job.shards = "zero" (from /etc/twn.yaml line 3): expected an integer
 * 1..65536`.  The origin is `from FILE line N`, `from env TWN_X`, `from flag --x` or `default`.
 *
 * Derived defaults are resolved after every layer (twn_conf_resolve): coordinator.connect =
 * coordinator.listen (a tcp:// wildcard host * or 0.0.0.0 becomes 127.0.0.1),
 * coordinator.journal = {job.out}/journal, job.dead_letter = {job.out}/dead_letter.jsonl,
 * indexer.dir = {job.out}/shard-NNNNN (NNNNN = indexer.shard), indexer.endpoints =
 * tcp://127.0.0.1:{7601+s} for each shard s. */
#ifndef TWN_COMMON_JOBCONF_H
#define TWN_COMMON_JOBCONF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "util/err.h"

typedef enum {
    TWN_CONF_STR,
    TWN_CONF_INT,   /* int64_t, with a range */
    TWN_CONF_FLOAT, /* double, with a range */
    TWN_CONF_BOOL,  /* int 0/1: true/false, yes/no, on/off, 1/0 */
    TWN_CONF_LIST,  /* twn_conf_list of strings */
    TWN_CONF_MAP,   /* twn_conf_map of string -> string */
    TWN_CONF_ENUM,  /* char *, one of the row's allowed values */
} twn_conf_type;

typedef struct twn_conf_list {
    char **v;
    size_t n;
} twn_conf_list;

typedef struct twn_conf_map {
    char **keys, **vals;
    size_t n;
} twn_conf_map;

/* The effective values.  Strings are owned by the struct (never NULL after twn_conf_init; ""
 * means unset), freed by twn_conf_free. */
typedef struct twn_conf {
    struct {
        twn_conf_list inputs;
        char *out, *model, *engine, *backend, *mode, *factory, *dead_letter;
        int64_t dim, shards, unit_items;
        int64_t null_item_us; /* null engine: pretend compute per item (tests, plumbing) */
    } job;
    struct {
        char *listen, *connect, *journal;
        int64_t heartbeat_ms, missed_beats, hard_batch, lease_ms, connect_timeout_ms;
        int64_t ack_timeout_ms, stall_ms;
        int64_t journal_compact_bytes; /* streaming */
    } coordinator;
    struct {
        int64_t count, credits, batch;
    } gate, worker;
    struct {
        twn_conf_list endpoints;
        int64_t shard, commit_ms, credits;
        char *dir, *listen;
    } indexer;
    struct {
        char *listen;
        int64_t linger_ms;
    } metrics;
    struct {
        char *format, *level, *progress;
    } log;
    struct {
        int curve;
        char *server_secret_key_file, *server_public_key_file, *client_secret_key_file,
            *client_public_key_file, *allowed_clients_file;
    } security;
    struct {
        int64_t max_message_bytes, max_item_bytes;
        char *compress; /* auto|always|never */
    } limits;
    struct {
        char *endpoint, *region, *path_style, *access_key_id, *secret_access_key, *session_token;
        int64_t readers;
    } s3;
    struct {
        char *brokers, *group;
        char *output_topic; /* index/out_kafka.h; "" = off */
        twn_conf_map properties;
        int64_t max_inline_image_bytes;
        int streaming;
        int64_t stream_max_units;
    } kafka;
    /* [twn_conf_nkeys()], by table row: where each value came from ("default", "from flag --out",
     * "from job.yaml line 3", "from env TWN_JOB_OUT", "derived from job.out") */
    char **origin;
} twn_conf;

/* One row of the table. */
typedef struct twn_conf_key {
    const char *name; /* "job.shards" */
    twn_conf_type type;
    size_t offset;       /* of the value in twn_conf */
    const char *def;     /* the default as text ("" for none; "{...}" names a derived default) */
    double min, max;     /* INT / FLOAT range */
    const char *allowed; /* ENUM: "twn|null"; STR with a check: what is allowed, in words */
    int (*check)(const char *value); /* STR / LIST items: 0 when allowed (may be NULL) */
    int secret;                      /* printed as <redacted> by twn_conf_print */
    const char *meaning;
} twn_conf_key;

size_t twn_conf_nkeys(void);
const twn_conf_key *twn_conf_key_at(size_t i);
/* The row named `name` (dotted), or NULL. */
const twn_conf_key *twn_conf_find(const char *name);

/* Every key at its default (derived defaults still unresolved). */
void twn_conf_init(twn_conf *c);
void twn_conf_free(twn_conf *c);

/* Sets one key from text, as a layer would; `origin` is recorded and used in errors ("from flag
 * --shards").  A LIST value is one item appended when `append`, else the whole list replaced by
 * the comma-separated items; a MAP value is `k=v[,k=v]` merged when `append`, else replacing. */
int twn_conf_set(twn_conf *c, const char *name, const char *value, const char *origin, int append,
                 twn_err *err);

/* Layer 2: a YAML document (libyaml).  `name` is the file name used in errors. */
int twn_conf_load_yaml(twn_conf *c, const char *text, size_t len, const char *name, twn_err *err);
int twn_conf_load_file(twn_conf *c, const char *path, twn_err *err);
/* Layer 3: "NAME=value" strings, NULL-terminated (pass `environ`). */
int twn_conf_load_env(twn_conf *c, const char *const *env, twn_err *err);
/* Layer 4: flags (argv[0] is skipped; `--config FILE` is skipped here, see twn_conf_load). */
int twn_conf_load_args(twn_conf *c, int argc, char **argv, twn_err *err);
/* Derived defaults, then the checks across keys (indexer.shard < job.shards, one endpoint per
 * shard).  Call once, after the last layer. */
int twn_conf_resolve(twn_conf *c, twn_err *err);

/* All of it for a command: init, the file named by `--config FILE` in argv (if any), `env`,
 * the flags, resolve.  On failure *c is still initialised (free it). */
int twn_conf_load(twn_conf *c, int argc, char **argv, const char *const *env, twn_err *err);

/* The effective configuration as YAML grouped by section, each value with a comment saying
 * where it came from; secrets that are set print as "<redacted>". */
void twn_conf_print(const twn_conf *c, FILE *f);
/* Every key with its default, allowed values and meaning, as a commented YAML template. */
void twn_conf_print_defaults(FILE *f);

/* The short aliases (--shards -> job.shards, ...), for usage texts: "--shards" etc., NULL-ended
 * pairs {flag, key}. */
extern const char *const twn_conf_aliases[][2];

#endif
