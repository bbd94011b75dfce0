"""The SQLite store: joins across processes, the join timeout, the bounds."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from extproc.compare.config import CompareConfig, Retention, RuleCompare
from extproc.compare.judge import Comparison
from extproc.compare.noise import Rates, Result
from extproc.compare.records import Capture, Side
from extproc.compare.store import CompareStore
from tests.support.procs import wait_until

RULE = "shop/web/0"
CONFIG = CompareConfig(rules={RULE: RuleCompare(targets=("candidate", "secondary"), secondary="secondary")})
TARGETS = ("candidate", "secondary")


def capture(request_id: str, side: Side, target: str = "", at: float = 1000.0, body: bytes = b'{"v":1}', status: int = 200) -> Capture:
    targets = TARGETS if side is Side.PRIMARY else (target,)
    return Capture(request_id, RULE, side, targets, "GET", "/x", status, (), body, False, 5.0, False, at)


def sides(request_id: str) -> list[Capture]:
    """A request's three captures; the candidate differs on v for even ids."""
    n = int(request_id.split("-")[1])
    return [
        capture(request_id, Side.PRIMARY),
        capture(request_id, Side.SHADOW, "secondary"),
        capture(request_id, Side.SHADOW, "candidate", body=b'{"v":2}' if n % 2 == 0 else b'{"v":1}'),
    ]


def write(db: str, captures: list[Capture], seed: int) -> None:
    """One worker: its captures one by one, in its own order."""
    store = CompareStore(db, CONFIG)
    random.Random(seed).shuffle(captures)
    for c in captures:
        store.add([c])
    store.close()


def test_two_processes_writing_the_two_sides_join_every_request_exactly_once(tmp_path: Path) -> None:
    db = str(tmp_path / "compare.db")
    CompareStore(db, CONFIG).close()
    ids = [f"req-{i}" for i in range(300)]
    # Each capture goes to one of two workers at random: a request's sides
    # are split between processes in every way, in every order.
    rng = random.Random(7)
    shares: list[list[Capture]] = [[], []]
    for rid in ids:
        for c in sides(rid):
            shares[rng.randrange(2)].append(c)
    assert all(shares)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=write, args=(db, share, seed)) for seed, share in enumerate(shares)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    store = CompareStore(db, CONFIG)
    comparisons = store.comparisons()
    assert Counter((c.request_id, c.target) for c in comparisons) == Counter({(rid, t): 1 for rid in ids for t in TARGETS})
    assert store.pending_count() == 0
    results = Counter((c.target, c.result) for c in comparisons)
    assert results == {("secondary", Result.SAME): 300, ("candidate", Result.DIFFERS): 150, ("candidate", Result.SAME): 150}
    assert store.rates(RULE, "candidate").differing == {"body.v": 150}


@pytest.mark.parametrize("seed", range(8))
def test_a_batch_is_stored_as_if_its_captures_came_one_at_a_time(tmp_path: Path, seed: int) -> None:
    """The writer adds what it dequeued in one transaction, joining the batch's
    groups in memory: same comparisons in the same order, same rows pending,
    with sides missing, sides repeated and requests completed inside a batch."""
    rng = random.Random(seed)
    captures: list[Capture] = []
    for i in range(40):
        for c in sides(f"req-{i}"):
            captures += [c] * rng.choices((0, 1, 2), (0.1, 0.8, 0.1))[0]
    rng.shuffle(captures)
    one, batched = CompareStore(tmp_path / "one.db", CONFIG), CompareStore(tmp_path / "batched.db", CONFIG)
    expected = [judged for c in captures for judged in one.add([c])]
    got: list[Comparison] = []
    start = 0
    while start < len(captures):
        size = rng.randint(1, 25)
        got += batched.add(captures[start : start + size])
        start += size

    def pending(store: CompareStore) -> list[tuple[str, ...]]:
        return store.db.execute("SELECT rule, request_id, side, target, record FROM pending ORDER BY 1, 2, 3, 4").fetchall()

    assert got == expected and len(expected) > 40
    assert pending(batched) == pending(one) != []
    assert batched.rates(RULE, "candidate") == one.rates(RULE, "candidate")


def test_a_group_that_waits_past_the_join_timeout_is_judged_with_what_came(tmp_path: Path) -> None:
    config = CompareConfig(rules=CONFIG.rules, retention=Retention(join_timeout_s=10))
    store = CompareStore(tmp_path / "c.db", config)
    assert store.add([capture("a", Side.PRIMARY, at=100.0), capture("a", Side.SHADOW, "secondary", at=100.0)]) == []
    assert store.add([capture("b", Side.SHADOW, "candidate", at=100.0)]) == []
    assert store.add([capture("c", Side.PRIMARY, at=105.0)]) == []
    assert store.sweep(now=109.0) == [], "nothing is late yet"
    late = store.sweep(now=111.0)
    assert sorted((c.request_id, c.target, c.result) for c in late) == [
        ("a", "candidate", Result.SHADOW_MISSING),
        ("a", "secondary", Result.SAME),
        ("b", "candidate", Result.PRIMARY_MISSING),
    ]
    assert store.pending_count() == 1, "c waits on"


def test_a_rule_a_live_edit_stops_comparing_keeps_its_settings_for_the_join_timeout(tmp_path: Path) -> None:
    """Its captures still on their way (Envoy reloads after the observer) are judged
    with the settings they were captured under, then with a listed rule's defaults."""
    from extproc.compare.differ import DiffRules
    from extproc.compare.paths import Pattern

    ignoring = RuleCompare(targets=("candidate",), diff_rules=DiffRules(ignored=(Pattern.of("body.v"),)))
    store = CompareStore(tmp_path / "c.db", CompareConfig(rules={RULE: ignoring}, retention=Retention(join_timeout_s=10)))

    def judged(request_id: str, at: float) -> Result:
        primary = Capture(request_id, RULE, Side.PRIMARY, ("candidate",), "GET", "/x", 200, (), b'{"v":1}', False, 5.0, False, at)
        shadow = capture(request_id, Side.SHADOW, "candidate", at=at, body=b'{"v":2}')
        (comparison,) = store.add([primary, shadow])
        return comparison.result

    assert judged("before", 100.0) == Result.SAME
    store.reconfigure(CompareConfig(rules={"other/rule/0": RuleCompare(targets=("candidate",))}), now=100.0)
    assert judged("in-flight", 109.0) == Result.SAME, "the edit's rule kept its ignore rules"
    assert judged("late", 111.0) == Result.DIFFERS, "past the join timeout: no settings of its own"
    store.reconfigure(CompareConfig(rules={RULE: RuleCompare(targets=("candidate",))}), now=112.0)
    assert judged("listed", 113.0) == Result.DIFFERS, "listed again: its new settings, not the retired ones"


def test_settings_from_a_file_judge_only_the_rules_they_list(tmp_path: Path) -> None:
    """An Envoy rendered from older settings still captures a rule the file no
    longer lists: past the edit's grace its captures are dropped and counted,
    not judged with the defaults (no ignore rules, no secondary)."""
    from dataclasses import replace

    from extproc.compare.capture import Writer
    from extproc.compare.metrics import CompareMetrics

    listed = replace(CONFIG, retention=Retention(join_timeout_s=10), only_listed=True)
    other = replace(listed, rules={"other/rule/0": RuleCompare(targets=("candidate",))})
    now = [100.0]
    metrics = CompareMetrics()
    metrics.declare(listed)  # every drop reason exported at 0
    writer = Writer(lambda: CompareStore(tmp_path / "c.db", listed), metrics, clock=lambda: now[0], window=0, config=listed)
    writer.start()

    def judged(request_id: str) -> tuple[int, float | None]:
        for c in sides(request_id):
            writer.offer(c)
        wait_until(lambda: writer.queued_bytes == 0, 10, f"{request_id} taken")
        store = CompareStore(tmp_path / "c.db", CONFIG)
        try:
            comparisons = len(store.comparisons(request_id))
        finally:
            store.close()
        return comparisons, metrics.registry.get_sample_value("mirror_sampler_compare_dropped_total", {"reason": "unlisted_rule"})

    try:
        assert judged("listed-0") == (2, 0.0)
        writer.config = other  # a live edit stops comparing RULE
        assert judged("ingrace-1") == (2, 0.0), "inside the join timeout: still compared"
        now[0] = 111.0
        with structlog.testing.capture_logs() as logged:
            assert judged("pastgrace-2") == (0, 3.0), "dropped and counted"
            assert judged("pastgrace-3") == (0, 6.0)
    finally:
        writer.stop()
    named = [e for e in logged if e["event"] == "compare_rule_not_listed"]
    assert [e["rule"] for e in named] == [RULE], "named once, not per capture"
    without_file = CompareStore(tmp_path / "d.db", replace(other, only_listed=False))
    assert without_file.compares(RULE, 0.0), "settings not from a file compare every rule"


def test_a_group_begun_in_the_grace_and_swept_after_it_is_dropped_not_judged(tmp_path: Path) -> None:
    """Its primary came inside the edit's grace, its shadows after (the writer
    dropped them): judged at the join timeout it would be shadow_missing, with
    the defaults, for shadows that came."""
    listed = CompareConfig(rules=CONFIG.rules, retention=Retention(join_timeout_s=10), only_listed=True)
    store = CompareStore(tmp_path / "c.db", listed)
    store.reconfigure(CompareConfig(retention=listed.retention, only_listed=True), now=100.0)
    assert store.compares(RULE, 105.0) and not store.compares(RULE, 110.0)
    assert store.add([capture("begun", Side.PRIMARY, at=105.0)]) == []
    assert store.sweep(now=116.0) == []
    assert store.dropped_by_last_call == {"unlisted_rule": 1} and store.dropped() == {"unlisted_rule": 1}
    assert store.pending_count() == 0


def test_pending_captures_and_comparisons_stay_within_their_bounds(tmp_path: Path) -> None:
    retention = Retention(max_comparisons=20, max_age_s=50, max_pending=5, join_timeout_s=1000)
    store = CompareStore(tmp_path / "c.db", CompareConfig(rules=CONFIG.rules, retention=retention))
    for i in range(12):
        store.add([capture(f"lonely-{i}", Side.PRIMARY, at=100.0 + i)])
    for i in range(30):
        store.add(sides(f"req-{i}"))
    store.sweep(now=120.0)
    assert store.pending_count() == 5
    assert store.dropped() == {"pending_over_bound": 7}
    kept = store.comparisons()
    assert len(kept) == 20 and kept[-1].request_id == "req-29", "the newest are kept"
    # The rates follow what is kept, without rescanning it.
    for target in TARGETS:
        rows = [c for c in kept if c.target == target]
        paths = Counter(f["path"] for c in rows for f in c.fields)
        assert store.rates(RULE, target) == Rates(len(rows), dict(paths))
    store.sweep(now=1000.0 + 51)
    assert store.comparisons() == [], "older than max_age"
    assert store.rates(RULE, "candidate").compared == 0, "the field rows went with their comparisons"


def test_bodies_and_values_are_kept_only_when_enabled(tmp_path: Path) -> None:
    quiet = CompareStore(tmp_path / "a.db", CONFIG)
    [secondary, candidate] = sorted(quiet.add(sides("req-0")), key=lambda c: c.target != "secondary")
    assert candidate.fields == ({"path": "body.v"},)
    loud = CompareStore(tmp_path / "b.db", CompareConfig(rules=CONFIG.rules, store_values=True))
    found = {c.target: c for c in loud.add(sides("req-0"))}
    assert found["candidate"].fields == ({"path": "body.v", "primary": "1", "shadow": "2"},)
    assert secondary.result is Result.SAME


def test_ten_thousand_requests_that_never_join_are_dropped_to_the_bound_and_counted(tmp_path: Path) -> None:
    retention = Retention(max_pending=1000, join_timeout_s=1e6)
    store = CompareStore(tmp_path / "c.db", CompareConfig(rules=CONFIG.rules, retention=retention))
    store.add([capture(f"lonely-{i}", Side.PRIMARY, at=float(i)) for i in range(10_000)])
    store.sweep(now=10_000.0)
    assert store.pending_count() == 1000
    assert store.dropped() == {"pending_over_bound": 9000} and store.dropped_by_last_call == {"pending_over_bound": 9000}
    # The oldest went: a late shadow of a kept request still joins.
    late = store.add([capture("lonely-9999", Side.SHADOW, t) for t in TARGETS])
    assert {c.result for c in late} == {Result.SAME}


def _stalled_writer(tmp_path: Path, bound: int = 10_000, byte_bound: int = 2**30) -> tuple[Any, Any, threading.Event]:
    """A writer (not started) whose store waits for the event before it stores."""
    from extproc.compare.capture import Writer
    from extproc.compare.metrics import CompareMetrics

    release = threading.Event()

    class SlowStore(CompareStore):
        def add(self, captures: Sequence[Capture]) -> list[Comparison]:
            release.wait(30)
            return super().add(captures)

    metrics = CompareMetrics()
    return Writer(lambda: SlowStore(tmp_path / "c.db", CONFIG), metrics, bound=bound, byte_bound=byte_bound), metrics, release


def _queue_full(metrics: Any) -> float | None:
    value: float | None = metrics.registry.get_sample_value("mirror_sampler_compare_dropped_total", {"reason": "queue_full"})
    return value


def test_a_full_writer_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    writer, metrics, release = _stalled_writer(tmp_path, bound=10)
    for i in range(50):
        writer.offer(capture(f"r{i}", Side.PRIMARY))  # never blocks
    assert _queue_full(metrics) == 40
    writer.start()
    wait_until(writer.queue.empty, 10, "the writer holding its batch, its store stalled")
    for i in range(50, 60):
        writer.offer(capture(f"r{i}", Side.PRIMARY))  # the queue has room again; offers still never wait
    assert _queue_full(metrics) == 40
    release.set()
    writer.stop()
    assert CompareStore(tmp_path / "c.db", CONFIG).pending_count() == 20


def test_a_writer_queue_is_bounded_in_bytes_until_its_batch_is_stored(tmp_path: Path) -> None:
    body = b"x" * (100 * 1024)
    writer, metrics, release = _stalled_writer(tmp_path, byte_bound=2**20)
    for i in range(50):
        writer.offer(capture(f"r{i}", Side.PRIMARY, body=body))
    # Ten 100 KiB captures fit in 1 MiB, far below the count bound.
    assert _queue_full(metrics) == 40
    assert writer.queued_bytes <= 2**20
    writer.start()
    wait_until(writer.queue.empty, 10, "the writer holding its batch, its store stalled")
    for i in range(50, 55):
        writer.offer(capture(f"r{i}", Side.PRIMARY, body=body))
    assert _queue_full(metrics) == 45, "a batch being stored still counts against the bound"
    release.set()
    writer.stop()
    assert writer.queued_bytes == 0, "every capture stored gives its bytes back"
    assert CompareStore(tmp_path / "c.db", CONFIG).pending_count() == 10


def test_the_writer_pauses_its_window_before_every_batch_even_with_a_backlog(tmp_path: Path) -> None:
    """The pause per batch is the writer's cap (and so its CPU's, beside Envoy's,
    under saturation): a backlog of two full batches is two batches, two pauses."""
    from extproc.compare.capture import BATCH_MAX, Writer
    from extproc.compare.metrics import CompareMetrics

    pauses: list[float] = []
    writer = Writer(lambda: CompareStore(tmp_path / "c.db", CONFIG), CompareMetrics(), window=0.25, pause=pauses.append)
    for i in range(2 * BATCH_MAX):
        writer.offer(capture(f"r{i}", Side.PRIMARY))
    writer.start()
    try:
        wait_until(lambda: writer.queued_bytes == 0, 30, "both batches stored")
    finally:
        writer.stop()
    assert pauses == [0.25, 0.25]
    assert CompareStore(tmp_path / "c.db", CONFIG).pending_count() == 2 * BATCH_MAX


def test_a_capture_larger_than_the_byte_bound_still_enters_an_empty_queue(tmp_path: Path) -> None:
    from extproc.compare.capture import Writer
    from extproc.compare.metrics import CompareMetrics

    metrics = CompareMetrics()
    writer = Writer(lambda: CompareStore(tmp_path / "c.db", CONFIG), metrics, byte_bound=1024)  # not started: nothing is taken
    big = capture("big", Side.PRIMARY, body=b"x" * 4096)
    writer.offer(big)
    writer.offer(capture("small", Side.PRIMARY))
    assert writer.queued_bytes == big.weight > 4096
    assert metrics.registry.get_sample_value("mirror_sampler_compare_dropped_total", {"reason": "queue_full"}) == 1


def test_a_sweep_reads_only_what_it_forgets(tmp_path: Path) -> None:
    """Every second, on a table of up to max_comparisons rows: none of the
    sweep's statements may walk all of ``comparisons`` (its rows or an index's)."""
    store = CompareStore(tmp_path / "c.db", CONFIG)
    for i in range(50):
        store.add(sides(f"req-{i}"))
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.sweep(now=2000.0)
    store.db.set_trace_callback(None)
    plans = {
        sql: [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for sql in statements
        if sql.split()[0] in ("SELECT", "DELETE", "UPDATE")
    }
    assert len(plans) >= 6, statements
    walks = {sql: plan for sql, plan in plans.items() if any(step.startswith("SCAN comparisons") for step in plan)}
    assert walks == {}


# ---------------------------------------------------------------------------
# One group that cannot be judged costs that group only


def test_a_group_sqlite_refuses_is_dropped_and_counted_and_the_batch_is_stored(tmp_path: Path) -> None:
    store = CompareStore(tmp_path / "c.db", CONFIG)
    poisoned = [capture("bad-1", Side.PRIMARY, status=10**20), *sides("bad-1")[1:]]  # past SQLite's integers
    comparisons = store.add([*sides("req-0"), *poisoned, *sides("req-1")])
    assert sorted({c.request_id for c in comparisons}) == ["req-0", "req-1"]
    assert store.dropped_by_last_call == {"store_failed": 3} and store.dropped() == {"store_failed": 3}
    assert [type(e) for e in store.failures_of_last_call] == [OverflowError]
    assert store.pending_count() == 0 and store.comparisons("bad-1") == []


def test_a_pending_record_no_one_can_read_is_dropped_by_the_sweep_which_goes_on(tmp_path: Path) -> None:
    """Stayed pending, it would fail every sweep of every observer of the file."""
    retention = Retention(join_timeout_s=10)
    store = CompareStore(tmp_path / "c.db", CompareConfig(rules=CONFIG.rules, retention=retention))
    store.add([capture("lonely-1", Side.PRIMARY, at=100.0)])
    store.add([capture("damaged-2", Side.PRIMARY, at=100.0)])
    store.db.execute("UPDATE pending SET record = '{not json' WHERE request_id = 'damaged-2'")
    swept = store.sweep(now=200.0)
    assert [(c.request_id, c.result) for c in swept] == [("lonely-1", Result.SHADOW_MISSING)] * 2
    assert store.dropped_by_last_call == {"store_failed": 1} and store.pending_count() == 0
    assert store.sweep(now=300.0) == [] and store.dropped_by_last_call == {}


def test_the_writer_outlives_a_failed_sweep_and_stores_the_next_batch(tmp_path: Path) -> None:
    from extproc.compare.capture import Writer
    from extproc.compare.metrics import CompareMetrics

    class FailingOnce(CompareStore):
        failed = False

        def sweep(self, now: float) -> list[Comparison]:
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise RuntimeError("the disk is full")
            return super().sweep(now)

    now = [100.0]
    writer = Writer(lambda: FailingOnce(tmp_path / "c.db", CONFIG), CompareMetrics(), clock=lambda: now[0], window=0)
    writer.start()
    try:
        with structlog.testing.capture_logs() as logged:
            for c in sides("req-0"):
                writer.offer(c)
            wait_until(lambda: writer.queued_bytes == 0, 10, "the first batch taken")
            now[0] = 200.0  # past the first sweep's time
            wait_until(lambda: FailingOnce.failed, 10, "the failed sweep")
            for c in sides("req-1"):
                writer.offer(c)
            wait_until(lambda: writer.queued_bytes == 0, 10, "the next batch taken")
        assert writer.thread.is_alive()
    finally:
        writer.stop()
    store = CompareStore(tmp_path / "c.db", CONFIG)
    assert {c.request_id for c in store.comparisons()} == {"req-0", "req-1"}
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["compare_sweep_failed"]


def test_captures_naming_targets_the_settings_do_not_list_are_dropped_and_counted(tmp_path: Path) -> None:
    """A target is a label of the metrics: a capture must not make them grow;
    a primary naming one waits for the listed targets only."""
    from dataclasses import replace

    from extproc.compare.capture import Writer
    from extproc.compare.metrics import CompareMetrics

    listed = replace(CONFIG, only_listed=True)
    metrics = CompareMetrics()
    writer = Writer(lambda: CompareStore(tmp_path / "c.db", listed), metrics, window=0, config=listed)
    writer.start()
    made_up = [capture("req-1", Side.SHADOW, f"made-up-{i}") for i in range(50)]
    primary = replace(capture("req-1", Side.PRIMARY), targets=(*TARGETS, "made-up-0"))
    try:
        for c in [primary, *sides("req-1")[1:], *made_up]:
            writer.offer(c)
        wait_until(lambda: writer.queued_bytes == 0, 10, "the captures taken")
    finally:
        writer.stop()
    store = CompareStore(tmp_path / "c.db", CONFIG)
    assert sorted((c.target, c.result) for c in store.comparisons()) == [("candidate", Result.SAME), ("secondary", Result.SAME)]
    assert store.pending_count() == 0
    assert metrics.registry.get_sample_value("mirror_sampler_compare_dropped_total", {"reason": "unlisted_target"}) == 50
    targets = {s.labels["target"] for family in metrics.registry.collect() for s in family.samples if "target" in s.labels}
    assert targets <= set(TARGETS)
