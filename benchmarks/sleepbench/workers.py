"""What one measurement process does (``bench_sleep.py --worker MODE --worker-args JSON``).

A worker measures, checks that the data survived, and prints one JSON line (``RESULT_PREFIX``) for
the parent; a round trip that broke the data reports an error, never a speed.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

from .common import (GiB, MiB, clamp_bytes, cuda_problem, gbps, lazyfree_bytes, mem_free, round_up, say, sync, timed,
                     torch)
from .impls import make_impl
from .impls.ext import ExtImpl, ext_backed_up_bytes, ext_stats, get_ext_allocator
from .impls.limit import worker_limit
from .impls.tms import TmsImpl
from .workloads import (Reference, alloc_kv, alloc_tensors, as_parameters, buffers_mismatch, fill_random,
                        make_buffer_modules, model_like_sizes, module_buffers)

RESULT_PREFIX = "@@BENCH_RESULT@@ "


class RoundTripBroken(RuntimeError):
    """Data did not survive sleep/wake; no speed is reported for such a run."""


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
    mods.append(as_parameters(weights))  # the weights are parameters, as in a model
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = alloc_kv(kv_bytes)
    fill_random(weights, p["seed"])
    for t in kv:
        t.fill_(1)
    buf_ref = [b.clone() for b in module_buffers(mods)]
    res: dict = {"weights_bytes": w_bytes, "kv_bytes": kv_bytes, "requested_weights_bytes": w_req,
                 "requested_kv_bytes": kv_req, "clamped": (w_bytes, kv_bytes) != (w_req, kv_req),
                 "buffer_bytes": sum(b.nbytes for b in buf_ref), "cycles": []}
    say(f"  level-2 workload: weights {w_bytes / GiB:.2f} GiB + kv {kv_bytes / GiB:.2f} GiB, "
        f"{len(buf_ref)} buffers ({res['buffer_bytes'] / MiB:.1f} MiB)")
    # The judged figure: cycles with a pause between sleep and wake (the trainer runs in between);
    # then the same cycles back to back.
    pause = float(p.get("pause_s", 0.0))
    for key, pause_s in (("cycles", pause), ("cycles_no_pause", 0.0)):
        if key == "cycles_no_pause" and not pause:
            break  # the judged cycles had no pause already
        res[key] = []
        say(f"  level-2 cycles, {pause_s:g} s between sleep and wake:")
        for i in range(p["cycles"]):
            rec = _level2_cycle(alloc, pause_s)
            problem = buffers_mismatch(mods, buf_ref)
            rec["buffers_intact"] = problem is None
            res[key].append(rec)
            say(f"    cycle #{i + 1}: sleep {rec['sleep_ms']:.2f} ms, wake weights "
                f"{rec['wake_weights_ms']:.2f} ms, wake kv {rec['wake_kv_ms']:.2f} ms, "
                f"sum {rec['total_ms']:.2f} ms, returned {rec['returned_pct']:.3f}%, "
                f"buffers {'intact' if problem is None else 'BROKEN: ' + problem}")
            for t in kv:
                t.fill_(1)  # the engine writes its KV cache again after wake
    res["pause_s"] = pause
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


def _level2_cycle(alloc: Any, pause_s: float) -> dict:
    sync()
    pool = int(alloc.get_current_usage())
    torch.cuda.empty_cache()  # so "memory returned" counts only what the sleep itself released
    free_before = mem_free()
    sleep_s = timed(lambda: alloc.sleep(offload_tags=()))
    free_after = mem_free()
    st = ext_stats(alloc)
    if pause_s:
        time.sleep(pause_s)
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


# Host policies measured, as (host_policy, reclaimable_pinned_share) by name.
HOST_POLICY_SETTINGS = {"pinned": ("pinned", 0.0), "reclaimable": ("reclaimable", 0.0),
                        "reclaimable-half-pinned": ("reclaimable", 0.5), "release": ("release", 0.0)}
HOST_POLICIES = tuple(HOST_POLICY_SETTINGS)


def serving_probe(seconds: float) -> float:
    """Steps per second of a serving-like loop: per step a 2048x2048 bf16 matmul and a 1 MiB copy from
    pageable host memory (a decode step's inputs), synchronized every 10 steps."""
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    host = torch.ones(MiB, dtype=torch.uint8)
    dev = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    steps = 0
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
            dev.copy_(host)
        sync()
        steps += 10
    return steps / (time.perf_counter() - t0)


def worker_host(p: dict) -> dict:
    """This project only: the first level-1 sleep after host memory was prepared in the background
    (started by leaving the weights pool), then warm cycles under each host policy, with the host
    memory held (and pinned) while awake."""
    impl = ExtImpl(prepare_host=True)
    core = impl.alloc._core
    nbytes = clamp_bytes(int(p["size_gib"] * GiB), int(p["headroom_gib"] * GiB), f"host {p['size_gib']:g} GiB",
                         host_too=True)
    sizes = model_like_sizes(nbytes, p["seed"])
    serving_probe(0.2)  # warm-up (cuBLAS, pageable copies)
    serving_before = serving_probe(0.5)
    t0 = time.perf_counter()
    with impl.region("weights"):
        tensors = alloc_tensors(sizes)
    started = time.perf_counter()  # leaving the pool started the background prepare
    serving_during = serving_probe(0.5)
    overlapped = core.host_pinned_bytes() < sum(sizes)  # still preparing when the probe ended
    fill_random(tensors, p["seed"])
    ref = Reference.capture(tensors)
    sync()
    waited = time.perf_counter()
    core.wait_host()  # serving would go on meanwhile; here the first sleep simply comes after it
    done = time.perf_counter()
    pool = impl.pool_bytes(sum(sizes))
    res: dict = {"impl": impl.name, "size_gib": p["size_gib"], "tensor_bytes": sum(sizes), "pool_bytes": pool,
                 "n_tensors": len(sizes), "prepare_s": done - started, "prepare_wait_s": done - waited,
                 "load_s": started - t0, "prepare_error": core.host_error(),
                 "prepared_pinned_bytes": core.host_pinned_bytes(), "prepare_rate": core.host_prepare_rate,
                 "serving_steps_per_s_before": serving_before, "serving_steps_per_s_during": serving_during,
                 "serving_probe_overlapped": overlapped}
    say(f"  background prepare of {pool / GiB:.2f} GiB: done {res['prepare_s']:.2f} s after the weights pool "
        f"closed ({res['prepared_pinned_bytes'] / GiB:.2f} GiB pinned){'; ' + res['prepare_error'] if res['prepare_error'] else ''}")
    res["first_sleep"], res["first_wake"] = _cycle(impl, tensors, ref, pool, pool)
    backed = res["first_sleep"]["bytes"]
    say(f"    first sleep after prepare {_fmt(res['first_sleep'])} | wake {_fmt(res['first_wake'])}")
    res["policies"] = {}
    for policy in HOST_POLICIES:
        impl.alloc.host_policy, impl.alloc.reclaimable_pinned_share = HOST_POLICY_SETTINGS[policy]
        impl.alloc.release_host_cache()
        _cycle(impl, tensors, ref, backed, pool)  # not measured: leaves what this policy keeps
        core.wait_host()
        sleeps, wakes, awake = [], [], []
        for i in range(p["cycles"]):
            s, w = _cycle(impl, tensors, ref, backed, pool)
            core.wait_host()  # the unpinning after a wake runs while serving, not in the wake
            awake.append({"host_bytes": core.host_bytes(), "pinned_bytes": core.host_pinned_bytes(),
                          "lazyfree_bytes": lazyfree_bytes()})
            sleeps.append(s)
            wakes.append(w)
            say(f"    {policy} #{i + 1} sleep {_fmt(s)} | wake {_fmt(w)} | awake: host "
                f"{awake[-1]['host_bytes'] / GiB:.2f} GiB, pinned {awake[-1]['pinned_bytes'] / GiB:.2f} GiB")
        res["policies"][policy] = {"sleep": sleeps, "wake": wakes, "awake": awake}
    impl.alloc.host_policy = "pinned"
    impl.alloc.reclaimable_pinned_share = 0.0
    res["verified"] = True
    return res


WORKERS: dict[str, Callable[[dict], dict]] = {
    "limit": worker_limit, "level1": worker_level1, "level2": worker_level2, "load": worker_load,
    "host": worker_host,
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
