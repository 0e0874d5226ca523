"""The first level-1 sleep of a process, right after the weights are loaded, against the pinned-copy limit
measured in the same run (issue 17 item 2, without vLLM).

For each preparation rate (0: full speed, what the vLLM plugin uses until the engine serves; 5e8: the
throttled rate while it serves) and each delay between loading and the sleep, one round: fresh host
memory, weights allocated in the "weights" pool (leaving it starts the background preparation), the
delay, the timed sleep, a wake, and the weights checked. A table at the end.

    python benchmarks/first_sleep.py [--weights-gib 32] [--rates 0 5e8] [--after 0 2 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleepbench.common import GiB, cuda_problem, gbps  # noqa: E402
from sleepbench.impls.limit import worker_limit  # noqa: E402


def one_round(alloc, nbytes: int, rate: int, after_s: float) -> dict:
    import torch

    alloc._core.wait_host()
    alloc.release_host_cache()
    alloc._core.host_prepare_rate = rate
    with alloc.use_memory_pool(tag="weights"):
        weights = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(nbytes >> 30)]
    for i, w in enumerate(weights):
        w.fill_(i % 251)
    torch.cuda.synchronize()
    time.sleep(after_s)
    pinned = alloc._core.host_pinned_bytes()
    t0 = time.perf_counter()
    alloc.sleep(offload_tags=("weights",))
    sleep_s = time.perf_counter() - t0
    alloc.wake_up()
    intact = all(int(w[0]) == i % 251 and int(w[-1]) == i % 251 for i, w in enumerate(weights))
    del weights
    alloc.trim()
    return {"rate": rate, "after_s": after_s, "sleep_s": sleep_s, "pinned_at_sleep": pinned, "intact": intact}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-gib", type=int, default=32)
    parser.add_argument("--rates", type=float, nargs="+", default=[0, 5e8])
    parser.add_argument("--after", type=float, nargs="+", default=[0, 2, 10])
    args = parser.parse_args()
    problem = cuda_problem()
    if problem:
        print(problem)
        return 2
    from vllm_sleep_ext import CuMemAllocator

    limit = worker_limit({"headroom_gib": 4, "sizes_gib": [8], "reps": 5})["sizes"]["8.0"]["d2h_gbps"]
    alloc = CuMemAllocator.get_instance()
    nbytes = args.weights_gib << 30
    rows = [one_round(alloc, nbytes, int(rate), after) for rate in args.rates for after in args.after]
    print(f"\nfirst level-1 sleep of {args.weights_gib} GiB right after loading; pinned-copy limit (D2H, 8 GiB, "
          f"same run) {limit:.1f} GB/s\n")
    print("| preparation rate | sleep after | host ready at the sleep | sleep | GB/s | x limit | data |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    for r in rows:
        rate = "full speed" if r["rate"] == 0 else f"{r['rate'] / 1e9:g} GB/s"
        speed = gbps(nbytes, r["sleep_s"]) or 0
        ok &= r["intact"]
        print(f"| {rate} | {r['after_s']:g} s | {r['pinned_at_sleep'] / GiB:.1f} GiB | {r['sleep_s']:.3f} s | "
              f"{speed:.1f} | {speed / limit:.2f} | {'intact' if r['intact'] else 'CHANGED'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
