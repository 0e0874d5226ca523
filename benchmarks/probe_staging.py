"""Where does a FIRST sleep's time go? Sweeps the host-staging knobs, one fresh process per point.

Each point: N GiB of weights in the "weights" pool, the process's first sleep(("weights",)), timed,
with the core's own split of the host-preparation time (faulting pages in, pinning them; both summed
over staging threads). Prints a table; compare the GB/s with the pinned-copy limit (bench_sleep.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GiB = 1 << 30


def worker(gib: float, threads: int, piece_mib: int) -> None:
    import torch

    from vllm_sleep_ext import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    core = alloc._core
    core.staging_threads = threads
    core.staging_piece_bytes = piece_mib << 20
    n = int(gib * GiB) // (256 << 20)
    with alloc.use_memory_pool(tag="weights"):
        weights = [torch.full((256 << 20,), i % 251, dtype=torch.uint8, device="cuda") for i in range(n)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    alloc.sleep(offload_tags=("weights",))
    seconds = time.perf_counter() - start
    stats = alloc.stats().last_sleep
    alloc.wake_up()
    ok = all(int(w[::4096].float().mean()) == i % 251 for i, w in enumerate(weights))
    print(json.dumps(dict(threads=threads, piece_mib=piece_mib, gbps=stats.bytes_copied / seconds / 1e9,
                          seconds=seconds, core_seconds=stats.seconds, populate_s=stats.populate_seconds,
                          pin_s=stats.pin_seconds, intact=ok)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--piece-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--worker", nargs=3, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return 0
    print(f"{'threads':>7} {'piece MiB':>9} {'GB/s':>7} {'sleep s':>8} {'populate s*':>11} {'pin s*':>7}  intact")
    for threads in args.threads:
        for piece in args.piece_mib:
            out = subprocess.run([sys.executable, __file__, "--worker", str(args.gib), str(threads), str(piece)],
                                 capture_output=True, text=True, timeout=300)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"{threads:7} {piece:9}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(lines[-1])
            print(f"{threads:7} {piece:9} {r['gbps']:7.1f} {r['seconds']:8.3f} {r['populate_s']:11.3f} "
                  f"{r['pin_s']:7.3f}  {r['intact']}", flush=True)
    print("* summed over staging threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
