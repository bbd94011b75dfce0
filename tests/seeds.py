"""The seed manifests in ../shared/seeds/: extracted from their markdown."""

from __future__ import annotations

import re
from pathlib import Path

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
EG_SEED = "envoy-gateway-http-request-mirroring.md"
GEP_SEED = "gep-3171-percentage-request-mirroring.md"
CONFORMANCE = Path(__file__).resolve().parent / "manifests" / "conformance-percentage-mirror.yaml"

_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_HEREDOC = re.compile(r"<<-?[ \t]*(['\"]?)(\w+)\1[^\n]*\n(.*?)^[ \t]*\2[ \t]*$", re.M | re.S)
_KIND_HTTPROUTE = re.compile(r"^kind:[ \t]*HTTPRoute[ \t]*$", re.M)


def yaml_blocks(markdown: str) -> list[str]:
    """Bodies of fenced code blocks; for shell blocks, the bodies of their heredocs."""
    out: list[str] = []
    for block in _FENCE.findall(markdown):
        heredocs = _HEREDOC.findall(block)
        if heredocs:
            out.extend(body for _, _, body in heredocs)
        else:
            out.append(block)
    return out


def httproute_manifests(markdown: str) -> list[str]:
    return [b for b in yaml_blocks(markdown) if _KIND_HTTPROUTE.search(b)]


def seed_text(name: str) -> str:
    path = SEEDS / name
    assert path.is_file(), f"seed file missing: {path}"
    return path.read_text(encoding="utf-8")
