"""The rested-wake benchmark's arithmetic (issue 17 item 1) on made-up runs; the wakes need a GPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_wake_rested as bench  # noqa: E402

GB = int(1e9)


def run(mode, rest, wake, map_s):
    return {"mode": mode, "rest_s": rest, "wake_s": wake, "core_s": wake - 0.001, "map_s": map_s,
            "bytes_copied": 16 * GB}


def test_medians_rates_and_the_verdict():
    runs = [run("primed", 2.0, w, 0.015) for w in (0.300, 0.305, 0.400)]
    runs += [run("unprimed", 2.0, w, 0.045) for w in (0.330, 0.335, 0.331)]
    runs += [run("primed", 0.0, 0.45, 0.25)]
    s = bench.summarize(runs, limit_gbps=55.0)
    p = s["primed rest 2 s"]
    assert p["wake_s"] == 0.305 and p["reps"] == 3 and p["map_ms"] == pytest.approx(15.0)
    assert p["x_limit"] == pytest.approx(16 / 0.305 / 55.0)
    (line,) = bench.verdicts(s, 2.0)
    assert line.startswith("WAKE-RESTED primed 0.305 s (0.954 x limit, driver map 15.0 ms) against unprimed 0.331 s")
    assert "+26.0 ms saved" in line and line.endswith("MET") and "NOT MET" not in line
    assert bench.verdicts(s, 1.0) == []  # no such rest measured
    assert len(bench.table(s)) == 4


def test_a_slow_primed_wake_is_not_met():
    s = bench.summarize([run("primed", 2.0, 0.33, 0.02), run("unprimed", 2.0, 0.34, 0.05)], limit_gbps=55.0)
    assert bench.verdicts(s, 2.0)[0].endswith("NOT MET")


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--reps", "0"])
    assert "--reps must be > 0" in capsys.readouterr().err
