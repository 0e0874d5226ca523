"""Host policy "reclaimable" under real memory pressure, not a simulated one.

While the engine is awake a reclaimable arena is unpinned and MADV_FREE'd. Here another process then
takes nearly all of the host's available memory, so the kernel reclaims those pages through its own
reclaim path; the next sleep must fault them in again and the round trip must hold every byte. Opt-in
(`VSE_MEMORY_PRESSURE=1`, `make test-pressure`): it fills the host's memory for a few seconds, which
CI's shared runners should not see. Once on the host backend (the same HostArena and madvise calls as
CUDA, pinning aside) and once on the GPU, where the taken pages are pinned again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import core_helpers
from core_helpers import MiB, load_core, pattern, read, write

core = load_core()
GiB = 1 << 30

pytestmark = pytest.mark.skipif(os.environ.get("VSE_MEMORY_PRESSURE") != "1",
                                reason="fills the host's memory for a few seconds: set VSE_MEMORY_PRESSURE=1")

# Grows by the bytes given on each line of stdin (anonymous memory, every page made resident) and
# answers "ok" each time; holds it all until stdin closes. First in line for the OOM killer.
BALLOON = textwrap.dedent("""
    import ctypes, mmap, sys
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    held = []
    for line in sys.stdin:
        n = int(line)
        buf = mmap.mmap(-1, n)
        held.append(buf)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        libc.madvise(addr, n, 14)  # MADV_HUGEPAGE: filling a large host goes faster
        if libc.madvise(addr, n, 23) != 0:  # MADV_POPULATE_WRITE; older kernels: touch every page
            for off in range(0, n, 4096):
                buf[off] = 1
        print("ok", flush=True)
""")


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise KeyError(field)


def available_bytes() -> int:
    """What can be allocated before the kernel must reclaim: MemAvailable, or less inside a memory
    cgroup (a container's limit, which /proc/meminfo does not show)."""
    available = meminfo("MemAvailable")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - current)
    except OSError:
        pass
    return available


def lazyfree() -> int:
    value = core_helpers.lazyfree()
    if value is None:
        pytest.skip("this kernel does not report LazyFree")
    return value


def big_pattern(nbytes: int, seed: int) -> bytes:
    """`pattern()` for sizes past what one call makes: 64 MiB blocks, each of its own seed."""
    block = 64 * MiB
    return b"".join(pattern(min(block, nbytes - off), seed * 1000 + off // block) for off in range(0, nbytes, block))


def test_reclaimable_arena_taken_under_real_memory_pressure_is_faulted_in_again():
    size = 1 * GiB
    a = core.Allocator("host", capacity_bytes=size + 64 * MiB)
    a.host_policy = "reclaimable"
    p = a.malloc(size, tag="weights")
    write(p, big_pattern(size, 11))
    a.sleep(["weights"])
    a.wake(None)
    a.wait_host()
    held = a.host_bytes()
    assert a.host_pinned_bytes() == 0
    before = lazyfree()
    assert before >= size * 0.9, f"the kept arena should be LazyFree while awake, {before >> 20} MiB is"

    data = big_pattern(size, 12)  # what the next sleep must keep: the arena's old bytes are stale
    write(p, data)
    balloon, during = press_until_taken(before - size // 2)
    release(balloon)
    print(f"LazyFree of this process: {before >> 20} MiB before the pressure, {during >> 20} MiB under it")
    assert during <= before - size // 2, (
        f"the kernel took {(before - during) >> 20} MiB of {before >> 20} MiB LazyFree under pressure")

    a.sleep(["weights"])  # faults the taken pages in again and backs up into the same arena
    assert a.host_bytes() == held
    a.wake(None)  # the host backend's released memory reads zero: these bytes come from the backup
    assert read(p, size) == data


def press_until_taken(target_lazyfree: int) -> tuple[subprocess.Popen, int]:
    """Another process takes memory until this process's LazyFree falls to `target_lazyfree` (the
    kernel reclaimed MADV_FREE'd pages to satisfy it) or nothing more is available. Returns the
    process, still holding its memory, and the LazyFree left."""
    lazyfree_at_start = lazyfree()
    balloon = subprocess.Popen([sys.executable, "-c", BALLOON], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)

    def grow(nbytes: int) -> None:
        balloon.stdin.write(f"{nbytes}\n")
        balloon.stdin.flush()
        if balloon.stdout.readline().strip() != "ok":
            raise AssertionError("the balloon process died (OOM killer?) before the kernel took the pages")

    # First what is free beyond the LazyFree pages and some slack, then small steps, each of which the
    # kernel must meet by reclaiming, while it still says it can (MemAvailable), so no OOM kill.
    grow(max(available_bytes() - lazyfree_at_start - 2 * GiB, 64 * MiB))
    left = lazyfree()
    while left > target_lazyfree and available_bytes() > 512 * MiB:
        grow(128 * MiB)
        left = lazyfree()
    return balloon, left


def release(balloon: subprocess.Popen) -> None:
    balloon.stdin.close()
    balloon.wait(timeout=120)


@pytest.mark.cuda
def test_reclaimable_cuda_backup_after_real_memory_pressure():
    """The same on the GPU: pages the kernel took are faulted in and pinned (cuMemHostRegister) again."""
    import torch

    from gpu_helpers import scribble_free_gpu_memory
    from vllm_sleep_ext import CuMemAllocator

    size = 4 * GiB
    alloc = CuMemAllocator.get_instance()
    saved_policy = alloc.host_policy
    alloc.host_policy = "reclaimable"
    alloc.release_host_cache()
    try:
        with alloc.use_memory_pool(tag="weights"):
            w = torch.empty(size, dtype=torch.uint8, device="cuda")
        w.random_(1, 255, generator=torch.Generator("cuda").manual_seed(1))
        alloc.sleep(offload_tags=("weights",))
        alloc.wake_up()
        alloc._core.wait_host()
        assert alloc._core.host_pinned_bytes() == 0
        before = lazyfree()
        assert before >= size * 0.9, f"the kept arena should be LazyFree while awake, {before >> 20} MiB is"

        w.random_(1, 255, generator=torch.Generator("cuda").manual_seed(2))  # the arena's bytes are stale
        expected = w.cpu()
        balloon, during = press_until_taken(before - size // 2)
        release(balloon)
        print(f"LazyFree of this process: {before >> 20} MiB before the pressure, {during >> 20} MiB under it")
        assert during <= before - size // 2, f"the kernel took only {(before - during) >> 20} MiB"

        alloc.sleep(offload_tags=("weights",))  # faults in and pins the taken pages again
        scribble_free_gpu_memory(leave_free_bytes=1 << 30)
        alloc.wake_up()
        assert torch.equal(w.cpu(), expected)
    finally:
        alloc.host_policy = saved_policy
        alloc.release_host_cache()
