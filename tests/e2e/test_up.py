"""`mirror-sampler up` as a user runs it: ready line, live view, clean stop,
and a clear non-zero exit when a part cannot start."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.sampling import Fraction
from extproc.stack.children import Child
from extproc.stack.up import DEFAULT_CONFIG, LocalStack, StackError
from extproc.stack.view import view_rows
from tests.support.harness import Client, expected_count, received, settle, start_stack
from tests.support.paths import REPO
from tests.support.procs import alive, busy_port, wait_until

pytestmark = pytest.mark.e2e

READY = re.compile(r"gateway ready: (http://127\.0\.0\.1:\d+) \(Envoy admin (http://[\d.:]+)\)")
METRICS = re.compile(r"sampler metrics: (http://127\.0\.0\.1:\d+/metrics)")
EXAMPLE = re.compile(r"curl -H 'Host: (\S+)' -H 'x-request-id: (\S+)' (http://\S+)\s+# (mirrored|not mirrored)")


@pytest.fixture(autouse=True)
def _up_folders_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` keeps its log folder after it stops, for its user to read: a
    test's `up` makes it in the test's own tmp_path (pytest keeps the last
    few runs'), not one more folder in /tmp per run of the suite."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def children_of(pid: int) -> set[int]:
    """Direct children of pid, from /proc."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def ends_with(suffix: str) -> Callable[[str], bool]:
    return lambda line: line.rstrip().endswith(suffix)


def up(*args: str, env: dict[str, str] | None = None) -> Child:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return Child(
        "up",
        [sys.executable, "-m", "extproc", "up", "--listener-port", "0", "--admin-port", "0", *args],
        {**environ, **(env or {})},
        cwd=REPO,
    )


def test_up_runs_the_default_example_and_stops_every_child_on_sigterm() -> None:
    gw = up()
    try:
        line = gw.wait_line(lambda s: "gateway ready" in s, timeout=60)
        url, admin = READY.search(line).groups()  # type: ignore[union-attr]
        kids = children_of(gw.pid)
        assert len(kids) == 4  # envoy, sampler, backend, backend-2
        req = urllib.request.Request(url + "/get", headers={"Host": "backends.example", "x-request-id": "alice"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert urllib.request.urlopen(admin + "/ready", timeout=5).read().strip() == b"LIVE"
        # Not a terminal: the live view comes as periodic lines.
        gw.wait_line(lambda s: s.startswith("primary") and "backend-2" in s and "50%" in s, timeout=20)
        gw.signal(signal.SIGTERM)
        assert gw.popen.wait(30) == 0
        wait_until(lambda: not any(alive(k) for k in kids), 10, "every child of up to exit")
    finally:
        gw.stop()


def test_first_screen_gives_every_url_the_logs_and_curls_that_do_what_they_say() -> None:
    """The ready screen names the gateway, Envoy's admin, the sampler's metrics
    and the log folder, and two curls: the one marked mirrored is mirrored
    (the mirror backend receives it), the other is not."""
    gw = up()
    try:
        gw.wait_line(lambda s: "gateway ready" in s, timeout=60)
        curls = [gw.wait_line(ends_with(f"# {what}"), timeout=10) for what in ("mirrored", "not mirrored")]
        screen = gw.output()
        url, admin = READY.search(screen).groups()  # type: ignore[union-attr]
        metrics_url = METRICS.search(screen).group(1)  # type: ignore[union-attr]
        assert b"mirror_sampler_decisions_total" in urllib.request.urlopen(metrics_url, timeout=5).read()
        logs = Path(screen.split("logs: ", 1)[1].split()[0])
        assert (logs / "envoy.log").exists() and (logs / "sampler-0.log").exists()

        def mirror_count() -> int:
            stats = urllib.request.urlopen(admin + "/stats?filter=^cluster.backend-2.upstream_rq_total$", timeout=5).read().decode()
            return int(stats.split(":")[1]) if ":" in stats else 0

        examples: dict[str, tuple[str, str, str]] = {}
        for curl in curls:
            host, key, target, what = EXAMPLE.search(curl).groups()  # type: ignore[union-attr]
            assert target.startswith(url)
            examples[what] = (host, key, target)
        assert set(examples) == {"mirrored", "not mirrored"}

        def send(what: str) -> None:
            host, key, target = examples[what]
            req = urllib.request.Request(target, headers={"Host": host, "x-request-id": key})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200

        before = mirror_count()
        send("mirrored")
        wait_until(lambda: mirror_count() == before + 1, 10, "the mirrored curl's copy at backend-2")
        # A mirror lands after the answer: the mirrored curl sent after the
        # other is the positive witness that a copy of the other had its time.
        send("not mirrored")
        send("mirrored")
        wait_until(lambda: mirror_count() >= before + 2, 10, "the second mirrored curl's copy at backend-2")
        assert mirror_count() == before + 2, "the curl marked not mirrored was mirrored"
    finally:
        gw.stop()


def test_up_right_after_ctrl_c_starts_on_the_same_ports() -> None:
    """A stopped `up` leaves its ports in TIME-WAIT; the next `up` starts."""
    with busy_port() as listener, busy_port() as admin_port:
        pass  # two ports that were just free; nothing listens on them now
    ports = ("--listener-port", str(listener), "--admin-port", str(admin_port))
    first = up(*ports)
    try:
        line = first.wait_line(lambda s: "gateway ready" in s, timeout=60)
        url = READY.search(line).group(1)  # type: ignore[union-attr]
        # A request leaves a connection to close: the closing side's socket goes to TIME-WAIT.
        req = urllib.request.Request(url + "/get", headers={"Host": "backends.example", "x-request-id": "alice"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        first.signal(signal.SIGINT)
        wait_until(lambda: first.popen.poll() is not None, 30, "the first up exiting on SIGINT")
        assert first.popen.returncode == 0
    finally:
        first.stop()
    second = up(*ports)
    try:
        second.wait_line(lambda s: "gateway ready" in s, timeout=60)
    finally:
        second.stop()


def test_port_in_use_exits_non_zero_naming_the_part() -> None:
    with busy_port() as port:
        gw = up("--listener-port", str(port))
        try:
            wait_until(lambda: gw.popen.poll() is not None, 60, "up exiting on a busy listener port")
            assert gw.popen.returncode == 1
            assert f"--listener-port: port {port} on 127.0.0.1 is not free" in gw.output()
        finally:
            gw.stop()


def test_a_child_failing_at_start_stops_the_others(tmp_path: Path) -> None:
    with busy_port() as port:
        # The sampler cannot bind its metrics port: the error names it, and the
        # echo backends already started are stopped.
        gw = LocalStack(
            Settings.load({"MIRROR_CONFIG": str(DEFAULT_CONFIG)}),
            listener_port=0,
            admin_port=0,
            log_dir=tmp_path,
            sampler_env={"MIRROR_METRICS_LISTEN": f"127.0.0.1:{port}"},
        )
        with pytest.raises(StackError, match=r"sampler 0 exited with code 1: .*MIRROR_METRICS_LISTEN"):
            gw.start()
        assert set(gw.backends) == {"backend", "backend-2"}
        assert not any(child.alive() for child in gw.backends.values())
        assert gw.envoy is None


def test_view_rows_show_achieved_and_configured_ratio() -> None:
    policy = build_policy(Settings.load({"MIRROR_CONFIG": str(DEFAULT_CONFIG)}), DEFAULT_CONFIG.read_text())
    rows = view_rows(policy, {"cluster.backend.upstream_rq_total": 200, "cluster.backend-2.upstream_rq_total": 97})
    assert any(r.split() == ["backend", "200"] for r in rows)
    assert any(r.split() == ["backend-2", "97", "200", "48.5%", "50%"] for r in rows)


@pytest.mark.parametrize("inline", [False, True], ids=["sampler", "inline-lua"])
def test_the_live_view_shows_an_edit(tmp_path: Path, stacks: list[LocalStack], inline: bool) -> None:
    """The view shows the fractions in force, not the start-up ones, whichever engine decides."""
    gw = start_stack(tmp_path, DEFAULT_CONFIG.read_text(), inline=inline)
    stacks.append(gw)
    assert configured(gw) == "50%"
    reloads = gw.routes_reloads()
    (tmp_path / "routes.yaml").write_text(DEFAULT_CONFIG.read_text().replace("percent: 50", "percent: 10"))
    wait_until(lambda: configured(gw) == "10%", 10, "the live view showing the 10% edit")
    if inline:
        assert gw.routes_reloads() > reloads  # shown once Envoy serves it (the fraction is in the Lua)


def test_an_edit_that_changes_the_routes_reaches_envoy_and_the_sampler(tmp_path: Path, stacks: list[LocalStack]) -> None:
    """With the sampler deciding, a live edit may change Envoy's routes too (here the
    hostname, and the percentage with it): up rewrites them (filesystem RDS) and restarts
    the sampler on the file (a running sampler refuses a change of routes), so the new host
    is routed and mirrored at the new percentage."""
    gw = start_stack(tmp_path, DEFAULT_CONFIG.read_text())
    stacks.append(gw)
    reloads = gw.routes_reloads()
    edited = DEFAULT_CONFIG.read_text().replace("backends.example", "shop.example").replace("percent: 50", "percent: 100")
    (tmp_path / "routes.yaml").write_text(edited)
    wait_until(lambda: gw.routes_reloads() > reloads, 10, "Envoy serving the edited routes")
    assert gw.reloader is not None
    wait_until(lambda: gw.reloader is not None and gw.reloader.outcomes["reloaded"] == 1, 30, "the samplers restarted on the edit")
    assert configured(gw) == "100%"
    before = received(gw, "backend-2")
    keys = [f"user-{i}" for i in range(40)]
    client = Client(gw.url)
    for key in keys:
        assert client.request("/get", "shop.example", {"x-request-id": key})[0] == 200
    client.close()
    assert settle(gw, {"backend-2": before + len(keys)}) == {"backend-2": before + len(keys)}


def configured(gw: LocalStack) -> str:
    """The configured fraction the view shows for the mirror backend."""
    (row,) = [r for r in view_rows(gw.policy, gw.stats()) if r.split()[0] == "backend-2"]
    return row.split()[-1]


COMPARED_ROUTE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {name: shop}
spec:
  compare:
    rules:
    - {rule: default/http-mirror/0, ignore: [body.headers]}
---
""" + DEFAULT_CONFIG.read_text().replace("percent: 50", "percent: 100")


@pytest.mark.parametrize("engine", ["", "lua", "module"], ids=["sampler", "inline-lua", "inline-module"])
def test_the_live_view_shows_the_comparison_per_target(tmp_path: Path, stacks: list[LocalStack], engine: str) -> None:
    """spec.compare in the routes file: up runs an observer, Envoy captures (whichever engine
    decides), the view counts the pairs; inline, a live edit of the routes keeps capturing."""
    from extproc.stack.up import first_screen, live_view

    gw = start_stack(tmp_path, COMPARED_ROUTE, inline=bool(engine), engine=engine or "lua")
    stacks.append(gw)
    assert gw.observer is not None and any("compare: observer metrics" in line for line in first_screen(gw))
    keys = [f"user-{i}" for i in range(20)]
    send(gw, keys)
    wait_until(lambda: received(gw, "backend-2") == 20, 10, "every request mirrored to backend-2")

    def compared_row() -> list[str]:
        rows = live_view(gw)
        start = next(i for i, r in enumerate(rows) if r.startswith("compared"))
        return rows[start + 1].split()

    wait_until(lambda: compared_row()[:2] == ["backend-2", "20"], 20, "the view counting 20 compared pairs")
    # The echo names its pod: every pair differs there (the echoed headers are ignored by the rule).
    assert compared_row() == ["backend-2", "20", "0.0%", "0", "body.pod", "100.0%", "[default/http-mirror/0]"]
    if not engine:
        return
    # Inline, an edit becomes new routes (filesystem RDS): they keep the capture points.
    reloads = gw.routes_reloads()
    (tmp_path / "routes.yaml").write_text(COMPARED_ROUTE.replace("percent: 100", "percent: 50"))
    wait_until(lambda: gw.routes_reloads() > reloads, 10, "Envoy serving the edited routes")
    more = [f"user-{i}" for i in range(20, 60)]
    send(gw, more)
    mirrored = expected_count(Fraction(50), more)
    assert 0 < mirrored < len(more)
    wait_until(lambda: received(gw, "backend-2") == 20 + mirrored, 10, "the edited fraction mirrored")
    pairs = str(20 + mirrored)
    wait_until(lambda: compared_row()[:2] == ["backend-2", pairs], 20, f"the view counting {pairs} compared pairs")
    assert gw.stat("http.ingress_http.lua.compare.executions") == 20 + mirrored, "a capture per mirrored request only"


TWO_MIRRORED_PATHS = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {{name: shop}}
spec:
  compare:
    rules:
    - {{rule: {compared}, ignore: [body.headers]}}
{settings}---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {{name: two-paths}}
spec:
  parentRefs: [{{name: eg}}]
  hostnames: [backends.example]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /a}}}}]
    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{kind: Service, name: backend-2, port: 3000}}, percent: 100}}}}]
    backendRefs: [{{group: "", kind: Service, name: backend, port: 3000}}]
  - matches: [{{path: {{type: PathPrefix, value: /b}}}}]
    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{kind: Service, name: backend-2, port: 3000}}, percent: 100}}}}]
    backendRefs: [{{group: "", kind: Service, name: backend, port: 3000}}]
"""
RULE_A, RULE_B = "default/two-paths/0", "default/two-paths/1"
CAPTURE_RELOADS = "http.compare_shadow.rds.mirror-sampler-compare-shadow.config_reload"


@pytest.mark.parametrize("engine", ["", "lua", "module"], ids=["sampler", "inline-lua", "inline-module"])
def test_a_live_edit_of_spec_compare_reaches_envoy(tmp_path: Path, stacks: list[LocalStack], engine: str) -> None:
    """Which rules compare, the shadow's timeout and the capture bound change live
    (the internal listener's routes are a routes file of their own, like the main
    ones, and the bound is in the routes' metadata); the private headers, which
    Envoy's access log carries, are refused with a word that a restart applies
    them, and nothing of that edit reaches Envoy; the section removed stops the
    capture in Envoy and leaves the mirrors (the observer keeps its settings)."""
    # A bound of 100 bytes: the echo's bodies agree that far (they differ at body.pod).
    gw = start_stack(
        tmp_path, TWO_MIRRORED_PATHS.format(compared=RULE_A, settings="    bodyLimit: 100\n"), inline=bool(engine), engine=engine or "lua"
    )
    stacks.append(gw)
    assert gw.observer is not None and gw.reloader is not None
    observer, reloader = gw.observer, gw.reloader

    def results(rule: str) -> dict[str, float]:
        return {result: n for (r, _, result), n in observer.counts()[0].items() if r == rule and n}

    def observer_reloads(result: str = "ok") -> float:
        with urllib.request.urlopen(observer.metrics_url, timeout=2) as response:
            text = response.read().decode()
        prefix = f'mirror_sampler_compare_reloads_total{{result="{result}"}}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    def send_both(keys: list[str]) -> None:
        client = Client(gw.url)
        for path in ("/a/get", "/b/get"):
            for key in keys:
                assert client.request(path, "backends.example", {"x-request-id": f"{path}-{key}"})[0] == 200
        client.close()

    send_both([f"user-{i}" for i in range(10)])
    wait_until(lambda: sum(results(RULE_A).values()) == 10, 20, "rule a's 10 pairs")
    assert results(RULE_A) == {"same": 10}, "cut at 100 bytes, where the bodies agree"
    assert results(RULE_B) == {}, "rule b mirrors but does not compare"

    # Rule b compares instead of rule a, its shadow given 7 s, the bound back to its default.
    ok, capture_reloads = observer_reloads(), gw.stat(CAPTURE_RELOADS)
    (tmp_path / "routes.yaml").write_text(TWO_MIRRORED_PATHS.format(compared=RULE_B, settings="    shadowTimeout: 7s\n"))
    wait_until(lambda: reloader.outcomes["reloaded"] == 1, 30, "up reloading the compare routes, then the routes")
    wait_until(lambda: observer_reloads() > ok, 10, "the observer's own reload of the edit")
    assert gw.stat(CAPTURE_RELOADS) == capture_reloads + 1, "the internal listener's routes were reloaded once"
    dump = json.loads(urllib.request.urlopen(f"{gw.admin_url}/config_dump?resource=dynamic_route_configs", timeout=5).read())
    (capture_routes,) = [c["route_config"] for c in dump["configs"] if c["route_config"]["name"] == "mirror-sampler-compare-shadow"]
    (shadow_route,) = capture_routes["virtual_hosts"][0]["routes"]
    assert shadow_route["name"] == f"{RULE_B} compare backend-2" and shadow_route["route"]["timeout"] == "7s"
    send_both([f"user-{i}" for i in range(10, 20)])
    wait_until(lambda: sum(results(RULE_B).values()) == 10, 20, "rule b's 10 pairs")
    # Had Envoy kept cutting at 100 bytes, these would be the same too.
    assert results(RULE_B) == {"differs": 10}, "whole bodies: they differ at body.pod"
    assert observer.counts()[1] == {(RULE_B, "backend-2", "body.pod"): 10}
    assert results(RULE_A) == {"same": 10}, "rule a no longer compares"
    assert gw.stat("http.ingress_http.lua.compare.executions") == gw.stat("http.compare_shadow.lua.compare.executions") == 20

    # The private headers are in Envoy's access log, in its listeners: a restart applies them.
    ok = observer_reloads()
    (tmp_path / "routes.yaml").write_text(TWO_MIRRORED_PATHS.format(compared=RULE_B, settings="    privateHeaders: [x-api-key]\n"))
    wait_until(lambda: reloader.outcomes["compare_restart"] == 1, 30, "up refusing the edit of the private headers")
    assert gw.stat(CAPTURE_RELOADS) == capture_reloads + 1 and reloader.outcomes["reloaded"] == 1, (
        "nothing of the refused edit reached Envoy"
    )
    wait_until(lambda: observer_reloads() == ok + 1, 10, "the observer applying the private headers itself")

    # The section removed: Envoy stops capturing and the copies go on; the observer
    # refuses the edit and keeps its settings for what is still on its way.
    mirrored, invalid = received(gw, "backend-2"), observer_reloads("invalid")
    head, routes = TWO_MIRRORED_PATHS.split("  compare:\n", 1)[0], TWO_MIRRORED_PATHS.split("---", 1)[1]
    (tmp_path / "routes.yaml").write_text((head + "  mirroring: Enabled\n---" + routes).format())
    wait_until(lambda: reloader.outcomes["reloaded"] == 2, 30, "up reloading the routes without spec.compare")
    assert gw.stat(CAPTURE_RELOADS) == capture_reloads + 2, "the internal listener's routes emptied first"
    wait_until(lambda: observer_reloads("invalid") == invalid + 1, 10, "the observer refusing the removal")
    assert observer_reloads() == ok + 1
    send_both([f"user-{i}" for i in range(20, 30)])
    wait_until(lambda: received(gw, "backend-2") == mirrored + 20, 10, "both paths still mirrored")
    assert gw.stat("http.ingress_http.lua.compare.executions") == gw.stat("http.compare_shadow.lua.compare.executions") == 20, (
        "nothing captured once the section is gone"
    )


def _scheduling_group(pid: int | str) -> str:
    """The session's autogroup as the kernel shows it ("" where it shows none)."""
    path = Path(f"/proc/{pid}/autogroup")
    return path.read_text() if path.exists() else ""


def test_up_keeps_its_children_in_its_session_where_the_observer_gives_way_to_envoy(tmp_path: Path, stacks: list[LocalStack]) -> None:
    """Under autogroups a session is one scheduling group, and only inside one does
    a SCHED_IDLE thread give way at once to a thread that wakes: `up`'s Envoy,
    observer, samplers and echo backends share `up`'s session (here the test's),
    each in a process group of its own (a terminal's Ctrl-C reaches `up` alone);
    the observer's threads are all under SCHED_IDLE, and the group's nice value,
    which it shares with `up`, is left as it was."""
    group = _scheduling_group("self")
    gw = start_stack(tmp_path, TWO_MIRRORED_PATHS.format(compared=RULE_A, settings=""))
    stacks.append(gw)
    children = gw.children()
    assert {"envoy", "observer", "sampler 0", "echo backend", "echo backend-2"} <= set(children), children
    for name, child in children.items():
        assert os.getsid(child.pid) == os.getsid(0), f"{name}: a session of its own"
        assert os.getpgid(child.pid) == child.pid, f"{name}: in up's process group"
        assert _scheduling_group(child.pid) == group, name
    observer = children["observer"].pid
    threads = list(Path(f"/proc/{observer}/task").iterdir())
    assert len(threads) >= 3 and {os.sched_getscheduler(int(t.name)) for t in threads} == {os.SCHED_IDLE}
    assert _scheduling_group("self") == group, "the observer changed the session's group"


def send(gw: LocalStack, keys: list[str]) -> None:
    client = Client(gw.url)
    for key in keys:
        assert client.request("/get", "backends.example", {"x-request-id": key})[0] == 200
    client.close()
