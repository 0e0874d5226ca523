"""CuMemAllocator: vLLM's sleep-mode allocator, with buffers kept across level-2 sleep.

The surface is vLLM's ``vllm.device_allocator.cumem.CuMemAllocator``; the table of allocations, the
host backups and all data movement live in the C++ core (``_core``).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from vllm_sleep_ext import __version__, _core, alloc_conf, alloc_history, envs, host_tensors, pools, serving
from vllm_sleep_ext import compress as compression
from vllm_sleep_ext.preserve import (
    PreserveMode,
    PreserveSet,
    Range,
    as_ranges,
    intersect,
    merge,
    parameter_spans,
    parse_preserve_tags,
    ranges_of,
    registry,
    subtract,
)

logger = logging.getLogger(__name__)

# Tags vLLM gives its pools. wake_up(tags) also wakes every tag but the two vLLM wakes one by one.
VLLM_TAGS = ("weights", "kv_cache", "runtime", "cudagraph", "workspace")
SEPARATELY_WOKEN_TAGS = ("weights", "kv_cache")
# What vLLM's level 1 backs up (0.33; 0.26 backs up "weights" only, and has no pools of the other two):
# host memory is prepared ahead for all of them together.
LEVEL1_OFFLOAD_TAGS = ("weights", "runtime", "cudagraph")

Tags = Union[str, Sequence[str], None]
GiB = float(1 << 30)
LARGE_PRESERVE_BYTES = 1 << 30  # "live" keeping more than this at a sleep says so, once

# One pluggable allocator per process, never freed: PrivatePools keep a plain pointer to it, and the
# last segments go back through it at interpreter exit, after module globals are cleared.
_pluggable: Optional[torch.cuda.memory.CUDAPluggableAllocator] = None
_instance_lock = threading.Lock()


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
    disk_bytes: int  # of backed_up_bytes, in files of the disk tier (disk_dir)
    stored_bytes: int  # host bytes those backups take (less than backed_up_bytes when compressed)


@dataclasses.dataclass(frozen=True)
class OpStats:
    seconds: float
    bytes_copied: int
    bytes_device: int  # released by a sleep, mapped by a wake
    allocations: int
    mappings: int  # physical handles released by a sleep, mapped by a wake (allocations share slabs)
    populate_seconds: float  # sleep: faulting in new host backup memory, summed over staging threads
    pin_seconds: float  # sleep: pinning it (cuMemHostRegister), summed over staging threads
    # Driver time, summed over the operation (where a sleep's or wake's time went):
    sync_seconds: float  # sleep: waiting for the device's pending work
    copy_wait_seconds: float  # waiting for copies (sleep: before each release; wake: at the end)
    unmap_seconds: float  # sleep: cuMemUnmap
    release_seconds: float  # sleep: cuMemRelease
    map_seconds: float  # wake: cuMemCreate + cuMemMap + cuMemSetAccess
    wait_seconds: float  # wake: waiting for device memory another process frees (wake_wait_seconds)
    disk_bytes: int  # of bytes_copied, written to (sleep) or read from (wake) the disk tier
    disk_seconds: float  # the disk part, from its first chunk to its last, device copies included
    # Option compress (0 when off): backup bytes through the codec's pipeline and the host bytes they take.
    compress_plain_bytes: int
    compress_stored_bytes: int
    pieces_packed: int  # pieces kept compressed
    pieces_plain: int  # pieces sent as they are (did not pay, or could not be coded)
    staging_device_bytes: int  # device memory the operation used for compression staging (wake: 0 if none packed)

    @property
    def compress_ratio(self) -> float:
        """Host bytes over backup bytes through the compressed pipeline (1.0 when nothing went through it)."""
        return self.compress_stored_bytes / self.compress_plain_bytes if self.compress_plain_bytes else 1.0


@dataclasses.dataclass(frozen=True)
class PreservedRanges:
    """What the last sleep kept of tags it did not offload, as the Python side resolved it."""

    bytes: int
    ranges: int


@dataclasses.dataclass(frozen=True)
class PrimeStats:
    """The background primes of the driver after releases (csrc/create_primer.h), since the allocator was made."""

    rounds: int  # one granule created and released on one device
    skipped: int  # rounds skipped because a sleep or wake was running
    failures: int  # rounds that failed (a full device); harmless, last_error says why
    last_seconds: float
    longest_seconds: float  # the most driver work a prime took off a wake's path
    last_error: str


@dataclasses.dataclass(frozen=True)
class AllocatorStats:
    tags: dict[str, TagStats]
    last_sleep: Optional[OpStats]
    last_wake: Optional[OpStats]
    host_bytes: int  # host memory held for backups, the kept cache included
    quarantined_bytes: int = 0  # device memory freed while mapped, held until the device is known done with it
    primes: Optional[PrimeStats] = None


def describe(allocator: Optional["CuMemAllocator"] = None) -> str:
    """Version, preserve mode and host memory policy, for the line that says the allocator is active."""
    if allocator is not None:
        mode, keep, policy = allocator.preserve_mode, allocator.keep_host_backups, allocator.host_policy
        limit, disk_dir = allocator.host_memory_limit, allocator.disk_dir
    else:  # what an allocator made now would take from the environment (EnvError where it would fail)
        mode, keep = envs.get(envs.PRESERVE), envs.get(envs.KEEP_HOST)
        policy = envs.get(envs.HOST_POLICY) or ("pinned" if keep else "release")
        limit, disk_dir = envs.get(envs.HOST_LIMIT) or 0, envs.get(envs.DISK_DIR) or ""
    host = {
        "pinned": "kept pinned after wake for the next sleep",
        "reclaimable": "kept after wake, unpinned, for the kernel to take back if it must",
        "release": "returned after each wake",
    }.get(policy, policy)
    tier = ""
    if limit:
        tier = f", host limit {limit / GiB:.2f} GiB, " + (f"beyond it on disk in {disk_dir}" if disk_dir
                                                           else "no disk tier (a sleep beyond it fails)")
    return (f"vllm_sleep_ext {__version__}, preserve mode {mode!r}, host memory {host} "
            f"({envs.KEEP_HOST.name}={int(keep)}, {envs.HOST_POLICY.name}={policy}){tier}")


def _memory_snapshot() -> list[dict]:
    try:
        return torch.cuda.memory_snapshot(include_traces=False)
    except TypeError:  # PyTorch before include_traces
        return torch.cuda.memory_snapshot()


Block = tuple[int, int, int, str]  # a caching-allocator block: (start, size, used, state)


def blocks_in_scope(snapshot: list[dict], scope: dict[int, int]) -> tuple[list[Block], dict[int, int]]:
    """The caching allocator's blocks in the segments that are allocations in ``scope`` (address: size),
    as (start, size, used, state), and the allocations of ``scope`` the snapshot does not list. Used:
    the bytes asked for; the block's tail past them (rounding, an unsplit rest) holds no tensor."""
    blocks = []
    unseen = dict(scope)
    for segment in snapshot:
        address = segment["address"]
        if unseen.pop(address, None) is None:
            continue
        for block in segment["blocks"]:
            start, size = block.get("address", address), block["size"]
            used = block.get("requested_size") or size
            blocks.append((start, size, used if used < size else size, block["state"]))
            address = start + size
    return blocks, unseen


def _fields(obj: object, cls: type) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


class CuMemAllocator:
    """Tagged memory pools whose physical memory can be released and restored at the same addresses.

    Inside ``use_memory_pool(tag)`` every CUDA allocation goes to a pool of that tag. ``sleep()`` backs
    up the offloaded tags to host and releases the physical memory of every pool; of the other tags it
    backs up the preserve scope (``preserve_mode``: by default every live non-parameter byte of the
    "weights" pool, registered buffers and ``preserve()``), so a level-2 sleep followed by a reload of
    the parameters gives back a working model. ``wake_up()`` maps the memory again at the same
    addresses and copies the backups back.
    """

    instance: Optional["CuMemAllocator"] = None
    default_tag: str = "default"

    @staticmethod
    def get_instance() -> "CuMemAllocator":
        """The process's allocator on the CUDA VMM backend (RuntimeError where there is no driver)."""
        instance = CuMemAllocator.instance
        if instance is None:
            with _instance_lock:  # two threads asking first must get the same allocator
                if CuMemAllocator.instance is None:
                    allocator = CuMemAllocator(backend="cuda")
                    atexit.register(allocator.release_pools)
                    CuMemAllocator.instance = allocator
                    logger.info("vllm_sleep_ext: sleep-mode allocator active (%s)", describe(allocator))
                    serving.attach(allocator)  # in vLLM: prepare host memory at full speed until it serves
                instance = CuMemAllocator.instance
        return instance

    def __init__(self, backend: str = "cuda", capacity_bytes: int = 0, card: str = "", *,
                 host_memory_limit: Optional[int] = None, disk_dir: Optional[str] = None,
                 compress: Optional[str] = None) -> None:
        # "cuda" is the process-wide core behind my_malloc/my_free; "host" is a private core for the
        # host backend (tests, demo), where capacity_bytes simulates a card of that size, shared by the
        # host allocators given the same `card` name (two engines on one GPU).
        if backend == "cuda" and card:
            raise ValueError(f"card={card!r}: a shared card is for the host backends only")
        self._core = (_core.cuda_allocator() if backend == "cuda"
                      else _core.Allocator(backend, capacity_bytes, card))
        self.backend = backend
        self._cudagraph_pool: Optional[pools.Route] = None
        self._pool_lock = threading.Lock()  # guards _cudagraph_pool
        self._preserved = PreserveSet()
        self._used_tags: set[str] = {self.default_tag}
        self.last_preserved: PreservedRanges = PreservedRanges(0, 0)
        self._warned_large = False
        self._wake_wait_seconds = 0.0
        self._apply_environment()
        # Arguments win over the environment.
        if host_memory_limit is not None:
            self.host_memory_limit = host_memory_limit
        if disk_dir is not None:
            self.disk_dir = disk_dir
        if compress is not None:
            self.compress = compress

    def _apply_environment(self) -> None:
        """The VLLM_SLEEP_EXT_* settings (vllm_sleep_ext/envs.py): how they reach the processes vLLM starts.

        A bad value raises EnvError (a ValueError naming the variable, the value and what is accepted);
        inside vLLM that is where sleep mode fails, in the worker that creates the allocator.
        """
        envs.set_from(envs.PRESERVE, self, "preserve_mode")
        envs.set_from(envs.PRESERVE_TAGS, self, "preserve_tags")
        envs.set_from(envs.FILL_UNRESTORED, self, "fill_unrestored")
        envs.set_from(envs.KEEP_HOST, self, "keep_host_backups")
        envs.set_from(envs.HOST_POLICY, self, "host_policy")  # after KEEP_HOST: the policy wins
        envs.set_from(envs.RECLAIMABLE_PINNED_SHARE, self, "reclaimable_pinned_share")
        envs.set_from(envs.SLAB_BYTES, self._core, "slab_bytes")
        envs.set_from(envs.PRIME, self._core, "prime_after_release")
        envs.set_from(envs.WAKE_WAIT_S, self, "wake_wait_seconds")
        envs.set_from(envs.HOST_LIMIT, self, "host_memory_limit")
        envs.set_from(envs.DISK_DIR, self, "disk_dir")
        envs.set_from(envs.COMPRESS, self, "compress")
        # Prepare host backup memory in the background when the weights are loaded (CUDA: on by default).
        prepare = envs.get(envs.PREPARE_HOST)
        self.prepare_host = self.backend == "cuda" if prepare is None else prepare
        if envs.get(envs.RECORD_ALLOCATIONS) and self.backend == "cuda":
            alloc_history.start()  # before vLLM fills the pools: a report can name each block's owner

    # -- pools -------------------------------------------------------------------------------------

    @contextmanager
    def use_memory_pool(self, tag: Optional[str] = None) -> Iterator[None]:
        """CUDA allocations inside go to a new pool of ``tag`` (default: ``default_tag``).

        Pools nest: inside an inner pool allocations go to it and get its tag, after it the outer
        pool's again. Segments the pool empties go back to the driver (Note [Pools, routing ...]).
        """
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
        if tag in LEVEL1_OFFLOAD_TAGS and self.prepare_host:
            self._prepare_host_backups(wait=False, quiet=tag != "weights")

    @contextmanager
    def _cuda_pool(self) -> Iterator[None]:
        device = torch.cuda.current_device()
        pool = torch.cuda.MemPool(self._pool_allocator()._allocator)
        try:
            route = pools.Route(pool, device)
            with alloc_conf.expandable_segments_off(), pools.sole_route(route), torch.cuda.use_mem_pool(pool, device):
                yield
        finally:
            pools.retire(pool, device)  # nothing allocates from it again
            self._trim_quietly()

    def trim(self) -> None:
        """Hands pool segments in which nothing is allocated any more back to the driver, for good.

        Done by itself on leaving use_memory_pool(), before sleep() and before wake_up(), from any thread
        in any process: PyTorch releases them itself (Note [Pools, routing and free segments]).
        """
        if self.backend == "cuda":
            torch.cuda.empty_cache()
        # PyTorch's frees only quarantine (kernels may still use the memory); settling waits for the
        # device and releases it, so not while this thread's stream captures a CUDA graph.
        self._core.settle()

    def _trim_quietly(self) -> None:
        if self.backend == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # settling synchronizes the device, which would break the capture: next time
        try:
            self.trim()
        except _core.SleepExtError as e:  # a driver call failed; the next sleep or wake retries it and raises
            logger.warning("vllm_sleep_ext: freed pool memory not given back yet: %s", e)
        except RuntimeError as e:  # torch < 2.8 while another pool or capture is open: next time
            logger.debug("vllm_sleep_ext: pool segments not trimmed now (%s)", e)

    @staticmethod
    def _pool_allocator() -> torch.cuda.memory.CUDAPluggableAllocator:
        global _pluggable
        with _instance_lock:
            if _pluggable is None:
                pluggable = torch.cuda.memory.CUDAPluggableAllocator(_core.__file__, "my_malloc", "my_free")
                # Never destroyed, not even at interpreter exit (see _pluggable): one reference leaked.
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(pluggable))
                _pluggable = pluggable
        return _pluggable

    @contextmanager
    def cudagraph_pool(self) -> Iterator[tuple[int, int]]:
        """Tags CUDA graph capture allocations "cudagraph"; yields the pool id for ``torch.cuda.graph``."""
        self._require_cuda("cudagraph_pool")
        with self._pool_lock:
            if self._cudagraph_pool is None:
                device = torch.cuda.current_device()
                self._cudagraph_pool = pools.Route(torch.cuda.MemPool(self._pool_allocator()._allocator), device)
            pool = self._cudagraph_pool.pool
        self._used_tags.add("cudagraph")
        previous = _core.set_thread_tag("cudagraph")
        try:
            # Capture routes allocations to the pool by stream; this thread's own pool steps aside.
            with alloc_conf.expandable_segments_off(), pools.sole_route(pools.Route(None, torch.cuda.current_device())):
                yield pool.id
        finally:
            _core.set_thread_tag(previous)
        if self.prepare_host:  # vLLM leaves it once per captured graph: cheap while the preparation covers it
            self._prepare_host_backups(wait=False, quiet=True)

    def release_pools(self) -> None:
        """Drops the CUDA graph pool; PyTorch then frees the empty segments of every pool we made.

        Call it with no pool in use and no graph captured into the graph pool still needed (vLLM does
        at shutdown). Run at exit too.
        """
        with self._pool_lock:
            graph_pool, self._cudagraph_pool = self._cudagraph_pool, None
        if graph_pool is not None:
            pools.retire(graph_pool.pool, graph_pool.device)  # freeable once the graphs captured into it are gone
        if self.backend == "cuda":
            gc.collect()
            self._trim_quietly()

    close = release_pools  # vLLM's name for it

    # -- sleep and wake ----------------------------------------------------------------------------

    def sleep(self, offload_tags: Tags = None) -> None:
        """Releases the physical memory of every pool.

        Allocations of ``offload_tags`` (None: the default tag) are copied to host whole; of all others
        only preserved bytes are (see ``preserve_mode``). Pending GPU work finishes first.
        """
        tags = self._tags(offload_tags, "offload_tags", default=(self.default_tag,))
        self._log_host_error()
        self._trim_quietly()  # emptied segments are released for good, neither backed up nor mapped again
        start = time.perf_counter()
        preserve, exclude = self._preserved_ranges(tags)
        scope_seconds = time.perf_counter() - start
        stats = self._core.sleep(list(tags), preserve, exclude)
        logger.info(
            "sleep: released %.2f GiB in %d allocations (%d mappings); %.2f GiB to host (%.2f MiB of it "
            "preserved in %d ranges, preserve_mode=%s) in %.3f s (%.1f GB/s; preserve scope %.1f ms, "
            "driver unmap %.1f ms, release %.1f ms)",
            stats.bytes_device / GiB, stats.allocations, stats.mappings, stats.bytes_copied / GiB,
            self.last_preserved.bytes / (1 << 20), self.last_preserved.ranges, self.preserve_mode,
            stats.seconds, stats.bytes_copied / max(stats.seconds, 1e-9) / 1e9, scope_seconds * 1e3,
            stats.unmap_seconds * 1e3, stats.release_seconds * 1e3,
        )
        self._log_disk("sleep", "to", stats)
        self._log_compressed("sleep", stats)

    def wake_up(self, tags: Optional[Sequence[str]] = None, *, wait_for_memory: Optional[float] = None) -> None:
        """Maps sleeping allocations again at the same addresses and copies their backups back.

        ``tags=None`` wakes everything; otherwise those tags plus every tag other than "weights" and
        "kv_cache", which vLLM wakes one at a time. ``wait_for_memory`` (None: ``wake_wait_seconds``):
        seconds to wait for device memory that another process is freeing (its sleep), mapping and
        copying what fits meanwhile; 0 fails at once when the device lacks room. On
        DeviceOutOfMemoryError nothing changes, and the same call can be retried.
        """
        wait = self.wake_wait_seconds if wait_for_memory is None else wait_for_memory
        self._trim_quietly()  # emptied pool segments are not mapped again; torch's other cached memory is room
        if tags is None:
            stats = self._core.wake(None, wait)
        else:
            known = self._known_tags()
            wanted = set(self._tags(tags, "tags", known=known))
            wanted |= {t for t in known if t not in SEPARATELY_WOKEN_TAGS}
            stats = self._core.wake(sorted(wanted), wait)
        waited = f"; waited {stats.wait_seconds:.3f} s for memory" if stats.wait_seconds > 0 else ""
        primes = self._core.prime_stats
        primed = (f"; driver primed {primes.rounds}x since start, last {primes.last_seconds * 1e3:.1f} ms, longest "
                  f"{primes.longest_seconds * 1e3:.1f} ms" if primes.rounds else "")
        logger.info(
            "wake_up: mapped %.2f GiB in %d allocations (%d mappings); %.2f GiB from host in %.3f s (%.1f GB/s; "
            "driver map %.1f ms%s%s)",
            stats.bytes_device / GiB, stats.allocations, stats.mappings, stats.bytes_copied / GiB, stats.seconds,
            stats.bytes_copied / max(stats.seconds, 1e-9) / 1e9, stats.map_seconds * 1e3, waited, primed,
        )
        self._log_disk("wake_up", "from", stats)
        self._log_compressed("wake_up", stats)

    def _log_disk(self, what: str, direction: str, stats: _core.OpStats) -> None:
        if stats.disk_bytes:
            logger.info("%s: of that, %.2f GiB %s disk in %s in %.3f s (%.1f GB/s)", what, stats.disk_bytes / GiB,
                        direction, self.disk_dir, stats.disk_seconds,
                        stats.disk_bytes / max(stats.disk_seconds, 1e-9) / 1e9)

    @staticmethod
    def _log_compressed(what: str, stats: "_core.OpStats") -> None:
        if stats.compress_plain_bytes:
            logger.info(
                "%s: compressed backups %.2f GiB stored as %.2f GiB (ratio %.3f; %d pieces compressed, %d plain; "
                "%.0f MiB device staging)",
                what, stats.compress_plain_bytes / GiB, stats.compress_stored_bytes / GiB,
                stats.compress_stored_bytes / stats.compress_plain_bytes, stats.pieces_packed, stats.pieces_plain,
                stats.staging_device_bytes / (1 << 20),
            )

    @property
    def compress(self) -> str:
        """Level-1 backups compressed on the device: "off" (default), "auto" (a piece is kept compressed
        only where it saves 5 %, else sent plain) or "on" (kept compressed wherever it is smaller). Round
        trips are bit-exact. "on" raises where the codec cannot be had (CUDA: libnvcomp.so.6 from
        nvidia-libnvcomp-cu13); "auto" then logs why once and copies plain. Env VLLM_SLEEP_EXT_COMPRESS."""
        return self._core.compress

    @compress.setter
    def compress(self, mode: str) -> None:
        compression.apply(self._core, mode, self.backend)

    @property
    def wake_wait_seconds(self) -> float:
        """How long ``wake_up()`` waits for device memory another process frees (default 0: it fails at
        once, retryable; env VLLM_SLEEP_EXT_WAKE_WAIT_S). For two engines swapping on one GPU: B's wake
        maps and copies into what A's sleep has released so far instead of waiting for all of it."""
        return self._wake_wait_seconds

    @wake_wait_seconds.setter
    def wake_wait_seconds(self, seconds: float) -> None:
        seconds = float(seconds)
        if not (0.0 <= seconds <= envs.WAKE_WAIT_MAX_S):
            raise ValueError(f"wake_wait_seconds must be from 0 to {envs.WAKE_WAIT_MAX_S:g}, got {seconds!r}")
        self._wake_wait_seconds = seconds

    def discard(self, tags: Tags) -> None:
        """Releases the physical memory of ``tags`` with no backup at all, preserved bytes included."""
        self._core.discard(list(self._tags(tags, "tags")))

    def preserve(self, *objs: Union[torch.Tensor, nn.Module]) -> None:
        """Keeps these tensors (a module: its buffers) across a discard of their tag, for as long as their
        storage lives: a temporary such as ``t.view(-1)`` or ``module.w.data`` counts too.

        Wins over the parameter exclusion: a parameter given here is kept in every mode but "off".
        """
        self._preserved.add(*objs)

    @property
    def preserve_mode(self) -> str:
        """"live" (default), "buffers" or "off": what a sleep keeps of tags it does not offload.

        See Note [Preserve scope] in preserve.py. Env: VLLM_SLEEP_EXT_PRESERVE.
        """
        return self._preserve_mode.value

    @preserve_mode.setter
    def preserve_mode(self, mode: str) -> None:
        try:
            self._preserve_mode = PreserveMode(mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in PreserveMode)
            raise ValueError(f"preserve_mode must be one of {choices}, got {mode!r}") from None

    @property
    def preserve_tags(self) -> tuple[str, ...]:
        """Tags whose live non-parameter bytes "live" keeps (default: "weights").

        Env: VLLM_SLEEP_EXT_PRESERVE_TAGS (comma list). "kv_cache", "runtime", "cudagraph" and
        "workspace" are refused: the engine rebuilds them, and copying them would undo level 2.
        """
        return self._preserve_tags

    @preserve_tags.setter
    def preserve_tags(self, tags: Union[str, Sequence[str]]) -> None:
        self._preserve_tags = parse_preserve_tags(tags)

    @property
    def fill_unrestored(self) -> bool:
        """On wake, fill bytes that no backup restores with 0xFF (NaN in fp16/bf16/fp32), so a model
        that reads state nobody restored fails at once instead of drifting. Off by default.

        Env: VLLM_SLEEP_EXT_FILL_UNRESTORED=1. Needs a core that has the option.
        """
        return bool(getattr(self._core, "fill_unrestored", False))

    @fill_unrestored.setter
    def fill_unrestored(self, fill: bool) -> None:
        if not hasattr(self._core, "fill_unrestored"):
            if fill:
                logger.warning("fill_unrestored: this build of the core has no such option; ignored")
            return
        self._core.fill_unrestored = bool(fill)

    def _preserved_ranges(self, offload_tags: Sequence[str] = ()) -> tuple[list[Range], list[Range]]:
        """(ranges to keep, ranges never to keep) for the core, and ``last_preserved`` for the log.

        Kept: preserve() (always, parameters included), registered buffers, and in "live" mode the
        live bytes of ``preserve_tags`` that are not a parameter's. Only bytes of awake allocations
        whose tag is not offloaded count (the others are copied whole or asleep already), so a level-1
        sleep, which offloads "weights", resolves no parameter at all.
        """
        mode = self._preserve_mode
        allocations = self._core.allocations()
        awake_kept = [a for a in allocations if a.state == "mapped" and a.tag not in offload_tags]
        if mode is PreserveMode.OFF or not awake_kept:
            self.last_preserved = PreservedRanges(0, 0)
            return [], []
        # preserve() wins: parameters are taken out of the live bytes only, never out of these.
        keep = merge(self._preserved.ranges() + ranges_of(registry.buffers()))
        scope = {a.ptr: a.size for a in awake_kept if a.tag in self._preserve_tags}
        if mode is PreserveMode.LIVE and scope:
            own, whole = parameter_spans(registry.parameters())
            live = merge(self._live_ranges(scope, skip_blocks=whole))
            keep = merge(as_ranges(keep) + as_ranges(subtract(live, merge(own))))
        kept = intersect(keep, merge((a.ptr, a.size) for a in awake_kept))
        self.last_preserved = PreservedRanges(sum(e - s for s, e in kept), len(kept))
        if mode is PreserveMode.LIVE and self.last_preserved.bytes > LARGE_PRESERVE_BYTES and not self._warned_large:
            # Non-parameter tensors this large are usually derived from the weights (repacked copies),
            # stale once new weights arrive: worth a copy only if nothing rebuilds them.
            self._warned_large = True
            logger.warning(
                "preserve: level 2 keeps %.2f GiB of non-parameter tensors of %s in %d ranges at each sleep; "
                "if the engine rebuilds them after a weight update, VLLM_SLEEP_EXT_PRESERVE=buffers avoids "
                "the copy", self.last_preserved.bytes / GiB, self._preserve_tags, self.last_preserved.ranges)
        return as_ranges(kept), []

    def _live_ranges(self, scope: dict[int, int], skip_blocks: frozenset[int] | set[int] = frozenset()) -> list[Range]:
        """Live bytes of the allocations in ``scope`` (address: size), but no block that starts at ``skip_blocks``.

        Which bytes are live is known to PyTorch's caching allocator only (blocks in use), so this
        reads torch.cuda.memory_snapshot(): the whole-process one, taken under the caching allocator's
        lock, because the per-pool MemPool.snapshot() crashed on emptied pools. A segfault was seen
        when another thread allocated during a snapshot (torch 2.11); at sleep the engine is idle and
        vLLM's extra threads (output, death-pipe, I/O) do not allocate CUDA memory. Only segments that
        are allocations in ``scope`` count, so blocks of the KV cache and other pools never do. If the
        snapshot fails, the whole allocations are kept: more bytes, never fewer. On the host backend
        an allocation is freed with its last tensor, so all of it is live.
        """
        if not scope or self.backend != "cuda":
            return list(scope.items())
        try:
            snapshot = _memory_snapshot()
        except Exception as e:  # noqa: BLE001 - a sleep keeps too much rather than fail
            logger.warning("preserve: memory snapshot failed (%s); keeping whole allocations of %s",
                           e, self._preserve_tags)
            return list(scope.items())
        blocks, unseen = blocks_in_scope(snapshot, scope)  # allocations PyTorch does not list are kept whole
        live = [(start, used) for start, _, used, state in blocks if state != "inactive" and start not in skip_blocks]
        return live + list(unseen.items())

    # -- host memory -------------------------------------------------------------------------------

    @property
    def keep_host_backups(self) -> bool:
        """Keep pinned host memory after a wake, so the next sleep copies at once (the default)."""
        return self._core.keep_host_backups

    @keep_host_backups.setter
    def keep_host_backups(self, keep: bool) -> None:
        self._core.keep_host_backups = bool(keep)

    @property
    def host_policy(self) -> str:
        """What host backup memory does between a wake and the next sleep: "pinned" (kept pinned, the
        default; the next sleep copies at once), "reclaimable" (kept unpinned, the kernel may take it
        back under pressure; pinned again at the next sleep) or "release" (given back).
        Env: VLLM_SLEEP_EXT_HOST_POLICY."""
        return self._core.host_policy

    @host_policy.setter
    def host_policy(self, policy: str) -> None:
        self._core.host_policy = str(policy)

    @property
    def reclaimable_pinned_share(self) -> float:
        """Under host_policy "reclaimable": the share (0 to 1) of the host memory kept for the next sleep
        that stays pinned while awake (default 0: none). Pinning runs at about half the copy rate, so
        with 0 a warm sleep copies at about half the PCIe limit; with 0.5 it copies into the pinned half
        while it pins the other. Env: VLLM_SLEEP_EXT_RECLAIMABLE_PINNED_SHARE."""
        return self._core.reclaimable_pinned_share

    @reclaimable_pinned_share.setter
    def reclaimable_pinned_share(self, share: float) -> None:
        self._core.reclaimable_pinned_share = float(share)

    def prepare_host_backups(self) -> None:
        """Makes host memory for a level-1 backup (the tags of LEVEL1_OFFLOAD_TAGS: "weights", "runtime",
        "cudagraph") resident and pinned now, so the first sleep copies at the speed of a warm one.
        Leaving use_memory_pool() of one of those tags, or cudagraph_pool(), starts the same work in the
        background, throttled, unless ``prepare_host`` is False (env VLLM_SLEEP_EXT_PREPARE_HOST=0); a
        pool allocated later grows the memory being prepared and keeps what of it is ready."""
        self._prepare_host_backups(wait=True)

    def _prepare_host_backups(self, wait: bool, quiet: bool = False) -> None:
        mapped = [a for a in self._core.allocations() if a.tag in LEVEL1_OFFLOAD_TAGS and a.state == "mapped"]
        if not mapped:
            return
        hold = sum(a.size for a in mapped)
        nbytes = hold
        if self.compress != "off":
            # A compressed sleep takes an arena of its plain bytes and stores fewer: only those are made
            # ready (what it needs beyond, it makes ready itself), in an arena it will take.
            nbytes = int(hold * compression.EXPECTED_RATIO)
        try:
            self._core.prepare_host(nbytes, mapped[0].device, wait, hold_bytes=hold)
        except _core.SleepExtError as e:
            if wait:
                raise
            logger.warning("host memory for backups not prepared ahead (%s); the first sleep prepares it", e)
            return
        # Restarts for the runtime and CUDA-graph pools (one per captured graph) say so at debug level only.
        logger.log(logging.DEBUG if quiet else logging.INFO, "prepare host backups: %.2f GiB of %s %s",
                   nbytes / GiB, "+".join(sorted({a.tag for a in mapped})),
                   "ready" if wait else "started in the background")

    def _log_host_error(self) -> None:
        error = self._core.host_error()
        if error:
            logger.warning("host memory for backups was not prepared ahead (%s); this sleep prepares it", error)

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

    @property
    def disk_dir(self) -> str:
        """Directory for backups past host_memory_limit ("": none; Note [Disk tier] in csrc/disk_tier.h).

        Each sleep that needs it writes one unnamed file there (O_TMPFILE, mode 0600): nothing is left
        behind, even after a crash. A directory that does not exist or is not writable is refused here.
        """
        return self._core.disk_dir

    @disk_dir.setter
    def disk_dir(self, path: str) -> None:
        self._core.disk_dir = os.fspath(path)

    @property
    def disk_threads(self) -> int:
        """Threads doing the disk tier's I/O (staging: two 16 MiB pinned slots each)."""
        return self._core.disk_threads

    @disk_threads.setter
    def disk_threads(self, count: int) -> None:
        self._core.disk_threads = int(count)

    # -- what vLLM reads ---------------------------------------------------------------------------

    @property
    def pointer_to_data(self) -> dict[int, AllocationData]:
        return {
            a.ptr: AllocationData(ptr=a.ptr, size=a.size, device=a.device, tag=a.tag, state=a.state)
            for a in self._core.allocations()
        }

    def get_current_usage(self) -> int:
        """Bytes of every allocation in the pools, awake or asleep."""
        return sum(a.size for a in self._core.allocations())

    def stats(self) -> AllocatorStats:
        def op(s: Optional[_core.OpStats]) -> Optional[OpStats]:
            return None if s is None else OpStats(**_fields(s, OpStats))

        return AllocatorStats(
            tags={tag: TagStats(**_fields(s, TagStats)) for tag, s in self._core.tag_stats().items()},
            last_sleep=op(self._core.last_sleep),
            last_wake=op(self._core.last_wake),
            host_bytes=self._core.host_bytes(),
            quarantined_bytes=self._core.quarantined_bytes(),
            primes=PrimeStats(**_fields(self._core.prime_stats, PrimeStats)),
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

    def _tags(self, tags: Tags, what: str, default: Sequence[str] = (),
              known: Optional[set[str]] = None) -> tuple[str, ...]:
        if tags is None:
            return tuple(default)
        if isinstance(tags, str):
            tags = (tags,)
        if not isinstance(tags, (list, tuple, set, frozenset)):
            raise TypeError(f"{what} must be a str or a sequence of str, got {type(tags).__name__}")
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"{what} must hold str tags, got {tag!r} ({type(tag).__name__})")
        known = (self._known_tags() if known is None else known) | set(VLLM_TAGS)
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
