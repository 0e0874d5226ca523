"""Issue 17 item 1: why a wake's first cuMemCreate is slow, and what a wake can do about it.

The wake probe (probe_wake_overlap.py, RESULTS.md section 18) found a rested wake's copies starting 27-37 ms
late: the first cuMemCreate after a pause takes that long whatever its size, the next ones about 20 us. That
delay is most of the gap between the core's order and the copies alone (0.346 against 0.311 s). This probe
times the first creates of one granule after releasing R bytes (created, mapped, written, then released) and
pausing P seconds, plain and with something before them:

  plain       nothing before the creates (cuMemGetInfo after them)
  info_first  cuMemGetInfo first (a wake asks how much memory is free before it maps)
  warm_L      one granule created and released L seconds before the end of the pause
  busy        the GPU kept busy by memsets through the pause (a trainer's GPU is not idle while vLLM sleeps)

Each case --reps times, interleaved; the table gives medians in ms. `--out DIR` writes probe_first_create.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

GiB, MiB = 1 << 30, 1 << 20
PAUSES_S = (0.05, 0.3, 1.0, 3.0)
WARM_LEADS_S = (0.5, 0.05)


def say(msg: str) -> None:
    print(msg, flush=True)


def plan(big_gib: float, reps: int) -> list[dict[str, Any]]:
    """The cases, each once per rep: released bytes (GiB) x pause for plain, the others at 1 s after big_gib."""
    cases = [{"case": "plain", "released_gib": r, "pause_s": p} for r in (0.0, 16.0, big_gib) for p in PAUSES_S]
    cases.append({"case": "info_first", "released_gib": big_gib, "pause_s": 1.0})
    cases += [{"case": f"warm_{lead:g}", "released_gib": big_gib, "pause_s": 1.0, "warm_lead_s": lead}
              for lead in WARM_LEADS_S]
    cases += [{"case": "busy", "released_gib": r, "pause_s": 1.0} for r in (0.0, big_gib)]
    return [dict(c, rep=rep) for rep in range(reps) for c in cases]


def key(c: dict[str, Any]) -> str:
    return f"{c['case']} R={c['released_gib']:g} GiB P={c['pause_s']:g} s"


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median of each timed call (ms) per case."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(key(r), []).append(r)
    out: dict[str, dict[str, float]] = {}
    for k, rs in by.items():
        out[k] = {f: statistics.median(r[f] for r in rs) * 1e3
                  for f in ("info_s", "create1_s", "create2_s", "create_big_s") if all(f in r for r in rs)}
        out[k]["reps"] = len(rs)
    return out


def diagnose(s: dict[str, dict[str, float]], big_gib: float) -> list[str]:
    """What the medians say: does the first create's delay come from idling, from a release, from the first
    driver call of any kind, and do a warm-up or a busy GPU take it away?"""
    lines: list[str] = []

    def first(case: str, r: float, p: float = 1.0, call: str = "create1_s") -> Optional[float]:
        v = s.get(f"{case} R={r:g} GiB P={p:g} s")
        return None if v is None else v.get(call)

    slow = 5.0  # ms: a first create above this is the delay the wake probe saw
    for r in (0.0, 16.0, big_gib):
        row = [(p, first("plain", r, p)) for p in PAUSES_S]
        if all(v is not None for _, v in row):
            lines.append(f"first create after releasing {r:g} GiB: " +
                         ", ".join(f"{v:.1f} ms at {p:g} s" for p, v in row) +
                         f" (second {first('plain', r, call='create2_s'):.2f} ms at 1 s)")
    idle, rel = first("plain", 0.0), first("plain", big_gib)
    if idle is not None and rel is not None:
        if idle > slow:
            lines.append(f"idle alone makes it slow: {idle:.1f} ms with nothing released (a GPU left idle 1 s)")
        elif rel > slow:
            lines.append(f"a release makes it slow: {rel:.1f} ms after {big_gib:g} GiB, {idle:.1f} ms with nothing released")
        else:
            lines.append(f"not slow here: {rel:.1f} ms after {big_gib:g} GiB, {idle:.1f} ms with nothing released")
    v = s.get(f"info_first R={big_gib:g} GiB P=1 s")
    if v and rel is not None:
        took = "takes the delay" if v["info_s"] > slow and v["create1_s"] <= slow else "does not take the delay"
        lines.append(f"cuMemGetInfo first {took}: info {v['info_s']:.1f} ms, then create {v['create1_s']:.1f} ms "
                     f"(plain create {rel:.1f} ms)")
    for lead in WARM_LEADS_S:
        w = first(f"warm_{lead:g}", big_gib)
        if w is not None and rel is not None:
            lines.append(f"a granule created and released {lead:g} s before: first create {w:.1f} ms against {rel:.1f} ms "
                         + ("(takes it away)" if w <= slow < rel else "(no help)" if rel > slow else ""))
    b0, bb = first("busy", 0.0), first("busy", big_gib)
    if b0 is not None and bb is not None and rel is not None:
        lines.append(f"GPU busy through the pause: first create {bb:.1f} ms after {big_gib:g} GiB ({rel:.1f} ms idle), "
                     f"{b0:.1f} ms with nothing released ({idle:.1f} ms idle)")
    return lines


def table(s: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'case':<34} {'info ms':>8} {'create1 ms':>10} {'create2 ms':>10} {'create 2GiB ms':>14} {'reps':>4}"]
    for k, v in s.items():
        lines.append(f"{k:<34} {v.get('info_s', float('nan')):>8.2f} {v['create1_s']:>10.2f} {v['create2_s']:>10.2f} "
                     f"{v['create_big_s']:>14.2f} {int(v['reps']):>4}")
    return lines


class Probe:
    def __init__(self, drv: Any, granule: int):
        self.drv, self.g = drv, granule
        self.busy_ptr = self.busy_size = 0
        self.busy_handle = None
        self.stream = drv.stream()

    def fill_release(self, gib: float) -> None:
        """Create, map, write and release `gib` (2 GiB handles): memory a sleep would just have given back."""
        size = int(gib * GiB) // self.g * self.g
        if size == 0:
            return
        base = self.drv.reserve(size)
        parts, off = [], 0
        while off < size:
            n = min(2 * GiB, size - off)
            h = self.drv.create(n)
            self.drv.map(base + off, n, h)
            parts.append((off, n, h))
            off += n
        self.drv.set_access(base, size)
        self.drv.memset_d8(base, 0x5A, size, self.stream)
        self.drv.sync(self.stream)
        for off, n, h in parts:
            self.drv.unmap(base + off, n)
            self.drv.release(h)
        self.drv.address_free(base, size)

    def busy_until(self, until: float) -> None:
        """Memsets on the GPU until `until` (perf_counter), enqueued in small batches so little is left queued."""
        if not self.busy_handle:
            self.busy_size = GiB
            self.busy_ptr = self.drv.reserve(self.busy_size)
            self.busy_handle = self.drv.create(self.busy_size)
            self.drv.map(self.busy_ptr, self.busy_size, self.busy_handle)
            self.drv.set_access(self.busy_ptr, self.busy_size)
        while time.perf_counter() < until:
            for _ in range(8):
                self.drv.memset_d8(self.busy_ptr, 1, self.busy_size, self.stream)
            self.drv.sync(self.stream)

    def timed_create(self, size: int) -> tuple[int, float]:
        t = time.perf_counter()
        h = self.drv.create(size)
        return h, time.perf_counter() - t

    def run(self, c: dict[str, Any]) -> dict[str, Any]:
        self.fill_release(c["released_gib"])
        end = time.perf_counter() + c["pause_s"]
        if c["case"] == "busy":
            self.busy_until(end)
        elif "warm_lead_s" in c:
            time.sleep(max(0.0, end - c["warm_lead_s"] - time.perf_counter()))
            self.drv.release(self.drv.create(self.g))
        time.sleep(max(0.0, end - time.perf_counter()))
        r = dict(c)
        if c["case"] == "info_first":
            t = time.perf_counter()
            self.drv.mem_info()
            r["info_s"] = time.perf_counter() - t
        h1, r["create1_s"] = self.timed_create(self.g)
        h2, r["create2_s"] = self.timed_create(self.g)
        hb, r["create_big_s"] = self.timed_create(2 * GiB)
        if c["case"] != "info_first":
            t = time.perf_counter()
            self.drv.mem_info()
            r["info_s"] = time.perf_counter() - t
        for h in (h1, h2, hb):
            self.drv.release(h)
        return r

    def close(self) -> None:
        if self.busy_handle:
            self.drv.unmap(self.busy_ptr, self.busy_size)
            self.drv.release(self.busy_handle)
            self.drv.address_free(self.busy_ptr, self.busy_size)
            self.busy_handle = None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-gib", type=float, default=96.0, help="the large release (default 96, capped at free - 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for probe_first_create.json")
    a = ap.parse_args(argv)
    if not (a.big_gib > 16 and a.reps > 0):
        ap.error(f"--big-gib must be > 16 and --reps > 0; got --big-gib={a.big_gib:g} --reps={a.reps}")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        say(f"probe_first_create: needs torch with CUDA ({e})")
        return 2
    if not torch.cuda.is_available():
        say("probe_first_create: no CUDA device here; run it on a GPU machine (tools/gpu_job.sh firstcreate)")
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuvmm import Driver

    torch.zeros(1, device="cuda")  # the primary context is current from here on
    drv = Driver(0)
    free, _ = drv.mem_info()
    big = min(a.big_gib, (free - 8 * GiB) / GiB // 2 * 2)
    probe = Probe(drv, drv.granularity())
    runs: list[dict[str, Any]] = []
    try:
        probe.run({"case": "plain", "released_gib": 16.0, "pause_s": 0.05})  # unmeasured: first use of each call
        for c in plan(big, a.reps):
            r = probe.run(c)
            runs.append(r)
            say(f"rep {c['rep'] + 1} {key(c)}: create1 {r['create1_s'] * 1e3:.2f} ms, create2 {r['create2_s'] * 1e3:.2f} ms")
    finally:
        probe.close()
    s = summarize(runs)
    say(f"-- first cuMemCreate of a granule ({probe.g >> 20} MiB) after releasing R and pausing P; medians of {a.reps}")
    for line in table(s):
        say(line)
    diag = diagnose(s, big)
    for line in diag:
        say(f"diagnosis: {line}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, "probe_first_create.json")
        with open(path, "w") as f:
            json.dump({"probe": "first_create", "big_gib": big, "granule": probe.g, "reps": a.reps,
                       "device": torch.cuda.get_device_name(0), "runs": runs, "summary": s, "diagnosis": diag}, f, indent=1)
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
