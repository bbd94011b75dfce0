/* The dynamic module's decision on its own, in a loop: ns per decision (key from a header
 * among typical request headers, hash, threshold) and ns per hash, for bench/module_decision.py.
 * Reads the rule's JSON (extproc/envoy/module.py's rule_settings) from argv[1] and the key
 * header's name from argv[2]; built with the module's own flags and sources. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "decision.h"

#define NKEYS 1024
#define NHEADERS 8

typedef struct {
  const char *names[NHEADERS];
  const char *values[NHEADERS];
  size_t count;
} request;

static size_t get(void *ctx, const char *name, size_t name_len, size_t index, const char **value, size_t *value_len) {
  const request *r = ctx;
  size_t seen = 0;
  for (size_t i = 0; i < r->count; i++) {
    if (strlen(r->names[i]) != name_len || memcmp(r->names[i], name, name_len)) continue;
    if (seen == index) {
      *value = r->values[i];
      *value_len = strlen(r->values[i]);
    }
    seen++;
  }
  return seen;
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s RULE_JSON KEY_HEADER ROUNDS\n", argv[0]);
    return 2;
  }
  char err[256] = "";
  ms_rule *rule = ms_rule_parse(argv[1], strlen(argv[1]), NULL, err, sizeof err);
  if (!rule) {
    fprintf(stderr, "rule: %s\n", err);
    return 2;
  }
  long rounds = strtol(argv[3], NULL, 10);
  static char keys[NKEYS][32];
  static request requests[NKEYS];
  for (int i = 0; i < NKEYS; i++) {
    snprintf(keys[i], sizeof keys[i], "user-%d", i);
    request *r = &requests[i];
    const char *names[] = {":method", ":path", ":authority", "user-agent", "accept", argv[2]};
    const char *values[] = {"GET", "/percent-mirror", "gw.example", "bench/1.0", "*/*", keys[i]};
    for (size_t h = 0; h < sizeof names / sizeof *names; h++) {
      r->names[h] = names[h];
      r->values[h] = values[h];
    }
    r->count = sizeof names / sizeof *names;
  }
  ms_outcome out[MS_MAX_TARGETS];
  long mirrored = 0;
  double start = now_ns();
  for (long n = 0; n < rounds; n++) {
    for (int i = 0; i < NKEYS; i++) {
      ms_headers headers = {get, &requests[i]};
      ms_decide(rule, &headers, (uint64_t)n, out);
      mirrored += out[0] == MS_MIRRORED;
    }
  }
  double decide_ns = (now_ns() - start) / ((double)rounds * NKEYS);
  uint64_t sink = 0;
  start = now_ns();
  for (long n = 0; n < rounds; n++)
    for (int i = 0; i < NKEYS; i++) sink ^= ms_key_hash(&rule->targets[0].prefix, keys[i], strlen(keys[i]));
  double hash_ns = (now_ns() - start) / ((double)rounds * NKEYS);
  printf("{\"decide_ns\": %.2f, \"hash_ns\": %.2f, \"mirrored_per_pass\": %.3f, \"keys\": %d, \"sink\": %llu}\n", decide_ns,
         hash_ns, (double)mirrored / (double)rounds, NKEYS, (unsigned long long)(sink & 1));
  ms_rule_free(rule);
  return 0;
}
