/* The module's configuration: the JSON that extproc/envoy/module.py derives from the
 * compiled policy, read into decision.h's structures. Anything malformed is refused
 * with a message naming the field, never half-applied. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decision.h"
#include "json.h"

typedef struct {
  char *err;
  size_t err_len;
  bool failed;
} problem;

static bool refuse(problem *pr, const char *field, const char *what) {
  if (!pr->failed) ms_fail(pr->err, pr->err_len, "%s: %s", field, what);
  pr->failed = true;
  return false;
}

static const jnode *member(const jnode *obj, const char *key) {
  for (size_t i = 0; i < obj->count; i++)
    if (!strcmp(obj->keys[i], key)) return &obj->items[i];
  return NULL;
}

/* Every key known, every required key present: a misspelt field is an error, not a default. */
/* known[0 .. nrequired) must be present, known[nrequired .. nknown) may be. */
static bool check_keys(const jnode *obj, const char *where, const char *const *known, size_t nknown, size_t nrequired, problem *pr) {
  char field[160];
  if (obj->type != J_OBJECT) return refuse(pr, where, "expected an object");
  for (size_t i = 0; i < obj->count; i++) {
    bool found = false;
    for (size_t k = 0; k < nknown; k++) found = found || !strcmp(obj->keys[i], known[k]);
    for (size_t j = 0; j < i && found; j++) found = strcmp(obj->keys[i], obj->keys[j]) != 0;
    snprintf(field, sizeof field, "%s.%.64s", where, obj->keys[i]);
    if (!found) return refuse(pr, field, "unknown or repeated field");
  }
  for (size_t k = 0; k < nrequired; k++) {
    snprintf(field, sizeof field, "%s.%s", where, known[k]);
    if (!member(obj, known[k])) return refuse(pr, field, "missing");
  }
  return true;
}

static bool copy_bytes(const char *p, size_t n, ms_bytes *out) {
  out->ptr = malloc(n + 1);
  if (!out->ptr) return false;
  if (n) memcpy(out->ptr, p, n);
  out->ptr[n] = 0;
  out->len = n;
  return true;
}

/* A header name as Envoy stores it: a non-empty lower-case RFC 9110 token, or a
 * pseudo-header (":authority"). */
static bool header_name(const jnode *n, const char *field, ms_bytes *out, problem *pr) {
  if (n->type != J_STRING || n->len == 0 || n->len > 256) return refuse(pr, field, "expected a header name (1 to 256 characters)");
  for (size_t i = 0; i < n->len; i++) {
    unsigned char c = (unsigned char)n->text[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c)) || (c == ':' && i == 0);
    if (!ok) return refuse(pr, field, "not a lower-case header name");
  }
  if (!copy_bytes(n->text, n->len, out)) return refuse(pr, field, "out of memory");
  return true;
}

static bool text(const jnode *n, const char *field, size_t max, ms_bytes *out, problem *pr) {
  if (n->type != J_STRING || n->len == 0 || n->len > max || memchr(n->text, 0, n->len)) return refuse(pr, field, "expected a non-empty string");
  if (!copy_bytes(n->text, n->len, out)) return refuse(pr, field, "out of memory");
  return true;
}

static void free_bytes(ms_bytes *b) {
  free(b->ptr);
  b->ptr = NULL;
  b->len = 0;
}

static const char *const FILTER_KEYS[] = {"slot_headers", "marker_header", "rule", "counted"};
static const char *const COUNTED_KEYS[] = {"rule", "clusters"};

void ms_filter_free(ms_filter *f) {
  if (!f) return;
  for (int i = 0; i < f->nslots; i++) free_bytes(&f->slots[i]);
  free_bytes(&f->marker);
  ms_rule_free(f->rule);
  for (size_t i = 0; i < f->ncounted; i++) {
    free_bytes(&f->counted[i].rule);
    free_bytes(&f->counted[i].cluster);
  }
  free(f->counted);
  free(f->table);
  free(f);
}

/* The hash of rule + NUL + cluster (neither may hold a NUL: text() refuses it). The
 * parsers bound both (rule.rule 1024 bytes, a cluster 256), so it never allocates: a
 * route's target always hashes as its listed pair did. */
uint64_t ms_stat_hash(const ms_bytes *rule, const ms_bytes *cluster) {
  char joined[MS_MAX_RULE_ID + 1 + MS_MAX_CLUSTER];
  size_t len = rule->len + 1 + cluster->len;
  if (rule->len > MS_MAX_RULE_ID || cluster->len > MS_MAX_CLUSTER) return 0; /* not parsed here: never counted */
  memcpy(joined, rule->ptr, rule->len);
  joined[rule->len] = 0;
  memcpy(joined + rule->len + 1, cluster->ptr, cluster->len);
  return ms_murmur3_h1((const uint8_t *)joined, len);
}

static bool same(const ms_bytes *a, const ms_bytes *b) { return a->len == b->len && !memcmp(a->ptr, b->ptr, a->len); }

long ms_counted_find(const ms_filter *f, const ms_bytes *rule, const ms_target *t) {
  if (!f->table) return -1;
  for (size_t i = t->stat_hash & f->table_mask;; i = (i + 1) & f->table_mask) {
    size_t slot = f->table[i];
    if (!slot) return -1;
    const ms_counted *c = &f->counted[slot - 1];
    if (c->hash == t->stat_hash && same(&c->cluster, &t->cluster) && same(&c->rule, rule)) return (long)(slot - 1);
  }
}

/* "counted": [{"rule": id, "clusters": [cluster, ...]}, ...]; a pair twice is refused. */
static void parse_counted(const jnode *list, ms_filter *f, problem *pr) {
  char field[80];
  size_t total = 0;
  if (list->type != J_ARRAY) { refuse(pr, "filter.counted", "expected a list"); return; }
  for (size_t i = 0; i < list->count; i++) {
    const jnode *clusters = list->items[i].type == J_OBJECT ? member(&list->items[i], "clusters") : NULL;
    total += clusters && clusters->type == J_ARRAY ? clusters->count : 0;
  }
  if (total > MS_MAX_COUNTED) { refuse(pr, "filter.counted", "more than 4096 (rule, cluster) pairs"); return; }
  size_t size = 16;
  while (size < 2 * total) size *= 2;
  f->counted = calloc(total ? total : 1, sizeof *f->counted);
  f->table = calloc(size, sizeof *f->table);
  f->table_mask = size - 1;
  if (!f->counted || !f->table) { refuse(pr, "filter.counted", "out of memory"); return; }
  for (size_t i = 0; !pr->failed && i < list->count; i++) {
    const jnode *entry = &list->items[i];
    snprintf(field, sizeof field, "filter.counted[%zu]", i);
    if (!check_keys(entry, field, COUNTED_KEYS, 2, 2, pr)) return;
    const jnode *clusters = member(entry, "clusters");
    snprintf(field, sizeof field, "filter.counted[%zu].clusters", i);
    if (clusters->type != J_ARRAY || clusters->count < 1) { refuse(pr, field, "expected a list of cluster names"); return; }
    for (size_t j = 0; !pr->failed && j < clusters->count; j++) {
      ms_counted *c = &f->counted[f->ncounted];
      snprintf(field, sizeof field, "filter.counted[%zu].rule", i);
      if (!text(member(entry, "rule"), field, MS_MAX_RULE_ID, &c->rule, pr)) return;
      f->ncounted++;
      snprintf(field, sizeof field, "filter.counted[%zu].clusters[%zu]", i, j);
      if (!text(&clusters->items[j], field, MS_MAX_CLUSTER, &c->cluster, pr)) return;
      c->hash = ms_stat_hash(&c->rule, &c->cluster);
      ms_target probe = {.cluster = c->cluster, .stat_hash = c->hash};
      if (ms_counted_find(f, &c->rule, &probe) >= 0) { refuse(pr, field, "repeated (rule, cluster) pair"); return; }
      size_t k = c->hash & f->table_mask;
      while (f->table[k]) k = (k + 1) & f->table_mask;
      f->table[k] = f->ncounted;
    }
  }
}

static ms_rule *rule_from(const jnode *root, ms_bucket_lookup buckets, problem *pr);

ms_filter *ms_filter_parse(const char *json, size_t len, ms_bucket_lookup buckets, char *err, size_t err_len) {
  problem pr = {err, err_len, false};
  jnode root;
  if (!jparse(json, len, &root, err, err_len)) return NULL;
  ms_filter *f = calloc(1, sizeof *f);
  if (!f) { jfree(&root); ms_fail(err, err_len, "out of memory"); return NULL; }
  char field[64];
  if (check_keys(&root, "filter", FILTER_KEYS, 4, 2, &pr)) {
    const jnode *slots = member(&root, "slot_headers");
    if (slots->type != J_ARRAY || slots->count < 1 || slots->count > MS_MAX_TARGETS)
      refuse(&pr, "filter.slot_headers", "expected a list of 1 to 8 header names");
    for (size_t i = 0; !pr.failed && i < slots->count; i++) {
      snprintf(field, sizeof field, "filter.slot_headers[%zu]", i);
      if (header_name(&slots->items[i], field, &f->slots[i], &pr)) f->nslots++;
    }
    if (!pr.failed) header_name(member(&root, "marker_header"), "filter.marker_header", &f->marker, &pr);
    const jnode *rule = member(&root, "rule");
    if (!pr.failed && rule) f->rule = rule_from(rule, buckets, &pr);
    const jnode *counted = member(&root, "counted");
    if (!pr.failed && counted) parse_counted(counted, f, &pr);
  }
  jfree(&root);
  if (pr.failed) { ms_filter_free(f); return NULL; }
  return f;
}

static const char *const RULE_KEYS[] = {"rule", "enabled", "methods", "key_chain", "max_mirrors_per_second", "targets"};
static const char *const SOURCE_KEYS[] = {"kind", "name"};
static const char *const TARGET_KEYS[] = {"slot", "cluster", "salt_hex", "threshold"};
static const char *const KINDS[] = {"header", "cookie", "query", "traceparent"};

void ms_rule_free(ms_rule *r) {
  if (!r) return;
  free_bytes(&r->id);
  for (int i = 0; i < r->nmethods; i++) free_bytes(&r->methods[i]);
  for (int i = 0; i < r->nchain; i++) free_bytes(&r->chain[i].name);
  for (int i = 0; i < r->ntargets; i++) {
    free_bytes(&r->targets[i].slot);
    free_bytes(&r->targets[i].cluster);
    free_bytes(&r->targets[i].prefix);
    /* Buckets from a lookup are shared and outlive the rule; a private one is the rule's. */
    if (r->own_buckets) free(r->targets[i].bucket);
  }
  free(r);
}

/* Threshold: decimal digits of an integer in [0, 2^64], as a string (a JSON number
 * that large would not survive a double, as in a google.protobuf.Struct); 2^64, every
 * key, does not fit a uint64. */
static bool threshold(const jnode *n, const char *field, ms_target *t, problem *pr) {
  const char *bad = "expected a string of decimal digits, 0 to 2^64";
  if (n->type != J_STRING || n->len == 0 || n->len > 20 || (n->len > 1 && n->text[0] == '0')) return refuse(pr, field, bad);
  if (!strcmp(n->text, "18446744073709551616")) { t->always = true; t->threshold = UINT64_MAX; return true; }
  uint64_t v = 0;
  for (size_t i = 0; i < n->len; i++) {
    if (n->text[i] < '0' || n->text[i] > '9') return refuse(pr, field, bad);
    uint64_t d = (uint64_t)(n->text[i] - '0');
    if (v > (UINT64_MAX - d) / 10) return refuse(pr, field, bad);
    v = v * 10 + d;
  }
  t->threshold = v;
  return true;
}

static bool salt_prefix(const jnode *n, const char *field, ms_bytes *out, problem *pr) {
  if (n->type != J_STRING || n->len % 2 || n->len > 2048) return refuse(pr, field, "expected hex digits (at most 1024 bytes)");
  out->len = n->len / 2 + 1;
  out->ptr = malloc(out->len);
  if (!out->ptr) return refuse(pr, field, "out of memory");
  for (size_t i = 0; i < n->len / 2; i++) {
    int hi = ms_hexval(n->text[2 * i]), lo = ms_hexval(n->text[2 * i + 1]);
    if (hi < 0 || lo < 0) return refuse(pr, field, "expected hex digits");
    out->ptr[i] = (char)(hi * 16 + lo);
  }
  out->ptr[out->len - 1] = 0; /* the separator between salt and key */
  return true;
}

static void parse_chain(const jnode *chain, ms_rule *r, problem *pr) {
  char field[64];
  if (chain->type != J_ARRAY || chain->count < 1 || chain->count > MS_MAX_CHAIN) {
    refuse(pr, "rule.key_chain", "expected a list of 1 to 16 key sources");
    return;
  }
  for (size_t i = 0; !pr->failed && i < chain->count; i++) {
    const jnode *src = &chain->items[i];
    snprintf(field, sizeof field, "rule.key_chain[%zu]", i);
    if (!check_keys(src, field, SOURCE_KEYS, 2, 2, pr)) return;
    const jnode *kind = member(src, "kind"), *name = member(src, "name");
    int k = -1;
    for (int j = 0; j < 4 && kind->type == J_STRING; j++)
      if (!strcmp(kind->text, KINDS[j]) && strlen(KINDS[j]) == kind->len) k = j;
    snprintf(field, sizeof field, "rule.key_chain[%zu].kind", i);
    if (k < 0) { refuse(pr, field, "expected header, cookie, query or traceparent"); return; }
    ms_key_source *s = &r->chain[r->nchain];
    s->kind = (ms_key_kind)k;
    snprintf(field, sizeof field, "rule.key_chain[%zu].name", i);
    bool ok;
    if (s->kind == MS_KEY_TRACEPARENT) ok = name->type == J_STRING && name->len == 0 && copy_bytes("", 0, &s->name);
    else if (s->kind == MS_KEY_HEADER) ok = header_name(name, field, &s->name, pr);
    else ok = text(name, field, 256, &s->name, pr);
    if (!ok) { refuse(pr, field, "expected \"\" for traceparent"); return; }
    r->nchain++;
  }
}

static void parse_targets(const jnode *targets, ms_rule *r, ms_bucket_lookup buckets, problem *pr) {
  char field[64];
  if (targets->type != J_ARRAY || targets->count > MS_MAX_TARGETS) {
    refuse(pr, "rule.targets", "expected a list of at most 8 targets");
    return;
  }
  for (size_t i = 0; !pr->failed && i < targets->count; i++) {
    const jnode *tn = &targets->items[i];
    ms_target *t = &r->targets[r->ntargets];
    snprintf(field, sizeof field, "rule.targets[%zu]", i);
    if (!check_keys(tn, field, TARGET_KEYS, 4, 4, pr)) return;
    r->ntargets++;
    snprintf(field, sizeof field, "rule.targets[%zu].slot", i);
    if (!header_name(member(tn, "slot"), field, &t->slot, pr)) return;
    snprintf(field, sizeof field, "rule.targets[%zu].cluster", i);
    if (!text(member(tn, "cluster"), field, MS_MAX_CLUSTER, &t->cluster, pr)) return;
    t->stat_hash = ms_stat_hash(&r->id, &t->cluster);
    snprintf(field, sizeof field, "rule.targets[%zu].salt_hex", i);
    if (!salt_prefix(member(tn, "salt_hex"), field, &t->prefix, pr)) return;
    snprintf(field, sizeof field, "rule.targets[%zu].threshold", i);
    if (!threshold(member(tn, "threshold"), field, t, pr)) return;
    t->hash_of = (int)i;
    for (int j = 0; j < (int)i; j++)
      if (same(&r->targets[j].prefix, &t->prefix)) {
        t->hash_of = j;
        break;
      }
    if (r->max_per_second > 0) {
      t->bucket = buckets ? buckets(&r->id, &t->cluster, &t->slot) : calloc(1, sizeof *t->bucket);
      if (!t->bucket) { refuse(pr, field, "out of memory"); return; }
    }
  }
}

static ms_rule *rule_from(const jnode *root, ms_bucket_lookup buckets, problem *pr) {
  ms_rule *r = calloc(1, sizeof *r);
  if (!r) { refuse(pr, "rule", "out of memory"); return NULL; }
  r->own_buckets = buckets == NULL;
  char field[64];
  if (check_keys(root, "rule", RULE_KEYS, 6, 6, pr) && text(member(root, "rule"), "rule.rule", MS_MAX_RULE_ID, &r->id, pr)) {
    const jnode *enabled = member(root, "enabled"), *methods = member(root, "methods"), *cap = member(root, "max_mirrors_per_second");
    if (enabled->type != J_BOOL) refuse(pr, "rule.enabled", "expected true or false");
    else r->enabled = enabled->boolean;
    if (!pr->failed && (methods->type != J_ARRAY || methods->count > MS_MAX_METHODS)) refuse(pr, "rule.methods", "expected a list of at most 16 methods");
    for (size_t i = 0; !pr->failed && i < methods->count; i++) {
      snprintf(field, sizeof field, "rule.methods[%zu]", i);
      if (text(&methods->items[i], field, 32, &r->methods[r->nmethods], pr)) r->nmethods++;
    }
    if (!pr->failed) {
      if (cap->type == J_NULL) r->max_per_second = 0;
      /* The floor keeps the bucket's interval (1e9 / rate ns) well inside a uint64_t: below it the
       * conversion is undefined, and in practice turned the cap off (settings.py parse_rate, the same). */
      else if (cap->type != J_NUMBER || cap->text[0] == '-' || !((r->max_per_second = strtod(cap->text, NULL)) >= 1e-6 && r->max_per_second <= 1e6))
        refuse(pr, "rule.max_mirrors_per_second", "expected null or a number of mirrors per second, 0.000001 <= rate <= 1000000");
    }
    if (!pr->failed) parse_chain(member(root, "key_chain"), r, pr);
    if (!pr->failed) parse_targets(member(root, "targets"), r, buckets, pr);
  }
  if (pr->failed) {
    ms_rule_free(r);
    return NULL;
  }
  return r;
}

ms_rule *ms_rule_parse(const char *json, size_t len, ms_bucket_lookup buckets, char *err, size_t err_len) {
  problem pr = {err, err_len, false};
  jnode root;
  if (!jparse(json, len, &root, err, err_len)) return NULL;
  ms_rule *r = rule_from(&root, buckets, &pr);
  jfree(&root);
  return r;
}
