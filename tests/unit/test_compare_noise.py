"""Diffy's noise rule and a request's verdict per target (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.compare.differ import DiffRules
from extproc.compare.judge import including, pair, pair_up, settle
from extproc.compare.noise import NO_RATES, Rates, Result, is_real, real_fields, verdict
from extproc.compare.records import Capture, Side

counts = st.integers(1, 1000)


@st.composite
def rates(draw: st.DrawFn) -> Rates:
    compared = draw(counts)
    return Rates(compared, {"f": draw(st.integers(0, compared))})


@given(rates(), st.floats(0, 1))
def test_a_field_as_noisy_in_the_candidate_as_in_the_secondary_is_never_real(r: Rates, margin: float) -> None:
    assert not is_real("f", r, r, margin)


@given(rates(), rates(), st.floats(0, 1), st.floats(0, 1))
def test_a_larger_margin_never_makes_more_fields_real(candidate: Rates, noise: Rates, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert is_real("f", candidate, noise, high) <= is_real("f", candidate, noise, low)


def test_real_only_when_the_rate_exceeds_the_noise_rate_by_the_margin() -> None:
    noise = Rates(100, {"ts": 100, "flaky": 10})
    candidate = Rates(100, {"ts": 100, "flaky": 14, "version": 30})
    assert real_fields(["ts", "flaky", "version"], candidate, noise, 0.05) == ["version"]
    assert real_fields(["ts", "flaky", "version"], candidate, noise, 0.03) == ["flaky", "version"]
    assert verdict(["ts"], candidate, noise, 0.05) is Result.NOISE_ONLY
    assert verdict([], candidate, noise, 0.05) is Result.SAME
    assert verdict(["ts", "version"], candidate, noise, 0.05) is Result.DIFFERS


def test_without_a_secondary_every_difference_is_real() -> None:
    assert verdict(["ts"], Rates(1, {"ts": 1}), None, 0.05) is Result.DIFFERS


def test_a_verdict_counts_the_pair_it_judges() -> None:
    r = including(Rates(3, {"a": 1}), ["a", "b", "b"])
    assert r == Rates(4, {"a": 2, "b": 1})
    assert including(NO_RATES, []).compared == 1


def capture(side: Side, status: int = 200, body: bytes = b'{"v":1}', targets: tuple[str, ...] = ("c",), local: bool = False) -> Capture:
    return Capture("id", "r", side, targets, "GET", "/", status, (), body, False, 1.0, local, 0.0)


def test_pairs_say_what_is_missing_or_broken() -> None:
    primary = capture(Side.PRIMARY, targets=("c", "s"))
    assert pair(primary, None, "r", "c", "id", DiffRules()).outcome is Result.SHADOW_MISSING
    assert pair(None, capture(Side.SHADOW), "r", "c", "id", DiffRules()).outcome is Result.PRIMARY_MISSING
    assert pair(primary, capture(Side.SHADOW, 503, local=True), "r", "c", "id", DiffRules()).outcome is Result.SHADOW_ERROR
    compared = pair(primary, capture(Side.SHADOW, 503, body=b'{"v":2}'), "r", "c", "id", DiffRules())
    assert compared.outcome is None and compared.paths == ("status", "body.v")


def test_pair_up_covers_every_named_target_and_every_stray_shadow() -> None:
    primary = capture(Side.PRIMARY, targets=("c", "s"))
    stray = capture(Side.SHADOW, targets=("x",))
    found = {p.target: p.outcome for p in pair_up(primary, {"c": capture(Side.SHADOW), "x": stray}, DiffRules(), rule="r", request_id="id")}
    assert found == {"c": None, "s": Result.SHADOW_MISSING, "x": None}
    alone = pair_up(None, {"c": capture(Side.SHADOW)}, DiffRules(), rule="r", request_id="id")
    assert [p.outcome for p in alone] == [Result.PRIMARY_MISSING]


def test_the_secondary_differences_are_noise_by_definition() -> None:
    compared = pair(capture(Side.PRIMARY), capture(Side.SHADOW, body=b'{"v":2}'), "r", "s", "id", DiffRules())
    assert settle(compared, Rates(1, {"body.v": 1}), None, 0.05, is_secondary=True) is Result.NOISE_ONLY
    assert settle(compared, Rates(1, {"body.v": 1}), None, 0.05, is_secondary=False) is Result.DIFFERS
