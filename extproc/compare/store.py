"""Captures and comparisons in one SQLite file, shared by every observer
process of this machine.

Either side of a request may reach any process, in any order. Each batch of
captures is written in one ``BEGIN IMMEDIATE`` transaction, which SQLite
serialises across processes: the writer that completes a request's group
(the primary and every target it names) finds the others already committed
(or in its own batch), removes the group and writes the comparisons, so each
request is judged exactly once.
``sweep`` closes groups that waited longer than the join timeout (missing
sides) and keeps pending captures and comparisons within their bounds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from .config import CompareConfig, RuleCompare
from .judge import Comparison, Pairing, including, pair_up, settle
from .noise import NO_RATES, Rates, Result
from .records import Capture, Side

SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    rule TEXT NOT NULL, request_id TEXT NOT NULL, side TEXT NOT NULL, target TEXT NOT NULL,
    record TEXT NOT NULL, body BLOB NOT NULL, captured_at REAL NOT NULL,
    PRIMARY KEY (rule, request_id, side, target)
);
CREATE INDEX IF NOT EXISTS pending_age ON pending (captured_at);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL, target TEXT NOT NULL, request_id TEXT NOT NULL, result TEXT NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL,
    primary_status INTEGER, shadow_status INTEGER, primary_ms REAL, shadow_ms REAL,
    fields TEXT NOT NULL, compared_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_by_target ON comparisons (rule, target, result);
CREATE INDEX IF NOT EXISTS comparisons_by_request ON comparisons (request_id);
CREATE INDEX IF NOT EXISTS comparisons_age ON comparisons (compared_at);
CREATE TABLE IF NOT EXISTS differing_fields (
    comparison_id INTEGER NOT NULL REFERENCES comparisons (id) ON DELETE CASCADE,
    rule TEXT NOT NULL, target TEXT NOT NULL, path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS differing_by_target ON differing_fields (rule, target, path);
CREATE INDEX IF NOT EXISTS differing_by_comparison ON differing_fields (comparison_id);
CREATE TABLE IF NOT EXISTS dropped (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS compared_counts (
    rule TEXT NOT NULL, target TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (rule, target)
);
CREATE TABLE IF NOT EXISTS field_counts (
    rule TEXT NOT NULL, target TEXT NOT NULL, path TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (rule, target, path)
);
"""
COMPARED = (Result.SAME.value, Result.DIFFERS.value, Result.NOISE_ONLY.value)


# Where the sweep forgets comparisons (``_forget``): by age, and past the bound.
OLDER_THAN = "compared_at < ?"
PAST_BOUND = "id <= (SELECT MAX(id) FROM comparisons) - ?"


def forgotten_counts(where: str) -> str:
    """The compared pairs ``where`` selects, per rule and target. ``+rule,
    +target``: grouping by the bare columns makes SQLite walk all of
    ``comparisons_by_target`` (the whole table, every sweep, every second:
    4 ms at 17k comparisons, 31 ms at the 100k bound) to save a sort; the
    unary plus (same values) leaves it the index of ``where`` (age or id), so a
    sweep reads only the rows it forgets."""
    placeholders = ",".join("?" * len(COMPARED))
    return f"SELECT rule, target, COUNT(*) FROM comparisons WHERE {where} AND result IN ({placeholders}) GROUP BY +rule, +target"


def encode_capture(capture: Capture) -> str:
    """Everything but the body (stored as it is, in its own column)."""
    data = {f.name: getattr(capture, f.name) for f in dataclass_fields(Capture) if f.name != "body"}
    data["side"] = capture.side.value
    return json.dumps(data, separators=(",", ":"))


def decode_capture(text: str, body: bytes) -> Capture:
    data = json.loads(text)
    data["body"] = body
    data["side"] = Side(data["side"])
    data["targets"] = tuple(data["targets"])
    data["headers"] = tuple((n, v) for n, v in data["headers"])
    return Capture(**data)


class CompareStore:
    def __init__(self, path: Path | str, config: CompareConfig, *, timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.config = config
        # Rules a live edit stopped comparing: their last settings, and until when they hold.
        self._retired: dict[str, tuple[RuleCompare, float]] = {}
        # Captures the last ``add`` or ``sweep`` dropped, by reason (for the
        # metrics), and the errors of the groups it could not judge (for the log).
        self.dropped_by_last_call: dict[str, int] = {}
        self.failures_of_last_call: list[BaseException] = []
        self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL makes NORMAL durable against process crashes (not power loss): enough for observations.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        # Deleted rows (joined captures with their bodies) are overwritten, not left in free pages.
        self.db.execute("PRAGMA secure_delete=ON")
        with self._write():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    def reconfigure(self, config: CompareConfig, now: float) -> None:
        """A live edit's settings, from ``now``. A rule the edit stops comparing
        keeps its last settings for the join timeout: its captures still on their
        way (taken before Envoy had the edit: `up` reloads Envoy after the
        observer has read the file) are judged as they were captured, not with
        the defaults of a rule nobody listed."""
        until = now + self.config.retention.join_timeout_s
        retired = {rule: kept for rule, kept in self._retired.items() if kept[1] > now and rule not in config.rules}
        retired.update({rule: (settings, until) for rule, settings in self.config.rules.items() if rule not in config.rules})
        self._retired = retired
        self.config = config

    def compares(self, rule: str, now: float) -> bool:
        """Whether captures of ``rule`` are to be judged: a rule the settings
        list, one an edit stopped comparing inside its grace, or any rule for
        settings not read from a file."""
        return self.listed_targets(rule, now) != ()

    def listed_targets(self, rule: str, now: float) -> tuple[str, ...] | None:
        """The targets ``rule`` compares (none: the rule is not compared), or
        None for any: settings not read from a file."""
        if not self.config.only_listed:
            return None
        settings = self._retired_settings(rule, now) or self.config.rules.get(rule)
        return settings.targets if settings is not None else ()

    def _settings(self, rule: str, now: float) -> RuleCompare:
        # Never both listed and retired: reconfigure drops a rule listed again.
        return self._retired_settings(rule, now) or self.config.rule(rule)

    def _retired_settings(self, rule: str, now: float) -> RuleCompare | None:
        """The last settings of a rule an edit stopped comparing, inside its grace."""
        retired = self._retired.get(rule)
        return retired[0] if retired is not None and now < retired[1] else None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ writing

    def add(self, captures: Sequence[Capture]) -> list[Comparison]:
        """Store captures (one transaction); the comparisons of every request
        they complete, as if they were added one at a time in order. A group
        is read once per batch and completed in memory: a request whose sides
        all arrive in one batch never touches ``pending``."""
        out: list[Comparison] = []
        groups: dict[tuple[str, str], _Group] = {}
        self._new_call()
        with self._write() as db:
            for capture in captures:
                key = (capture.rule, capture.request_id)
                group = groups.get(key)
                if group is None:
                    # A pending record this process cannot read is left to the sweep, which drops it.
                    group = groups[key] = _Group(self._readable(*key) or {})
                member = (capture.side.value, capture.target)
                group.members[member] = capture
                group.unsaved.add(member)
                primary, shadows = group.sides()
                if primary is not None and all(t in shadows for t in primary.targets):
                    if group.stored:
                        db.execute("DELETE FROM pending WHERE rule = ? AND request_id = ?", key)
                    out += self._judged(capture.rule, capture.request_id, primary, shadows, capture.captured_at, len(group.members))
                    groups[key] = _Group({})  # a later capture of it starts a new group
            db.executemany(
                "INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (c.rule, c.request_id, c.side.value, c.target, encode_capture(c), c.body, c.captured_at)
                    for group in groups.values()
                    for c in (group.members[m] for m in group.unsaved)
                ],
            )
        return out

    def sweep(self, now: float) -> list[Comparison]:
        """Judge the groups that waited past the join timeout; enforce the bounds."""
        retention = self.config.retention
        out: list[Comparison] = []
        self._new_call()
        with self._write() as db:
            stale = db.execute(
                "SELECT DISTINCT rule, request_id FROM pending WHERE captured_at < ?", (now - retention.join_timeout_s,)
            ).fetchall()
            for rule, request_id in stale:
                stored = self._readable(rule, request_id)
                gone = db.execute("DELETE FROM pending WHERE rule = ? AND request_id = ?", (rule, request_id)).rowcount
                if stored is None:
                    self._count_dropped("store_failed", gone)
                    continue
                if not self.compares(rule, now):
                    # Taken inside a live edit's grace, its other sides after it
                    # (the writer dropped those): judged now, it would be a
                    # shadow_missing for shadows that came, with the defaults.
                    self._count_dropped("unlisted_rule", len(stored))
                    continue
                primary, shadows = _Group(stored).sides()
                out += self._judged(rule, request_id, primary, shadows, now, len(stored))
            (pending,) = db.execute("SELECT COUNT(*) FROM pending").fetchone()
            if pending > retention.max_pending:
                excess = pending - retention.max_pending
                db.execute("DELETE FROM pending WHERE rowid IN (SELECT rowid FROM pending ORDER BY captured_at LIMIT ?)", (excess,))
                self._count_dropped("pending_over_bound", excess)
            self._forget(OLDER_THAN, (now - retention.max_age_s,))
            self._forget(PAST_BOUND, (retention.max_comparisons,))
        return out

    def _forget(self, where: str, params: tuple[Any, ...]) -> None:
        """Delete the comparisons ``where`` says, and take them out of the rates."""
        gone = self.db.execute(forgotten_counts(where), (*params, *COMPARED)).fetchall()
        self.db.executemany("UPDATE compared_counts SET count = count - ? WHERE rule = ? AND target = ?", [(n, r, t) for r, t, n in gone])
        fields = self.db.execute(
            "SELECT rule, target, path, COUNT(*) FROM differing_fields WHERE comparison_id IN"
            f" (SELECT id FROM comparisons WHERE {where}) GROUP BY rule, target, path",
            params,
        ).fetchall()
        self.db.executemany(
            "UPDATE field_counts SET count = count - ? WHERE rule = ? AND target = ? AND path = ?", [(n, r, t, p) for r, t, p, n in fields]
        )
        self.db.execute("DELETE FROM field_counts WHERE count <= 0")
        self.db.execute(f"DELETE FROM comparisons WHERE {where}", params)

    def _new_call(self) -> None:
        self.dropped_by_last_call = {}
        self.failures_of_last_call = []

    def _count_dropped(self, reason: str, n: int) -> None:
        """Counted in the file (for every process's report) and for this call's metrics."""
        self.db.execute("INSERT INTO dropped VALUES (?, ?) ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count", (reason, n))
        self.dropped_by_last_call[reason] = self.dropped_by_last_call.get(reason, 0) + n

    def _readable(self, rule: str, request_id: str) -> dict[tuple[str, str], Capture] | None:
        """``_stored``, or None when a record cannot be read (written by
        another version, or damaged): its error kept for the log."""
        try:
            return self._stored(rule, request_id)
        except Exception as e:
            self.failures_of_last_call.append(e)
            return None

    def _stored(self, rule: str, request_id: str) -> dict[tuple[str, str], Capture]:
        """A request's pending captures, by (side, target)."""
        return {
            (side, target): decode_capture(record, body)
            for side, target, record, body in self.db.execute(
                "SELECT side, target, record, body FROM pending WHERE rule = ? AND request_id = ?", (rule, request_id)
            )
        }

    def _judged(
        self, rule: str, request_id: str, primary: Capture | None, shadows: dict[str, Capture], now: float, captures: int
    ) -> list[Comparison]:
        """``_judge``, or, where judging this group fails, nothing: the group's
        captures are dropped and counted (``store_failed``), and the batch or
        sweep goes on. One group that cannot be judged (a value SQLite refuses,
        a bug) must not cost the others, nor stay pending to fail every sweep,
        in every observer of the file."""
        self.db.execute("SAVEPOINT judge")
        try:
            out = self._judge(rule, request_id, primary, shadows, now)
        except Exception as e:
            self.db.execute("ROLLBACK TO judge")
            self.db.execute("RELEASE judge")
            self._count_dropped("store_failed", captures)
            self.failures_of_last_call.append(e)
            return []
        self.db.execute("RELEASE judge")
        return out

    def _judge(self, rule: str, request_id: str, primary: Capture | None, shadows: dict[str, Capture], now: float) -> list[Comparison]:
        """The comparisons of one request's group (no longer pending)."""
        settings = self._settings(rule, now)
        pairings = pair_up(primary, shadows, settings.diff_rules, rule=rule, request_id=request_id)
        # The secondary first: this request's noise counts when its candidates are judged.
        pairings.sort(key=lambda p: p.target != settings.secondary)
        out = []
        for pairing in pairings:
            is_secondary = pairing.target == settings.secondary
            # The rates decide only a candidate's differences, and only against a secondary's noise.
            rates, noise = NO_RATES, None
            if pairing.paths and settings.secondary is not None and not is_secondary:
                rates = including(self.rates(rule, pairing.target), pairing.paths)
                noise = self.rates(rule, settings.secondary)
            result = settle(pairing, rates, noise, settings.margin, is_secondary=is_secondary)
            out.append(self._write_comparison(pairing, result, now))
        return out

    def _write_comparison(self, pairing: Pairing, result: Result, now: float) -> Comparison:
        p, s = pairing.primary, pairing.shadow
        shown = pairing.diff.fields if pairing.diff is not None else ()
        fields = tuple(
            {"path": f.path, "primary": f.primary, "shadow": f.shadow} if self.config.store_values else {"path": f.path} for f in shown
        )
        either = p or s
        assert either is not None
        comparison = Comparison(
            rule=pairing.rule,
            target=pairing.target,
            request_id=pairing.request_id,
            result=result,
            method=either.method,
            path=either.path,
            primary_status=p.status if p else None,
            shadow_status=s.status if s else None,
            primary_ms=p.latency_ms if p else None,
            shadow_ms=s.latency_ms if s else None,
            fields=fields,
            compared_at=now,
        )
        cursor = self.db.execute(
            "INSERT INTO comparisons (rule, target, request_id, result, method, path, primary_status, shadow_status,"
            " primary_ms, shadow_ms, fields, compared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                comparison.rule, comparison.target, comparison.request_id, result.value, comparison.method, comparison.path,
                comparison.primary_status, comparison.shadow_status, comparison.primary_ms, comparison.shadow_ms,
                json.dumps(fields), now,
            ),
        )  # fmt: skip
        if result.value in COMPARED:
            self.db.execute(
                "INSERT INTO compared_counts VALUES (?, ?, 1) ON CONFLICT (rule, target) DO UPDATE SET count = count + 1",
                (pairing.rule, pairing.target),
            )
        # Most pairs differ in nothing, and an executemany of no rows still
        # costs a statement's lookup and reset (a few µs each, per comparison).
        if pairing.paths:
            if result.value in COMPARED:
                self.db.executemany(
                    "INSERT INTO field_counts VALUES (?, ?, ?, 1) ON CONFLICT (rule, target, path) DO UPDATE SET count = count + 1",
                    [(pairing.rule, pairing.target, path) for path in set(pairing.paths)],
                )
            self.db.executemany(
                "INSERT INTO differing_fields VALUES (?, ?, ?, ?)",
                [(cursor.lastrowid, pairing.rule, pairing.target, path) for path in pairing.paths],
            )
        return comparison

    # ------------------------------------------------------------------ reading

    def rates(self, rule: str, target: str) -> Rates:
        """How often each field differed among the compared pairs kept (counts
        kept up to date on every write and deletion: no scan per verdict)."""
        row = self.db.execute("SELECT count FROM compared_counts WHERE rule = ? AND target = ?", (rule, target)).fetchone()
        rows = self.db.execute("SELECT path, count FROM field_counts WHERE rule = ? AND target = ?", (rule, target)).fetchall()
        return Rates(row[0] if row else 0, {path: n for path, n in rows})

    def comparisons(self, request_id: str | None = None) -> list[Comparison]:
        query = (
            "SELECT rule, target, request_id, result, method, path, primary_status, shadow_status,"
            " primary_ms, shadow_ms, fields, compared_at FROM comparisons"
        )
        rows = (
            self.db.execute(query + " WHERE request_id = ? ORDER BY id", (request_id,))
            if request_id
            else self.db.execute(query + " ORDER BY id")
        )
        return [_comparison(row) for row in rows]

    def pending_count(self) -> int:
        (n,) = self.db.execute("SELECT COUNT(*) FROM pending").fetchone()
        return int(n)

    def dropped(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count FROM dropped").fetchall())


class _Group:
    """One request's captures while a batch is added: those already pending
    (``stored``) and those of the batch not yet written (``unsaved``)."""

    __slots__ = ("members", "stored", "unsaved")

    def __init__(self, stored: dict[tuple[str, str], Capture]) -> None:
        self.members = stored
        self.stored = bool(stored)
        self.unsaved: set[tuple[str, str]] = set()

    def sides(self) -> tuple[Capture | None, dict[str, Capture]]:
        primary = None
        shadows = {}
        for (side, target), capture in self.members.items():
            if side == Side.PRIMARY.value:
                primary = capture
            else:
                shadows[target] = capture
        return primary, shadows


def _comparison(row: Sequence[Any]) -> Comparison:
    rule, target, request_id, result, method, path, ps, ss, pm, sm, fields, at = row
    return Comparison(rule, target, request_id, Result(result), method, path, ps, ss, pm, sm, tuple(json.loads(fields)), at)
