"""The slot headers (core.slots) and the variant layout over them (core.variants)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config.errors import ConfigError
from extproc.config.settings import OPTIONS, Settings, load_slot_headers, slot_environment
from extproc.core.slots import DEFAULT_SLOT_HEADERS, MAX_COUNT, MIN_COUNT, SlotHeaders, SlotHeadersError
from extproc.core.variants import rule_layout

counts = st.integers(MIN_COUNT, MAX_COUNT)
prefixes = st.sampled_from(["x-mirror-cluster-", "x-shadow-", "x-s"])


def test_defaults_are_the_documented_ones() -> None:
    assert DEFAULT_SLOT_HEADERS.names == ("x-mirror-cluster-0", "x-mirror-cluster-1")
    assert DEFAULT_SLOT_HEADERS.reserved == ("x-mirror-cluster-0", "x-mirror-cluster-1", "x-mirror-rule")
    # The option table's defaults are the value object's.
    defaults = {o.name: o.default for o in OPTIONS}
    assert (defaults["slot_prefix"], defaults["slots"], defaults["marker_header"]) == ("x-mirror-cluster-", "2", "x-mirror-rule")
    assert Settings.load({"MIRROR_BACKEND": "shadow"}).slot_headers == DEFAULT_SLOT_HEADERS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"count": 0}, "count"),
        ({"count": MAX_COUNT + 1}, "count"),
        ({"count": True}, "count"),
        ({"prefix": "X-Shadow-"}, "prefix"),
        ({"prefix": "x-envoy-"}, "prefix"),
        ({"marker": "host"}, "marker"),
        ({"marker": "x-mirror-cluster-1"}, "marker"),
    ],
)
def test_slot_headers_that_cannot_work_are_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SlotHeadersError) as e:
        SlotHeaders(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field


@given(prefixes, counts, st.sampled_from(["x-mirror-rule", "x-by"]))
def test_settings_and_the_environment_they_write_agree(prefix: str, count: int, marker: str) -> None:
    headers = SlotHeaders(prefix, count, marker)
    assert headers.names == tuple(f"{prefix}{i}" for i in range(count))
    environ = slot_environment(headers)
    # Only what differs from the defaults, and it reads back as the same headers.
    assert all(v != o.default for o in OPTIONS for k, v in environ.items() if o.env == k)
    assert load_slot_headers(environ) == headers
    assert Settings.load({"MIRROR_BACKEND": "shadow", **environ}).slot_headers == headers


def test_load_slot_headers_names_the_variable_at_fault() -> None:
    with pytest.raises(ConfigError) as e:
        load_slot_headers({"MIRROR_MARKER_HEADER": "x-mirror-cluster-0"})
    assert e.value.problems[0].startswith("MIRROR_MARKER_HEADER: 'x-mirror-cluster-0' is also a slot header")
    with pytest.raises(ConfigError) as e:
        load_slot_headers({}, {"slots": "9"})
    assert e.value.problems[0].startswith("--slots: must be an integer 1..8")


@given(st.integers(0, MAX_COUNT), counts)
def test_layout_is_every_nonempty_set_largest_first_then_the_plain_route(n: int, extra: int) -> None:
    headers = SlotHeaders(count=min(MAX_COUNT, n + extra) if n else extra)
    targets = [f"backend-{i}" for i in range(n)]
    layout = rule_layout(targets, str.upper, headers)
    *variants, plain = layout
    assert plain.is_plain and not plain.matches and not plain.absent and not plain.slots
    assert len(variants) == 2**n - 1
    assert [v.slots for v in variants] == [c for size in range(n, 0, -1) for c in itertools.combinations(range(n), size)]
    for v in variants:
        assert not v.is_plain
        assert v.targets == tuple(targets[i] for i in v.slots)
        assert v.matches == tuple((headers.names[i], targets[i].upper()) for i in v.slots)
        assert v.tokens == tuple(t.upper() for t in v.targets)
        # The rule's other slots, and only the rule's: a slot no target uses is never matched.
        assert set(v.absent) == {headers.names[i] for i in range(n)} - {name for name, _ in v.matches}


def test_layout_refuses_more_targets_than_slots() -> None:
    with pytest.raises(ValueError, match="3 mirror targets but only 2 slot headers"):
        rule_layout(["a", "b", "c"], str, DEFAULT_SLOT_HEADERS)
