"""The decision (docs/DESIGN.md "The decision", normative): hash, threshold, properties.

Everything here is checked against independent formulations: the literal
inequality ``u * d < n * 2**64``, a pure-Python MurmurHash3_x64_128 and exact
rational arithmetic, so a change to ``extproc.core.sampling`` cannot agree with itself.
"""

from __future__ import annotations

import math
from fractions import Fraction as Q
from functools import cache

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.core.sampling import TWO_64, Fraction, decide, is_sampled, key_hash

MAX_U = 2**64 - 1
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# Independent reference implementations.


def murmur3_x64_128(data: bytes, seed: int = 0) -> tuple[int, int]:
    """MurmurHash3_x64_128 (Austin Appleby's reference), both 64-bit words."""
    m = (1 << 64) - 1
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & m

    def fmix(k: int) -> int:
        k ^= k >> 33
        k = (k * 0xFF51AFD7ED558CCD) & m
        k ^= k >> 33
        k = (k * 0xC4CEB9FE1A85EC53) & m
        k ^= k >> 33
        return k

    h1 = h2 = seed
    n = len(data)
    nblocks = n // 16
    for i in range(nblocks):
        k1 = int.from_bytes(data[16 * i : 16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8 : 16 * i + 16], "little")
        k1 = rotl((k1 * c1) & m, 31) * c2 & m
        h1 ^= k1
        h1 = (rotl(h1, 27) + h2) & m
        h1 = (h1 * 5 + 0x52DCE729) & m
        k2 = rotl((k2 * c2) & m, 33) * c1 & m
        h2 ^= k2
        h2 = (rotl(h2, 31) + h1) & m
        h2 = (h2 * 5 + 0x38495AB5) & m
    tail = data[16 * nblocks :]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= rotl((k2 * c2) & m, 33) * c1 & m
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= rotl((k1 * c1) & m, 31) * c2 & m
    h1 ^= n
    h2 ^= n
    h1 = (h1 + h2) & m
    h2 = (h2 + h1) & m
    h1, h2 = fmix(h1), fmix(h2)
    h1 = (h1 + h2) & m
    h2 = (h2 + h1) & m
    return h1, h2


def literal(u: int, n: int, d: int) -> bool:
    """docs/DESIGN.md: mirror iff u * denominator < numerator * 2**64."""
    return u * d < n * 2**64


def ceil_threshold(n: int, d: int) -> int:
    return (n * 2**64 + d - 1) // d


@cache
def us(salt: bytes, count: int) -> tuple[int, ...]:
    """u for the keys user-0 .. user-(count-1), computed once per session."""
    return tuple(key_hash(salt, f"user-{i}".encode()) for i in range(count))


def sampled_set(u_values: tuple[int, ...], f: Fraction) -> set[int]:
    return {i for i, u in enumerate(u_values) if u < f.threshold}


fractions_st = st.integers(min_value=1, max_value=10**6).flatmap(lambda d: st.tuples(st.integers(min_value=0, max_value=d), st.just(d)))


# --------------------------------------------------------------------------
# Test vectors and the hash itself.

VECTORS = [
    (b"", b"user-123", 17646487862988728035, False),
    (b"", b"alice", 3287336622105459802, True),
    (b"v2", b"alice", 2539909752279064467, True),
]


@pytest.mark.parametrize(("salt", "key", "u", "mirrored"), VECTORS)
def test_design_vectors(salt: bytes, key: bytes, u: int, mirrored: bool) -> None:
    assert key_hash(salt, key) == u
    f = Fraction(42, 100)
    assert decide(salt, key, f) is mirrored
    assert is_sampled(u, f) is mirrored
    assert literal(u, 42, 100) is mirrored


@pytest.mark.parametrize(("salt", "key", "u", "mirrored"), VECTORS)
def test_vectors_against_reference_murmur(salt: bytes, key: bytes, u: int, mirrored: bool) -> None:
    assert murmur3_x64_128(salt + b"\x00" + key)[0] == u


def test_reference_murmur_known_answers() -> None:
    """Published MurmurHash3_x64_128 results (seed 0), so the reference is itself checked."""
    assert murmur3_x64_128(b"") == (0, 0)
    assert murmur3_x64_128(b"hello") == (0xCBD8A7B341BD9B02, 0x5B1E906A48AE1D19)
    # Usually printed as the 16 little-endian bytes 6c1b07bc7bbc4be347939ac4a93c437a.
    assert murmur3_x64_128(b"The quick brown fox jumps over the lazy dog") == (0xE34BBC7BBC071B6C, 0x7A433CA9C49A9347)


@FAST
@given(salt=st.binary(max_size=40), key=st.binary(max_size=80))
@example(salt=b"", key=b"")
@example(salt=b"x" * 16, key=b"y" * 15)
def test_key_hash_is_murmur3_x64_128_first_word_unsigned(salt: bytes, key: bytes) -> None:
    u = key_hash(salt, key)
    assert 0 <= u <= MAX_U
    assert u == murmur3_x64_128(salt + b"\x00" + key)[0]


def test_salt_is_separated_from_key() -> None:
    # b"a" + b"\x00" + b"b" and b"" + b"\x00" + b"ab" differ: salt and key cannot bleed.
    assert key_hash(b"a", b"b") != key_hash(b"", b"ab")
    assert key_hash(b"ab", b"") != key_hash(b"a", b"b")
    assert key_hash(b"", b"alice") != key_hash(b"v2", b"alice")


# --------------------------------------------------------------------------
# Threshold vs the defining inequality.

EDGE_FRACTIONS = [
    (0, 1),
    (1, 1),
    (0, 100),
    (100, 100),
    (42, 100),
    (1, 3),
    (2, 3),
    (3, 3),
    (1, 7),
    (6, 7),
    (5, 1000),
    (999, 1000),
    (1, 2),
    (25, 50),
    (1, 2**31 - 1),
    (2**31 - 2, 2**31 - 1),
]


@pytest.mark.parametrize(("n", "d"), EDGE_FRACTIONS)
def test_threshold_matches_inequality_at_edges(n: int, d: int) -> None:
    f = Fraction(n, d)
    t = f.threshold
    assert t == ceil_threshold(n, d) == math.ceil(Q(n * 2**64, d))
    assert 0 <= t <= 2**64
    candidates = {0, 1, 2, MAX_U - 1, MAX_U, 2**63, 2**63 - 1}
    candidates |= {u for u in (t - 2, t - 1, t, t + 1, t + 2) if 0 <= u <= MAX_U}
    for u in candidates:
        want = literal(u, n, d)
        assert is_sampled(u, f) is want, (u, f)
        assert (u < t) is want, (u, f)
    # The threshold is the smallest u that is not mirrored.
    if 0 < t <= MAX_U:
        assert literal(t - 1, n, d) and not literal(t, n, d)


def test_zero_and_full_fraction_extremes() -> None:
    for d in (1, 3, 7, 100, 1000):
        assert Fraction(0, d).threshold == 0
        assert Fraction(d, d).threshold == TWO_64 == 2**64
        assert not is_sampled(0, Fraction(0, d))
        assert is_sampled(MAX_U, Fraction(d, d))
    assert Fraction(1, 3).threshold == (2**64 + 2) // 3
    assert Fraction(1, 2).threshold == 2**63
    assert is_sampled(2**63 - 1, Fraction(1, 2)) and not is_sampled(2**63, Fraction(1, 2))


@FAST
@given(u=st.integers(min_value=0, max_value=MAX_U), nd=fractions_st)
@example(u=0, nd=(0, 1))
@example(u=MAX_U, nd=(1, 1))
@example(u=MAX_U, nd=(999_999, 1_000_000))
def test_threshold_equals_inequality(u: int, nd: tuple[int, int]) -> None:
    n, d = nd
    f = Fraction(n, d)
    want = literal(u, n, d)
    assert (u < f.threshold) is want
    assert is_sampled(u, f) is want


@FAST
@given(nd=fractions_st, delta=st.integers(min_value=-3, max_value=3))
def test_threshold_equals_inequality_near_threshold(nd: tuple[int, int], delta: int) -> None:
    n, d = nd
    f = Fraction(n, d)
    u = min(max(f.threshold + delta, 0), MAX_U)
    assert (u < f.threshold) is literal(u, n, d) is is_sampled(u, f)


@FAST
@given(salt=st.binary(max_size=8), key=st.binary(max_size=40), nd=fractions_st)
def test_decide_is_the_inequality_on_the_hash(salt: bytes, key: bytes, nd: tuple[int, int]) -> None:
    n, d = nd
    u = murmur3_x64_128(salt + b"\x00" + key)[0]
    assert decide(salt, key, Fraction(n, d)) is literal(u, n, d)


# --------------------------------------------------------------------------
# Fraction validation.


@pytest.mark.parametrize(("n", "d"), [(0, 0), (1, 0), (0, -1), (-1, 100), (101, 100), (2, 1), (-5, -1)])
def test_fraction_rejects_invalid(n: int, d: int) -> None:
    with pytest.raises(ValueError):
        Fraction(n, d)


def test_fraction_defaults_and_str() -> None:
    assert Fraction(42) == Fraction(42, 100)
    assert str(Fraction(5, 1000)) == "5/1000"
    Fraction(0, 1)
    Fraction(1, 1)


# --------------------------------------------------------------------------
# Properties.


@FAST
@given(salt=st.binary(max_size=8), key=st.binary(max_size=40), nd=fractions_st)
def test_deterministic(salt: bytes, key: bytes, nd: tuple[int, int]) -> None:
    f = Fraction(*nd)
    first = decide(salt, key, f)
    assert all(decide(bytes(salt), bytes(key), Fraction(*nd)) is first for _ in range(3))
    assert key_hash(salt, key) == key_hash(bytes(salt), bytes(key))


@FAST
@given(nd=fractions_st)
def test_raising_numerator_only_adds_keys(nd: tuple[int, int]) -> None:
    n, d = nd
    if n == d:
        n -= 1
    if n < 0:
        return
    u_values = us(b"", 2000)
    lower, higher = sampled_set(u_values, Fraction(n, d)), sampled_set(u_values, Fraction(n + 1, d))
    assert lower <= higher


@FAST
@given(a=fractions_st, b=fractions_st, salt=st.sampled_from([b"", b"v2", b"team-a"]))
@example(a=(1, 2), b=(50, 100), salt=b"")
@example(a=(5, 1000), b=(1, 100), salt=b"")
@example(a=(1, 3), b=(333, 1000), salt=b"v2")
def test_monotone_across_denominators(a: tuple[int, int], b: tuple[int, int], salt: bytes) -> None:
    f1, f2 = Fraction(*a), Fraction(*b)
    if Q(*a) > Q(*b):
        f1, f2 = f2, f1
    assert f1.threshold <= f2.threshold
    u_values = us(salt, 2000)
    s1, s2 = sampled_set(u_values, f1), sampled_set(u_values, f2)
    assert s1 <= s2
    if Q(f1.numerator, f1.denominator) == Q(f2.numerator, f2.denominator):
        assert s1 == s2 and f1.threshold == f2.threshold


@FAST
@given(a=fractions_st, b=fractions_st, salt=st.binary(max_size=6))
def test_nested_across_targets_sharing_a_salt(a: tuple[int, int], b: tuple[int, int], salt: bytes) -> None:
    """Two targets with the same salt: the smaller sample is inside the larger, key by key."""
    small, large = sorted((Fraction(*a), Fraction(*b)), key=lambda f: Q(f.numerator, f.denominator))
    for i in range(300):
        key = f"k{i}".encode()
        if decide(salt, key, small):
            assert decide(salt, key, large)


def test_nested_five_inside_ten_percent() -> None:
    u_values = us(b"", 20000)
    five, ten = sampled_set(u_values, Fraction(5, 100)), sampled_set(u_values, Fraction(10, 100))
    assert five < ten
    assert 0.04 < len(five) / 20000 < 0.06


@pytest.mark.parametrize("salts", [(b"", b"v2"), (b"a", b"b"), (b"salt-1", b"salt-2")])
@pytest.mark.parametrize(("p1", "p2"), [((30, 100), (50, 100)), ((10, 100), (20, 100)), ((1, 2), (1, 2)), ((5, 1000), (900, 1000))])
def test_independent_across_salts(salts: tuple[bytes, bytes], p1: tuple[int, int], p2: tuple[int, int]) -> None:
    n = 20000
    f1, f2 = Fraction(*p1), Fraction(*p2)
    s1 = sampled_set(us(salts[0], n), f1)
    s2 = sampled_set(us(salts[1], n), f2)
    p = (p1[0] / p1[1]) * (p2[0] / p2[1])
    sd = math.sqrt(n * p * (1 - p))
    overlap = len(s1 & s2)
    assert abs(overlap - n * p) <= 5 * sd, (overlap, n * p, sd)


def test_same_salt_is_not_independent() -> None:
    """Control for the test above: with one salt the overlap is the smaller set, far beyond 5 sd."""
    n = 20000
    s1 = sampled_set(us(b"", n), Fraction(30, 100))
    s2 = sampled_set(us(b"", n), Fraction(50, 100))
    assert s1 & s2 == s1
    p = 0.15
    assert len(s1 & s2) - n * p > 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize(("n", "d"), [(5, 1000), (20, 100), (42, 100), (25, 50), (1, 3), (0, 100), (100, 100)])
def test_sampled_share_close_to_fraction(n: int, d: int) -> None:
    count = 100_000
    hits = len(sampled_set(us(b"", count), Fraction(n, d)))
    p = n / d
    sd = math.sqrt(count * p * (1 - p))
    assert abs(hits - count * p) <= 5 * sd, (hits, count * p, sd)
    if p in (0.0, 1.0):
        assert hits == count * p


def test_sampled_share_with_a_salt() -> None:
    count = 100_000
    hits = len(sampled_set(us(b"v2", count), Fraction(42, 100)))
    sd = math.sqrt(count * 0.42 * 0.58)
    assert abs(hits - count * 0.42) <= 5 * sd
