"""Issue 18's probe: how fast do device-to-host and host-to-device copies go when both run at once, and
what is the shortest a swap of two models (one put to sleep, one woken) can take on this card?

On one GPU, with pinned host buffers, N GiB (--gib, default 8) device to host alone, host to device alone,
and both at once on two streams (the same bytes each way), each run cut into --chunk-mib copies with a
timing event after each, all queued behind a short GPU spin so that both streams start together; a
warm-up, then the median of --reps runs, the three kinds interleaved. From the events of a run of both:
each direction's rate while the other one still ran (the concurrent rates), and when each finished.

The duplex floor of a swap of A bytes out (a sleep) and B bytes in (a wake): both directions at their
concurrent rates until the shorter one is done, then the rest of the longer one alone. It is never more
than the larger of A / D2H-concurrent and B / H2D-concurrent (equal to it for equal sizes and rates), and
for N each way it is what the run of both measures. tests/vllm_gpu/swap.py reads the rates from the JSON
(--out DIR: probe_duplex.json) and judges a swap of two vLLM engines against the floor of its own bytes.

A table on stdout, a DUPLEX summary line, JSON to --out. --device cpu is a dry run of the logic (two
threads copying host tensors; tests/test_probe_duplex_cpu.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

MiB = 1 << 20
GiB = 1 << 30
GATE_CYCLES = 50_000_000  # GPU spin before the start event: ~25 ms at 2 GHz, far longer than queuing the copies
DIRECTIONS = ("d2h", "h2d")


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- arithmetic: rates from a run's chunk events, the floor of a swap ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rates:
    """GB/s (1e9 bytes per second) of each direction alone and while the other one runs too."""
    d2h_alone: float
    h2d_alone: float
    d2h_both: float
    h2d_both: float

    def __post_init__(self):
        bad = [f"{k}={v!r}" for k, v in dataclasses.asdict(self).items() if not (isinstance(v, (int, float)) and v > 0)]
        if bad:
            raise ValueError(f"Rates must be positive GB/s, got {', '.join(bad)}")

    @classmethod
    def from_json(cls, path: str) -> "Rates":
        """The rates a probe_duplex.json holds (its summary's "rates_gbps")."""
        with open(path) as f:
            data = json.load(f)
        rates = data.get("summary", {}).get("rates_gbps") if isinstance(data, dict) else None
        if not isinstance(rates, dict):
            raise ValueError(f"{path}: no summary.rates_gbps (not a probe_duplex.json?)")
        return cls(**rates)


def duplex_floor_seconds(out_bytes: float, in_bytes: float, rates: Rates) -> float:
    """Shortest time to copy out_bytes device to host and in_bytes host to device: both at their
    concurrent rates until the shorter is done, then the rest of the longer alone."""
    if out_bytes < 0 or in_bytes < 0:
        raise ValueError(f"bytes must be >= 0, got out {out_bytes}, in {in_bytes}")
    t_out, t_in = out_bytes / (rates.d2h_both * 1e9), in_bytes / (rates.h2d_both * 1e9)
    both = min(t_out, t_in)
    if t_out > t_in:
        return both + (out_bytes - both * rates.d2h_both * 1e9) / (rates.d2h_alone * 1e9)
    return both + (in_bytes - both * rates.h2d_both * 1e9) / (rates.h2d_alone * 1e9)


def concurrent_max_seconds(out_bytes: float, in_bytes: float, rates: Rates) -> float:
    """The larger of the two directions' times at their concurrent rates (the floor's upper bound)."""
    return max(out_bytes / (rates.d2h_both * 1e9), in_bytes / (rates.h2d_both * 1e9))


def sequential_seconds(out_bytes: float, in_bytes: float, rates: Rates) -> float:
    """One direction after the other, each alone."""
    return out_bytes / (rates.d2h_alone * 1e9) + in_bytes / (rates.h2d_alone * 1e9)


def bytes_done_by(ends: Sequence[float], sizes: Sequence[int], t: float) -> float:
    """Bytes a direction had copied by time t, from its chunks' end times (chunk i runs from the end of
    chunk i-1, or 0, to ends[i], at an even pace)."""
    if len(ends) != len(sizes):
        raise ValueError(f"{len(ends)} end times for {len(sizes)} chunks")
    done, start = 0.0, 0.0
    for end, size in zip(ends, sizes):
        if t >= end:
            done += size
        else:
            if t > start and end > start:
                done += size * (t - start) / (end - start)
            break
        start = end
    return done


def run_rates(run: dict[str, list[float]], sizes: Sequence[int]) -> dict[str, Any]:
    """One run's figures: per direction its seconds and GB/s; for a run of both, each direction's rate
    while the other still ran (until the first one finished), the total and the overlap's length."""
    total = sum(sizes)
    out: dict[str, Any] = {d: {"seconds": ends[-1], "gbps": total / ends[-1] / 1e9} for d, ends in run.items()}
    if len(run) == 2:
        overlap = min(ends[-1] for ends in run.values())
        for d, ends in run.items():
            out[d]["concurrent_gbps"] = bytes_done_by(ends, sizes, overlap) / overlap / 1e9
        out["overlap_s"] = overlap
        out["seconds"] = max(ends[-1] for ends in run.values())
        out["total_gbps"] = 2 * total / out["seconds"] / 1e9
    return out


def summarize(runs: dict[str, list[dict[str, list[float]]]], sizes: Sequence[int]) -> dict[str, Any]:
    """Medians over the measured runs of each kind ("d2h", "h2d", "both"), and the Rates they give."""
    med = statistics.median
    per = {kind: [run_rates(r, sizes) for r in rs] for kind, rs in runs.items()}
    alone = {d: {"seconds": med(r[d]["seconds"] for r in per[d]), "gbps": med(r[d]["gbps"] for r in per[d]),
                 "gbps_all": [r[d]["gbps"] for r in per[d]]} for d in DIRECTIONS}
    both = {"seconds": med(r["seconds"] for r in per["both"]), "overlap_s": med(r["overlap_s"] for r in per["both"]),
            "total_gbps": med(r["total_gbps"] for r in per["both"]), "seconds_all": [r["seconds"] for r in per["both"]]}
    for d in DIRECTIONS:
        both[d] = {"seconds": med(r[d]["seconds"] for r in per["both"]),
                   "concurrent_gbps": med(r[d]["concurrent_gbps"] for r in per["both"])}
    rates = Rates(d2h_alone=alone["d2h"]["gbps"], h2d_alone=alone["h2d"]["gbps"],
                  d2h_both=both["d2h"]["concurrent_gbps"], h2d_both=both["h2d"]["concurrent_gbps"])
    n = sum(sizes)
    longer_alone = max(alone[d]["seconds"] for d in DIRECTIONS)
    return {"alone": alone, "both": both, "rates_gbps": dataclasses.asdict(rates),
            "both_over_longer_alone": both["seconds"] / longer_alone,
            "both_over_sum_alone": both["seconds"] / sum(alone[d]["seconds"] for d in DIRECTIONS),
            "model_over_measured": duplex_floor_seconds(n, n, rates) / both["seconds"]}


def swap_row(out_bytes: float, in_bytes: float, rates: Rates) -> dict[str, float]:
    floor, seq = duplex_floor_seconds(out_bytes, in_bytes, rates), sequential_seconds(out_bytes, in_bytes, rates)
    return {"out_bytes": out_bytes, "in_bytes": in_bytes, "floor_s": floor, "sequential_s": seq,
            "concurrent_max_s": concurrent_max_seconds(out_bytes, in_bytes, rates), "floor_over_sequential": floor / seq}


def chunk_sizes(nbytes: int, chunk: int) -> list[int]:
    if nbytes <= 0 or chunk <= 0:
        raise ValueError(f"bytes and chunk must be positive, got {nbytes}, {chunk}")
    return [chunk] * (nbytes // chunk) + ([nbytes % chunk] if nbytes % chunk else [])


# ---- the copies -------------------------------------------------------------------------------------------


def copy_run_cuda(jobs: dict[str, tuple[Any, Any]], sizes: Sequence[int], streams: dict[str, Any]) -> dict[str, list[float]]:
    """Each job's chunked copy on its own stream, all held behind a GPU spin and one start event; each chunk's
    end (seconds since the start event, CUDA events)."""
    import torch

    timing = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    torch.cuda.synchronize()
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(GATE_CYCLES)
    start = timing()
    start.record()
    ends: dict[str, list[Any]] = {}
    for name, (dst, src) in jobs.items():
        stream = streams[name]
        stream.wait_event(start)
        with torch.cuda.stream(stream):
            off = 0
            for size in sizes:
                dst[off:off + size].copy_(src[off:off + size], non_blocking=True)
                off += size
                ends.setdefault(name, []).append(timing())
                ends[name][-1].record(stream)
    torch.cuda.synchronize()
    return {name: [start.elapsed_time(e) / 1e3 for e in evs] for name, evs in ends.items()}


def copy_run_cpu(jobs: dict[str, tuple[Any, Any]], sizes: Sequence[int], streams: Any = None) -> dict[str, list[float]]:
    """The dry run's stand-in: each job on its own thread, started together, host clock."""
    t0: list[float] = []
    barrier = threading.Barrier(len(jobs), action=lambda: t0.append(time.perf_counter()))
    ends: dict[str, list[float]] = {name: [] for name in jobs}

    def work(name: str, dst: Any, src: Any) -> None:
        barrier.wait()
        off = 0
        for size in sizes:
            dst[off:off + size].copy_(src[off:off + size])
            off += size
            ends[name].append(time.perf_counter())

    threads = [threading.Thread(target=work, args=(name, *bufs)) for name, bufs in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: [e - t0[0] for e in es] for name, es in ends.items()}


def fitting_bytes(want: int, chunk: int, device_free: Optional[int], host_available: Optional[int],
                  headroom: int) -> tuple[int, Optional[str]]:
    """The bytes each way that fit two device and two pinned host buffers (whole chunks), and why it was cut."""
    room = [("device", device_free - headroom)] if device_free is not None else []
    room += [("host", host_available - 8 * GiB)] if host_available is not None else []
    n, why = want, None
    for where, free in room:
        if 2 * n > free:
            n = max(chunk, free // 2 // chunk * chunk)
            why = f"cut to {n / GiB:.2f} GiB each way: {where} memory has {max(free, 0) / GiB:.1f} GiB to spare"
    return n, why


def host_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def env_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "device": device, "host": os.uname().nodename}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=p.total_memory / GiB, cuda=torch.version.cuda)
    return info


def measure(a: argparse.Namespace, res: dict) -> dict:
    import torch

    cuda = a.device == "cuda"
    chunk = max(1, int(a.chunk_mib * MiB))
    want = max(1, int(a.gib * GiB))
    n, why = fitting_bytes(want, min(chunk, want), torch.cuda.mem_get_info()[0] if cuda else None,
                           host_available_bytes() if cuda else None, int(a.headroom_gib * GiB))
    if why:
        say(f"  {why}")
        res["clamped"] = why
    sizes = chunk_sizes(n, min(chunk, n))
    t0 = time.perf_counter()
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
    res["pin_alloc_s"] = time.perf_counter() - t0
    host_in.fill_(3)
    host_out.fill_(0)
    dev = "cuda" if cuda else "cpu"
    dev_src = torch.full((n,), 5, dtype=torch.uint8, device=dev)
    dev_dst = torch.zeros(n, dtype=torch.uint8, device=dev)
    jobs = {"d2h": {"d2h": (host_out, dev_src)}, "h2d": {"h2d": (dev_dst, host_in)},
            "both": {"d2h": (host_out, dev_src), "h2d": (dev_dst, host_in)}}
    run = copy_run_cuda if cuda else copy_run_cpu
    streams = {d: torch.cuda.Stream() for d in DIRECTIONS} if cuda else None
    runs: dict[str, list] = {kind: [] for kind in jobs}
    for rep in range(a.warmup + a.reps):
        for kind, job in jobs.items():
            r = run(job, sizes, streams)
            if rep >= a.warmup:
                runs[kind].append(r)
    if int(host_out[n - 1]) != 5 or int(dev_dst[n - 1]) != 3:  # the copies really ran
        raise RuntimeError(f"copies did not arrive: host {int(host_out[n - 1])}, device {int(dev_dst[n - 1])}")
    res.update(bytes=n, chunk_bytes=sizes[0], chunks=len(sizes), runs=runs)
    return summarize(runs, sizes)


def table(res: dict) -> str:
    s, n = res["summary"], res["bytes"]
    al, both = s["alone"], s["both"]
    lines = [f"-- pinned host <-> device copies, {n / GiB:.2f} GiB each way in {res['chunks']} chunks, median of "
             f"{res['reps']} ({'CUDA events' if res['env']['device'] == 'cuda' else 'host clock, DRY RUN'})",
             f"{'':22} {'D2H GB/s':>9} {'H2D GB/s':>9} {'total GB/s':>11} {'seconds':>16}",
             f"{'alone':22} {al['d2h']['gbps']:9.1f} {al['h2d']['gbps']:9.1f} {'':>11} "
             f"{al['d2h']['seconds']:7.3f} /{al['h2d']['seconds']:7.3f}",
             f"{'both at once':22} {both['d2h']['concurrent_gbps']:9.1f} {both['h2d']['concurrent_gbps']:9.1f} "
             f"{both['total_gbps']:11.1f} {both['seconds']:16.3f}",
             f"both at once take {s['both_over_longer_alone']:.2f} x the longer alone, {s['both_over_sum_alone']:.2f} x "
             f"the two alone one after the other (the floor's model gives {s['model_over_measured']:.3f} x the "
             f"measured time)",
             "-- duplex floor of a swap: A out (sleep), B in (wake), at the concurrent rates, the rest alone",
             f"{'out GB':>8} {'in GB':>8} {'floor s':>9} {'max s':>9} {'sequential s':>13} {'floor/sequential':>17}"]
    for row in res["swap_floor"]:
        lines.append(f"{row['out_bytes'] / 1e9:8.2f} {row['in_bytes'] / 1e9:8.2f} {row['floor_s']:9.4f} "
                     f"{row['concurrent_max_s']:9.4f} {row['sequential_s']:13.4f} {row['floor_over_sequential']:17.3f}")
    r = s["rates_gbps"]
    lines.append(f"DUPLEX {n / GiB:g} GiB: alone D2H {r['d2h_alone']:.1f} / H2D {r['h2d_alone']:.1f} GB/s; both at once "
                 f"{r['d2h_both']:.1f} + {r['h2d_both']:.1f} GB/s ({both['total_gbps']:.1f} total): "
                 f"{s['both_over_longer_alone']:.2f} x one alone")
    return "\n".join(lines)


def save(res: dict, out_dir: Optional[str]) -> Optional[str]:
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "probe_duplex.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0, help="bytes each way (default 8)")
    ap.add_argument("--chunk-mib", type=float, default=128.0,
                    help="copy size between timing events (default 128; the concurrent rates are exact to about one)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--headroom-gib", type=float, default=4.0, help="device memory left free (default 4)")
    ap.add_argument("--swap-gb", type=float, nargs=2, action="append", default=[], metavar=("OUT", "IN"),
                    help="also the floor of a swap of OUT GB to host and IN GB to the device (repeatable)")
    ap.add_argument("--out", default=None, help="directory for probe_duplex.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (the probe) or cpu (a dry run)")
    a = ap.parse_args(argv)
    if a.gib <= 0 or a.chunk_mib <= 0 or a.reps < 1 or a.warmup < 0 or a.headroom_gib < 0:
        ap.error(f"need --gib > 0, --chunk-mib > 0, --reps >= 1, --warmup >= 0, --headroom-gib >= 0; got "
                 f"{a.gib}, {a.chunk_mib}, {a.reps}, {a.warmup}, {a.headroom_gib}")
    if any(x < 0 for pair in a.swap_gb for x in pair):
        ap.error(f"--swap-gb: sizes must be >= 0, got {a.swap_gb}")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        say(f"PyTorch is not importable ({e})")
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device (use --device cpu for a dry run)")
        return 2
    res: dict[str, Any] = {"probe": "duplex", "env": env_info(a.device), "reps": a.reps, "warmup": a.warmup}
    res["summary"] = measure(a, res)
    rates = Rates(**res["summary"]["rates_gbps"])
    res["swap_floor"] = [swap_row(res["bytes"], res["bytes"], rates)] + [
        swap_row(o * 1e9, i * 1e9, rates) for o, i in a.swap_gb]
    say(table(res))
    path = save(res, a.out)
    if path:
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
