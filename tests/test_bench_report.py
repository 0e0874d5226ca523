"""The benchmark's report and targets, on a made-up result (no GPU: the report is pure logic)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from sleepbench import report, targets  # noqa: E402
from sleepbench import workers  # noqa: E402,F401  (the worker side imports without a GPU)

GiB = 1 << 30


def _op(gbps, host_ratio=None, returned=None, **extra):
    rec = {"seconds": 1.0, "bytes": GiB, "gbps": gbps, "internal_gbps": gbps}
    if host_ratio is not None:
        rec["host_ratio"] = host_ratio
    if returned is not None:
        rec["returned_pct"] = returned
    rec.update(extra)
    return rec


def _results():
    return {
        "config": {"load_gib": 1.0, "peer_gib": 1.0},
        "limit": {"sizes": {"1.0": {"d2h_gbps": 50.0, "h2d_gbps": 50.0}}, "pin_alloc_s": 1.0,
                  "pin_alloc_bytes": GiB},
        "level1": {"1.0": {
            "first_sleep": _op(40.0, 1.0, 100.0), "first_wake": _op(49.0),
            "warm_sleep": [_op(49.0, 1.0, 100.0), _op(48.0, 1.0, 100.0)],
            "warm_wake": [_op(49.5), _op(49.5)],
        }},
        "level2": {"weights_bytes": GiB, "kv_bytes": GiB, "clamped": False, "buffer_bytes": 1 << 20,
                   "pause_s": 1.0,
                   "cycles": [{"sleep_ms": 5, "wake_weights_ms": 10, "wake_kv_ms": 10, "total_ms": 25,
                               "returned_pct": 99.95, "buffers_intact": True, "preserved_bytes": 1 << 20}] * 3,
                   "cycles_no_pause": [{"sleep_ms": 5, "wake_weights_ms": 20, "wake_kv_ms": 20, "total_ms": 45,
                                        "returned_pct": 99.95, "buffers_intact": True}] * 3},
        "load": {"torch_s": 1.0, "pool_s": 1.05, "ratio": 1.05},
        "host": {"size_gib": 1.0, "prepare_s": 0.5, "prepare_error": "", "serving_steps_per_s_before": 200.0,
                 "serving_steps_per_s_during": 190.0, "serving_probe_overlapped": True,
                 "first_sleep": _op(48.0, stats={"last_sleep": {"populate_seconds": 0.0, "pin_seconds": 0.0}}),
                 "policies": {p: {"sleep": [_op(g), _op(g)], "wake": [_op(49.0)] * 2,
                                  "awake": [{"host_bytes": held, "pinned_bytes": pinned}] * 2}
                              for p, g, held, pinned in (("pinned", 49.0, GiB, GiB), ("reclaimable", 44.0, GiB, 0),
                                                         ("release", 20.0, 0, 0))}},
    }


def by_figure(rows):
    return {(r.figure, r.size_gib): r for r in rows}


def test_report_judges_each_figure_against_the_spec_targets():
    rows = by_figure(report.build_rows(_results()))
    first = rows[("ext: L1 first sleep", 1.0)]
    assert first.ratio == 0.8 and first.verdict == "FAIL" and first.target == targets.target("first_sleep_x").text
    assert rows[("ext: L1 warm sleep (median)", 1.0)].verdict == "PASS"  # 48.5 / 50 = 0.97
    assert rows[("ext: L1 warm wake (median)", 1.0)].verdict == "PASS"
    assert rows[("ext: host bytes / backed up, keep_host_backups=True", 1.0)].verdict == "PASS"
    l2 = [r for r in rows.values() if r.figure.startswith("L2 sleep + wake, median")]
    assert {r.figure: r.verdict for r in l2} == {"L2 sleep + wake, median, 1 s pause": "PASS",
                                                  "L2 sleep + wake, median, no pause": "info"}
    assert rows[("load: pool / torch time", 1.0)].verdict == "PASS"


def test_report_shows_each_host_policy_and_the_first_sleep_after_prepare():
    rows = by_figure(report.build_rows(_results()))
    assert rows[("ext: L1 first sleep after background prepare", 1.0)].verdict == "PASS"  # 0.96x
    assert rows[("ext: L1 warm sleep, host_policy=pinned", 1.0)].verdict == "PASS"
    reclaimable = rows[("ext: L1 warm sleep, host_policy=reclaimable", 1.0)]
    assert reclaimable.verdict == "FAIL" and reclaimable.target == targets.target("reclaimable_warm_x").text  # 0.88x
    assert rows[("ext: L1 warm sleep, host_policy=release", 1.0)].verdict == "info"
    assert rows[("ext: host bytes pinned while awake, host_policy=reclaimable", 1.0)].value == 0
    assert rows[("ext: host bytes held while awake / backed up, host_policy=pinned", 1.0)].value == 1.0
    assert rows[("ext: serving-like steps/s during background prepare / before", 1.0)].value == 0.95


def test_targets_read_from_one_table():
    assert targets.target("l2_ms").verdict(30.0) == "PASS" and targets.target("l2_ms").verdict(30.1) == "FAIL"
    assert targets.target("warm_x").verdict(None) == "n/a"
    assert targets.TARGETS["reclaimable_warm_x"].bound == 0.9


def test_report_writes_table_and_json(tmp_path):
    res = _results()
    rows = report.build_rows(res)
    report.write_outputs(res, rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| figure |") and "ext: L1 first sleep" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["failed"] == ["ext: L1 first sleep @ 1 GiB",
                                         "ext: L1 warm sleep, host_policy=reclaimable @ 1 GiB"]


def test_bench_command_line_parses_without_a_gpu():
    out = subprocess.run([sys.executable, str(BENCH / "bench_sleep.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--l2-pause" in out.stdout
