"""Issue 18 section 2's benchmark: level-1 sleep and wake of an 8B-shaped model (~16 GB of bf16 weights)
with about half of the backups beyond the host memory limit, on disk (Note [Disk tier], csrc/disk_tier.h).

In one run, on one GPU: the pinned-copy limit (D2H and H2D of --limit-gib GiB through one pinned buffer,
64 MiB copies), the disk's own sequential direct write and read limit for the same bytes the tier writes
(benchmarks/probe_disk.py), then --cycles level-1 sleep/wake cycles through CuMemAllocator with
host_memory_limit at --host-share of the weights and disk_dir at --dir (the first cycle also makes the host
backup memory ready). Between sleep and wake the freed device memory is overwritten; after each wake the
weights are checked against checksums taken before.

Per cycle and direction: the whole operation's time and rate; the disk part (bytes, seconds, GB/s; from the
core's stats: first chunk to last, device copies included) against the probe (target >= 0.9 x); and the
whole operation against its floor (host part at the pinned-copy limit + disk part at the probe's rate, one
after the other, as the tier runs them). A table on stdout, a DISKTIER summary line, JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_disk  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TARGET = 0.9

# Llama-3-8B: hidden 4096, 32 layers, 8 KV heads of 128, MLP 14336, vocabulary 128256; bf16.
HIDDEN, LAYERS, KV, MLP, VOCAB = 4096, 32, 1024, 14336, 128256


def model_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(VOCAB, HIDDEN)]
    for _ in range(LAYERS):
        shapes += [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                   (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP), (HIDDEN,), (HIDDEN,)]
    shapes += [(HIDDEN,), (VOCAB, HIDDEN)]
    return shapes


def pinned_limit(nbytes: int) -> tuple[float, float]:
    """GB/s of D2H and H2D through one pinned buffer, in 64 MiB copies (median of 3)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    step = 64 * MiB

    def rate(to_host: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for o in range(0, nbytes, step):
            n = min(step, nbytes - o)
            if to_host:
                host[o:o + n].copy_(dev[o:o + n], non_blocking=True)
            else:
                dev[o:o + n].copy_(host[o:o + n], non_blocking=True)
        end.record()
        end.synchronize()
        return nbytes / (start.elapsed_time(end) / 1e3) / 1e9

    rates = [(rate(True), rate(False)) for _ in range(4)][1:]
    del dev, host
    torch.cuda.empty_cache()
    return sorted(r[0] for r in rates)[1], sorted(r[1] for r in rates)[1]


def checksums(tensors: list[torch.Tensor]) -> list[int]:
    return [int(t.view(torch.int16).sum(dtype=torch.int64)) for t in tensors]


def overwrite_free_memory() -> None:
    free, _ = torch.cuda.mem_get_info()
    n = max(0, free - 2 * GiB)
    if n:
        t = torch.empty(n, dtype=torch.uint8, device="cuda")
        t.fill_(0xFF)
        torch.cuda.synchronize()
        del t
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Op:
    cycle: int
    op: str
    seconds: float
    bytes: int
    disk_bytes: int
    disk_seconds: float
    disk_gbps: float
    disk_limit_gbps: float
    disk_ratio: float
    floor_seconds: float
    floor_ratio: float  # floor / seconds: 1.0 means at the floor
    # The allocator's own figures, where the time went: the whole operation in the core, its driver maps
    # (wake) or releases (sleep), and its waits for the device copies.
    core_seconds: float = 0.0
    driver_seconds: float = 0.0
    copy_wait_seconds: float = 0.0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.environ.get("VSE_DISK_DIR", "/tmp"))
    p.add_argument("--host-share", type=float, default=0.5, help="host memory limit as a share of the weights")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--threads", type=int, default=4, help="disk threads (the tier's and the probe's)")
    p.add_argument("--limit-gib", type=float, default=2.0, help="bytes the pinned-copy limit is measured on")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)

    from vllm_sleep_ext import CuMemAllocator

    d2h_limit, h2d_limit = pinned_limit(int(args.limit_gib * GiB))
    print(f"pinned-copy limit: D2H {d2h_limit:.1f} GB/s, H2D {h2d_limit:.1f} GB/s", flush=True)

    alloc = CuMemAllocator.get_instance()
    shapes = model_shapes()
    with alloc.use_memory_pool("weights"):
        weights = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in weights:
        t.normal_(generator=g)
    torch.cuda.synchronize()
    total = sum(t.numel() * 2 for t in weights)
    want = checksums(weights)
    host_limit = int(total * args.host_share)
    disk_dir = tempfile.mkdtemp(prefix="vse-bench-disk-", dir=args.dir)
    alloc.host_memory_limit = host_limit
    alloc.disk_dir = disk_dir
    alloc.disk_threads = args.threads
    print(f"weights {total / GiB:.2f} GiB in {len(weights)} tensors; host limit {host_limit / GiB:.2f} GiB; "
          f"disk dir {disk_dir}", flush=True)

    ops: list[Op] = []
    probe: Optional[probe_disk.DiskRates] = None
    ok = True
    for cycle in range(args.cycles):
        torch.cuda.synchronize()
        start = time.perf_counter()
        alloc.sleep(offload_tags=("weights",))
        sleep_s = time.perf_counter() - start
        s = alloc.stats().last_sleep
        if s.disk_bytes == 0:
            raise SystemExit(f"nothing went to disk (host limit {host_limit} of {total} bytes): nothing to measure")
        if probe is None:  # the same bytes as the tier writes, while the weights sleep (device memory free)
            probe = probe_disk.measure(args.dir, s.disk_bytes, args.threads)
            print(probe_disk.table(probe), flush=True)
        overwrite_free_memory()
        start = time.perf_counter()
        alloc.wake_up()
        torch.cuda.synchronize()
        wake_s = time.perf_counter() - start
        w = alloc.stats().last_wake
        good = checksums(weights) == want
        ok &= good
        for name, stats, secs, pinned, disk_limit in (("sleep", s, sleep_s, d2h_limit, probe.write_gbps),
                                                        ("wake", w, wake_s, h2d_limit, probe.read_gbps)):
            disk_gbps = stats.disk_bytes / max(stats.disk_seconds, 1e-9) / 1e9
            floor = (stats.bytes_copied - stats.disk_bytes) / (pinned * 1e9) + stats.disk_bytes / (disk_limit * 1e9)
            driver = stats.map_seconds if name == "wake" else stats.release_seconds
            ops.append(Op(cycle, name, secs, stats.bytes_copied, stats.disk_bytes, stats.disk_seconds, disk_gbps,
                          disk_limit, disk_gbps / disk_limit, floor, floor / secs, stats.seconds, driver,
                          stats.copy_wait_seconds))
        print(f"cycle {cycle}: sleep {sleep_s:.3f} s, wake {wake_s:.3f} s, data {'intact' if good else 'CORRUPT'}",
              flush=True)
    alloc.host_memory_limit = 0
    alloc.disk_dir = ""
    os.rmdir(disk_dir)

    print()
    print(f"disk tier: {total / GiB:.2f} GiB of weights, {ops[0].disk_bytes / GiB:.2f} GiB on disk; "
          f"pinned-copy limit D2H {d2h_limit:.1f} / H2D {h2d_limit:.1f} GB/s; disk probe write "
          f"{probe.write_gbps:.2f} / read {probe.read_gbps:.2f} GB/s ({'O_DIRECT' if probe.direct else 'buffered'})")
    print("| cycle | op | seconds | GB/s | on disk GiB | disk s | disk GB/s | disk limit | x limit | floor s | "
          "x floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in ops:
        print(f"| {o.cycle} | {o.op} | {o.seconds:.3f} | {o.bytes / o.seconds / 1e9:.1f} | {o.disk_bytes / GiB:.2f} | "
              f"{o.disk_seconds:.3f} | {o.disk_gbps:.2f} | {o.disk_limit_gbps:.2f} | {o.disk_ratio:.2f} | "
              f"{o.floor_seconds:.3f} | {o.floor_ratio:.2f} |")
    print()
    print("Where the time goes (the allocator's own figures): | cycle | op | core s | disk s | driver maps (wake) or "
          "releases (sleep) s | waiting for device copies s | rest s |")
    for o in ops:
        rest = o.core_seconds - o.disk_seconds - o.driver_seconds - o.copy_wait_seconds
        print(f"| {o.cycle} | {o.op} | {o.core_seconds:.3f} | {o.disk_seconds:.3f} | {o.driver_seconds:.3f} | "
              f"{o.copy_wait_seconds:.3f} | {rest:.3f} |")
    warm = [o for o in ops if o.cycle == ops[-1].cycle]
    passed = ok and all(o.disk_ratio >= TARGET for o in warm)
    print(f"DISKTIER {'PASS' if passed else 'FAIL'}: last cycle disk part sleep "
          f"{warm[0].disk_ratio:.2f} x / wake {warm[1].disk_ratio:.2f} x the disk's own rate (target >= {TARGET}); "
          f"data {'intact' if ok else 'CORRUPT'}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_disk_tier.json"), "w") as f:
            json.dump({"weights_bytes": total, "host_limit": host_limit, "pinned_d2h_gbps": d2h_limit,
                       "pinned_h2d_gbps": h2d_limit, "probe": dataclasses.asdict(probe),
                       "ops": [dataclasses.asdict(o) for o in ops], "data_intact": ok, "pass": passed}, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
