/* The mirror decision in C (see decision.h). Configuration arrives as JSON text that
 * extproc/envoy/module.py derives from the compiled policy; anything malformed is
 * refused with a message naming the field, never half-applied. */
#include "decision.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const ms_outcome_names[MS_OUTCOMES] = {"mirrored", "skipped", "no_key", "method", "capped", "disabled"};

/* ------------------------------ MurmurHash3_x64_128, h1 ------------------------------ */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  return k ^ (k >> 33);
}

static inline uint64_t load_le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

uint64_t ms_murmur3_h1(const uint8_t *data, size_t len) {
  const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
  uint64_t h1 = 0, h2 = 0, k1, k2;
  size_t nblocks = len / 16;
  for (size_t i = 0; i < nblocks; i++) {
    k1 = load_le64(data + i * 16);
    k2 = load_le64(data + i * 16 + 8);
    k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
    k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
    h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
  }
  const uint8_t *tail = data + nblocks * 16;
  size_t rest = len & 15;
  k1 = 0;
  k2 = 0;
  for (size_t i = rest; i > 8; i--) k2 = (k2 << 8) | tail[i - 1];
  if (rest > 8) { k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2; }
  for (size_t i = rest < 8 ? rest : 8; i > 0; i--) k1 = (k1 << 8) | tail[i - 1];
  if (rest > 0) { k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1; }
  h1 ^= (uint64_t)len;
  h2 ^= (uint64_t)len;
  h1 += h2;
  h2 += h1;
  h1 = fmix64(h1);
  h2 = fmix64(h2);
  return h1 + h2;
}

uint64_t ms_key_hash(const ms_bytes *prefix, const char *key, size_t key_len) {
  uint8_t stack[512], *buf = stack;
  if (key_len > SIZE_MAX - prefix->len) return UINT64_MAX;
  size_t n = prefix->len + key_len;
  /* Out of memory: the largest u, which only a 100% target samples. */
  if (n > sizeof stack && !(buf = malloc(n))) return UINT64_MAX;
  memcpy(buf, prefix->ptr, prefix->len);
  if (key_len) memcpy(buf + prefix->len, key, key_len);
  uint64_t u = ms_murmur3_h1(buf, n);
  if (buf != stack) free(buf);
  return u;
}

/* ----------------------------------- rate cap ----------------------------------- */

bool ms_bucket_take(ms_bucket *bucket, double rate, uint64_t now_ns) {
  double interval = 1e9 / rate;
  double capacity = rate > 1.0 ? rate : 1.0;
  /* A take is allowed while the bucket still holds a token: its "full again" time is at
   * most capacity - 1 intervals ahead of now. */
  uint64_t tolerance = (uint64_t)((capacity - 1.0) * interval);
  uint64_t step = interval >= 1.0 ? (uint64_t)interval : 1;
  uint64_t seen = atomic_load_explicit(&bucket->full_at_ns, memory_order_relaxed);
  for (;;) {
    uint64_t from = seen > now_ns ? seen : now_ns;
    if (from - now_ns > tolerance) return false;
    if (atomic_compare_exchange_weak_explicit(&bucket->full_at_ns, &seen, from + step, memory_order_relaxed, memory_order_relaxed))
      return true;
  }
}

/* ------------------------------------- keys ------------------------------------- */

/* Python's bytes.strip(): ASCII whitespace. */
static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static void strip(const char **p, size_t *n) {
  while (*n && is_space((*p)[0])) { (*p)++; (*n)--; }
  while (*n && is_space((*p)[*n - 1])) (*n)--;
}

static bool equal(const char *a, size_t na, const ms_bytes *b) { return na == b->len && (na == 0 || memcmp(a, b->ptr, na) == 0); }

static size_t header(const ms_headers *h, const char *name, size_t index, const char **v, size_t *n) {
  *v = NULL;
  *n = 0;
  size_t count = h->get(h->ctx, name, strlen(name), index, v, n);
  if (index >= count || *v == NULL) { *v = ""; *n = 0; }
  return count;
}

/* keys.cookie_value on one Cookie header: the first pair named `name` decides. */
static bool cookie_in(const char *p, size_t n, const ms_bytes *name, const char **v, size_t *vn, bool *decided) {
  while (1) {
    const char *semi = memchr(p, ';', n);
    size_t len = semi ? (size_t)(semi - p) : n;
    const char *pair = p;
    size_t plen = len;
    strip(&pair, &plen);
    const char *eq = memchr(pair, '=', plen);
    if (eq && equal(pair, (size_t)(eq - pair), name)) {
      *v = eq + 1;
      *vn = plen - (size_t)(eq - pair) - 1;
      strip(v, vn);
      *decided = true;
      return *vn > 0;
    }
    if (!semi) return false;
    p = semi + 1;
    n -= len + 1;
  }
}

static bool query_in(const char *path, size_t n, const ms_bytes *name, const char **v, size_t *vn) {
  const char *q = memchr(path, '?', n);
  if (!q) return false;
  const char *p = q + 1;
  size_t rest = n - (size_t)(p - path);
  const char *hash = memchr(p, '#', rest);
  if (hash) rest = (size_t)(hash - p);
  while (1) {
    const char *amp = memchr(p, '&', rest);
    size_t len = amp ? (size_t)(amp - p) : rest;
    const char *eq = memchr(p, '=', len);
    size_t klen = eq ? (size_t)(eq - p) : len;
    if (equal(p, klen, name)) {
      *v = eq ? eq + 1 : p + len;
      *vn = eq ? len - klen - 1 : 0;
      return *vn > 0;
    }
    if (!amp) return false;
    p = amp + 1;
    rest -= len + 1;
  }
}

static bool lowhex(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return false;
  return true;
}

static bool all_zero(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != '0') return false;
  return true;
}

/* keys.traceparent_id: the trace id of a valid W3C traceparent. */
static bool traceparent_in(const char *s, size_t n, const char **v, size_t *vn) {
  strip(&s, &n);
  if (n < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-') return false;
  if (!lowhex(s, 2) || !lowhex(s + 3, 32) || !lowhex(s + 36, 16) || !lowhex(s + 53, 2)) return false;
  if ((s[0] == 'f' && s[1] == 'f') || all_zero(s + 3, 32) || all_zero(s + 36, 16)) return false;
  if (n > 55 && (s[55] != '-' || (s[0] == '0' && s[1] == '0'))) return false;
  *v = s + 3;
  *vn = 32;
  return true;
}

/* header:cookie reads every Cookie header joined with "; ", as the sampler joins them. */
static bool joined_cookies(const ms_headers *h, size_t count, ms_bytes *scratch, const char **v, size_t *vn) {
  size_t total = 0;
  for (size_t i = 0; i < count; i++) {
    size_t n;
    header(h, "cookie", i, v, &n);
    total += n + (i ? 2 : 0);
  }
  char *buf = malloc(total ? total : 1);
  if (!buf) return false;
  size_t at = 0;
  for (size_t i = 0; i < count; i++) {
    size_t n;
    header(h, "cookie", i, v, &n);
    if (i) { memcpy(buf + at, "; ", 2); at += 2; }
    if (n) memcpy(buf + at, *v, n);
    at += n;
  }
  free(scratch->ptr);
  scratch->ptr = buf;
  scratch->len = total;
  *v = buf;
  *vn = total;
  return total > 0;
}

static bool source_value(const ms_key_source *src, const ms_headers *h, ms_bytes *scratch, const char **v, size_t *vn) {
  size_t count;
  switch (src->kind) {
  case MS_KEY_HEADER:
    if (equal("host", 4, &src->name)) {
      /* Envoy keeps Host as :authority, as ext_proc sends it. */
      if (header(h, ":authority", 0, v, vn) && *vn) return true;
      return header(h, "host", 0, v, vn) && *vn;
    }
    count = header(h, src->name.ptr, 0, v, vn);
    if (count > 1 && equal("cookie", 6, &src->name)) return joined_cookies(h, count, scratch, v, vn);
    return count && *vn;
  case MS_KEY_COOKIE: {
    count = h->get(h->ctx, "cookie", 6, 0, v, vn);
    bool decided = false;
    for (size_t i = 0; i < count && !decided; i++) {
      const char *raw;
      size_t n;
      header(h, "cookie", i, &raw, &n);
      if (cookie_in(raw, n, &src->name, v, vn, &decided)) return true;
    }
    return false;
  }
  case MS_KEY_QUERY: {
    const char *path;
    size_t n;
    return header(h, ":path", 0, &path, &n) && query_in(path, n, &src->name, v, vn);
  }
  case MS_KEY_TRACEPARENT: {
    const char *raw;
    size_t n;
    return header(h, "traceparent", 0, &raw, &n) && traceparent_in(raw, n, v, vn);
  }
  }
  return false;
}

bool ms_extract_key(const ms_rule *rule, const ms_headers *headers, ms_bytes *scratch, const char **key, size_t *key_len) {
  for (int i = 0; i < rule->nchain; i++) {
    const char *v = NULL;
    size_t n = 0;
    if (source_value(&rule->chain[i], headers, scratch, &v, &n) && n > 0) {
      *key = v;
      *key_len = n;
      return true;
    }
  }
  return false;
}

/* ----------------------------------- decision ----------------------------------- */

static ms_outcome gate(const ms_rule *rule, const ms_headers *headers) {
  if (!rule->enabled) return MS_DISABLED;
  if (rule->nmethods) {
    const char *m;
    size_t n;
    if (!header(headers, ":method", 0, &m, &n)) { m = "GET"; n = 3; }
    for (int i = 0; i < rule->nmethods; i++)
      if (equal(m, n, &rule->methods[i])) return MS_OUTCOMES;
    return MS_METHOD;
  }
  return MS_OUTCOMES;
}

void ms_decide(const ms_rule *rule, const ms_headers *headers, uint64_t now_ns, ms_outcome out[MS_MAX_TARGETS]) {
  ms_outcome blocked = gate(rule, headers);
  const char *key = NULL;
  size_t key_len = 0;
  ms_bytes scratch = {NULL, 0};
  if (blocked == MS_OUTCOMES && !ms_extract_key(rule, headers, &scratch, &key, &key_len)) blocked = MS_NO_KEY;
  if (blocked != MS_OUTCOMES) {
    for (int i = 0; i < rule->ntargets; i++) out[i] = blocked;
    free(scratch.ptr);
    return;
  }
  uint64_t u[MS_MAX_TARGETS];
  for (int i = 0; i < rule->ntargets; i++) {
    const ms_target *t = &rule->targets[i];
    u[i] = t->hash_of == i ? ms_key_hash(&t->prefix, key, key_len) : u[t->hash_of];
    if (!t->always && u[i] >= t->threshold)
      out[i] = MS_SKIPPED;
    else if (t->bucket && !ms_bucket_take(t->bucket, rule->max_per_second, now_ns))
      out[i] = MS_CAPPED;
    else
      out[i] = MS_MIRRORED;
  }
  free(scratch.ptr);
}

/* ------------------------------------- JSON ------------------------------------- */
/* A small strict JSON reader (RFC 8259) into a tree; only what the configuration needs. */

typedef enum { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT } jtype;

typedef struct jnode {
  jtype type;
  bool boolean;
  char *text; /* string contents (decoded) or number literal */
  size_t len;
  struct jnode *items; /* array items or object values */
  char **keys;         /* object keys, NUL-terminated */
  size_t count;
} jnode;

typedef struct {
  const char *p, *end, *start;
  char *err;
  size_t err_len;
  bool failed;
} jreader;

#define MS_JSON_DEPTH 16

static void fail(char *err, size_t err_len, const char *fmt, ...) {
  if (!err || !err_len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, err_len, fmt, ap);
  va_end(ap);
}

static bool jfail(jreader *r, const char *what) {
  if (!r->failed) fail(r->err, r->err_len, "not JSON: %s at byte %zu", what, (size_t)(r->p - r->start));
  r->failed = true;
  return false;
}

static void jfree(jnode *n) {
  if (n->type == J_ARRAY || n->type == J_OBJECT) {
    for (size_t i = 0; i < n->count; i++) {
      jfree(&n->items[i]);
      if (n->keys) free(n->keys[i]);
    }
    free(n->items);
    free(n->keys);
  }
  free(n->text);
  memset(n, 0, sizeof *n);
}

static void skip_ws(jreader *r) {
  while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static bool read_hex4(jreader *r, unsigned *out) {
  if (r->end - r->p < 4) return jfail(r, "short \\u escape");
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(r->p[i]);
    if (h < 0) return jfail(r, "bad \\u escape");
    v = v * 16 + (unsigned)h;
  }
  r->p += 4;
  *out = v;
  return true;
}

static bool read_string(jreader *r, char **out, size_t *out_len) {
  r->p++; /* the opening quote */
  size_t cap = (size_t)(r->end - r->p) + 1;
  char *buf = malloc(cap), *w = buf;
  if (!buf) return jfail(r, "out of memory");
  while (1) {
    if (r->p >= r->end) { free(buf); return jfail(r, "unterminated string"); }
    unsigned char c = (unsigned char)*r->p++;
    if (c == '"') break;
    if (c < 0x20) { free(buf); return jfail(r, "control character in string"); }
    if (c != '\\') { *w++ = (char)c; continue; }
    if (r->p >= r->end) { free(buf); return jfail(r, "unterminated escape"); }
    char e = *r->p++;
    unsigned cp;
    switch (e) {
    case '"': *w++ = '"'; break;
    case '\\': *w++ = '\\'; break;
    case '/': *w++ = '/'; break;
    case 'b': *w++ = '\b'; break;
    case 'f': *w++ = '\f'; break;
    case 'n': *w++ = '\n'; break;
    case 'r': *w++ = '\r'; break;
    case 't': *w++ = '\t'; break;
    case 'u':
      if (!read_hex4(r, &cp)) { free(buf); return false; }
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        unsigned lo;
        if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u') { free(buf); return jfail(r, "lone surrogate"); }
        r->p += 2;
        if (!read_hex4(r, &lo)) { free(buf); return false; }
        if (lo < 0xDC00 || lo > 0xDFFF) { free(buf); return jfail(r, "lone surrogate"); }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        free(buf);
        return jfail(r, "lone surrogate");
      }
      /* UTF-8; an escape is 6 or 12 input bytes and at most 4 output bytes. */
      if (cp < 0x80) *w++ = (char)cp;
      else if (cp < 0x800) { *w++ = (char)(0xC0 | (cp >> 6)); *w++ = (char)(0x80 | (cp & 0x3F)); }
      else if (cp < 0x10000) { *w++ = (char)(0xE0 | (cp >> 12)); *w++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *w++ = (char)(0x80 | (cp & 0x3F)); }
      else {
        *w++ = (char)(0xF0 | (cp >> 18)); *w++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *w++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *w++ = (char)(0x80 | (cp & 0x3F));
      }
      break;
    default: free(buf); return jfail(r, "bad escape");
    }
  }
  *w = 0;
  *out = buf;
  *out_len = (size_t)(w - buf);
  return true;
}

static bool read_value(jreader *r, jnode *n, int depth);

static bool read_container(jreader *r, jnode *n, int depth, bool object) {
  n->type = object ? J_OBJECT : J_ARRAY;
  r->p++;
  size_t cap = 0;
  skip_ws(r);
  if (r->p < r->end && *r->p == (object ? '}' : ']')) { r->p++; return true; }
  while (1) {
    if (n->count == cap) {
      cap = cap ? cap * 2 : 4;
      jnode *items = realloc(n->items, cap * sizeof *items);
      if (!items) return jfail(r, "out of memory");
      n->items = items;
      if (object) {
        char **keys = realloc(n->keys, cap * sizeof *keys);
        if (!keys) return jfail(r, "out of memory");
        n->keys = keys;
      }
    }
    jnode *item = &n->items[n->count];
    memset(item, 0, sizeof *item);
    if (object) {
      n->keys[n->count] = NULL;
      skip_ws(r);
      size_t klen;
      if (r->p >= r->end || *r->p != '"') { n->count++; return jfail(r, "expected a key"); }
      n->count++;
      if (!read_string(r, &n->keys[n->count - 1], &klen)) return false;
      skip_ws(r);
      if (r->p >= r->end || *r->p != ':') return jfail(r, "expected ':'");
      r->p++;
    } else {
      n->count++;
    }
    if (!read_value(r, item, depth + 1)) return false;
    skip_ws(r);
    if (r->p < r->end && *r->p == ',') { r->p++; continue; }
    if (r->p < r->end && *r->p == (object ? '}' : ']')) { r->p++; return true; }
    return jfail(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
  }
}

static bool read_value(jreader *r, jnode *n, int depth) {
  if (depth > MS_JSON_DEPTH) return jfail(r, "nested too deeply");
  skip_ws(r);
  if (r->p >= r->end) return jfail(r, "unexpected end");
  char c = *r->p;
  size_t left = (size_t)(r->end - r->p);
  if (c == '{' || c == '[') return read_container(r, n, depth, c == '{');
  if (c == '"') { n->type = J_STRING; return read_string(r, &n->text, &n->len); }
  if (left >= 4 && !memcmp(r->p, "null", 4)) { n->type = J_NULL; r->p += 4; return true; }
  if (left >= 4 && !memcmp(r->p, "true", 4)) { n->type = J_BOOL; n->boolean = true; r->p += 4; return true; }
  if (left >= 5 && !memcmp(r->p, "false", 5)) { n->type = J_BOOL; r->p += 5; return true; }
  if (c == '-' || (c >= '0' && c <= '9')) {
    const char *s = r->p;
    if (*r->p == '-') r->p++;
    if (r->p >= r->end || !(*r->p >= '0' && *r->p <= '9')) return jfail(r, "bad number");
    if (*r->p == '0') r->p++;
    else while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    if (r->p < r->end && *r->p == '.') {
      r->p++;
      if (r->p >= r->end || !(*r->p >= '0' && *r->p <= '9')) return jfail(r, "bad number");
      while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
      r->p++;
      if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
      if (r->p >= r->end || !(*r->p >= '0' && *r->p <= '9')) return jfail(r, "bad number");
      while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    }
    n->type = J_NUMBER;
    n->len = (size_t)(r->p - s);
    n->text = malloc(n->len + 1);
    if (!n->text) return jfail(r, "out of memory");
    memcpy(n->text, s, n->len);
    n->text[n->len] = 0;
    return true;
  }
  return jfail(r, "unexpected character");
}

static bool jparse(const char *text, size_t len, jnode *root, char *err, size_t err_len) {
  jreader r = {text ? text : "", (text ? text : "") + (text ? len : 0), text ? text : "", err, err_len, false};
  memset(root, 0, sizeof *root);
  bool ok = read_value(&r, root, 0);
  if (ok) {
    skip_ws(&r);
    if (r.p != r.end) ok = jfail(&r, "trailing data");
  }
  if (!ok) jfree(root);
  return ok;
}

/* ---------------------------------- configuration ---------------------------------- */

typedef struct {
  char *err;
  size_t err_len;
  bool failed;
} problem;

static bool refuse(problem *pr, const char *field, const char *what) {
  if (!pr->failed) fail(pr->err, pr->err_len, "%s: %s", field, what);
  pr->failed = true;
  return false;
}

static const jnode *member(const jnode *obj, const char *key) {
  for (size_t i = 0; i < obj->count; i++)
    if (!strcmp(obj->keys[i], key)) return &obj->items[i];
  return NULL;
}

/* Every key known, every required key present: a misspelt field is an error, not a default. */
static bool check_keys(const jnode *obj, const char *where, const char *const *known, size_t nknown, problem *pr) {
  char field[160];
  if (obj->type != J_OBJECT) return refuse(pr, where, "expected an object");
  for (size_t i = 0; i < obj->count; i++) {
    bool found = false;
    for (size_t k = 0; k < nknown; k++) found = found || !strcmp(obj->keys[i], known[k]);
    for (size_t j = 0; j < i && found; j++) found = strcmp(obj->keys[i], obj->keys[j]) != 0;
    snprintf(field, sizeof field, "%s.%.64s", where, obj->keys[i]);
    if (!found) return refuse(pr, field, "unknown or repeated field");
  }
  for (size_t k = 0; k < nknown; k++) {
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

static const char *const FILTER_KEYS[] = {"slot_headers", "marker_header"};

void ms_filter_free(ms_filter *f) {
  if (!f) return;
  for (int i = 0; i < f->nslots; i++) free_bytes(&f->slots[i]);
  free_bytes(&f->marker);
  free(f);
}

ms_filter *ms_filter_parse(const char *json, size_t len, char *err, size_t err_len) {
  problem pr = {err, err_len, false};
  jnode root;
  if (!jparse(json, len, &root, err, err_len)) return NULL;
  ms_filter *f = calloc(1, sizeof *f);
  if (!f) { jfree(&root); fail(err, err_len, "out of memory"); return NULL; }
  char field[64];
  if (check_keys(&root, "filter", FILTER_KEYS, 2, &pr)) {
    const jnode *slots = member(&root, "slot_headers");
    if (slots->type != J_ARRAY || slots->count < 1 || slots->count > MS_MAX_TARGETS)
      refuse(&pr, "filter.slot_headers", "expected a list of 1 to 8 header names");
    for (size_t i = 0; !pr.failed && i < slots->count; i++) {
      snprintf(field, sizeof field, "filter.slot_headers[%zu]", i);
      if (header_name(&slots->items[i], field, &f->slots[i], &pr)) f->nslots++;
    }
    if (!pr.failed) header_name(member(&root, "marker_header"), "filter.marker_header", &f->marker, &pr);
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

/* Threshold: an integer in [0, 2^64]; 2^64 (every key) does not fit a uint64. */
static bool threshold(const jnode *n, const char *field, ms_target *t, problem *pr) {
  if (n->type != J_NUMBER || n->text[0] == '-' || strpbrk(n->text, ".eE")) return refuse(pr, field, "expected an integer from 0 to 2^64");
  if (!strcmp(n->text, "18446744073709551616")) { t->always = true; t->threshold = UINT64_MAX; return true; }
  uint64_t v = 0;
  for (size_t i = 0; i < n->len; i++) {
    uint64_t d = (uint64_t)(n->text[i] - '0');
    if (v > (UINT64_MAX - d) / 10) return refuse(pr, field, "expected an integer from 0 to 2^64");
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
    int hi = hexval(n->text[2 * i]), lo = hexval(n->text[2 * i + 1]);
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
    if (!check_keys(src, field, SOURCE_KEYS, 2, pr)) return;
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
    if (!check_keys(tn, field, TARGET_KEYS, 4, pr)) return;
    r->ntargets++;
    snprintf(field, sizeof field, "rule.targets[%zu].slot", i);
    if (!header_name(member(tn, "slot"), field, &t->slot, pr)) return;
    snprintf(field, sizeof field, "rule.targets[%zu].cluster", i);
    if (!text(member(tn, "cluster"), field, 256, &t->cluster, pr)) return;
    snprintf(field, sizeof field, "rule.targets[%zu].salt_hex", i);
    if (!salt_prefix(member(tn, "salt_hex"), field, &t->prefix, pr)) return;
    snprintf(field, sizeof field, "rule.targets[%zu].threshold", i);
    if (!threshold(member(tn, "threshold"), field, t, pr)) return;
    t->hash_of = (int)i;
    for (int j = 0; j < (int)i; j++)
      if (r->targets[j].prefix.len == t->prefix.len && !memcmp(r->targets[j].prefix.ptr, t->prefix.ptr, t->prefix.len)) {
        t->hash_of = j;
        break;
      }
    if (r->max_per_second > 0) {
      t->bucket = buckets ? buckets(&r->id, &t->cluster, &t->slot) : calloc(1, sizeof *t->bucket);
      if (!t->bucket) { refuse(pr, field, "out of memory"); return; }
    }
  }
}

ms_rule *ms_rule_parse(const char *json, size_t len, ms_bucket_lookup buckets, char *err, size_t err_len) {
  problem pr = {err, err_len, false};
  jnode root;
  if (!jparse(json, len, &root, err, err_len)) return NULL;
  ms_rule *r = calloc(1, sizeof *r);
  if (!r) { jfree(&root); fail(err, err_len, "out of memory"); return NULL; }
  r->own_buckets = buckets == NULL;
  char field[64];
  if (check_keys(&root, "rule", RULE_KEYS, 6, &pr) && text(member(&root, "rule"), "rule.rule", 1024, &r->id, &pr)) {
    const jnode *enabled = member(&root, "enabled"), *methods = member(&root, "methods"), *cap = member(&root, "max_mirrors_per_second");
    if (enabled->type != J_BOOL) refuse(&pr, "rule.enabled", "expected true or false");
    else r->enabled = enabled->boolean;
    if (!pr.failed && (methods->type != J_ARRAY || methods->count > MS_MAX_METHODS)) refuse(&pr, "rule.methods", "expected a list of at most 16 methods");
    for (size_t i = 0; !pr.failed && i < methods->count; i++) {
      snprintf(field, sizeof field, "rule.methods[%zu]", i);
      if (text(&methods->items[i], field, 32, &r->methods[r->nmethods], &pr)) r->nmethods++;
    }
    if (!pr.failed) {
      if (cap->type == J_NULL) r->max_per_second = 0;
      else if (cap->type != J_NUMBER || cap->text[0] == '-' || !((r->max_per_second = strtod(cap->text, NULL)) > 0 && r->max_per_second <= 1e6))
        refuse(&pr, "rule.max_mirrors_per_second", "expected null or a number of mirrors per second, 0 < rate <= 1000000");
    }
    if (!pr.failed) parse_chain(member(&root, "key_chain"), r, &pr);
    if (!pr.failed) parse_targets(member(&root, "targets"), r, buckets, &pr);
  }
  jfree(&root);
  if (pr.failed) {
    ms_rule_free(r);
    return NULL;
  }
  return r;
}
