"""Adapter for vLLM's own allocator (vllm.device_allocator.cumem): one pinned buffer per allocation,
made on the first sleep and kept afterwards ("vLLM's method")."""
from __future__ import annotations

from .ext import ExtImpl


class VllmImpl(ExtImpl):
    """vLLM's own vllm.device_allocator.cumem.CuMemAllocator (one pinned buffer per allocation)."""
    name = "vllm-cumem"
    has_stats = False

    def __init__(self) -> None:  # noqa: D107 - deliberately not calling ExtImpl.__init__
        from vllm.device_allocator.cumem import CuMemAllocator  # noqa: PLC0415
        if CuMemAllocator.__module__.startswith("vllm_sleep_ext"):
            raise RuntimeError("vllm.device_allocator.cumem.CuMemAllocator is patched to "
                               "vllm_sleep_ext in this process; not a peer measurement")
        self.alloc = CuMemAllocator.get_instance()

    def stats(self) -> dict:
        return {}
