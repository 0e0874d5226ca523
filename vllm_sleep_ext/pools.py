"""Which of our pools a thread allocates from, and how a pool that nobody enters again is retired.

See Note [Pools, routing and free segments] below; ``CuMemAllocator.use_memory_pool`` and
``cudagraph_pool`` are the only users.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

# Note [Pools, routing and free segments]
# A pool is a torch.cuda.MemPool over our pluggable allocator; PyTorch calls my_malloc when the pool
# needs a segment and my_free when it gives one back, and the core tags each segment with the calling
# thread's tag (set by use_memory_pool).
#
# Routing. PyTorch sends a thread's allocations to the first entry of its list of active pools whose
# filter matches (get_pool walks captures_underway front to back in the torch we read; later ones walk
# it back to front). One thread inside two pools matches both, so the pool that receives, and hence
# the tag, would depend on the release: a KV cache allocated inside vLLM 0.33's "runtime" pool could
# land in runtime segments and be copied to host at every level-2 sleep. So a thread is routed to
# exactly one of our pools at a time: entering a pool (or the CUDA graph pool) takes the enclosing one
# out of PyTorch's list (endAllocateToPool) and leaving puts it back (beginAllocateCurrentThreadToPool,
# whose use count is returned with releasePool). The segment's pool and the thread's tag always agree.
#
# Free segments. PyTorch caches a pool's freed blocks for that pool and hands whole free segments back
# (calling my_free) only for pools whose use count is zero, "freeable" (release_cached_blocks). The
# MemPool object and each use_mem_pool around it hold one count. So when a pool's context exits we
# give back the MemPool's count too (releasePool): the pool is freeable, its segments stay in
# PyTorch's table while tensors use them, and torch.cuda.empty_cache() (on leaving a pool, before a
# sleep and before a wake: trim()) hands back every segment emptied since. That is PyTorch releasing
# its own cache under the caching allocator's mutex, the one every malloc and free of every thread
# takes, so other threads allocating at the same time are serialized with it. The MemPool object
# itself is never destroyed (one reference leaked): ~MemPool would release a count it no longer holds,
# and its emptyCache(id) syncs events under TORCH_INTERNAL_ASSERT(captures_underway.empty()), which
# aborts the process (an exception in a destructor) whenever any thread is inside a pool or a graph
# capture, e.g. the enclosing pool of a nested one. empty_cache() for all pools skips that sync while
# captures are underway in torch >= 2.8; an older torch raises there instead, and trim() then leaves
# the segments for the next call. (The previous way read torch.cuda.memory_snapshot() and freed what
# it said was empty; that crashed in torch 2.11 with threads allocating, so it was off whenever a
# second thread existed.) Blocks come back through my_free, which releases the core row in any state.

_threads = threading.local()


@dataclasses.dataclass
class Route:
    """One of this thread's pools: `pool` None is the CUDA graph pool, routed by graph capture itself."""

    pool: Optional[torch.cuda.MemPool]
    device: int


def thread_routes() -> list[Route]:
    routes = getattr(_threads, "routes", None)
    if routes is None:
        routes = _threads.routes = []
    return routes


@contextmanager
def sole_route(route: Route) -> Iterator[None]:
    """Makes `route` the only pool of ours this thread allocates from (Note [Pools, routing ...])."""
    routes = thread_routes()
    outer = routes[-1] if routes and routes[-1].pool is not None else None
    if outer is not None:
        torch._C._cuda_endAllocateToPool(outer.device, outer.pool.id)
    routes.append(route)
    try:
        yield
    finally:
        routes.pop()
        if outer is not None:
            # torch 2.6 named it _cuda_beginAllocateToPool (also this thread's allocations only).
            begin = getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None)
            begin = begin or torch._C._cuda_beginAllocateToPool
            begin(outer.device, outer.pool.id)
            torch._C._cuda_releasePool(outer.device, outer.pool.id)  # begin took a count; use_mem_pool holds its own


def retire(pool: torch.cuda.MemPool, device: int) -> None:
    """Gives back the MemPool object's use count, so PyTorch may free the pool's empty segments, and
    keeps the object alive for good (Note [Pools, routing and free segments])."""
    torch._C._cuda_releasePool(device, pool.id)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(pool))
