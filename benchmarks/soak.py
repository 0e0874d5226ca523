#!/usr/bin/env python3
"""Soak test: many sleep/wake cycles, alternating level 1 and level 2, looking for drift.

Workload: model-like "weights" (default 1 GiB) with modules holding registered buffers, plus a
"kv_cache" (default 2 GiB). Even cycles are level 1 (weights backed up), odd cycles level 2 (weights
discarded, buffers preserved, parameters reloaded from a pinned CPU copy). Every cycle is checked
(weights + buffers at level 1; buffers, then weights after the reload, at level 2). Every
--record-every cycles it samples device memory used, host RSS, allocations, open fds and host
backup bytes; at the end it compares every sample with the baseline of its level (the first sample
after --warmup cycles).

    python benchmarks/soak.py               # 1000 cycles
    python benchmarks/soak.py --quick       # 100 cycles
    python benchmarks/soak.py --cycles 5000 --weights-gib 4 --kv-gib 8

Exit status: 0 no drift, 1 drift / checksum mismatch / error, 2 no CUDA or vllm_sleep_ext.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleepbench.impls import ext  # noqa: E402
from sleepbench import common as bc, workloads as bs  # noqa: E402  (shared helpers; torch imported defensively)

torch = bc.torch
MiB = bc.MiB
GiB = bc.GiB


@dataclasses.dataclass
class Workload:
    weights: list            # "parameters": model-like tensors in the "weights" pool
    mods: list               # modules whose registered buffers live in the "weights" pool
    kv: list                 # tensors in the "kv_cache" pool
    host_copy: list          # pinned CPU copies of the weights, for the level-2 reload
    weight_sums: Any         # per-tensor checksums of the weights
    buffer_ref: list         # clones of the buffers (outside any pool)


@dataclasses.dataclass
class Sample:
    cycle: int
    level: int
    dev_used_mib: float
    rss_mib: float
    n_allocs: int
    n_fds: int
    host_backup_mib: Optional[float]
    ok: bool
    sleep_ms: float
    wake_ms: float


# ---------------------------------------------------------------------------------------------
# workload and one cycle
# ---------------------------------------------------------------------------------------------

def build_workload(alloc: Any, weights_gib: float, kv_gib: float, seed: int,
                   n_modules: int) -> Workload:
    sizes = bs.model_like_sizes(int(weights_gib * GiB), seed, max_small=1000)
    with alloc.use_memory_pool(tag="weights"):
        weights = bs.alloc_tensors(sizes)
        mods = bs.make_buffer_modules(n_modules)
    mods.append(bs.as_parameters(weights))  # the weights are parameters, as in a model
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = bs.alloc_kv(int(kv_gib * GiB), chunk=GiB)
    bs.fill_random(weights, seed)
    for t in kv:
        t.fill_(3)
    host_copy = pinned_copy(weights)
    bc.sync()
    return Workload(weights, mods, kv, host_copy, bs.checksums(weights),
                    [b.clone() for b in bs.module_buffers(mods)])


def pinned_copy(tensors: Sequence[Any]) -> list:
    """One pinned host buffer holding a copy of every tensor (views into it)."""
    flat = torch.empty(sum(t.nbytes for t in tensors), dtype=torch.uint8, pin_memory=True)
    views, off = [], 0
    for t in tensors:
        v = flat[off:off + t.nbytes].view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
        off += t.nbytes
    return views


def reload_params(wl: Workload) -> None:
    """What load_weights does after a level-2 wake: parameters only, buffers untouched."""
    for t, h in zip(wl.weights, wl.host_copy):
        t.copy_(h, non_blocking=True)
    bc.sync()


def weights_problem(wl: Workload) -> Optional[str]:
    bad = (bs.checksums(wl.weights) != wl.weight_sums).nonzero().flatten().tolist()
    return f"{len(bad)} weight checksums differ (first #{bad[0]})" if bad else None


def run_cycle(alloc: Any, wl: Workload, level: int, check: bool) -> tuple[float, float, Optional[str]]:
    """One sleep/wake at `level`; returns (sleep s, wake s, problem or None)."""
    sleep_s = bc.timed(lambda: alloc.sleep(offload_tags=("weights",) if level == 1 else ()))
    wake_s = bc.timed(lambda: alloc.wake_up(["weights"]))
    problem = None
    if level == 2:
        if check:
            problem = bs.buffers_mismatch(wl.mods, wl.buffer_ref)
        reload_params(wl)
    wake_s += bc.timed(lambda: alloc.wake_up(["kv_cache"]))
    if check and problem is None:
        problem = bs.buffers_mismatch(wl.mods, wl.buffer_ref) or weights_problem(wl)
    for t in wl.kv:
        t.fill_(3)  # the engine uses its KV cache between sleeps
    if problem:
        problem = f"level {level}: {problem}"
    return sleep_s, wake_s, problem


# ---------------------------------------------------------------------------------------------
# process probes
# ---------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def device_used_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def host_backup_bytes(alloc: Any) -> Optional[int]:
    try:
        return int(alloc.stats().host_bytes)
    except Exception:  # noqa: BLE001 - optional figure
        return None


def take_sample(alloc: Any, cycle: int, level: int, ok: bool, sleep_s: float,
                wake_s: float) -> Sample:
    hb = host_backup_bytes(alloc)
    return Sample(cycle=cycle, level=level, dev_used_mib=device_used_bytes() / MiB,
                  rss_mib=rss_bytes() / MiB, n_allocs=len(alloc.pointer_to_data),
                  n_fds=open_fds(), host_backup_mib=None if hb is None else hb / MiB, ok=ok,
                  sleep_ms=sleep_s * 1e3, wake_ms=wake_s * 1e3)


# ---------------------------------------------------------------------------------------------
# drift and report
# ---------------------------------------------------------------------------------------------

def baselines(samples: Sequence[Sample], warmup: int) -> dict[int, Sample]:
    """Per level, the first sample taken once the warm-up is done (else that level's last one)."""
    out: dict[int, Sample] = {}
    for s in samples:
        if s.cycle >= warmup - 1 and s.level not in out:
            out[s.level] = s
    for s in reversed(samples):
        out.setdefault(s.level, s)
    return out


def drift_problems(samples: Sequence[Sample], bases: dict[int, Sample],
                   a: argparse.Namespace) -> list[str]:
    """Every sample after its level's baseline against it."""
    out = []
    for s in samples:
        base = bases[s.level]
        if s.cycle <= base.cycle:
            continue
        where = f"cycle {s.cycle}"
        if s.dev_used_mib - base.dev_used_mib > a.device_tol_mib:
            out.append(f"{where}: device memory used grew {s.dev_used_mib - base.dev_used_mib:.1f} MiB")
        if s.rss_mib - base.rss_mib > a.host_tol_mib:
            out.append(f"{where}: host RSS grew {s.rss_mib - base.rss_mib:.1f} MiB")
        if s.n_allocs != base.n_allocs:
            out.append(f"{where}: allocations {base.n_allocs} -> {s.n_allocs}")
        if s.n_fds - base.n_fds > a.fd_tol:
            out.append(f"{where}: open fds {base.n_fds} -> {s.n_fds}")
        if (s.host_backup_mib is not None and base.host_backup_mib is not None
                and s.host_backup_mib - base.host_backup_mib > a.device_tol_mib):
            out.append(f"{where}: host backup bytes grew "
                       f"{s.host_backup_mib - base.host_backup_mib:.1f} MiB")
    return out


def table(samples: Sequence[Sample], bases: dict[int, Sample]) -> str:
    head = ("| cycle | level | device used MiB | Δ dev MiB | host RSS MiB | Δ RSS MiB | allocations "
            "| open fds | host backups MiB | checksum | sleep ms | wake ms |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    rows = [head]
    for s in samples:
        base = bases.get(s.level)
        dd = "" if base is None else f"{s.dev_used_mib - base.dev_used_mib:+.1f}"
        dr = "" if base is None else f"{s.rss_mib - base.rss_mib:+.1f}"
        hb = "n/a" if s.host_backup_mib is None else f"{s.host_backup_mib:.1f}"
        rows.append(f"| {s.cycle} | {s.level} | {s.dev_used_mib:.1f} | {dd} | {s.rss_mib:.1f} | "
                    f"{dr} | {s.n_allocs} | {s.n_fds} | {hb} | {'ok' if s.ok else 'MISMATCH'} | "
                    f"{s.sleep_ms:.2f} | {s.wake_ms:.2f} |")
    return "\n".join(rows)


def timing_summary(times: dict[int, list[tuple[float, float]]]) -> str:
    parts = []
    for level, tt in sorted(times.items()):
        if not tt:
            continue
        sl = sorted(t[0] * 1e3 for t in tt)
        wk = sorted(t[1] * 1e3 for t in tt)
        parts.append(f"level {level}: {len(tt)} cycles, sleep p50 {statistics.median(sl):.2f} / "
                     f"max {sl[-1]:.2f} ms, wake p50 {statistics.median(wk):.2f} / "
                     f"max {wk[-1]:.2f} ms")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# main loop
# ---------------------------------------------------------------------------------------------

def soak(alloc: Any, wl: Workload, a: argparse.Namespace) -> tuple[list[Sample], Optional[str]]:
    samples: list[Sample] = []
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    t0 = time.perf_counter()
    for c in range(a.cycles):
        level = 1 if c % 2 == 0 else 2
        check = c % a.check_every == 0 or c == a.cycles - 1
        try:
            sleep_s, wake_s, problem = run_cycle(alloc, wl, level, check)
        except Exception as exc:  # noqa: BLE001 - any failure ends the soak with a report
            return samples, f"cycle {c} (level {level}) raised {type(exc).__name__}: {exc}"
        times[level].append((sleep_s, wake_s))
        if c == a.warmup - 1 or (c + 1) % a.record_every == 0 or c == a.cycles - 1 or problem:
            s = take_sample(alloc, c, level, problem is None, sleep_s, wake_s)
            samples.append(s)
            bc.say(f"[{time.perf_counter() - t0:6.1f}s] cycle {c}/{a.cycles} L{level}: "
                   f"dev {s.dev_used_mib:.1f} MiB, RSS {s.rss_mib:.1f} MiB, allocs {s.n_allocs}, "
                   f"fds {s.n_fds}, sleep {s.sleep_ms:.2f} ms, wake {s.wake_ms:.2f} ms"
                   + ("" if problem is None else f", PROBLEM: {problem}"))
        if problem:
            return samples, f"cycle {c}: {problem}"
    bc.say(timing_summary(times))
    return samples, None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Soak test of vllm_sleep_ext: sleep/wake cycles "
                                             "alternating level 1 and level 2, checking for drift.")
    ap.add_argument("--cycles", type=int, default=None, help="cycles (default 1000; --quick 100)")
    ap.add_argument("--quick", action="store_true", help="100 cycles")
    ap.add_argument("--weights-gib", type=float, default=1.0, help="weights size (default 1)")
    ap.add_argument("--kv-gib", type=float, default=2.0, help="KV cache size (default 2)")
    ap.add_argument("--modules", type=int, default=8, help="modules with registered buffers (8)")
    ap.add_argument("--record-every", type=int, default=50, help="sample every N cycles (50)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="cycles before the baseline sample (default 10; at least 2 so both "
                         "levels ran once)")
    ap.add_argument("--check-every", type=int, default=1,
                    help="verify checksums every N cycles (default 1 = every cycle)")
    ap.add_argument("--device-tol-mib", type=float, default=4.0,
                    help="allowed growth of device memory used / host backups (MiB, default 4)")
    ap.add_argument("--host-tol-mib", type=float, default=32.0,
                    help="allowed growth of host RSS (MiB, default 32)")
    ap.add_argument("--fd-tol", type=int, default=0, help="allowed growth of open fds (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write samples to this JSON file")
    a = ap.parse_args(argv)
    if a.cycles is None:
        a.cycles = 100 if a.quick else 1000
    a.record_every = max(1, a.record_every)
    a.check_every = max(1, a.check_every)
    a.warmup = min(max(2, a.warmup), a.cycles)
    return a


def setup() -> tuple[Optional[Any], Optional[str]]:
    """(allocator, None) or (None, why it can't run)."""
    problem = bc.cuda_problem()
    if problem:
        return None, problem
    try:
        return ext.get_ext_allocator(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"vllm_sleep_ext unusable: {type(exc).__name__}: {exc}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    alloc, why = setup()
    if alloc is None:
        print(f"soak: {why}", file=sys.stderr, flush=True)
        return 2
    wl = build_workload(alloc, a.weights_gib, a.kv_gib, a.seed, a.modules)
    bc.say(f"soak: {a.cycles} cycles, weights {a.weights_gib:g} GiB ({len(wl.weights)} tensors, "
           f"{len(bs.module_buffers(wl.mods))} buffers) + kv {a.kv_gib:g} GiB; "
           f"{len(alloc.pointer_to_data)} allocations")
    samples, failure = soak(alloc, wl, a)
    bases = baselines(samples, a.warmup)
    problems = ([failure] if failure else []) + drift_problems(samples, bases, a)
    bc.say("\n" + table(samples, bases) + "\n")
    if a.json:
        a.json.write_text(json.dumps({"samples": [dataclasses.asdict(s) for s in samples],
                                      "problems": problems}, indent=1))
    if problems:
        bc.say("FAIL:\n  " + "\n  ".join(problems))
        return 1
    bc.say(f"PASS: {a.cycles} cycles, no drift beyond device {a.device_tol_mib:g} MiB / "
           f"RSS {a.host_tol_mib:g} MiB / fds {a.fd_tol}, every check intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
