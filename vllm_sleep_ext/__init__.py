"""vllm_sleep_ext: a sleep-mode GPU allocator for vLLM that keeps model buffers across level-2 sleep."""

from vllm_sleep_ext._core import (
    DeviceOutOfMemoryError,
    DriverUnavailableError,
    HostOutOfMemoryError,
    SleepExtError,
)
from vllm_sleep_ext.allocator import (
    AllocationData,
    AllocatorStats,
    CuMemAllocator,
    OpStats,
    TagStats,
)
from vllm_sleep_ext.preserve import PreserveMode

__all__ = [
    "AllocationData",
    "AllocatorStats",
    "CuMemAllocator",
    "DeviceOutOfMemoryError",
    "DriverUnavailableError",
    "HostOutOfMemoryError",
    "OpStats",
    "PreserveMode",
    "SleepExtError",
    "TagStats",
]
__version__ = "0.1.0"
