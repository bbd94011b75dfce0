/* mirror-sampler's decision as an Envoy dynamic-module HTTP filter
 * (envoy.filters.http.dynamic_modules), for Envoy 1.39 and 1.40.
 *
 * The filter config (JSON, extproc/envoy/module.py) names the slot and marker headers;
 * each route of a mirror rule carries the rule as per-route config, so Envoy's own route
 * match picks the rule. On request headers, like the ext_proc sampler's answer
 * (extproc/core/responses.py): decide for the route's rule; remove every slot and marker
 * header the client sent; set the slot header of each sampled target; clear the route
 * cache when a slot header was set or removed, so Envoy re-matches and picks the variant
 * route carrying exactly those mirrors (or leaves one a forged header selected).
 *
 * Decisions are counted in Envoy's stats (mirror_sampler_decisions by rule, target and
 * outcome): for the (rule, target) pairs the filter config lists, by counters defined up
 * front (an increment is an add), for the others by the labelled counter (an increment is
 * a stat lookup by name in Envoy). A rate-capped target's token bucket is shared by every
 * worker and by every route of its rule, and survives route reloads: one per (rule,
 * target) in this process.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "abi.h"
#include "decision.h"

#define EXPORT __attribute__((visibility("default")))
#define REQUEST envoy_dynamic_module_type_http_header_type_RequestHeader

typedef envoy_dynamic_module_type_module_buffer module_buffer;

typedef struct {
  ms_filter *headers;
  size_t decisions; /* counter ids */
  size_t forged;
  size_t *counted; /* [i * MS_OUTCOMES + outcome]: the counter of headers->counted[i] */
} filter_config;

static module_buffer buf(const char *p, size_t n) {
  module_buffer b = {p, n};
  return b;
}

static module_buffer bytes(const ms_bytes *b) { return buf(b->ptr, b->len); }

/* ------------------------------- shared rate-cap buckets ------------------------------- */

typedef struct bucket_entry {
  struct bucket_entry *next;
  char *name; /* rule \n cluster \n slot */
  size_t len;
  ms_bucket bucket;
} bucket_entry;

static pthread_mutex_t buckets_lock = PTHREAD_MUTEX_INITIALIZER;
static bucket_entry *buckets_head;

/* Called on Envoy's main thread when a route's config is loaded; never freed, as a
 * reload must keep the tokens already taken (the entries are few: one per capped target). */
static ms_bucket *shared_bucket(const ms_bytes *rule, const ms_bytes *cluster, const ms_bytes *slot) {
  size_t len = rule->len + cluster->len + slot->len + 2;
  char *name = malloc(len);
  if (!name) return NULL;
  memcpy(name, rule->ptr, rule->len);
  name[rule->len] = '\n';
  memcpy(name + rule->len + 1, cluster->ptr, cluster->len);
  name[rule->len + 1 + cluster->len] = '\n';
  memcpy(name + rule->len + cluster->len + 2, slot->ptr, slot->len);
  pthread_mutex_lock(&buckets_lock);
  bucket_entry *e = buckets_head;
  while (e && !(e->len == len && !memcmp(e->name, name, len))) e = e->next;
  if (!e && (e = calloc(1, sizeof *e))) {
    e->name = name;
    e->len = len;
    e->next = buckets_head;
    buckets_head = e;
    name = NULL;
  }
  pthread_mutex_unlock(&buckets_lock);
  free(name);
  return e ? &e->bucket : NULL;
}

/* ----------------------------------- request headers ----------------------------------- */

static size_t envoy_header(void *filter, const char *name, size_t len, size_t index, const char **value, size_t *value_len) {
  envoy_dynamic_module_type_envoy_buffer result = {NULL, 0};
  size_t count = 0;
  envoy_dynamic_module_callback_http_get_header(filter, REQUEST, buf(name, len), &result, index, &count);
  *value = result.ptr;
  *value_len = result.length;
  return count;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Removes a header the client sent; true if there was one. */
static bool strip(void *filter, const ms_bytes *name) {
  const char *v;
  size_t n;
  if (!envoy_header(filter, name->ptr, name->len, 0, &v, &n)) return false;
  envoy_dynamic_module_callback_http_set_header(filter, REQUEST, bytes(name), buf(NULL, 0));
  return true;
}

EXPORT int envoy_dynamic_module_on_http_filter_request_headers(void *filter, const void *module_filter, bool end_of_stream) {
  (void)end_of_stream;
  const filter_config *config = module_filter;
  const ms_rule *rule = envoy_dynamic_module_callback_get_most_specific_route_config(filter);
  /* A filter config carrying a rule (Envoy Gateway: one filter config per route) serves
   * the routes that have no rule of their own. */
  if (!rule) rule = config->headers->rule;
  ms_outcome out[MS_MAX_TARGETS];
  int decided = rule ? rule->ntargets : 0;
  if (decided) {
    ms_headers headers = {envoy_header, filter};
    ms_decide(rule, &headers, now_ns(), out);
  }
  /* Slot and marker headers are the filter's alone, with or without a rule. */
  bool forged_slot = false, forged = false;
  for (int i = 0; i < config->headers->nslots; i++) forged_slot |= strip(filter, &config->headers->slots[i]);
  forged = strip(filter, &config->headers->marker) || forged_slot;
  bool sampled = false;
  for (int i = 0; i < decided; i++) {
    const ms_target *t = &rule->targets[i];
    if (out[i] == MS_MIRRORED) {
      envoy_dynamic_module_callback_http_set_header(filter, REQUEST, bytes(&t->slot), bytes(&t->cluster));
      sampled = true;
    }
    long counted = ms_counted_find(config->headers, &rule->id, t);
    if (counted >= 0) {
      envoy_dynamic_module_callback_http_filter_increment_counter(filter, config->counted[counted * MS_OUTCOMES + out[i]], NULL, 0, 1);
    } else {
      const char *outcome = ms_outcome_names[out[i]];
      module_buffer labels[3] = {bytes(&rule->id), bytes(&t->cluster), buf(outcome, strlen(outcome))};
      envoy_dynamic_module_callback_http_filter_increment_counter(filter, config->decisions, labels, 3, 1);
    }
  }
  if (forged) envoy_dynamic_module_callback_http_filter_increment_counter(filter, config->forged, NULL, 0, 1);
  /* Re-match: the variant route with exactly these mirrors, or away from a forged one. */
  if (sampled || forged_slot) envoy_dynamic_module_callback_http_clear_route_cache(filter);
  return MS_CONTINUE;
}

/* ------------------------------------ configuration ------------------------------------ */

EXPORT const char *envoy_dynamic_module_on_program_init(void) { return MS_ABI_VERSION; }

static bool define_counter(void *config_envoy, const char *name, module_buffer *labels, size_t nlabels, size_t *id) {
  return envoy_dynamic_module_callback_http_filter_config_define_counter(config_envoy, buf(name, strlen(name)), labels, nlabels, id) ==
         envoy_dynamic_module_type_metrics_result_Success;
}

/* The counters of the (rule, target) pairs the config lists, defined now (Envoy allows it
 * only here) without labels, under the very name the labelled counter would get: the
 * bootstrap's stats_tags (extproc/envoy/module.py) give them back their labels. */
static bool define_counted(void *config_envoy, filter_config *config) {
  const ms_filter *f = config->headers;
  config->counted = calloc(f->ncounted ? f->ncounted * MS_OUTCOMES : 1, sizeof *config->counted);
  if (!config->counted) return false;
  /* The parsers bound rule ids and clusters; 64 bytes hold the rest of the name. */
  char name[MS_MAX_RULE_ID + MS_MAX_CLUSTER + 64];
  bool ok = true;
  for (size_t i = 0; ok && i < f->ncounted; i++)
    for (int o = 0; ok && o < MS_OUTCOMES; o++) {
      const ms_counted *c = &f->counted[i];
      int n = snprintf(name, sizeof name, "mirror_sampler_decisions.rule.%.*s.target.%.*s.outcome.%s", (int)c->rule.len, c->rule.ptr,
                       (int)c->cluster.len, c->cluster.ptr, ms_outcome_names[o]);
      ok = n > 0 && (size_t)n < sizeof name && define_counter(config_envoy, name, NULL, 0, &config->counted[i * MS_OUTCOMES + o]);
    }
  return ok;
}

/* NULL makes Envoy refuse the configuration; the reason goes to Envoy's stderr. */
EXPORT const void *envoy_dynamic_module_on_http_filter_config_new(void *config_envoy, envoy_dynamic_module_type_envoy_buffer name,
                                                                  envoy_dynamic_module_type_envoy_buffer json) {
  (void)name;
  char err[256] = "";
  filter_config *config = calloc(1, sizeof *config);
  if (!config) return NULL;
  config->headers = ms_filter_parse(json.ptr, json.length, shared_bucket, err, sizeof err);
  module_buffer labels[3] = {buf("rule", 4), buf("target", 6), buf("outcome", 7)};
  if (config->headers && (!define_counter(config_envoy, "mirror_sampler_decisions", labels, 3, &config->decisions) ||
                          !define_counter(config_envoy, "mirror_sampler_forged_headers", NULL, 0, &config->forged) ||
                          !define_counted(config_envoy, config)))
    snprintf(err, sizeof err, "Envoy refused to define the module's counters");
  if (err[0]) {
    fprintf(stderr, "mirror-sampler module: filter config refused: %s\n", err);
    ms_filter_free(config->headers);
    free(config->counted);
    free(config);
    return NULL;
  }
  return config;
}

EXPORT void envoy_dynamic_module_on_http_filter_config_destroy(const void *module_config) {
  filter_config *config = (filter_config *)module_config;
  ms_filter_free(config->headers);
  free(config->counted);
  free(config);
}

EXPORT const void *envoy_dynamic_module_on_http_filter_per_route_config_new(envoy_dynamic_module_type_envoy_buffer name,
                                                                            envoy_dynamic_module_type_envoy_buffer json) {
  (void)name;
  char err[256] = "";
  ms_rule *rule = ms_rule_parse(json.ptr, json.length, shared_bucket, err, sizeof err);
  if (!rule) fprintf(stderr, "mirror-sampler module: route config refused: %s\n", err);
  return rule;
}

EXPORT void envoy_dynamic_module_on_http_filter_per_route_config_destroy(const void *rule) { ms_rule_free((ms_rule *)rule); }

/* No per-stream state: a stream's filter pointer is its filter config. */
EXPORT const void *envoy_dynamic_module_on_http_filter_new(const void *module_config, void *filter) {
  (void)filter;
  return module_config;
}

EXPORT void envoy_dynamic_module_on_http_filter_destroy(const void *m) { (void)m; }
