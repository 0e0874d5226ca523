#!/usr/bin/env python3
"""Sleep/wake benchmark for vllm_sleep_ext, measured side by side with the pinned-copy limit.

The code lives in ``sleepbench/`` (workloads, one adapter per implementation, workers, runner, report,
targets: see its ``__init__``); this file is the command line. Every measurement runs in a fresh
subprocess of this script (``--worker MODE``), because a "first" sleep is the first of a process and
because each peer (torch_memory_saver, vLLM's own allocator) needs a process of its own. Workers print progress lines and one final JSON line; this process collects
them, prints a markdown table with the SPEC targets, and writes ``results.json`` (+ a PNG if
matplotlib imports) to ``--out``.

    python benchmarks/bench_sleep.py                  # full run, ~5 min on an H100 (not yet timed)
    python benchmarks/bench_sleep.py --quick          # small sizes, ~2 min
    python benchmarks/bench_sleep.py --quick --skip load peers   # smoke run, ~1.5 min
    python benchmarks/bench_sleep.py --sizes-gib 1 4 16 --kv-gib 48 --weights-gib 16 --out /tmp/b

Exit status: 0 done (1 with --strict when a target fails), 2 no CUDA / PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleepbench import targets  # noqa: E402
from sleepbench.common import cuda_problem, log, say  # noqa: E402
from sleepbench.report import build_rows, markdown_table, summary, write_outputs  # noqa: E402
from sleepbench.runner import Config, module_importable, run_all  # noqa: E402
from sleepbench.workers import WORKERS, worker_main  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_SIZES_GIB = (0.25, 1.0, 4.0, 16.0)
QUICK_SIZES_GIB = (0.25, 1.0)


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
    ap.add_argument("--l2-cycles", type=int, default=None,
                    help=f"level-2 cycles, each with a pause and without (default {targets.L2_CYCLES}; --quick 3)")
    ap.add_argument("--l2-pause", type=float, default=targets.L2_PAUSE_S,
                    help=f"seconds between level-2 sleep and wake (default {targets.L2_PAUSE_S:g})")
    ap.add_argument("--limit-reps", type=int, default=None, help="pinned copies per size (default 5)")
    ap.add_argument("--load-gib", type=float, default=None,
                    help="load-overhead workload size (default = --weights-gib)")
    ap.add_argument("--load-repeats", type=int, default=None,
                    help="fresh processes per allocator for the load test (default 2)")
    ap.add_argument("--peer-gib", type=float, default=None,
                    help="size for peers (torch_memory_saver, vLLM) (default = largest --sizes-gib)")
    ap.add_argument("--host-gib", type=float, default=None,
                    help="size for host policies and the first sleep after background prepare "
                         "(default = largest --sizes-gib)")
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
        l2_cycles=pick(a.l2_cycles, targets.L2_CYCLES, 3), l2_pause_s=a.l2_pause, limit_reps=pick(a.limit_reps, 5, 3),
        load_gib=a.load_gib if a.load_gib is not None else weights,
        load_repeats=pick(a.load_repeats, 2, 1),
        peer_gib=a.peer_gib if a.peer_gib is not None else max(sizes),
        host_gib=a.host_gib if a.host_gib is not None else max(sizes),
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
