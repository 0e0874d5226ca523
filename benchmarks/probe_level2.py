"""Where does a level-2 sleep + wake's time go? Splits it into the core's part and the Python layer's.

One process: model-like weights (large matrices and thousands of small tensors, with registered
buffers) and a KV cache, then level-2 cycles at each thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleepbench import workloads as bench  # noqa: E402

GiB = 1 << 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights-gib", type=float, default=16)
    parser.add_argument("--kv-gib", type=float, default=48)
    parser.add_argument("--cycles", type=int, default=4)
    args = parser.parse_args()

    import torch

    from vllm_sleep_ext import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    with alloc.use_memory_pool(tag="weights"):
        weights = bench.alloc_tensors(bench.model_like_sizes(int(args.weights_gib * GiB), seed=0))
        mods = bench.make_buffer_modules(8)
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = bench.alloc_kv(int(args.kv_gib * GiB))
    torch.cuda.synchronize()
    reference = [b.cpu() for b in bench.module_buffers(mods)]
    print(f"{len(alloc.pointer_to_data)} allocations, {alloc.get_current_usage() / GiB:.1f} GiB "
          f"({len(weights)} weight tensors, {len(kv)} kv tensors)")

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    print(f"{'round':>7} {'sleep ms':>9} {'(core)':>7} {'wake w ms':>9} {'(core)':>7} {'wake kv ms':>10} "
          f"{'total ms':>9}   python parts (ms): trim / ranges / empty_cache")
    for round_ in range(2):
        rows = []
        for _ in range(args.cycles):
            s = timed(lambda: alloc.sleep(offload_tags=()))
            s_core = alloc.stats().last_sleep.seconds
            w = timed(lambda: alloc.wake_up(["weights"]))
            w_core = alloc.stats().last_wake.seconds
            k = timed(lambda: alloc.wake_up(["kv_cache"]))
            rows.append((s, s_core, w, w_core, k))
        med = [statistics.median(col) * 1e3 for col in zip(*rows)]
        trim = timed(lambda: alloc.trim()) * 1e3
        ranges = timed(alloc._preserved_ranges) * 1e3
        empty = timed(torch.cuda.empty_cache) * 1e3
        print(f"{round_:7} {med[0]:9.1f} {med[1]:7.1f} {med[2]:9.1f} {med[3]:7.1f} {med[4]:10.1f} "
              f"{med[0] + med[2] + med[4]:9.1f}   {trim:.2f} / {ranges:.2f} / {empty:.2f}", flush=True)
    intact = all(torch.equal(b.cpu(), r) for b, r in zip(bench.module_buffers(mods), reference))
    print("buffers intact after all cycles" if intact else "BUFFERS CHANGED")
    del weights, kv
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
