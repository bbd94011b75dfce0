"""All the Lua Envoy runs: the decision in-process (inline mode) and the
filter that strips forged slot headers (ext_proc mode).

The decision (LuaJIT):

One library, written once: MurmurHash3_x64_128 on LuaJIT's 64-bit ``ffi``
integers and ``bit`` operations, and the key sources of ``core.keys`` with the
same byte-level rules. Each rule with mirrors gets a script made of that
library plus the rule's constants (key chain, salt, slot names, clusters, the
precomputed thresholds of ``core.sampling.Fraction`` and the salt of any
target that has its own, ``core.policy.target_salt``), attached to its route as
per-route configuration, so Envoy's own route matching picks the script and
the Lua code never matches anything itself. Pure: text in, text out.
"""

from __future__ import annotations

from ..core.keys import KeyKind, KeySource
from ..core.policy import MirrorTarget, Policy, Rule, target_salt
from ..core.sampling import TWO_64
from ..core.slots import SlotHeaders

DECIDE_FILTER = "mirror-sampler.decide"

LIBRARY = r"""
local ffi = require("ffi")
local bit = require("bit")
local bxor, rol, rshift = bit.bxor, bit.rol, bit.rshift
local U64 = ffi.typeof("uint64_t")
local BYTES = ffi.typeof("const uint8_t *")
local WORDS = ffi.typeof("const uint64_t *")
local C1, C2 = 0x87c37b91114253d5ULL, 0x4cf5ad432745937fULL

local function fmix64(k)
  k = bxor(k, rshift(k, 33))
  k = k * 0xff51afd7ed558ccdULL
  k = bxor(k, rshift(k, 33))
  k = k * 0xc4ceb9fe1a85ec53ULL
  return bxor(k, rshift(k, 33))
end

local function word(p, at, n)
  -- n little-endian bytes from p[at] as a uint64 (n <= 8)
  local v = U64(0)
  for i = n - 1, 0, -1 do
    v = v * 256ULL + p[at + i]
  end
  return v
end

-- First 64-bit word of MurmurHash3_x64_128(p[0..len), seed 0), unsigned.
local function murmur3_h1_bytes(p, len)
  local h1, h2 = U64(0), U64(0)
  local nblocks = rshift(len, 4)
  for i = 0, nblocks - 1 do
    -- One unaligned little-endian load per word (x86-64 and arm64, where
    -- Envoy runs, are little-endian and allow it).
    local w = ffi.cast(WORDS, p + i * 16)
    local k1, k2 = w[0], w[1]
    k1 = k1 * C1; k1 = rol(k1, 31); k1 = k1 * C2; h1 = bxor(h1, k1)
    h1 = rol(h1, 27); h1 = h1 + h2; h1 = h1 * 5ULL + 0x52dce729ULL
    k2 = k2 * C2; k2 = rol(k2, 33); k2 = k2 * C1; h2 = bxor(h2, k2)
    h2 = rol(h2, 31); h2 = h2 + h1; h2 = h2 * 5ULL + 0x38495ab5ULL
  end
  local tail = nblocks * 16
  local rest = len - tail
  if rest > 8 then
    local k2 = word(p, tail + 8, rest - 8)
    k2 = k2 * C2; k2 = rol(k2, 33); k2 = k2 * C1; h2 = bxor(h2, k2)
  end
  if rest > 0 then
    local k1 = word(p, tail, rest > 8 and 8 or rest)
    k1 = k1 * C1; k1 = rol(k1, 31); k1 = k1 * C2; h1 = bxor(h1, k1)
  end
  h1 = bxor(h1, U64(len)); h2 = bxor(h2, U64(len))
  h1 = h1 + h2; h2 = h2 + h1
  h1 = fmix64(h1); h2 = fmix64(h2)
  return h1 + h2
end

local function murmur3_h1(data)
  return murmur3_h1_bytes(ffi.cast(BYTES, data), #data)
end

-- salt .. "\0" .. key, hashed from a reused buffer: concatenating would make
-- (and intern) a new Lua string per request.
local buffer, capacity = nil, 0
local function key_hash(prefix, key)
  local np, nk = #prefix, #key
  if np + nk > capacity then
    capacity = math.max(np + nk, 2 * capacity, 256)
    buffer = ffi.new("uint8_t[?]", capacity)
  end
  ffi.copy(buffer, prefix, np)
  ffi.copy(buffer + np, key, nk)
  return murmur3_h1_bytes(buffer, np + nk)
end

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- headers: an object with getAtIndex(name, i) and getNumValues(name), as
-- Envoy's Lua header map has; the first value of a header counts.
local function cookie_value(headers, name)
  local n = headers:getNumValues("cookie")
  for i = 0, n - 1 do
    local raw = headers:getAtIndex("cookie", i)
    for pair in (raw .. ";"):gmatch("([^;]*);") do
      pair = trim(pair)
      local eq = pair:find("=", 1, true)
      if eq and pair:sub(1, eq - 1) == name then
        return trim(pair:sub(eq + 1))
      end
    end
  end
  return nil
end

local function query_value(path, name)
  local q = path:find("?", 1, true)
  if not q then return nil end
  local query = path:sub(q + 1)
  local hash = query:find("#", 1, true)
  if hash then query = query:sub(1, hash - 1) end
  for pair in (query .. "&"):gmatch("([^&]*)&") do
    local eq = pair:find("=", 1, true)
    local k = eq and pair:sub(1, eq - 1) or pair
    if k == name then
      return eq and pair:sub(eq + 1) or ""
    end
  end
  return nil
end

local function lowhex(s)
  return s:find("^[0-9a-f]+$") ~= nil
end

local function traceparent_id(value)
  local s = trim(value)
  if #s < 55 then return nil end
  local version, trace, parent, flags = s:sub(1, 2), s:sub(4, 35), s:sub(37, 52), s:sub(54, 55)
  if s:sub(3, 3) ~= "-" or s:sub(36, 36) ~= "-" or s:sub(53, 53) ~= "-" then return nil end
  if not (lowhex(version) and lowhex(trace) and lowhex(parent) and lowhex(flags)) then return nil end
  if version == "ff" or trace == string.rep("0", 32) or parent == string.rep("0", 16) then return nil end
  local more = s:sub(56)
  if #more > 0 and (version == "00" or more:sub(1, 1) ~= "-") then return nil end
  return trace
end

local function first(headers, name)
  return headers:getAtIndex(name, 0)  -- nil when absent
end

local function source_value(headers, kind, name)
  if kind == "header" then
    return first(headers, name)
  elseif kind == "cookie" then
    return cookie_value(headers, name)
  elseif kind == "query" then
    local path = first(headers, ":path")
    return path and query_value(path, name)
  else
    local tp = first(headers, "traceparent")
    return tp and traceparent_id(tp)
  end
end

-- The first non-empty source of the chain, or nil.
local function extract_key(headers, chain)
  for _, source in ipairs(chain) do
    local v = source_value(headers, source[1], source[2])
    if v ~= nil and #v > 0 then
      return v, source
    end
  end
  return nil
end

-- Slot headers to set: the targets {slot, cluster, threshold, own prefix}
-- that sample this request, and the key's u under the policy's salt (nil if
-- no target needed it). prefix: the policy's salt and its "\0" separator;
-- t[4], when set, is the target's own salt and separator, which makes its
-- sample independent of the other targets'. Each distinct prefix is hashed
-- once, and only if a target needs it.
local function decide(headers, chain, prefix, targets)
  local key = extract_key(headers, chain)
  if key == nil then return {}, nil end
  local u = nil
  local own = nil  -- own prefix -> its u; made only for rules that have one
  local out = {}
  for _, t in ipairs(targets) do
    local v
    local p = t[4]
    if p == nil then
      if u == nil then u = key_hash(prefix, key) end
      v = u
    else
      if own == nil then own = {} end
      v = own[p]
      if v == nil then
        v = key_hash(p, key)
        own[p] = v
      end
    end
    -- t[3] == nil: the fraction is 100%, threshold 2^64, which no uint64 reaches.
    if t[3] == nil or v < t[3] then
      out[#out + 1] = t
    end
  end
  return out, u
end

MIRROR_SAMPLER = {murmur3_h1 = murmur3_h1, key_hash = key_hash, extract_key = extract_key, decide = decide}
"""

ENTRY = r"""
function envoy_on_request(handle)
  local headers = handle:headers()
  -- Slot and marker headers are the sampler's alone. On a variant route (only
  -- a client's forged slot header can select one before this runs) they all
  -- go and the route is matched again. On the plain route a forged header
  -- is harmless unless this request re-matches: then the slots not set
  -- below go first. (Routes remove every slot and marker header upstream.)
  local forged = false
  if ON_VARIANT then
    for _, name in ipairs(RESERVED) do
      headers:remove(name)
    end
    forged = true
  end
  local sampled = {}
  if METHODS == nil or METHODS[headers:getAtIndex(":method", 0) or "GET"] then
    sampled = decide(headers, CHAIN, PREFIX, TARGETS)
  end
  if #sampled > 0 then
    if not forged then
      for _, t in ipairs(TARGETS) do
        headers:remove(t[1])
      end
    end
    for _, t in ipairs(sampled) do
      headers:replace(t[1], t[2])
    end
  end
  if forged or #sampled > 0 then
    -- Re-match: the variant route that carries exactly this set of mirrors.
    handle:clearRouteCache()
  end
end
"""


def unsupported(policy: Policy) -> list[str]:
    """What the inline rendering cannot do, as configuration problems: a rate
    cap needs one clock and one counter per target, which per-worker Lua
    states do not share."""
    return [
        f"rule {rule.id}: a mirror rate cap (mirror-sampler.io/max-mirrors-per-second or MIRROR_MAX_MIRRORS_PER_SECOND) "
        "is applied by the sampler process only; remove it or run without --inline"
        for rule in policy.rules
        if rule.mirrors and rule.max_mirrors_per_second is not None
    ]


def lua_string(data: bytes) -> str:
    """A Lua string literal for arbitrary bytes (decimal escapes, no surprises)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in data) + '"'


def _chain(chain: tuple[KeySource, ...]) -> str:
    items = []
    for source in chain:
        name = source.name if source.kind is not KeyKind.TRACEPARENT else ""
        items.append(f"{{{lua_string(source.kind.value.encode())}, {lua_string(name.encode())}}}")
    return "{" + ", ".join(items) + "}"


def _threshold(threshold: int) -> str:
    return "nil" if threshold >= TWO_64 else f"0x{threshold:016x}ULL"


def _target(policy: Policy, target: MirrorTarget) -> str:
    """``{slot, cluster, threshold[, own prefix]}``: a target hashed with the
    policy's salt (PREFIX) carries no prefix, so the usual rule hashes once."""
    fields = [lua_string(policy.slot_names[target.slot].encode()), lua_string(target.backend.encode()), _threshold(target.threshold)]
    salt = target_salt(policy.salt, target)
    if salt != policy.salt:
        fields.append(lua_string(salt + bytes(1)))
    return "{" + ", ".join(fields) + "}"


def rule_script(policy: Policy, rule: Rule, variant: bool = False) -> str:
    """The Lua for one rule: the library plus this rule's constants.
    ``variant``: for the rule's variant routes, which strip forged headers."""
    # Kill switch on: no targets, but the script still strips forged headers.
    targets = ", ".join(_target(policy, t) for t in (rule.mirrors if policy.enabled else ()))
    methods = "{" + ", ".join(f"[{lua_string(m.encode())}] = true" for m in sorted(rule.methods)) + "}" if rule.methods else "nil"
    reserved = ", ".join(lua_string(n.encode()) for n in policy.slot_headers.reserved)
    constants = (
        f"-- {rule.id}: "
        + ", ".join(f"{t.backend} at {t.fraction}" + ("" if t.salt is None else " (own salt)") for t in rule.mirrors)
        + "\n"
        f"local CHAIN = {_chain(policy.key_chain)}\n"
        f"local PREFIX = {lua_string(policy.salt + bytes(1))}\n"
        f"local TARGETS = {{{targets}}}\n"
        f"local RESERVED = {{{reserved}}}\n"
        f"local METHODS = {methods}\n"
        f"local ON_VARIANT = {'true' if variant else 'false'}\n"
    )
    return LIBRARY.lstrip("\n") + constants + ENTRY


def anti_spoof_lua(slot_headers: SlotHeaders) -> str:
    names = ", ".join(f'"{n}"' for n in slot_headers.reserved)
    return f"""\
-- Client-supplied slot or marker headers never select a mirror: remove them
-- before ext_proc, and re-match the route Envoy may already have picked with them.
local names = {{{names}}}
function envoy_on_request(handle)
  local headers = handle:headers()
  local forged = false
  for _, name in ipairs(names) do
    if headers:get(name) ~= nil then
      headers:remove(name)
      forged = true
    end
  end
  if forged then
    handle:clearRouteCache()
  end
end
"""
