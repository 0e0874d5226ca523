"""The pinned-copy limit: host <-> device copies between pinned host memory and device memory, the
speed every sleep and wake is compared with (measured in the same run, at each size)."""
from __future__ import annotations

import time
from typing import Any, Callable

from ..common import GiB, clamp_bytes, device_env, gbps, median, round_up, say, torch


def event_seconds(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def worker_limit(p: dict) -> dict:
    """Pinned host <-> device copy GB/s at each size (median of reps, CUDA events)."""
    headroom = int(p["headroom_gib"] * GiB)
    want = {float(g): round_up(int(g * GiB), 512) for g in p["sizes_gib"]}
    maxb = clamp_bytes(max(want.values()), headroom, "pinned-copy limit", host_too=True)
    t0 = time.perf_counter()
    host = torch.empty(maxb, dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - t0
    dev = torch.empty(maxb, dtype=torch.uint8, device="cuda")
    dev.fill_(7)
    say(f"  pinned alloc {maxb / GiB:.2f} GiB: {pin_s:.2f} s ({gbps(maxb, pin_s) or 0:.2f} GB/s)")
    out: dict = {"env": device_env(), "pin_alloc_s": pin_s, "pin_alloc_bytes": maxb, "sizes": {}}
    for gib, n in sorted(want.items()):
        n = min(n, maxb)
        h, d = host[:n], dev[:n]
        d2h = _copy_rates(lambda: h.copy_(d, non_blocking=True), n, p["reps"])
        h2d = _copy_rates(lambda: d.copy_(h, non_blocking=True), n, p["reps"])
        out["sizes"][str(gib)] = {"bytes": n, "d2h_gbps": median(d2h), "h2d_gbps": median(h2d),
                                  "d2h_all": d2h, "h2d_all": h2d}
        say(f"  limit {gib:g} GiB: D2H {median(d2h):.1f} GB/s, H2D {median(h2d):.1f} GB/s")
    return out


def _copy_rates(fn: Callable[[], Any], nbytes: int, reps: int) -> list[float]:
    event_seconds(fn)  # warm-up
    return [nbytes / event_seconds(fn) / 1e9 for _ in range(reps)]
