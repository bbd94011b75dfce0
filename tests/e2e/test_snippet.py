"""End to end: `envoy-config --snippet` without spec.compare, pasted into an
existing Envoy's configuration where its comment says, for every engine (the
sampler's ext_proc, inline Lua, the dynamic module on Envoy 1.40, and on 1.39 when
MIRROR_TEST_ENVOY_1_39 names its binary). The snippet with the capture points runs
in tests/e2e/test_compare_inline.py; this is the one most users paste.

The proofs: each backend's exact count for a fixed key set (the keys' own
decisions), a rule mirroring to 100%, and forged slot headers mirroring nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.envoy.module import render_module
from extproc.envoy.render import render
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.envoy import EnvoyProcess
from tests.e2e.test_compare import KEYS, KINDS, VersionedServer, ingress_port, mirrored, started
from tests.e2e.test_compare_inline import ENGINES, FORGED, engine_topology, pasted
from tests.support.harness import Client, settle

__all__ = ["started"]  # the fixture

pytestmark = pytest.mark.e2e

SAMPLER = pytest.param("sampler", "", id="sampler")


@pytest.mark.parametrize(("engine", "binary"), [SAMPLER, *ENGINES])
def test_the_plain_snippet_pasted_into_an_existing_envoy_mirrors_exactly_the_sampled_requests(
    tmp_path: Path, started: list[Any], engine: str, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if binary:
        monkeypatch.setattr(envoy_stack, "envoy_binary", lambda: binary)
    backends = {name: VersionedServer(1) for name in ("primary", "candidate", "secondary")}
    started.extend(backends.values())
    ports = {name: server.port for name, server in backends.items()}
    policy, topology = engine_topology(tmp_path, started, ports, engine)
    if engine == "module":
        text = render_module(policy, topology, module_for(envoy_stack.envoy_binary()), snippet_only=True)
    else:
        text = render(policy, topology, snippet_only=True)
    assert "access_log" not in text and "listeners" not in text, "without spec.compare: no capture points"
    (tmp_path / "envoy.yaml").write_text(pasted(text, policy, ports))
    envoy = EnvoyProcess(tmp_path / "envoy.yaml", tmp_path).start()
    started.append(envoy)

    client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
    sent = [f"{key}-{kind}" for key in KEYS for kind in KINDS]
    for rid in sent:
        assert client.request(f"/api/{rid}", "shop.example", {"x-request-id": rid})[0] == 200
    for key in KEYS[:10]:
        assert client.request(f"/other/{key}", "shop.example", {"x-request-id": f"{key}-other"})[0] == 200
    # Forged slot headers mirror nothing a key would not have mirrored.
    forged = [f"{key}-forged" for key in KEYS if not mirrored(f"{key}-forged")][:10]
    assert len(forged) == 10
    for rid in forged:
        assert client.request(f"/api/{rid}", "shop.example", {"x-request-id": rid, **FORGED})[0] == 200
    client.close()

    expected = sum(mirrored(rid) for rid in sent)
    assert 0 < expected < len(sent), "the key set must have mirrored and unmirrored requests"
    want = {"primary": len(sent) + 10 + len(forged), "candidate": expected + 10, "secondary": expected}
    assert settle(envoy, want) == want
