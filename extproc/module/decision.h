/* The mirror decision in C: the same steps as extproc/core (policy.py, plan.py, keys.py,
 * sampling.py, ratelimit.py), bit for bit. Pure: no Envoy symbol, no I/O, no clock (the
 * time is an argument), so the test driver and the sanitizers run exactly this code. */
#ifndef MIRROR_SAMPLER_DECISION_H
#define MIRROR_SAMPLER_DECISION_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MS_MAX_TARGETS 8 /* the slots setting's bound */
#define MS_MAX_CHAIN 16
#define MS_MAX_METHODS 16
#define MS_MAX_RESERVED (MS_MAX_TARGETS + 1)
#define MS_MAX_RULE_ID 1024 /* bytes of a rule id */
#define MS_MAX_CLUSTER 256  /* bytes of a cluster name */

typedef struct {
  char *ptr;
  size_t len;
} ms_bytes;

typedef enum { MS_KEY_HEADER, MS_KEY_COOKIE, MS_KEY_QUERY, MS_KEY_TRACEPARENT } ms_key_kind;

typedef struct {
  ms_key_kind kind;
  ms_bytes name;
} ms_key_source;

/* A token bucket holding max(1, rate) tokens, refilled at rate a second, starting full
 * (extproc/core/ratelimit.py), kept as one atomic word so that Envoy's workers share it:
 * the time at which the bucket would be full again (GCRA). */
typedef struct ms_bucket {
  _Atomic uint64_t full_at_ns;
} ms_bucket;

typedef struct {
  ms_bytes slot;    /* the slot header this target sets */
  ms_bytes cluster; /* its value: the mirror cluster */
  ms_bytes prefix;  /* salt + "\0": what the key is appended to before hashing */
  bool always;      /* the threshold is 2^64: every key */
  uint64_t threshold;
  int hash_of; /* index of the first target with the same prefix (that u is reused) */
  uint64_t stat_hash; /* ms_stat_hash(rule id, cluster): finds its counters (ms_counted_find) */
  ms_bucket *bucket; /* NULL: no rate cap */
} ms_target;

typedef struct {
  ms_bytes id;
  bool enabled; /* the kill switch, off: every target's outcome is "disabled" */
  double max_per_second; /* 0: no cap */
  ms_bytes methods[MS_MAX_METHODS];
  int nmethods; /* 0: every method */
  ms_key_source chain[MS_MAX_CHAIN];
  int nchain;
  ms_target targets[MS_MAX_TARGETS];
  int ntargets;
  bool own_buckets; /* buckets made for this rule alone (no lookup), freed with it */
} ms_rule;

/* A (rule, target) whose decision counters the filter config defines up front, one per
 * outcome: incrementing those costs Envoy a fraction of a labelled counter's lookup. */
typedef struct {
  ms_bytes rule, cluster;
  uint64_t hash; /* ms_stat_hash(rule, cluster) */
} ms_counted;

#define MS_MAX_COUNTED 4096

typedef struct {
  ms_bytes slots[MS_MAX_TARGETS]; /* every slot header name */
  int nslots;
  ms_bytes marker; /* the marker header name */
  ms_rule *rule; /* the rule for routes without one of their own (NULL: none) */
  ms_counted *counted;
  size_t ncounted;
  size_t *table; /* open addressing on hash: index + 1 into counted, 0 empty */
  size_t table_mask;
} ms_filter;

typedef enum { MS_MIRRORED, MS_SKIPPED, MS_NO_KEY, MS_METHOD, MS_CAPPED, MS_DISABLED, MS_OUTCOMES } ms_outcome;
/* The metrics label of each outcome (extproc.core.policy.Outcome). */
extern const char *const ms_outcome_names[MS_OUTCOMES];

/* A request's headers as the host has them: the number of values of a lower-cased
 * name (0: absent), and value `index` of it in *value when index < that number. */
typedef struct {
  size_t (*get)(void *ctx, const char *name, size_t name_len, size_t index, const char **value, size_t *value_len);
  void *ctx;
} ms_headers;

/* Parsers: NULL and a message in err (naming the field) for anything malformed. */
/* buckets: where a rule's rate-capped targets find their shared bucket by (rule, target);
 * NULL gives each target a bucket of its own (tests). */
typedef ms_bucket *(*ms_bucket_lookup)(const ms_bytes *rule, const ms_bytes *cluster, const ms_bytes *slot);
ms_filter *ms_filter_parse(const char *json, size_t len, ms_bucket_lookup buckets, char *err, size_t err_len);
void ms_filter_free(ms_filter *filter);
ms_rule *ms_rule_parse(const char *json, size_t len, ms_bucket_lookup buckets, char *err, size_t err_len);
void ms_rule_free(ms_rule *rule);
/* The index in filter->counted of (rule, target), or -1: counted by label instead. */
long ms_counted_find(const ms_filter *filter, const ms_bytes *rule, const ms_target *target);
uint64_t ms_stat_hash(const ms_bytes *rule, const ms_bytes *cluster);

/* First 64-bit word of MurmurHash3_x64_128(data, seed 0). */
uint64_t ms_murmur3_h1(const uint8_t *data, size_t len);
/* u of a key: the hash of prefix + key. */
uint64_t ms_key_hash(const ms_bytes *prefix, const char *key, size_t key_len);
/* The key: the first source of the chain with a non-empty value. The bytes may live in
 * scratch (a joined cookie header); false: no key. */
bool ms_extract_key(const ms_rule *rule, const ms_headers *headers, ms_bytes *scratch, const char **key, size_t *key_len);
bool ms_bucket_take(ms_bucket *bucket, double rate, uint64_t now_ns);
/* Each target's outcome (out[i] for rule->targets[i]); takes rate-cap tokens. */
void ms_decide(const ms_rule *rule, const ms_headers *headers, uint64_t now_ns, ms_outcome out[MS_MAX_TARGETS]);

#endif
