"""HTTPRoute manifest builders shared by the configuration tests: plain dicts
that ``dump`` turns into multi-document YAML text, as a user would write it."""

from __future__ import annotations

from typing import Any

import yaml

from extproc.config.manifest_yaml import ManifestDumper
from extproc.config.manifests import parse_manifests
from extproc.core.policy import Route

API = "gateway.networking.k8s.io/v1"


def httproute(
    *rules: dict[str, Any],
    name: str = "web",
    namespace: str | None = "team-a",
    api: str = API,
    annotations: dict[str, Any] | None = None,
    created: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An HTTPRoute document; ``spec`` fields (hostnames, parentRefs...) as given."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations is not None:
        meta["annotations"] = annotations
    if created is not None:
        meta["creationTimestamp"] = created
    return {"apiVersion": api, "kind": "HTTPRoute", "metadata": meta, "spec": {**spec, "rules": list(rules)}}


def mirror(backend: str = "shadow", **fields: Any) -> dict[str, Any]:
    """A RequestMirror filter to ``backend`` port 8080 (``percent=10``, ``fraction={...}``)."""
    return {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": backend, "port": 8080}, **fields}}


def dump(*docs: dict[str, Any] | str) -> str:
    """Documents (dicts, or YAML text as written) as one multi-document text."""
    return "---\n".join(d if isinstance(d, str) else yaml.dump(d, Dumper=ManifestDumper, sort_keys=False) for d in docs)


def routes_and_problems(text: str, source: str, slots: int = 2) -> tuple[list[Route], list[str]]:
    result = parse_manifests(text, source, slots)
    assert all(isinstance(p, str) and p for p in result.problems)
    return result.routes, result.problems
