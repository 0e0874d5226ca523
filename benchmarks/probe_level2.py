"""Where does a level-2 sleep + wake's time go? Splits it into the core's part and the Python layer's.

One process: model-like weights (large matrices and thousands of small tensors, held as parameters,
with registered buffers) and a KV cache, then level-2 cycles with and without a pause between sleep
and wake; the core's driver time by call; the Python layer's parts one by one; and, in the same run for
the same handles, the driver's floor (benchmarks/vmm_floor.py: cuMemUnmap + cuMemRelease, then
cuMemCreate + cuMemMap + cuMemSetAccess, nothing else), measured while the pools sleep at level 2.
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
    holder = bench.as_parameters(weights)  # noqa: F841 - the weights are parameters, as in a model
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

    from vllm_sleep_ext import allocator as allocator_module
    from vllm_sleep_ext import preserve

    print(f"{'pause s':>7} {'sleep ms':>9} {'(core)':>7} {'wake w ms':>9} {'(core)':>7} {'wake kv ms':>10} "
          f"{'(core)':>7} {'total ms':>9}")
    print("        core parts (ms), sleep: sync / unmap / release; wake weights: map / copy wait; wake kv: map")
    for pause in (1.0, 0.0, 1.0):
        rows, parts = [], []
        for _ in range(args.cycles):
            s = timed(lambda: alloc.sleep(offload_tags=()))
            sc = alloc.stats().last_sleep
            time.sleep(pause)
            w = timed(lambda: alloc.wake_up(["weights"]))
            wc = alloc.stats().last_wake
            k = timed(lambda: alloc.wake_up(["kv_cache"]))
            kc = alloc.stats().last_wake
            rows.append((s, sc.seconds, w, wc.seconds, k, kc.seconds))
            parts.append((sc.sync_seconds, sc.unmap_seconds, sc.release_seconds, wc.map_seconds,
                          wc.copy_wait_seconds, kc.map_seconds))
        med = [statistics.median(col) * 1e3 for col in zip(*rows)]
        mp = [statistics.median(col) * 1e3 for col in zip(*parts)]
        print(f"{pause:7.1f} {med[0]:9.1f} {med[1]:7.1f} {med[2]:9.1f} {med[3]:7.1f} {med[4]:10.1f} {med[5]:7.1f} "
              f"{med[0] + med[2] + med[4]:9.1f}", flush=True)
        print(f"        sleep {mp[0]:.1f} / {mp[1]:.1f} / {mp[2]:.1f}; wake weights {mp[3]:.1f} / {mp[4]:.1f}; "
              f"wake kv {mp[5]:.1f}", flush=True)
    # The Python layer's parts of a level-2 sleep, each on its own (median of 5, ms).
    params = list(preserve.registry.parameters())
    python_parts = {
        "trim (empty_cache)": lambda: alloc.trim(),
        "core.allocations()": lambda: alloc._core.allocations(),
        "registry.parameters()": lambda: list(preserve.registry.parameters()),
        "parameter_spans": lambda: preserve.parameter_spans(params),
        "memory_snapshot": allocator_module._memory_snapshot,
        "_live_ranges": lambda: alloc._live_ranges({a.ptr: a.size for a in alloc._core.allocations()
                                                    if a.state == "mapped" and a.tag == "weights"}),
        "_preserved_ranges(())": lambda: alloc._preserved_ranges(()),
    }
    print(f"python parts ({len(params)} parameters):")
    for name, fn in python_parts.items():
        times = [timed(fn) * 1e3 for _ in range(5)]
        print(f"  {name:24} {statistics.median(times):7.2f} ms", flush=True)
    import vmm_floor

    sizes = vmm_floor.handle_sizes([a.size for a in alloc._core.allocations()], int(alloc._core.slab_bytes))
    alloc.sleep(offload_tags=())
    floor = vmm_floor.floor(sizes, pause_s=1.0)
    alloc.wake_up(["weights"])
    alloc.wake_up(["kv_cache"])
    print(f"driver floor, same handles ({floor['handles']}, {floor['bytes'] / GiB:.1f} GiB), 1 s pause: release "
          f"{floor['release_s'] * 1e3:.1f} ms, create + map + access {floor['create_map_s'] * 1e3:.1f} ms, total "
          f"{floor['total_s'] * 1e3:.1f} ms (compare with the 1 s pause row's total above)", flush=True)
    intact = all(torch.equal(b.cpu(), r) for b, r in zip(bench.module_buffers(mods), reference))
    print("buffers intact after all cycles" if intact else "BUFFERS CHANGED")
    del weights, kv
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
