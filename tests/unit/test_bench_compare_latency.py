"""bench/compare_latency.py's arithmetic: which requests count, the two
differences and their intervals, and the verdict on issue 17's target."""

from __future__ import annotations

import random

from bench.compare_latency import Window, complete_rounds, differences, noisiest_table, noisiest_windows, pooled, read_window, verdict
from bench.procstat import MachineCpu, machine_cpu
from bench.run import percentile

HEADER = "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n"


def rounds_with(shift_ms: float, rounds: int = 40, seed: int = 1) -> list[Window]:
    """Rounds whose `on` latencies are `off`'s plus ``shift_ms``, each round with a
    noise of its own (a round's machine state reaches both sides)."""
    rng = random.Random(seed)
    out = []
    for round_ in range(rounds):
        state = rng.choice([1.0, 1.0, 2.0, 5.0])  # a noisy neighbour now and then
        off = [state * rng.expovariate(1 / 3) for _ in range(200)]
        out += [Window("off", round_, off, 0, 0), Window("on", round_, [v + shift_ms for v in off], 0, 0)]
    return out


def test_a_window_counts_only_requests_after_the_settling_time_that_answered_200() -> None:
    csv = HEADER + "0.0100,0.001,0,0,0,0,200,0.10\n0.0031,0,0,0,0,0,200,0.50\n0.0042,0,0,0,0,0,503,0.60\n0.0025,0,0,0,0,0,200,0.70\n"
    latencies, left_out, errors = read_window(csv, settle=0.5)
    assert [round(v, 6) for v in latencies] == [3.1, 2.5]
    assert (left_out, errors) == (1, 1)


def test_pooling_takes_a_resampled_round_as_often_as_it_is_drawn() -> None:
    windows = [Window("off", 0, [1.0], 0, 0), Window("off", 1, [2.0, 3.0], 0, 0), Window("on", 0, [9.0], 0, 0)]
    assert pooled(windows, "off") == [1.0, 2.0, 3.0]
    assert pooled(windows, "off", [1, 1, 0]) == [2.0, 3.0, 2.0, 3.0, 1.0]


def test_a_constant_shift_is_found_both_ways_at_every_percentile_with_no_spread() -> None:
    found = differences(rounds_with(0.5), "on", bootstrap=200, seed=3)
    for name in ("p50", "p99", "p99.9"):
        for key in ("ms", "low_ms", "high_ms", "round_ms", "round_low_ms", "round_high_ms"):
            assert abs(found[name][key] - 0.5) < 1e-9, (name, key)
    assert verdict(found["p99"]["low_ms"], found["p99"]["high_ms"]) == "met"


def test_a_shift_past_the_target_is_missed() -> None:
    found = differences(rounds_with(1.5), "on", bootstrap=200, seed=3)["p99"]
    assert verdict(found["low_ms"], found["high_ms"]) == "missed"
    assert verdict(found["round_low_ms"], found["round_high_ms"]) == "missed"


def test_an_interval_that_holds_the_target_tells_nothing_apart() -> None:
    assert verdict(0.2, 1.4) == "not told apart"
    assert verdict(-3.0, 0.99) == "met"
    assert verdict(1.01, 9.0) == "missed"


def test_within_the_target_includes_it_whatever_the_floating_point_says() -> None:
    assert 2.8 - 1.8 != 3.3 - 2.3  # both 1.0 ms on hey's 0.1 ms steps
    assert verdict(0.5, 2.8 - 1.8) == verdict(0.5, 3.3 - 2.3) == "met"
    assert verdict(3.3 - 2.3, 2.0) == "not told apart"


def test_a_round_with_an_empty_window_is_left_out() -> None:
    windows = [Window("off", 0, [1.0], 0, 0), Window("on", 0, [], 0, 0), Window("off", 1, [1.0], 0, 0), Window("on", 1, [2.0], 0, 0)]
    assert [(w.side, w.round) for w in complete_rounds(windows, ["off", "on"])] == [("off", 1), ("on", 1)]
    assert complete_rounds(windows[:1], ["off", "on"]) == []  # a side with no window at all


def test_percentiles_are_nearest_rank() -> None:
    hundred = [float(v) for v in range(1, 101)]
    assert (percentile(hundred, 50), percentile(hundred, 99), percentile(hundred, 99.9), percentile(hundred, 100)) == (50, 99, 100, 100)
    assert percentile([float(v) for v in range(1, 251)], 50) == 125
    assert percentile([float(v) for v in range(1, 11)], 50) == 5
    assert percentile([3.0], 1) == 3


def test_one_noisy_round_sets_the_pooled_p99_but_not_the_median_round() -> None:
    windows = rounds_with(0.0, rounds=20)
    for w in windows:
        if w.side == "on" and w.round == 0:  # only `on`'s window of round 0 met a neighbour
            w.latencies_ms = [v + 50 for v in w.latencies_ms]
    found = differences(windows, "on", bootstrap=300, seed=3)["p99"]
    assert found["ms"] > 1  # 200 of 4,000 `on` requests 50 ms later: more than the 1% the p99 leaves out
    assert found["round_ms"] == 0
    assert found["low_ms"] <= found["ms"] <= found["high_ms"]


def test_sides_drawn_apart_give_an_interval_around_their_difference() -> None:
    rng = random.Random(7)
    windows = []
    for round_ in range(30):
        state = rng.choice([1.0, 2.0, 5.0])  # both sides of a round meet the same neighbour, each its own draws
        windows += [Window(side, round_, [state * rng.expovariate(1 / 3) for _ in range(200)], 0, 0) for side in ("off", "on")]
    found = differences(windows, "on", bootstrap=300, seed=3)["p99"]
    assert found["low_ms"] < 0 < found["high_ms"]
    assert found["round_low_ms"] < 0 < found["round_high_ms"]


def test_the_noisiest_windows_are_told_apart_with_what_ran_in_them() -> None:
    windows = [Window(side, round_, [2.0 + i / 100 for i in range(100)], 0, 0) for round_ in range(20) for side in ("off", "on")]
    for w in windows:
        # Round 3's `on` window met another machine's work; every other window a quiet machine.
        noisy = w.side == "on" and w.round == 3
        w.latencies_ms = [v + 50 for v in w.latencies_ms] if noisy else w.latencies_ms
        w.steal_ms, w.waited_ms, w.others_ms, w.observers_ms = (900.0 if noisy else 10.0), 40.0, 5.0, (0.0 if w.side == "off" else 30.0)
    found = noisiest_windows(windows, ["off", "on"])
    on = found["on"]
    assert on["noisiest"]["windows"] == 1 and on["rest"]["windows"] == 19
    assert on["noisiest"]["steal_ms"] == 900 and on["rest"]["steal_ms"] == 10
    assert on["noisiest"]["observers_ms"] == on["rest"]["observers_ms"] == 30
    assert on["noisiest"]["tail_share"] == 1.0 and on["rest"]["tail_share"] == 0.0  # all of `on`'s tail is round 3's
    assert found["off"]["noisiest"]["steal_ms"] == 10
    rows = noisiest_table(found)
    assert rows[2].startswith("| off, noisiest | 1 |") and "| on, noisiest | 1 | " in rows[4] and "| 100% | 900 | 40 | 5 | 30 |" in rows[4]


def test_runs_that_recorded_no_witness_have_no_table_of_them() -> None:
    found = noisiest_windows(rounds_with(0.0, rounds=20), ["off", "on"])
    assert "steal_ms" not in found["on"]["noisiest"]
    assert noisiest_table(found) == []


def test_the_machine_s_cpu_only_grows_and_differences_say_what_passed() -> None:
    before = machine_cpu()
    sum(i * i for i in range(300_000))  # some work of this process
    spent = machine_cpu() - before
    assert spent.busy > 0 and spent.steal >= 0
    assert spent.waited is None or spent.waited >= 0
    assert MachineCpu(3.0, 1.0, None) - MachineCpu(1.0, 0.5, 2.0) == MachineCpu(2.0, 0.5, None)
