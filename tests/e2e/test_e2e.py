"""End to end: a real Envoy, real sampler processes, echo backends, real sockets.

Each gateway is what `mirror-sampler up` runs, on loopback ports chosen at
run time. Mirror counts come from Envoy's admin /stats
(``cluster.<name>.upstream_rq_total`` counts shadow requests too) and from
what the echo backends log having received.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.plan import Plan
from extproc.core.sampling import Fraction, decide
from extproc.server.metrics import Metrics
from extproc.server.servicer import ProcessStream, Servicer
from extproc.server.transports import TRANSPORTS
from extproc.stack.up import LocalStack
from tests.support.harness import KEYS, Client, echoed, echoed_after, expected_count, received, request_ids, settle, start_stack
from tests.support.inprocess import BackgroundServer
from tests.support.paths import CONFORMANCE
from tests.support.procs import scrape, wait_until
from tests.support.seeds import httproute_manifests, seed_text

pytestmark = pytest.mark.e2e

# Each transport's contract is proven in tests/service; end to end, each one
# serves the conformance route (exact counts), names the matched rule on its
# streams and is found again by Envoy when restarted on its port (sampler
# down), and test_faults.py drains and times out on each. The other tests
# here are about Envoy, the policy and reloads, on the default transport.


# --------------------------------------------------------------------------
# The seed walkthrough (Envoy Gateway's mirroring guide, unchanged)


def eg_route(index: int) -> str:
    return httproute_manifests(seed_text("envoy-gateway-http-request-mirroring.md"))[index]


def test_seed_walkthrough(tmp_path: Path, stacks: list[LocalStack]) -> None:
    gw = start_stack(tmp_path, eg_route(0))
    stacks.append(gw)
    client = Client(gw.url)
    status, doc = client.request("/get", "backends.example", {"x-request-id": "walkthrough-1"})
    assert status == 200
    assert doc["pod"] == "backend" and doc["path"] == "/get" and doc["host"] == "backends.example"
    assert doc["namespace"] == "default" and "service" in doc and "ingress" in doc
    assert settle(gw, {"backend-2": 1}) == {"backend-2": 1}
    # Both backends log the request the way the guide shows.
    for name in ("backend", "backend-2"):
        gw.backends[name].wait_line(lambda s: s.startswith("Echoing back request made to /get to client (127.0.0.1:"), timeout=5)
    (mirror,) = echoed(gw, "backend-2")
    (primary,) = echoed(gw, "backend")
    # The mirrored copy: marker naming the rule, the original Host (no -shadow
    # suffix), and no slot header; the primary sees neither.
    assert mirror["headers"]["X-Mirror-Rule"] == ["default/http-mirror/0"]
    assert mirror["host"] == "backends.example"
    assert mirror["headers"]["X-Request-Id"] == ["walkthrough-1"]
    for doc_ in (mirror, primary):
        assert not any(h.lower().startswith("x-mirror-cluster") for h in doc_["headers"])
    assert "X-Mirror-Rule" not in primary["headers"]
    client.close()


def test_multiple_backend_refs_split_as_without_mirroring(tmp_path: Path, stacks: list[LocalStack]) -> None:
    gw = start_stack(tmp_path, eg_route(1))
    stacks.append(gw)
    client = Client(gw.url)
    n = 400
    for i in range(n):
        assert client.request("/get", "backends.example", {"x-request-id": f"split-{i}"})[0] == 200
    got = settle(gw, {"backend-2": n})
    # The mirror filter has no percentage: every request is mirrored.
    assert got == {"backend-2": n}
    primary, third = received(gw, "backend"), received(gw, "backend-3")
    assert primary + third == n
    # Envoy picks weighted clusters at random: 50/50 within five standard deviations.
    sd = (n * 0.25) ** 0.5
    assert abs(primary - n / 2) <= 5 * sd, (primary, third)
    client.close()


# --------------------------------------------------------------------------
# The conformance route: exact counts for fixed keys


@pytest.fixture(scope="module", params=[*TRANSPORTS, "inline"])
def conformance(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    """The conformance route served every way: the sampler over ext_proc on
    each transport, and the same policy decided in Envoy by the generated Lua."""
    inline = request.param == "inline"
    tmp = tmp_path_factory.mktemp("conformance")
    gw = start_stack(tmp, CONFORMANCE.read_text(), inline=inline, transport=None if inline else request.param)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.parametrize(
    "path, fractions",
    [
        ("/percent-mirror", {"infra-backend-v2": Fraction(20)}),
        ("/percent-mirror-fraction", {"infra-backend-v2": Fraction(25, 50)}),
        ("/percent-multi-mirror-and-modify-headers", {"infra-backend-v2": Fraction(35), "infra-backend-v3": Fraction(50)}),
    ],
)
def test_mirror_counts_equal_the_decision_function(conformance: LocalStack, path: str, fractions: dict[str, Fraction]) -> None:
    gw = conformance
    before = {c: received(gw, c) for c in fractions}
    client = Client(gw.url)
    for key in KEYS:
        assert client.request(path, "conformance.example", {"x-request-id": key})[0] == 200
    expected = {c: before[c] + expected_count(f, KEYS) for c, f in fractions.items()}
    assert 0 < expected_count(next(iter(fractions.values())), KEYS) < len(KEYS)
    assert settle(gw, expected) == expected
    client.close()


def test_a_sampled_key_is_sampled_every_time(conformance: LocalStack) -> None:
    gw = conformance
    sampled = [k for k in KEYS[:40] if decide(b"", k.encode(), Fraction(20))]
    before = len(echoed(gw, "infra-backend-v2"))
    count = received(gw, "infra-backend-v2")
    client = Client(gw.url)
    for _ in range(3):
        for key in KEYS[:40]:
            client.request("/percent-mirror/again", "h", {"x-request-id": f"{key}"})
    settle(gw, {"infra-backend-v2": count + 3 * len(sampled)})
    ids = request_ids(echoed_after(gw, "infra-backend-v2", before, received(gw, "infra-backend-v2") - count))
    assert sorted(ids) == sorted(sampled * 3)
    client.close()


def test_client_supplied_slot_headers_never_mirror(conformance: LocalStack) -> None:
    gw = conformance
    unsampled = [k for k in KEYS if not decide(b"", k.encode(), Fraction(20))][:20]
    before = received(gw, "infra-backend-v2")
    client = Client(gw.url)
    forgeries = [
        {"x-mirror-cluster-0": "infra-backend-v2"},
        {"X-Mirror-Cluster-0": "infra-backend-v2", "X-MIRROR-CLUSTER-1": "infra-backend-v3"},
        {"x-mirror-cluster-1": "infra-backend-v2", "x-mirror-rule": "forged"},
    ]
    for key in unsampled:
        for forged in forgeries:
            status, doc = client.request("/percent-mirror", "h", {"x-request-id": key, **forged})
            assert status == 200
            assert not any(h.lower().startswith("x-mirror") for h in doc["headers"]), doc["headers"]
    assert settle(gw, {"infra-backend-v2": before}) == {"infra-backend-v2": before}
    client.close()


def test_a_64k_body_reaches_the_mirror_intact(conformance: LocalStack) -> None:
    gw = conformance
    key = next(k for k in KEYS if decide(b"", k.encode(), Fraction(20)))
    body = os.urandom(64 * 1024)
    before = len(echoed(gw, "infra-backend-v2"))
    client = Client(gw.url)
    status, doc = client.request(
        "/percent-mirror/upload", "h", {"x-request-id": key, "content-type": "application/octet-stream"}, "POST", body
    )
    assert status == 200 and doc["bodyLength"] == len(body)
    wait_until(lambda: len(echoed(gw, "infra-backend-v2")) > before, 10, "the upload's mirror at infra-backend-v2")
    (mirror,) = echoed(gw, "infra-backend-v2")[before:]
    assert mirror["method"] == "POST"
    assert mirror["bodyLength"] == len(body)
    assert mirror["bodySha256"] == hashlib.sha256(body).hexdigest()
    client.close()


def test_request_header_modifier_applies_to_primary(conformance: LocalStack) -> None:
    client = Client(conformance.url)
    status, doc = client.request(
        "/percent-multi-mirror-and-modify-headers", "h", {"x-request-id": "hm", "X-Header-Remove": "gone", "X-Header-Set": "old"}
    )
    assert status == 200
    assert doc["headers"]["X-Header-Set"] == ["set-overwrites-values"]
    assert doc["headers"]["X-Header-Add"] == ["header-val-1"]
    assert "X-Header-Remove" not in doc["headers"]
    client.close()


# --------------------------------------------------------------------------
# Sampler down, restarted, doubled; live reload


def test_sampler_down_fails_open_and_forged_headers_still_do_nothing(tmp_path: Path, stacks: list[LocalStack], transport: str) -> None:
    gw = start_stack(tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100"}, transport=transport)
    stacks.append(gw)
    client = Client(gw.url)
    assert client.request("/", "any", {"x-request-id": "k"})[0] == 200
    assert settle(gw, {"shadow": 1}) == {"shadow": 1}
    sampler = gw.samplers[0]
    assert sampler is not None
    sampler.stop()
    for i in range(30):
        forged = {"x-mirror-cluster-0": "shadow"} if i % 2 else {"X-Mirror-Cluster-0": "shadow", "x-mirror-rule": "simple"}
        status, doc = client.request(f"/down/{i}", "any", {"x-request-id": f"down-{i}", **forged})
        assert status == 200, doc
        assert not any(h.lower().startswith("x-mirror") for h in doc["headers"])
    assert settle(gw, {"shadow": 1}) == {"shadow": 1}
    # Envoy saw every one of those ext_proc streams fail and let the request through.
    assert gw.stat("http.ingress_http.ext_proc.failure_mode_allowed") >= 30
    # Back up on the same port: mirroring resumes by itself. Envoy may still
    # fail a stream or two on its way back to the sampler (fail-open: no
    # mirror), so requests are sent until one is mirrored, within a bound.
    gw.start_sampler(0)
    gw.wait_samplers_healthy()
    sent = itertools.count()

    def mirrored_again() -> bool:
        assert client.request("/", "any", {"x-request-id": f"back-{next(sent)}"})[0] == 200
        return settle(gw, {"shadow": 2}, timeout=0.5)["shadow"] >= 2

    wait_until(mirrored_again, 20, "mirroring to resume once the sampler is back")
    client.close()


def test_decisions_survive_restart_and_agree_across_two_samplers(tmp_path: Path, stacks: list[LocalStack]) -> None:
    gw = start_stack(tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "30"}, samplers=2)
    stacks.append(gw)
    keys = KEYS[:60]
    sampled = sorted(k for k in keys if decide(b"", k.encode(), Fraction(30)))
    client = Client(gw.url)

    def round_of_requests() -> list[str]:
        before, count = len(echoed(gw, "shadow")), received(gw, "shadow")
        for key in keys:
            assert client.request("/", "any", {"x-request-id": key})[0] == 200
        settle(gw, {"shadow": count + len(sampled)})
        return sorted(request_ids(echoed_after(gw, "shadow", before, received(gw, "shadow") - count)))

    assert round_of_requests() == sampled
    # Both samplers answered some of those streams (Envoy balances between them).
    for sampler in gw.samplers:
        assert sampler is not None
        assert scrape(sampler.metrics_port, "mirror_sampler_streams_started_total") > 0
    gw.samplers[0].stop()  # type: ignore[union-attr]
    gw.start_sampler(0)
    gw.wait_samplers_healthy()
    assert round_of_requests() == sampled
    client.close()


def test_live_reload_changes_what_envoy_mirrors(tmp_path: Path, stacks: list[LocalStack]) -> None:
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route.replace("percent: 20", "percent: 0"))
    stacks.append(gw)
    envoy_pid = gw.envoy.pid  # type: ignore[union-attr]
    client = Client(gw.url)
    for key in KEYS[:40]:
        client.request("/percent-mirror", "h", {"x-request-id": key})
    assert settle(gw, {"infra-backend-v2": 0}) == {"infra-backend-v2": 0}
    (tmp_path / "routes.yaml").write_text(route)  # percent: 20
    sampler = gw.samplers[0]
    assert sampler is not None
    sampler.wait_event("reloaded", timeout=5)
    for key in KEYS[:40]:
        client.request("/percent-mirror", "h", {"x-request-id": key})
    want = expected_count(Fraction(20), KEYS[:40])
    assert want > 0
    assert settle(gw, {"infra-backend-v2": want}) == {"infra-backend-v2": want}
    assert gw.envoy.pid == envoy_pid and gw.envoy.alive()  # type: ignore[union-attr]
    client.close()


def test_inline_routes_reload_from_the_file_without_a_restart(tmp_path: Path, stacks: list[LocalStack]) -> None:
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route.replace("percent: 20", "percent: 0"), inline=True)
    stacks.append(gw)
    assert gw.samplers == []  # nothing but Envoy decides
    envoy_pid = gw.envoy.pid  # type: ignore[union-attr]
    client = Client(gw.url)
    for key in KEYS[:40]:
        client.request("/percent-mirror", "h", {"x-request-id": key})
    assert settle(gw, {"infra-backend-v2": 0}) == {"infra-backend-v2": 0}
    reloads = gw.routes_reloads()
    (tmp_path / "routes.yaml").write_text(route)  # percent: 20
    wait_until(lambda: gw.routes_reloads() > reloads, 10, "Envoy to load the edited inline routes")
    assert gw.routes_reloads() == reloads + 1
    # The keep-alive connection opened before the change is still usable.
    for key in KEYS[:40]:
        assert client.request("/percent-mirror", "h", {"x-request-id": key})[0] == 200
    want = expected_count(Fraction(20), KEYS[:40])
    assert settle(gw, {"infra-backend-v2": want}) == {"infra-backend-v2": want}
    assert gw.envoy.pid == envoy_pid and gw.envoy.alive()  # type: ignore[union-attr]
    # An invalid edit leaves the routes in force: once `up` has judged it
    # (the positive witness), Envoy has had no new routes.
    reloader = gw.reloader
    assert reloader is not None
    (tmp_path / "routes.yaml").write_text(route.replace("percent: 20", "percent: 120"))
    wait_until(lambda: reloader.outcomes["invalid"] == 1, 10, "the invalid edit to be judged")
    assert gw.routes_reloads() == reloads + 1
    # Files written next to the config are not the config; a change that does
    # not alter Envoy's routes is not a rejection (Envoy counted none).
    for i in range(10):
        (tmp_path / "up.log").write_text(f"{i}\n")
    (tmp_path / "routes.yaml").write_text(route + "\n# a comment changes no route\n")
    wait_until(lambda: reloader.outcomes["unchanged"] == 1, 10, "the unchanged edit to be judged")
    assert reloader.outcomes == {"reloaded": 1, "invalid": 1, "unchanged": 1}
    assert gw.stat("http.ingress_http.rds.mirror-sampler.update_rejected") == 0
    client.close()


def test_forged_slot_zero_on_the_two_mirror_rule_adds_nothing(conformance: LocalStack) -> None:
    """Keys the sampler sends to infra-backend-v3 (slot 1) but not to v2
    (slot 0): a forged slot 0 must not add the v2 mirror."""
    gw = conformance
    keys = [k for k in KEYS if decide(b"", k.encode(), Fraction(50)) and not decide(b"", k.encode(), Fraction(35))][:15]
    assert keys
    before = {c: received(gw, c) for c in ("infra-backend-v2", "infra-backend-v3")}
    client = Client(gw.url)
    for key in keys:
        status, _ = client.request(
            "/percent-multi-mirror-and-modify-headers", "h", {"x-request-id": key, "x-mirror-cluster-0": "infra-backend-v2"}
        )
        assert status == 200
    client.close()
    want = {"infra-backend-v2": before["infra-backend-v2"], "infra-backend-v3": before["infra-backend-v3"] + len(keys)}
    assert settle(gw, want) == want


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_envoy_names_the_matched_rule_on_each_stream(tmp_path: Path, stacks: list[LocalStack], transport: str) -> None:
    """The generated routes put the rule id on every ext_proc stream: a
    recording sampler on the real sampler's port sees what Envoy sends."""
    gw = start_stack(tmp_path, CONFORMANCE.read_text())
    stacks.append(gw)
    port = gw.sampler_ports[0]
    gw.samplers[0].stop()  # type: ignore[union-attr]
    seen: list[str | None] = []
    policy = build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)}), CONFORMANCE.read_text())

    class Recording(Servicer):
        def open_stream(self, rule_id: str | None) -> ProcessStream:
            seen.append(rule_id)
            return super().open_stream(rule_id)

    checks = gw.stat("cluster.mirror-sampler.health_check.success")
    plan = Plan(policy, Metrics())
    with BackgroundServer(Recording(lambda: plan, Metrics()), transport, port=port):
        # Envoy has checked the recording server's health at least once.
        wait_until(
            lambda: (
                gw.stat("cluster.mirror-sampler.health_check.success") > checks
                and gw.stat("cluster.mirror-sampler.membership_healthy") == 1
            ),
            10,
            "Envoy to see the recording sampler healthy",
        )
        client = Client(gw.url)
        for path in ("/percent-mirror", "/percent-mirror-fraction/x", "/percent-multi-mirror-and-modify-headers"):
            assert client.request(path, "h", {"x-request-id": "alice"})[0] == 200
        client.close()
        assert seen == [f"gateway-conformance-infra/request-percentage-mirror/{i}" for i in range(3)]


@pytest.mark.parametrize("inline", [False, True], ids=["ext_proc", "inline"])
def test_kill_switch_in_the_file_stops_mirroring_live(tmp_path: Path, stacks: list[LocalStack], inline: bool) -> None:
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route, inline=inline)
    stacks.append(gw)
    client = Client(gw.url)
    sampled = [k for k in KEYS if decide(b"", k.encode(), Fraction(20))][:10]

    def mirrored_now(expected: int) -> int:
        before = received(gw, "infra-backend-v2")
        for key in sampled:
            assert client.request("/percent-mirror", "h", {"x-request-id": key})[0] == 200
        # settle waits for the expected count and for nothing in flight, so a
        # count that must stay put is read once every mirror has landed.
        return settle(gw, {"infra-backend-v2": before + expected}, timeout=3)["infra-backend-v2"] - before

    assert mirrored_now(len(sampled)) == len(sampled)
    mark = gw.samplers[0].line_count if gw.samplers else 0  # type: ignore[union-attr]
    reloads = gw.routes_reloads()
    (tmp_path / "routes.yaml").write_text(
        route + "---\napiVersion: mirror-sampler.io/v1alpha1\nkind: MirrorSampler\nspec: {mirroring: Disabled}\n"
    )
    if inline:
        wait_until(lambda: gw.routes_reloads() > reloads, 10, "Envoy to load the inline routes with the kill switch")
    else:
        gw.samplers[0].wait_event("reloaded", timeout=5, after=mark)  # type: ignore[union-attr]
    assert mirrored_now(0) == 0
    client.close()
