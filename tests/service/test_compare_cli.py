"""`mirror-sampler compare` as a user runs it: bad settings refused at start-up
with the field named, report and show on a store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.records import Capture, Side
from extproc.compare.store import CompareStore
from extproc.stack.children import Child
from tests.support.paths import REPO
from tests.unit.test_envoyconf import render_cli

ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  rules:
  - backendRefs: [{name: v1, port: 8080}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 8080}, percent: 10}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v1-again, port: 8080}, percent: 10}}
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", "compare", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI's exit status, stdout and stderr, run in this process: each
    command also runs as a process below once; its other cases need not pay
    for the start-up (a few seconds of imports) again."""
    capsys.readouterr()
    status = render_cli(list(argv), {})
    out, err = capsys.readouterr()
    return status, out, err


def test_settings_are_checked_against_the_routes_with_a_did_you_mean(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "compare.yaml").write_text(
        "apiVersion: mirror-sampler.io/v1alpha1\nkind: MirrorSampler\nmetadata: {name: x}\n"
        "spec:\n  compare:\n    rules:\n    - {rule: shop/web/0, secondary: v1-agian}\n"
    )
    done = run("capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "compare.yaml"),
               "--routes", str(tmp_path / "routes.yaml"))  # fmt: skip
    assert done.returncode == 2
    assert "compare.rules[0].secondary: 'v1-agian' is not one of the compared targets; did you mean v1-again?" in done.stderr
    assert not (tmp_path / "c.db").exists(), "refused before anything was created"


def _one_compared_request(db: Path) -> None:
    """rid-1 of shop/web/0: v2 differs at body.v, the secondary v1-again is the same."""
    config = CompareConfig(rules={"shop/web/0": RuleCompare(targets=("v2", "v1-again"), secondary="v1-again")})
    store = CompareStore(db, config)

    def capture(side: Side, target: str, body: bytes) -> Capture:
        targets = ("v2", "v1-again") if side is Side.PRIMARY else (target,)
        return Capture("rid-1", "shop/web/0", side, targets, "GET", "/p", 200, (), body, False, 3.0, False, 0.0)

    store.add([capture(Side.PRIMARY, "", b'{"v":1}'), capture(Side.SHADOW, "v1-again", b'{"v":1}'), capture(Side.SHADOW, "v2", b'{"v":2}')])
    store.close()


def test_report_and_show_read_the_store(tmp_path: Path) -> None:
    _one_compared_request(tmp_path / "c.db")
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "compare.yaml").write_text("compare:\n  rules:\n  - {rule: shop/web/0, secondary: v1-again}\n")
    files = ["--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "compare.yaml"), "--routes", str(tmp_path / "routes.yaml")]
    done = run("report", *files, "--json", "--html", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    targets = {t["target"]: t for t in json.loads(done.stdout)["targets"]}
    assert targets["v2"]["results"] == {"differs": 1} and targets["v2"]["fields"][0]["path"] == "body.v"
    assert targets["v1-again"]["results"] == {"same": 1}
    assert "<script" in (tmp_path / "r.html").read_text()
    shown = run("show", "rid-1", "--db", str(tmp_path / "c.db"))
    assert shown.returncode == 0 and "* body.v" in shown.stdout
    assert run("show", "nope", "--db", str(tmp_path / "c.db")).returncode == 1
    missing = run("report", "--db", str(tmp_path / "absent.db"))
    assert missing.returncode == 2 and "absent.db: no such file" in missing.stderr


def test_a_report_needs_no_routes_for_targets_the_store_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings that leave the targets to the routes (as extproc/data/compare.yaml does)
    serve the report without them; the observer, which needs the targets, still refuses."""
    monkeypatch.delenv("MIRROR_CONFIG", raising=False)
    _one_compared_request(tmp_path / "c.db")
    (tmp_path / "compare.yaml").write_text("compare:\n  rules:\n  - {rule: shop/web/0, secondary: v1-again}\n")
    settings = ["--config", str(tmp_path / "compare.yaml")]
    status, out, err = in_process(capsys, "compare", "report", "--db", str(tmp_path / "c.db"), *settings, "--json")
    assert status == 0, err
    targets = {t["target"]: t for t in json.loads(out)["targets"]}
    assert targets["v2"]["results"] == {"differs": 1} and targets["v1-again"]["results"] == {"same": 1}
    refused = run("capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "o.db"), *settings)  # a process: no hang if it starts
    assert refused.returncode == 2 and "targets: required when the rule's mirrors are not known" in refused.stderr


def test_envoy_config_gains_the_capture_points_and_envoy_accepts_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.stack.envoy import validate

    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "compare.yaml").write_text("compare:\n  rules:\n  - {rule: shop/web/0, secondary: v1-again}\n")
    rendered = in_process(capsys, "envoy-config", "--config", str(tmp_path / "routes.yaml"), "-o", str(tmp_path / "envoy.yaml"))
    assert rendered[0] == 0, rendered[2]
    settings = ["--config", str(tmp_path / "compare.yaml"), "--routes", str(tmp_path / "routes.yaml")]
    done = run("envoy-config", str(tmp_path / "envoy.yaml"), *settings, "--observer", "127.0.0.1:50061", "-o", str(tmp_path / "out.yaml"))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out.yaml").read_text()
    assert "mirror-sampler.compare-capture" in text and "internalListener" in text
    verdict = validate(tmp_path / "out.yaml")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text("http_filters: []\n")
    status, _, err = in_process(capsys, "compare", "envoy-config", str(snippet), *settings)
    assert status == 2 and "not the output of `mirror-sampler envoy-config`" in err


def test_a_database_path_sqlite_cannot_use_is_refused_at_start_up(tmp_path: Path) -> None:
    done = run("capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "no-such-dir" / "c.db"))
    assert done.returncode == 2 and "--db" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "not-sqlite.db").write_text("hello, not a database " * 100)
    done = run("report", "--db", str(tmp_path / "not-sqlite.db"))
    assert done.returncode == 2 and "cannot open as SQLite" in done.stderr and "Traceback" not in done.stderr


def test_a_report_reads_several_machines_files(tmp_path: Path) -> None:
    config = CompareConfig(rules={"shop/web/0": RuleCompare(targets=("v2",))})
    for machine in ("a", "b"):
        store = CompareStore(tmp_path / f"{machine}.db", config)
        targets = ("v2",)
        store.add(
            [
                Capture(f"{machine}-1", "shop/web/0", Side.PRIMARY, targets, "GET", "/", 200, (), b"1", False, 1.0, False, 0.0),
                Capture(f"{machine}-1", "shop/web/0", Side.SHADOW, targets, "GET", "/", 200, (), b"2", False, 1.0, False, 0.0),
            ]
        )
        store.close()
    done = run("report", "--db", str(tmp_path / "a.db"), "--db", str(tmp_path / "b.db"), "--json")
    assert done.returncode == 0, done.stderr
    [target] = json.loads(done.stdout)["targets"]
    assert target["results"] == {"differs": 2} and target["fields"][0]["examples"] == ["a-1", "b-1"]


SAMPLER_COMPARE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {name: shop}
spec:
  compare:
    shadowTimeout: 3s
    rules:
    - {rule: shop/web/0, secondary: v1-again}
---
"""


def envoy_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", "envoy-config", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_envoy_config_reads_spec_compare_from_the_routes_file_and_envoy_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.stack.envoy import validate

    routes = tmp_path / "routes.yaml"
    routes.write_text(SAMPLER_COMPARE + ROUTES)
    done = envoy_config(
        "--config", str(routes), "--observer", "127.0.0.1:50071", "--observer", "127.0.0.1:50072", "-o", str(tmp_path / "e.yaml")
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "e.yaml").read_text()
    assert "mirror-sampler.compare-capture" in text and "internalListener" in text and "portValue: 50072" in text
    verdict = validate(tmp_path / "e.yaml")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    # Without spec.compare: the same command renders no capture point, and --observer is refused.
    routes.write_text(ROUTES)
    status, out, _ = in_process(capsys, "envoy-config", "--config", str(routes))
    assert status == 0 and "compare-capture" not in out
    status, _, err = in_process(capsys, "envoy-config", "--config", str(routes), "--observer", "127.0.0.1:50071")
    assert status == 2 and "--observer: the configuration has no spec.compare rule" in err


def test_envoy_config_renders_the_capture_points_with_every_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--snippet, --inline and --for compose render them too (their shape and Envoy's
    verdict: tests/unit/test_envoyconf.py, tests/service/test_envoyconf_validate.py)."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(SAMPLER_COMPARE + ROUTES)
    for flags in (["--snippet"], ["--inline", "lua"], ["--for", "compose"]):
        status, out, err = in_process(capsys, "envoy-config", "--config", str(routes), *flags, "--observer", "10.0.0.9:50071")
        assert status == 0 and not err, (flags, err)
        assert "mirror-sampler.compare-capture" in out and "50071" in out, flags
    invalid = SAMPLER_COMPARE.replace("shadowTimeout", "shadowTimout") + ROUTES
    routes.write_text(invalid)
    status, _, err = in_process(capsys, "envoy-config", "--config", str(routes))
    assert status == 2 and "spec.compare.shadowTimout: unknown field; did you mean shadowTimeout?" in err


def test_the_observer_reads_the_routes_with_the_samplers_slot_settings(tmp_path: Path) -> None:
    three = ROUTES + "    - {type: RequestMirror, requestMirror: {backendRef: {name: v3, port: 8080}, percent: 10}}\n"
    (tmp_path / "routes.yaml").write_text(SAMPLER_COMPARE.replace("secondary: v1-again", "targets: [v3]") + three)
    argv = ["capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "routes.yaml")]
    refused = run(*argv)
    assert refused.returncode == 2 and "has 3 mirrors but only 2 slot headers (raise MIRROR_SLOTS)" in refused.stderr
    child = Child("observer", [sys.executable, "-m", "extproc", "compare", *argv], {"MIRROR_SLOTS": "3"}, cwd=REPO)
    try:
        assert child.wait_event("compare_serving")["rules"] == ["shop/web/0"]
    finally:
        child.stop()


def test_the_observer_steps_back_for_envoy_by_its_nice_value(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(SAMPLER_COMPARE + ROUTES)
    argv = ["capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "routes.yaml")]
    for nice in ("-1", "20"):
        refused = run(*argv, "--nice", nice)
        assert refused.returncode == 2 and f"--nice: {nice} is not between 0 and 19" in refused.stderr
    ours = os.nice(0)
    # --nice 0 keeps the policy the observer inherits: this test's own.
    inherited = os.sched_getscheduler(0) == os.SCHED_IDLE
    for flags, wanted, idle in (([], min(ours + 10, 19), True), (["--nice", "0"], ours, inherited)):
        child = Child("observer", [sys.executable, "-m", "extproc", "compare", *argv, *flags], cwd=REPO)
        try:
            serving = child.wait_event("compare_serving")
            assert (serving["nice"], serving["idle"]) == (wanted, idle), flags
            assert os.getpriority(os.PRIO_PROCESS, child.pid) == wanted, flags  # the kernel's word, not only the log's
            # Every thread, the settings watch's and the writer's among them: a thread
            # takes its policy from the one that starts it, so the order matters.
            threads = list(Path(f"/proc/{child.pid}/task").iterdir())
            assert len(threads) >= 3, threads
            policies = {os.sched_getscheduler(int(thread.name)) for thread in threads}
            assert policies == {os.SCHED_IDLE} if idle else os.SCHED_IDLE not in policies, flags
        finally:
            child.stop()


AUTOGROUPS = Path("/proc/self/autogroup").exists() and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "0"


def _group_nice(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


def test_an_observer_leading_its_session_lowers_its_session_group_too(tmp_path: Path) -> None:
    """Under autogroups a process's nice value counts only inside its session:
    an observer a supervisor starts in a session of its own (`up` did, before
    it kept its children in its own session) puts Envoy first only by the
    group's value. Two at once, as one per core would start (the
    kernel takes one change per 100 ms from a writer without CAP_SYS_ADMIN;
    that wait is tests/unit/test_priority.py's, a root test never meets it)."""
    (tmp_path / "routes.yaml").write_text(SAMPLER_COMPARE + ROUTES)
    argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--config", str(tmp_path / "routes.yaml")]
    both = [Child(f"observer-{i}", [*argv, "--db", str(tmp_path / "c.db")], cwd=REPO, own_session=True) for i in range(2)]
    kept = Child("observer-nice-0", [*argv, "--db", str(tmp_path / "c.db"), "--nice", "0"], cwd=REPO, own_session=True)
    try:
        for child in both:
            assert child.wait_event("compare_serving")["session_nice"] == (10 if AUTOGROUPS else None)
            if AUTOGROUPS:
                assert _group_nice(child.pid) == 10 and os.getsid(child.pid) == child.pid
        assert kept.wait_event("compare_serving")["session_nice"] is None
        if AUTOGROUPS:
            assert _group_nice(kept.pid) == 0
    finally:
        for child in (*both, kept):
            child.stop()


# Leads a session of its own and starts the observer in it, as a shell would:
# the test's own session may have no group to look at (the kernel shows none
# for the session processes inherit from init, as in CI).
_SESSION_LEADER = "import subprocess, sys; child = subprocess.Popen(sys.argv[1:]); print(child.pid, flush=True); sys.exit(child.wait())"


def test_an_observer_sharing_a_session_leaves_the_sessions_group_alone(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(SAMPLER_COMPARE + ROUTES)
    argv = ["capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "routes.yaml")]
    with subprocess.Popen(
        [sys.executable, "-c", _SESSION_LEADER, sys.executable, "-m", "extproc", "compare", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as leader:
        try:
            assert leader.stdout is not None
            observer = int(leader.stdout.readline())
            serving = next(json.loads(line) for line in leader.stdout if '"event": "compare_serving"' in line)
            assert serving["nice"] == min(os.nice(0) + 10, 19) and serving["session_nice"] is None
            assert os.getsid(observer) == leader.pid != observer
            if AUTOGROUPS:  # a new session starts at the group's nice 0
                assert _group_nice(leader.pid) == 0
        finally:
            os.killpg(leader.pid, signal.SIGKILL)


def test_a_settings_file_that_is_no_regular_file_is_refused_at_start_up(tmp_path: Path) -> None:
    """A FIFO would block the observer's start (and its reload thread) until
    something wrote to it; the observer reads --config as the sampler reads
    MIRROR_CONFIG (config.source.read_config_file)."""
    import os

    fifo = tmp_path / "compare.yaml"
    os.mkfifo(fifo)
    observer = run("capture", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--config", str(fifo))
    assert observer.returncode == 2, observer.stderr
    assert f"--config: cannot read {fifo}: not a regular file (a FIFO)" in observer.stderr
