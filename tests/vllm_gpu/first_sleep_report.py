"""Issue 17's tables from one call: item 2 from a `first32b` call (stock and ours, e2e.py `first`, and the
pinned-copy limit measured by the same call: run.sh `limit`, $OUT/limit.json); items 1 and 3 (`--timing`)
from a `timing` call (e2e.py `timing` of stock and ours: the warm level-1 wakes, at once and after a while
asleep, against the limit (H2D); level 2 against the driver's floor measured in each run's worker).

    python tests/vllm_gpu/first_sleep_report.py $OUT/vllm-results.jsonl $OUT/limit.json [--kit 0.26] [--timing]

Targets: ours' first level-1 sleep >= 0.9 x the limit (D2H), decode throughput after the first request
>= 0.97 x stock's; ours' warm level-1 wake >= 0.95 x the limit (H2D); level-2 sleep + wake <= 1.1 x the
driver floor and <= 0.5 x stock's. Exit status 1 when a run is missing; the verdicts are printed, not enforced.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

FIRST_SLEEP_TARGET = 0.9  # x the pinned-copy limit
DECODE_TARGET = 0.97  # x stock's decode throughput
WAKE_TARGET = 0.95  # x the pinned-copy limit (H2D)
LEVEL2_FLOOR_TARGET = 1.1  # x the driver's floor
LEVEL2_STOCK_TARGET = 0.5  # x stock's level-2 sleep + wake


def latest_runs(lines: list[dict], kit: Optional[str], command: str = "first") -> dict[str, dict]:
    """The last run of `command` of stock and of ours (of `kit` if given), by who ran it."""
    runs: dict[str, dict] = {}
    for line in lines:
        r = line.get("r", {})
        if r.get("command") == command and (kit is None or line.get("kit") == kit):
            runs[line["who"]] = {**r, "rc": line.get("rc"), "vllm": line.get("vllm")}
    return runs


def _cell(seconds: Optional[float], nbytes: Optional[int], limit_gbps: Optional[float]) -> str:
    if seconds is None:
        return "-"
    text = f"{seconds:.3f} s"
    if nbytes:
        gbps = nbytes / 1e9 / seconds
        text += f" ({gbps:.1f} GB/s"
        text += f", {gbps / limit_gbps:.2f} x)" if limit_gbps else ")"
    return text


def build(runs: dict[str, dict], limit: Optional[dict]) -> tuple[list[str], dict]:
    """Markdown table lines and the verdicts {name: {"value", "target", "met"}}."""
    d2h = (limit or {}).get("d2h_gbps")
    stock, ours = runs.get("stock", {}), runs.get("ours", {})
    nbytes = ours.get("level1_offload_bytes") or stock.get("level1_offload_bytes")
    limit_s = nbytes / 1e9 / d2h if nbytes and d2h else None
    model = ours.get("model") or stock.get("model") or "?"
    after = ours.get("first_sleep_after_ready_s") or stock.get("first_sleep_after_ready_s")
    lines = [f"{model}, level 1 offloads {nbytes / 1e9 if nbytes else 0:.2f} GB; first sleep {after} s after the "
             f"engine is ready; vLLM {ours.get('vllm') or stock.get('vllm')}",
             "",
             "| | stock | ours | pinned-copy limit |",
             "| --- | --- | --- | --- |"]
    limit_cell = f"{limit_s:.3f} s ({d2h:.1f} GB/s)" if limit_s else "-"
    for label, key in (("first level-1 sleep", "level1_first_sleep_s"), ("warm level-1 sleep", "level1_warm_sleep_s")):
        lines.append(f"| {label} | {_cell(stock.get(key), nbytes, d2h)} | {_cell(ours.get(key), nbytes, d2h)} | "
                     f"{limit_cell} |")
    for label, key in (("first level-1 wake", "level1_first_wake_s"), ("warm level-1 wake", "level1_warm_wake_s")):
        lines.append(f"| {label} | {_cell(stock.get(key), None, None)} | {_cell(ours.get(key), None, None)} | - |")
    ds, do = stock.get("decode_after_first_request"), ours.get("decode_after_first_request")
    lines.append(f"| decode tokens/s after the first request | {ds or '-'} | {do or '-'} | - |")
    during = ours.get("decode_during_serving_prepare")
    if during:
        lines.append(f"| ours: decode while the preparation runs throttled by serving | - | {during['during']} "
                     f"({during['ratio']:.3f} x after it) | - |")
    host = ours.get("host_before_first_sleep")
    if host:
        lines.append(f"| ours: host memory ready at the first sleep | - | {host} | - |")
    verdicts: dict = {}
    first = ours.get("level1_first_sleep_s")
    if first and limit_s:
        ratio = limit_s / first
        verdicts["first_sleep_vs_limit"] = {"value": round(ratio, 3), "target": FIRST_SLEEP_TARGET,
                                            "met": ratio >= FIRST_SLEEP_TARGET}
    if ds and do:
        ratio = do / ds
        verdicts["decode_ours_vs_stock"] = {"value": round(ratio, 3), "target": DECODE_TARGET,
                                            "met": ratio >= DECODE_TARGET}
    if during:
        verdicts["decode_during_prepare_vs_after"] = {"value": during["ratio"], "target": DECODE_TARGET,
                                                      "met": during["ratio"] >= DECODE_TARGET}
    sf = stock.get("level1_first_sleep_s")
    if sf and first:
        verdicts["first_sleep_speedup_vs_stock"] = {"value": round(sf / first, 2), "target": None, "met": None}
    return lines, verdicts


def build_wake(runs: dict[str, dict], limit: Optional[dict]) -> tuple[list[str], dict]:
    """Item 1: the warm level-1 wakes of the timing runs (at once after the sleep, and after a while asleep)
    against the pinned-copy limit (H2D) for the bytes level 1 offloads."""
    h2d = (limit or {}).get("h2d_gbps")
    stock, ours = runs.get("stock", {}), runs.get("ours", {})
    nbytes = ours.get("level1_offload_bytes") or stock.get("level1_offload_bytes")
    limit_s = nbytes / 1e9 / h2d if nbytes and h2d else None
    rested = ours.get("level1_rested_asleep_s") or stock.get("level1_rested_asleep_s")
    rows = [("warm level-1 wake, right after the sleep", "level1_warm_wake_s", "warm_wake_vs_limit")]
    if rested:
        rows.append((f"warm level-1 wake after {rested:g} s asleep", "level1_rested_wake_s", "rested_wake_vs_limit"))
    lines = ["| level 1 | stock | ours | pinned-copy limit |", "| --- | --- | --- | --- |"]
    limit_cell = f"{limit_s:.3f} s ({h2d:.1f} GB/s)" if limit_s else "-"
    verdicts: dict = {}
    for label, key, name in rows:
        lines.append(f"| {label} | {_cell(stock.get(key), nbytes, h2d)} | {_cell(ours.get(key), nbytes, h2d)} | "
                     f"{limit_cell} |")
        if ours.get(key) and limit_s:
            ratio = limit_s / ours[key]
            verdicts[name] = {"value": round(ratio, 3), "target": WAKE_TARGET, "met": ratio >= WAKE_TARGET}
    return lines, verdicts


def build_level2(runs: dict[str, dict]) -> tuple[list[str], dict]:
    """Item 3: level-2 sleep + wake (the medians of e2e.py timing) against the driver's floor of each run:
    llm.sleep()/wake_up() as the user sees them, and ours also by the allocator's own seconds, which like the
    floor are measured in the worker (the difference is vLLM's RPC and bookkeeping around each call)."""
    lines = ["| level 2 | sleep | wake weights | wake kv | total | driver floor (release + create/map) | x floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    totals = {}
    for who in ("stock", "ours"):
        r = runs.get(who)
        if not r or "level2_sleep_s" not in r:
            continue
        total = r["level2_sleep_s"] + r["level2_wake_weights_s"] + r["level2_wake_kv_s"]
        totals[who] = total
        floors = r.get("level2_driver_floor") or []
        floor = max((f["total_s"] for f in floors), default=None)
        detail = (f"{floor:.3f} s ({max(f['release_s'] for f in floors):.3f} + {max(f['create_map_s'] for f in floors):.3f}"
                  f"; {floors[0]['handles']} handles)" if floor else "-")
        lines.append(f"| {who} | {r['level2_sleep_s']:.3f} s | {r['level2_wake_weights_s']:.3f} s | "
                     f"{r['level2_wake_kv_s']:.3f} s | {total:.3f} s | {detail} | "
                     f"{f'{total / floor:.2f}' if floor else '-'} |")
        totals[f"{who}_floor"] = floor
        cycles = r.get("level2_core_s")
        if cycles:  # the allocator's own seconds, in the worker as the floor is: no vLLM RPC around them
            mid = sorted(cycles, key=sum)[len(cycles) // 2]  # the median cycle by its total
            own = sum(mid)
            lines.append(f"| {who}, in the allocator (its own seconds) | {mid[0]:.3f} s | {mid[1]:.3f} s | "
                         f"{mid[2]:.3f} s | {own:.3f} s | (the same) | {f'{own / floor:.2f}' if floor else '-'} |")
            totals[f"{who}_core"] = own
    verdicts: dict = {}
    if totals.get("ours_core") and totals.get("ours_floor"):
        ratio = totals["ours_core"] / totals["ours_floor"]
        verdicts["level2_core_vs_floor"] = {"value": round(ratio, 3), "target": LEVEL2_FLOOR_TARGET,
                                            "met": ratio <= LEVEL2_FLOOR_TARGET}
    if totals.get("ours") and totals.get("ours_floor"):
        ratio = totals["ours"] / totals["ours_floor"]
        verdicts["level2_vs_floor"] = {"value": round(ratio, 3), "target": LEVEL2_FLOOR_TARGET,
                                       "met": ratio <= LEVEL2_FLOOR_TARGET}
    if totals.get("ours") and totals.get("stock"):
        ratio = totals["ours"] / totals["stock"]
        verdicts["level2_vs_stock"] = {"value": round(ratio, 3), "target": LEVEL2_STOCK_TARGET,
                                       "met": ratio <= LEVEL2_STOCK_TARGET}
    return lines, verdicts


def _say(prefix: str, verdicts: dict, bound: str) -> None:
    for name, v in verdicts.items():
        met = "" if v["met"] is None else (" MET" if v["met"] else " NOT MET")
        target = "" if v["target"] is None else f" (target {bound} {v['target']})"
        print(f"{prefix} {name}: {v['value']}{target}{met}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="vllm-results.jsonl")
    p.add_argument("limit", help="limit.json from run.sh's limit")
    p.add_argument("--kit")
    p.add_argument("--timing", action="store_true", help="items 1 and 3's tables from the timing runs instead")
    args = p.parse_args(argv)
    with open(args.results) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    try:
        with open(args.limit) as f:
            limit = json.load(f)
    except (OSError, ValueError) as e:
        print(f"no pinned-copy limit ({e}): ratios left out")
        limit = None
    prefix = "TIMING" if args.timing else "FIRST32B"
    runs = latest_runs(lines, args.kit, "timing" if args.timing else "first")
    if args.timing:
        table, verdicts = build_wake(runs, limit)
        print("\n".join(table))
        _say("WAKE", verdicts, ">=")
        table, verdicts = build_level2(runs)
        print("\n".join(table))
        _say("LEVEL2", verdicts, "<=")
    else:
        table, verdicts = build(runs, limit)
        print("\n".join(table))
        _say(prefix, verdicts, ">=")
    missing = [who for who in ("stock", "ours") if who not in runs]
    if missing:
        print(f"{prefix} missing runs: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
