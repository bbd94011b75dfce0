/* A small strict JSON reader (RFC 8259) into a tree (json.h). */
#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *p, *end, *start;
  char *err;
  size_t err_len;
  bool failed;
} jreader;

#define MS_JSON_DEPTH 16

void ms_fail(char *err, size_t err_len, const char *fmt, ...) {
  if (!err || !err_len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, err_len, fmt, ap);
  va_end(ap);
  /* One line, whatever a configured key contained. */
  for (char *c = err; *c; c++)
    if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
}

static bool jfail(jreader *r, const char *what) {
  if (!r->failed) ms_fail(r->err, r->err_len, "not JSON: %s at byte %zu", what, (size_t)(r->p - r->start));
  r->failed = true;
  return false;
}

void jfree(jnode *n) {
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

int ms_hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static bool read_hex4(jreader *r, unsigned *out) {
  if (r->end - r->p < 4) return jfail(r, "short \\u escape");
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = ms_hexval(r->p[i]);
    if (h < 0) return jfail(r, "bad \\u escape");
    v = v * 16 + (unsigned)h;
  }
  r->p += 4;
  *out = v;
  return true;
}

static bool read_string(jreader *r, char **out, size_t *out_len) {
  r->p++; /* the opening quote */
  /* The raw span up to the closing quote: no escape decodes to more bytes than it is written in.
   * (Each string took the whole rest of the document before: a 450 KB configuration reserved 3.6 GB.) */
  const char *q = r->p;
  while (q < r->end && *q != '"') q += (*q == '\\' && q + 1 < r->end) ? 2 : 1;
  size_t cap = (size_t)(q - r->p) + 1;
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

bool jparse(const char *text, size_t len, jnode *root, char *err, size_t err_len) {
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
