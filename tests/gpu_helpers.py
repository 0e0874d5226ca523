"""Helpers shared by the GPU test suites (no pytest fixtures, no GPU work at import).

- `scribble_free_gpu_memory()` overwrites the GPU memory a sleep gave back, so that a wake which fails to
  restore something shows garbage instead of the old bytes by luck.
- `param_snapshot()` / `load_params()` play the trainer of an RLHF loop: parameters only, the way
  `load_weights` sends them. Never use them for buffers: restoring buffers is the allocator's job.
- `buffer_snapshot()` / `assert_tensors_match()` are for *checking* buffers after a wake.
- `find_allocation()` / `assert_in_pool()` check that a tensor really lives in a tagged pool, so that a
  test cannot pass because its tensors were never put to sleep.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch

MiB = 1 << 20
GiB = 1 << 30

NAN_BYTE = 0xFF  # every float dtype reads 0xFF.. as NaN, every signed int as -1
HUGE_BYTE = 0x7F  # fp32 / bf16 read 0x7F.. as ~3.4e38, fp16 as NaN, int64 as a huge index


def _device(device: int | torch.device | str | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _fill_free_memory(device: torch.device, leave_free_bytes: int, smallest_chunk: int,
                      patterns: Iterator[int], max_bytes: int | None = None) -> list[torch.Tensor]:
    """Allocates (outside any pool) and fills chunks, from 1 GiB halving down to `smallest_chunk`, until
    less than `leave_free_bytes` + `smallest_chunk` is free or `max_bytes` are written."""
    chunks: list[torch.Tensor] = []
    written = 0
    chunk = GiB
    while chunk >= smallest_chunk:
        budget = torch.cuda.mem_get_info(device)[0] - leave_free_bytes
        if max_bytes is not None:
            budget = min(budget, max_bytes - written)
        if budget < chunk:
            chunk //= 2
            continue
        try:
            t = torch.empty(chunk, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            chunk //= 2
            continue
        t.fill_(next(patterns))
        chunks.append(t)
        written += chunk
    torch.cuda.synchronize(device)
    return chunks


def scribble_free_gpu_memory(patterns: int | Iterable[int] = (NAN_BYTE, HUGE_BYTE), *,
                             leave_free_bytes: int = 0, max_bytes: int | None = None,
                             device: torch.device | str | int | None = None) -> int:
    """Fill the device's free memory with non-zero byte patterns through the ordinary caching allocator,
    then free it all again and return it to the driver. Returns the number of bytes written.

    Call it outside any `use_memory_pool(...)` context (or it would fill a pool instead), typically while
    tagged pools are asleep: the physical memory they released is then overwritten, and whatever a wake
    maps again is not the old content. Chunks go from 1 GiB down to 2 MiB, so after it nearly nothing
    free is left unwritten. `patterns` are byte values used in turn, chunk by chunk.
    """
    if isinstance(patterns, int):
        patterns = (patterns,)
    device = _device(device)
    torch.cuda.synchronize(device)
    empty_cache()  # cached but unused segments become free memory that we overwrite too
    # Deterministic mode would fill every chunk with NaN first; we fill it ourselves.
    deterministic = torch.utils.deterministic
    fill_uninitialized = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    chunks: list[torch.Tensor] = []
    try:
        chunks = _fill_free_memory(device, leave_free_bytes, 2 * MiB, itertools.cycle(tuple(patterns)), max_bytes)
        return sum(t.numel() for t in chunks)
    finally:
        deterministic.fill_uninitialized_memory = fill_uninitialized
        chunks.clear()
        empty_cache()


def param_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the model's parameters (only `named_parameters()`, never buffers)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def load_params(model: torch.nn.Module, snapshot: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy a `param_snapshot()` back into the model's parameters in place (same storage, same address),
    as an RLHF trainer does after a level-2 wake. Buffers are not touched."""
    params = dict(model.named_parameters())
    if strict and params.keys() != snapshot.keys():
        missing = sorted(params.keys() - snapshot.keys())
        extra = sorted(snapshot.keys() - params.keys())
        raise KeyError(f"parameter names differ: missing from snapshot {missing}, not in model {extra}")
    with torch.no_grad():
        for name, p in params.items():
            if name in snapshot:
                p.data.copy_(snapshot[name])
    if any(p.is_cuda for p in params.values()):
        torch.cuda.synchronize()


def buffer_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of `named_buffers()`, for checking them after a wake (never for restoring them)."""
    return {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}


def tensors_differing(current: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (dtype, shape and bytes; NaN never matches)."""
    bad = []
    for name, want in expected.items():
        got = current.get(name)
        if got is None or got.dtype != want.dtype or got.shape != want.shape \
                or not torch.equal(got.detach().cpu(), want):
            bad.append(name)
    return bad


def assert_tensors_match(current: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                         what: str = "tensors") -> None:
    bad = tensors_differing(current, expected)
    assert not bad, f"{what} changed: {bad}"


def find_allocation(alloc, tensor: torch.Tensor):
    """The allocator's AllocationData whose range holds the whole storage of `tensor`, or None."""
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    end = start + max(storage.nbytes(), 1)
    for data in alloc.pointer_to_data.values():
        if data.ptr <= start and end <= data.ptr + data.size:
            return data
    return None


def assert_in_pool(alloc, named_tensors: Iterable[tuple[str, torch.Tensor]], tag: str) -> None:
    """Every tensor's storage lies in one allocation of `tag` (a test precondition)."""
    outside = []
    for name, t in named_tensors:
        data = find_allocation(alloc, t)
        if data is None or data.tag != tag:
            outside.append((name, None if data is None else data.tag))
    assert not outside, f"test setup: expected these tensors in the {tag!r} pool: {outside}"


def tag_sleep_states(alloc, tags: Iterable[str]) -> dict[str, set[bool]]:
    """{tag: {is_asleep values of its allocations}}; a tag with no allocation maps to an empty set."""
    states: dict[str, set[bool]] = {tag: set() for tag in tags}
    for data in alloc.pointer_to_data.values():
        if data.tag in states:
            states[data.tag].add(bool(data.is_asleep))
    return states


def anything_asleep(alloc) -> bool:
    return any(data.is_asleep for data in alloc.pointer_to_data.values())


def empty_cache() -> None:
    """torch.cuda.empty_cache(), and what it freed of our pools goes back to the driver too: PyTorch's
    frees only quarantine pool memory until the core settles (CuMemAllocator.trim() does both)."""
    torch.cuda.empty_cache()
    from vllm_sleep_ext import _core

    _core.cuda_allocator().settle()


def release_cuda_memory() -> None:
    """Collect garbage and return cached CUDA memory to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        empty_cache()


# Memory held by "someone else" (the trainer), outside the pools, to make a wake run out of room.
def hog_device_memory(leave_free_bytes: int, device: int | torch.device | None = None,
                      pattern: int = 0x5A) -> list[torch.Tensor]:
    """Allocates (outside any pool) and fills chunks until less than `leave_free_bytes` + 16 MiB is free.

    Chunks go from 1 GiB down to 16 MiB (above 10 MiB the caching allocator maps exactly the size
    asked). Returns the chunks; drop them and call empty_cache() to give the memory back.
    """
    device = _device(device)
    torch.cuda.synchronize(device)
    empty_cache()
    return _fill_free_memory(device, leave_free_bytes, 16 * MiB, itertools.repeat(pattern))


# The driver's own view of a pool allocation, through libcuda (no torch involved): what access rights
# each device has, and with which flags its physical memory was created.
class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]  # CU_MEM_LOCATION_TYPE_DEVICE = 1


class _MemAllocationProp(ctypes.Structure):  # CUmemAllocationProp (cuda.h, v1)
    _fields_ = [("type", ctypes.c_int), ("requested_handle_types", ctypes.c_int), ("location", _MemLocation),
                ("win32_metadata", ctypes.c_void_p), ("compression_type", ctypes.c_ubyte),
                ("gpu_direct_rdma_capable", ctypes.c_ubyte), ("usage", ctypes.c_ushort),
                ("reserved", ctypes.c_ubyte * 4)]


CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED = 110


def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cu_check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed with CUresult {result}")


def driver_access_flags(ptr: int, device: int) -> int:
    """cuMemGetAccess: the access `device` has to the mapped address `ptr` (3 = read-write, 0 = none)."""
    flags = ctypes.c_ulonglong(0)
    location = _MemLocation(1, device)
    _cu_check(_libcuda().cuMemGetAccess(ctypes.byref(flags), ctypes.byref(location), ctypes.c_ulonglong(ptr)),
              "cuMemGetAccess")
    return flags.value


def driver_rdma_capable(ptr: int) -> bool:
    """Whether the physical memory mapped at `ptr` was created with allocFlags.gpuDirectRDMACapable."""
    cu = _libcuda()
    handle = ctypes.c_ulonglong(0)
    _cu_check(cu.cuMemRetainAllocationHandle(ctypes.byref(handle), ctypes.c_void_p(ptr)), "cuMemRetainAllocationHandle")
    try:
        prop = _MemAllocationProp()
        _cu_check(cu.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(prop), handle),
                  "cuMemGetAllocationPropertiesFromHandle")
        return bool(prop.gpu_direct_rdma_capable)
    finally:
        cu.cuMemRelease(handle)  # drops the reference cuMemRetainAllocationHandle took


def device_supports_vmm_rdma(device: int) -> bool:
    value = ctypes.c_int(0)
    cu = _libcuda()
    dev = ctypes.c_int(0)
    _cu_check(cu.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    _cu_check(cu.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
                                      dev), "cuDeviceGetAttribute")
    return bool(value.value)
