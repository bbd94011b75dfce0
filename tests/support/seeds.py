"""The seed documents in tests/data/seeds/: their manifests, extracted from the markdown."""

from __future__ import annotations

import re

from .paths import SEEDS

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
