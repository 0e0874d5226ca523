"""Helpers for the tests of the C++ core through its host backend (no torch, no GPU).

- `load_core()` returns `vllm_sleep_ext._core`; where the package itself does not import (it needs torch),
  the extension is loaded by itself, so these tests need only the built extension. `core_path()` is
  the extension file.
- `write()` / `read()` reach host-backend memory at the addresses the core returns.
- `pattern()` makes deterministic bytes with no zero byte: a discarded range (which on the host backend
  reads zero, and in general is undefined) can never equal the pattern it held by luck.
- `Interval` helpers: the reference arithmetic of preserved ranges, written independently of RangeSet.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import random
import sys
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GRANULARITY = 2 * MiB  # the host backend's, as on CUDA

_CORE_NAME = "vllm_sleep_ext._core"


def core_path() -> Path:
    """The `_core` extension file of the `vllm_sleep_ext` package that `import vllm_sleep_ext` would find."""
    module = sys.modules.get(_CORE_NAME)
    if module is not None and getattr(module, "__file__", None):
        return Path(module.__file__)
    spec = importlib.util.find_spec("vllm_sleep_ext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("package vllm_sleep_ext not found (run from the repository root, or install it)")
    for directory in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(directory) / f"_core{suffix}"
            if candidate.exists():
                return candidate
    raise ImportError(f"vllm_sleep_ext._core is not built in {list(spec.submodule_search_locations)}")


def load_core():
    """`vllm_sleep_ext._core`. Imported the ordinary way when the package imports (it needs torch); else
    the extension is loaded by itself under its own name, so these tests need only the built extension
    (and a later `from vllm_sleep_ext import _core` finds this same module rather than loading it twice)."""
    module = sys.modules.get(_CORE_NAME)
    if module is not None:
        return module
    try:
        return importlib.import_module(_CORE_NAME)
    except Exception:
        module = sys.modules.get(_CORE_NAME)  # the package's __init__ may have failed after loading it
        if module is not None:
            return module
    path = core_path()
    spec = importlib.util.spec_from_file_location(_CORE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CORE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_CORE_NAME]
        raise
    return module


def write(address: int, data: bytes | bytearray | memoryview) -> None:
    ctypes.memmove(address, bytes(data) if not isinstance(data, bytes) else data, len(data))


def read(address: int, nbytes: int) -> bytes:
    return ctypes.string_at(address, nbytes)


def filled(a, size: int, tag: str, seed: int) -> tuple[int, bytes]:
    """An allocation of `size` bytes of `tag` from core allocator `a`, holding pattern(size, seed)."""
    ptr = a.malloc(size, tag=tag)
    data = pattern(size, seed)
    write(ptr, data)
    return ptr, data


def lazyfree() -> int | None:
    """LazyFree bytes of this process (MADV_FREE'd pages the kernel has not taken yet), or None where
    the kernel does not report them."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("LazyFree:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def pattern(nbytes: int, seed: int) -> bytes:
    """`nbytes` deterministic bytes in 1..255 (never 0)."""
    raw = random.Random(seed).randbytes(nbytes)
    return raw.translate(_NO_ZERO)


_NO_ZERO = bytes([1] + list(range(1, 256)))  # maps 0 -> 1, keeps the rest


def differs_everywhere(actual: bytes, old: bytes) -> bool:
    """True when no byte of `actual` equals the byte of `old` at the same offset."""
    assert len(actual) == len(old)
    # XOR as big integers: a byte equal at some offset gives a zero byte in the XOR.
    x = (int.from_bytes(actual, "little") ^ int.from_bytes(old, "little")).to_bytes(len(actual), "little")
    return b"\x00" not in x


def round_up(value: int, to: int = GRANULARITY) -> int:
    return (value + to - 1) // to * to


# ---- interval arithmetic on half-open [begin, end) ranges, as sorted merged lists -------------------

Intervals = list[tuple[int, int]]


def union(ranges) -> Intervals:
    """Sorted, disjoint, non-touching intervals covering the same bytes (touching ranges merge)."""
    out: Intervals = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def subtract(keep: Intervals, drop: Intervals) -> Intervals:
    out: Intervals = []
    drop = union(drop)
    for begin, end in union(keep):
        pieces = [(begin, end)]
        for d0, d1 in drop:
            next_pieces = []
            for p0, p1 in pieces:
                if d1 <= p0 or d0 >= p1:
                    next_pieces.append((p0, p1))
                    continue
                if p0 < d0:
                    next_pieces.append((p0, d0))
                if p1 > d1:
                    next_pieces.append((d1, p1))
            pieces = next_pieces
        out.extend(pieces)
    return union(out)


def intersect(a: Intervals, b: Intervals) -> Intervals:
    out: Intervals = []
    for a0, a1 in union(a):
        for b0, b1 in union(b):
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((lo, hi))
    return union(out)


def clip_relative(ranges: Intervals, begin: int, end: int) -> Intervals:
    """The part of `ranges` inside [begin, end), shifted so that `begin` becomes 0."""
    return [(lo - begin, hi - begin) for lo, hi in intersect(ranges, [(begin, end)])]


def total(ranges: Intervals) -> int:
    return sum(end - begin for begin, end in ranges)
