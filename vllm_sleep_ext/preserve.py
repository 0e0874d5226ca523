"""Which bytes survive a discard: the preserve scope.

Note [Preserve scope]
At a level-2 sleep the "weights" pool is discarded because the trainer sends new parameters. Everything
else in that pool is lost unless the allocator keeps it: registered buffers (vLLM's worker now saves
those itself), and tensors kept as plain attributes or on objects that are not ``nn.Module``s, most of
them built in ``process_weights_after_loading`` (MoE expert constants, strides, scales). The scope:

- ``preserve_mode="live"`` (the default): every live byte of the allocations of ``preserve_tags``
  (default ``("weights",)``) except the bytes of parameters; plus registered buffers of every tag; plus
  ``preserve()``. "kv_cache", "runtime", "cudagraph" and "workspace" are never in ``preserve_tags``:
  what lives there is rebuilt or overwritten by the engine, and copying a KV cache at every sleep is
  exactly the cost that level 2 exists to avoid.
- ``"buffers"``: registered buffers plus ``preserve()``; ``"off"``: nothing (vLLM's stock allocator).
- ``preserve()`` wins wherever preservation is on: a tensor given to it is kept even if it is a
  parameter. It keeps the storage a tensor covers for as long as that storage lives, even when the
  tensor passed was a temporary (``t.view(-1)``, ``module.w.data``); see ``PreserveSet``.

Parameters are excluded by the bytes they themselves cover, not by their whole storage: a parameter may
be a view into a larger storage that holds other tensors (a packed buffer), and those bytes are no one
else's to reload. Excluding too little only costs a copy; excluding too much loses data, so a parameter
whose elements do not fill one contiguous span excludes nothing. A parameter that covers its whole
storage also takes the caching-allocator block around it (its rounding tail holds no tensor).

Resolving a tensor to byte ranges never raises: sparse (COO and compressed) tensors give their index and
value storages, wrapper subclasses (``__tensor_flatten__``: DTensor, torchao, Float8) their inner
tensors, meta and storage-less tensors nothing. CPU tensors give their ranges too (on the host backend
they are pool memory); the core keeps only bytes inside its allocations.

Importing this module installs two global module-registration hooks (``register_buffer`` and
``register_parameter``) that remember the registering modules through weak references. Buffers and
parameters are resolved again at every sleep, by name, so a buffer reassigned, moved with ``.to()`` or
recast with ``.half()`` after registration counts as it is now.
"""

from __future__ import annotations

import bisect
import enum
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

logger = logging.getLogger(__name__)

# (address, nbytes): a span of bytes the core copies to host or must not copy.
Range = tuple[int, int]

# Pools whose content the engine rebuilds or overwrites after a wake: never in the preserve scope.
NEVER_PRESERVED_TAGS = frozenset({"kv_cache", "runtime", "cudagraph", "workspace"})

_SPARSE_COMPRESSED = {
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
    torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
    torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
    torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
}


class PreserveMode(str, enum.Enum):
    """What a sleep keeps of allocations whose tag is not offloaded (see Note [Preserve scope])."""

    OFF = "off"  # nothing (vLLM's stock allocator)
    BUFFERS = "buffers"  # registered buffers of every module, plus preserve()
    LIVE = "live"  # + every live non-parameter byte of preserve_tags (the default)


def parse_preserve_tags(tags: str | Iterable[str]) -> tuple[str, ...]:
    """``"weights,default"`` or an iterable of tags; rejects the tags that are never preserved."""
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",")]
    out = tuple(dict.fromkeys(t for t in tags if t))
    for tag in out:
        if not isinstance(tag, str):
            raise TypeError(f"preserve_tags must hold str tags, got {tag!r}")
    never = sorted(NEVER_PRESERVED_TAGS.intersection(out))
    if never:
        raise ValueError(f"preserve_tags: {never} are never preserved (the engine rebuilds them after a wake)")
    return out


# -- tensors to byte ranges ------------------------------------------------------------------------

def _components(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The dense, strided tensors that hold ``tensor``'s bytes (itself, if it is one)."""
    layout = tensor.layout
    if layout == torch.sparse_coo:
        yield from (tensor._indices(), tensor._values())
    elif layout in _SPARSE_COMPRESSED:
        for name in _SPARSE_COMPRESSED[layout]:
            yield getattr(tensor, name)()
    elif hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # wrapper subclass: DTensor, torchao, Float8, ...
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from _components(inner)
    elif tensor.is_nested:
        yield tensor.values()
    elif layout == torch.strided:
        yield tensor


def _dense(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``_components`` that never raises: an unreadable tensor has no bytes for us."""
    try:
        parts = list(_components(tensor))
    except Exception as e:  # noqa: BLE001 - an odd tensor anywhere in the process must not fail a sleep
        logger.debug("preserve: skipping a %s tensor (%s: %s)", type(tensor).__name__, type(e).__name__, e)
        return
    for part in parts:
        if part.device.type != "meta":
            yield part


def storage_ranges(tensor: torch.Tensor) -> list[Range]:
    """The whole storages behind ``tensor`` (a view keeps its whole storage); [] if it has none."""
    ranges = []
    for part in _dense(tensor):
        try:
            storage = part.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except Exception:  # noqa: BLE001 - storage-less tensors (functional, fake) have no bytes
            continue
        if ptr and nbytes:
            ranges.append((ptr, nbytes))
    return ranges


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def parameter_spans(params: Iterable[torch.Tensor]) -> tuple[list[Range], set[int]]:
    """(own ranges, whole-storage starts) of these parameters, in one pass.

    Own ranges: the bytes each parameter's elements cover, only where they fill one span (see the
    note). Whole-storage starts: the addresses of the storages a parameter covers entirely. In
    PyTorch's CUDA caching allocator a block holds one storage and may be longer than it (rounded to
    512 bytes, and up to 1 MiB more where splitting the rest off was not worth it): a parameter that
    covers its whole storage owns its whole block, tail included, and nothing else lives there.

    A sleep resolves every parameter of the process (thousands in a large model), so plain dense
    tensors, nearly all of them, take a short path of a few attribute reads; the rest go through
    ``_dense`` like any other tensor.
    """
    own: list[Range] = []
    whole: set[int] = set()
    strided = torch.strided
    for param in params:
        if type(param) in _PLAIN_TENSOR_TYPES and param.layout is strided and not param.is_nested:
            parts: Iterable[torch.Tensor] = (param,)
        else:
            parts = _dense(param)
        for part in parts:
            try:
                ptr = part.data_ptr()
                if not ptr or not part.is_contiguous():
                    continue
                nbytes = part.nbytes
                if not nbytes:
                    continue
                own.append((ptr, nbytes))
                storage = part.untyped_storage()
                if storage.data_ptr() == ptr and storage.nbytes() == nbytes:
                    whole.add(ptr)
            except Exception:  # noqa: BLE001 - meta, fake and storage-less tensors have no bytes
                continue
    return own, whole


def ranges_of(tensors: Iterable[torch.Tensor]) -> list[Range]:
    return [r for t in tensors for r in storage_ranges(t)]


# -- byte-range algebra (sorted, disjoint lists of (start, end)) ------------------------------------

def merge(ranges: Iterable[Range]) -> list[tuple[int, int]]:
    """(address, nbytes) ranges to sorted, disjoint, non-adjacent (start, end) spans."""
    spans = sorted((a, a + n) for a, n in ranges if n > 0)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` minus ``holes``, both as ``merge`` returns them."""
    out = []
    i = 0
    for start, end in spans:
        while i < len(holes) and holes[i][1] <= start:
            i += 1
        j = i
        while j < len(holes) and holes[j][0] < end:
            hs, he = holes[j]
            if hs > start:
                out.append((start, hs))
            start = max(start, he)
            j += 1
        if start < end:
            out.append((start, end))
    return out


def intersect(spans: list[tuple[int, int]], windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` clipped to ``windows``, both as ``merge`` returns them."""
    out = []
    starts = [w[0] for w in windows]
    for start, end in spans:
        k = max(bisect.bisect_right(starts, start) - 1, 0)
        while k < len(windows) and windows[k][0] < end:
            lo, hi = max(start, windows[k][0]), min(end, windows[k][1])
            if lo < hi:
                out.append((lo, hi))
            k += 1
    return out


def as_ranges(spans: list[tuple[int, int]]) -> list[Range]:
    return [(start, end - start) for start, end in spans]


# -- what to preserve ------------------------------------------------------------------------------

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
            yield from (b for b in list(module._buffers.values()) if isinstance(b, torch.Tensor))

    def parameters(self) -> Iterator[torch.Tensor]:
        for module in list(self.parameter_owners.values()):
            yield from (p for p in list(module._parameters.values()) if isinstance(p, torch.Tensor))


registry = _ModuleRegistry()


class PreserveSet:
    """What preserve() was given: tensors, their storages and modules, all held weakly.

    A tensor is often a temporary (``t.view(-1)``, ``module.w.data``) that dies at once while its
    storage lives on, so each tensor leaves a weak reference to every storage it covers (sparse and
    wrapper tensors: their inner storages, as ``_dense`` finds them), kept until that storage dies; at
    each sleep a live storage gives its whole current span, as ``storage_ranges`` does for a view. The
    tensor itself is held too, while it lives, and resolved again at each sleep, so a ``.data``
    reassigned since counts as it is now; a module stands for its buffers as they are at each sleep.

    add() may run on any thread while a sleep reads ranges(): both take the lock to copy or change
    the collections, and the slow resolution runs on a copy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By id: a module may define __eq__; a dead object leaves by itself.
        self._objects: weakref.WeakValueDictionary[int, torch.Tensor | nn.Module] = weakref.WeakValueDictionary()
        # An ordered set; equal refs name the same StorageImpl, which cannot be reused while referenced.
        self._storages: dict[StorageWeakRef, None] = {}
        self._storages_after_prune = 0

    def add(self, *objs: torch.Tensor | nn.Module) -> None:
        for obj in objs:
            if not isinstance(obj, (torch.Tensor, nn.Module)):
                raise TypeError(f"preserve() takes tensors or modules, got {type(obj).__name__}")
        storages = [ref for obj in objs if isinstance(obj, torch.Tensor) for ref in _storage_refs(obj)]
        with self._lock:
            for obj in objs:
                self._objects[id(obj)] = obj
            for ref in storages:
                self._storages.setdefault(ref, None)
            if len(self._storages) > 2 * self._storages_after_prune:  # amortized: dead storages leave
                self._storages = {ref: None for ref in self._storages if not ref.expired()}
                self._storages_after_prune = len(self._storages)

    def ranges(self) -> list[Range]:
        """The whole current storages behind everything preserved (overlapping; ``merge`` them)."""
        with self._lock:
            objs = list(self._objects.values())
            refs = list(self._storages)  # held here, so no ref is freed while it is read
        out: list[Range] = []
        dead = []
        for ref in refs:
            storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)  # None once the storage died
            if storage is None:
                dead.append(ref)
                continue
            try:
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
            except Exception:  # noqa: BLE001 - as in storage_ranges: a storage without bytes fails no sleep
                continue
            if ptr and nbytes:
                out.append((ptr, nbytes))
        if dead:
            with self._lock:
                for ref in dead:
                    self._storages.pop(ref, None)
        for obj in objs:
            out.extend(ranges_of(obj.buffers() if isinstance(obj, nn.Module) else (obj,)))
        return out

    def __len__(self) -> int:
        """Entries still held: live objects and storages not yet found dead by a ranges()."""
        with self._lock:
            return len(self._objects) + len(self._storages)


def _storage_refs(tensor: torch.Tensor) -> list[StorageWeakRef]:
    refs = []
    for part in _dense(tensor):
        try:
            refs.append(StorageWeakRef(part.untyped_storage()))
        except Exception:  # noqa: BLE001 - storage-less tensors (functional, fake) have no bytes
            continue
    return refs
