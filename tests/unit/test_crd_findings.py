"""What kubectl-validate with the Gateway API CRD refused and the strict
parser accepted (tests/owners/test_crd_differential.py found them): a name
twice in a list the CRD declares a set, a rule name outside the CRD's
pattern. Pure: the parser only."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from extproc.config.manifests import parse_manifests


def route(rule: dict[str, Any]) -> str:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "team-a"},
        "spec": {"rules": [{"backendRefs": [{"name": "web", "port": 80}], **rule}]},
    }
    return yaml.safe_dump(doc)


def problems(rule: dict[str, Any]) -> list[str]:
    return parse_manifests(route(rule), "routes.yaml").problems


def modifier(**spec: Any) -> dict[str, Any]:
    return {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": spec}]}


def test_a_header_removed_twice_is_refused_as_by_the_crd() -> None:
    (problem,) = problems(modifier(remove=["x-debug", "x-debug"]))
    assert problem.endswith(
        "spec.rules[0].filters[0].requestHeaderModifier.remove[1]: Duplicate value: 'x-debug' (the CRD's list is a set)"
    )


def test_a_set_compares_exact_values() -> None:
    assert problems(modifier(remove=["x-debug", "X-Debug"])) == []


def test_a_set_in_a_field_the_sampler_ignores_is_checked_too() -> None:
    cors = {"type": "CORS", "cors": {"allowOrigins": ["https://a.example", "https://a.example"]}}
    (problem,) = problems({"filters": [cors]})
    assert "spec.rules[0].filters[0].cors.allowOrigins[1]: Duplicate value" in problem


@pytest.mark.parametrize("name", ["Checkout", "check_out", "-a", "a."])
def test_a_rule_name_outside_the_crd_pattern_is_refused(name: str) -> None:
    (problem,) = problems({"name": name})
    assert "spec.rules[0].name: must match ^" in problem and repr(name) in problem


@pytest.mark.parametrize("name", ["checkout", "a.b-c", "0"])
def test_rule_names_the_crd_accepts_are_accepted(name: str) -> None:
    assert problems({"name": name}) == []
