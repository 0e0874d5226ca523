#!/usr/bin/env python3
"""Sleep/wake benchmark for vllm_sleep_ext, measured side by side with the pinned-copy limit.

Every measurement runs in a fresh subprocess of this script (``--worker MODE``), because a "first"
sleep is the first of a process and because each peer (torch_memory_saver, vLLM's own allocator) needs
a process of its own. Workers print progress lines and one final JSON line; this process collects
them, prints a markdown table with the SPEC targets, and writes ``results.json`` (+ a PNG if
matplotlib imports) to ``--out``.

    python benchmarks/bench_sleep.py                  # full run, ~3-4 min on an H100
    python benchmarks/bench_sleep.py --quick          # small sizes, ~1 min
    python benchmarks/bench_sleep.py --sizes-gib 1 4 16 --kv-gib 48 --weights-gib 16 --out /tmp/b

Exit status: 0 done (1 with --strict when a target fails), 2 no CUDA / PyTorch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

try:
    import torch
except Exception as _exc:  # noqa: BLE001 - any import failure means "no torch" here
    torch = None  # type: ignore[assignment]
    TORCH_IMPORT_ERROR: Optional[str] = f"{type(_exc).__name__}: {_exc}"
else:
    TORCH_IMPORT_ERROR = None

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
RESULT_PREFIX = "@@BENCH_RESULT@@ "
SCRIPT = Path(__file__).resolve()

DEFAULT_SIZES_GIB = (0.25, 1.0, 4.0, 16.0)
QUICK_SIZES_GIB = (0.25, 1.0)

# SPEC targets (docs: /work/shared/SPEC.md, "Targets").
TARGET_WARM_X = 0.95
TARGET_FIRST_X = 0.5
TARGET_HOST_RATIO = 1.01
TARGET_L2_MS = 50.0
TARGET_RETURNED_PCT = 99.9
TARGET_LOAD_RATIO = 1.1


# --------------------------------------------------------------------------------------------------
# small utilities (shared with soak.py)
# --------------------------------------------------------------------------------------------------

def say(msg: str) -> None:
    """Progress line, flushed at once (workers' lines are relayed by the parent)."""
    print(msg, flush=True)


def cuda_problem() -> Optional[str]:
    """Why this machine can't run a GPU benchmark, or None if it can."""
    if torch is None:
        return f"PyTorch is not importable ({TORCH_IMPORT_ERROR}); install torch with CUDA support."
    if not torch.cuda.is_available():
        return (f"no CUDA device available: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "This benchmark needs an NVIDIA GPU and driver.")
    return None


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (a large number if it can't be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return 1 << 50


def to_plain(obj: Any, depth: int = 0) -> Any:
    """Dataclass / namedtuple / pybind object -> JSON-able dicts and lists."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 6:
        return repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):
        return {k: to_plain(v, depth + 1) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, depth + 1) for v in obj]
    out = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001
            continue
        if not callable(value):
            out[name] = to_plain(value, depth + 1)
    return out or repr(obj)


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def gbps(nbytes: Optional[int], seconds: Optional[float]) -> Optional[float]:
    if not nbytes or not seconds or seconds <= 0:
        return None
    return nbytes / seconds / 1e9


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of fn(), with the device idle before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def mem_free() -> int:
    return int(torch.cuda.mem_get_info()[0])


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# --------------------------------------------------------------------------------------------------
# model-like workload (shared with soak.py)
# --------------------------------------------------------------------------------------------------

def model_like_sizes(total_bytes: int, seed: int, large_frac: float = 0.9,
                     max_small: int = 3000) -> list[int]:
    """Tensor sizes in bytes: ~90% in 64-256 MiB tensors, the rest in up to ~3000 tensors of
    4 KiB-1 MiB (log-uniform), shuffled like the layers of a model. All multiples of 512 bytes."""
    rng = random.Random(seed)
    total_bytes = round_up(max(total_bytes, 512), 512)
    small_budget = int(total_bytes * (1.0 - large_frac))
    n_small = int(min(max_small, max(8, small_budget // (64 * KiB))))
    raw = [math.exp(rng.uniform(math.log(4 * KiB), math.log(MiB))) for _ in range(n_small)]
    scale = small_budget / sum(raw)
    small = [round_up(int(min(max(r * scale, 4 * KiB), MiB)), 512) for r in raw]
    while small and sum(small) > total_bytes // 2:
        small.pop()
    large = _large_sizes(total_bytes - sum(small), rng)
    sizes = small + large
    rng.shuffle(sizes)
    return sizes


def _large_sizes(remaining: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while remaining > 0:
        if remaining <= 256 * MiB:
            s = remaining
        else:
            s = rng.randrange(64, 257, 2) * MiB
            if remaining - s < 64 * MiB:
                s = remaining - 64 * MiB
        out.append(s)
        remaining -= s
    return out


def alloc_tensors(sizes: Sequence[int], device: str = "cuda") -> list["torch.Tensor"]:
    """bf16 tensors of the given byte sizes (allocated wherever the caller's pool context says)."""
    return [torch.empty(n // 2, dtype=torch.bfloat16, device=device) for n in sizes]


def fill_random(tensors: Sequence["torch.Tensor"], seed: int) -> None:
    gen = torch.Generator(device=tensors[0].device) if tensors else None
    if gen is not None:
        gen.manual_seed(seed)
    for t in tensors:
        t.view(torch.int32).random_(generator=gen)


def checksums(tensors: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """One exact int64 sum per tensor (bits viewed as int32)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([t.reshape(-1).view(torch.int32).sum(dtype=torch.int64) for t in tensors])


@dataclasses.dataclass
class Reference:
    """What a round trip must give back: per-tensor sums and full copies of a few tensors."""
    sums: "torch.Tensor"
    picks: list[int]
    copies: list["torch.Tensor"]

    @staticmethod
    def capture(tensors: Sequence["torch.Tensor"]) -> "Reference":
        picks = _pick_indices(tensors)
        return Reference(checksums(tensors), picks, [tensors[i].clone() for i in picks])

    def check(self, tensors: Sequence["torch.Tensor"]) -> Optional[str]:
        """None when intact, else what differs."""
        for i, copy in zip(self.picks, self.copies):
            if not torch.equal(tensors[i].view(torch.int16), copy.view(torch.int16)):
                return f"tensor #{i} ({tensors[i].nbytes} bytes) differs from its copy"
        sums = checksums(tensors)
        bad = (sums != self.sums).nonzero().flatten().tolist()
        if bad:
            return f"{len(bad)} of {len(tensors)} tensor checksums differ (first: #{bad[0]})"
        return None


def _pick_indices(tensors: Sequence["torch.Tensor"]) -> list[int]:
    if not tensors:
        return []
    by_size = sorted(range(len(tensors)), key=lambda i: tensors[i].nbytes)
    picks = {by_size[0], by_size[len(by_size) // 2], by_size[-1], 0, len(tensors) - 1}
    return sorted(picks)


def make_buffer_modules(n: int, device: str = "cuda") -> list["torch.nn.Module"]:
    """Modules with rotary-like registered buffers (inv_freq, cos/sin cache, position ids, scales).
    Call inside a pool so the buffers are allocated (and tracked) there."""
    mods = []
    for i in range(n):
        m = torch.nn.Module()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, device=device,
                                                     dtype=torch.float32) / 128.0))
        freqs = torch.outer(torch.arange(4096, device=device, dtype=torch.float32), inv_freq)
        m.register_buffer("inv_freq", inv_freq, persistent=False)
        m.register_buffer("cos_sin_cache",
                          torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.bfloat16),
                          persistent=False)
        m.register_buffer("position_ids", torch.arange(8192, device=device).unsqueeze(0))
        m.register_buffer("scale", torch.rand(4096, device=device) + float(i))
        mods.append(m)
    return mods


def module_buffers(mods: Sequence["torch.nn.Module"]) -> list["torch.Tensor"]:
    return [b for m in mods for b in m.buffers()]


def buffers_mismatch(mods: Sequence["torch.nn.Module"],
                     ref: Sequence["torch.Tensor"]) -> Optional[str]:
    for i, (b, r) in enumerate(zip(module_buffers(mods), ref)):
        if not torch.equal(b, r):
            return f"buffer #{i} (shape {tuple(b.shape)}, {b.dtype}) differs after wake"
    return None


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


# --------------------------------------------------------------------------------------------------
# worker side: sleep implementations
# --------------------------------------------------------------------------------------------------

class ExtImpl:
    """vllm_sleep_ext.CuMemAllocator."""
    name = "vllm_sleep_ext"
    has_stats = True

    def __init__(self) -> None:
        self.alloc = get_ext_allocator()

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


class TmsImpl:
    """torch_memory_saver with enable_cpu_backup=True (hook mode chosen by the parent)."""
    has_stats = False

    def __init__(self, hook_mode: str, retain: bool) -> None:
        from torch_memory_saver import torch_memory_saver as tms  # noqa: PLC0415
        self.tms = tms
        self.name = f"torch_memory_saver{'-retained' if retain else ''}"
        if hook_mode == "torch":
            tms.hook_mode = "torch"
        self.retain_supported = isinstance(getattr(type(tms), "retain_cpu_backup", None), property)
        if retain and self.retain_supported:
            tms.retain_cpu_backup = True
        if getattr(tms, "enabled", True) is False:
            raise RuntimeError("torch_memory_saver reports enabled=False (LD_PRELOAD not applied?)")
        self._reserved_before = 0

    def region(self, tag: str) -> ContextManager:
        self._reserved_before = torch.cuda.memory_reserved()
        return self.tms.region(tag=tag, enable_cpu_backup=True)

    def sleep(self) -> None:
        self.tms.pause("weights")

    def wake(self) -> None:
        self.tms.resume("weights")

    def pool_bytes(self, fallback: int) -> int:
        delta = torch.cuda.memory_reserved() - self._reserved_before
        return int(delta) if delta >= fallback else fallback

    def stats(self) -> dict:
        return {}


def make_impl(p: dict) -> Any:
    kind = p.get("impl", "ext")
    if kind == "ext":
        return ExtImpl()
    if kind == "vllm":
        return VllmImpl()
    if kind == "tms":
        return TmsImpl(p.get("tms_hook", "preload"), bool(p.get("tms_retain")))
    raise ValueError(f"unknown impl {kind!r}")


# --------------------------------------------------------------------------------------------------
# worker side: measurements
# --------------------------------------------------------------------------------------------------

class RoundTripBroken(RuntimeError):
    """Data did not survive sleep/wake; no speed is reported for such a run."""


def clamp_bytes(requested: int, headroom: int, label: str, host_too: bool = False) -> int:
    """Requested bytes, limited to free device memory (and available host memory) minus headroom."""
    cap = mem_free() - headroom
    if host_too:
        cap = min(cap, host_available_bytes() - 8 * GiB)
    cap = max(cap, 64 * MiB)
    if requested > cap:
        say(f"  [clamp] {label}: {requested / GiB:.2f} GiB requested, "
            f"{cap / GiB:.2f} GiB fits with {headroom / GiB:g} GiB headroom -> using that")
        return cap
    return requested


def device_env() -> dict:
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    env = {"gpu": props.name, "total_gib": total / GiB, "free_gib_at_start": free / GiB,
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "host_mem_available_gib": host_available_bytes() / GiB, "cpus": os.cpu_count()}
    try:
        q = "driver_version,pcie.link.gen.current,pcie.link.width.current"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = out.stdout.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"n/a ({type(exc).__name__})"
    return env


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


def _measure(impl: Any, op: Callable[[], None], kind: str, backed: int, pool: int) -> dict:
    torch.cuda.empty_cache()  # so "memory returned" counts only what the sleep itself released
    free_before = mem_free()
    secs = timed(op)
    free_after = mem_free()
    st = impl.stats() if impl.has_stats else {}
    nbytes = backed
    if kind == "sleep" and st:
        nbytes = ext_backed_up_bytes(st) or backed
    rec = {"seconds": secs, "bytes": nbytes, "gbps": gbps(nbytes, secs)}
    if kind == "sleep":
        rec["returned_pct"] = 100.0 * (free_after - free_before) / pool if pool else None
    if st:
        op_stats = st.get("last_sleep" if kind == "sleep" else "last_wake") or {}
        rec["internal_s"] = op_stats.get("seconds") if isinstance(op_stats, dict) else None
        rec["internal_gbps"] = gbps(nbytes, rec["internal_s"])
        rec["host_bytes"] = st.get("host_bytes")
        if kind == "sleep" and st.get("host_bytes") is not None and nbytes:
            rec["host_ratio"] = st["host_bytes"] / nbytes
        rec["stats"] = st
    return rec


def _cycle(impl: Any, tensors: list, ref: Reference, backed: int, pool: int) -> tuple[dict, dict]:
    s = _measure(impl, impl.sleep, "sleep", backed, pool)
    if not impl.has_stats and (s.get("returned_pct") or 0.0) < 50.0:
        raise RuntimeError(f"{impl.name}: sleep returned only {s.get('returned_pct') or 0:.1f}% "
                           "of the pool's device memory; it is not releasing memory here")
    w = _measure(impl, impl.wake, "wake", s["bytes"], pool)
    problem = ref.check(tensors)
    if problem:
        raise RoundTripBroken(f"{impl.name}: round trip broken after wake: {problem}")
    return s, w


def _fmt(rec: dict) -> str:
    g = rec.get("gbps")
    return f"{rec['seconds'] * 1e3:8.1f} ms {g:6.1f} GB/s" if g else f"{rec['seconds'] * 1e3:8.1f} ms"


def worker_level1(p: dict) -> dict:
    """Level-1 sleep/wake of a model-like 'weights' set: first sleep of the process, then warm."""
    impl = make_impl(p)
    headroom = int(p["headroom_gib"] * GiB)
    nbytes = clamp_bytes(int(p["size_gib"] * GiB), headroom, f"level-1 {p['size_gib']:g} GiB",
                         host_too=True)
    sizes = model_like_sizes(nbytes, p["seed"])
    with impl.region("weights"):
        tensors = alloc_tensors(sizes)
    fill_random(tensors, p["seed"])
    ref = Reference.capture(tensors)
    sync()
    pool = impl.pool_bytes(sum(sizes))
    res: dict = {"impl": impl.name, "size_gib": p["size_gib"], "tensor_bytes": sum(sizes),
                 "n_tensors": len(sizes), "pool_bytes": pool}
    say(f"  {impl.name} {p['size_gib']:g} GiB: {len(sizes)} tensors, pool {pool / GiB:.2f} GiB")
    backed = pool
    res["first_sleep"], res["first_wake"] = _cycle(impl, tensors, ref, backed, pool)
    backed = res["first_sleep"]["bytes"]
    say(f"    first sleep {_fmt(res['first_sleep'])} | wake {_fmt(res['first_wake'])}")
    res["warm_sleep"], res["warm_wake"] = _cycles(impl, tensors, ref, backed, pool, p["cycles"])
    if isinstance(impl, TmsImpl):
        res["tms_retain_supported"] = impl.retain_supported
    if p.get("keep_false_cycles") and isinstance(impl, ExtImpl) and impl.has_stats:
        res.update(_no_keep_cycles(impl, tensors, ref, backed, pool, p["keep_false_cycles"]))
    res["verified"] = True
    return res


def _cycles(impl: Any, tensors: list, ref: Reference, backed: int, pool: int,
            n: int, label: str = "warm") -> tuple[list, list]:
    sleeps, wakes = [], []
    for i in range(n):
        s, w = _cycle(impl, tensors, ref, backed, pool)
        sleeps.append(s)
        wakes.append(w)
        say(f"    {label} #{i + 1} sleep {_fmt(s)} | wake {_fmt(w)}"
            + (f" | host/backed {s['host_ratio']:.4f}" if s.get("host_ratio") else ""))
    return sleeps, wakes


def _no_keep_cycles(impl: ExtImpl, tensors: list, ref: Reference, backed: int, pool: int,
                    n: int) -> dict:
    """Same cycles with keep_host_backups=False (host memory found anew on every sleep)."""
    try:
        impl.alloc.keep_host_backups = False
    except Exception as exc:  # noqa: BLE001
        return {"nokeep_error": f"keep_host_backups not settable: {exc!r}"}
    try:
        impl.alloc.release_host_cache()
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        sleeps, wakes = _cycles(impl, tensors, ref, backed, pool, n, label="keep=False")
    finally:
        impl.alloc.keep_host_backups = True
    return {"nokeep_sleep": sleeps, "nokeep_wake": wakes}


def worker_level2(p: dict) -> dict:
    """Level 2: weights (+ registered buffers) and KV discarded; wake weights, then KV."""
    alloc = get_ext_allocator()
    headroom = int(p["headroom_gib"] * GiB)
    w_req, kv_req = int(p["weights_gib"] * GiB), int(p["kv_gib"] * GiB)
    w_bytes, kv_bytes = _clamp_level2(w_req, kv_req, headroom)
    with alloc.use_memory_pool(tag="weights"):
        weights = alloc_tensors(model_like_sizes(w_bytes, p["seed"]))
        mods = make_buffer_modules(p["n_modules"])
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = _alloc_kv(kv_bytes)
    fill_random(weights, p["seed"])
    for t in kv:
        t.fill_(1)
    buf_ref = [b.clone() for b in module_buffers(mods)]
    res: dict = {"weights_bytes": w_bytes, "kv_bytes": kv_bytes, "requested_weights_bytes": w_req,
                 "requested_kv_bytes": kv_req, "clamped": (w_bytes, kv_bytes) != (w_req, kv_req),
                 "buffer_bytes": sum(b.nbytes for b in buf_ref), "cycles": []}
    say(f"  level-2 workload: weights {w_bytes / GiB:.2f} GiB + kv {kv_bytes / GiB:.2f} GiB, "
        f"{len(buf_ref)} buffers ({res['buffer_bytes'] / MiB:.1f} MiB)")
    for i in range(p["cycles"]):
        rec = _level2_cycle(alloc)
        problem = buffers_mismatch(mods, buf_ref)
        rec["buffers_intact"] = problem is None
        res["cycles"].append(rec)
        say(f"    cycle #{i + 1}: sleep {rec['sleep_ms']:.2f} ms, wake weights "
            f"{rec['wake_weights_ms']:.2f} ms, wake kv {rec['wake_kv_ms']:.2f} ms, "
            f"sum {rec['total_ms']:.2f} ms, returned {rec['returned_pct']:.3f}%, "
            f"buffers {'intact' if problem is None else 'BROKEN: ' + problem}")
        for t in kv:
            t.fill_(1)  # the engine writes its KV cache again after wake
    return res


def _clamp_level2(w_req: int, kv_req: int, headroom: int) -> tuple[int, int]:
    cap = max(mem_free() - headroom, 2 * GiB)
    if w_req + kv_req <= cap:
        say(f"  level-2: {w_req / GiB:.2f}+{kv_req / GiB:.2f} GiB fits "
            f"({cap / GiB:.1f} GiB usable with {headroom / GiB:g} GiB headroom): no clamp")
        return w_req, kv_req
    kv = round_up(min(kv_req, max(cap - w_req, cap // 2)), 2 * MiB)
    w = round_up(min(w_req, cap - kv), 2 * MiB)
    say(f"  [clamp] level-2: {w_req / GiB:.2f}+{kv_req / GiB:.2f} GiB requested, "
        f"{cap / GiB:.2f} GiB usable with {headroom / GiB:g} GiB headroom -> "
        f"{w / GiB:.2f}+{kv / GiB:.2f} GiB")
    return w, kv


def _alloc_kv(nbytes: int, chunk: int = 8 * GiB) -> list:
    n = max(1, math.ceil(nbytes / chunk))
    each = round_up(nbytes // n, 2 * MiB)
    return [torch.empty(each, dtype=torch.uint8, device="cuda") for _ in range(n)]


def _level2_cycle(alloc: Any) -> dict:
    sync()
    pool = int(alloc.get_current_usage())
    torch.cuda.empty_cache()  # so "memory returned" counts only what the sleep itself released
    free_before = mem_free()
    sleep_s = timed(lambda: alloc.sleep(offload_tags=()))
    free_after = mem_free()
    st = ext_stats(alloc)
    wake_w = timed(lambda: alloc.wake_up(["weights"]))
    wake_kv = timed(lambda: alloc.wake_up(["kv_cache"]))
    tags = st.get("tags") or {}
    preserved = sum(int((t or {}).get("preserved_bytes") or 0) for t in tags.values()
                    if isinstance(t, dict))
    return {"sleep_ms": sleep_s * 1e3, "wake_weights_ms": wake_w * 1e3, "wake_kv_ms": wake_kv * 1e3,
            "total_ms": (sleep_s + wake_w + wake_kv) * 1e3, "pool_bytes": pool,
            "returned_pct": 100.0 * (free_after - free_before) / pool if pool else None,
            "preserved_bytes": preserved, "host_bytes": st.get("host_bytes"), "stats": st}


def worker_load(p: dict) -> dict:
    """Seconds to allocate + fill a model-like set, in the 'weights' pool or torch's allocator."""
    warm = torch.zeros(MiB, device="cuda")
    warm.random_()
    sync()
    nbytes = clamp_bytes(int(p["size_gib"] * GiB), int(p["headroom_gib"] * GiB), "load")
    sizes = model_like_sizes(nbytes, p["seed"])
    ctx: ContextManager = nullcontext()
    if p["mode"] == "pool":
        ctx = get_ext_allocator().use_memory_pool(tag="weights")
    holder: list = []

    def load() -> None:
        with ctx:
            holder.append(alloc_tensors(sizes))
            fill_random(holder[0], p["seed"])

    secs = timed(load)
    say(f"  load ({p['mode']}) {nbytes / GiB:.2f} GiB in {len(sizes)} tensors: {secs * 1e3:.1f} ms")
    return {"mode": p["mode"], "seconds": secs, "bytes": nbytes, "n_tensors": len(sizes)}


WORKERS: dict[str, Callable[[dict], dict]] = {
    "limit": worker_limit, "level1": worker_level1, "level2": worker_level2, "load": worker_load,
}


def worker_main(mode: str, params: dict) -> int:
    try:
        problem = cuda_problem()
        if problem:
            raise RuntimeError(problem)
        torch.cuda.init()
        result = WORKERS[mode](params)
        rc = 0
    except RoundTripBroken as exc:
        result, rc = {"error": str(exc), "verify_failed": True}, 1
    except Exception as exc:  # noqa: BLE001 - report any failure to the parent as data
        tb = traceback.format_exc(limit=6)
        say(tb.rstrip())
        result, rc = {"error": f"{type(exc).__name__}: {exc}"}, 1
    print(RESULT_PREFIX + json.dumps(result, default=repr), flush=True)
    return rc


# --------------------------------------------------------------------------------------------------
# parent side: orchestration
# --------------------------------------------------------------------------------------------------

T0 = time.perf_counter()


def log(msg: str) -> None:
    say(f"[{time.perf_counter() - T0:6.1f}s] {msg}")


def run_worker(mode: str, params: dict, timeout: float, env: Optional[dict] = None) -> dict:
    """Run one measurement in a fresh process; relay its progress lines; return its JSON."""
    cmd = [sys.executable, str(SCRIPT), "--worker", mode, "--worker-args", json.dumps(params)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    result: Optional[dict] = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
            else:
                print("    " + line, end="", flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
    if result is None:
        result = {"error": f"worker '{mode}' exited with status {rc} and no result"
                           + (" (timed out)" if rc == -9 else "")}
    if "error" in result:
        log(f"  {mode} failed: {result['error']}")
    return result


@dataclasses.dataclass
class Config:
    sizes_gib: list[float]
    weights_gib: float
    kv_gib: float
    cycles: int
    keep_false_cycles: int
    l2_cycles: int
    limit_reps: int
    load_gib: float
    load_repeats: int
    peer_gib: Optional[float]
    headroom_gib: float
    seed: int
    skip: set[str]
    timeout: float
    out: Path


def run_all(cfg: Config) -> dict:
    res: dict = {"config": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path)
                                else v) for k, v in dataclasses.asdict(cfg).items()}}
    common = {"headroom_gib": cfg.headroom_gib, "seed": cfg.seed}
    all_sizes = sorted(set(cfg.sizes_gib) | ({cfg.peer_gib} if cfg.peer_gib else set()))
    log(f"pinned-copy limit at {', '.join(f'{s:g}' for s in all_sizes)} GiB")
    res["limit"] = run_worker("limit", {**common, "sizes_gib": all_sizes,
                                        "reps": cfg.limit_reps}, cfg.timeout)
    if "level1" not in cfg.skip:
        res["level1"] = {}
        for size in cfg.sizes_gib:
            log(f"level 1, vllm_sleep_ext, {size:g} GiB (fresh process)")
            res["level1"][str(size)] = run_worker("level1", {
                **common, "impl": "ext", "size_gib": size, "cycles": cfg.cycles,
                "keep_false_cycles": 0 if "host" in cfg.skip else cfg.keep_false_cycles},
                cfg.timeout)
    if "level2" not in cfg.skip:
        log(f"level 2: weights {cfg.weights_gib:g} GiB + kv {cfg.kv_gib:g} GiB")
        res["level2"] = run_worker("level2", {**common, "weights_gib": cfg.weights_gib,
                                              "kv_gib": cfg.kv_gib, "cycles": cfg.l2_cycles,
                                              "n_modules": 8}, cfg.timeout)
    if "load" not in cfg.skip:
        res["load"] = run_load(cfg, common)
    if "peers" not in cfg.skip and cfg.peer_gib:
        res["peers"] = run_peers(cfg, common)
    return res


def run_load(cfg: Config, common: dict) -> dict:
    runs: dict[str, list] = {"torch": [], "pool": []}
    for i in range(cfg.load_repeats):
        for mode in ("torch", "pool"):
            log(f"load overhead, {mode}, {cfg.load_gib:g} GiB, run {i + 1}/{cfg.load_repeats}")
            runs[mode].append(run_worker("load", {**common, "mode": mode,
                                                  "size_gib": cfg.load_gib}, cfg.timeout))
    t = median(r.get("seconds") for r in runs["torch"])
    p = median(r.get("seconds") for r in runs["pool"])
    return {"runs": runs, "torch_s": t, "pool_s": p, "ratio": (p / t) if t and p else None}


def run_peers(cfg: Config, common: dict) -> dict:
    base = {**common, "size_gib": cfg.peer_gib, "cycles": max(2, cfg.cycles - 1)}
    peers: dict = {}
    tms_ok, tms_why = module_present("torch_memory_saver")
    if tms_ok:
        peers["torch_memory_saver"] = run_tms(cfg, base, retain=False)
        peers["torch_memory_saver-retained"] = run_tms(cfg, base, retain=True)
    else:
        peers["torch_memory_saver"] = {"error": f"n/a: {tms_why}"}
        log(f"torch_memory_saver: n/a ({tms_why})")
    vllm_ok, vllm_why = module_present("vllm")
    if vllm_ok:
        log(f"level 1, vLLM's own CuMemAllocator, {cfg.peer_gib:g} GiB")
        peers["vllm-cumem"] = run_worker("level1", {**base, "impl": "vllm"}, cfg.timeout)
    else:
        peers["vllm-cumem"] = {"error": f"n/a: {vllm_why}"}
        log(f"vLLM CuMemAllocator: n/a ({vllm_why})")
    return peers


def module_present(name: str) -> tuple[bool, str]:
    """Installed? (no import: importing vllm alone takes 10-20 s; its worker reports failures)."""
    import importlib.util  # noqa: PLC0415
    try:
        found = importlib.util.find_spec(name) is not None
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return found, "" if found else f"No module named '{name}'"


def module_importable(name: str) -> tuple[bool, str]:
    """Import check in a subprocess (keeps this process free of CUDA state and preload hooks)."""
    code = f"import {name}; print(getattr({name}, '__version__', '?'))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, last
    return True, out.stdout.strip()


def tms_preload_env() -> dict:
    """os.environ with LD_PRELOAD set the way torch_memory_saver's configure_subprocess() sets it."""
    import torch_memory_saver as m  # noqa: PLC0415
    cfg = getattr(m, "configure_subprocess", None)
    if cfg is None:
        from torch_memory_saver.hooks.mode_preload import configure_subprocess as cfg  # noqa
    with cfg():
        return dict(os.environ)


def run_tms(cfg: Config, base: dict, retain: bool) -> dict:
    """torch_memory_saver, preload hook first (its default), torch hook as a fallback."""
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if retain:
        env["TMS_RETAIN_CPU_BACKUP"] = "1"
    errors = []
    for hook in ("preload", "torch"):
        wenv = dict(env)
        if hook == "preload":
            try:
                wenv.update({"LD_PRELOAD": tms_preload_env()["LD_PRELOAD"]})
            except Exception as exc:  # noqa: BLE001
                errors.append(f"preload: {type(exc).__name__}: {exc}")
                continue
        log(f"level 1, torch_memory_saver ({hook} hook{', retained backup' if retain else ''}), "
            f"{cfg.peer_gib:g} GiB")
        r = run_worker("level1", {**base, "impl": "tms", "tms_hook": hook, "tms_retain": retain},
                       cfg.timeout, env=wenv)
        if "error" not in r or r.get("verify_failed"):
            r["tms_hook"] = hook
            return r
        errors.append(f"{hook}: {r['error']}")
    return {"error": "n/a: " + " | ".join(errors)}


# --------------------------------------------------------------------------------------------------
# parent side: report
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    figure: str
    size_gib: Optional[float]
    value: Optional[float]
    unit: str
    limit: Optional[float] = None      # GB/s of the pinned copy in the same direction and size
    target: str = ""
    verdict: str = "info"
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.value is None or not self.limit:
            return None
        return self.value / self.limit


def judge(value: Optional[float], ok: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a"
    return "PASS" if ok(value) else "FAIL"


def limit_at(res: dict, size: Optional[float], direction: str) -> Optional[float]:
    sizes = (res.get("limit") or {}).get("sizes") or {}
    rec = sizes.get(str(float(size))) if size is not None else None
    return rec.get(f"{direction}_gbps") if rec else None


def rows_limit(res: dict) -> list[Row]:
    lim = res.get("limit") or {}
    if "error" in lim:
        return [Row("pinned-copy limit", None, None, "GB/s", note=lim["error"], verdict="n/a")]
    rows = []
    for size, rec in sorted((lim.get("sizes") or {}).items(), key=lambda kv: float(kv[0])):
        s = float(size)
        rows.append(Row("pinned-copy limit D2H", s, rec["d2h_gbps"], "GB/s", rec["d2h_gbps"]))
        rows.append(Row("pinned-copy limit H2D", s, rec["h2d_gbps"], "GB/s", rec["h2d_gbps"]))
    if lim.get("pin_alloc_s"):
        rows.append(Row("cudaHostAlloc via torch pin_memory", round(lim["pin_alloc_bytes"] / GiB, 2),
                        gbps(lim["pin_alloc_bytes"], lim["pin_alloc_s"]), "GB/s",
                        note="cost of getting pinned memory"))
    return rows


def rows_level1(res: dict, label: str, r: dict, size: float, judged: bool = True) -> list[Row]:
    if "error" in r:
        broken = "FAIL" if judged else "BROKEN"
        return [Row(f"{label}: level 1", size, None, "GB/s",
                    verdict=broken if r.get("verify_failed") else "n/a", note=r["error"])]
    d2h, h2d = limit_at(res, size, "d2h"), limit_at(res, size, "h2d")
    fs, fw = r["first_sleep"], r["first_wake"]
    ws = median(x["gbps"] for x in r["warm_sleep"])
    ww = median(x["gbps"] for x in r["warm_wake"])
    rows = [
        _ratio_row(f"{label}: L1 first sleep", size, fs["gbps"], d2h, TARGET_FIRST_X, judged),
        _ratio_row(f"{label}: L1 wake after first sleep", size, fw["gbps"], h2d, None, judged),
        _ratio_row(f"{label}: L1 warm sleep (median)", size, ws, d2h, TARGET_WARM_X, judged),
        _ratio_row(f"{label}: L1 warm wake (median)", size, ww, h2d, TARGET_WARM_X, judged),
    ]
    if judged:
        rows += _rows_level1_ext_extras(r, size, d2h, h2d)
    return rows


def _ratio_row(fig: str, size: float, value: Optional[float], limit: Optional[float],
               target_x: Optional[float], judged: bool) -> Row:
    row = Row(fig, size, value, "GB/s", limit)
    if target_x is not None and judged:
        row.target = f">= {target_x:g}x limit"
        row.verdict = judge(row.ratio, lambda x: x >= target_x)
    return row


def _rows_level1_ext_extras(r: dict, size: float, d2h: Optional[float],
                            h2d: Optional[float]) -> list[Row]:
    rows = [
        Row("ext: L1 warm sleep, stats() internal", size,
            median(x.get("internal_gbps") for x in r["warm_sleep"]), "GB/s", d2h),
        Row("ext: L1 warm wake, stats() internal", size,
            median(x.get("internal_gbps") for x in r["warm_wake"]), "GB/s", h2d),
        Row("ext: L1 memory returned on sleep", size,
            median(x.get("returned_pct") for x in [r["first_sleep"]] + r["warm_sleep"]), "%",
            target=f">= {TARGET_RETURNED_PCT}%"),
        _host_row("ext: host bytes / backed up, keep_host_backups=True", size,
                  [r["first_sleep"]] + r["warm_sleep"]),
    ]
    rows[2].verdict = judge(rows[2].value, lambda v: v >= TARGET_RETURNED_PCT)
    if "nokeep_sleep" in r:
        rows += [
            Row("ext: L1 warm sleep, keep_host_backups=False", size,
                median(x["gbps"] for x in r["nokeep_sleep"]), "GB/s", d2h),
            Row("ext: L1 warm wake, keep_host_backups=False", size,
                median(x["gbps"] for x in r["nokeep_wake"]), "GB/s", h2d),
            _host_row("ext: host bytes / backed up, keep_host_backups=False", size,
                      r["nokeep_sleep"]),
        ]
    elif "nokeep_error" in r:
        rows.append(Row("ext: keep_host_backups=False", size, None, "", verdict="n/a",
                        note=r["nokeep_error"]))
    return rows


def _host_row(fig: str, size: float, sleeps: list[dict]) -> Row:
    ratios = [x.get("host_ratio") for x in sleeps if x.get("host_ratio") is not None]
    value = max(ratios) if ratios else None
    return Row(fig, size, value, "x", target=f"<= {TARGET_HOST_RATIO}",
               verdict=judge(value, lambda v: v <= TARGET_HOST_RATIO), note="max over sleeps")


def rows_level2(res: dict) -> list[Row]:
    r = res.get("level2")
    if r is None:
        return []
    if "error" in r:
        return [Row("L2 sleep + wake", None, None, "ms", verdict="n/a", note=r["error"])]
    cyc = r["cycles"]
    size = (r["weights_bytes"] + r["kv_bytes"]) / GiB
    note = (f"{r['weights_bytes'] / GiB:.2f}+{r['kv_bytes'] / GiB:.2f} GiB"
            + (" (clamped)" if r["clamped"] else ""))
    total = median(c["total_ms"] for c in cyc)
    returned = min((c["returned_pct"] for c in cyc if c["returned_pct"] is not None), default=None)
    intact = all(c["buffers_intact"] for c in cyc)
    return [
        Row("L2 sleep(offload_tags=())", size, median(c["sleep_ms"] for c in cyc), "ms", note=note),
        Row("L2 wake_up(['weights'])", size, median(c["wake_weights_ms"] for c in cyc), "ms"),
        Row("L2 wake_up(['kv_cache'])", size, median(c["wake_kv_ms"] for c in cyc), "ms"),
        Row("L2 sleep + wake, median", size, total, "ms", target=f"<= {TARGET_L2_MS:g} ms",
            verdict=judge(total, lambda v: v <= TARGET_L2_MS),
            note=f"first {cyc[0]['total_ms']:.1f}, max {max(c['total_ms'] for c in cyc):.1f} ms"),
        Row("L2 memory returned on sleep (min)", size, returned, "%",
            target=f">= {TARGET_RETURNED_PCT}%",
            verdict=judge(returned, lambda v: v >= TARGET_RETURNED_PCT)),
        Row("L2 buffers intact after wake", size, 1.0 if intact else 0.0, "bool", target="1",
            verdict="PASS" if intact else "FAIL",
            note=f"{r['buffer_bytes'] / MiB:.1f} MiB buffers, preserved "
                 f"{(cyc[0].get('preserved_bytes') or 0) / MiB:.1f} MiB"),
    ]


def rows_load(res: dict) -> list[Row]:
    r = res.get("load")
    if r is None:
        return []
    size = res["config"]["load_gib"]
    return [
        Row("load: torch allocator alloc+fill", size, _ms(r.get("torch_s")), "ms"),
        Row("load: weights pool alloc+fill", size, _ms(r.get("pool_s")), "ms"),
        Row("load: pool / torch time", size, r.get("ratio"), "x", target=f"<= {TARGET_LOAD_RATIO}",
            verdict=judge(r.get("ratio"), lambda v: v <= TARGET_LOAD_RATIO)),
    ]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return seconds * 1e3 if seconds is not None else None


def rows_peers(res: dict) -> list[Row]:
    rows = []
    size = res["config"].get("peer_gib")
    for name, r in (res.get("peers") or {}).items():
        label = name + (f" [{r['tms_hook']} hook]" if r.get("tms_hook") else "")
        if name.endswith("-retained") and r.get("tms_retain_supported") is False:
            label += " (retain property absent; env TMS_RETAIN_CPU_BACKUP=1 set)"
        rows += rows_level1(res, label, r, size, judged=False)
    return rows


def build_rows(res: dict) -> list[Row]:
    rows = rows_limit(res)
    for size, r in sorted((res.get("level1") or {}).items(), key=lambda kv: float(kv[0])):
        rows += rows_level1(res, "ext", r, float(size))
    return rows + rows_level2(res) + rows_load(res) + rows_peers(res)


def _num(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit in ("ms", "GB/s"):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if unit == "%":
        return f"{v:.3f}"
    if unit == "bool":
        return "yes" if v else "no"
    return f"{v:.3f}"


def markdown_table(rows: Sequence[Row]) -> str:
    head = ("| figure | size GiB | value | unit | limit GB/s | x limit | target | result | note |\n"
            "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | --- |")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.figure} | {'' if r.size_gib is None else f'{r.size_gib:g}'} | "
                     f"{_num(r.value, r.unit)} | {r.unit} | {_num(r.limit, 'GB/s') if r.limit else ''}"
                     f" | {'' if r.ratio is None else f'{r.ratio:.3f}'} | {r.target} | {r.verdict} "
                     f"| {r.note.replace('|', '/')} |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> dict:
    counts = {v: sum(1 for r in rows if r.verdict == v) for v in ("PASS", "FAIL", "n/a")}
    counts["failed"] = [f"{r.figure} @ {r.size_gib:g} GiB" if r.size_gib is not None else r.figure
                        for r in rows if r.verdict == "FAIL"]
    return counts


def write_plot(res: dict, path: Path) -> Optional[str]:
    """GB/s vs size, one line per method, the pinned-copy limit as lines. Returns a reason if skipped."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable ({type(exc).__name__})"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ticks: set[float] = set()
    for label, xs, ys, style, marker in plot_series(res):
        if xs:
            ax.plot(xs, ys, style, label=label, marker=marker)
            ticks.update(xs)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("weights size (GiB)")
    ax.set_ylabel("GB/s (1e9 bytes/s)")
    env = (res.get("limit") or {}).get("env") or {}
    ax.set_title(f"sleep/wake vs pinned-copy limit - {env.get('gpu', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_series(res: dict) -> list[tuple[str, list, list, str, str]]:
    lim = (res.get("limit") or {}).get("sizes") or {}
    lsz = sorted(lim, key=float)
    series = [("pinned-copy limit D2H", [float(s) for s in lsz], [lim[s]["d2h_gbps"] for s in lsz],
               "k-", "o"),
              ("pinned-copy limit H2D", [float(s) for s in lsz], [lim[s]["h2d_gbps"] for s in lsz],
               "k--", "o")]
    l1 = {k: v for k, v in (res.get("level1") or {}).items() if "error" not in v}
    sz = sorted(l1, key=float)
    pick: list[tuple[str, Callable[[dict], Optional[float]], str]] = [
        ("ext first sleep", lambda r: r["first_sleep"]["gbps"], "C0-"),
        ("ext warm sleep", lambda r: median(x["gbps"] for x in r["warm_sleep"]), "C1-"),
        ("ext warm wake", lambda r: median(x["gbps"] for x in r["warm_wake"]), "C2-"),
        ("ext sleep keep_host_backups=False",
         lambda r: median(x["gbps"] for x in r.get("nokeep_sleep", [])), "C3:"),
    ]
    for label, f, style in pick:
        pts = [(float(s), f(l1[s])) for s in sz if f(l1[s]) is not None]
        series.append((label, [p[0] for p in pts], [p[1] for p in pts], style, "o"))
    for i, (name, r) in enumerate((res.get("peers") or {}).items()):
        if "error" in r:
            continue
        x = float(r["size_gib"])
        series.append((f"{name} first sleep", [x], [r["first_sleep"]["gbps"]], f"C{4 + i}", "s"))
        series.append((f"{name} warm sleep", [x], [median(s["gbps"] for s in r["warm_sleep"])],
                       f"C{4 + i}", "^"))
        series.append((f"{name} warm wake", [x], [median(s["gbps"] for s in r["warm_wake"])],
                       f"C{4 + i}", "v"))
    return series


def write_outputs(res: dict, rows: Sequence[Row], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res["rows"] = [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]
    res["summary"] = summary(rows)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=repr))
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    why = write_plot(res, out / "bench_sleep.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f"; no plot: {why}" if why else f", {out / 'bench_sleep.png'}"))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else SCRIPT.parent / "out"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Sleep/wake speed of vllm_sleep_ext vs the pinned-copy limit measured in the "
                    "same run (plus level 2, host memory, load overhead and peers).")
    ap.add_argument("--sizes-gib", type=float, nargs="+", default=None,
                    help=f"level-1 weight sizes to sweep (default {' '.join(map(str, DEFAULT_SIZES_GIB))};"
                         f" --quick: {' '.join(map(str, QUICK_SIZES_GIB))})")
    ap.add_argument("--weights-gib", type=float, default=None,
                    help="level-2 weights size (default 16; --quick 2)")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="level-2 KV cache size (default 48; --quick 4); clamped to free memory")
    ap.add_argument("--quick", action="store_true", help="small sizes and fewer repetitions")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default $OUT if set, else benchmarks/out)")
    ap.add_argument("--cycles", type=int, default=None, help="warm sleep/wake cycles (default 3)")
    ap.add_argument("--keep-false-cycles", type=int, default=None,
                    help="cycles with keep_host_backups=False (default 2)")
    ap.add_argument("--l2-cycles", type=int, default=None, help="level-2 cycles (default 5)")
    ap.add_argument("--limit-reps", type=int, default=None, help="pinned copies per size (default 5)")
    ap.add_argument("--load-gib", type=float, default=None,
                    help="load-overhead workload size (default = --weights-gib)")
    ap.add_argument("--load-repeats", type=int, default=None,
                    help="fresh processes per allocator for the load test (default 2)")
    ap.add_argument("--peer-gib", type=float, default=None,
                    help="size for peers (torch_memory_saver, vLLM) (default = largest --sizes-gib)")
    ap.add_argument("--headroom-gib", type=float, default=6.0,
                    help="device memory left free when clamping sizes (default 6)")
    ap.add_argument("--skip", nargs="+", default=[],
                    choices=["level1", "level2", "host", "load", "peers"],
                    help="sections to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per worker process")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="{}", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_config(a: argparse.Namespace) -> Config:
    q = a.quick
    sizes = sorted(a.sizes_gib or (QUICK_SIZES_GIB if q else DEFAULT_SIZES_GIB))
    weights = a.weights_gib if a.weights_gib is not None else (2.0 if q else 16.0)

    def pick(value: Optional[int], full: int, quick: int) -> int:
        return value if value is not None else (quick if q else full)

    return Config(
        sizes_gib=[float(s) for s in sizes], weights_gib=weights,
        kv_gib=a.kv_gib if a.kv_gib is not None else (4.0 if q else 48.0),
        cycles=pick(a.cycles, 3, 2), keep_false_cycles=pick(a.keep_false_cycles, 2, 1),
        l2_cycles=pick(a.l2_cycles, 5, 3), limit_reps=pick(a.limit_reps, 5, 3),
        load_gib=a.load_gib if a.load_gib is not None else weights,
        load_repeats=pick(a.load_repeats, 2, 1),
        peer_gib=a.peer_gib if a.peer_gib is not None else max(sizes),
        headroom_gib=a.headroom_gib, seed=a.seed, skip=set(a.skip), timeout=a.timeout,
        out=a.out or default_out())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_args))
    problem = cuda_problem()
    if problem:
        print(f"bench_sleep: {problem}", file=sys.stderr, flush=True)
        return 2
    cfg = resolve_config(args)
    ok, why = module_importable("vllm_sleep_ext")
    if not ok:
        log(f"WARNING: vllm_sleep_ext is not importable ({why}); its figures will be n/a")
    res = run_all(cfg)
    rows = build_rows(res)
    say("\n" + markdown_table(rows) + "\n")
    s = summary(rows)
    log(f"targets: {s['PASS']} pass, {s['FAIL']} fail, {s['n/a']} n/a"
        + (f"; failed: {', '.join(s['failed'])}" if s["failed"] else ""))
    write_outputs(res, rows, cfg.out)
    return 1 if args.strict and s["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
