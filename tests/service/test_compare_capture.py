"""The observer over real HTTP/2 connections (grpcio's client), as Envoy's
gRPC access logger uses it: StreamAccessLogsMessage batches, built with
xds-protos' own messages (so our subset is checked against Envoy's
definitions), on long-lived client-streaming calls. Entries become captures
and joins; entries and messages it cannot use are counted and skipped while
the stream keeps working; hostile input costs its stream or connection only,
and the observer keeps serving."""

from __future__ import annotations

import base64
import json
import queue
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as xds_accesslog
from envoy.service.accesslog.v3 import als_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.noise import Result
from extproc.compare.records import CAPTURE_NAMESPACE, CaptureTag, Side
from extproc.compare.store import CompareStore, decode_capture
from extproc.stack.children import Child
from extproc.wire import ACCESS_LOG_METHOD, PROCESS_METHOD
from tests.support.procs import scrape, wait_until

RULE = "shop/web/0"
CONFIG = CompareConfig(rules={RULE: RuleCompare(targets=("candidate",))})
BODY_LIMIT = 1024


class Observer(Child):
    def __init__(self, tmp: Path, db: Path | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "compare.yaml").write_text(f"compare:\n  bodyLimit: {BODY_LIMIT}\n  rules:\n  - {{rule: {RULE}, targets: [candidate]}}\n")
        self.db = db or tmp / "c.db"
        argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--db", str(self.db), "--config", str(tmp / "compare.yaml")]  # fmt: skip
        super().__init__("observer", argv)
        ready = self.wait_event("compare_serving")
        self.port, self.metrics_port = int(ready["port"]), int(ready["metrics_port"])

    def dropped(self, reason: str) -> float:
        return scrape(self.metrics_port, "mirror_sampler_compare_dropped_total", {"reason": reason})

    def connection_errors(self) -> float:
        return scrape(self.metrics_port, "mirror_sampler_compare_connection_errors_total")


@pytest.fixture
def observer(tmp_path: Path) -> Iterator[Observer]:
    o = Observer(tmp_path)
    yield o
    o.stop()


PRIMARY = CaptureTag(Side.PRIMARY, RULE, ("candidate",)).encode()
SHADOW = CaptureTag(Side.SHADOW, RULE, ("candidate",)).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def entry(
    rid: str,
    tag: str | None,
    body: bytes = b"{}",
    *,
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    truncated: bool = False,
    request_headers: dict[str, str] | None = None,
    upstream_ms: int | None = 4,
    namespace: bool = True,
) -> xds_accesslog.HTTPAccessLogEntry:
    """One entry as Envoy's gRPC access logger sends it, the capture filter's metadata in it."""
    lines = [(":status", str(status)), *(headers or [])]
    if upstream_ms is not None:
        lines.append(("x-envoy-upstream-service-time", str(upstream_ms)))
    e = xds_accesslog.HTTPAccessLogEntry(protocol_version=xds_accesslog.HTTPAccessLogEntry.HTTP11)
    common = e.common_properties
    common.upstream_cluster = "primary"
    common.start_time.GetCurrentTime()
    common.time_to_last_downstream_tx_byte.FromMicroseconds(3_351)
    common.duration.FromMicroseconds(3_377)
    if namespace:
        fields: dict[str, Any] = {"headers": b64("\n".join(f"{k}: {v}" for k, v in lines).encode()), "body": b64(body)}
        fields["truncated"] = truncated
        if tag is not None:
            fields["tag"] = tag
        common.metadata.filter_metadata[CAPTURE_NAMESPACE].update(fields)
    e.request.request_method = base_pb2.GET
    e.request.path = "/p"
    e.request.request_id = rid
    e.request.authority = "shop"
    e.request.request_headers.update(request_headers or {})
    e.response.response_code.value = status
    return e


def batch(*entries: xds_accesslog.HTTPAccessLogEntry, first: bool = False) -> bytes:
    message = als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=entries))
    if first:  # Envoy names itself on a stream's first message
        message.identifier.node.id = "envoy-1"
        message.identifier.log_name = "compare"
    data: bytes = message.SerializeToString()
    return data


def send(port: int, messages: Iterable[bytes]) -> bytes:
    """One access log call: the messages, then the client's half-close; the call's one response."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer: bytes = channel.stream_unary(ACCESS_LOG_METHOD)(iter(messages), timeout=10)
        return answer


class HeldOpen:
    """A call kept open as Envoy keeps its access log stream: ``put`` sends a
    message, ``close`` half-closes and returns the call's response."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.future = self.channel.stream_unary(ACCESS_LOG_METHOD).future(self._messages(), timeout=60)

    def _messages(self) -> Iterator[bytes]:
        while (item := self.queue.get(timeout=30)) is not None:
            yield item

    def put(self, message: bytes) -> None:
        self.queue.put(message)

    def close(self) -> bytes:
        self.queue.put(None)
        try:
            answer: bytes = self.future.result(timeout=10)
            return answer
        finally:
            self.channel.close()


def test_a_primary_and_a_shadow_entry_are_joined_and_judged(observer: Observer, tmp_path: Path) -> None:
    assert send(observer.port, [batch(entry("r1", PRIMARY, b'{"v":1}'), first=True)]) == b"", "an empty StreamAccessLogsResponse"
    assert send(observer.port, [batch(entry("r1", SHADOW, b'{"v":2}'), first=True)]) == b""
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: len(store.comparisons("r1")) == 1, timeout=10)
    [c] = store.comparisons("r1")
    assert (c.request_id, c.target, c.result, c.fields) == ("r1", "candidate", Result.DIFFERS, ({"path": "body.v"},))
    assert (c.method, c.path, c.primary_status, c.shadow_status) == ("GET", "/p", 200, 200)
    assert (c.primary_ms, c.shadow_ms) == (4.0, 4.0), "Envoy's x-envoy-upstream-service-time"


def test_many_entries_in_one_message_and_many_messages_on_one_stream(observer: Observer, tmp_path: Path) -> None:
    call = HeldOpen(observer.port)
    try:
        call.put(batch(*(entry(f"m{i}", side, b'{"v":1}') for i in range(40) for side in (PRIMARY, SHADOW)), first=True))
        for i in range(40, 50):
            call.put(batch(entry(f"m{i}", PRIMARY, b'{"v":1}')))
            call.put(batch(entry(f"m{i}", SHADOW, b'{"v":1}')))
        store = CompareStore(tmp_path / "c.db", CONFIG)
        wait_until(lambda: len(store.comparisons()) == 50, 10, "fifty joins")
        assert {c.result for c in store.comparisons()} == {Result.SAME}
        assert not call.future.done(), "the stream stays open: Envoy never ends it"
    finally:
        assert call.close() == b""


def test_entries_split_across_two_observers_join_in_their_shared_store(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a, b = Observer(tmp_path / "a", db), Observer(tmp_path / "b", db)
    try:
        send(a.port, [batch(entry("x1", PRIMARY, b'{"v":1}'), entry("x2", SHADOW, b'{"v":2}'))])
        send(b.port, [batch(entry("x1", SHADOW, b'{"v":1}'), entry("x2", PRIMARY, b'{"v":1}'))])
        store = CompareStore(db, CONFIG)
        wait_until(lambda: len(store.comparisons()) == 2, 10, "both requests joined across the processes")
        assert {c.request_id: c.result for c in store.comparisons()} == {"x1": Result.SAME, "x2": Result.DIFFERS}
    finally:
        a.stop()
        b.stop()


TOKEN = "Bearer tok-0123456789"
SESSION = "sess-abcdef123"
PRIVATE = "key-9876543210"


def test_logged_credentials_never_reach_sqlite(tmp_path: Path) -> None:
    """The authorization header and cookie values the logger sends (to be
    scrubbed) and that the responses repeat, in body and headers, are nowhere
    in the database's bytes; a private header listed by the user neither."""
    (tmp_path / "compare.yaml").write_text(
        f"compare:\n  bodyLimit: {BODY_LIMIT}\n  privateHeaders: [x-api-key]\n  rules:\n  - {{rule: {RULE}, targets: [candidate]}}\n"
    )
    argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "compare.yaml")]  # fmt: skip
    child = Child("observer", argv)
    try:
        port = int(child.wait_event("compare_serving")["port"])
        request = {"authorization": TOKEN, "cookie": f"session={SESSION}; theme=1", "x-api-key": PRIVATE}
        echoed = f'{{"auth":"{TOKEN}","token":"{TOKEN.split()[1]}","sid":"{SESSION}","k":"{PRIVATE}","n":1}}'.encode()
        headers = [("x-echo", TOKEN), ("set-cookie", f"session={SESSION}"), ("x-seen", SESSION), ("x-api-key", PRIVATE)]
        send(port, [batch(entry("s1", PRIMARY, echoed, headers=headers, request_headers=request))])
        send(port, [batch(entry("s1", SHADOW, echoed + b" ", headers=headers, request_headers=request))])
        send(port, [batch(entry("s2", PRIMARY, echoed, headers=headers, request_headers=request))])  # stays pending
        store = CompareStore(tmp_path / "c.db", CONFIG)
        wait_until(lambda: len(store.comparisons("s1")) == 1 and store.pending_count() == 1, 10, "one join, one pending")
        store.close()
    finally:
        assert child.stop() == 0
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))
    assert b"shop/web/0" in stored
    for secret in (TOKEN.split()[1], SESSION, PRIVATE):
        assert secret.encode() not in stored, secret
    [left] = pending(tmp_path / "c.db").values()
    assert b'"n":1}' in left.body and b"(redacted)" in left.body
    assert dict(left.headers) == {"x-echo": "(redacted)", "x-seen": "(redacted)"}


def test_a_malformed_message_and_entries_without_a_tag_are_counted_and_the_stream_keeps_working(observer: Observer, tmp_path: Path) -> None:
    call = HeldOpen(observer.port)
    try:
        call.put(b"\xff\xff\xff garbage")
        wait_until(lambda: observer.dropped("malformed_message") == 1, 10, "the malformed message counted")
        untagged = [entry("u1", None), entry("u2", None, namespace=False), entry("u3", '{"side":"shadow","rule":"r","targets":["a","b"]}')]
        call.put(batch(*untagged, entry("ok", PRIMARY)))
        call.put(batch(entry("ok", SHADOW), entry("bad", PRIMARY, status=0, upstream_ms=None)))
        wait_until(lambda: observer.dropped("bad_tag") == 3, 10, "three entries without a proper tag")
        wait_until(lambda: observer.dropped("malformed_entry") == 1, 10, "the entry without a status")
        store = CompareStore(tmp_path / "c.db", CONFIG)
        wait_until(lambda: len(store.comparisons("ok")) == 1, 10, "the good entries still joined")
        assert not call.future.done()
    finally:
        assert call.close() == b""
    assert observer.connection_errors() == 0 and observer.alive()


def pending(db: Path) -> dict[str, Any]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT record, body FROM pending").fetchall()
    return {c.request_id: c for c in (decode_capture(r, b) for r, b in rows)}


def test_the_body_bound_and_the_filters_truncation(observer: Observer, tmp_path: Path) -> None:
    entries = [
        entry("whole", PRIMARY, b"a" * BODY_LIMIT),
        entry("long", PRIMARY, b"b" * (BODY_LIMIT + 500)),  # the filter's bound was larger than the observer's
        entry("cut", PRIMARY, b"c" * 10, truncated=True),  # the filter stopped at its own bound
    ]
    send(observer.port, [batch(*entries)])
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: store.pending_count() == 3, 10, "three pending")
    got = pending(tmp_path / "c.db")
    assert {rid: (len(c.body), c.body_truncated) for rid, c in got.items()} == {
        "whole": (BODY_LIMIT, False),
        "long": (BODY_LIMIT, True),
        "cut": (10, True),
    }


def test_a_local_reply_is_timed_by_envoys_entry(observer: Observer, tmp_path: Path) -> None:
    send(observer.port, [batch(entry("local", PRIMARY, b"no healthy upstream", status=503, upstream_ms=None))])
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: store.pending_count() == 1, 10, "pending")
    capture = pending(tmp_path / "c.db")["local"]
    assert capture.local_reply and capture.status == 503 and capture.latency_ms == pytest.approx(3.351)


def test_hostile_input_costs_its_stream_or_connection_only(observer: Observer, tmp_path: Path) -> None:
    # A message past the transport's 4 MiB bound: that stream ends RESOURCE_EXHAUSTED.
    huge = batch(entry("huge", PRIMARY, b"x" * (5 << 20)))
    with pytest.raises(grpc.RpcError) as refused:
        send(observer.port, [huge])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The ext_proc method is not the observer's.
    with grpc.insecure_channel(f"127.0.0.1:{observer.port}") as channel:
        with pytest.raises(grpc.RpcError) as unknown:
            list(channel.stream_stream(PROCESS_METHOD)(iter([b""]), timeout=10))
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Not HTTP/2 at all: that connection is closed and counted.
    with socket.create_connection(("127.0.0.1", observer.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        while raw.recv(65536):  # the GOAWAY, then the close
            pass
    wait_until(lambda: observer.connection_errors() == 1, 10, "the connection error counted")
    test_a_primary_and_a_shadow_entry_are_joined_and_judged(observer, tmp_path)
    assert observer.alive()


def test_sigterm_stores_what_was_captured_and_exits_zero(observer: Observer, tmp_path: Path) -> None:
    """The writer's batch window is not a loss, and a stream Envoy keeps open
    does not hold the exit: an entry taken just before SIGTERM is in the store
    once the observer has exited."""
    call = HeldOpen(observer.port)
    try:
        call.put(batch(entry("open", PRIMARY), first=True))
        # The call's response comes after its messages were taken: "last" was.
        assert send(observer.port, [batch(entry("last", PRIMARY), first=True)]) == b""
        assert observer.stop() == 0
    finally:
        call.channel.close()
    assert "last" in pending(tmp_path / "c.db")


def test_the_observer_answers_health_checks(observer: Observer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{observer.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_valid_edit_of_the_settings_applies_live_and_an_invalid_one_is_refused(observer: Observer, tmp_path: Path) -> None:
    def reloads(result: str) -> float:
        return scrape(observer.metrics_port, "mirror_sampler_compare_reloads_total", {"result": result})

    def judged(rid: str) -> list[tuple[Result, tuple[dict[str, str], ...]]]:
        send(observer.port, [batch(entry(rid, PRIMARY, b'{"v":1,"w":1}'), entry(rid, SHADOW, b'{"v":2,"w":2}'))])
        store = CompareStore(tmp_path / "c.db", CONFIG)
        wait_until(lambda: len(store.comparisons(rid)) == 1, timeout=10)
        return [(c.result, c.fields) for c in store.comparisons(rid)]

    assert judged("before") == [(Result.DIFFERS, ({"path": "body.v"}, {"path": "body.w"}))]
    settings = tmp_path / "compare.yaml"
    settings.write_text(f"compare:\n  rules:\n  - {{rule: {RULE}, targets: [candidate], ignore: [body.v]}}\n")
    wait_until(lambda: reloads("ok") == 1, timeout=10)
    assert judged("after") == [(Result.DIFFERS, ({"path": "body.w"},))]
    settings.write_text(f"compare:\n  rules:\n  - {{rule: {RULE}, targets: [candidate], ignor: [body.w]}}\n")
    wait_until(lambda: reloads("invalid") == 1, timeout=10)
    refusal = "compare.rules[0].ignor: unknown field; did you mean ignore?"
    wait_until(lambda: refusal in observer.output(), 10, "the observer logging why it refused the edit")
    assert judged("refused") == [(Result.DIFFERS, ({"path": "body.w"},))], "the settings in force stay"


ROUTES_WITH_COMPARE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {{name: shop}}
spec:
  compare:
    rules:
    - {{rule: default/shop/0, targets: [candidate]{extra}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: default}}
spec:
  rules:
  - backendRefs: [{{name: primary, port: 8080}}]
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: candidate, port: 8081}}, percent: 50}}
"""


def test_the_observer_reads_and_reloads_compare_from_the_routes_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_WITH_COMPARE.format(extra=""))
    argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--db", str(tmp_path / "c.db"), "--config", str(routes)]  # fmt: skip
    child = Child("observer", argv)
    try:
        ready = child.wait_event("compare_serving")
        assert ready["rules"] == ["default/shop/0"]
        metrics_port = int(ready["metrics_port"])

        def reloads(result: str) -> float:
            return scrape(metrics_port, "mirror_sampler_compare_reloads_total", {"result": result})

        routes.write_text(ROUTES_WITH_COMPARE.format(extra=", ignore: [body.v]"))
        wait_until(lambda: reloads("ok") == 1, timeout=10)
        routes.write_text(ROUTES_WITH_COMPARE.format(extra=", ignore: [body.v], ignore: [body.w]"))
        wait_until(lambda: reloads("invalid") == 1, timeout=10)
        refusal = "spec.compare.rules[0].ignore: duplicate key 'ignore' at line 7 (first at line 7)"
        wait_until(lambda: refusal in child.output(), 10, "the observer logging why it refused the edit")
        # The section removed: what Envoy still captures is judged with the settings in force.
        routes.write_text(
            ROUTES_WITH_COMPARE.format(extra="").replace(
                "  compare:\n    rules:\n    - {rule: default/shop/0, targets: [candidate]}\n", "  mirroring: Enabled\n"
            )
        )
        wait_until(lambda: reloads("invalid") == 2, timeout=10)
        wait_until(lambda: "no MirrorSampler document with spec.compare" in child.output(), 10, "the observer saying why")
        assert reloads("ok") == 1
    finally:
        child.stop()


def test_an_edit_made_between_start_up_and_the_watch_is_applied(tmp_path: Path) -> None:
    """The watch judges contents against the text the settings in force came
    from, not against what the file holds when the watch starts (regression:
    such an edit passed for the start-up settings and never applied)."""
    import asyncio

    from extproc.compare.capture import ObserverSettings, watch
    from extproc.compare.cli import parse_config_text
    from extproc.compare.metrics import CompareMetrics
    from extproc.compare.paths import Pattern

    path = tmp_path / "compare.yaml"
    start_up = "compare:\n  rules:\n  - {rule: r/x/0, targets: [b]}\n"
    config = parse_config_text(start_up, str(path))
    path.write_text(start_up.replace("targets: [b]", "targets: [b], ignore: [body.v]"))
    applied: list[CompareConfig] = []

    async def observe() -> None:
        stop = asyncio.Event()

        def apply(new: CompareConfig) -> None:
            applied.append(new)
            stop.set()

        settings = ObserverSettings(
            "127.0.0.1", 0, config, str(tmp_path / "c.db"), lambda t: parse_config_text(t, str(path)), str(path), start_up
        )
        await asyncio.wait_for(watch(settings, apply, CompareMetrics(), stop), timeout=10)

    asyncio.run(observe())
    assert [c.rule("r/x/0").diff_rules.ignored for c in applied] == [(Pattern.of("body.v"),)]


def test_odd_values_cost_their_entry_only_and_every_report_reads_the_store(observer: Observer, tmp_path: Path) -> None:
    """A status or an upstream time longer than Envoy's (past SQLite's
    integers, an infinite latency): the entry is refused and counted, or timed
    by Envoy's entry; the good entries join beside them, the observer serves
    on, and the reports read the store (an infinite latency made their JSON
    unreadable)."""
    entries = [
        entry("long-status", PRIMARY, headers=[(":status", "9" * 5000)]),
        entry("slow", PRIMARY, upstream_ms=None, headers=[("x-envoy-upstream-service-time", "9" * 400)]),
        entry("slow", SHADOW),
        entry("ok", PRIMARY),
        entry("ok", SHADOW),
    ]
    send(observer.port, [batch(*entries)])
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: all(store.comparisons(rid) for rid in ("slow", "ok")), 10, "the joins")
    assert observer.dropped("malformed_entry") == 1 and observer.dropped("store_failed") == 0
    assert store.comparisons("slow")[0].primary_ms == pytest.approx(3.351), "Envoy's timing of the stream, not infinity"
    report = subprocess.run(
        [sys.executable, "-m", "extproc", "compare", "report", "--db", str(tmp_path / "c.db"), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Infinity" not in report.stdout and json.loads(report.stdout)
    assert observer.alive()
