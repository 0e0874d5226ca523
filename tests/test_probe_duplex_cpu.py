"""Issue 18's duplex probe and two-engine swap, on the CPU: the probe's arithmetic (rates from chunk events,
the duplex floor) and its whole run as a dry run (--device cpu); swap.py's summary from made-up rounds, its
orchestration end to end with engine processes that fake vLLM (--dry-run: spawn, pipes, the overlapped
start, timeouts, no process left behind), and its vLLM adapter against a stand-in for vLLM whose
allocator is ours on the host backend (the stats and wake_wait_seconds it reads are the real ones)."""
import json
import multiprocessing
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "vllm_gpu")]

import probe_duplex as probe  # noqa: E402
import swap  # noqa: E402

MiB = 1 << 20
GB = 1e9
ISSUE = probe.Rates(d2h_alone=54.8, h2d_alone=55.0, d2h_both=41.2, h2d_both=41.2)  # issue 18's H200 figures


# ---- the probe's arithmetic ---------------------------------------------------------------------------------


def test_bytes_done_by_interpolates_inside_the_running_chunk():
    ends, sizes = [1.0, 2.0, 4.0], [10, 10, 10]
    assert probe.bytes_done_by(ends, sizes, 0.0) == 0
    assert probe.bytes_done_by(ends, sizes, 0.5) == pytest.approx(5)
    assert probe.bytes_done_by(ends, sizes, 2.0) == pytest.approx(20)
    assert probe.bytes_done_by(ends, sizes, 3.0) == pytest.approx(25)
    assert probe.bytes_done_by(ends, sizes, 9.0) == pytest.approx(30)


def test_bytes_done_by_refuses_ends_that_do_not_match_the_chunks():
    with pytest.raises(ValueError, match="2 end times for 3 chunks"):
        probe.bytes_done_by([1.0, 2.0], [1, 1, 1], 1.0)


def test_run_of_both_gives_each_direction_its_rate_while_the_other_still_ran():
    # 4 chunks of 1 GB each way. D2H at 40 GB/s: done at 0.1 s. H2D at 32 GB/s while D2H runs (3.2 GB by
    # 0.1 s), then the last 0.8 GB alone at 50 GB/s: done at 0.116 s.
    sizes = [int(GB)] * 4
    run = {"d2h": [0.025, 0.05, 0.075, 0.1], "h2d": [1 / 32, 2 / 32, 3 / 32, 0.1 + 0.8 / 50]}
    r = probe.run_rates(run, sizes)
    assert r["overlap_s"] == pytest.approx(0.1)
    assert r["d2h"]["concurrent_gbps"] == pytest.approx(40)
    # the chunk running at the overlap's end counts at its average pace: off by a part of one chunk at most
    assert r["h2d"]["concurrent_gbps"] == pytest.approx(32, rel=0.03)
    assert r["h2d"]["gbps"] == pytest.approx(4 / 0.116)  # the whole run's average is not the concurrent rate
    assert r["seconds"] == pytest.approx(0.116)
    assert r["total_gbps"] == pytest.approx(8 / 0.116)


def test_floor_of_equal_sizes_at_equal_rates_is_one_direction_at_the_concurrent_rate():
    n = 8 * (1 << 30)
    assert probe.duplex_floor_seconds(n, n, ISSUE) == pytest.approx(n / 41.2e9)
    assert probe.concurrent_max_seconds(n, n, ISSUE) == pytest.approx(n / 41.2e9)
    # the issue's arithmetic: two equal transfers together take 1.33 x one alone, 0.67 x both one after the other
    assert probe.duplex_floor_seconds(n, n, ISSUE) / (n / 54.9e9) == pytest.approx(1.33, abs=0.01)
    assert probe.swap_row(n, n, ISSUE)["floor_over_sequential"] == pytest.approx(0.666, abs=0.005)


def test_floor_runs_the_rest_of_the_longer_transfer_alone():
    rates = probe.Rates(d2h_alone=50, h2d_alone=50, d2h_both=40, h2d_both=40)
    # 4 GB each way together in 0.1 s, then the other 4 GB out alone in 0.08 s
    assert probe.duplex_floor_seconds(8 * GB, 4 * GB, rates) == pytest.approx(0.18)
    assert probe.duplex_floor_seconds(8 * GB, 4 * GB, rates) < probe.concurrent_max_seconds(8 * GB, 4 * GB, rates)
    assert probe.duplex_floor_seconds(8 * GB, 0, rates) == pytest.approx(probe.sequential_seconds(8 * GB, 0, rates))


@pytest.mark.parametrize("out_gb,in_gb", [(16.65, 16.65), (16.65, 4.0), (1.0, 30.0), (0.0, 3.0)])
def test_floor_lies_between_the_longer_alone_and_both_one_after_the_other(out_gb, in_gb):
    lo = max(out_gb * GB / (ISSUE.d2h_alone * GB), in_gb * GB / (ISSUE.h2d_alone * GB))
    floor = probe.duplex_floor_seconds(out_gb * GB, in_gb * GB, ISSUE)
    assert lo - 1e-12 <= floor <= probe.sequential_seconds(out_gb * GB, in_gb * GB, ISSUE) + 1e-12
    assert floor <= probe.concurrent_max_seconds(out_gb * GB, in_gb * GB, ISSUE) + 1e-12


def test_rates_refuse_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="h2d_both=0"):
        probe.Rates(d2h_alone=1, h2d_alone=1, d2h_both=1, h2d_both=0)


def test_chunks_cover_the_bytes_with_a_short_last_one():
    assert probe.chunk_sizes(10, 4) == [4, 4, 2]
    assert probe.chunk_sizes(8, 4) == [4, 4]
    with pytest.raises(ValueError, match="positive"):
        probe.chunk_sizes(0, 4)


def test_sizes_are_cut_to_what_fits_on_both_sides_and_say_where():
    GiB = 1 << 30
    n, why = probe.fitting_bytes(8 * GiB, 256 * MiB, device_free=12 * GiB, host_available=100 * GiB, headroom=4 * GiB)
    assert n == 4 * GiB and "device" in why
    n, why = probe.fitting_bytes(8 * GiB, 256 * MiB, device_free=140 * GiB, host_available=20 * GiB, headroom=4 * GiB)
    assert n == 6 * GiB and "host" in why
    assert probe.fitting_bytes(8 * GiB, 256 * MiB, 140 * GiB, 100 * GiB, 4 * GiB) == (8 * GiB, None)


def test_probe_refuses_bad_sizes():
    with pytest.raises(SystemExit):
        probe.parse_args(["--gib", "0"])
    with pytest.raises(SystemExit):
        probe.parse_args(["--swap-gb", "-1", "2"])


# ---- the probe's dry run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("duplex")
    assert probe.main(["--device", "cpu", "--gib", str(8 / 1024), "--chunk-mib", "1", "--reps", "3",
                       "--swap-gb", "16.65", "16.65", "--out", str(out)]) == 0
    return out / "probe_duplex.json"


def test_dry_run_measures_each_direction_alone_and_both_and_writes_the_rates(probe_json, capsys):
    res = json.loads(probe_json.read_text())
    assert res["bytes"] == 8 * MiB and res["chunks"] == 8
    assert {k: len(v) for k, v in res["runs"].items()} == {"d2h": 3, "h2d": 3, "both": 3}
    assert all(len(run[d]) == 8 for run in res["runs"]["both"] for d in ("d2h", "h2d"))
    rates = probe.Rates.from_json(str(probe_json))
    assert rates == probe.Rates(**res["summary"]["rates_gbps"])
    rows = res["swap_floor"]
    assert [r["out_bytes"] for r in rows] == [8 * MiB, pytest.approx(16.65e9)]
    assert rows[1]["floor_s"] == pytest.approx(probe.duplex_floor_seconds(16.65e9, 16.65e9, rates))


def test_dry_run_says_it_is_one_and_prints_the_duplex_line(tmp_path, capsys):
    assert probe.main(["--device", "cpu", "--gib", str(2 / 1024), "--chunk-mib", "0.5", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "\nDUPLEX 0.00195312 GiB: alone D2H" in out


def test_rates_from_a_file_that_is_not_the_probes_name_the_file(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(ValueError, match="other.json: no summary.rates_gbps"):
        probe.Rates.from_json(str(bad))


# ---- swap.py: the summary -------------------------------------------------------------------------------------


def op(t0: float, seconds: float, nbytes: float, waited: float = 0.0) -> dict:
    return {"t0": t0, "t1": t0 + seconds, "seconds": seconds, "bytes": nbytes,
            "stats": {"bytes_copied": nbytes, "wait_seconds": waited}}


def made_up_round(seq: float = 0.75, ov: float = 0.45, overlapped: bool = True) -> dict:
    r = {"a_sleep": op(0, 0.32, 16.65e9), "b_wake": op(1, 0.40, 16.65e9),
         "sequential": swap.swap_record(op(2, 0.33, 16.65e9), op(2 + seq - 0.41, 0.41, 16.65e9))}
    if overlapped:
        r["overlapped"] = swap.swap_record(op(5, ov - 0.01, 16.65e9), op(5.01, ov - 0.01, 16.65e9, waited=0.2))
    return r


def test_swap_record_spans_from_the_first_start_to_the_last_end():
    rec = swap.swap_record(op(10.0, 0.3, 1), op(10.05, 0.4, 1))
    assert rec["seconds"] == pytest.approx(0.45)


def test_summary_gives_medians_and_the_ratios_against_sequential_and_the_floor():
    rounds = [made_up_round(seq=0.75, ov=0.45), made_up_round(seq=0.80, ov=0.50), made_up_round(seq=0.70, ov=0.40)]
    s = swap.summarize(rounds, ISSUE)
    assert s["sequential_s"] == pytest.approx(0.75) and s["overlapped_s"] == pytest.approx(0.45)
    assert s["a_sleep_alone_s"] == pytest.approx(0.32) and s["b_wake_alone_s"] == pytest.approx(0.40)
    assert s["sequential_over_alone_sum"] == pytest.approx(0.75 / 0.72)
    assert s["overlapped_over_sequential"] == pytest.approx(0.6) and s["speedup"] == pytest.approx(0.75 / 0.45)
    assert s["speedup_target_met"]
    floor = 16.65e9 / 41.2e9
    assert s["floor_s"] == pytest.approx(floor)
    assert s["overlapped_over_floor"] == pytest.approx(0.45 / floor)
    assert s["floor_target_met"] == (0.45 / floor <= 1.1)
    assert s["bytes_out"] == s["bytes_in"] == 16.65e9


def test_summary_of_stock_has_no_overlapped_figures_and_without_rates_no_floor():
    s = swap.summarize([made_up_round(overlapped=False)], None)
    assert "overlapped_s" not in s and "speedup" not in s and "floor_s" not in s
    lines = swap.summary_lines(s, "stock", "0.26.0")
    assert len(lines) == 1 and lines[0].startswith("INFO swap [stock, vLLM 0.26.0]: 16.65 GB out")


def test_summary_lines_say_whether_each_target_was_met():
    s = swap.summarize([made_up_round(seq=0.75, ov=0.70)], ISSUE)
    text = "\n".join(swap.summary_lines(s, "ours", "0.26.0"))
    assert "target >= 1.35: NOT met" in text and "target <= 1.1: NOT met" in text


def test_premise_says_whether_b_needs_memory_a_holds():
    assert swap.premise({"free": 50e9, "total": 150e9}, {"weights": 16e9, "kv_cache": 60e9})["b_must_wait"]
    assert not swap.premise({"free": 90e9, "total": 150e9}, {"weights": 16e9, "kv_cache": 60e9})["b_must_wait"]


def test_missing_probe_json_costs_the_floor_not_the_run(tmp_path):
    rates, note = swap.load_rates(str(tmp_path / "nope.json"))
    assert rates is None and "nope.json" in note and "times only" in note


@pytest.mark.parametrize("argv,message", [
    (["--util-a", "0.5", "--util-b", "0.45"], "both engines fit awake at once"),
    (["--util-a", "0.6", "--util-b", "0.6"], "must be below --util-a"),
    (["--util-a", "1.2"], "between 0 and 1"),
    (["--wake-wait-s", "0"], "--wake-wait-s"),
])
def test_swap_refuses_settings_that_would_not_measure_a_swap(argv, message, capsys):
    with pytest.raises(SystemExit):
        swap.parse_args(argv)
    assert message in capsys.readouterr().err


def test_outputs_compare_tokens_and_logprobs_bit_for_bit():
    ref = [([1, 2], [-0.5, -0.25])]
    assert swap.compare_outputs(ref, [([1, 2], [-0.5, -0.25])])["same"]
    r = swap.compare_outputs(ref, [([1, 2], [-0.5, -0.2500001])])
    assert not r["same"] and r["tokens_same"] and r["max_logprob_diff"] == pytest.approx(1e-7)


# ---- swap.py end to end with fake engines (--dry-run) -----------------------------------------------------------


def dry_swap(capsys, *argv):
    rc = swap.main(["--dry-run", "--reps", "2", *argv])
    out = capsys.readouterr().out
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1
    assert multiprocessing.active_children() == []  # no engine process left behind
    return rc, results[0], out


def test_dry_run_measures_every_swap_and_checks_every_wake(capsys, probe_json):
    # B's share does not fit beside A's weights until A's sleep has copied them: B's wake must wait.
    rc, r, out = dry_swap(capsys, "--util-a", "0.8", "--util-b", "0.75", "--dry-weights-share", "0.3",
                          "--floor-json", str(probe_json))
    assert rc == 0 and not r["failed"], out
    assert r["premise"]["b_must_wait"] and r["engines_differ"]
    assert r["checks"] == {"b_after_first_wake": "1/1", "a_after_swap_back": "7/7", "b_after_wake_alone": "2/2",
                           "b_after_sequential_swap": "2/2", "b_after_overlapped_swap": "2/2"}
    for rnd in r["rounds"]:
        ov = rnd["overlapped"]
        assert abs(ov["a_sleep"]["t0"] - ov["b_wake"]["t0"]) < 0.05  # started together
        assert ov["b_wake"]["stats"]["wait_seconds"] > 0.05  # and B really waited for A's weights
        assert ov["seconds"] < rnd["sequential"]["seconds"]
    s = r["summary"]
    assert s["bytes_out"] == s["bytes_in"] == 3e9 and "overlapped_over_floor" in s
    assert "INFO swap overlapped" in out and "INFO swap duplex floor" in out


def test_dry_run_of_stock_swaps_only_one_after_the_other(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "")
    rc, r, out = dry_swap(capsys)
    assert rc == 0 and r["who"] == "stock" and r["wake_wait_s"] is None
    assert all("overlapped" not in rnd for rnd in r["rounds"]) and "b_after_overlapped_swap" not in r["checks"]
    assert "stock vLLM cannot wait" in out


def test_dry_run_fails_when_a_wake_brings_back_other_outputs(capsys):
    rc, r, out = dry_swap(capsys, "--dry-lose-at-wake-b", "3")  # B's third wake: the first sequential swap
    assert rc == 1 and r["failed"] and r["checks"]["b_after_sequential_swap"] == "1/2"
    assert r["mismatches"][0]["check"] == "b_after_sequential_swap"
    assert "MISMATCH b_after_sequential_swap" in out and "FAIL b_after_sequential_swap" in out


def test_dry_run_names_the_engine_that_hangs_and_ends_both_processes(capsys):
    rc, r, out = dry_swap(capsys, "--dry-hang-at-wake-b", "2", "--op-timeout", "1.5")
    assert rc == 1 and r["error"] == "engine b: no answer to check within 1.5 s"
    assert "rounds" not in r or r["rounds"] == []


def test_b_bigger_than_a_breaks_vllms_sleep_check_in_the_overlapped_swap(capsys, monkeypatch):
    # Why --util-b must be below --util-a: the fake keeps vLLM's assertion; the parser's guard is bypassed.
    # B needs more than A frees by more than its weights, so the sleep's check fails however the two calls
    # interleave (with less, it fails only when A reads free memory before B's wake takes any).
    monkeypatch.setattr(swap, "parse_args", lambda argv: swap.argparse.Namespace(
        model="llama3-8b", util_a=0.55, util_b=0.7, reps=1, wake_wait_s=30.0, floor_json=None, graphs=False, mp=False,
        start_timeout=30.0, op_timeout=30.0, json=None, dry_run=True, dry_total_gb=10.0, dry_gbps=20.0,
        dry_weights_share=0.12, dry_lose_at_wake_a=None, dry_lose_at_wake_b=None, dry_hang_at_wake_b=None))
    rc, r, out = dry_swap(capsys)
    assert rc == 1 and "engine a: sleep failed" in r["error"] and "Memory usage increased after sleeping" in r["error"]


# ---- swap.py's vLLM adapter against a stand-in for vLLM ----------------------------------------------------------

# A package named vllm, written to a directory put first on sys.path (spawned engine processes get the same
# path): LLM as swap.py and e2e.py use it, with one worker whose model lives in the weights pool of OUR
# allocator on the host backend, so the stats and wake_wait_seconds swap.py reads are the real ones.
STAND_IN_VLLM = {
    "vllm/__init__.py": """
import types

import torch

import e2e
from vllm_sleep_ext import CuMemAllocator

__version__ = "0.0-stand-in"
MiB = 1 << 20
ALLOCATOR = CuMemAllocator(backend="host", capacity_bytes=256 * MiB)
torch.cuda.mem_get_info = lambda *a: (40 * MiB, 64 * MiB)  # the tests put the real one back
e2e.scribble = lambda tp: 123


def SamplingParams(**kw):
    return kw


class LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        model = torch.nn.Linear(64, 64)
        with ALLOCATOR.use_memory_pool(tag="weights"):
            ALLOCATOR.place_module(model)
        with ALLOCATOR.use_memory_pool(tag="kv_cache"):
            self.kv = ALLOCATOR.empty((MiB,), torch.uint8)
        self.worker = types.SimpleNamespace(get_model=lambda: model, rank=0)

    def collective_rpc(self, fn, args=()):
        return [fn(self.worker, *args)]

    def generate(self, prompts, params, use_tqdm=False):
        w = self.worker.get_model().weight.detach().view(-1)
        tokens, logprobs = [int(w[i].abs() * 1e6) % 1000 for i in range(4)], [float(w[i]) for i in range(4)]
        out = types.SimpleNamespace(token_ids=tokens, logprobs=[{t: types.SimpleNamespace(logprob=x)}
                                                                for t, x in zip(tokens, logprobs)])
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    def sleep(self, level=1):
        ALLOCATOR.sleep(offload_tags=("weights",))

    def wake_up(self, tags=None):
        ALLOCATOR.wake_up(tags)

    def reset_prefix_cache(self):
        pass
""",
    "vllm/device_allocator/__init__.py": "",
    "vllm/device_allocator/cumem.py": """
import vllm


class CuMemAllocator:
    @staticmethod
    def get_instance():
        return vllm.ALLOCATOR
""",
}


@pytest.fixture
def stand_in_path(tmp_path, monkeypatch):
    for rel, text in STAND_IN_VLLM.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "mem_get_info", torch.cuda.mem_get_info)  # restored after the stand-in's
    monkeypatch.setattr(swap.e2e, "scribble", swap.e2e.scribble)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def stand_in_vllm(stand_in_path):
    import vllm

    return vllm.ALLOCATOR


def engine(seed: int) -> "swap.VllmEngine":
    return swap.VllmEngine({"model": "llama-tiny", "util": 0.6, "eager": True, "seed": seed})


def test_vllm_adapter_starts_salted_and_reads_the_bytes_each_call_moved(stand_in_vllm):
    e = engine(seed=1)
    info = e.start()
    assert info["vllm"] == "0.0-stand-in" and info["memory"] == {"free": 40 * MiB, "total": 64 * MiB}
    assert e.llm.kwargs["gpu_memory_utilization"] == 0.6 and e.llm.kwargs["enforce_eager"] is True
    assert info["pools"]["kv_cache"] == MiB and info["offload_bytes"] == info["pools"]["weights"]
    assert "vllm_sleep_ext" in info["workers"][0]["allocator"]
    s = e.sleep()
    assert s["bytes"] == s["stats"]["bytes_copied"] == 64 * 64 * 4 + 64 * 4 and s["seconds"] >= 0
    assert e.scribble() == {"bytes": 123}
    assert e.set_wake_wait(2.5) == {"before": 0.0} and stand_in_vllm.wake_wait_seconds == 2.5
    w = e.wake()
    assert w["bytes"] == s["bytes"] and w["stats"]["wait_seconds"] == 0.0
    assert e.check()["same"]


def test_vllm_adapter_check_sees_a_weight_the_wake_did_not_bring_back(stand_in_vllm):
    e = engine(seed=1)
    e.start()
    e.sleep()
    e.wake()
    with torch.no_grad():
        e.llm.worker.get_model().weight.view(-1)[0] += 1e-3
    assert not e.check()["same"]


def test_salting_makes_two_engines_of_the_same_dummy_model_differ(stand_in_vllm):
    first = engine(seed=1).start()["reference"]
    again = engine(seed=1).start()["reference"]
    other = engine(seed=2).start()["reference"]
    assert first == again and first != other


def test_real_engine_processes_run_every_swap_on_the_stand_in(stand_in_path, capsys):
    # Not --dry-run: each spawned process imports "vllm" (the stand-in) and drives it through VllmEngine.
    rc = swap.main(["--reps", "1", "--model", "llama-tiny", "--start-timeout", "60", "--op-timeout", "60"])
    out = capsys.readouterr().out
    r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert rc == 0 and not r["failed"], out
    assert r["vllm"] == "0.0-stand-in" and r["engines_differ"]
    assert r["checks"]["b_after_overlapped_swap"] == "1/1" and r["checks"]["a_after_swap_back"] == "4/4"
    ov = r["rounds"][0]["overlapped"]
    assert ov["a_sleep"]["bytes"] == ov["b_wake"]["bytes"] == 64 * 64 * 4 + 64 * 4
    assert multiprocessing.active_children() == []


def test_an_engine_process_that_cannot_start_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('this vLLM is broken')\n")
    rc = swap.main(["--reps", "1", "--start-timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 1 and "engine b: start failed" in out and "this vLLM is broken" in out
    assert multiprocessing.active_children() == []


def test_waiting_at_wake_is_refused_by_an_allocator_without_it(monkeypatch):
    cumem = types.ModuleType("vllm.device_allocator.cumem")

    class StockAllocator:
        pointer_to_data: dict = {}

    cumem.CuMemAllocator = types.SimpleNamespace(get_instance=lambda: StockAllocator())
    monkeypatch.setitem(sys.modules, "vllm.device_allocator.cumem", cumem)
    with pytest.raises(TypeError, match="StockAllocator cannot wait for memory at wake"):
        swap.set_wake_wait(None, 30.0)
    assert swap.last_op_stats(None, "sleep") is None


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_engine_processes_end_with_the_driver_however_it_is_stopped(signal_name):
    # run.sh's `timeout` sends SIGTERM; a killed device call may take the driver down with SIGKILL.
    import os
    import signal
    import subprocess
    import time

    driver = subprocess.Popen([sys.executable, str(ROOT / "tests" / "vllm_gpu" / "swap.py"), "--dry-run",
                               "--dry-hang-at-wake-b", "2", "--op-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in driver.stdout:
            if line.startswith("INFO with A awake"):  # both engines started, B's check about to hang
                break
        time.sleep(1.0)  # B's second wake is done by now, and its check hangs (the driver waits for it)
        children = Path(f"/proc/{driver.pid}/task/{driver.pid}/children").read_text().split()
        assert len(children) >= 2  # the two engines (and multiprocessing's resource tracker)
        driver.send_signal(getattr(signal, signal_name))
        assert driver.wait(30) != 0
        deadline = time.monotonic() + 15
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
            time.sleep(0.1)
        assert alive == [], f"engine processes left after {signal_name}: {alive}"
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.stdout.close()
        for pid in children if "children" in locals() else []:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
