"""Tensors in host-backend memory: how the demo and the CPU tests put a model into the pools.

On CUDA, PyTorch's MemPool routes allocations to the core. The host backend has no such hook, so here
a tensor is made over memory that the core allocates (with the thread's pool tag), and freed when the
last view of it dies.
"""

from __future__ import annotations

import ctypes
import functools
import math
import weakref

import torch
from torch import nn

from vllm_sleep_ext import _core


@functools.lru_cache(maxsize=None)
def _block_type(nbytes: int) -> type:
    # A subclass, because plain ctypes arrays take no weak references (needed to free on last use).
    return type("HostBlock", (ctypes.c_uint8 * nbytes,), {})


def empty(core: _core.Allocator, shape: tuple[int, ...], dtype: torch.dtype, tag: str) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    ptr = core.malloc(max(nbytes, 1), 0, tag)
    block = _block_type(max(nbytes, 1)).from_address(ptr)
    weakref.finalize(block, core.free, ptr)
    flat = torch.frombuffer(block, dtype=torch.uint8)[:nbytes]
    return flat.view(dtype).view(shape)


def place_module(core: _core.Allocator, module: nn.Module, tag: str) -> nn.Module:
    """Moves every parameter and buffer of ``module`` into host-backend memory of ``tag``, in place."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                param.data = _copy_in(core, param.data, tag)
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = _copy_in(core, buf, tag)
    return module


def _copy_in(core: _core.Allocator, tensor: torch.Tensor, tag: str) -> torch.Tensor:
    out = empty(core, tuple(tensor.shape), tensor.dtype, tag)
    out.copy_(tensor)
    return out
