"""The benchmark's level-1 and host-policy workers, run on the host backend with CUDA calls stubbed:
not a measurement, a check that the workers' logic (cycles, policies, checks, records) holds together
before GPU time is spent on it."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

torch = pytest.importorskip("torch")

from sleepbench import common, workers  # noqa: E402
from sleepbench.impls import ext  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def host_workers(monkeypatch):
    from vllm_sleep_ext.allocator import CuMemAllocator

    alloc = CuMemAllocator(backend="host", capacity_bytes=512 * MiB)
    alloc._core.staging_piece_bytes = 2 * MiB
    monkeypatch.setattr(ext, "get_ext_allocator", lambda: alloc)
    monkeypatch.setattr(workers, "get_ext_allocator", lambda: alloc)
    for module in (common, workers):
        monkeypatch.setattr(module, "sync", lambda: None)
        monkeypatch.setattr(module, "mem_free", lambda: 8 << 30)
    monkeypatch.setattr(common, "host_available_bytes", lambda: 64 << 30)
    monkeypatch.setattr(workers, "serving_probe", lambda seconds: 100.0)
    monkeypatch.setattr(workers, "alloc_tensors",
                        lambda sizes: [alloc.empty((n // 2,), torch.bfloat16) for n in sizes])
    return alloc


def test_level1_worker_runs_cycles_and_checks_them(host_workers):
    r = workers.worker_level1({"impl": "ext", "size_gib": 16 / 1024, "headroom_gib": 0, "seed": 1, "cycles": 2,
                               "keep_false_cycles": 1})
    assert r["verified"] and len(r["warm_sleep"]) == 2 and len(r["nokeep_sleep"]) == 1
    assert r["first_sleep"]["bytes"] >= 16 * MiB and r["first_sleep"]["host_ratio"] <= 1.01


def test_host_worker_measures_each_policy_after_a_background_prepare(host_workers):
    r = workers.worker_host({"size_gib": 16 / 1024, "headroom_gib": 0, "seed": 2, "cycles": 2})
    assert r["verified"] and r["prepare_error"] == "" and r["prepared_pinned_bytes"] >= 16 * MiB
    assert r["serving_steps_per_s_during"] == r["serving_steps_per_s_before"] == 100.0
    first = r["first_sleep"]["stats"]["last_sleep"]
    assert first["populate_seconds"] == 0 and first["pin_seconds"] == 0
    awake = {p: r["policies"][p]["awake"][-1] for p in workers.HOST_POLICIES}
    assert awake["pinned"]["pinned_bytes"] >= 16 * MiB
    assert awake["reclaimable"]["pinned_bytes"] == 0 and awake["reclaimable"]["host_bytes"] >= 16 * MiB
    assert awake["release"]["host_bytes"] == 0
    half = awake["reclaimable-half-pinned"]
    assert 0 < half["pinned_bytes"] <= half["host_bytes"] * 0.5 + 4096
    if awake["reclaimable"]["lazyfree_bytes"] is not None:  # the kernel says what it may take back
        assert awake["reclaimable"]["lazyfree_bytes"] >= 16 * MiB


def test_level2_worker_runs_cycles_with_and_without_a_pause(host_workers, monkeypatch):
    from sleepbench import workloads

    alloc = host_workers
    monkeypatch.setattr(workers, "make_buffer_modules",
                        lambda n: [alloc.place_module(m) for m in workloads.make_buffer_modules(n, device="cpu")])
    monkeypatch.setattr(workers, "alloc_kv", lambda nbytes: [alloc.empty((nbytes,), torch.uint8)])
    r = workers.worker_level2({"weights_gib": 16 / 1024, "kv_gib": 8 / 1024, "headroom_gib": 0, "seed": 3,
                               "cycles": 2, "pause_s": 0.5, "n_modules": 2})
    assert len(r["cycles"]) == 2 and len(r["cycles_no_pause"]) == 2 and r["pause_s"] == 0.5
    assert all(c["buffers_intact"] for c in r["cycles"] + r["cycles_no_pause"])
    assert max(c["total_ms"] for c in r["cycles"]) < 500  # the pause is not counted
