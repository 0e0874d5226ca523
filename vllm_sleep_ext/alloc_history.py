"""Who allocated a block of a sleep-mode pool: the Python stack at malloc time, for the ranges a level-2
sleep keeps that no Python object holds (issue 17 item 3: in vLLM the live scope keeps ~552 MiB of the
weights pool with no tensor in sight).

Opt-in (VLLM_SLEEP_EXT_RECORD_ALLOCATIONS=1): the allocator starts PyTorch's allocation recorder when it
is created, before vLLM loads the model, with the cheapest settings that still name an owner: the state
only (no trace of every event), the stack of the allocation (not of the free), Python frames only (no
C++ unwinding). Every block of every pool, ours included (our pools are torch MemPools), then carries
the frames that allocated it, and ``owners()`` reads them for the ranges asked about. Off by default:
recording costs a stack walk per allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Optional

logger = logging.getLogger(__name__)

# Frames of these files say how memory is allocated, not who wanted it.
_PLUMBING = ("torch/", "vllm_sleep_ext/", "contextlib.py", "functools.py", "threading.py", "<frozen")
_started = False


def start() -> bool:
    """Starts recording allocation stacks in this process (idempotent); False where torch cannot."""
    global _started
    if _started:
        return True
    import torch

    try:
        torch.cuda.memory._record_memory_history(enabled="state", context="alloc", stacks="python")
    except Exception as e:  # noqa: BLE001 - a torch without the recorder, or no CUDA: say so, go on without
        logger.warning("vllm_sleep_ext: allocation stacks not recorded (%s: %s)", type(e).__name__, e)
        return False
    _started = True
    logger.info("vllm_sleep_ext: recording the Python stack of every CUDA allocation (%s=1)",
                "VLLM_SLEEP_EXT_RECORD_ALLOCATIONS")
    return True


def recording() -> bool:
    return _started


def owner_frames(frames: Iterable[dict], depth: int = 4) -> list[str]:
    """The innermost `depth` frames outside the allocation plumbing, as "file:line function"."""
    out = []
    for frame in frames:
        filename = str(frame.get("filename", "?"))
        if any(p in filename for p in _PLUMBING):
            continue
        out.append(f"{_short(filename)}:{frame.get('line', '?')} {frame.get('name', '?')}")
        if len(out) == depth:
            break
    return out


def _short(filename: str) -> str:
    """From the package on: ".../site-packages/vllm/v1/x.py" -> "vllm/v1/x.py"."""
    for marker in ("site-packages/", "dist-packages/", "vsite033/", "vsite/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def owners(ranges: Iterable[tuple[int, int]], snapshot: Optional[list[dict]] = None,
           depth: int = 4) -> list[dict[str, Any]]:
    """For each (start, nbytes) range: the active blocks that overlap it, each with its size and the frames
    that allocated it (empty when nothing was recording then)."""
    if snapshot is None:
        import torch

        snapshot = torch.cuda.memory_snapshot()
    blocks = []
    for segment in snapshot:
        address = segment["address"]
        for block in segment["blocks"]:
            start = block.get("address", address)
            address = start + block["size"]
            if block.get("state") != "inactive":
                blocks.append((start, block))
    blocks.sort(key=lambda b: b[0])
    found = []
    for start, nbytes in ranges:
        end = start + nbytes
        hits = []
        for b_start, block in blocks:
            if b_start < end and start < b_start + block["size"]:
                hits.append({"address": b_start, "size": block["size"],
                             "requested": block.get("requested_size", block["size"]),
                             "frames": owner_frames(block.get("frames", []), depth)})
        found.append({"start": start, "bytes": nbytes, "blocks": hits})
    return found
