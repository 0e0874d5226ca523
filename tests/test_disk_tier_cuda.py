"""The disk tier on a GPU (Note [Disk tier], csrc/disk_tier.h): level-1 sleeps with part of the backups
beyond the host memory limit on disk, the freed device memory overwritten, every byte back after the wake;
a failed write and a short read on the CUDA backend leave nothing lost."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from vllm_sleep_ext import CuMemAllocator, SleepExtError

try:
    from gpu_helpers import anything_asleep, release_cuda_memory, scribble_free_gpu_memory
except ImportError:  # tests/ collected as a package
    from tests.gpu_helpers import anything_asleep, release_cuda_memory, scribble_free_gpu_memory

pytestmark = pytest.mark.cuda

MiB = 1 << 20
WEIGHTS = "weights"


@pytest.fixture
def alloc():
    allocator = CuMemAllocator.get_instance()
    if anything_asleep(allocator):
        allocator.wake_up()
    disk_dir = tempfile.mkdtemp(prefix="vse-disk-cuda-", dir=os.environ.get("VSE_DISK_DIR", "/tmp"))
    allocator.host_memory_limit = 0
    allocator.disk_dir = disk_dir
    yield allocator
    try:
        if anything_asleep(allocator):
            allocator.wake_up()
    finally:
        allocator.host_memory_limit = 0
        allocator.disk_dir = ""
        release_cuda_memory()
        allocator.release_pools()
        release_cuda_memory()
        assert os.listdir(disk_dir) == []  # nothing left behind
        os.rmdir(disk_dir)


def random_weights(alloc: CuMemAllocator, sizes: list[int], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    with alloc.use_memory_pool(WEIGHTS):
        tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g) for n in sizes]
    torch.cuda.synchronize()
    return tensors, [t.cpu() for t in tensors]


def all_equal(tensors: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(torch.equal(t.cpu(), e) for t, e in zip(tensors, expected))


# Odd sizes, some larger than a 16 MiB chunk, about 600 MiB in all.
SIZES = [3 * MiB + 17, 100 * MiB + 4095, MiB - 1, 257 * MiB + 1, 37 * MiB + 5, 200 * MiB]


def test_round_trip_with_half_on_disk_and_memory_overwritten(alloc):
    tensors, expected = random_weights(alloc, SIZES, 1)
    alloc.host_memory_limit = sum(SIZES) // 2
    for _ in range(2):  # the second cycle reuses the host arena and the staging slots
        alloc.sleep(offload_tags=(WEIGHTS,))
        stats = alloc.stats()
        assert stats.last_sleep.disk_bytes >= sum(SIZES) // 2 - 4096
        assert stats.tags[WEIGHTS].disk_bytes == stats.last_sleep.disk_bytes
        assert os.listdir(alloc.disk_dir) == []
        scribble_free_gpu_memory()
        alloc.wake_up()
        assert alloc.stats().last_wake.disk_bytes == stats.last_sleep.disk_bytes
        assert all_equal(tensors, expected)


def test_failed_write_and_short_read_lose_nothing_on_cuda(alloc):
    tensors, expected = random_weights(alloc, SIZES, 2)
    alloc.host_memory_limit = 64 * MiB
    alloc._core._inject_disk_write_failure(100 * MiB)
    with pytest.raises(SleepExtError, match="Nothing was released"):
        alloc.sleep(offload_tags=(WEIGHTS,))
    assert not anything_asleep(alloc) and all_equal(tensors, expected)

    alloc.sleep(offload_tags=(WEIGHTS,))
    scribble_free_gpu_memory()
    alloc._core._inject_disk_short_read(300 * MiB)
    with pytest.raises(SleepExtError, match="stay asleep"):
        alloc.wake_up()
    assert anything_asleep(alloc)
    scribble_free_gpu_memory()
    alloc.wake_up()
    assert all_equal(tensors, expected)
