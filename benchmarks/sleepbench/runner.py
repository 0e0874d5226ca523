"""The parent process: runs each measurement in a fresh worker process and collects the results.

Fresh processes because a "first" sleep is the first of a process and because each peer
(torch_memory_saver, vLLM's own allocator) needs a process of its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from .common import log, median
from .impls.tms import tms_preload_env
from .workers import RESULT_PREFIX

SCRIPT = Path(__file__).resolve().parent.parent / "bench_sleep.py"


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
    l2_pause_s: float
    limit_reps: int
    load_gib: float
    load_repeats: int
    peer_gib: Optional[float]
    host_gib: float
    headroom_gib: float
    seed: int
    skip: set[str]
    timeout: float
    out: Path


def run_all(cfg: Config) -> dict:
    res: dict = {"config": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path)
                                else v) for k, v in dataclasses.asdict(cfg).items()}}
    common = {"headroom_gib": cfg.headroom_gib, "seed": cfg.seed}
    all_sizes = sorted(set(cfg.sizes_gib) | ({cfg.peer_gib} if cfg.peer_gib else set())
                       | ({cfg.host_gib} if "host" not in cfg.skip else set()))
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
    if "host" not in cfg.skip:
        log(f"host policies and first sleep after background prepare, vllm_sleep_ext, {cfg.host_gib:g} GiB")
        res["host"] = run_worker("host", {**common, "size_gib": cfg.host_gib, "cycles": cfg.cycles},
                                 cfg.timeout)
    if "level2" not in cfg.skip:
        log(f"level 2: weights {cfg.weights_gib:g} GiB + kv {cfg.kv_gib:g} GiB, {cfg.l2_cycles} cycles with a "
            f"{cfg.l2_pause_s:g} s pause, then {cfg.l2_cycles} without")
        res["level2"] = run_worker("level2", {**common, "weights_gib": cfg.weights_gib,
                                              "kv_gib": cfg.kv_gib, "cycles": cfg.l2_cycles,
                                              "pause_s": cfg.l2_pause_s, "n_modules": 8}, cfg.timeout)
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
