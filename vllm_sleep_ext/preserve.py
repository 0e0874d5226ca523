"""Which bytes survive a discard: tracked module buffers, tensors preserved by hand, or every live tensor.

Importing this module installs two global module-registration hooks (``register_buffer`` and
``register_parameter``) that remember the registering modules through weak references. Buffers are
resolved again at every sleep, by name, so a buffer reassigned, moved with ``.to()`` or recast with
``.half()`` after registration counts as it is now.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

# (address, nbytes) of a tensor's whole storage: what the core copies to host.
Range = tuple[int, int]


class PreserveMode(str, enum.Enum):
    """What a sleep keeps of allocations whose tag is not offloaded."""

    OFF = "off"  # nothing (vLLM's stock behaviour: buffers are lost at level 2)
    BUFFERS = "buffers"  # registered buffers of every module, plus preserve() (the default)
    LIVE = "live"  # every live tensor in the pools except parameters, plus preserve()


def storage_range(tensor: torch.Tensor) -> Range | None:
    """The bytes of the storage behind ``tensor`` (a view keeps its whole storage)."""
    if tensor.is_sparse or tensor.device.type == "meta":
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


class _ModuleRegistry:
    """Modules that registered a buffer or a parameter, held weakly (keyed by id: a module may define __eq__)."""

    def __init__(self) -> None:
        self.buffer_owners: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
        self.parameter_owners: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
        register_module_buffer_registration_hook(self._on_buffer)
        register_module_parameter_registration_hook(self._on_parameter)

    def _on_buffer(self, module: nn.Module, name: str, buffer: torch.Tensor | None) -> None:
        self.buffer_owners[id(module)] = module

    def _on_parameter(self, module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        self.parameter_owners[id(module)] = module

    def buffers(self) -> Iterator[torch.Tensor]:
        for module in list(self.buffer_owners.values()):
            yield from (b for b in module._buffers.values() if b is not None)

    def parameters(self) -> Iterator[torch.Tensor]:
        for module in list(self.parameter_owners.values()):
            yield from (p for p in module._parameters.values() if p is not None)


registry = _ModuleRegistry()


class PreserveSet:
    """Tensors and modules preserved by hand, held weakly; a module stands for all of its buffers."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []

    def add(self, *objs: torch.Tensor | nn.Module) -> None:
        for obj in objs:
            if not isinstance(obj, (torch.Tensor, nn.Module)):
                raise TypeError(f"preserve() takes tensors or modules, got {type(obj).__name__}")
            self._refs.append(weakref.ref(obj))

    def tensors(self) -> Iterator[torch.Tensor]:
        alive = []
        for ref in self._refs:
            obj = ref()
            if obj is None:
                continue
            alive.append(ref)
            yield from (obj.buffers() if isinstance(obj, nn.Module) else (obj,))
        self._refs = alive


def ranges_of(tensors: Iterable[torch.Tensor]) -> list[Range]:
    return [r for r in map(storage_range, tensors) if r is not None]
