/* outdir_s3.h — publishing index outputs to S3 (DESIGN.md §4 "Output"): the files of an output
 * directory (outdir.h) uploaded under an s3:// prefix, the manifest last.
 *
 * The indexers build and snapshot on a local file system (the WAL and FAISS need one); when the
 * job's output is an s3:// URI the finished snapshots are uploaded.  Each file is streamed through
 * twn_s3_upload (one PUT when it fits a part, else a multipart upload of part_size parts, so memory
 * stays at one part whatever the index size), and manifest.json goes last: a reader that finds a
 * manifest finds every file it names, complete.  A failed upload leaves no manifest, and a retry
 * overwrites the same keys.
 *
 *   s3://bucket/prefix/shard-00000/{index.faiss, embeddings.npy, faiss_ids.npy, items.jsonl,
 *                                   manifest.json}
 *   s3://bucket/prefix/dead_letter.jsonl   (when the job has one) */
#ifndef TWN_INDEX_OUTDIR_S3_H
#define TWN_INDEX_OUTDIR_S3_H

#include "common/s3.h"
#include "util/err.h"

/* Uploads the five files of the output directory `dir` to "<uri>/<file>" (uri: s3://bucket/prefix,
 * a trailing '/' or not), manifest.json last.  A missing file fails before anything is sent. */
int twn_outdir_upload(const char *dir, twn_s3 *s, const char *uri, twn_err *err);

/* One local file to the object `uri` (s3://bucket/key), streamed as twn_outdir_upload does.
 * *bytes (may be NULL) is increased by the bytes sent. */
int twn_outdir_upload_file(const char *path, twn_s3 *s, const char *uri, unsigned long long *bytes,
                           twn_err *err);

/* One shard's directory `shard_dir` (CURRENT naming its snapshot) to "<uri>/shard-NNNNN/" with
 * twn_outdir_upload: what a separate `twn indexer` process publishes after its final snapshot.
 * *bytes (may be NULL) is increased by the bytes sent. */
int twn_outdir_upload_shard(const char *shard_dir, int shard, twn_s3 *s, const char *uri,
                            unsigned long long *bytes, twn_err *err);

/* A finished job's output directory `out` (shard-NNNNN/CURRENT naming each shard's snapshot, and
 * dead_letter.jsonl) to uri: every shard's snapshot with twn_outdir_upload to
 * "<uri>/shard-NNNNN/", then the dead letters.  *bytes (may be NULL) receives the bytes sent. */
int twn_outdir_upload_job(const char *out, int n_shards, twn_s3 *s, const char *uri,
                          unsigned long long *bytes, twn_err *err);

#endif
