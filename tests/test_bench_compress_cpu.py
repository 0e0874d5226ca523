"""benchmarks/bench_compress.py's report on the CPU: the table and the verdicts of issue 19's targets."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_compress  # noqa: E402

GB = 1e9
LIMIT = {"bytes": 4 << 30, "d2h_gbps": 55.0, "h2d_gbps": 55.0}


def row(dataset: str, mode: str, sleep_s: float, wake_s: float, host: float, pinned: float, exact: bool = True) -> dict:
    model = 16 * GB
    return {"dataset": dataset, "mode": mode, "model_bytes": model, "first_sleep_s": sleep_s, "sleep_s": sleep_s,
            "wake_s": wake_s, "host_bytes": host * model, "host_pinned_bytes": pinned * model, "pieces_packed": 1,
            "pieces_plain": 0, "staging_bytes": 800 << 20, "wake_staging_bytes": 800 << 20, "exact": exact}


def test_bf16_targets_met_when_both_directions_beat_the_limit_and_host_shrinks() -> None:
    plain = 16 / 55.0
    rows = [row("bf16", "off", plain, plain, 1.0, 1.0), row("bf16", "auto", plain / 1.3, plain / 1.45, 0.69, 0.72),
            row("bf16", "on", plain / 1.2, plain / 1.45, 0.69, 0.72)]
    table, verdicts = bench_compress.report(rows, LIMIT)
    assert "| bf16 | auto |" in table and "pinned-copy limit" in table
    assert verdicts[0].startswith("bf16 auto: sleep 1.30 x, wake 1.45 x") and verdicts[0].endswith("MET")
    assert verdicts[1].startswith("bf16 on: sleep 1.20 x") and verdicts[1].endswith("NOT MET")


def test_pinned_host_memory_counts_against_the_host_target() -> None:
    plain = 16 / 55.0
    _, verdicts = bench_compress.report([row("bf16", "auto", plain / 1.3, plain / 1.3, 0.69, 1.0)], LIMIT)
    assert "host 1.000 x" in verdicts[0] and verdicts[0].endswith("NOT MET")


def test_incompressible_auto_is_compared_with_plain() -> None:
    rows = [row("random", "off", 0.30, 0.30, 1.0, 1.0), row("random", "auto", 0.305, 0.30, 1.0, 1.0)]
    _, verdicts = bench_compress.report(rows, LIMIT)
    assert verdicts == ["random auto vs plain: sleep 0.984 x, wake 1.000 x (target >= 0.97): MET"]
    rows[1]["exact"] = False
    assert bench_compress.report(rows, LIMIT)[1][0].endswith("NOT MET")


def test_where_the_time_goes_from_the_allocators_own_figures() -> None:
    import types

    def stats(seconds, **fields):
        base = {"seconds": seconds, "copy_wait_seconds": 0.0, "release_seconds": 0.0, "map_seconds": 0.0}
        return types.SimpleNamespace(**{**base, **fields})

    runs = [{"sleep": stats(0.30, copy_wait_seconds=0.2, release_seconds=0.05),
             "wake": stats(w, map_seconds=0.01, copy_wait_seconds=w - 0.03)} for w in (0.32, 0.33, 0.31)]
    p = bench_compress.parts(runs)
    assert p["wake_core_s"] == 0.32 and p["wake_map_s"] == 0.01 and abs(p["wake_rest_s"] - 0.02) < 1e-12
    r = row("random", "auto", 0.30, 0.32, 1.0, 1.0)
    r["parts"] = p
    table, _ = bench_compress.report([row("random", "off", 0.30, 0.30, 1.0, 1.0), r], LIMIT)
    assert "Where the time goes" in table
    assert "| random | auto | 0.300 | 0.200 | 0.050 | 0.320 | 0.010 | 0.290 | 0.020 |" in table
    assert "| random | off | 0.300 | 0.300 |" not in table.split("Where the time goes")[1]  # no figures: no row
