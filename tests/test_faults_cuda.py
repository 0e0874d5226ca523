"""GPU suite, one GPU: faults and bad input leave everything as it was, and the same call can be retried.

- A wake with no room on the card (memory held in this process, or by another process) raises
  DeviceOutOfMemoryError naming the tag and the bytes needed/free; every sleeping allocation and every
  backup stays as it was; once memory is free the same wake succeeds and restores every byte. A wake
  told to wait for memory finishes once another process lets go, or raises the same error at its deadline.
- A sleep beyond `host_memory_limit` raises HostOutOfMemoryError before any device memory is released.
- Bad input: wake of an awake tag and sleep while asleep are no-ops; a tensor freed while asleep leaves
  the table; unknown tags raise ValueError, non-str tags TypeError; no error poisons the next call.
- Threads: pool tags are per thread, and sleep/wake on the main thread while other threads allocate in
  their own pools neither mixes tags up nor loses the offloaded data.

Between sleep and wake the freed GPU memory is overwritten (hog tensors filled with a pattern, or
`scribble_free_gpu_memory()`), so a lost byte cannot come back by luck.

Tensors are held in lists of the `held` fixture, which the `alloc` fixture clears after waking
everything: a failing test then leaks no pool memory (or hog memory) into the next one.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vllm_sleep_ext import (CuMemAllocator, DeviceOutOfMemoryError, HostOutOfMemoryError, SleepExtError)

try:
    from gpu_helpers import (anything_asleep, assert_in_pool, find_allocation, hog_device_memory,
                             release_cuda_memory, scribble_free_gpu_memory, tag_sleep_states)
except ImportError:  # tests/ collected as a package
    from tests.gpu_helpers import (anything_asleep, assert_in_pool, find_allocation, hog_device_memory,
                                   release_cuda_memory, scribble_free_gpu_memory, tag_sleep_states)

pytestmark = pytest.mark.cuda

WEIGHTS = "weights"
MiB = 1 << 20
GiB = 1 << 30
CHILD_TIMEOUT_S = 180


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def held():
    """Named lists of tensors a test keeps alive; cleared (after the wake) by `alloc`'s teardown."""
    return defaultdict(list)


@pytest.fixture
def alloc(held):
    """The process-wide allocator: awake, no host limit, at start; awake, clean, no host limit at end."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    allocator = CuMemAllocator.get_instance()
    if anything_asleep(allocator):
        allocator.wake_up()
    allocator.host_memory_limit = 0
    original_mode = allocator.preserve_mode
    yield allocator
    try:
        held.pop("hog", None)  # room for the wake, should a test have failed while holding it
        torch.cuda.empty_cache()
        if anything_asleep(allocator):
            allocator.wake_up()
    finally:
        allocator.host_memory_limit = 0
        allocator.preserve_mode = original_mode
        held.clear()
        release_cuda_memory()
        allocator.release_pools()
        release_cuda_memory()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def make_random_weights(alloc: CuMemAllocator, total_bytes: int, pieces: int, *, seed: int,
                        tag: str = WEIGHTS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`pieces` float32 tensors of random data in a pool of `tag`, and their CPU copies."""
    piece_bytes = max(2 * MiB, (total_bytes // pieces) // (2 * MiB) * (2 * MiB))
    g = torch.Generator(device="cuda").manual_seed(seed)
    with alloc.use_memory_pool(tag):
        tensors = [torch.randn(piece_bytes // 4, device="cuda", generator=g) for _ in range(pieces)]
    torch.cuda.synchronize()
    assert_in_pool(alloc, [(f"{tag}[{i}]", t) for i, t in enumerate(tensors)], tag)
    return tensors, [t.to("cpu", copy=True) for t in tensors]


def differing(tensors: list[torch.Tensor], expected: list[torch.Tensor]) -> list[int]:
    """Indexes whose bytes differ from the CPU copy (compared bit for bit, one tensor at a time)."""
    bad = []
    for i, (t, want) in enumerate(zip(tensors, expected)):
        got = t.view(torch.int32)
        if not torch.equal(got, want.to(t.device).view(torch.int32)):
            bad.append(i)
    return bad


def assert_bytes_restored(tensors: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    bad = differing(tensors, expected)
    assert not bad, f"{what}: tensors {bad} of {len(tensors)} differ from their copy taken before sleep"


def allocations_of(alloc: CuMemAllocator, tensors: list[torch.Tensor]) -> dict[int, object]:
    """{ptr: AllocationData} of the allocations holding these tensors."""
    rows = {}
    for t in tensors:
        data = find_allocation(alloc, t)
        assert data is not None, "test setup: tensor outside the pools"
        rows[data.ptr] = data
    return rows


def table(alloc: CuMemAllocator) -> dict[int, tuple]:
    """The allocation table as comparable rows."""
    return {p: (d.size, d.device, d.tag, d.state) for p, d in alloc.pointer_to_data.items()}


def tag_bytes(alloc: CuMemAllocator, tag: str) -> int:
    return sum(d.size for d in alloc.pointer_to_data.values() if d.tag == tag)


def needed_on_wake(alloc: CuMemAllocator, tag: str = WEIGHTS, granularity: int = 2 * MiB) -> int:
    """Device bytes a wake of `tag` maps: its asleep allocations rounded up to the mapping granularity."""
    return sum(-(-d.size // granularity) * granularity
               for d in alloc.pointer_to_data.values() if d.tag == tag and d.is_asleep)


def weights_size_for_this_card(limit: int = 2 * GiB) -> int:
    free, _ = torch.cuda.mem_get_info()
    return min(limit, free // 8) // (16 * MiB) * (16 * MiB)


def assert_wake_oom_changed_nothing(alloc: CuMemAllocator, err: pytest.ExceptionInfo, table_before: dict,
                                    backed_up_before: int) -> None:
    message = str(err.value)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, SleepExtError)
    assert WEIGHTS in message, f"the error does not name the tag: {message!r}"
    assert "needs" in message and "free" in message, f"the error does not give bytes needed/free: {message!r}"
    assert tag_sleep_states(alloc, [WEIGHTS])[WEIGHTS] == {True}, "a failed wake woke some weights"
    assert table(alloc) == table_before, "a failed wake changed the allocation table"
    assert alloc.stats().tags[WEIGHTS].backed_up_bytes == backed_up_before, "a failed wake dropped backups"


# --------------------------------------------------------------------------------------------------
# a. OOM on wake: memory held in this process
# --------------------------------------------------------------------------------------------------

def test_wake_oom_changes_nothing_and_retry_restores_every_byte(alloc, held):
    size = weights_size_for_this_card()
    held["w"], held["ref"] = make_random_weights(alloc, size, pieces=8, seed=11)
    weight_rows = allocations_of(alloc, held["w"])

    alloc.sleep(offload_tags=(WEIGHTS,))
    assert all(alloc.pointer_to_data[p].is_asleep for p in weight_rows)
    backed_up = alloc.stats().tags[WEIGHTS].backed_up_bytes
    assert backed_up >= sum(t.nbytes for t in held["ref"]), "level 1 did not back up the whole weights"
    table_before = table(alloc)
    needed = needed_on_wake(alloc)

    # Fill the card outside the pools (over the memory the sleep released), leaving half of what the
    # wake needs.
    held["hog"] = hog_device_memory(leave_free_bytes=needed // 2)
    try:
        free = torch.cuda.mem_get_info()[0]
        assert free < needed, f"test setup: {free} bytes still free, the wake needs {needed}"
        for attempt in ([], [WEIGHTS], []):  # twice the same call: no sticky error state either
            with pytest.raises(DeviceOutOfMemoryError) as err:
                alloc.wake_up(attempt or None)
            assert_wake_oom_changed_nothing(alloc, err, table_before, backed_up)
    finally:
        held.pop("hog", None)
        torch.cuda.empty_cache()

    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert all(not alloc.pointer_to_data[p].is_asleep for p in weight_rows)
    assert_bytes_restored(held["w"], held["ref"], "after the retried wake")


# --------------------------------------------------------------------------------------------------
# b. OOM on wake: memory held by another process
# --------------------------------------------------------------------------------------------------

def _hold_memory_in_child(device_index: int, leave_free_bytes: int, reports, release) -> None:
    """Child process: take all but `leave_free_bytes` of the card, report, hold it until `release`."""
    try:
        torch.cuda.set_device(device_index)
        hog = hog_device_memory(leave_free_bytes, device_index)
        reports.put(("ready", torch.cuda.mem_get_info(device_index)[0], sum(t.numel() for t in hog)))
        if not release.wait(CHILD_TIMEOUT_S):
            reports.put(("error", "never told to release the memory", 0))
        del hog
        torch.cuda.empty_cache()
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        reports.put(("error", traceback.format_exc(), 0))
        raise


@contextmanager
def memory_held_by_child(leave_free_bytes: int):
    """A spawned process that takes all but `leave_free_bytes` of this card and holds it until the
    yielded event is set (at the latest on leaving the block); then it must exit cleanly."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    release = ctx.Event()
    child = ctx.Process(target=_hold_memory_in_child, daemon=True,
                        args=(torch.cuda.current_device(), leave_free_bytes, reports, release))
    child.start()
    try:
        try:
            status, detail, held_bytes = reports.get(timeout=CHILD_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"the memory-holding child did not report within {CHILD_TIMEOUT_S} s "
                        f"(alive={child.is_alive()}, exitcode={child.exitcode})")
        assert status == "ready", f"the memory-holding child failed:\n{detail}"
        yield release, held_bytes
    finally:
        release.set()
        child.join(60)
        if child.is_alive():
            child.terminate()
            child.join(10)
        if child.is_alive():
            child.kill()
            child.join(10)
    late_errors = []
    while True:
        try:
            status, detail, _ = reports.get(timeout=1)
        except queue.Empty:
            break
        if status == "error":
            late_errors.append(detail)
    assert not late_errors, "the memory-holding child failed:\n" + "\n".join(late_errors)
    assert child.exitcode == 0, f"the memory-holding child exited with {child.exitcode}"


def weights_asleep_for_another_process(alloc: CuMemAllocator, held, seed: int) -> tuple[dict, int, dict, int]:
    """Random weights put to sleep, with nothing of this process's cached on the card; their rows, the
    bytes backed up, the table and the device bytes their wake needs."""
    size = weights_size_for_this_card()
    held["w"], held["ref"] = make_random_weights(alloc, size, pieces=8, seed=seed)
    weight_rows = allocations_of(alloc, held["w"])
    alloc.sleep(offload_tags=(WEIGHTS,))
    backed_up = alloc.stats().tags[WEIGHTS].backed_up_bytes
    table_before = table(alloc)
    needed = needed_on_wake(alloc)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return weight_rows, backed_up, table_before, needed


def test_wake_oom_when_another_process_holds_the_memory(alloc, held):
    weight_rows, backed_up, table_before, needed = weights_asleep_for_another_process(alloc, held, seed=12)

    with memory_held_by_child(needed // 2) as (_, held_bytes):
        free = torch.cuda.mem_get_info()[0]
        assert free < needed, (f"test setup: the child holds {held_bytes} bytes but {free} bytes are still "
                               f"free; the wake needs {needed}")
        for attempt in ([], [WEIGHTS]):
            with pytest.raises(DeviceOutOfMemoryError) as err:
                alloc.wake_up(attempt or None)
            assert_wake_oom_changed_nothing(alloc, err, table_before, backed_up)

    # The driver frees a dead process's memory shortly after it exits.
    deadline = time.monotonic() + 30
    while torch.cuda.mem_get_info()[0] < needed + 64 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    alloc.wake_up()
    assert all(not alloc.pointer_to_data[p].is_asleep for p in weight_rows)
    assert_bytes_restored(held["w"], held["ref"], "after the retried wake")


# --------------------------------------------------------------------------------------------------
# b2. A wake that waits for memory another process frees (issue 18: two engines swapping on one GPU)
# --------------------------------------------------------------------------------------------------

def test_wake_that_waits_maps_what_fits_and_finishes_when_another_process_frees(alloc, held):
    weight_rows, backed_up, table_before, needed = weights_asleep_for_another_process(alloc, held, seed=14)

    with memory_held_by_child(needed // 2) as (release, _):
        assert torch.cuda.mem_get_info()[0] < needed, "test setup: the child left room for the whole wake"
        start = time.monotonic()
        with pytest.raises(DeviceOutOfMemoryError, match=r"waited \d+\.\d+ s for memory") as err:
            alloc.wake_up(wait_for_memory=0.5)  # the child holds on: the deadline passes
        assert time.monotonic() - start >= 0.5
        assert_wake_oom_changed_nothing(alloc, err, table_before, backed_up)
        threading.Timer(1.0, release.set).start()  # the other process lets go while the wake waits
        alloc.wake_up(wait_for_memory=CHILD_TIMEOUT_S)
    stats = alloc.stats().last_wake
    assert stats.wait_seconds >= 0.5, f"the wake waited only {stats.wait_seconds:.3f} s"
    assert all(not alloc.pointer_to_data[p].is_asleep for p in weight_rows)
    assert_bytes_restored(held["w"], held["ref"], "after a wake that waited for memory")


# --------------------------------------------------------------------------------------------------
# c. Host memory limit: sleep fails before anything is released
# --------------------------------------------------------------------------------------------------

class _Rope(nn.Module):
    """A module whose only state is a non-persistent buffer (kept across level 2 through host memory)."""

    def __init__(self, positions: int = 4096, dim: int = 128):
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)


def test_host_memory_limit_fails_sleep_before_releasing_anything(alloc, held):
    held["w"], held["ref"] = make_random_weights(alloc, 512 * MiB, pieces=4, seed=13)
    with alloc.use_memory_pool(WEIGHTS), torch.device("cuda"):
        held["rope"].append(_Rope())
    rope = held["rope"][0]
    held["buf_ref"].append(rope.cos_sin_cache.to("cpu", copy=True))
    weight_rows = allocations_of(alloc, held["w"])
    backup = sum(t.nbytes for t in held["ref"])

    alloc.release_host_cache()  # an idle cached arena of the right size would be reused whatever the limit
    host_before = alloc.stats().host_bytes
    table_before = table(alloc)
    mapped_before = alloc.stats().tags[WEIGHTS].mapped_bytes

    for limit, offload in ((backup // 2, (WEIGHTS,)),  # level 1: the whole weights do not fit
                           (1, ())):                     # level 2: not even the preserved buffer fits
        alloc.host_memory_limit = limit
        assert alloc.host_memory_limit == limit
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info()[0]
        with pytest.raises(HostOutOfMemoryError) as err:
            alloc.sleep(offload_tags=offload)
        assert isinstance(err.value, RuntimeError) and isinstance(err.value, SleepExtError)
        torch.cuda.synchronize()
        free_after = torch.cuda.mem_get_info()[0]
        assert abs(free_after - free_before) <= 8 * MiB, (
            f"a failed sleep (limit {limit}) changed free GPU memory by {(free_after - free_before) / MiB:.1f} MiB")
        assert not anything_asleep(alloc), f"a failed sleep (limit {limit}) released allocations"
        assert all(not alloc.pointer_to_data[p].is_asleep for p in weight_rows)
        assert table(alloc) == table_before
        tag_stats = alloc.stats().tags[WEIGHTS]
        assert tag_stats.mapped_bytes == mapped_before and tag_stats.backed_up_bytes == 0
        assert alloc.stats().host_bytes <= host_before, "a failed sleep kept host memory"
        assert_bytes_restored(held["w"], held["ref"], f"after the failed sleep (limit {limit})")
        assert torch.equal(rope.cos_sin_cache.cpu(), held["buf_ref"][0])

    alloc.host_memory_limit = 0
    alloc.sleep(offload_tags=(WEIGHTS,))
    assert all(alloc.pointer_to_data[p].is_asleep for p in weight_rows)
    scribble_free_gpu_memory()
    alloc.wake_up()
    assert_bytes_restored(held["w"], held["ref"], "after a sleep with the limit lifted")
    assert torch.equal(rope.cos_sin_cache.cpu(), held["buf_ref"][0])


# --------------------------------------------------------------------------------------------------
# d. Bad input on CUDA
# --------------------------------------------------------------------------------------------------

def test_wake_of_awake_tag_is_a_noop(alloc, held):
    held["w"], held["ref"] = make_random_weights(alloc, 64 * MiB, pieces=2, seed=14)
    addresses = [t.data_ptr() for t in held["w"]]
    table_before = table(alloc)
    alloc.wake_up([WEIGHTS])
    alloc.wake_up(WEIGHTS)
    alloc.wake_up()
    assert table(alloc) == table_before
    assert [t.data_ptr() for t in held["w"]] == addresses
    assert_bytes_restored(held["w"], held["ref"], "after waking awake weights")

    # And once more after a real cycle: the second wake changes nothing.
    alloc.sleep(offload_tags=(WEIGHTS,))
    scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    table_awake = table(alloc)
    alloc.wake_up([WEIGHTS])
    assert table(alloc) == table_awake
    assert_bytes_restored(held["w"], held["ref"], "after a second wake")


def test_sleep_while_asleep_is_a_noop(alloc, held):
    held["w"], held["ref"] = make_random_weights(alloc, 64 * MiB, pieces=2, seed=15)
    alloc.sleep(offload_tags=(WEIGHTS,))
    table_asleep = table(alloc)
    backed_up = alloc.stats().tags[WEIGHTS].backed_up_bytes
    assert backed_up >= sum(t.nbytes for t in held["ref"])

    alloc.sleep(offload_tags=(WEIGHTS,))
    alloc.sleep(offload_tags=())  # a level-2 sleep now must not drop the backups of sleeping weights
    alloc.sleep()
    assert table(alloc) == table_asleep
    assert alloc.stats().tags[WEIGHTS].backed_up_bytes == backed_up

    scribble_free_gpu_memory()
    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert_bytes_restored(held["w"], held["ref"], "after sleeping three times and one wake")


def test_freeing_a_tensor_while_asleep(alloc, held):
    # 64 MiB tensors: each has a segment (an allocation) of its own.
    held["w"], held["ref"] = make_random_weights(alloc, 128 * MiB, pieces=2, seed=16)
    held["victim"], _ = make_random_weights(alloc, 64 * MiB, pieces=1, seed=17)
    victim_ptr = find_allocation(alloc, held["victim"][0]).ptr
    assert victim_ptr not in allocations_of(alloc, held["w"]), "test setup: victim shares a segment"
    usage_before = alloc.get_current_usage()

    alloc.sleep(offload_tags=(WEIGHTS,))
    assert alloc.pointer_to_data[victim_ptr].is_asleep
    held.pop("victim")  # the last reference: the tensor dies while asleep
    gc.collect()
    # PyTorch held the empty segment cached in its (closed) pool; wake_up hands it back first (no
    # trim() call needed), so it is freed for good and not mapped again.
    scribble_free_gpu_memory()
    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert victim_ptr not in alloc.pointer_to_data, "the freed sleeping allocation is still in the table"
    assert alloc.get_current_usage() <= usage_before - 64 * MiB
    assert_bytes_restored(held["w"], held["ref"], "after a wake with a tensor freed while asleep")


def test_unknown_and_non_str_tags(alloc, held):
    held["w"], held["ref"] = make_random_weights(alloc, 32 * MiB, pieces=1, seed=18)
    table_before = table(alloc)
    unknown = "no-such-tag-3f9c"

    value_errors = [
        lambda: alloc.sleep(unknown),
        lambda: alloc.sleep((WEIGHTS, unknown)),
        lambda: alloc.wake_up([unknown]),
        lambda: alloc.wake_up(unknown),
        lambda: alloc.discard([unknown]),
    ]
    for i, call in enumerate(value_errors):
        with pytest.raises(ValueError, match=unknown):
            call()
        assert table(alloc) == table_before, f"value-error call {i} changed the table"

    type_errors = [
        lambda: alloc.sleep((1,)),
        lambda: alloc.sleep(3),
        lambda: alloc.sleep((WEIGHTS, None)),
        lambda: alloc.wake_up([None]),
        lambda: alloc.wake_up(5),
        lambda: alloc.discard([b"weights"]),
    ]
    for i, call in enumerate(type_errors):
        with pytest.raises(TypeError):
            call()
        assert table(alloc) == table_before, f"type-error call {i} changed the table"
    with pytest.raises(TypeError):
        with alloc.use_memory_pool(7):  # type: ignore[arg-type]
            pass

    # None of it poisons the next call.
    alloc.sleep(offload_tags=(WEIGHTS,))
    assert tag_sleep_states(alloc, [WEIGHTS])[WEIGHTS] == {True}
    scribble_free_gpu_memory()
    alloc.wake_up()
    assert_bytes_restored(held["w"], held["ref"], "after the rejected calls and a cycle")
    with alloc.use_memory_pool("default"):
        t = torch.ones(1024, device="cuda")
    assert find_allocation(alloc, t).tag == "default"
    del t


# --------------------------------------------------------------------------------------------------
# e. Threads
# --------------------------------------------------------------------------------------------------

def test_pool_tags_are_per_thread_while_main_sleeps_and_wakes(alloc, held):
    threads_n = 4
    cycles = 8
    held["w"], held["ref"] = make_random_weights(alloc, 256 * MiB, pieces=4, seed=19)
    # Thread pools are discarded by every sleep, so threads only allocate and free: no kernel of theirs
    # ever touches memory the main thread may be unmapping at that moment.
    alloc.preserve_mode = "buffers"
    sizes = (256 * 1024, 3 * MiB, 24 * MiB)
    start = threading.Barrier(threads_n + 1)
    stop = threading.Event()
    errors: list[str] = []
    kept: dict[int, list[torch.Tensor]] = {i: held[f"t{i}"] for i in range(threads_n)}
    iterations = [0] * threads_n

    device = torch.cuda.current_device()

    def worker(i: int) -> None:
        try:
            torch.cuda.set_device(device)
            start.wait(60)
            ring: list[list[torch.Tensor]] = []
            n = 0
            while n < 1000 and (n < 5 or not stop.is_set()):
                with alloc.use_memory_pool(f"t{i}"):
                    batch = [torch.empty(s, dtype=torch.uint8, device=device) for s in sizes]
                ring.append(batch)
                if len(ring) > 4:
                    ring.pop(0)  # freed while the main thread may be sleeping or waking
                n += 1
                time.sleep(0.001)
            iterations[i] = n
            kept[i].extend(t for batch in ring for t in batch)
        except BaseException:  # noqa: BLE001
            errors.append(f"thread t{i}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=worker, args=(i,), name=f"pool-t{i}", daemon=True)
               for i in range(threads_n)]
    for th in threads:
        th.start()
    try:
        start.wait(60)
        for cycle in range(cycles):
            alloc.sleep(offload_tags=(WEIGHTS,))
            time.sleep(0.005)
            alloc.wake_up([WEIGHTS])
            bad = differing(held["w"], held["ref"])
            assert not bad, f"cycle {cycle}: weights {bad} differ after wake"
    finally:
        stop.set()
        for th in threads:
            th.join(120)
    stuck = [th.name for th in threads if th.is_alive()]
    assert not stuck, f"threads did not finish (deadlock?): {stuck}"
    assert not errors, "\n".join(errors)
    assert all(n >= 5 for n in iterations), f"test setup: iterations per thread {iterations}"

    # One more cycle with the freed memory overwritten, now that no thread allocates.
    alloc.sleep(offload_tags=(WEIGHTS,))
    scribble_free_gpu_memory()
    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert_bytes_restored(held["w"], held["ref"], "after the threaded cycles")

    for i in range(threads_n):
        tag = f"t{i}"
        assert kept[i], f"thread {tag} kept no tensors"
        wrong = []
        for t in kept[i]:
            data = find_allocation(alloc, t)
            if data is None or data.tag != tag:
                wrong.append(None if data is None else data.tag)
        assert not wrong, f"tensors of thread {tag} in pools of tags {wrong}"
        for t in kept[i]:  # mapped and usable again
            t.fill_(i + 1)
        torch.cuda.synchronize()
        assert all(bool((t == i + 1).all()) for t in kept[i])
    assert_bytes_restored(held["w"], held["ref"], "at the end")
