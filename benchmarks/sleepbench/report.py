"""The report: one Row per figure (value, the limit it is compared with, target, verdict), the markdown
table, results.json and the plot. Pure logic on the results dict: runs anywhere, no GPU needed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from .common import GiB, MiB, gbps, log, median
from .targets import target


@dataclasses.dataclass
class Row:
    figure: str
    size_gib: Optional[float]
    value: Optional[float]
    unit: str
    limit: Optional[float] = None      # GB/s of the pinned copy in the same direction and size
    target: str = ""
    verdict: str = "info"
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.value is None or not self.limit:
            return None
        return self.value / self.limit


def limit_at(res: dict, size: Optional[float], direction: str) -> Optional[float]:
    sizes = (res.get("limit") or {}).get("sizes") or {}
    rec = sizes.get(str(float(size))) if size is not None else None
    return rec.get(f"{direction}_gbps") if rec else None


def rows_limit(res: dict) -> list[Row]:
    lim = res.get("limit") or {}
    if "error" in lim:
        return [Row("pinned-copy limit", None, None, "GB/s", note=lim["error"], verdict="n/a")]
    rows = []
    for size, rec in sorted((lim.get("sizes") or {}).items(), key=lambda kv: float(kv[0])):
        s = float(size)
        rows.append(Row("pinned-copy limit D2H", s, rec["d2h_gbps"], "GB/s", rec["d2h_gbps"]))
        rows.append(Row("pinned-copy limit H2D", s, rec["h2d_gbps"], "GB/s", rec["h2d_gbps"]))
    if lim.get("pin_alloc_s"):
        rows.append(Row("cudaHostAlloc via torch pin_memory", round(lim["pin_alloc_bytes"] / GiB, 2),
                        gbps(lim["pin_alloc_bytes"], lim["pin_alloc_s"]), "GB/s",
                        note="cost of getting pinned memory"))
    return rows


def rows_level1(res: dict, label: str, r: dict, size: float, judged: bool = True) -> list[Row]:
    if "error" in r:
        broken = "FAIL" if judged else "BROKEN"
        return [Row(f"{label}: level 1", size, None, "GB/s",
                    verdict=broken if r.get("verify_failed") else "n/a", note=r["error"])]
    d2h, h2d = limit_at(res, size, "d2h"), limit_at(res, size, "h2d")
    fs, fw = r["first_sleep"], r["first_wake"]
    ws = median(x["gbps"] for x in r["warm_sleep"])
    ww = median(x["gbps"] for x in r["warm_wake"])
    rows = [
        _ratio_row(f"{label}: L1 first sleep", size, fs["gbps"], d2h, "first_sleep_x", judged),
        _ratio_row(f"{label}: L1 wake after first sleep", size, fw["gbps"], h2d, None, judged),
        _ratio_row(f"{label}: L1 warm sleep (median)", size, ws, d2h, "warm_x", judged),
        _ratio_row(f"{label}: L1 warm wake (median)", size, ww, h2d, "warm_x", judged),
    ]
    if judged:
        rows += _rows_level1_ext_extras(r, size, d2h, h2d)
    return rows


def _ratio_row(fig: str, size: float, value: Optional[float], limit: Optional[float],
               key: Optional[str], judged: bool) -> Row:
    """A GB/s figure judged (when `key` names a target and `judged`) by its ratio to the limit."""
    row = Row(fig, size, value, "GB/s", limit)
    if key is not None and judged:
        row.target = target(key).text
        row.verdict = target(key).verdict(row.ratio)
    return row


def _rows_level1_ext_extras(r: dict, size: float, d2h: Optional[float],
                            h2d: Optional[float]) -> list[Row]:
    rows = [
        Row("ext: L1 warm sleep, stats() internal", size,
            median(x.get("internal_gbps") for x in r["warm_sleep"]), "GB/s", d2h),
        Row("ext: L1 warm wake, stats() internal", size,
            median(x.get("internal_gbps") for x in r["warm_wake"]), "GB/s", h2d),
        Row("ext: L1 memory returned on sleep", size,
            median(x.get("returned_pct") for x in [r["first_sleep"]] + r["warm_sleep"]), "%",
            target=target("returned_pct").text),
        _host_row("ext: host bytes / backed up, keep_host_backups=True", size,
                  [r["first_sleep"]] + r["warm_sleep"]),
    ]
    rows[2].verdict = target("returned_pct").verdict(rows[2].value)
    if "nokeep_sleep" in r:
        rows += [
            Row("ext: L1 warm sleep, keep_host_backups=False", size,
                median(x["gbps"] for x in r["nokeep_sleep"]), "GB/s", d2h),
            Row("ext: L1 warm wake, keep_host_backups=False", size,
                median(x["gbps"] for x in r["nokeep_wake"]), "GB/s", h2d),
            _host_row("ext: host bytes / backed up, keep_host_backups=False", size,
                      r["nokeep_sleep"]),
        ]
    elif "nokeep_error" in r:
        rows.append(Row("ext: keep_host_backups=False", size, None, "", verdict="n/a",
                        note=r["nokeep_error"]))
    return rows


def _host_row(fig: str, size: float, sleeps: list[dict]) -> Row:
    ratios = [x.get("host_ratio") for x in sleeps if x.get("host_ratio") is not None]
    value = max(ratios) if ratios else None
    return Row(fig, size, value, "x", target=target("host_ratio").text,
               verdict=target("host_ratio").verdict(value), note="max over sleeps")


def rows_level2(res: dict) -> list[Row]:
    r = res.get("level2")
    if r is None:
        return []
    if "error" in r:
        return [Row("L2 sleep + wake", None, None, "ms", verdict="n/a", note=r["error"])]
    cyc = r["cycles"]
    size = (r["weights_bytes"] + r["kv_bytes"]) / GiB
    note = (f"{r['weights_bytes'] / GiB:.2f}+{r['kv_bytes'] / GiB:.2f} GiB"
            + (" (clamped)" if r["clamped"] else ""))
    total = median(c["total_ms"] for c in cyc)
    returned = min((c["returned_pct"] for c in cyc if c["returned_pct"] is not None), default=None)
    intact = all(c["buffers_intact"] for c in cyc + r.get("cycles_no_pause", []))
    pause = f"{r['pause_s']:g} s pause" if r.get("pause_s") else "no pause"
    rows = [
        Row("L2 sleep(offload_tags=())", size, median(c["sleep_ms"] for c in cyc), "ms", note=note),
        Row("L2 wake_up(['weights'])", size, median(c["wake_weights_ms"] for c in cyc), "ms"),
        Row("L2 wake_up(['kv_cache'])", size, median(c["wake_kv_ms"] for c in cyc), "ms"),
        Row(f"L2 sleep + wake, median, {pause}", size, total, "ms", target=target("l2_ms").text,
            verdict=target("l2_ms").verdict(total),
            note=f"{len(cyc)} cycles; first {cyc[0]['total_ms']:.1f}, max {max(c['total_ms'] for c in cyc):.1f} ms"),
        Row("L2 memory returned on sleep (min)", size, returned, "%",
            target=target("returned_pct").text, verdict=target("returned_pct").verdict(returned)),
        Row("L2 buffers intact after wake", size, 1.0 if intact else 0.0, "bool", target="1",
            verdict="PASS" if intact else "FAIL",
            note=f"{r['buffer_bytes'] / MiB:.1f} MiB buffers, preserved "
                 f"{(cyc[0].get('preserved_bytes') or 0) / MiB:.1f} MiB"),
    ]
    fast = r.get("cycles_no_pause")
    if fast:
        rows.insert(4, Row("L2 sleep + wake, median, no pause", size, median(c["total_ms"] for c in fast), "ms",
                           note=f"{len(fast)} cycles; max {max(c['total_ms'] for c in fast):.1f} ms"))
    return rows


def rows_load(res: dict) -> list[Row]:
    r = res.get("load")
    if r is None:
        return []
    size = res["config"]["load_gib"]
    return [
        Row("load: torch allocator alloc+fill", size, _ms(r.get("torch_s")), "ms"),
        Row("load: weights pool alloc+fill", size, _ms(r.get("pool_s")), "ms"),
        Row("load: pool / torch time", size, r.get("ratio"), "x", target=target("load_ratio").text,
            verdict=target("load_ratio").verdict(r.get("ratio"))),
    ]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return seconds * 1e3 if seconds is not None else None


def rows_peers(res: dict) -> list[Row]:
    rows = []
    size = res["config"].get("peer_gib")
    for name, r in (res.get("peers") or {}).items():
        label = name + (f" [{r['tms_hook']} hook]" if r.get("tms_hook") else "")
        if name.endswith("-retained") and r.get("tms_retain_supported") is False:
            label += " (retain property absent; env TMS_RETAIN_CPU_BACKUP=1 set)"
        rows += rows_level1(res, label, r, size, judged=False)
    return rows


# Which target each host policy's warm figures are held to ("release" finds new memory every sleep).
POLICY_TARGETS = {"pinned": "warm_x", "reclaimable": "reclaimable_warm_x",
                  "reclaimable-half-pinned": "reclaimable_warm_x", "release": None}


def rows_host(res: dict) -> list[Row]:
    """The first sleep after a background prepare, and warm cycles under each host policy."""
    r = res.get("host")
    if r is None:
        return []
    if "error" in r:
        return [Row("ext: host policies / background prepare", None, None, "GB/s",
                    verdict="FAIL" if r.get("verify_failed") else "n/a", note=r["error"])]
    size = float(r["size_gib"])
    d2h, h2d = limit_at(res, size, "d2h"), limit_at(res, size, "h2d")
    fs = r["first_sleep"]
    op = (fs.get("stats") or {}).get("last_sleep") or {}
    staging = (op.get("populate_seconds") or 0.0) + (op.get("pin_seconds") or 0.0)
    first = _ratio_row("ext: L1 first sleep after background prepare", size, fs["gbps"], d2h, "first_sleep_x", True)
    first.note = (f"prepare done {r['prepare_s']:.2f} s after the weights pool closed; staging in the sleep "
                  f"{staging * 1e3:.1f} ms" + (f"; prepare error: {r['prepare_error']}" if r.get("prepare_error") else ""))
    rows = [first]
    before, during = r.get("serving_steps_per_s_before"), r.get("serving_steps_per_s_during")
    if before and during:
        rows.append(Row("ext: serving-like steps/s during background prepare / before", size, during / before, "x",
                        note=f"{before:.0f} steps/s before; prepare "
                             + ("still running when the probe ended" if r.get("serving_probe_overlapped")
                                else "done before the probe ended: the probe overlaps only part of it")))
    for policy, pr in (r.get("policies") or {}).items():
        key = POLICY_TARGETS.get(policy)
        backed = median(x["bytes"] for x in pr["sleep"]) or 1
        held = max((a["host_bytes"] for a in pr["awake"]), default=None)
        pinned = max((a["pinned_bytes"] for a in pr["awake"]), default=None)
        rows += [
            _ratio_row(f"ext: L1 warm sleep, host_policy={policy}", size,
                       median(x["gbps"] for x in pr["sleep"]), d2h, key, True),
            _ratio_row(f"ext: L1 warm wake, host_policy={policy}", size,
                       median(x["gbps"] for x in pr["wake"]), h2d, key, True),
            Row(f"ext: host bytes held while awake / backed up, host_policy={policy}", size,
                None if held is None else held / backed, "x", note="max over cycles"),
            Row(f"ext: host bytes pinned while awake, host_policy={policy}", size,
                None if pinned is None else pinned / GiB, "GiB", note="max over cycles"),
        ]
        lazy = [a.get("lazyfree_bytes") for a in pr["awake"] if a.get("lazyfree_bytes") is not None]
        if lazy:
            rows.append(Row(f"ext: process LazyFree while awake, host_policy={policy}", size, min(lazy) / GiB, "GiB",
                            note="min over cycles; what the kernel may take back (smaps_rollup)"))
    return rows


def build_rows(res: dict) -> list[Row]:
    rows = rows_limit(res)
    for size, r in sorted((res.get("level1") or {}).items(), key=lambda kv: float(kv[0])):
        rows += rows_level1(res, "ext", r, float(size))
    return rows + rows_host(res) + rows_level2(res) + rows_load(res) + rows_peers(res)


def _num(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit in ("ms", "GB/s"):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if unit == "%":
        return f"{v:.3f}"
    if unit == "bool":
        return "yes" if v else "no"
    return f"{v:.3f}"


def markdown_table(rows: Sequence[Row]) -> str:
    head = ("| figure | size GiB | value | unit | limit GB/s | x limit | target | result | note |\n"
            "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | --- |")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.figure} | {'' if r.size_gib is None else f'{r.size_gib:g}'} | "
                     f"{_num(r.value, r.unit)} | {r.unit} | {_num(r.limit, 'GB/s') if r.limit else ''}"
                     f" | {'' if r.ratio is None else f'{r.ratio:.3f}'} | {r.target} | {r.verdict} "
                     f"| {r.note.replace('|', '/')} |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> dict:
    counts = {v: sum(1 for r in rows if r.verdict == v) for v in ("PASS", "FAIL", "n/a")}
    counts["failed"] = [f"{r.figure} @ {r.size_gib:g} GiB" if r.size_gib is not None else r.figure
                        for r in rows if r.verdict == "FAIL"]
    return counts


def write_plot(res: dict, path: Path) -> Optional[str]:
    """GB/s vs size, one line per method, the pinned-copy limit as lines. Returns a reason if skipped."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable ({type(exc).__name__})"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ticks: set[float] = set()
    for label, xs, ys, style, marker in plot_series(res):
        if xs:
            ax.plot(xs, ys, style, label=label, marker=marker)
            ticks.update(xs)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("weights size (GiB)")
    ax.set_ylabel("GB/s (1e9 bytes/s)")
    env = (res.get("limit") or {}).get("env") or {}
    ax.set_title(f"sleep/wake vs pinned-copy limit - {env.get('gpu', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_series(res: dict) -> list[tuple[str, list, list, str, str]]:
    lim = (res.get("limit") or {}).get("sizes") or {}
    lsz = sorted(lim, key=float)
    series = [("pinned-copy limit D2H", [float(s) for s in lsz], [lim[s]["d2h_gbps"] for s in lsz],
               "k-", "o"),
              ("pinned-copy limit H2D", [float(s) for s in lsz], [lim[s]["h2d_gbps"] for s in lsz],
               "k--", "o")]
    l1 = {k: v for k, v in (res.get("level1") or {}).items() if "error" not in v}
    sz = sorted(l1, key=float)
    pick: list[tuple[str, Callable[[dict], Optional[float]], str]] = [
        ("ext first sleep", lambda r: r["first_sleep"]["gbps"], "C0-"),
        ("ext warm sleep", lambda r: median(x["gbps"] for x in r["warm_sleep"]), "C1-"),
        ("ext warm wake", lambda r: median(x["gbps"] for x in r["warm_wake"]), "C2-"),
        ("ext sleep keep_host_backups=False",
         lambda r: median(x["gbps"] for x in r.get("nokeep_sleep", [])), "C3:"),
    ]
    for label, f, style in pick:
        pts = [(float(s), f(l1[s])) for s in sz if f(l1[s]) is not None]
        series.append((label, [p[0] for p in pts], [p[1] for p in pts], style, "o"))
    h = res.get("host") or {}
    if "first_sleep" in h:
        x = float(h["size_gib"])
        series.append(("ext first sleep after background prepare", [x], [h["first_sleep"]["gbps"]], "C0", "*"))
        for j, (policy, pr) in enumerate((h.get("policies") or {}).items()):
            series.append((f"ext warm sleep host_policy={policy}", [x], [median(s["gbps"] for s in pr["sleep"])],
                           f"C{7 + j}", "D"))
    for i, (name, r) in enumerate((res.get("peers") or {}).items()):
        if "error" in r:
            continue
        x = float(r["size_gib"])
        series.append((f"{name} first sleep", [x], [r["first_sleep"]["gbps"]], f"C{4 + i}", "s"))
        series.append((f"{name} warm sleep", [x], [median(s["gbps"] for s in r["warm_sleep"])],
                       f"C{4 + i}", "^"))
        series.append((f"{name} warm wake", [x], [median(s["gbps"] for s in r["warm_wake"])],
                       f"C{4 + i}", "v"))
    return series


def write_outputs(res: dict, rows: Sequence[Row], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res["rows"] = [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]
    res["summary"] = summary(rows)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=repr))
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    why = write_plot(res, out / "bench_sleep.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f"; no plot: {why}" if why else f", {out / 'bench_sleep.png'}"))
