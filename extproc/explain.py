"""Why a request is (not) mirrored: the decision spelled out (pure)."""

from __future__ import annotations

from typing import Any, Sequence

from .policy import Policy


def request_headers(
    headers: Sequence[tuple[str, str]] = (),
    cookies: Sequence[tuple[str, str]] = (),
    path: str = "/",
    host: str = "",
    method: str = "GET",
) -> dict[str, bytes]:
    """The header mapping Envoy would send for these request attributes."""
    out: dict[str, bytes] = {":method": method.upper().encode(), ":path": path.encode()}
    if host:
        out[":authority"] = host.encode()
    for name, value in headers:
        out.setdefault(name.lower(), value.encode("utf-8", "surrogateescape"))
    if cookies:
        jar = "; ".join(f"{k}={v}" for k, v in cookies).encode()
        out["cookie"] = out["cookie"] + b"; " + jar if "cookie" in out else jar
    return out


def explain(policy: Policy, headers: dict[str, bytes]) -> dict[str, Any]:
    d = policy.decide(headers)
    return {
        "rule": None if d.rule is None else d.rule.id,
        "key_chain": [str(s) for s in policy.key_chain],
        "salt": policy.salt.decode("utf-8", "backslashreplace"),
        "key_source": None if d.source is None else str(d.source),
        "key": None if d.key is None else d.key.decode("utf-8", "backslashreplace"),
        "u": d.u,
        "targets": [
            {
                "backend": t.target.backend,
                "slot": policy.slot_names[t.target.slot],
                "fraction": str(t.target.fraction),
                "threshold": t.target.threshold,
                "decision": t.outcome.value,
            }
            for t in d.targets
        ],
    }


def render_text(result: dict[str, Any]) -> str:
    if result["rule"] is None:
        return "no rule matches this request: not mirrored"
    lines = [f"rule: {result['rule']}"]
    if not result["targets"]:
        return "\n".join(lines + ["  no RequestMirror filter: not mirrored"])
    if result["key_source"] is None:
        lines.append(f"key: none of {', '.join(result['key_chain'])} is present: not mirrored (no_key)")
    else:
        lines.append(f"key source: {result['key_source']}")
        lines.append(f"key: {result['key']!r}")
        lines.append(f"u: {result['u']}")
    for t in result["targets"]:
        lines.append(
            f"  {t['backend']} ({t['slot']}) fraction {t['fraction']} threshold {t['threshold']}: {t['decision']}"
        )
    return "\n".join(lines)
