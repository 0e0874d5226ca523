"""CuMemAllocator on a real GPU: pools through the pluggable allocator, sleep/wake at both levels.

Between sleep and wake every test fills the freed GPU memory with other data, because released
physical pages often come back with their old contents and would hide a lost byte.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from vllm_sleep_ext import CuMemAllocator

pytestmark = pytest.mark.cuda
MiB = 1 << 20


def overwrite_free_gpu_memory(fill: int = 0x5A) -> None:
    """Takes most free GPU memory outside the pools, writes a pattern over it, and gives it back."""
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    chunks = []
    chunk = 256 * MiB
    try:
        while free > chunk + 512 * MiB:
            chunks.append(torch.full((chunk,), fill, dtype=torch.uint8, device="cuda"))
            free -= chunk
    except torch.OutOfMemoryError:
        pass
    torch.cuda.synchronize()
    del chunks
    torch.cuda.empty_cache()


@pytest.fixture
def alloc():
    allocator = CuMemAllocator.get_instance()
    yield allocator
    allocator.wake_up()
    allocator.preserve_mode = "buffers"
    gc.collect()
    torch.cuda.empty_cache()


def make_tensors(tag: str, alloc: CuMemAllocator, seed: int) -> list[torch.Tensor]:
    """Large matrices and many small tensors, as a model's weights are."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = [64 * MiB, 20 * MiB, 3 * MiB + 17] + [4096 + 97 * i for i in range(200)]
    with alloc.use_memory_pool(tag=tag):
        return [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g) for n in sizes]


def allocation_of(alloc: CuMemAllocator, t: torch.Tensor):
    ptr = t.data_ptr()
    for data in alloc.pointer_to_data.values():
        if data.ptr <= ptr < data.ptr + data.size:
            return data
    return None


def test_pool_tensors_are_allocations_with_their_tag(alloc: CuMemAllocator) -> None:
    weights = make_tensors("weights", alloc, seed=1)
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")
    outside = torch.empty(MiB, device="cuda")
    assert allocation_of(alloc, weights[0]).tag == "weights"
    assert allocation_of(alloc, weights[-1]).tag == "weights"
    assert allocation_of(alloc, kv).tag == "kv_cache"
    assert allocation_of(alloc, outside) is None
    assert alloc.get_current_usage() >= sum(t.nbytes for t in weights) + kv.nbytes


def test_level1_round_trip_keeps_every_byte(alloc: CuMemAllocator) -> None:
    weights = make_tensors("weights", alloc, seed=2)
    expected = [t.cpu() for t in weights]
    alloc.sleep(offload_tags=("weights",))
    assert all(d.is_asleep for d in alloc.pointer_to_data.values() if d.tag == "weights")
    overwrite_free_gpu_memory()
    alloc.wake_up()
    for t, e in zip(weights, expected):
        assert torch.equal(t.cpu(), e)


def test_sleep_primes_the_driver_in_the_background_and_the_wake_keeps_every_byte(alloc: CuMemAllocator) -> None:
    """After a sleep releases memory a background thread creates and releases one granule at each of the CUDA
    backend's delays (csrc/create_primer.h), so that the wake's first cuMemCreate finds no driver work left."""
    weights = make_tensors("weights", alloc, seed=9)
    expected = [t.cpu() for t in weights]
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    before = alloc.stats().primes
    alloc.sleep(offload_tags=("weights",))
    deadline = time.monotonic() + 10
    while alloc.stats().primes.rounds < before.rounds + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = alloc.stats().primes
    assert after.rounds == before.rounds + 3, "one prime at each of 0.3, 1 and 3 s after the sleep, on one device"
    assert after.failures == before.failures and after.skipped == before.skipped, after.last_error
    assert after.longest_seconds > 0
    overwrite_free_gpu_memory()
    alloc.wake_up()
    for t, e in zip(weights, expected):
        assert torch.equal(t.cpu(), e)
    del kv


def test_level2_discards_what_is_not_preserved(alloc: CuMemAllocator) -> None:
    alloc.preserve_mode = "off"
    weights = make_tensors("weights", alloc, seed=3)
    expected = weights[0].cpu()
    alloc.sleep(offload_tags=())
    assert alloc.stats().tags["weights"].backed_up_bytes == 0
    overwrite_free_gpu_memory(0xA5)
    alloc.wake_up()
    assert not torch.equal(weights[0].cpu(), expected)


def test_selective_wake_leaves_other_tags_asleep(alloc: CuMemAllocator) -> None:
    weights = make_tensors("weights", alloc, seed=4)
    expected = weights[1].cpu()
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = torch.ones(16 * MiB, dtype=torch.uint8, device="cuda")
    with alloc.use_memory_pool(tag="runtime"):
        runtime = torch.full((MiB,), 9, dtype=torch.uint8, device="cuda")
    alloc.sleep(offload_tags=("weights", "runtime"))
    overwrite_free_gpu_memory()
    alloc.wake_up(["weights"])
    states = {d.tag: d.is_asleep for d in alloc.pointer_to_data.values()}
    assert states["weights"] is False and states["runtime"] is False and states["kv_cache"] is True
    assert torch.equal(weights[1].cpu(), expected)
    assert int(runtime.sum()) == 9 * MiB
    alloc.wake_up(["kv_cache"])
    kv.fill_(2)
    assert int(kv.sum()) == 2 * kv.numel()


def test_tensor_freed_while_asleep_gives_its_allocation_back(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        t = torch.zeros(48 * MiB, dtype=torch.uint8, device="cuda")
    ptr = t.data_ptr()
    assert allocation_of(alloc, t) is not None
    alloc.sleep(offload_tags=("weights",))
    free_asleep, _ = torch.cuda.mem_get_info()
    del t
    gc.collect()
    alloc.wake_up()  # empties released pool segments first (no trim() call), so it is not mapped again
    assert all(not (d.ptr <= ptr < d.ptr + d.size) for d in alloc.pointer_to_data.values())
    free_awake, _ = torch.cuda.mem_get_info()
    assert free_asleep - free_awake < 48 * MiB, "the freed tensor's memory was mapped again"


def test_sleep_returns_at_least_999_per_mille_of_pool_memory(alloc: CuMemAllocator) -> None:
    weights = make_tensors("weights", alloc, seed=5)
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = torch.empty(2048 * MiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    pool_bytes = sum(d.size for d in alloc.pointer_to_data.values() if not d.is_asleep)
    free_before, _ = torch.cuda.mem_get_info()
    alloc.sleep(offload_tags=("weights",))
    free_after, _ = torch.cuda.mem_get_info()
    returned = (free_after - free_before) / pool_bytes
    assert returned >= 0.999, f"returned {returned:.4%} of {pool_bytes} pool bytes"
    del weights, kv


def test_cuda_graph_replays_after_wake(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        weight = torch.randn(512, 512, device="cuda")
        bias = torch.randn(512, device="cuda")
        static_in = torch.randn(64, 512, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            torch.relu(static_in @ weight + bias)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with alloc.cudagraph_pool() as pool_id:
        with torch.cuda.graph(graph, pool=pool_id):
            static_out = torch.relu(static_in @ weight + bias)
    graph.replay()
    expected = static_out.clone()
    assert any(d.tag == "cudagraph" for d in alloc.pointer_to_data.values())
    alloc.sleep(offload_tags=("weights", "cudagraph"))
    overwrite_free_gpu_memory()
    alloc.wake_up()
    static_out.zero_()
    graph.replay()
    assert torch.equal(static_out, expected)
    del graph


def test_pool_memory_is_rdma_capable_where_the_device_supports_it_across_a_sleep(alloc):
    """Weight sync over NCCL with GPUDirect RDMA registers the weights pool with the NIC: its physical
    memory must be created RDMA-capable, and so must the memory a wake creates anew."""
    from gpu_helpers import device_supports_vmm_rdma, driver_rdma_capable

    device = torch.cuda.current_device()
    expected = device_supports_vmm_rdma(device)
    tensors = make_tensors("weights", alloc, seed=3)
    ref = [t.clone() for t in tensors]
    assert all(allocation_of(alloc, t) is not None for t in tensors[:3])
    assert [driver_rdma_capable(t.data_ptr()) for t in tensors[:3]] == [expected] * 3
    alloc.sleep(offload_tags=("weights",))
    overwrite_free_gpu_memory()
    alloc.wake_up()
    assert [driver_rdma_capable(t.data_ptr()) for t in tensors[:3]] == [expected] * 3
    assert all(torch.equal(t, r) for t, r in zip(tensors, ref))


def test_graph_capture_is_not_broken_by_a_background_prepare(alloc: CuMemAllocator) -> None:
    """vLLM captures its CUDA graphs (global capture mode) while the host memory for the first sleep is
    prepared in the background: the pinning on our thread must not invalidate a capture."""
    core = alloc._core
    saved = (core.host_prepare_rate, core.staging_piece_bytes)
    core.host_prepare_rate, core.staging_piece_bytes = 512 << 20, 2 << 20  # a pin every ~4 ms for 2 s
    x = torch.randn(256, 256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (x @ x).relu_()
    torch.cuda.current_stream().wait_stream(stream)
    captures = 0
    alloc.release_host_cache()  # so the pinned bytes counted below are this prepare's
    try:
        core.prepare_host(1 << 30, torch.cuda.current_device(), False)
        while core.host_pinned_bytes() < (1 << 30) * 0.8:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # global mode, as vLLM captures
                y = x
                for _ in range(50):
                    y = (y @ x).relu_()
            graph.replay()
            captures += 1
        core.wait_host()
        assert core.host_error() == ""
    finally:
        core.host_prepare_rate, core.staging_piece_bytes = saved
        alloc.release_host_cache()
    assert captures > 20, f"only {captures} captures overlapped the prepare"


def test_first_level1_sleep_finds_host_memory_ready_for_weights_runtime_and_cudagraph(alloc) -> None:
    """vLLM 0.33's level 1 backs up the runtime and CUDA-graph pools beside the weights: the host memory
    prepared in the background (on leaving each pool) covers all three in one arena, so the first sleep
    makes no host memory ready itself (it covered the weights only: a second arena, pinned in the sleep)."""
    core = alloc._core
    alloc.release_host_cache()
    saved = alloc.prepare_host
    alloc.prepare_host = True
    try:
        weights = make_tensors("weights", alloc, seed=8)
        with alloc.use_memory_pool(tag="runtime"):
            runtime = torch.randint(0, 256, (48 * MiB,), dtype=torch.uint8, device="cuda")
        with alloc.use_memory_pool(tag="weights"):
            w = torch.randn(1024, 1024, device="cuda")
        static_in = torch.randn(64, 1024, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.relu(static_in @ w)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graphs, outs = [], []
        for _ in range(3):  # vLLM leaves the graph pool once per captured graph
            graph = torch.cuda.CUDAGraph()
            with alloc.cudagraph_pool() as pool_id:
                with torch.cuda.graph(graph, pool=pool_id):
                    outs.append(torch.relu(static_in @ w).mul_(2))
            graphs.append(graph)
        for graph in graphs:
            graph.replay()
        expected = [t.cpu() for t in weights + [runtime] + outs]
        core.wait_host()
        assert core.host_error() == ""
        alloc.sleep(offload_tags=("weights", "runtime", "cudagraph"))
        stats = alloc.stats()
        s = stats.last_sleep
        assert (s.populate_seconds, s.pin_seconds) == (0, 0), "host memory was made ready during the sleep"
        assert stats.host_bytes <= s.bytes_copied * 1.01, "one arena of about the backup's size"
        overwrite_free_gpu_memory()
        alloc.wake_up()
        assert all(torch.equal(t.cpu(), e) for t, e in zip(weights + [runtime] + outs, expected))
        del graphs
    finally:
        alloc.prepare_host = saved
        alloc.release_host_cache()
