"""CuMemAllocator: vLLM's sleep-mode allocator, with buffers kept across level-2 sleep.

The surface is vLLM's ``vllm.device_allocator.cumem.CuMemAllocator``; the table of allocations, the
host backups and all data movement live in the C++ core (``_core``).
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from vllm_sleep_ext import _core, host_tensors
from vllm_sleep_ext.preserve import PreserveMode, PreserveSet, Range, ranges_of, registry

logger = logging.getLogger(__name__)

# Tags vLLM gives its pools. wake_up(tags) also wakes every tag but the two vLLM wakes one by one.
VLLM_TAGS = ("weights", "kv_cache", "runtime", "cudagraph", "workspace")
SEPARATELY_WOKEN_TAGS = ("weights", "kv_cache")

Tags = Union[str, Sequence[str], None]
GiB = float(1 << 30)

# One pluggable allocator per process, never freed: pools call into it until the very end.
_pluggable: Optional[torch.cuda.memory.CUDAPluggableAllocator] = None


@dataclasses.dataclass(frozen=True)
class AllocationData:
    ptr: int
    size: int
    device: int
    tag: str
    state: str  # "mapped", "backed_up" or "discarded" (rows released for good are not listed)

    @property
    def is_asleep(self) -> bool:
        return self.state != "mapped"


@dataclasses.dataclass(frozen=True)
class TagStats:
    allocations: int
    mapped_bytes: int
    asleep_bytes: int
    backed_up_bytes: int  # host bytes held for the tag, preserved ranges included
    preserved_bytes: int  # of which preserved ranges of a discarded tag


@dataclasses.dataclass(frozen=True)
class OpStats:
    seconds: float
    bytes_copied: int
    bytes_device: int  # released by a sleep, mapped by a wake
    allocations: int
    mappings: int  # physical handles released by a sleep, mapped by a wake (allocations share slabs)
    populate_seconds: float  # sleep: faulting in new host backup memory, summed over staging threads
    pin_seconds: float  # sleep: pinning it (cuMemHostRegister), summed over staging threads


@dataclasses.dataclass(frozen=True)
class AllocatorStats:
    tags: dict[str, TagStats]
    last_sleep: Optional[OpStats]
    last_wake: Optional[OpStats]
    host_bytes: int  # host memory held for backups, the kept cache included


def _memory_snapshot() -> list[dict]:
    try:
        return torch.cuda.memory_snapshot(include_traces=False)
    except TypeError:  # PyTorch before include_traces
        return torch.cuda.memory_snapshot()


def _fields(obj: object, cls: type) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


class CuMemAllocator:
    """Tagged memory pools whose physical memory can be released and restored at the same addresses.

    Inside ``use_memory_pool(tag)`` every CUDA allocation goes to a pool of that tag. ``sleep()`` backs
    up the offloaded tags to host and releases the physical memory of every pool; module buffers
    (rotary caches, ``position_ids``, scales) are backed up whatever their tag, so a level-2 sleep
    followed by a reload of the parameters gives back a working model. ``wake_up()`` maps the memory
    again at the same addresses and copies the backups back.
    """

    instance: Optional["CuMemAllocator"] = None
    default_tag: str = "default"

    @staticmethod
    def get_instance() -> "CuMemAllocator":
        """The process's allocator on the CUDA VMM backend (RuntimeError where there is no driver)."""
        if CuMemAllocator.instance is None:
            CuMemAllocator.instance = CuMemAllocator(backend="cuda")
            atexit.register(CuMemAllocator.instance.release_pools)
        return CuMemAllocator.instance

    def __init__(self, backend: str = "cuda", capacity_bytes: int = 0) -> None:
        # "cuda" is the process-wide core behind my_malloc/my_free; "host" is a private core for the
        # host backend (tests, demo), where capacity_bytes simulates a card of that size.
        self._core = _core.cuda_allocator() if backend == "cuda" else _core.Allocator(backend, capacity_bytes)
        self.backend = backend
        self._cudagraph_pool: Optional[torch.cuda.MemPool] = None
        self._closed_pools: list[torch.cuda.MemPool] = []  # no one allocates from these again
        self._pool_lock = threading.Lock()
        self._preserved = PreserveSet()
        self._used_tags: set[str] = {self.default_tag}
        self.preserve_mode = os.environ.get("VLLM_SLEEP_EXT_PRESERVE", PreserveMode.BUFFERS.value)
        slab_bytes = os.environ.get("VLLM_SLEEP_EXT_SLAB_BYTES")  # 0: one physical handle per allocation
        if slab_bytes:
            self._core.slab_bytes = int(slab_bytes)

    # -- pools -------------------------------------------------------------------------------------

    @contextmanager
    def use_memory_pool(self, tag: Optional[str] = None) -> Iterator[None]:
        """CUDA allocations inside go to a new pool of ``tag`` (default: ``default_tag``)."""
        tag = self.default_tag if tag is None else tag
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"tag must be a non-empty str, got {tag!r}")
        self._used_tags.add(tag)
        previous = _core.set_thread_tag(tag)
        try:
            if self.backend == "cuda":
                with self._cuda_pool():
                    yield
            else:
                yield
        finally:
            _core.set_thread_tag(previous)

    @contextmanager
    def _cuda_pool(self) -> Iterator[None]:
        pool = torch.cuda.MemPool(self._pool_allocator()._allocator)
        # Expandable segments do not work with pluggable-allocator pools (pytorch#147851).
        expandable = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        try:
            with torch.cuda.use_mem_pool(pool):
                yield
        finally:
            if expandable:
                torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            # Kept alive: destroying a pool while other threads allocate aborts in PyTorch, and
            # vLLM keeps them too (pytorch#146431). Nothing allocates from it again, so its empty
            # segments can go; what empties later goes at the next sleep or wake.
            with self._pool_lock:
                self._closed_pools.append(pool)
            self._trim(automatic=True)

    def trim(self) -> None:
        """Releases, for good, pool segments in which PyTorch holds nothing (tensors freed since).

        sleep(), wake_up() and leaving use_memory_pool() do this by themselves when this process
        runs a single Python thread. With more threads they leave it to an explicit call, made when
        no other thread uses CUDA memory: PyTorch's memory snapshot, which tells which segments are
        empty, is not safe against another thread allocating or freeing at the same time.
        """
        self._trim(automatic=False)

    def _trim(self, automatic: bool) -> None:
        if self.backend != "cuda" or (automatic and threading.active_count() > 1):
            return
        with self._pool_lock:
            closed = {tuple(pool.id) for pool in self._closed_pools}
            live = {a.ptr for a in self._core.allocations() if a.state != "unused"}
            # The whole-process snapshot: the per-pool one (MemPool.snapshot) crashed here on pools
            # whose tensors had all been freed.
            for segment in _memory_snapshot():
                in_closed_pool = tuple(segment.get("segment_pool_id", ())) in closed
                if segment["allocated_size"] == 0 and in_closed_pool and segment["address"] in live:
                    self._core.trim(segment["address"])

    @staticmethod
    def _pool_allocator() -> torch.cuda.memory.CUDAPluggableAllocator:
        global _pluggable
        if _pluggable is None:
            _pluggable = torch.cuda.memory.CUDAPluggableAllocator(_core.__file__, "my_malloc", "my_free")
        return _pluggable

    @contextmanager
    def cudagraph_pool(self) -> Iterator[tuple[int, int]]:
        """Tags CUDA graph capture allocations "cudagraph"; yields the pool id for ``torch.cuda.graph``."""
        self._require_cuda("cudagraph_pool")
        if self._cudagraph_pool is None:
            self._cudagraph_pool = torch.cuda.MemPool(self._pool_allocator()._allocator)
        self._used_tags.add("cudagraph")
        previous = _core.set_thread_tag("cudagraph")
        try:
            yield self._cudagraph_pool.id  # capture routes allocations to it on this thread
        finally:
            _core.set_thread_tag(previous)

    def release_pools(self) -> None:
        """Drops every pool; PyTorch then frees their empty segments. Call it with no pool in use."""
        self._closed_pools.clear()
        self._cudagraph_pool = None
        gc.collect()
        if self.backend == "cuda":
            torch.cuda.empty_cache()

    close = release_pools  # vLLM's name for it

    # -- sleep and wake ----------------------------------------------------------------------------

    def sleep(self, offload_tags: Tags = None) -> None:
        """Releases the physical memory of every pool.

        Allocations of ``offload_tags`` (None: the default tag) are copied to host whole; of all others
        only preserved bytes are (see ``preserve_mode``). Pending GPU work finishes first.
        """
        tags = self._tags(offload_tags, "offload_tags", default=(self.default_tag,))
        self._trim(automatic=True)
        preserve, exclude = self._preserved_ranges()
        stats = self._core.sleep(list(tags), preserve, exclude)
        if self.backend == "cuda":
            torch.cuda.empty_cache()  # as vLLM does: hand memory freed meanwhile back to the driver
        if not logger.isEnabledFor(logging.INFO):
            return
        preserved = sum(s.preserved_bytes for s in self._core.tag_stats().values())
        logger.info(
            "sleep: released %.2f GiB in %d allocations (%d mappings); %.2f GiB to host (%.2f MiB of it "
            "preserved buffers) in %.3f s (%.1f GB/s)",
            stats.bytes_device / GiB, stats.allocations, stats.mappings, stats.bytes_copied / GiB,
            preserved / (1 << 20), stats.seconds, stats.bytes_copied / max(stats.seconds, 1e-9) / 1e9,
        )

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Maps sleeping allocations again at the same addresses and copies their backups back.

        ``tags=None`` wakes everything; otherwise those tags plus every tag other than "weights" and
        "kv_cache", which vLLM wakes one at a time. On DeviceOutOfMemoryError nothing changes.
        """
        if self.backend == "cuda":
            torch.cuda.empty_cache()  # memory torch caches outside the pools is room for the wake
        self._trim(automatic=True)
        if tags is None:
            stats = self._core.wake(None)
        else:
            wanted = set(self._tags(tags, "tags"))
            wanted |= {t for t in self._known_tags() if t not in SEPARATELY_WOKEN_TAGS}
            stats = self._core.wake(sorted(wanted))
        logger.info(
            "wake_up: mapped %.2f GiB in %d allocations (%d mappings); %.2f GiB from host in %.3f s (%.1f GB/s)",
            stats.bytes_device / GiB, stats.allocations, stats.mappings, stats.bytes_copied / GiB, stats.seconds,
            stats.bytes_copied / max(stats.seconds, 1e-9) / 1e9,
        )

    def discard(self, tags: Tags) -> None:
        """Releases the physical memory of ``tags`` with no backup at all, preserved bytes included."""
        self._core.discard(list(self._tags(tags, "tags")))

    def preserve(self, *objs: Union[torch.Tensor, nn.Module]) -> None:
        """Keeps these tensors (a module: its buffers) across a discard of their tag, until they die."""
        self._preserved.add(*objs)

    @property
    def preserve_mode(self) -> str:
        return self._preserve_mode.value

    @preserve_mode.setter
    def preserve_mode(self, mode: str) -> None:
        try:
            self._preserve_mode = PreserveMode(mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in PreserveMode)
            raise ValueError(f"preserve_mode must be one of {choices}, got {mode!r}") from None

    def _preserved_ranges(self) -> tuple[list[Range], list[Range]]:
        """(ranges to keep, ranges never to keep) for the core; it clips them to the pools."""
        mode = self._preserve_mode
        if mode is PreserveMode.OFF:
            return [], []
        keep = ranges_of(self._preserved.tensors())
        if mode is PreserveMode.BUFFERS:
            return keep + ranges_of(registry.buffers()), []
        return keep + self._live_ranges(), ranges_of(registry.parameters())

    def _live_ranges(self) -> list[Range]:
        if self.backend != "cuda":
            return [(a.ptr, a.size) for a in self._core.allocations()]  # host tensors die with their memory
        ranges = []
        for segment in _memory_snapshot():  # every pool; the core keeps only pool memory
            address = segment["address"]
            for block in segment["blocks"]:
                if block["state"].startswith("active"):
                    ranges.append((block.get("address", address), block["size"]))
                address += block["size"]
        return ranges

    # -- host memory -------------------------------------------------------------------------------

    @property
    def keep_host_backups(self) -> bool:
        """Keep pinned host memory after a wake, so the next sleep copies at once (the default)."""
        return self._core.keep_host_backups

    @keep_host_backups.setter
    def keep_host_backups(self, keep: bool) -> None:
        self._core.keep_host_backups = bool(keep)

    def release_host_cache(self) -> None:
        """Returns host memory kept for reuse; backups of sleeping allocations stay."""
        self._core.release_host_cache()

    @property
    def host_memory_limit(self) -> int:
        """Host bytes backups may take (0: no limit); a sleep beyond it fails before releasing anything."""
        return self._core.host_memory_limit

    @host_memory_limit.setter
    def host_memory_limit(self, limit: int) -> None:
        self._core.host_memory_limit = int(limit)

    # -- what vLLM reads ---------------------------------------------------------------------------

    @property
    def pointer_to_data(self) -> dict[int, AllocationData]:
        return {
            a.ptr: AllocationData(ptr=a.ptr, size=a.size, device=a.device, tag=a.tag, state=a.state)
            for a in self._core.allocations()
            if a.state != "unused"
        }

    def get_current_usage(self) -> int:
        """Bytes of every allocation in the pools, awake or asleep."""
        return sum(a.size for a in self._core.allocations() if a.state != "unused")

    def stats(self) -> AllocatorStats:
        def op(s: Optional[_core.OpStats]) -> Optional[OpStats]:
            return None if s is None else OpStats(**_fields(s, OpStats))

        return AllocatorStats(
            tags={tag: TagStats(**_fields(s, TagStats)) for tag, s in self._core.tag_stats().items()},
            last_sleep=op(self._core.last_sleep),
            last_wake=op(self._core.last_wake),
            host_bytes=self._core.host_bytes(),
        )

    # -- host backend ------------------------------------------------------------------------------

    def empty(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Host backend: a tensor in the current pool's memory (use_memory_pool sets the tag)."""
        self._require_host("empty")
        return host_tensors.empty(self._core, tuple(shape), dtype, _core.thread_tag() or self.default_tag)

    def place_module(self, module: nn.Module) -> nn.Module:
        """Host backend: moves the module's parameters and buffers into the current pool's memory."""
        self._require_host("place_module")
        return host_tensors.place_module(self._core, module, _core.thread_tag() or self.default_tag)

    # -- helpers -----------------------------------------------------------------------------------

    def _known_tags(self) -> set[str]:
        return self._used_tags | {a.tag for a in self._core.allocations()}

    def _tags(self, tags: Tags, what: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        if tags is None:
            return tuple(default)
        if isinstance(tags, str):
            tags = (tags,)
        if not isinstance(tags, (list, tuple, set, frozenset)):
            raise TypeError(f"{what} must be a str or a sequence of str, got {type(tags).__name__}")
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"{what} must hold str tags, got {tag!r} ({type(tag).__name__})")
        known = self._known_tags() | set(VLLM_TAGS)
        unknown = sorted(set(tags) - known)
        if unknown:
            raise ValueError(f"{what}: unknown tag(s) {unknown}; known tags are {sorted(known)}")
        return tuple(tags)

    def _require_cuda(self, what: str) -> None:
        if self.backend != "cuda":
            raise RuntimeError(f"{what}() needs the CUDA backend; this allocator uses {self.backend!r}")

    def _require_host(self, what: str) -> None:
        if self.backend != "host":
            raise RuntimeError(f"{what}() is for the host backend; on CUDA allocate inside use_memory_pool()")
