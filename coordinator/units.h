/* units.h — the coordinator's unit table: which items of which planned unit are still owed.
 *
 * DESIGN.md §3 principle 2: a unit is done only when every one of its items is durably acked by
 * its index shard or dead-lettered.  This table is the bookkeeping behind that rule, and nothing
 * else: it knows units by a stable 64-bit key and a dense sequence number (plan order), and items
 * by their index inside the unit.  It never sees payloads, sockets, clocks or files.
 *
 * Item states (one 32-bit word per item while the unit is active):
 *
 *     PENDING ──ack──────────────> EASY | HARD      (terminal: durable in the index)
 *        │ └──dead_letter────────> DEAD             (terminal: dead-lettered with a reason)
 *        └─mark_hard─> HARD_PENDING ──ack / dead_letter──> terminal
 *
 * Any durable ack makes a non-terminal item terminal, whatever route it names (an item routed hard
 * may come back acked easy from a re-leased unit; the index is idempotent, so either embedding is
 * correct).  Every later report about a terminal item is a duplicate: counted once, changes
 * nothing.  That is how late acks from the holder of an expired lease stay harmless.
 *
 * Memory: a unit's per-item words exist only while it is active (allocated on the first report
 * about it) and are freed the moment it completes, so memory follows the units in flight, not the
 * items processed.  Each planned unit keeps one small fixed record (~64 bytes) until it is
 * released: a batch job never releases (its plan is finite); a stream releases its done prefix
 * once the journal and the Kafka commits cover it (twn_units_release), so a long stream holds
 * only the units between its committed low water and the planned end.
 *
 * Tags: the upper 29 bits of each item word, and one word per unit, belong to the caller (the
 * coordinator stores "lease slot + 1" there, 0 = none).  The table hands a tag back, and clears
 * it, exactly when the item (or, for the unit tag, the unit's last PENDING item) leaves the state
 * the tag was attached to, so the caller can settle the lease that held it. */
#ifndef TWN_COORDINATOR_UNITS_H
#define TWN_COORDINATOR_UNITS_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* Largest number of items in one unit (the item word keeps the tag in 29 bits; this bound keeps
 * a unit's item words <= 64 MiB). */
#define TWN_UNIT_MAX_ITEMS (1u << 24)
/* Largest tag value (29 bits). */
#define TWN_UNIT_MAX_TAG ((1u << 29) - 1)

typedef enum {
    TWN_ITEM_PENDING = 0,      /* not yet resolved by the gate pass */
    TWN_ITEM_EASY = 1,         /* acked durable, easy route */
    TWN_ITEM_HARD_PENDING = 2, /* routed to reasoning, not yet acked */
    TWN_ITEM_HARD = 3,         /* acked durable, hard route */
    TWN_ITEM_DEAD = 4,         /* dead-lettered */
    TWN_ITEM_COMPLETED = 5     /* the unit is done and its per-item states were freed */
} twn_item_state;

typedef enum { TWN_ROUTE_EASY = 0, TWN_ROUTE_HARD = 1 } twn_route;

/* What a finished unit contributed; also what the journal's UNIT_DONE record stores. */
typedef struct twn_unit_counts {
    uint32_t n_items;
    uint32_t easy, hard, dead; /* easy + hard + dead == n_items once done */
    uint64_t think_tokens;     /* CoT tokens of its hard items, each counted once */
} twn_unit_counts;

/* Job-wide counters.  "rejected" is the DESIGN's word for dead-lettered items. */
typedef struct twn_progress {
    uint64_t units_total, units_done;
    uint64_t items_total;
    uint64_t items_done; /* terminal: easy + hard + rejected */
    uint64_t easy, hard, rejected;
    uint64_t hard_pending; /* items currently HARD_PENDING */
    uint64_t think_tokens;
    uint64_t duplicates;  /* reports about items that were already terminal (late/duplicate acks) */
    uint64_t bad_reports; /* reports refused: unknown unit, item out of range */
} twn_progress;

/* The outcome of one report call. */
typedef struct twn_units_result {
    uint32_t applied;    /* items that changed state */
    uint32_t duplicates; /* items already terminal (or already HARD_PENDING, for mark_hard) */
    uint32_t unit_tag;   /* the unit's tag, when this call resolved its last PENDING item; else 0 */
    int unit_done;       /* this call completed the unit */
} twn_units_result;

typedef struct twn_units twn_units;

twn_units *twn_units_new(void);
void twn_units_free(twn_units *t);

/* Appends a planned unit (sequence number = current count).  The key must be new.  A unit of 0
 * items is done at once (*done_now = 1).  Fails naming the key for a duplicate or an oversized
 * unit. */
int twn_units_add(twn_units *t, uint64_t key, uint32_t n_items, uint32_t *seq, int *done_now,
                  twn_err *err);

/* Units ever added (released ones included): the next sequence number. */
size_t twn_units_count(const twn_units *t);
/* 1 and *seq when the key is planned, else 0. */
int twn_units_find(const twn_units *t, uint64_t key, uint32_t *seq);
/* Fails with "unknown unit <key>: not in the plan" and counts a bad report. */
int twn_units_lookup(twn_units *t, uint64_t key, uint32_t *seq, twn_err *err);

uint64_t twn_units_key(const twn_units *t, uint32_t seq);
uint32_t twn_units_n_items(const twn_units *t, uint32_t seq);
int twn_units_is_done(const twn_units *t, uint32_t seq);
/* Items still PENDING (0 once the gate pass is fully resolved). */
uint32_t twn_units_pending(const twn_units *t, uint32_t seq);
twn_unit_counts twn_units_counts(const twn_units *t, uint32_t seq);
twn_item_state twn_units_item(const twn_units *t, uint32_t seq, uint32_t item);
uint32_t twn_units_item_tag(const twn_units *t, uint32_t seq, uint32_t item);
void twn_units_set_item_tag(twn_units *t, uint32_t seq, uint32_t item, uint32_t tag);
uint32_t twn_units_tag(const twn_units *t, uint32_t seq);
void twn_units_set_tag(twn_units *t, uint32_t seq, uint32_t tag);

/* Durable acks from an index shard for items[0..n) of unit seq, all on one route.  think_tokens
 * (may be NULL) gives each item's CoT length and is counted only for items that become terminal
 * here.  Indices are validated first: one out of range refuses the whole batch, naming the unit,
 * the index and the unit's size.  When tags_out is not NULL it receives the (non-zero) tags of
 * items that became terminal here, *n_tags of them (at most n); those tags are cleared. */
int twn_units_ack(twn_units *t, uint32_t seq, const uint32_t *items, const uint32_t *think_tokens,
                  size_t n, twn_route route, uint32_t *tags_out, size_t *n_tags,
                  twn_units_result *res, twn_err *err);
/* The same for the contiguous items [lo, hi). */
int twn_units_ack_range(twn_units *t, uint32_t seq, uint32_t lo, uint32_t hi, twn_route route,
                        uint32_t *tags_out, size_t *n_tags, twn_units_result *res, twn_err *err);

/* The gate routed items[0..n) to reasoning: PENDING -> HARD_PENDING.  Items already
 * HARD_PENDING or terminal are duplicates.  The items that did change are written to
 * changed_out (capacity n, may be NULL), *n_changed of them, in input order. */
int twn_units_mark_hard(twn_units *t, uint32_t seq, const uint32_t *items, size_t n,
                        uint32_t *changed_out, size_t *n_changed, twn_units_result *res,
                        twn_err *err);

/* Dead-letters one item (non-terminal -> DEAD).  *tag receives its item tag (0 if none). */
int twn_units_dead(twn_units *t, uint32_t seq, uint32_t item, uint32_t *tag, twn_units_result *res,
                   twn_err *err);

/* Replay: the journal says this unit is done with these counts (idempotent). */
void twn_units_restore_done(twn_units *t, uint32_t seq, const twn_unit_counts *c);

/* Forgets the units with sequence numbers below `below` (at most the low water: only done units,
 * only a prefix): their records, keys and item words go; their sequence numbers are not reused.
 * Afterwards a released unit reads as done with no items and key 0, twn_units_find does not know
 * its key, and reports about it fail.  Progress counters keep counting them.  Returns how many
 * were released. */
size_t twn_units_release(twn_units *t, uint32_t below);
/* Lowest sequence number not released (0 until something is). */
uint32_t twn_units_base(const twn_units *t);
/* Units held in memory: count - base. */
size_t twn_units_resident(const twn_units *t);

/* Lowest sequence number whose unit is not done (== count when all are). */
uint32_t twn_units_low_water(const twn_units *t);
const twn_progress *twn_units_progress(const twn_units *t);
/* Bytes held by per-item words of active units (to show memory follows units in flight). */
size_t twn_units_item_bytes(const twn_units *t);

#endif
