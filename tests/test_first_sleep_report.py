"""tests/vllm_gpu/first_sleep_report.py: issue 17 item 2's table and verdicts from a `first32b` call."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_gpu"))
import first_sleep_report as report  # noqa: E402

GB = 10**9


def run(who: str, first_s: float, decode: float, **extra: object) -> dict:
    r = {"command": "first", "model": "qwen25-32b", "level1_offload_bytes": 65 * GB, "first_sleep_after_ready_s": 10.0,
         "level1_first_sleep_s": first_s, "level1_warm_sleep_s": 1.25, "level1_first_wake_s": 1.4,
         "level1_warm_wake_s": 1.3, "decode_after_first_request": decode, **extra}
    return {"kit": "0.26", "vllm": "0.26.0", "who": who, "rc": 0, "r": r}


def test_ratios_against_the_limit_and_stock(tmp_path, capsys) -> None:
    lines = [run("stock", 30.0, 1000.0), {"kit": "0.26", "who": "ours", "r": {"command": "timing"}},
             run("ours", 1.3, 990.0, decode_during_serving_prepare={"during": 985.0, "after": 990.0, "ratio": 0.995})]
    results = tmp_path / "vllm-results.jsonl"
    results.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"bytes": 16 << 30, "d2h_gbps": 55.0, "h2d_gbps": 53.0}))
    assert report.main([str(results), str(limit), "--kit", "0.26"]) == 0
    out = capsys.readouterr().out
    # 65 GB at 55 GB/s is 1.182 s: 1.3 s is 0.909 x the limit, stock's 30 s 0.04 x.
    assert "| first level-1 sleep | 30.000 s (2.2 GB/s, 0.04 x) | 1.300 s (50.0 GB/s, 0.91 x) | 1.182 s (55.0 GB/s) |" in out
    assert "FIRST32B first_sleep_vs_limit: 0.909 (target >= 0.9) MET" in out
    assert "FIRST32B decode_ours_vs_stock: 0.99 (target >= 0.97) MET" in out
    assert "FIRST32B decode_during_prepare_vs_after: 0.995 (target >= 0.97) MET" in out
    assert "FIRST32B first_sleep_speedup_vs_stock: 23.08" in out


def test_a_missing_run_and_limit_are_said(tmp_path, capsys) -> None:
    results = tmp_path / "vllm-results.jsonl"
    results.write_text(json.dumps(run("ours", 2.0, 900.0)) + "\n")
    assert report.main([str(results), str(tmp_path / "none.json")]) == 1
    out = capsys.readouterr().out
    assert "no pinned-copy limit" in out and "FIRST32B missing runs: stock" in out
    assert "first_sleep_vs_limit" not in out  # no limit, no ratio


def test_e2e_first_flow_records_what_the_report_reads(monkeypatch) -> None:
    """e2e.py `first` against a fake engine whose workers answer RPCs: the first sleep comes after the
    wait, each wake is checked, ours measures decode during the preparation, and the report reads it."""
    import types

    import e2e

    class FakeLLM:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def sleep(self, level: int) -> None:
            self.calls.append(f"sleep{level}")

        def wake_up(self, tags=None) -> None:
            self.calls.append("wake")

        def reset_prefix_cache(self) -> None:
            pass

    answers = {"pool_bytes": [{"weights": 65 * GB, "kv_cache": 50 * GB}], "host_state": [{"pinned_gib": 61.0, "rate": 0}],
               "last_sleep_stats": [{"seconds": 1.3}], "host_pinned_gib": [3.0], "wait_host": [61.0],
               "restart_host_prepare_as_configured": [0.0],
               "host_pages": [{"anon_gib": 62.5, "anon_huge_gib": 61.0, "locked_gib": 62.0}]}
    run = types.SimpleNamespace(
        llm=FakeLLM(), args=types.SimpleNamespace(first_sleep_after=0.05, tp=1), result={"checks": {}},
        workers=[{"allocator": "vllm_sleep_ext.allocator.CuMemAllocator"}], ready_at=e2e.time.perf_counter(),
        reference_s=0.2)
    run.rpc = lambda fn: answers[fn.__name__]
    run.level1 = lambda overwrite=True: (run.llm.sleep(1), run.llm.wake_up(), (1.3, 1.4))[-1]
    checked: list[str] = []
    run.check = checked.append
    monkeypatch.setattr(e2e, "decode_tokens_per_s", lambda llm, seconds=4.0: 1000.0)
    e2e.cmd_first(run)
    r = run.result
    assert checked == ["level1_first", "level1_warm", "after_prepare_again"]
    assert r["level1_offload_bytes"] == 65 * GB and r["first_sleep_after_ready_s"] >= 0.05
    assert r["level1_first_sleep_gbps"] == 50.0 and r["decode_during_serving_prepare"]["ratio"] == 1.0
    assert r["host_pages_after_first_sleep"] == [{"anon_gib": 62.5, "anon_huge_gib": 61.0, "locked_gib": 62.0}]
    lines, verdicts = report.build({"ours": r}, {"d2h_gbps": 55.0})
    assert verdicts["first_sleep_vs_limit"]["value"] == 0.909


def test_level2_table_against_the_floor_and_stock(tmp_path, capsys) -> None:
    def timing(who: str, s: float, ww: float, wk: float, floor: float) -> dict:
        r = {"command": "timing", "level2_sleep_s": s, "level2_wake_weights_s": ww, "level2_wake_kv_s": wk,
             "level2_driver_floor": [{"total_s": floor, "release_s": floor / 3, "create_map_s": 2 * floor / 3,
                                      "handles": 120, "bytes": 100 << 30}]}
        return {"kit": "0.26", "who": who, "rc": 0, "r": r}

    results = tmp_path / "vllm-results.jsonl"
    results.write_text("\n".join(json.dumps(x) for x in (timing("stock", 0.066, 0.3, 0.261, 0.2),
                                                          timing("ours", 0.064, 0.1, 0.12, 0.26))) + "\n")
    assert report.main([str(results), str(tmp_path / "none.json"), "--timing"]) == 0
    out = capsys.readouterr().out
    assert "| ours | 0.064 s | 0.100 s | 0.120 s | 0.284 s | 0.260 s (0.087 + 0.173; 120 handles) | 1.09 |" in out
    assert "LEVEL2 level2_vs_floor: 1.092 (target <= 1.1) MET" in out
    assert "LEVEL2 level2_vs_stock: 0.453 (target <= 0.5) MET" in out
    assert "level2_core_vs_floor" not in out  # a run without the allocator's own seconds


def test_level2_by_the_allocators_own_seconds_against_the_same_floor(tmp_path, capsys) -> None:
    # Section 17's figures: llm calls 0.158 s in all (1.28 x the floor), the allocator's own 0.122-0.132 s.
    r = {"command": "timing", "level2_sleep_s": 0.089, "level2_wake_weights_s": 0.061, "level2_wake_kv_s": 0.008,
         "level2_driver_floor": [{"total_s": 0.123, "release_s": 0.082, "create_map_s": 0.041, "handles": 118,
                                  "bytes": 125 << 30}],
         "level2_core_s": [[0.072, 0.046, 0.006], [0.064, 0.054, 0.004], [0.077, 0.050, 0.005]]}
    results = tmp_path / "vllm-results.jsonl"
    results.write_text(json.dumps({"kit": "0.33", "who": "ours", "rc": 0, "r": r}) + "\n")
    assert report.main([str(results), str(tmp_path / "none.json"), "--timing"]) == 1  # stock's run is missing
    out = capsys.readouterr().out
    assert "| ours | 0.089 s | 0.061 s | 0.008 s | 0.158 s | 0.123 s (0.082 + 0.041; 118 handles) | 1.28 |" in out
    assert "| ours, in the allocator (its own seconds) | 0.072 s | 0.046 s | 0.006 s | 0.124 s | (the same) | 1.01 |" in out
    assert "LEVEL2 level2_vs_floor: 1.285 (target <= 1.1) NOT MET" in out
    assert "LEVEL2 level2_core_vs_floor: 1.008 (target <= 1.1) MET" in out


def test_warm_wakes_against_the_h2d_limit_at_once_and_after_a_while_asleep(tmp_path, capsys) -> None:
    def timing(who: str, at_once: float, rested: float) -> dict:
        r = {"command": "timing", "level1_offload_bytes": 16.5 * GB, "level1_warm_wake_s": at_once,
             "level1_rested_asleep_s": 2.0, "level1_rested_wake_s": rested, "level2_sleep_s": 0.07,
             "level2_wake_weights_s": 0.06, "level2_wake_kv_s": 0.01, "level2_driver_floor": []}
        return {"kit": "0.33", "who": who, "rc": 0, "r": r}

    results = tmp_path / "vllm-results.jsonl"
    results.write_text("\n".join(json.dumps(x) for x in (timing("stock", 0.934, 0.9), timing("ours", 0.465, 0.31)))
                       + "\n")
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"d2h_gbps": 55.0, "h2d_gbps": 55.0}))
    assert report.main([str(results), str(limit), "--timing", "--kit", "0.33"]) == 0
    out = capsys.readouterr().out
    assert ("| warm level-1 wake, right after the sleep | 0.934 s (17.7 GB/s, 0.32 x) | 0.465 s (35.5 GB/s, 0.65 x) "
            "| 0.300 s (55.0 GB/s) |") in out
    assert "| warm level-1 wake after 2 s asleep | 0.900 s (18.3 GB/s, 0.33 x) | 0.310 s (53.2 GB/s, 0.97 x)" in out
    assert "WAKE warm_wake_vs_limit: 0.645 (target >= 0.95) NOT MET" in out
    assert "WAKE rested_wake_vs_limit: 0.968 (target >= 0.95) MET" in out
    assert "LEVEL2" not in out.split("| level 2 |")[0]  # the wake table comes first, level 2 after it


def test_handle_model_packs_small_allocations_into_slabs() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import vmm_floor

    MiB = 1 << 20
    assert vmm_floor.handle_sizes([MiB, 3 * MiB, 40 * MiB, 1000 * MiB], 64 * MiB) == [40 * MiB, 1000 * MiB, 64 * MiB]
    assert vmm_floor.handle_sizes([MiB, 3 * MiB], 0) == [2 * MiB, 4 * MiB]
    assert vmm_floor.handle_sizes([30 * MiB] * 5, 64 * MiB) == [64 * MiB] * 3


def test_tensor_paths_name_a_tensor_by_its_attribute_path() -> None:
    import types

    import e2e
    import torch

    class Sampler:
        def __init__(self) -> None:
            self.penalties_state = types.SimpleNamespace(output_bin_counts=torch.zeros(4, 8, dtype=torch.int32))

    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(sampler=Sampler(), bufs=[torch.ones(2)]))
    t = worker.model_runner.sampler.penalties_state.output_bin_counts
    ptr = t.untyped_storage().data_ptr()
    original = torch.Tensor.is_cuda
    try:
        torch.Tensor.is_cuda = property(lambda self: True)  # the walk takes CUDA tensors only; CPU ones here
        found = e2e.tensor_paths(worker, [(ptr, t.nbytes)])
    finally:
        torch.Tensor.is_cuda = original
    assert found == {ptr: ["worker.model_runner.sampler.penalties_state.output_bin_counts [4, 8] torch.int32"]}
