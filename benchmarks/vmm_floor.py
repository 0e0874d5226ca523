"""The driver's floor of a level-2 sleep + wake (issue 17 item 3): the CUDA VMM calls alone, with nothing
of an allocator around them, for the same physical handles a sleep releases and a wake maps again.

    floor(handle_sizes, pause_s)  ->  {"release_s", "create_map_s", "total_s", "handles", "bytes", ...}

Release is cuMemUnmap + cuMemRelease of every handle (after the memory was written, as a KV cache is);
the wake's part is cuMemCreate + cuMemMap + cuMemSetAccess of each, after `pause_s` (the driver prepares
released memory in the background, so a create right after a release costs more). One thread, one
address reservation, the median of `rounds`. Needs that much free device memory: call it while the
engine sleeps at level 2 (e2e.py timing does, in the worker) or after the allocator released its pools.

``handle_sizes(allocation_sizes, slab_bytes)`` models how the core maps allocations: rows of at most half
a slab share slabs, the others get a handle each, rounded to the 2 MiB granularity.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuvmm import device_access, device_prop  # noqa: E402

GRANULARITY = 2 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def handle_sizes(allocation_sizes: Iterable[int], slab_bytes: int) -> list[int]:
    """The physical handles the core holds for these allocations (a model: slabs packed full)."""
    slab = _round_up(slab_bytes, GRANULARITY) if slab_bytes else 0
    out, small = [], 0
    for size in allocation_sizes:
        span = _round_up(int(size), GRANULARITY)
        if slab and span <= slab // 2:
            small += span
        else:
            out.append(span)
    if small:
        out += [slab] * -(-small // slab)
    return out


def floor(sizes: list[int], pause_s: float = 1.0, rounds: int = 3, device: int = 0) -> dict:
    """Median seconds of the driver calls alone for handles of `sizes` bytes (see the module note)."""
    import torch

    torch.cuda.set_device(device)
    torch.zeros(1, device=f"cuda:{device}")  # the primary context is current
    cu = ctypes.CDLL("libcuda.so.1")
    prop, access = device_prop(device), device_access(device)

    def check(r: int, what: str) -> None:
        if r != 0:
            raise RuntimeError(f"driver floor: {what} failed with CUresult {r}")

    total = sum(sizes)
    base = ctypes.c_ulonglong()
    check(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(total), ctypes.c_size_t(0),
                                 ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "cuMemAddressReserve")
    offsets, at = [], base.value
    for size in sizes:
        offsets.append(at)
        at += size
    handles = [ctypes.c_ulonglong() for _ in sizes]
    mapped = 0

    def create_map() -> float:
        nonlocal mapped
        t0 = time.perf_counter()
        for i, (ptr, size) in enumerate(zip(offsets, sizes)):
            check(cu.cuMemCreate(ctypes.byref(handles[i]), ctypes.c_size_t(size), ctypes.byref(prop),
                                 ctypes.c_ulonglong(0)), "cuMemCreate")
            check(cu.cuMemMap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0), handles[i],
                              ctypes.c_ulonglong(0)), "cuMemMap")
            check(cu.cuMemSetAccess(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size), ctypes.byref(access),
                                    ctypes.c_size_t(1)), "cuMemSetAccess")
            mapped = i + 1
        return time.perf_counter() - t0

    def release() -> float:
        nonlocal mapped
        t0 = time.perf_counter()
        for i in range(mapped):
            check(cu.cuMemUnmap(ctypes.c_ulonglong(offsets[i]), ctypes.c_size_t(sizes[i])), "cuMemUnmap")
            check(cu.cuMemRelease(handles[i]), "cuMemRelease")
        mapped = 0
        return time.perf_counter() - t0

    rows = []
    try:
        create_map()
        for _ in range(rounds):
            check(cu.cuMemsetD8_v2(base, ctypes.c_ubyte(7), ctypes.c_size_t(total)), "cuMemsetD8")
            torch.cuda.synchronize()
            r = release()
            time.sleep(pause_s)
            c = create_map()
            rows.append((r, c))
    finally:
        try:
            release()
        finally:
            cu.cuMemAddressFree(base, ctypes.c_size_t(total))
    release_s = statistics.median(r for r, _ in rows)
    create_map_s = statistics.median(c for _, c in rows)
    return {"handles": len(sizes), "bytes": total, "pause_s": pause_s, "rounds": rounds,
            "release_s": release_s, "create_map_s": create_map_s, "total_s": release_s + create_map_s}
