"""vllm_sleep_ext: a sleep-mode GPU allocator for vLLM that keeps model buffers across level-2 sleep.

The names below load on first use (PEP 562), so that ``vllm_sleep_ext.plugin``, which vLLM imports in
every process, imports even where the compiled core does not load, and can say so instead of failing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeviceOutOfMemoryError": "vllm_sleep_ext._core",
    "DriverUnavailableError": "vllm_sleep_ext._core",
    "HostOutOfMemoryError": "vllm_sleep_ext._core",
    "SleepExtError": "vllm_sleep_ext._core",
    "CompressUnavailableError": "vllm_sleep_ext.compress",
    "AllocationData": "vllm_sleep_ext.allocator",
    "AllocatorStats": "vllm_sleep_ext.allocator",
    "CuMemAllocator": "vllm_sleep_ext.allocator",
    "OpStats": "vllm_sleep_ext.allocator",
    "TagStats": "vllm_sleep_ext.allocator",
    "PreserveMode": "vllm_sleep_ext.preserve",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vllm_sleep_ext._core import (
        DeviceOutOfMemoryError,
        DriverUnavailableError,
        HostOutOfMemoryError,
        SleepExtError,
    )
    from vllm_sleep_ext.compress import CompressUnavailableError
    from vllm_sleep_ext.allocator import AllocationData, AllocatorStats, CuMemAllocator, OpStats, TagStats
    from vllm_sleep_ext.preserve import PreserveMode


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vllm_sleep_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
