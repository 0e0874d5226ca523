"""The engine state a sleep must keep, compared byte for byte inside a vLLM worker (collective_rpc).

``capture_state(worker)`` walks every object reachable from the worker's model runner (attributes,
containers, modules' parameters and buffers, LoRA layers' stacked slots, the drafter and its model),
copies each CUDA tensor's bytes to host and keeps them on the worker; ``compare_state(worker)`` walks
again after a sleep and wake (and the trainer's reload) and reports, per category, how many tensors
and bytes differ. Tokens are a second signal only: a tiny random model's greedy outputs can change
between two identical calls, its state cannot.

Two ways to keep what was captured: ``bytes`` (default) copies each tensor to host and counts the
differing bytes; ``digest`` keeps a 64-bit digest per tensor computed on the GPU (an 8B model's 16 GB
would take seconds and 16 GB of host memory per capture as bytes): it tells which tensors changed, not
by how many bytes. Every word is weighted by an odd factor, so any single changed word changes the digest.

Categories (what owns the tensor), and the pool the tensor lives in (the allocator's tag of the
allocation holding it, stock or ours):
- params / draft_params: parameters of the target model / of the draft model (level 2: what the
  trainer sends, or vLLM's sleep_preserve_parameter_names keeps);
- buffers / draft_buffers: registered buffers (vLLM's worker copies these itself at level 2);
- lora: LoRA layers' stacked adapter slots (lora_a_stacked, lora_b_stacked, ...);
- other: every other tensor, named by its pool ("weights", "runtime", "cudagraph", "none" = not in a
  sleep-mode pool). The KV cache ("kv_cache") and scratch ("workspace") are not state: never compared.
"""

from __future__ import annotations

import types
from collections import deque
from typing import Any, Optional

# Tensors in these pools are rebuilt or rewritten by the engine after a wake: not state.
NOT_STATE_TAGS = ("kv_cache", "workspace")
DEVICE_TYPE = "cuda"  # tensors on this device are state (the CPU test of this module sets "cpu")
MAX_OBJECTS = 400_000
MAX_TENSOR_BYTES = 2 << 30  # larger tensors are counted, not copied (none in the tiny models here)
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), type, types.ModuleType,
          types.FunctionType, types.BuiltinFunctionType, types.MethodType, range, memoryview)


def _pool_spans() -> list[tuple[int, int, str]]:
    """(start, end, tag) of every sleep-mode allocation of this process, stock or ours, sorted."""
    from vllm.device_allocator.cumem import CuMemAllocator

    spans = []
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if hasattr(data, "ptr"):  # ours
            ptr, size = data.ptr, data.size
        else:  # stock: handle = (device, size, ptr, handle)
            ptr, size = data.handle[2], data.handle[1]
        spans.append((int(ptr), int(ptr) + int(size), data.tag))
    return sorted(spans)


def _tag_of(ptr: int, spans: list[tuple[int, int, str]]) -> str:
    import bisect

    i = bisect.bisect_right(spans, (ptr, float("inf"), "")) - 1
    if i >= 0 and spans[i][0] <= ptr < spans[i][1]:
        return spans[i][2]
    return "none"


def _children(obj: Any):
    """(name, child) pairs of an object: container items and attributes; nothing for atoms."""
    import torch

    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            yield (f"[{k!r}]" if not isinstance(k, str) else f"[{k}]"), v
    elif isinstance(obj, (list, tuple, deque)):
        for i, v in enumerate(list(obj)):
            yield f"[{i}]", v
    elif isinstance(obj, (set, frozenset)):
        for i, v in enumerate(list(obj)):
            yield f"{{{i}}}", v
    else:
        if isinstance(obj, (torch.dtype, torch.device, torch.Size, torch.Stream, torch.Event)):
            return
        try:
            attrs = vars(obj)
        except TypeError:
            attrs = {}
        for k, v in list(attrs.items()):
            yield f".{k}", v
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in attrs and slot != "__weakref__":
                    try:
                        yield f".{slot}", getattr(obj, slot)
                    except AttributeError:
                        continue


def reachable_tensors(roots: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Every tensor on DEVICE_TYPE reachable from ``roots``, by its shortest path; and the objects visited."""
    import torch

    seen: set[int] = set()
    found: dict[str, Any] = {}
    queue = deque(roots.items())
    while queue and len(seen) < MAX_OBJECTS:
        path, obj = queue.popleft()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == DEVICE_TYPE and obj.layout == torch.strided:
                found[path] = obj
            continue
        try:
            for name, child in _children(obj):
                if not isinstance(child, _ATOMS) and id(child) not in seen:
                    queue.append((path + name, child))
        except Exception:  # noqa: BLE001 - an object whose attributes cannot be listed
            continue
    return found, len(seen)


def _category(path: str, tensor: Any, ids: dict[int, str], tag: str) -> Optional[str]:
    if tag in NOT_STATE_TAGS:
        return None
    if id(tensor) in ids:
        return ids[id(tensor)]
    if "lora_" in path and "_stacked" in path:
        return "lora"
    return f"other:{tag}"


def _owner_ids(worker) -> dict[int, str]:
    """id(tensor) -> category for the target's and the draft's parameters and buffers."""
    ids: dict[int, str] = {}
    runner = worker.model_runner
    draft = None
    get_draft = getattr(runner, "get_draft_model", None) or getattr(worker, "get_draft_model", None)
    if callable(get_draft):
        try:
            draft = get_draft()
        except Exception:  # noqa: BLE001 - no drafter
            draft = None
    for prefix, module in (("draft_", draft), ("", worker.get_model())):
        if module is None:
            continue
        for _, p in module.named_parameters(remove_duplicate=False):
            ids[id(p)] = f"{prefix}params"
        for _, b in module.named_buffers(remove_duplicate=False):
            ids[id(b)] = f"{prefix}buffers"
    return ids


def _walk(worker, no_size_limit: bool = False) -> tuple[dict[tuple, tuple[str, str, Any]], dict]:
    """The state tensors, keyed by view (address, shape, strides, dtype: a sleep keeps addresses), as
    (path, category, tensor); and what was left out."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    if DEVICE_TYPE == "cuda":
        torch.cuda.synchronize()
    roots = {"runner": worker.model_runner, "model": worker.get_model()}
    tensors, visited = reachable_tensors(roots)
    spans = _pool_spans()
    ids = _owner_ids(worker)
    state: dict[tuple, tuple[str, str, Any]] = {}
    skipped = {"not_state_tensors": 0, "not_state_bytes": 0, "too_large": [], "no_storage": 0}
    for path, t in tensors.items():
        # A FakeTensor or FunctionalTensor that torch.compile left reachable has no memory of its own
        # (torch 2.14's data_ptr() raises on it, earlier ones warn).
        try:
            fake = is_fake(t)
            key = None if fake else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        except RuntimeError:
            key = None
        if key is None:
            skipped["no_storage"] += 1
            continue
        if key in state:  # the same view reached by two paths: compared once
            continue
        tag = _tag_of(t.untyped_storage().data_ptr(), spans)
        category = _category(path, t, ids, tag)
        if category is None:
            skipped["not_state_tensors"] += 1
            skipped["not_state_bytes"] += t.nbytes
            continue
        if t.nbytes > MAX_TENSOR_BYTES and not no_size_limit:
            skipped["too_large"].append((path, t.nbytes))
            continue
        state[key] = (path, category, t)
    skipped["objects_visited"] = visited
    return state, skipped


DIGEST_CHUNK = 16 << 20  # bytes hashed per step: bounds the digest's scratch memory (about 6 x this)


def _digest(t) -> int:
    """A 64-bit digest of a tensor's bytes, computed where the tensor lives: sum over its 32-bit words of
    word * (an odd factor from the word's index), modulo 2**64. A change of one word by d (|d| < 2**32)
    changes the sum by d * odd, never 0 mod 2**64."""
    import torch

    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.data_ptr() % 4:  # a view at an odd offset: 32-bit words need an aligned copy
        flat = flat.clone()
    total = 0
    for start in range(0, flat.numel(), DIGEST_CHUNK):
        part = flat[start:start + DIGEST_CHUNK]
        if part.numel() % 4:
            part = torch.cat([part, part.new_zeros(4 - part.numel() % 4)])
        words = part.view(torch.int32).to(torch.int64)
        index = torch.arange(start // 4, start // 4 + words.numel(), dtype=torch.int64, device=words.device)
        factor = (index * 0x5851F42D4C957F2D + 0x14057B7EF767814F) | 1  # wraps mod 2**64, odd
        total = (total + int((words * factor).sum())) % (1 << 64)
    return total * 1_000_003 + flat.numel()  # the length too: zero bytes appended change it


def _host_bytes(t) -> Any:
    import torch

    flat = t.detach().to("cpu", copy=True).contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def capture_state(worker, mode: str = "bytes") -> dict:
    """Keeps every state tensor's bytes on host (``bytes``) or its digest (``digest``) on the worker;
    returns counts per category."""
    if mode not in ("bytes", "digest"):
        raise ValueError(f"capture_state mode {mode!r}: must be 'bytes' or 'digest'")
    state, skipped = _walk(worker, no_size_limit=(mode == "digest"))
    worker._vse_state = {}
    worker._vse_state_mode = mode
    skipped["uncopyable"] = []
    for key, (path, cat, t) in state.items():
        try:
            kept = _host_bytes(t) if mode == "bytes" else _digest(t)
            worker._vse_state[key] = (path, cat, kept, t.nbytes)
        except Exception as e:  # noqa: BLE001 - e.g. a quantized dtype with no byte view: named, not compared
            skipped["uncopyable"].append(f"{path}: {type(e).__name__}")
    summary: dict[str, dict] = {}
    for _, cat, _, nbytes in worker._vse_state.values():
        s = summary.setdefault(cat, {"tensors": 0, "bytes": 0})
        s["tensors"] += 1
        s["bytes"] += int(nbytes)
    return {"categories": summary, "skipped": skipped, "mode": mode}


def compare_state(worker) -> dict:
    """Per category: tensors and bytes compared, and those that differ from capture_state's copy.
    ``identical`` is true when every captured tensor is still reachable (same address, shape, dtype)
    and equal byte for byte, or was replaced: its path now reaches another tensor the engine made
    (``replaced``, not judged); ``missing`` are those whose path reaches nothing any more."""
    import torch

    before = getattr(worker, "_vse_state", None)
    if before is None:
        raise RuntimeError("compare_state before capture_state")
    digest = worker._vse_state_mode == "digest"
    now, _ = _walk(worker, no_size_limit=digest)
    paths_now = {path for path, _, _ in now.values()}
    report: dict[str, dict] = {}
    missing, replaced = [], []
    for key, (path, cat, old, nbytes) in before.items():
        r = report.setdefault(cat, {"tensors": 0, "bytes": 0, "differing_tensors": 0, "differing_bytes": 0,
                                    "examples": []})
        r["tensors"] += 1
        r["bytes"] += int(nbytes)
        if key not in now:
            # The engine put a new tensor at the same path (vLLM 0.26's V2 runner rebuilds its block-table
            # layout tensors after a kv_cache wake): its bytes are the engine's new ones, not a restore.
            (replaced if path in paths_now else missing).append(path)
            continue
        if digest:
            if _digest(now[key][2]) == old:
                continue
            n = int(nbytes)  # a digest says that the tensor changed, not how many of its bytes
        else:
            new = _host_bytes(now[key][2])
            if new.shape == old.shape and torch.equal(new, old):
                continue
            n = int((new != old).sum()) if new.shape == old.shape else int(old.numel())
        r["differing_tensors"] += 1
        r["differing_bytes"] += n
        if len(r["examples"]) < 4:
            r["examples"].append(f"{path} ({'changed, ' if digest else ''}{n} of {int(nbytes)} B)")
    identical = not missing and all(r["differing_tensors"] == 0 for r in report.values())
    return {"identical": identical, "mode": worker._vse_state_mode, "categories": report, "missing": missing[:8],
            "missing_count": len(missing), "replaced": replaced[:8], "replaced_count": len(replaced)}


def state_differs(report: dict, categories: tuple[str, ...] = ()) -> list[str]:
    """The categories of a compare_state report (of one worker) whose bytes differ (all, or those
    starting with one of ``categories``)."""
    return sorted(cat for cat, r in report["categories"].items()
                  if r["differing_tensors"] and (not categories or cat.startswith(categories)))
