"""Issue 17 item 1, standalone: the level-1 wake of model-like weights beside a KV cache, after a rest, with the
driver primed after the sleep (option prime_after_release, csrc/create_primer.h) and without, against the
pinned-copy limit measured in the same run.

vLLM's level-1 sleep backs up "weights" and discards "kv_cache"; its wake maps both and copies the weights back.
This does the same with the allocator's pools (default 16 GiB of weights in model-like tensors, a 96 GiB KV cache
capped at free memory): per round, for each mode, sleep, rest --rest-s, wake; the modes interleaved. After every
wake the weights are checked (per-tensor sums and full copies of a few): a broken round trip is an error, never a
speed. A wake right after its sleep (rest 0) is timed too, for comparison. Prints a table and WAKE-RESTED lines;
`--out DIR` writes bench_wake_rested.json. Run it on a GPU: tools/gpu_job.sh wakerested (about 1 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

GiB = 1 << 30
MODES = {"primed": True, "unprimed": False}


def say(msg: str) -> None:
    print(msg, flush=True)


def summarize(runs: list[dict[str, Any]], limit_gbps: float) -> dict[str, dict[str, float]]:
    """Median wake seconds, driver map ms, GB/s and x limit per (mode, rest)."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        out.setdefault(f"{r['mode']} rest {r['rest_s']:g} s", {"_runs": []})["_runs"].append(r)  # type: ignore[arg-type]
    for key, v in out.items():
        rs: list[dict[str, Any]] = v.pop("_runs")  # type: ignore[assignment]
        wake = statistics.median(r["wake_s"] for r in rs)
        nbytes = rs[0]["bytes_copied"]
        v.update(wake_s=wake, core_s=statistics.median(r["core_s"] for r in rs),
                 map_ms=statistics.median(r["map_s"] for r in rs) * 1e3, gbps=nbytes / wake / 1e9,
                 x_limit=nbytes / wake / 1e9 / limit_gbps, reps=len(rs))
    return out


def verdicts(s: dict[str, dict[str, float]], rest_s: float, target: float = 0.95) -> list[str]:
    lines = []
    p, u = s.get(f"primed rest {rest_s:g} s"), s.get(f"unprimed rest {rest_s:g} s")
    if p and u:
        lines.append(f"WAKE-RESTED primed {p['wake_s']:.3f} s ({p['x_limit']:.3f} x limit, driver map {p['map_ms']:.1f} ms)"
                     f" against unprimed {u['wake_s']:.3f} s ({u['x_limit']:.3f} x, {u['map_ms']:.1f} ms): "
                     f"{(u['wake_s'] - p['wake_s']) * 1e3:+.1f} ms saved; target >= {target} x: "
                     + ("MET" if p["x_limit"] >= target else "NOT MET"))
    return lines


def table(s: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'mode':<22} {'wake s':>7} {'core s':>7} {'GB/s':>6} {'x limit':>7} {'map ms':>7} {'reps':>4}"]
    for k, v in s.items():
        lines.append(f"{k:<22} {v['wake_s']:>7.3f} {v['core_s']:>7.3f} {v['gbps']:>6.1f} {v['x_limit']:>7.3f} "
                     f"{v['map_ms']:>7.1f} {int(v['reps']):>4}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-gib", type=float, default=16.0)
    ap.add_argument("--kv-gib", type=float, default=96.0, help="capped at free memory less --headroom-gib")
    ap.add_argument("--rest-s", type=float, default=2.0, help="seconds asleep before the wake (default 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--headroom-gib", type=float, default=6.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not (a.weights_gib > 0 and a.kv_gib >= 0 and a.rest_s >= 0 and a.reps > 0 and a.headroom_gib >= 0):
        ap.error("--weights-gib and --reps must be > 0; --kv-gib, --rest-s and --headroom-gib >= 0")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        say("bench_wake_rested: no CUDA device here; run it on a GPU machine (tools/gpu_job.sh wakerested)")
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sleepbench.impls.limit import _copy_rates
    from sleepbench.workloads import Reference, alloc_kv, alloc_tensors, fill_random, model_like_sizes

    from vllm_sleep_ext import CuMemAllocator

    # The limit first, before the pools take the device: host to device, pinned, 8 GiB, median of 5.
    n = 8 * GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    limit = statistics.median(_copy_rates(lambda: dev.copy_(host, non_blocking=True), n, 5))
    del host, dev
    torch.cuda.empty_cache()
    say(f"pinned-copy limit H2D: {limit:.1f} GB/s")

    alloc = CuMemAllocator.get_instance()
    sizes = model_like_sizes(int(a.weights_gib * GiB), 0)
    with alloc.use_memory_pool(tag="weights"):
        weights = alloc_tensors(sizes)
    fill_random(weights, 0)
    ref = Reference.capture(weights)
    free, _ = torch.cuda.mem_get_info()
    kv_bytes = int(max(0.0, min(a.kv_gib * GiB, free - a.headroom_gib * GiB)))
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = alloc_kv(kv_bytes) if kv_bytes >= 2 << 20 else []
    torch.cuda.synchronize()
    say(f"weights {sum(sizes) / GiB:.2f} GiB in {len(sizes)} tensors, KV cache {kv_bytes / GiB:.2f} GiB")

    def cycle(mode: str, rest: float) -> dict[str, Any]:
        alloc._core.prime_after_release = MODES[mode]
        alloc.sleep(offload_tags=("weights",))
        time.sleep(rest)
        t = time.perf_counter()
        alloc.wake_up()
        torch.cuda.synchronize()
        wake = time.perf_counter() - t
        problem = ref.check(weights)
        if problem:
            raise RuntimeError(f"round trip broken after a {mode} wake: {problem}")
        w = alloc._core.last_wake
        return {"mode": mode, "rest_s": rest, "wake_s": wake, "core_s": w.seconds, "map_s": w.map_seconds,
                "bytes_copied": w.bytes_copied}

    cycle("primed", 0.0)  # unmeasured: the first sleep pins its host memory
    runs = []
    for rep in range(a.reps):
        for rest in (a.rest_s, 0.0):
            for mode in MODES:
                r = cycle(mode, rest)
                runs.append(r)
                say(f"round {rep + 1} {mode} rest {rest:g} s: wake {r['wake_s']:.3f} s, map {r['map_s'] * 1e3:.1f} ms")
    alloc._core.prime_after_release = True
    primes = alloc.stats().primes
    s = summarize(runs, limit)
    say(f"-- level-1 wake, {sum(sizes) / GiB:.2f} GiB of weights beside {kv_bytes / GiB:.2f} GiB of KV cache; "
        f"limit {limit:.1f} GB/s; medians of {a.reps}")
    for line in table(s) + verdicts(s, a.rest_s):
        say(line)
    say(f"primes: {primes.rounds} rounds, longest {primes.longest_seconds * 1e3:.1f} ms, failures {primes.failures}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, "bench_wake_rested.json")
        with open(path, "w") as f:
            json.dump({"limit_gbps": limit, "weights_bytes": sum(sizes), "tensors": len(sizes), "kv_bytes": kv_bytes,
                       "device": torch.cuda.get_device_name(0), "runs": runs, "summary": s,
                       "primes": dataclasses.asdict(primes)}, f, indent=1)
        say(f"wrote {path}")
    del kv
    return 0


if __name__ == "__main__":
    sys.exit(main())
