"""vllm_sleep_ext/alloc_history.py: names the owner of a kept range from the stack recorded at malloc
time; opt-in through VLLM_SLEEP_EXT_RECORD_ALLOCATIONS, off by default, never on the host backend."""

from __future__ import annotations

import pytest

from vllm_sleep_ext import CuMemAllocator, alloc_history, envs

MiB = 1 << 20


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


SNAPSHOT = [{
    "address": 0x1000_0000,
    "blocks": [
        {"size": 501 * MiB, "requested_size": 501 * MiB, "state": "active_allocated", "frames": [
            frame("/usr/lib/python3.12/site-packages/torch/utils/_device.py", 104, "__torch_function__"),
            frame("/work/vllm_sleep_ext/allocator.py", 250, "use_memory_pool"),
            frame("/tmp/vsite/vllm/v1/sample/ops/penalties.py", 40, "__init__"),
            frame("/tmp/vsite/vllm/v1/worker/gpu_model_runner.py", 300, "load_model"),
        ]},
        {"size": 4 * MiB, "state": "inactive", "frames": []},
        {"size": 16 * MiB, "requested_size": 15 * MiB, "state": "active_allocated"},
    ],
}]


def test_owner_frames_skip_the_allocation_plumbing() -> None:
    frames = SNAPSHOT[0]["blocks"][0]["frames"]
    assert alloc_history.owner_frames(frames) == ["vllm/v1/sample/ops/penalties.py:40 __init__",
                                                  "vllm/v1/worker/gpu_model_runner.py:300 load_model"]
    assert alloc_history.owner_frames(frames, depth=1) == ["vllm/v1/sample/ops/penalties.py:40 __init__"]


def test_owners_name_the_blocks_overlapping_each_range() -> None:
    base = 0x1000_0000
    found = alloc_history.owners([(base + MiB, 2 * MiB), (base + 501 * MiB, 8 * MiB), (base + 600 * MiB, MiB)],
                                 SNAPSHOT)
    assert [len(f["blocks"]) for f in found] == [1, 1, 0]  # the inactive block between is no owner
    assert found[0]["blocks"][0]["frames"][0] == "vllm/v1/sample/ops/penalties.py:40 __init__"
    second = found[1]["blocks"][0]
    assert second["address"] == base + 505 * MiB and second["requested"] == 15 * MiB and second["frames"] == []


def test_recording_is_off_by_default_and_never_started_on_the_host_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert envs.RECORD_ALLOCATIONS.default is False
    started: list[bool] = []
    monkeypatch.setattr(alloc_history, "start", lambda: started.append(True) or True)
    monkeypatch.setenv(envs.RECORD_ALLOCATIONS.name, "1")
    CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    assert started == []


def test_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envs.RECORD_ALLOCATIONS.name, "maybe")
    with pytest.raises(ValueError, match="VLLM_SLEEP_EXT_RECORD_ALLOCATIONS"):
        CuMemAllocator(backend="host", capacity_bytes=64 * MiB)


@pytest.mark.cuda
def test_on_the_gpu_a_block_of_our_pool_is_named_by_the_code_that_allocated_it() -> None:
    import torch

    assert alloc_history.start()
    alloc = CuMemAllocator.get_instance()
    try:
        with alloc.use_memory_pool(tag="history-test"):
            held = allocate_the_kept_tensor()
        found = alloc_history.owners([(held.untyped_storage().data_ptr(), held.nbytes)])
        frames = [f for b in found[0]["blocks"] for f in b["frames"]]
        assert any("allocate_the_kept_tensor" in f for f in frames), frames
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        alloc_history._started = False


def allocate_the_kept_tensor():
    import torch

    return torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
