"""Adapter for this project: vllm_sleep_ext.CuMemAllocator, level 1 = sleep(offload_tags=("weights",))."""
from __future__ import annotations

from typing import Any, ContextManager, Optional

from ..common import to_plain


def get_ext_allocator() -> Any:
    from vllm_sleep_ext import CuMemAllocator  # noqa: PLC0415 - optional until run on a GPU
    return CuMemAllocator.get_instance()


def ext_stats(alloc: Any) -> dict:
    try:
        return to_plain(alloc.stats())
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def ext_backed_up_bytes(stats: dict) -> Optional[int]:
    """Bytes the last sleep copied to host (OpStats.bytes_copied, else the tags' backed_up_bytes)."""
    op = stats.get("last_sleep") or {}
    if isinstance(op, dict) and op.get("bytes_copied"):
        return int(op["bytes_copied"])
    tags = stats.get("tags") or {}
    total = sum(int((t or {}).get("backed_up_bytes") or 0) for t in tags.values()
                if isinstance(t, dict))
    return total or None


class ExtImpl:
    """vllm_sleep_ext.CuMemAllocator."""
    name = "vllm_sleep_ext"
    has_stats = True

    def __init__(self, prepare_host: bool = False) -> None:
        self.alloc = get_ext_allocator()
        # Off unless asked: "first sleep" means a cold one, as it always has here; the workers
        # measure the first sleep after a background prepare separately.
        if hasattr(self.alloc, "prepare_host"):
            self.alloc.prepare_host = prepare_host

    def region(self, tag: str) -> ContextManager:
        return self.alloc.use_memory_pool(tag=tag)

    def sleep(self) -> None:
        self.alloc.sleep(offload_tags=("weights",))

    def wake(self) -> None:
        self.alloc.wake_up(["weights"])

    def pool_bytes(self, fallback: int) -> int:
        return int(self.alloc.get_current_usage()) or fallback

    def stats(self) -> dict:
        return ext_stats(self.alloc)
