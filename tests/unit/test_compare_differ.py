"""The JSON, header and status differ and its paths (pure; hypothesis properties)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.compare.differ import ABSENT, MAX_DEPTH, MAX_FIELDS, DiffRules, Side, diff, diff_bodies, diff_headers, diff_json
from extproc.compare.paths import ANY_MANY, ANY_ONE, Matcher, Pattern, PatternError, Segment, parse, render

keys = st.text(min_size=1, max_size=8)
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)
)
documents = st.recursive(
    leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=20
)


def leaf_paths(doc: Any, path: tuple[Segment, ...] = ("body",)) -> list[tuple[Segment, ...]]:
    if isinstance(doc, dict) and doc:
        return [p for k, v in doc.items() for p in leaf_paths(v, (*path, k))]
    if isinstance(doc, list) and doc:
        return [p for i, v in enumerate(doc) for p in leaf_paths(v, (*path, i))]
    return [path]


def replaced(doc: Any, path: tuple[Segment, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    node = copy
    for seg in path[:-1]:
        node = node[seg]
    node[path[-1]] = value
    return copy


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def same_json_value(a: Any, b: Any) -> bool:
    """One JSON value: numbers by value (0 and 0.0, -0.0 and 0.0 are one number), the
    rest by type and value (true is not 1)."""
    if is_number(a) and is_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


@given(documents)
def test_a_document_compared_with_itself_is_the_same(doc: Any) -> None:
    assert diff_json(doc, json.loads(json.dumps(doc)), DiffRules()) == []
    body = json.dumps(doc).encode()
    assert diff(Side(200, [("a", "1")], body), Side(200, [("a", "1")], body), DiffRules()).same


@given(documents, st.data())
def test_one_changed_leaf_is_reported_at_its_path_and_nowhere_else(doc: Any, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(leaf_paths(doc)))
    old = doc
    for seg in path[1:]:
        old = old[seg]
    new = data.draw(leaves.filter(lambda v: not same_json_value(v, old)))
    changed = replaced({"root": doc}, ("root", *path[1:]), new)["root"] if len(path) > 1 else new
    found = diff_json(doc, changed, DiffRules())
    assert [f.path for f in found] == [render(path)]


@given(documents, st.data())
def test_ignore_rules_remove_exactly_their_paths(doc: Any, data: st.DataObject) -> None:
    other = data.draw(documents)
    everything = diff_json(doc, other, DiffRules())
    if not everything:
        return
    chosen = data.draw(st.sampled_from(everything))
    pattern = Pattern.of(chosen.path)
    kept = diff_json(doc, other, DiffRules(ignored=(pattern,)))
    assert [f for f in everything if f.path != chosen.path] == kept


@given(st.lists(st.one_of(keys, st.integers(0, 50)), max_size=5))
def test_paths_read_back_as_written(segments: list[Segment]) -> None:
    path = ("body", *segments)
    assert parse(render(path)) == path


@given(st.floats(-1e6, 1e6), st.floats(0, 1))
def test_numbers_within_the_tolerance_are_the_same(x: float, delta: float) -> None:
    assert diff_json({"n": x}, {"n": x + delta / 2}, DiffRules(tolerance=delta)) == [] or delta == 0


def test_a_number_off_by_more_than_the_tolerance_differs() -> None:
    assert [f.path for f in diff_json({"n": 1.0}, {"n": 1.2}, DiffRules(tolerance=0.1))] == ["body.n"]
    assert diff_json({"n": 1}, {"n": 1.0}, DiffRules()) == []
    assert [f.path for f in diff_json({"n": 1}, {"n": True}, DiffRules())] == ["body.n"], "true is not 1"


def test_arrays_compare_by_index_and_name_missing_elements() -> None:
    found = diff_json({"a": [1, 2, 3]}, {"a": [1, 5]}, DiffRules())
    assert [(f.path, f.primary, f.shadow) for f in found] == [("body.a[1]", "2", "5"), ("body.a[2]", "3", ABSENT)]


def test_wildcards_ignore_every_match_and_everything_below() -> None:
    p = {"items": [{"id": 1, "at": {"t": 1}}, {"id": 2, "at": {"t": 2}}], "meta": {"deep": {"ts": 1}}}
    s = {"items": [{"id": 9, "at": {"t": 3}}, {"id": 8, "at": {"t": 4}}], "meta": {"deep": {"ts": 2}}}
    rules = DiffRules(ignored=(Pattern.of("body.items[*].at"), Pattern.of("body.**.ts")))
    assert [f.path for f in diff_json(p, s, rules)] == ["body.items[0].id", "body.items[1].id"]


def test_keys_that_are_not_identifiers_are_quoted() -> None:
    found = diff_json({"a b": 1, "*": 1}, {"a b": 2, "*": 2}, DiffRules(ignored=(Pattern.of("body.*"),)))
    assert found == [], "body.* is a wildcard"
    found = diff_json({"a b": 1, "*": 1}, {"a b": 2, "*": 2}, DiffRules(ignored=(Pattern.of('body["*"]'),)))
    assert [f.path for f in found] == ['body["a b"]'], 'body["*"] is the key named *, not a wildcard'


def test_bodies_that_are_not_json_compare_by_digest() -> None:
    found = diff_bodies(b"<html>1</html>", b"<html>2</html>", DiffRules())
    assert [f.path for f in found] == ["body"] and found[0].primary.startswith("sha256:")
    assert diff_bodies(b"same", b"same", DiffRules()) == []
    assert [f.path for f in diff_bodies(b'{"a":1}', b'{"a":2', DiffRules())] == ["body"], "one side not JSON: digest"


def test_a_body_cut_at_the_bound_is_compared_by_digest() -> None:
    assert [f.path for f in diff_bodies(b'{"a":1}', b'{"a":2}', DiffRules(), truncated=True)] == ["body"]


def test_headers_ignore_the_default_set_and_the_users() -> None:
    primary = [("Date", "x"), ("Server", "a"), ("ETag", "1"), ("X-Trace", "1"), ("Vary", "a")]
    shadow = [("date", "y"), ("server", "b"), ("etag", "2"), ("x-trace", "2"), ("vary", "a"), ("x-new", "1")]
    rules = DiffRules(ignored=(Pattern.of("header.x-trace"),))
    assert [(f.path, f.primary, f.shadow) for f in diff_headers(primary, shadow, rules)] == [
        ("header.etag", "1", "2"),
        ("header.x-new", ABSENT, "1"),
    ]


def test_status_is_a_field() -> None:
    assert diff(Side(200), Side(503), DiffRules()).paths == ("status",)
    assert diff(Side(200), Side(503), DiffRules(ignored=(Pattern.of("status"),))).same


@pytest.mark.parametrize("text", ["bodyx", "cookie.a", "body.", "body[x]", "header.a.b", "header.**", "status.a", 'body["open'])
def test_bad_patterns_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(PatternError, match=r"body|header|status|position"):
        Pattern.of(text)


# ---------------------------------------------------------------------------
# Bounds: what a hostile or odd pair costs, and that it never raises


pattern_segments = st.lists(st.one_of(st.sampled_from(["a", "b"]), st.integers(0, 2), st.just(ANY_ONE), st.just(ANY_MANY)), max_size=5)
path_segments = st.lists(st.one_of(st.sampled_from(["a", "b"]), st.integers(0, 2)), max_size=6)


@given(st.lists(pattern_segments, max_size=3), path_segments)
def test_matching_step_by_step_agrees_with_matching_the_whole_path(patterns: list[list[Segment]], path: list[Segment]) -> None:
    chosen = tuple(Pattern(("body", *segments)) for segments in patterns)
    matcher = Matcher(chosen)
    matching = matcher.step(matcher.start(), "body")
    for segment in path:
        assert isinstance(segment, str | int)
        matching = matcher.step(matching, segment)
    assert matcher.accepts(matching) == any(p.matches(("body", *path)) for p in chosen)


def test_a_body_nested_past_the_parsers_depth_is_compared_by_digest() -> None:
    deep = b"[" * 3000 + b"]" * 3000
    assert [f.path for f in diff_bodies(deep, deep.replace(b"[]", b"[1]"), DiffRules())] == ["body"]


def test_an_integer_past_any_float_is_not_within_a_tolerance_of_a_float() -> None:
    found = diff_json({"n": 10**400}, {"n": 1.0}, DiffRules(tolerance=0.5))
    assert [f.path for f in found] == ["body.n"]


def test_nesting_past_the_depth_bound_is_one_field_compared_whole() -> None:
    def nested(leaf: Any, depth: int) -> Any:
        for _ in range(depth):
            leaf = {"a": leaf}
        return leaf

    at = render(("body", *["a"] * MAX_DEPTH))
    assert diff_json(nested([1, 2], 400), nested([1, 2], 400), DiffRules()) == []
    assert [f.path for f in diff_json(nested([1, 2], 400), nested([1, 3], 400), DiffRules())] == [at]
    within = MAX_DEPTH - 1  # the last level walked: its leaves are fields of their own
    found = diff_json(nested([1, 2], within), nested([1, 3], within), DiffRules())
    assert [f.path for f in found] == [render(("body", *["a"] * within, 1))]
    ordered = nested({"x": 1, "y": 2}, 100)
    assert diff_json(ordered, nested({"y": 2, "x": 1}, 100), DiffRules()) == [], "keys in any order, below the bound too"


def test_a_body_with_more_differing_fields_than_the_bound_is_one_field_by_digest() -> None:
    primary = json.dumps(list(range(MAX_FIELDS + 1))).encode()
    shadow = json.dumps([n + 1 for n in range(MAX_FIELDS + 1)]).encode()
    found = diff_bodies(primary, shadow, DiffRules())
    assert [f.path for f in found] == ["body"] and found[0].primary.startswith("sha256:")
    at_bound = json.dumps([n + 1 if n < MAX_FIELDS else n for n in range(MAX_FIELDS + 1)]).encode()
    assert len(diff_bodies(primary, at_bound, DiffRules())) == MAX_FIELDS, "at the bound: every field"
