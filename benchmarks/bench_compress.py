"""Option compress, standalone on one GPU: level-1 sleep and wake of Llama-3-8B-shaped bf16 weights (per-tensor
Gaussians, as benchmarks/probe_compression.py makes them) with compress off / auto / on, against the pinned-copy
limit measured in the same run; and the same shapes filled with random bytes (incompressible). Every round trip
is checked bit-exact against a copy kept on the GPU outside the pools.

Prints a table and the targets of issue 19 (bf16: sleep and wake >= 1.25 x the limit in model bytes per second,
host memory <= 0.75 x the model's bytes; random bytes: auto >= 0.97 x plain), and writes JSON to --out.

    python benchmarks/bench_compress.py --out $OUT            # ~16 GB model, 3 measured cycles per mode
    python benchmarks/bench_compress.py --gb 2 --reps 1       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_compression import make_bf16, weight_mix  # noqa: E402  (same data as the probe)

from vllm_sleep_ext import CuMemAllocator, compress  # noqa: E402

GB = 1e9
MiB = 1 << 20
LLAMA3_8B_BYTES = 16_060_522_496  # 8,030,261,248 bf16 parameters


def pinned_copy_limit(nbytes: int, reps: int) -> dict:
    """D2H and H2D GB/s between pinned host memory and device memory (median of reps, CUDA events)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.fill_(7)

    def rate(fn) -> float:
        out = []
        for _ in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(nbytes / (start.elapsed_time(end) / 1e3) / GB)
        return statistics.median(out[1:])

    d2h = rate(lambda: host.copy_(dev, non_blocking=True))
    h2d = rate(lambda: dev.copy_(host, non_blocking=True))
    del host, dev
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "d2h_gbps": d2h, "h2d_gbps": h2d}


def make_model(alloc: CuMemAllocator, total_bytes: int, dataset: str) -> list[torch.Tensor]:
    """The tensors of an 8B checkpoint in the weights pool, each its own allocation, as vLLM loads them."""
    specs = weight_mix(total_bytes)
    gen = torch.Generator(device="cuda").manual_seed(1)
    tensors = []
    with alloc.use_memory_pool(tag="weights"):
        for spec in specs:
            if dataset == "bf16":
                tensors.append(make_bf16([spec], torch.device("cuda"), seed=len(tensors)))
            else:
                t = torch.empty(spec.numel, dtype=torch.bfloat16, device="cuda")
                t.view(torch.uint8).copy_(torch.randint(0, 256, (spec.numel * 2,), dtype=torch.uint8, device="cuda",
                                                        generator=gen))
                tensors.append(t)
    torch.cuda.synchronize()
    return tensors


def cycle(alloc: CuMemAllocator) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    alloc.sleep(offload_tags=("weights",))
    t1 = time.perf_counter()
    pinned = alloc._core.host_pinned_bytes()  # host memory resident and pinned while asleep
    alloc.wake_up()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    s = alloc.stats()
    return {"sleep_s": t1 - t0, "wake_s": t2 - t1, "sleep": s.last_sleep, "wake": s.last_wake, "pinned": pinned}


def run_dataset(alloc: CuMemAllocator, dataset: str, total: int, modes: list[str], reps: int) -> list[dict]:
    tensors = make_model(alloc, total, dataset)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    reference = [t.clone() for t in tensors]  # outside the pools
    rows = []
    for mode in modes:
        alloc.compress = mode
        alloc.release_host_cache()  # each mode makes its own host memory: what it holds is what it needs
        first = cycle(alloc)  # the first sleep of a mode may prepare host memory
        runs = [cycle(alloc) for _ in range(reps)]
        exact = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(tensors, reference))
        last = runs[-1]
        row = {
            "dataset": dataset, "mode": mode, "model_bytes": model_bytes, "tensors": len(tensors),
            "first_sleep_s": first["sleep_s"],
            "sleep_s": statistics.median(r["sleep_s"] for r in runs),
            "wake_s": statistics.median(r["wake_s"] for r in runs),
            "host_bytes": last["sleep"].compress_stored_bytes if mode != "off" else last["sleep"].bytes_copied,
            "host_pinned_bytes": last["pinned"],
            "pieces_packed": last["sleep"].pieces_packed, "pieces_plain": last["sleep"].pieces_plain,
            "staging_bytes": last["sleep"].staging_device_bytes,
            "wake_staging_bytes": last["wake"].staging_device_bytes,
            "exact": exact,
            "sleep_all_s": [r["sleep_s"] for r in runs], "wake_all_s": [r["wake_s"] for r in runs],
            "parts": parts(runs),
        }
        rows.append(row)
        print(f"  {dataset} {mode}: sleep {row['sleep_s']:.3f} s, wake {row['wake_s']:.3f} s, host "
              f"{row['host_bytes'] / model_bytes:.3f} x, exact {exact}", flush=True)
    del tensors, reference
    torch.cuda.empty_cache()
    return rows


def parts(runs: list[dict]) -> dict:
    """Medians of the allocator's own figures for the measured cycles: where each operation's time went."""
    def med(op: str, field: str) -> float:
        return statistics.median(getattr(r[op], field) for r in runs)

    out = {"sleep_core_s": med("sleep", "seconds"), "sleep_copy_wait_s": med("sleep", "copy_wait_seconds"),
           "sleep_release_s": med("sleep", "release_seconds"), "wake_core_s": med("wake", "seconds"),
           "wake_map_s": med("wake", "map_seconds"), "wake_copy_wait_s": med("wake", "copy_wait_seconds")}
    out["wake_rest_s"] = out["wake_core_s"] - out["wake_map_s"] - out["wake_copy_wait_s"]
    return out


def parts_table(rows: list[dict]) -> list[str]:
    """Where the time goes, by the allocator's own figures (medians): the wake's maps, its wait for the copies
    and decodes at the end, and the rest (setting up staging and the codec, enqueueing)."""
    lines = ["| data | mode | sleep s (core) | waiting for copies s | release s | wake s (core) | maps s | "
             "waiting for copies / decodes s | rest s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r.get("parts")
        if p:
            lines.append(f"| {r['dataset']} | {r['mode']} | {p['sleep_core_s']:.3f} | {p['sleep_copy_wait_s']:.3f} | "
                         f"{p['sleep_release_s']:.3f} | {p['wake_core_s']:.3f} | {p['wake_map_s']:.3f} | "
                         f"{p['wake_copy_wait_s']:.3f} | {p['wake_rest_s']:.3f} |")
    return lines if len(lines) > 2 else []


def report(rows: list[dict], limit: dict) -> tuple[str, list[str]]:
    lines = ["| data | mode | first sleep s | sleep s | sleep GB/s | x limit | wake s | wake GB/s | x limit | "
             "host x model (stored / pinned) | pieces packed / plain | staging MiB sleep / wake | exact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines.append(f"| pinned-copy limit | | | | {limit['d2h_gbps']:.1f} | 1.00 | | {limit['h2d_gbps']:.1f} | 1.00 | "
                 "| | | |")
    for r in rows:
        sg, wg = r["model_bytes"] / r["sleep_s"] / GB, r["model_bytes"] / r["wake_s"] / GB
        r["sleep_x_limit"], r["wake_x_limit"] = sg / limit["d2h_gbps"], wg / limit["h2d_gbps"]
        r["host_x_model"] = r["host_bytes"] / r["model_bytes"]
        r["pinned_x_model"] = r["host_pinned_bytes"] / r["model_bytes"]
        lines.append(f"| {r['dataset']} | {r['mode']} | {r['first_sleep_s']:.3f} | {r['sleep_s']:.3f} | {sg:.1f} | "
                     f"{r['sleep_x_limit']:.2f} | {r['wake_s']:.3f} | {wg:.1f} | {r['wake_x_limit']:.2f} | "
                     f"{r['host_x_model']:.3f} / {r['host_pinned_bytes'] / r['model_bytes']:.3f} | "
                     f"{r['pieces_packed']} / {r['pieces_plain']} | {r['staging_bytes'] / MiB:.0f} / "
                     f"{r['wake_staging_bytes'] / MiB:.0f} | {r['exact']} |")
    verdicts = []
    by = {(r["dataset"], r["mode"]): r for r in rows}
    for mode in ("auto", "on"):
        r = by.get(("bf16", mode))
        if r:
            host = max(r["host_x_model"], r["pinned_x_model"])
            ok = r["sleep_x_limit"] >= 1.25 and r["wake_x_limit"] >= 1.25 and host <= 0.75 and r["exact"]
            verdicts.append(f"bf16 {mode}: sleep {r['sleep_x_limit']:.2f} x, wake {r['wake_x_limit']:.2f} x the limit "
                            f"(target >= 1.25), host {host:.3f} x (stored or pinned, target <= 0.75): "
                            f"{'MET' if ok else 'NOT MET'}")
    plain, auto = by.get(("random", "off")), by.get(("random", "auto"))
    if plain and auto:
        s, w = plain["sleep_s"] / auto["sleep_s"], plain["wake_s"] / auto["wake_s"]
        ok = s >= 0.97 and w >= 0.97 and auto["exact"]
        verdicts.append(f"random auto vs plain: sleep {s:.3f} x, wake {w:.3f} x (target >= 0.97): "
                        f"{'MET' if ok else 'NOT MET'}")
    breakdown = parts_table(rows)
    if breakdown:
        lines += ["", "Where the time goes (the allocator's own figures, medians):", *breakdown]
    return "\n".join(lines), verdicts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=LLAMA3_8B_BYTES / GB, help="model size in GB (default: Llama-3-8B)")
    ap.add_argument("--reps", type=int, default=3, help="measured cycles per mode (after one unmeasured)")
    ap.add_argument("--modes", nargs="+", default=["off", "auto", "on"])
    ap.add_argument("--datasets", nargs="+", default=["bf16", "random"])
    ap.add_argument("--chunk-pieces", type=int, default=None, help="pieces per codec call (default 16)")
    ap.add_argument("--slots", type=int, default=None, help="staging slots on the device (default 3)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_compress: no CUDA GPU", file=sys.stderr)
        return 2
    compress.preload_nvcomp()
    alloc = CuMemAllocator.get_instance()
    why = alloc._core.compress_unavailable()
    if why:
        print(f"bench_compress: compression unavailable: {why}", file=sys.stderr)
        return 2
    if args.chunk_pieces:
        alloc._core.compress_chunk_pieces = args.chunk_pieces
    if args.slots:
        alloc._core.compress_slots = args.slots
    total = int(args.gb * GB) // 2 * 2
    limit = pinned_copy_limit(min(total, 4 << 30), reps=5)
    print(f"pinned-copy limit: D2H {limit['d2h_gbps']:.1f} GB/s, H2D {limit['h2d_gbps']:.1f} GB/s", flush=True)
    rows = []
    for dataset in args.datasets:
        rows += run_dataset(alloc, dataset, total, args.modes, args.reps)
    table, verdicts = report(rows, limit)
    print(table)
    for v in verdicts:
        print(v)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_compress.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "limit": limit, "rows": rows,
         "verdicts": verdicts, "options": {"chunk_pieces": alloc._core.compress_chunk_pieces,
                                           "slots": alloc._core.compress_slots,
                                           "piece_bytes": alloc._core.compress_piece_bytes}}, indent=1))
    (out / "bench_compress.md").write_text(table + "\n\n" + "\n".join(verdicts) + "\n")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
