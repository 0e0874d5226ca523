"""Pools on a real GPU, as vLLM's processes use them: with other threads allocating, nested, and with
the user's allocator settings.

- Segments a pool empties go back to the driver by themselves (no trim() call), while other threads
  allocate and free CUDA memory at the same time (vLLM's processes always run extra threads). Workloads: vLLM 0.33's workspace grown 512 -> 1024 -> 2048 MiB, re-entering its pool each
  time; online quantization freeing the bf16 originals inside the weights pool.
- Nested pools (vLLM 0.33 enters "kv_cache" inside "runtime"; CUDA graphs are captured inside pools):
  an allocation's tag is the tag of the pool whose segment holds it.
- Allocator settings: switching expandable segments off for a pool keeps every other option
  (checked in a fresh process, since PyTorch reads PYTORCH_*ALLOC_CONF at CUDA start-up).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gpu_helpers import find_allocation, release_cuda_memory
from vllm_sleep_ext import CuMemAllocator

pytestmark = pytest.mark.cuda
MiB = 1 << 20
SLACK = 24 * MiB  # small-pool segments (2 MiB) and rounding; far below any segment the tests free


@pytest.fixture
def alloc() -> Iterator[CuMemAllocator]:
    allocator = CuMemAllocator.get_instance()
    allocator.wake_up()
    mode = allocator.preserve_mode
    yield allocator
    allocator.wake_up()
    allocator.preserve_mode = mode
    release_cuda_memory()


def tag_bytes(alloc: CuMemAllocator, tag: str) -> int:
    """Bytes of the allocations of `tag` still held (mapped or asleep); released ones are not listed."""
    return sum(d.size for d in alloc.pointer_to_data.values() if d.tag == tag)


@contextmanager
def busy_cuda_threads(count: int = 3) -> Iterator[list[int]]:
    """Threads allocating, filling and freeing CUDA memory outside the pools for as long as the block
    runs (and so taking PyTorch's allocator lock all the time). Fails the test if any of them raised."""
    device = torch.cuda.current_device()
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0] * count

    def work(i: int) -> None:
        torch.cuda.set_device(device)
        rng = random.Random(i)
        try:
            while not stop.is_set():
                t = torch.empty(rng.randint(1, 48) * MiB, dtype=torch.uint8, device="cuda")
                t.fill_(i)
                del t
                rounds[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    while min(rounds) == 0 and not errors:  # every thread is allocating before the block starts
        time.sleep(0.01)
    try:
        yield rounds
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        torch.cuda.synchronize()
    assert not errors, f"a busy thread failed: {errors[0]!r}"
    assert all(r > 0 for r in rounds)


def test_workspace_grown_three_times_holds_only_its_last_size_with_busy_threads(alloc: CuMemAllocator) -> None:
    tag = "workspace"
    held_before = tag_bytes(alloc, tag)
    with busy_cuda_threads():
        assert threading.active_count() > 1
        workspace = None
        for size in (512 * MiB, 1024 * MiB, 2048 * MiB):  # vLLM re-enters the pool for each resize
            with alloc.use_memory_pool(tag=tag):
                new = torch.empty(size, dtype=torch.uint8, device="cuda")
                new.fill_(7)
                workspace = new  # the old workspace dies here, inside the new pool
                del new
        held = tag_bytes(alloc, tag) - held_before
        assert held <= 2048 * MiB + SLACK, f"workspace pool holds {held / MiB:.0f} MiB for 2048 MiB live"

        alloc.sleep(offload_tags=("runtime", "cudagraph"))  # vLLM 0.33 level 2: the workspace is discarded
        asleep = tag_bytes(alloc, tag) - held_before
        assert asleep <= 2048 * MiB + SLACK, f"{asleep / MiB:.0f} MiB of workspace asleep for 2048 MiB live"
        alloc.wake_up()
        mapped = alloc.stats().tags[tag].mapped_bytes - held_before
        assert mapped <= 2048 * MiB + SLACK, f"wake mapped {mapped / MiB:.0f} MiB of workspace for 2048 MiB live"
        workspace.fill_(1)  # mapped again at its address
        torch.cuda.synchronize()
    del workspace


def test_online_quantization_frees_originals_inside_the_pool_with_busy_threads(alloc: CuMemAllocator) -> None:
    tag = "weights_quantized_test"
    with busy_cuda_threads():
        with alloc.use_memory_pool(tag=tag):
            originals = [torch.randn(64 * MiB, dtype=torch.bfloat16, device="cuda") for _ in range(8)]  # 1 GiB
            quantized = [(o * 16).to(torch.int8) for o in originals]  # 512 MiB
            del originals  # freed inside the pool, as process_weights_after_loading does
        held = tag_bytes(alloc, tag)
        live = sum(q.nbytes for q in quantized)
        assert held <= live + SLACK, f"pool holds {held / MiB:.0f} MiB for {live / MiB:.0f} MiB of quantized weights"
        expected = [q.cpu() for q in quantized]
        alloc.sleep(offload_tags=(tag,))
        alloc.wake_up()
        assert all(torch.equal(q.cpu(), e) for q, e in zip(quantized, expected))
    del quantized
    release_cuda_memory()
    assert tag_bytes(alloc, tag) == 0, "freed tensors' segments went back once the pool is gone"


def test_segments_emptied_after_the_pool_closed_go_back_at_sleep(alloc: CuMemAllocator) -> None:
    tag = "late_free_test"
    with alloc.use_memory_pool(tag=tag):
        a = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
        b = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    del a  # after the pool closed: cached by PyTorch in that (now freeable) pool
    with busy_cuda_threads():
        alloc.sleep(offload_tags=(tag,))
        assert tag_bytes(alloc, tag) <= b.nbytes + SLACK, "the emptied segment was put to sleep instead of released"
        alloc.wake_up()
    del b


def test_nested_pools_tag_by_the_pool_that_holds_the_segment(alloc: CuMemAllocator) -> None:
    alloc.preserve_mode = "off"  # only tags decide what a sleep copies
    with alloc.use_memory_pool(tag="runtime"):
        # A segment of exactly its size (>= 10 MiB, a multiple of 2 MiB): the runtime pool has no free
        # block of a runtime segment left but the one below, so each allocation shows which pool served it.
        runtime_before = torch.empty(20 * MiB, dtype=torch.uint8, device="cuda")
        runtime_temp = torch.empty(600 * MiB, dtype=torch.uint8, device="cuda")
        del runtime_temp  # a free runtime block the KV cache would reuse if the runtime pool served it
        with alloc.use_memory_pool(tag="kv_cache"):  # as vLLM 0.33's initialize_kv_cache
            kv = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
            kv_small = torch.empty(4096, dtype=torch.uint8, device="cuda")
            scratch = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
            del scratch  # a free kv_cache block the outer pool must not hand out after the inner one
        runtime_after = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
        runtime_small = torch.empty(4096, dtype=torch.uint8, device="cuda")
    for name, t, tag in [("runtime_before", runtime_before, "runtime"), ("kv", kv, "kv_cache"),
                         ("kv_small", kv_small, "kv_cache"), ("runtime_after", runtime_after, "runtime"),
                         ("runtime_small", runtime_small, "runtime")]:
        data = find_allocation(alloc, t)
        assert data is not None and data.tag == tag, f"{name}: expected tag {tag!r}, got {data and data.tag!r}"

    alloc.sleep(offload_tags=("runtime", "cudagraph"))  # vLLM 0.33 level 2
    assert alloc.stats().tags["kv_cache"].backed_up_bytes == 0, "KV cache bytes were copied to host at level 2"
    assert find_allocation(alloc, kv).state == "discarded", "the KV cache went to host as runtime memory"
    assert find_allocation(alloc, runtime_after).state == "backed_up"
    alloc.wake_up()
    del runtime_before, kv, kv_small, runtime_after, runtime_small


def test_cuda_graph_captured_inside_a_pool_lands_in_the_graph_pool(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="runtime"):
        weight = torch.randn(512, 512, device="cuda")
        static_in = torch.randn(64, 512, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                torch.relu(static_in @ weight)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with alloc.cudagraph_pool() as pool_id:
            with torch.cuda.graph(graph, pool=pool_id):
                static_out = torch.relu(static_in @ weight)
        runtime_after = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
    assert find_allocation(alloc, weight).tag == "runtime"
    assert find_allocation(alloc, static_out).tag == "cudagraph"
    assert find_allocation(alloc, runtime_after).tag == "runtime"
    graph.replay()
    expected = static_out.clone()
    alloc.sleep(offload_tags=("runtime", "cudagraph"))
    alloc.wake_up()
    static_out.zero_()
    graph.replay()
    assert torch.equal(static_out, expected)
    del graph



@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="torch < 2.8 refuses empty_cache() while a capture is underway")
def test_retired_pool_freed_during_another_threads_graph_capture_keeps_the_capture(alloc: CuMemAllocator) -> None:
    """Issue 16, item 8. PyTorch may free a retired pool's segments while another thread captures a CUDA
    graph in global mode (empty_cache(), or its out-of-memory retry): our free must make no driver call
    (a synchronize or an unmap there invalidates the capture). The memory stays quarantined until a
    settle, after the capture."""
    tag = "retired_during_capture_test"
    with alloc.use_memory_pool(tag=tag):
        doomed = [torch.full((64 * MiB,), 3, dtype=torch.uint8, device="cuda") for _ in range(4)]
    doomed_bytes = sum(t.nbytes for t in doomed)
    x = torch.randn(256, 256, device="cuda") / 16
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up the kernels outside the capture
        torch.tanh(x @ x)
    torch.cuda.current_stream().wait_stream(stream)
    expected = x
    for _ in range(20):
        expected = torch.tanh(expected @ x)
    torch.cuda.synchronize()

    capturing, freed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def free_the_retired_pool() -> None:
        try:
            assert capturing.wait(60), "the capture did not start"
            doomed.clear()  # the pool's blocks go back to PyTorch's cache of that (freeable) pool
            torch.cuda.empty_cache()  # which hands its segments to our free while the capture runs
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            freed.set()

    quarantined_before = alloc.stats().quarantined_bytes
    freer = threading.Thread(target=free_the_retired_pool, daemon=True)
    freer.start()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # global capture mode, as vLLM captures
        y = x
        for i in range(20):
            y = torch.tanh(y @ x)
            if i == 10:
                capturing.set()
                assert freed.wait(60), "the freeing thread did not finish"
    freer.join(60)
    assert not errors, f"freeing during the capture failed: {errors[0]!r}"
    assert tag_bytes(alloc, tag) == 0, "the retired pool's segments were not freed during the capture"
    assert alloc.stats().quarantined_bytes - quarantined_before >= doomed_bytes, "released during the capture"

    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(y, expected, atol=1e-4), "the graph captured while the pool was freed computes wrong"

    free_before = torch.cuda.mem_get_info()[0]
    alloc.trim()  # after the capture: the quarantine goes back to the driver
    assert alloc.stats().quarantined_bytes == 0
    assert torch.cuda.mem_get_info()[0] - free_before >= doomed_bytes
    del graph


SETTINGS_PROBE = textwrap.dedent("""
    import json, torch
    from vllm_sleep_ext import CuMemAllocator
    from vllm_sleep_ext.alloc_conf import current_allocator_settings

    def parsed():  # what PyTorch's allocator really uses, not the string it was last given
        s = torch.cuda.memory._snapshot().get("allocator_settings", {})
        return {k: s.get(k) for k in ("max_split_size", "expandable_segments")}

    alloc = CuMemAllocator.get_instance()
    torch.cuda.init()
    before = parsed()
    with alloc.use_memory_pool(tag="weights"):
        inside, inside_string = parsed(), current_allocator_settings()
        w = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    after, after_string = parsed(), current_allocator_settings()
    has_getter = hasattr(torch._C, "_accelerator_getAllocatorSettings")
    print(json.dumps(dict(has_getter=has_getter, before=before, inside=inside, after=after, inside_string=inside_string,
                          after_string=after_string)))
""")


@pytest.mark.parametrize("env_name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_pool_turns_expandable_segments_off_and_keeps_every_other_option(env_name: str) -> None:
    conf = "expandable_segments:True,max_split_size_mb:512"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env[env_name] = conf
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", SETTINGS_PROBE], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got["has_getter"]:  # torch >= 2.9 reports the string in effect; older ones only the environment
        assert got["inside_string"] == "expandable_segments:False,max_split_size_mb:512"
        assert got["after_string"] == conf
    if got["before"]["max_split_size"] is None:
        pytest.skip(f"this torch's snapshot has no parsed allocator settings; strings checked: {got}")
    assert got["before"] == {"max_split_size": 512 * MiB, "expandable_segments": True}, got
    assert got["inside"] == {"max_split_size": 512 * MiB, "expandable_segments": False}, got
    assert got["after"] == {"max_split_size": 512 * MiB, "expandable_segments": True}, got
