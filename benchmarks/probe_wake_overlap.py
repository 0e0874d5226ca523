"""Issue 17 item 1's probe: why is the level-1 wake not at the pinned-copy limit when memory with no backup
(a KV cache) is mapped while the backups are copied back? The core's wake (csrc/allocator.cpp
Allocator::wake) mapped the segments with backups and enqueued each one's host-to-device copies right after
its map, then created and mapped the rest while the copies ran. In vLLM (Llama-3-8B shape, H200) 15.5 GiB came
back in 0.45 s (37 GB/s) with 0.25 s of driver map calls, against 0.30 s at the limit. Variants a-f (run
2026-12-03, RESULTS.md section 15) showed that one large map beside the copies costs nothing; g and h compare
many maps between the copies (the core's order) with all maps first (tried on 2026-12-03); run that day
(section 16), mapping first was 17 ms slower (so the core went back to g's order), and both far from the 150 ms of driver time of the warm
wakes in vLLM, which come right after their sleep. i and j repeat g and h right after the same memory was
written and released, as a wake that follows its sleep at once: does re-creating just-freed memory cost more?
(Run that evening, section 17: yes, 0.22-0.25 s more for 112 GiB, cuMemCreate 0.26-0.48 s against 0.03 s, and g
still 1.09 x the copies alone after a pause.) k to n look for an order of the many segments' calls that costs
nothing beside the copies: all mapped first with K behind the copies (k; l right after a release), the calls on a
second thread (m), the handles created first (n).

On one GPU, with the libcuda calls made through ctypes (benchmarks/cuvmm.py), B bytes (--copy-gib, default 16)
are copied from pinned host memory into a VMM-mapped destination as --piece-mib copies on a non-blocking
stream (as the core's copy stream), with a timing event every --event-every-mib, and K bytes (--kv-gib,
default 96, capped at free memory - B - --headroom-gib) are created, mapped and given access:

  a  the copies alone (enqueue all, synchronize)
  b  K's cuMemCreate, cuMemMap, cuMemSetAccess alone, each timed
  c  the copies enqueued, then K created + mapped + accessed on the same thread, then synchronize (the core)
  d  K created before the copies are enqueued, mapped + accessed after (is it create or map/access that collides?)
  e  as c with K in --split-gib handles (many smaller calls)
  f  K's calls on a second thread while the first enqueues the copies
  g  the copies' destination in --segments separately created and mapped segments (vLLM's 8B weights: 118),
     each segment's copies enqueued right after its map, then K (the core's wake order until 2026-12-03)
  h  every segment and K created and mapped first, then every copy (the core's order on 2026-12-03 only:
     measured slower, section 16, and reverted)
  i  as g, right after the same segments and K were created, mapped, written (cuMemsetD8Async) and released,
     with no pause: a wake that follows its sleep at once (the release's seconds are recorded, not counted)
  j  as h, right after the same release
  k  every segment created and mapped, then every copy, then K's calls while the copies run (what h would be if
     K waited for the copies, as in c): are many maps between the copies (g) what costs?
  l  as k, right after the same release
  m  as g with each segment's create, map and access on a second thread running ahead; the first thread
     enqueues a segment's copies once it is mapped (is the cost the calling thread's, or the device's?)
  n  every segment's handle created first, then each mapped and given access just before its copies (is it
     cuMemCreate or cuMemMap/cuMemSetAccess between the copies that costs?)

Each variant --reps times (rounds a..n interleaved, K released and a --pause-s pause between runs), after one
unmeasured a and b; medians. Times are seconds from the variant's first call; the copies' completion comes
from their events (their origin is the host time of the start event's record, on an idle stream). The table
shows each variant's total, when the copies were done and how long they took from their enqueue, when the
last driver call returned (each call's start and end are in the JSON), the driver calls' seconds by call, the
enqueue's seconds, the copy rate alone and while the calls ran, and total / max(a, b) (max(a, b): the wake if
the two overlapped fully). A WAKE-OVERLAP summary line and the diagnosis (which collision, which fix) follow;
JSON to --out (probe_wake_overlap.json).

There is no CPU dry run of driver calls: the arithmetic, table and diagnosis are pure functions over the
recorded runs, tested on made-up timings in tests/test_probe_wake_overlap_cpu.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_duplex import bytes_done_by, chunk_sizes  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
VARIANTS = {
    "a": "copies alone",
    "b": "K create+map+access alone",
    "c": "copies, then K create+map+access",
    "d": "K created, copies, then K map+access",
    "e": "as c, K in smaller handles",
    "f": "K's calls on a 2nd thread",
    "g": "copies into N segments, each mapped first",
    "h": "N segments and K mapped, then the copies",
    "i": "as g, right after releasing the same",
    "j": "as h, right after releasing the same",
    "k": "N segments mapped, their copies, then K",
    "l": "as k, right after releasing the same",
    "m": "as g, segments mapped on a 2nd thread",
    "n": "N segments created first, then as g",
}
# How each segments variant orders its work (Probe._segments_run): "interleave" maps a segment and enqueues its
# copies at once, then the next; "all_first" maps every segment and K before the first copy; "segments_first"
# maps every segment, enqueues every copy, then K; "creates_first" creates every segment's handle, then maps
# each and enqueues its copies; "thread" as interleave with the creates and maps on a second thread.
SEGMENT_ORDERS = {"g": "interleave", "h": "all_first", "i": "interleave", "j": "all_first", "k": "segments_first",
                  "l": "segments_first", "m": "thread", "n": "creates_first"}
JUST_RELEASED = {"i": "g", "j": "h", "l": "k"}  # run right after a release -> the same order after a pause
OVERLAP_TOLERANCE = 1.05  # total <= this x max(a, b) counts as overlapped
CALLS = ("create", "map", "access")


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- arithmetic: one run's figures, medians, diagnosis, table (pure; no GPU) ------------------------------------


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A recorded run's figures. run: total_s; calls: [[name, start_s, end_s], ...] (seconds from the run's
    start); for runs with copies also copy_start_s, enqueue_s, copy_ends_s (each event's time) and copy_sizes
    (the bytes before each event)."""
    calls = run.get("calls", [])
    for c in calls:
        if len(c) != 3 or c[0] not in CALLS or not c[1] <= c[2]:
            raise ValueError(f"a call must be [name in {CALLS}, start_s, end_s >= start_s], got {c!r}")
    out: dict[str, Any] = {"total_s": run["total_s"], "driver_s": sum(c[2] - c[1] for c in calls),
                           "driver_by_call_s": {n: sum(c[2] - c[1] for c in calls if c[0] == n) for n in CALLS},
                           "driver_end_s": max((c[2] for c in calls), default=None),
                           "copy_done_s": None, "copy_s": None, "copy_gbps": None, "enqueue_s": None,
                           "copy_gbps_during_driver": None}
    ends = run.get("copy_ends_s")
    if not ends:
        return out
    start, sizes = run["copy_start_s"], run["copy_sizes"]
    rel = [e - start for e in ends]
    out.update(copy_done_s=ends[-1], copy_s=rel[-1], copy_gbps=sum(sizes) / rel[-1] / 1e9, enqueue_s=run["enqueue_s"])
    if calls:  # the copy rate between the first call's start and the last call's end, while copies still ran
        w0 = max(min(c[1] for c in calls), start)
        w1 = min(max(c[2] for c in calls), ends[-1])
        if w1 > w0:
            done = bytes_done_by(rel, sizes, w1 - start) - bytes_done_by(rel, sizes, w0 - start)
            out["copy_gbps_during_driver"] = done / (w1 - w0) / 1e9
    return out


def _median(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of each variant's figures and total / max(a, b) (the fully overlapped wake)."""
    missing = [v for v in ("a", "b") if not runs.get(v)]
    if missing:
        raise ValueError(f"variants {missing} have no runs: both a (copies alone) and b (driver calls alone) are needed")
    unknown = sorted(set(runs) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    per: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        figs = [run_figures(r) for r in rs]
        row = {k: _median([f[k] for f in figs]) for k in figs[0] if k != "driver_by_call_s"}
        row["driver_by_call_s"] = {n: statistics.median(f["driver_by_call_s"][n] for f in figs) for n in CALLS}
        row["total_all_s"] = [f["total_s"] for f in figs]
        per[v] = row
    ideal = max(per["a"]["total_s"], per["b"]["total_s"])
    for row in per.values():
        row["x_ideal"] = row["total_s"] / ideal
    return {"variants": {v: per[v] for v in VARIANTS if v in per}, "ideal_s": ideal,
            "serial_s": per["a"]["total_s"] + per["b"]["total_s"]}


FIXES = {
    "d": "create the handles of memory with no backup before the copies start, map and set access after them "
         "(wake: the creates of the no-backup segments move ahead of the first enqueue_copies)",
    "e": "create and map memory with no backup in smaller handles (the --split-gib size) between the copies",
    "f": "create and map memory with no backup on a second thread while the first maps the backed-up segments "
         "and enqueues their copies",
}


def _against(total: float, ref: float) -> str:
    """One order's total against another's: beyond 3 % either way it is faster or slower."""
    return "faster" if total < 0.97 * ref else "slower" if total > 1.03 * ref else "the same"


def many_maps(summary: dict[str, Any]) -> list[str]:
    """g against h: do many maps made while copies are in flight cost what mapping them first costs?"""
    v = summary["variants"]
    if "g" not in v or "h" not in v:
        return []
    g, h, a = v["g"], v["h"], v["a"]
    return [f"many segments: mapped between the copies (g) {g['total_s']:.3f} s (driver {g['driver_s']:.3f} s), mapped "
            f"before them (h) {h['total_s']:.3f} s (driver {h['driver_s']:.3f} s); copies alone {a['total_s']:.3f} s: "
            + (f"mapping first is {verdict}" if (verdict := _against(h["total_s"], g["total_s"])) != "the same"
               else "the two orders cost the same")]


def segment_orders(summary: dict[str, Any]) -> list[str]:
    """k, m and n against g: which order of the many segments' calls beside their copies costs least?"""
    v = summary["variants"]
    if "g" not in v:
        return []
    g, a = v["g"], v["a"]
    what = {"k": "every segment mapped before the copies, K after them", "m": "the calls on a second thread",
            "n": "every handle created first"}
    lines = []
    for k in ("k", "m", "n"):
        if k not in v:
            continue
        r = v[k]
        lines.append(f"segments, {what[k]} ({k}): {r['total_s']:.3f} s (driver {r['driver_s']:.3f} s, "
                     f"{r['total_s'] / a['total_s']:.2f} x the copies alone) against g {g['total_s']:.3f} s: "
                     f"{_against(r['total_s'], g['total_s'])}")
    return lines


def just_released(summary: dict[str, Any]) -> list[str]:
    """i, j and l against g, h and k: does re-creating memory released just before cost more than after a pause?"""
    v = summary["variants"]
    lines = []
    for after, before in JUST_RELEASED.items():
        if after not in v or before not in v:
            continue
        a, b = v[after], v[before]
        extra = a["total_s"] - b["total_s"]
        lines.append(f"just released: {before}'s order {b['total_s']:.3f} s (driver {b['driver_s']:.3f} s) after a pause, "
                     f"{a['total_s']:.3f} s (driver {a['driver_s']:.3f} s) right after the release ({after}): " +
                     (f"re-creating just-freed memory costs {extra:.3f} s more" if extra > 0.03 * b["total_s"] else
                      "re-creating just-freed memory costs nothing more"))
    return lines


def diagnose(summary: dict[str, Any], tolerance: float = OVERLAP_TOLERANCE) -> list[str]:
    """What the medians say: does the core's order (c) overlap, what collides if not, which variant fixes it;
    g against h (many maps between the copies or before them); i and j against g and h (memory just released)."""
    lines = _diagnose_k(summary, tolerance)
    return lines + many_maps(summary) + segment_orders(summary) + just_released(summary)


def _diagnose_k(summary: dict[str, Any], tolerance: float) -> list[str]:
    v, ideal = summary["variants"], summary["ideal_s"]
    a, b = v["a"], v["b"]
    lines = [f"fully overlapped would be max(a, b) = {ideal:.3f} s; one after the other a + b = "
             f"{summary['serial_s']:.3f} s"]
    c = v.get("c")
    if c is None:
        return lines + ["variant c (the core's order) was not run: nothing to judge"]
    if c["x_ideal"] <= tolerance:
        lines.append(f"c (the core's order) overlaps here ({c['x_ideal']:.2f} x): the driver calls do not serialize "
                     f"with the copies on this card, so the wake's gap in vLLM lies elsewhere (other steps of the wake, "
                     f"more or smaller mappings, the copies' pieces)")
        return lines
    lines.append(f"c (the core's order) takes {c['x_ideal']:.2f} x max(a, b): the calls and the copies serialize")
    causes = []
    if c["enqueue_s"] is not None and a["enqueue_s"] is not None and c["enqueue_s"] > a["enqueue_s"] + 0.25 * b["total_s"]:
        causes.append(f"the copy enqueue blocks ({c['enqueue_s']:.3f} s vs {a['enqueue_s']:.3f} s alone)")
    during = c["copy_gbps_during_driver"]
    if during is not None and a["copy_gbps"] and during < 0.8 * a["copy_gbps"]:
        causes.append(f"the copies slow down while the driver calls run ({during:.1f} GB/s vs {a['copy_gbps']:.1f} "
                      f"alone): the device side stalls")
    if c["driver_s"] > 1.2 * b["driver_s"]:
        slow = [n for n in CALLS if c["driver_by_call_s"][n] > 1.2 * b["driver_by_call_s"][n] + 1e-3]
        causes.append(f"the driver calls take longer beside the copies ({c['driver_s']:.3f} s vs {b['driver_s']:.3f} s "
                      f"alone; {', '.join(slow) or 'spread over all'}): they wait for the copies")
    lines.append("cause: " + ("; ".join(causes) if causes else "none of the signs (enqueue, copy rate, call times) "
                                                               "stands out: read the per-run times in the JSON"))
    d = v.get("d")
    if d is not None:  # d's copies run beside map + access only: do they still lose time?
        if d["copy_s"] <= tolerance * a["copy_s"] < c["copy_s"]:
            lines.append(f"with K created before the copies, they take {d['copy_s']:.3f} s (alone {a['copy_s']:.3f} s): "
                         f"cuMemCreate is what collides, map + access do not")
        elif d["copy_s"] > tolerance * a["copy_s"]:
            lines.append(f"with K created before the copies, they still take {d['copy_s']:.3f} s (alone "
                         f"{a['copy_s']:.3f} s): map / access collide too")
    fixed = [k for k in ("d", "e", "f") if k in v and v[k]["x_ideal"] <= tolerance]
    for k in fixed:
        lines.append(f"{k} overlaps ({v[k]['x_ideal']:.2f} x): fix: {FIXES[k]}")
    if not fixed:
        tried = {k: v[k]["total_s"] for k in ("c", "d", "e", "f") if k in v}
        best = min(tried, key=tried.get)
        lines.append(f"no variant overlaps within {tolerance:.2f} x: the best is {best} ({v[best]['x_ideal']:.2f} x, "
                     f"{tried[best]:.3f} s); the rest is what the driver allows" +
                     (f" (fix toward it: {FIXES[best]})" if best in FIXES and tried[best] < 0.95 * c["total_s"] else ""))
    return lines


def _f(x: Optional[float], fmt: str) -> str:
    """x in fmt ("9.3f"), or "-" at the same width."""
    return f"{'-':>{fmt.split('.')[0]}}" if x is None else format(x, fmt)


def table(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"-- wake overlap: {res['copy_bytes'] / GiB:.2f} GiB host-to-device in {res['piece_bytes'] // MiB} MiB "
             f"pieces, K = {res['k_bytes'] / GiB:.2f} GiB ({res['split_bytes'] / GiB:g} GiB handles in e; the copies' "
             f"destination in {res.get('segments', '-')} handles in g to j), median of "
             f"{res['reps']} (seconds from the variant's first call)",
             f"{'variant':40} {'total s':>8} {'copy-done s':>11} {'copies s':>8} {'calls-done s':>12} {'driver s':>9} "
             f"{'create/map/access s':>20} {'enqueue s':>9} {'copy GB/s':>9} {'during calls':>12} {'x max(a,b)':>10}"]
    for k, row in s["variants"].items():
        by = row["driver_by_call_s"]
        calls = "/".join(f"{by[n]:.3f}" for n in CALLS) if row["driver_s"] else "-"
        lines.append(f"{k + ' ' + VARIANTS[k]:40} {row['total_s']:8.3f} {_f(row['copy_done_s'], '11.3f')} "
                     f"{_f(row['copy_s'], '8.3f')} {_f(row['driver_end_s'], '12.3f')} {row['driver_s']:9.3f} {calls:>20} "
                     f"{_f(row['enqueue_s'], '9.3f')} {_f(row['copy_gbps'], '9.1f')} "
                     f"{_f(row['copy_gbps_during_driver'], '12.1f')} {row['x_ideal']:10.2f}")
    v = s["variants"]
    best = min((k for k in ("c", "d", "e", "f") if k in v), key=lambda k: v[k]["total_s"], default=None)
    lines.append(f"WAKE-OVERLAP {res['copy_bytes'] / GiB:g} GiB + K {res['k_bytes'] / GiB:.0f} GiB: copies alone "
                 f"{v['a']['total_s']:.3f} s ({v['a']['copy_gbps']:.1f} GB/s), K alone {v['b']['total_s']:.3f} s" +
                 (f", core order (c) {v['c']['x_ideal']:.2f} x max(a,b)" if "c" in v else "") +
                 (f", best {best} {v[best]['x_ideal']:.2f} x" if best else ""))
    lines += ["diagnosis: " + line for line in res["diagnosis"]]
    return "\n".join(lines)


# ---- the measurement (GPU) ----------------------------------------------------------------------------------


class Probe:
    """The pinned source, the mapped destination, K's address range; one method per variant."""

    def __init__(self, drv, host_ptr: int, copy_bytes: int, piece_bytes: int, event_every: int, k_bytes: int,
                 split_bytes: int, segments: int = 118):
        self.drv, self.host_ptr = drv, host_ptr
        self.stream = drv.stream()
        self.gran = drv.granularity()
        self.copy_bytes = copy_bytes
        self.piece_bytes = piece_bytes
        self.pieces = chunk_sizes(copy_bytes, piece_bytes)
        per_event = max(1, event_every // piece_bytes)
        self.groups = [self.pieces[i:i + per_event] for i in range(0, len(self.pieces), per_event)]
        self.events = [drv.event() for _ in range(len(self.groups) + 1)]
        dst_size = -(-copy_bytes // self.gran) * self.gran
        self.dst = (drv.reserve(dst_size), dst_size)
        self.dst_handle = drv.create(dst_size)
        drv.map(self.dst[0], dst_size, self.dst_handle)
        drv.set_access(self.dst[0], dst_size)
        self.k_bytes = k_bytes // self.gran * self.gran
        split = max(self.gran, split_bytes // self.gran * self.gran)
        self.k_split = chunk_sizes(self.k_bytes, split)
        self.k_base = drv.reserve(self.k_bytes)
        self.k_handles: list[int] = []  # K's and g/h's segments', released by release_k
        self.k_maps: list[tuple[int, int]] = []  # (address, bytes) mapped, unmapped by release_k
        # g and h: the copies' destination again, in `segments` handles of their own
        seg = -(-dst_size // max(1, segments) // self.gran) * self.gran
        self.seg_sizes = chunk_sizes(dst_size, seg)
        self.seg_base = drv.reserve(dst_size)
        self.seg_events = (drv.event(), drv.event())

    def close(self) -> None:
        self.drv.sync(self.stream)  # no copy may still write into the destination once it is unmapped
        self.release_k()
        self.drv.unmap(self.dst[0], self.dst[1])
        self.drv.release(self.dst_handle)
        self.drv.address_free(*self.dst)
        self.drv.address_free(self.k_base, self.k_bytes)
        self.drv.address_free(self.seg_base, self.dst[1])

    # -- pieces of a run
    def _timed(self, calls: list, t0: float, name: str, fn, *args) -> Any:
        start = time.perf_counter() - t0
        r = fn(*args)
        calls.append([name, start, time.perf_counter() - t0])
        return r

    def _enqueue(self, t0: float) -> dict[str, Any]:
        drv, src, dst = self.drv, self.host_ptr, self.dst[0]
        copy_start = time.perf_counter()
        drv.record(self.events[0], self.stream)
        at = 0
        for g, group in enumerate(self.groups):
            for size in group:
                drv.copy_h2d(dst + at, src + at, size, self.stream)
                at += size
            drv.record(self.events[g + 1], self.stream)
        return {"copy_start_s": copy_start - t0, "enqueue_s": time.perf_counter() - copy_start}

    def _copies_done(self, info: dict[str, Any]) -> dict[str, Any]:
        self.drv.sync(self.stream)
        first = self.events[0]
        info["copy_ends_s"] = [info["copy_start_s"] + self.drv.elapsed_s(first, e) for e in self.events[1:]]
        info["copy_sizes"] = [sum(g) for g in self.groups]
        return info

    def _create_k(self, calls: list, t0: float) -> None:
        self.k_handles.append(self._timed(calls, t0, "create", self.drv.create, self.k_bytes))

    def _map_k(self, calls: list, t0: float) -> None:
        self._map_one(calls, t0, self.k_base, self.k_bytes, self.k_handles[-1])

    def _map_one(self, calls: list, t0: float, at: int, size: int, handle: int) -> None:
        self._timed(calls, t0, "map", self.drv.map, at, size, handle)
        self.k_maps.append((at, size))
        self._timed(calls, t0, "access", self.drv.set_access, at, size)

    def _create_map_k_split(self, calls: list, t0: float) -> None:
        """K in smaller handles, each created, mapped and given access in turn (as the core maps run by run)."""
        at = self.k_base
        for size in self.k_split:
            self.k_handles.append(self._timed(calls, t0, "create", self.drv.create, size))
            self._map_one(calls, t0, at, size, self.k_handles[-1])
            at += size

    def _segments_run(self, calls: list, t0: float, order: str) -> dict[str, Any]:
        """g to n: the copies' destination in separately created, mapped and accessed segments, and K, in the
        order SEGMENT_ORDERS names; each segment's copies as the core copies one allocation."""
        drv, start_ev, end_ev = self.drv, *self.seg_events
        info: dict[str, Any] = {}

        def enqueue(at: int, size: int) -> None:
            if not info:
                info["copy_start_s"] = time.perf_counter() - t0
                drv.record(start_ev, self.stream)
            lo, hi = at, min(at + size, self.copy_bytes)
            for piece in chunk_sizes(hi - lo, self.piece_bytes) if hi > lo else []:
                drv.copy_h2d(self.seg_base + lo, self.host_ptr + lo, piece, self.stream)
                lo += piece

        def create(size: int) -> int:
            self.k_handles.append(self._timed(calls, t0, "create", drv.create, size))
            return self.k_handles[-1]

        def k_calls() -> None:
            self._create_k(calls, t0)
            self._map_k(calls, t0)

        segments = list(zip(itertools.accumulate(self.seg_sizes, initial=0), self.seg_sizes))  # (offset, size)
        if order == "thread":
            return self._segments_two_threads(calls, t0, segments, info, enqueue, create, k_calls)
        handles = [create(size) for _, size in segments] if order == "creates_first" else []
        for i, (at, size) in enumerate(segments):
            self._map_one(calls, t0, self.seg_base + at, size, handles[i] if handles else create(size))
            if order in ("interleave", "creates_first"):
                enqueue(at, size)
        if order == "all_first":
            k_calls()
        if order in ("all_first", "segments_first"):
            for at, size in segments:
                enqueue(at, size)
        enqueued = time.perf_counter() - t0
        drv.record(end_ev, self.stream)
        if order != "all_first":
            k_calls()
        return self._segments_done(info, enqueued)

    def _segments_done(self, info: dict[str, Any], enqueued: float) -> dict[str, Any]:
        drv, start_ev, end_ev = self.drv, *self.seg_events
        drv.sync(self.stream)
        info.update(enqueue_s=enqueued - info["copy_start_s"], copy_sizes=[self.copy_bytes],
                    copy_ends_s=[info["copy_start_s"] + drv.elapsed_s(start_ev, end_ev)])
        return info

    def _segments_two_threads(self, calls: list, t0: float, segments: list, info: dict[str, Any], enqueue, create,
                              k_calls) -> dict[str, Any]:
        """m: a second thread creates, maps and gives access to each segment in turn, then K; this thread
        enqueues each segment's copies as soon as the other says it is mapped."""
        ctx = self.drv.current_context()
        ready: "queue.Queue[Optional[int]]" = queue.Queue()  # index of a mapped segment; None: the other failed
        box: dict[str, Any] = {}

        def mapper() -> None:
            try:
                self.drv.set_current(ctx)
                for i, (at, size) in enumerate(segments):
                    self._map_one(calls, t0, self.seg_base + at, size, create(size))
                    ready.put(i)
                k_calls()
            except BaseException as e:  # noqa: BLE001 (re-raised on this thread)
                box["error"] = e
                ready.put(None)

        worker = threading.Thread(target=mapper, name="probe-segment-calls")
        worker.start()
        enqueued = 0.0
        try:
            for _ in segments:
                i = ready.get()
                if i is None:
                    break
                enqueue(*segments[i])  # its first call records the start event
            else:
                enqueued = time.perf_counter() - t0
                self.drv.record(self.seg_events[1], self.stream)
        finally:
            worker.join()
        if "error" in box:
            self.drv.sync(self.stream)  # nothing may still write into memory release_k unmaps
            raise RuntimeError(f"variant m: the second thread's driver calls failed: {box['error']}") from box["error"]
        return self._segments_done(info, enqueued)

    def _release_what_a_sleep_held(self) -> float:
        """i, j and l's start: the segments and K created, mapped, written (the copies, then a memset of every
        page, as an engine's memory is) and released, as a sleep leaves them; the release's seconds (not part of
        the run)."""
        self._segments_run([], time.perf_counter(), "all_first")  # its calls are not the run's
        for ptr, size in self.k_maps:
            self.drv.memset_d8(ptr, 0x5A, size, self.stream)
        self.drv.sync(self.stream)
        start = time.perf_counter()
        self.release_k()
        return time.perf_counter() - start

    def release_k(self) -> None:
        while self.k_maps:
            self.drv.unmap(*self.k_maps.pop())
        while self.k_handles:
            self.drv.release(self.k_handles.pop())

    # -- the variants
    def run(self, variant: str) -> dict[str, Any]:
        self.drv.sync(self.stream)
        calls: list = []
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if variant == "a":
            info = self._copies_done(self._enqueue(t0))
        elif variant == "b":
            self._create_k(calls, t0)
            self._map_k(calls, t0)
        elif variant == "c":
            info = self._enqueue(t0)
            self._create_k(calls, t0)
            self._map_k(calls, t0)
            info = self._copies_done(info)
        elif variant == "d":
            self._create_k(calls, t0)
            info = self._enqueue(t0)
            self._map_k(calls, t0)
            info = self._copies_done(info)
        elif variant == "e":
            info = self._enqueue(t0)
            self._create_map_k_split(calls, t0)
            info = self._copies_done(info)
        elif variant == "f":
            info = self._run_two_threads(calls)
            t0 = info.pop("t0")
        elif variant in JUST_RELEASED:
            released_s = self._release_what_a_sleep_held()
            t0 = time.perf_counter()  # the run starts right after the release
            info = {"release_s": released_s, **self._segments_run(calls, t0, SEGMENT_ORDERS[variant])}
        elif variant in SEGMENT_ORDERS:
            info = self._segments_run(calls, t0, SEGMENT_ORDERS[variant])
        else:
            raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
        return {"variant": variant, "total_s": time.perf_counter() - t0, "calls": calls, **info}

    def _run_two_threads(self, calls: list) -> dict[str, Any]:
        ctx = self.drv.current_context()
        barrier = threading.Barrier(2)
        box: dict[str, Any] = {}

        def driver_thread() -> None:
            try:
                self.drv.set_current(ctx)
                barrier.wait()
                self._create_k(calls, box["t0"])
                self._map_k(calls, box["t0"])
            except BaseException as e:  # noqa: BLE001 (re-raised on the main thread)
                box["error"] = e
                barrier.abort()  # a failure before the start must not leave the main thread waiting

        worker = threading.Thread(target=driver_thread, name="probe-k-calls")
        worker.start()
        box["t0"] = time.perf_counter()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            worker.join()
            raise RuntimeError(f"variant f: the second thread failed before the start: {box.get('error')}") from None
        info = self._enqueue(box["t0"])
        info = self._copies_done(info)
        worker.join()
        if "error" in box:
            raise RuntimeError(f"variant f: the second thread's driver calls failed: {box['error']}") from box["error"]
        info["t0"] = box["t0"]
        return info


def plan_sizes(copy_gib: float, kv_gib: float, headroom_gib: float, free_bytes: int) -> tuple[int, int, str]:
    """(copy bytes, K bytes, note): K capped at free - B - headroom; an error when nothing is left for K."""
    copy_bytes, want = int(copy_gib * GiB), int(kv_gib * GiB)
    room = free_bytes - copy_bytes - int(headroom_gib * GiB)
    if room < 2 * MiB:
        raise ValueError(f"no room for K: {free_bytes / GiB:.2f} GiB free on the device, {copy_gib:g} GiB copied and "
                         f"{headroom_gib:g} GiB headroom leave {room / GiB:.2f} GiB; lower --copy-gib or --headroom-gib")
    k = min(want, room)
    note = "" if k == want else f"K capped from {kv_gib:g} to {k / GiB:.2f} GiB ({free_bytes / GiB:.2f} GiB free)"
    return copy_bytes, k, note


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copy-gib", type=float, default=16.0, help="B: bytes copied host to device (default 16)")
    ap.add_argument("--kv-gib", type=float, default=96.0, help="K: bytes created and mapped (default 96, capped)")
    ap.add_argument("--piece-mib", type=int, default=64, help="size of each copy (default 64)")
    ap.add_argument("--event-every-mib", type=int, default=1024, help="bytes between timing events (default 1024)")
    ap.add_argument("--split-gib", type=float, default=2.0, help="handle size of K in variant e (default 2)")
    ap.add_argument("--segments", type=int, default=118,
                    help="handles of the copies' destination in variants g and h (default 118, vLLM's 8B weights)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pause-s", type=float, default=1.0, help="pause after releasing K, between runs (default 1)")
    ap.add_argument("--headroom-gib", type=float, default=4.0, help="device memory left free (default 4)")
    ap.add_argument("--out", default=None, help="directory for probe_wake_overlap.json")
    a = ap.parse_args(argv)
    bad = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
           if k in ("copy_gib", "kv_gib", "piece_mib", "event_every_mib", "split_gib", "reps", "segments") and not v > 0]
    bad += [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in ("pause_s", "headroom_gib") and v < 0]
    if bad:
        ap.error(f"sizes and --reps must be > 0, --pause-s and --headroom-gib >= 0; got {', '.join(bad)}")
    return a


def measure(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cuvmm import Driver

    torch.zeros(1, device="cuda")  # the primary context is current from here on
    drv = Driver(0)
    free, total = drv.mem_info()
    copy_bytes, k_bytes, note = plan_sizes(a.copy_gib, a.kv_gib, a.headroom_gib, free)
    if note:
        say(note)
    host = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)  # every page touched before any copy is timed
    probe = Probe(drv, host.data_ptr(), copy_bytes, a.piece_mib * MiB, a.event_every_mib * MiB, k_bytes,
                  int(a.split_gib * GiB), a.segments)
    res: dict[str, Any] = {"probe": "wake_overlap", "copy_bytes": copy_bytes, "k_bytes": probe.k_bytes,
                           "piece_bytes": a.piece_mib * MiB, "split_bytes": int(a.split_gib * GiB), "segments": a.segments, "reps": a.reps,
                           "pause_s": a.pause_s, "note": note, "device_free_bytes": free, "device_total_bytes": total,
                           "env": {"torch": torch.__version__, "cuda": torch.version.cuda,
                                   "device": torch.cuda.get_device_name(0)}}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        for warm in ("a", "b"):  # unmeasured: first copies into the destination, first creation of K
            probe.run(warm)
            probe.release_k()
        time.sleep(a.pause_s)
        for rep in range(a.reps):
            for v in VARIANTS:
                r = probe.run(v)
                probe.release_k()
                runs[v].append(r)
                say(f"round {rep + 1} {v}: {r['total_s']:.3f} s")
                time.sleep(a.pause_s)
    finally:
        probe.close()
    res["runs"] = runs
    res["summary"] = summarize(runs)
    res["diagnosis"] = diagnose(res["summary"])
    return res


def save(res: dict[str, Any], out_dir: Optional[str]) -> Optional[str]:
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "probe_wake_overlap.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        say(f"PyTorch is not importable ({e})")
        return 2
    if not torch.cuda.is_available():
        say("no CUDA device: this probe times driver calls (its arithmetic is tested on the CPU by "
            "tests/test_probe_wake_overlap_cpu.py)")
        return 2
    res = measure(a)
    say(table(res))
    path = save(res, a.out)
    if path:
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
