"""Plain scalars read as kubectl's go-yaml v2 reads them (extproc/config/manifest_yaml.py)."""

from __future__ import annotations

import contextlib
import math
import textwrap

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from extproc.config.manifest_yaml import ManifestDumper, ManifestLoader
from extproc.config.manifests import parse_manifests


def _read(plain: str) -> object:
    return yaml.load(f"v: {plain}\n", Loader=ManifestLoader)["v"]


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        # PyYAML reads these as text; go-yaml does not.
        ("y", True),
        ("Y", True),
        ("n", False),
        ("N", False),
        ("1e3", 1000.0),
        ("1E+3", 1000.0),
        ("0B11", 3),
        ("0o17", 15),
        ("08", 8.0),
        ("1.", 1.0),
        ("9223372036854775807", 2**63 - 1),
        ("18446744073709551616", float(2**64)),  # past uint64: a float, as strconv gives
        # PyYAML reads sexagesimal numbers; go-yaml reads text.
        ("1:20", "1:20"),
        ("1:20.5", "1:20.5"),
        # The same for both.
        ("yes", True),
        ("off", False),
        ("017", 15),
        ("0x1F", 31),
        ("1_000", 1000),
        ("-.inf", -math.inf),
        ("~", None),
        ("null", None),
        ("web", "web"),
        ("2026-01-02", "2026-01-02"),  # timestamps stay text (the parser reports them by field)
        ("'y'", "y"),
        ('"1e3"', "1e3"),
    ],
)
def test_a_plain_scalar_means_what_it_means_to_kubectl(plain: str, value: object) -> None:
    got = _read(plain)
    assert got == value and type(got) is type(value), (plain, got)


@given(st.text(alphabet="0123456789abcdefxXoObB_+-.eE:", min_size=1, max_size=12))
def test_any_numeric_looking_scalar_loads_without_error(plain: str) -> None:
    # Whatever the resolver calls a number, the constructor can build: no ValueError escapes.
    with contextlib.suppress(yaml.YAMLError):
        _read(plain)


def test_a_header_value_y_is_refused_like_the_api_server_refuses_it() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r, namespace: default}
        spec:
          parentRefs: [{name: gw}]
          rules:
          - matches: [{headers: [{name: x-h, value: y}]}]
            backendRefs: [{name: web, port: 80}]
        """
    )
    (problem,) = parse_manifests(text, "routes.yaml").problems
    assert "value" in problem and "string" in problem, problem
    assert parse_manifests(text.replace("value: y", "value: 'y'"), "routes.yaml").problems == []


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.sampled_from(["y", "N", "1e3", "1:20", "08", "0B1", ".inf", "~", "off", "2026-01-02"]),
)
_documents = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4))


@given(_documents)
def test_what_the_manifest_dumper_writes_kubectl_reads_back_unchanged(document: object) -> None:
    # The converters write with it: a string kubectl would read as a boolean or a number is quoted.
    text = yaml.dump({"v": document}, Dumper=ManifestDumper)
    assert yaml.load(text, Loader=ManifestLoader) == {"v": document}
