"""Two vLLM engines on one GPU, swapped the way multi-model servers swap them: A is put to sleep (level 1,
its weights to host) and B is woken (its weights back), where both cannot be awake at once (issue 18).

Ours or stock by vLLM's plugin loader, as e2e.py: ``VLLM_PLUGINS=vllm_sleep_ext`` / ``VLLM_PLUGINS=""``.

    python tests/vllm_gpu/swap.py --model llama3-8b [--floor-json OUT/probe_duplex.json]
    python tests/vllm_gpu/swap.py --dry-run            # the orchestration without vLLM or a GPU (CPU tests)

Each engine runs in its own process (multiprocessing, spawn; the engine core in that process unless --mp),
driven over a pipe. B starts first (gpu_memory_utilization --util-b), generates, and sleeps; then A starts
(--util-a); --util-a + --util-b > 1, so B cannot wake while A is awake. Both models are the same shape with
dummy weights, which vLLM fills the same way in every engine, so each engine refills its parameters from
its own seed: what one engine's wake got back of the other's memory then shows as wrong outputs. After a
warm-up swap (first sleeps pay for host memory), --reps rounds of, each timed in the engines' processes:
  (i)   A.sleep() alone (B asleep);
  (ii)  B.wake_up() alone (A asleep), after the free memory was overwritten;
  (iii) the sequential swap: A.sleep(), then B.wake_up();
  (iv)  ours only: the overlapped swap, A.sleep() and B.wake_up() started together, B's allocator with
        wake_wait_seconds = --wake-wait-s (set by an RPC into B's worker; stock vLLM cannot wait).
After each wake B's greedy tokens and logprobs are compared with B's own from before its first sleep, and
after each swap back (B.sleep(), overwrite, A.wake_up()) A's with A's. --util-b < --util-a: vLLM's sleep
asserts that free device memory did not shrink across it, which holds while B wakes into what A frees only
if B needs no more than A frees.

Result: ``RESULT {json}`` (bytes moved each way, every time, the checks, a summary with the ratios
overlapped / sequential and, with --floor-json from benchmarks/probe_duplex.py of the same run, against the
duplex floor of the same bytes). Exit status 1 on a mismatch or an engine that failed or hung; the
processes are ended either way.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import traceback
import types
from collections.abc import Sequence
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(REPO, "benchmarks")]

import e2e  # noqa: E402  (sets the environment vLLM needs here; model making, generation, overwriting)
from probe_duplex import Rates, duplex_floor_seconds, sequential_seconds  # noqa: E402

OFFLOAD_TAGS = ("weights", "runtime", "cudagraph")  # what a level-1 sleep copies to host (0.26: weights only)
TARGET_OVER_FLOOR = 1.1  # issue 18: the overlapped swap within 1.1 x the duplex floor
TARGET_SPEEDUP = 1.35  # ... so at least 1.35 x faster than the sequential swap
START_DELAY_S = 0.2  # the overlapped swap's two calls start at the same instant, this far ahead


def say(msg: str) -> None:
    print(msg, flush=True)


# -- run inside the workers (collective_rpc passes the worker first) -------------------------------------------

def salt_weights(worker, seed: int) -> int:
    """Refills every floating-point parameter as vLLM's dummy loader does (uniform +-1e-3), from this seed."""
    import torch

    params = [p for p in worker.get_model().parameters() if p.is_floating_point()]
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.uniform_(-1e-3, 1e-3, generator=gen)
    if params[0].is_cuda:
        torch.cuda.synchronize()
    return sum(p.numel() for p in params)


def device_memory(worker) -> dict[str, int]:
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"free": int(free), "total": int(total)}


def set_wake_wait(worker, seconds: float) -> float:
    """Sets the allocator's wake_wait_seconds; the value before. Stock vLLM's allocator has none."""
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    if not hasattr(type(alloc), "wake_wait_seconds"):
        raise TypeError(f"{type(alloc).__module__}.{type(alloc).__qualname__} cannot wait for memory at wake")
    before = alloc.wake_wait_seconds
    alloc.wake_wait_seconds = seconds
    return before


def last_op_stats(worker, which: str) -> Optional[dict]:
    """Our allocator's stats of its last sleep or wake (None for stock vLLM's)."""
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    if not hasattr(alloc, "stats"):
        return None
    op = getattr(alloc.stats(), f"last_{which}")
    return None if op is None else dataclasses.asdict(op)


# -- the engines, each in its own process --------------------------------------------------------------------

def wait_until(start_at: Optional[float]) -> None:
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))


class VllmEngine:
    """One vLLM engine in this process, as the driver's commands see it."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.llm: Any = None
        self.reference: list = []
        self.offload_bytes = 0

    def rpc(self, fn, *args) -> Any:
        return self.llm.collective_rpc(fn, args=args)[0]

    def start(self) -> dict:
        import vllm

        c = self.cfg
        opts = types.SimpleNamespace(model=c["model"], tp=1, gpu_memory_utilization=c["util"], eager=c["eager"])
        self.llm, startup_s = e2e.make_llm(opts)
        workers = self.llm.collective_rpc(e2e.worker_info)
        self.rpc(salt_weights, c["seed"])
        self.reference = e2e.generate(self.llm)
        pools = self.rpc(e2e.pool_bytes)
        self.offload_bytes = sum(b for tag, b in pools.items() if tag in OFFLOAD_TAGS)
        return {"vllm": vllm.__version__, "startup_s": round(startup_s, 2), "workers": workers, "pools": pools,
                "offload_bytes": self.offload_bytes, "memory": self.rpc(device_memory), "reference": self.reference}

    def _timed(self, which: str, fn, start_at: Optional[float]) -> dict:
        wait_until(start_at)
        t0 = time.monotonic()
        fn()
        t1 = time.monotonic()
        stats = self.rpc(last_op_stats, which)
        return {"t0": t0, "t1": t1, "seconds": t1 - t0, "stats": stats,
                "bytes": stats["bytes_copied"] if stats else self.offload_bytes}

    def sleep(self, start_at: Optional[float] = None) -> dict:
        return self._timed("sleep", lambda: self.llm.sleep(level=1), start_at)

    def wake(self, start_at: Optional[float] = None) -> dict:
        return self._timed("wake", self.llm.wake_up, start_at)

    def set_wake_wait(self, seconds: float) -> dict:
        return {"before": self.rpc(set_wake_wait, seconds)}

    def check(self) -> dict:
        self.llm.reset_prefix_cache()
        return compare_outputs(self.reference, e2e.generate(self.llm))

    def scribble(self) -> dict:
        return {"bytes": e2e.scribble(1)}

    def memory(self) -> dict:
        return self.rpc(device_memory)

    def close(self) -> None:
        self.llm = None


class FakeEngine:
    """--dry-run: an engine without vLLM or a GPU, for the orchestration's tests. Device memory is a number
    both processes share; a sleep releases the KV cache at once and the weights after their copy; a wake
    takes the weights, then the KV cache, as they fit, waiting up to its wake wait for them (none unless
    set); copies take bytes / --dry-gbps; vLLM's check that a sleep did not shrink free memory is kept."""

    def __init__(self, cfg: dict, device: Any):
        self.cfg, self.device = cfg, device
        total = cfg["dry_total"]
        self.resident = int(0.02 * total)  # context and the like: held asleep too
        self.weights = int(cfg["dry_weights_share"] * total)
        self.kv = int(cfg["util"] * total) - self.resident - self.weights
        self.rate = cfg["dry_gbps"] * 1e9
        self.wake_wait, self.wakes, self.awake = 0.0, 0, False
        self.reference = [([cfg["seed"]] * 4, [-0.5 * cfg["seed"]] * 4)]

    def _take(self, n: int, wait: float) -> float:
        """Takes n bytes of device memory as soon as they are free, within `wait` seconds; the seconds waited."""
        t0 = time.monotonic()
        while True:
            with self.device.get_lock():
                if self.device.value >= n:
                    self.device.value -= n
                    return time.monotonic() - t0
            if time.monotonic() - t0 >= wait:
                raise RuntimeError(f"out of memory: {n} bytes wanted, {self.device.value} free "
                                   f"(waited {time.monotonic() - t0:.3f} s)")
            time.sleep(0.001)

    def _give(self, n: int) -> None:
        with self.device.get_lock():
            self.device.value += n

    def start(self) -> dict:
        want = int(self.cfg["util"] * self.cfg["dry_total"])
        if self.device.value < want:  # as vLLM: the engine's share must be free when it starts
            raise ValueError(f"free memory {self.device.value} is less than the engine's share {want}")
        self._take(self.resident + self.weights + self.kv, 0)
        self.awake = True
        return {"vllm": "dry-run", "startup_s": 0.0, "workers": [{"allocator": "fake"}],
                "pools": {"weights": self.weights, "kv_cache": self.kv}, "offload_bytes": self.weights,
                "memory": self.memory(), "reference": self.reference}

    def sleep(self, start_at: Optional[float] = None) -> dict:
        wait_until(start_at)
        t0 = time.monotonic()
        free_before = self.device.value
        self._give(self.kv)
        time.sleep(self.weights / self.rate)
        self._give(self.weights)
        self.awake = False
        if self.device.value < free_before:
            raise AssertionError("Memory usage increased after sleeping.")
        t1 = time.monotonic()
        return {"t0": t0, "t1": t1, "seconds": t1 - t0, "bytes": self.weights,
                "stats": {"bytes_copied": self.weights, "wait_seconds": 0.0}}

    def wake(self, start_at: Optional[float] = None) -> dict:
        wait_until(start_at)
        t0 = time.monotonic()
        waited = self._take(self.weights, self.wake_wait)
        copied_at = time.monotonic() + self.weights / self.rate
        try:
            waited += self._take(self.kv, max(0.0, self.wake_wait - waited))
        except RuntimeError:
            self._give(self.weights)
            raise
        time.sleep(max(0.0, copied_at - time.monotonic()))
        self.wakes += 1
        self.awake = True
        t1 = time.monotonic()
        return {"t0": t0, "t1": t1, "seconds": t1 - t0, "bytes": self.weights,
                "stats": {"bytes_copied": self.weights, "wait_seconds": waited}}

    def set_wake_wait(self, seconds: float) -> dict:
        before, self.wake_wait = self.wake_wait, seconds
        return {"before": before}

    def check(self) -> dict:
        got = self.reference
        if not self.awake:
            raise RuntimeError("generate while asleep")
        if self.wakes == self.cfg.get("dry_lose_at_wake"):
            got = [(toks, [lp + 1e-3 for lp in lps]) for toks, lps in got]
        if self.wakes == self.cfg.get("dry_hang_at_wake"):
            time.sleep(3600)
        return compare_outputs(self.reference, got)

    def scribble(self) -> dict:
        return {"bytes": max(0, self.device.value - (1 << 30))}

    def memory(self) -> dict:
        return {"free": int(self.device.value), "total": int(self.cfg["dry_total"])}

    def close(self) -> None:
        pass


def compare_outputs(reference: list, got: list) -> dict:
    """Greedy tokens and their logprobs, bit for bit (as e2e.py)."""
    same = got == reference
    lp = [abs(a - b) for g, r in zip(got, reference) if g[0] == r[0] for a, b in zip(g[1], r[1])]
    return {"same": same, "tokens_same": [g[0] for g in got] == [r[0] for r in reference],
            "max_logprob_diff": max(lp, default=None), "first": None if same else [reference[0], got[0]]}


COMMANDS = ("start", "sleep", "wake", "set_wake_wait", "check", "scribble", "memory")


def die_with_parent(parent_pid: int) -> None:
    """This process is killed when the driver dies, however it dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the driver died before the line above
        os._exit(1)


def engine_main(conn: Any, cfg: dict, device: Any) -> None:
    """An engine process: commands from the driver's pipe, one answer each, until "exit" or the pipe closes."""
    die_with_parent(cfg["driver_pid"])
    os.environ.update(cfg["env"])
    engine: Any = None
    try:
        if cfg["dry"]:
            engine = FakeEngine(cfg, device)
        else:
            if cfg["mp"]:
                import cloudpickle

                for module in (sys.modules[__name__], e2e):  # functions sent to the engine core travel by value
                    cloudpickle.register_pickle_by_value(module)
            import vllm  # noqa: F401  (both engines' processes import it at once, before A waits for B)

            engine = VllmEngine(cfg)
    except BaseException:  # noqa: BLE001 - answered to the first command, with the traceback
        failed_to_start = traceback.format_exc()[-3000:]
    while True:
        try:
            cmd, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        if cmd == "exit":
            if engine is not None:
                engine.close()
            conn.send({"ok": True})
            break
        try:
            if engine is None:
                raise RuntimeError(f"the engine process could not start:\n{failed_to_start}")
            if cmd not in COMMANDS:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send({"ok": True, **getattr(engine, cmd)(**kwargs)})
        except BaseException:  # noqa: BLE001 - the driver says what failed, with the traceback
            conn.send({"ok": False, "error": traceback.format_exc()[-3000:]})
    conn.close()
    os._exit(0)  # no interpreter teardown: nothing in this process is left to save


class EngineError(RuntimeError):
    pass


class EngineProc:
    """The driver's handle on one engine process."""

    def __init__(self, ctx: Any, name: str, cfg: dict, device: Any):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(child, cfg, device), name=f"swap-engine-{name}")
        self.proc.start()
        child.close()
        self.pending: Optional[str] = None

    def send(self, cmd: str, **kwargs: Any) -> None:
        self.pending = cmd
        self.conn.send((cmd, kwargs))

    def recv(self, timeout: float) -> dict:
        cmd, deadline = self.pending, time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
                    msg = self.conn.recv()
                    break
            except (EOFError, OSError):
                self.proc.join(5)
                raise EngineError(f"engine {self.name} died during {cmd} (exit code {self.proc.exitcode})") from None
            if not self.proc.is_alive():
                raise EngineError(f"engine {self.name} died during {cmd} (exit code {self.proc.exitcode})")
            if time.monotonic() >= deadline:
                raise EngineError(f"engine {self.name}: no answer to {cmd} within {timeout:g} s")
        self.pending = None
        if not msg.pop("ok"):
            raise EngineError(f"engine {self.name}: {cmd} failed:\n{msg['error']}")
        return msg

    def call(self, cmd: str, timeout: float, **kwargs: Any) -> dict:
        self.send(cmd, **kwargs)
        return self.recv(timeout)

    def close(self) -> None:
        """Asks the process to end; ends it if it does not, or is busy."""
        if self.proc.is_alive() and self.pending is None:
            try:
                self.call("exit", 30)
            except (EngineError, OSError):
                pass
            self.proc.join(10)
        for stop in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                stop()
                self.proc.join(10)
        self.conn.close()


def engine_configs(args: argparse.Namespace) -> dict[str, dict]:
    env = {} if args.mp else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    base = {"model": args.model, "eager": not args.graphs, "dry": args.dry_run, "mp": args.mp, "driver_pid": os.getpid(),
            "env": env,
            "dry_total": args.dry_total_gb * 1e9, "dry_gbps": args.dry_gbps, "dry_weights_share": args.dry_weights_share}
    return {"a": {**base, "util": args.util_a, "seed": 1, "dry_lose_at_wake": args.dry_lose_at_wake_a},
            "b": {**base, "util": args.util_b, "seed": 2, "dry_lose_at_wake": args.dry_lose_at_wake_b,
                  "dry_hang_at_wake": args.dry_hang_at_wake_b}}


class Engines:
    """Both engine processes, spawned at once; every one ended on the way out."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: list[EngineProc] = []
        self.device: Any = None

    def __enter__(self) -> tuple[EngineProc, EngineProc]:
        ctx = multiprocessing.get_context("spawn")
        # the dry run's device memory; kept here, as the processes find it only while the driver holds it
        self.device = ctx.Value("d", self.args.dry_total_gb * 1e9) if self.args.dry_run else None
        cfgs = engine_configs(self.args)
        try:
            for name in ("a", "b"):
                self.procs.append(EngineProc(ctx, name, cfgs[name], self.device))
        except BaseException:
            self.__exit__()
            raise
        return self.procs[0], self.procs[1]

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            p.close()


# -- the orchestration -----------------------------------------------------------------------------------------

class Checks:
    """Outputs compared after each wake, by what came before it."""

    def __init__(self) -> None:
        self.results: dict[str, list[bool]] = {}
        self.mismatches: list[dict] = []

    def record(self, name: str, reply: dict) -> None:
        self.results.setdefault(name, []).append(bool(reply["same"]))
        if not reply["same"]:
            self.mismatches.append({"check": name, **{k: reply.get(k) for k in ("tokens_same", "max_logprob_diff", "first")}})
            say(f"MISMATCH {name}: tokens {'same' if reply.get('tokens_same') else 'DIFFER'}, largest logprob "
                f"difference {reply.get('max_logprob_diff')}; before/after {reply.get('first')}")

    @property
    def failed(self) -> bool:
        return any(not all(v) for v in self.results.values())

    def summary(self) -> dict[str, str]:
        return {name: f"{sum(v)}/{len(v)}" for name, v in self.results.items()}

    def lines(self) -> list[str]:
        return [f"{'PASS' if all(v) else 'FAIL'} {name}: outputs identical in {sum(v)} of {len(v)}"
                for name, v in self.results.items()]


def together(a: EngineProc, a_cmd: str, b: EngineProc, b_cmd: str, timeout: float) -> tuple[dict, dict]:
    """a_cmd in A and b_cmd in B, started at the same instant; both answers (every failure named)."""
    start_at = time.monotonic() + START_DELAY_S
    a.send(a_cmd, start_at=start_at)
    b.send(b_cmd, start_at=start_at)
    replies, errors = [], []
    for e in (a, b):
        try:
            replies.append(e.recv(timeout))
        except EngineError as err:
            errors.append(str(err))
    if errors:
        raise EngineError("; ".join(errors))
    return replies[0], replies[1]


def swap_record(a_sleep: dict, b_wake: dict) -> dict:
    """A swap's two calls and its time, from the first call's start to the last one's end."""
    return {"a_sleep": a_sleep, "b_wake": b_wake,
            "seconds": max(a_sleep["t1"], b_wake["t1"]) - min(a_sleep["t0"], b_wake["t0"])}


def swap_back(a: EngineProc, b: EngineProc, checks: Checks, t: float) -> None:
    """B awake, A asleep -> A awake (checked), B asleep; the freed memory overwritten before A's wake."""
    b.call("sleep", t)
    a.call("scribble", t)
    a.call("wake", t)
    checks.record("a_after_swap_back", a.call("check", t))


def one_round(a: EngineProc, b: EngineProc, can_wait: bool, wake_wait_s: float, checks: Checks, t: float) -> dict:
    """From A awake and B asleep, (i) to (iv), back to A awake and B asleep."""
    r: dict[str, Any] = {"a_sleep": a.call("sleep", t)}  # (i)
    a.call("scribble", t)
    r["b_wake"] = b.call("wake", t)  # (ii)
    checks.record("b_after_wake_alone", b.call("check", t))
    swap_back(a, b, checks, t)
    r["sequential"] = swap_record(a.call("sleep", t), b.call("wake", t))  # (iii)
    checks.record("b_after_sequential_swap", b.call("check", t))
    swap_back(a, b, checks, t)
    if can_wait:  # (iv)
        b.call("set_wake_wait", t, seconds=wake_wait_s)
        r["overlapped"] = swap_record(*together(a, "sleep", b, "wake", t))
        b.call("set_wake_wait", t, seconds=0.0)
        checks.record("b_after_overlapped_swap", b.call("check", t))
        swap_back(a, b, checks, t)
    return r


def run_swaps(a: EngineProc, b: EngineProc, can_wait: bool, args: argparse.Namespace, checks: Checks,
              out: dict) -> None:
    """Starts B (then puts it to sleep) and A, warms up, measures --reps rounds; into `out` as it goes."""
    t = args.op_timeout
    out["engines"] = {"b": b.call("start", args.start_timeout)}
    out["b_first_sleep"] = b.call("sleep", t)
    out["engines"]["a"] = a.call("start", args.start_timeout)
    refs = {name: info.pop("reference") for name, info in out["engines"].items()}
    out["engines_differ"] = refs["a"] != refs["b"]
    if not out["engines_differ"]:
        say("INFO A and B generate the same outputs: a wake that got the other engine's bytes would not show")
    say(f"INFO engines started: B in {out['engines']['b']['startup_s']} s, A in {out['engines']['a']['startup_s']} s; "
        f"pools A {out['engines']['a']['pools']}, B {out['engines']['b']['pools']}")
    out["warmup"] = {"a_sleep": a.call("sleep", t)}
    a.call("scribble", t)
    out["warmup"]["b_wake"] = b.call("wake", t)
    checks.record("b_after_first_wake", b.call("check", t))
    swap_back(a, b, checks, t)
    out["premise"] = premise(a.call("memory", t), out["engines"]["b"]["pools"])
    say(f"INFO with A awake {out['premise']['free_bytes'] / 1e9:.2f} GB are free, B's pools need "
        f"{out['premise']['b_pool_bytes'] / 1e9:.2f} GB: B {'must wait for' if out['premise']['b_must_wait'] else 'does NOT need'}"
        f" A's memory")
    out["rounds"] = []
    for i in range(args.reps):
        out["rounds"].append(one_round(a, b, can_wait, args.wake_wait_s, checks, t))
        say(f"INFO round {i + 1}: " + round_line(out["rounds"][-1]))


def premise(memory_a_awake: dict, b_pools: dict) -> dict:
    """Whether B's wake needs memory A holds (what makes the overlapped swap worth having)."""
    need = sum(b_pools.values())
    return {"free_bytes": memory_a_awake["free"], "total_bytes": memory_a_awake["total"], "b_pool_bytes": need,
            "b_must_wait": need > memory_a_awake["free"]}


def round_line(r: dict) -> str:
    parts = [f"A.sleep {r['a_sleep']['seconds']:.3f} s", f"B.wake {r['b_wake']['seconds']:.3f} s",
             f"sequential {r['sequential']['seconds']:.3f} s"]
    if "overlapped" in r:
        o = r["overlapped"]
        waited = (o["b_wake"].get("stats") or {}).get("wait_seconds")
        parts.append(f"overlapped {o['seconds']:.3f} s (A.sleep {o['a_sleep']['seconds']:.3f} s, B.wake "
                     f"{o['b_wake']['seconds']:.3f} s" + (f", B waited {waited:.3f} s)" if waited is not None else ")"))
    return "; ".join(parts)


def summarize(rounds: Sequence[dict], rates: Optional[Rates]) -> dict:
    """Medians over the rounds and their ratios; against the duplex floor of the swap's bytes if rates are known."""
    med = statistics.median
    s: dict[str, Any] = {}
    picks = {"a_sleep_alone_s": lambda r: r["a_sleep"]["seconds"], "b_wake_alone_s": lambda r: r["b_wake"]["seconds"],
             "sequential_s": lambda r: r["sequential"]["seconds"],
             "overlapped_s": lambda r: r["overlapped"]["seconds"] if "overlapped" in r else None,
             "overlapped_a_sleep_s": lambda r: r["overlapped"]["a_sleep"]["seconds"] if "overlapped" in r else None,
             "overlapped_b_wake_s": lambda r: r["overlapped"]["b_wake"]["seconds"] if "overlapped" in r else None}
    for key, pick in picks.items():
        vals = [v for v in map(pick, rounds) if v is not None]
        if vals:
            s[key], s[key + "_all"] = med(vals), vals
    swap = [r.get("overlapped") or r["sequential"] for r in rounds]
    s["bytes_out"] = med(x["a_sleep"]["bytes"] for x in swap)
    s["bytes_in"] = med(x["b_wake"]["bytes"] for x in swap)
    s["sequential_over_alone_sum"] = s["sequential_s"] / (s["a_sleep_alone_s"] + s["b_wake_alone_s"])
    ov = s.get("overlapped_s")
    if ov is not None:
        s["overlapped_over_sequential"] = ov / s["sequential_s"]
        s["speedup"] = s["sequential_s"] / ov
        s["speedup_target_met"] = s["speedup"] >= TARGET_SPEEDUP
    if rates is not None:
        s["floor_s"] = duplex_floor_seconds(s["bytes_out"], s["bytes_in"], rates)
        s["copies_sequential_s"] = sequential_seconds(s["bytes_out"], s["bytes_in"], rates)
        s["sequential_over_floor"] = s["sequential_s"] / s["floor_s"]
        if ov is not None:
            s["overlapped_over_floor"] = ov / s["floor_s"]
            s["floor_target_met"] = s["overlapped_over_floor"] <= TARGET_OVER_FLOOR
    return s


def summary_lines(s: dict, who: str, version: str) -> list[str]:
    gb_out, gb_in = s["bytes_out"] / 1e9, s["bytes_in"] / 1e9
    lines = [f"INFO swap [{who}, vLLM {version}]: {gb_out:.2f} GB out, {gb_in:.2f} GB in; A.sleep alone "
             f"{s['a_sleep_alone_s']:.3f} s ({gb_out / s['a_sleep_alone_s']:.1f} GB/s), B.wake alone "
             f"{s['b_wake_alone_s']:.3f} s ({gb_in / s['b_wake_alone_s']:.1f} GB/s); sequential swap "
             f"{s['sequential_s']:.3f} s ({s['sequential_over_alone_sum']:.2f} x the two alone)"]
    if "overlapped_s" in s:
        lines.append(f"INFO swap overlapped {s['overlapped_s']:.3f} s = {s['overlapped_over_sequential']:.2f} x the "
                     f"sequential swap ({s['speedup']:.2f} x faster; target >= {TARGET_SPEEDUP}: "
                     f"{'met' if s['speedup_target_met'] else 'NOT met'})")
    if "floor_s" in s:
        line = (f"INFO swap duplex floor of these bytes {s['floor_s']:.3f} s (copies one after the other "
                f"{s['copies_sequential_s']:.3f} s): sequential swap {s['sequential_over_floor']:.2f} x")
        if "overlapped_over_floor" in s:
            line += (f", overlapped {s['overlapped_over_floor']:.2f} x (target <= {TARGET_OVER_FLOOR}: "
                     f"{'met' if s['floor_target_met'] else 'NOT met'})")
        lines.append(line)
    return lines


def load_rates(path: Optional[str]) -> tuple[Optional[Rates], str]:
    """The duplex probe's rates, or None and why not (a missing probe costs the ratios, not the run)."""
    if not path:
        return None, "no --floor-json: times only"
    try:
        return Rates.from_json(path), f"rates from {path}"
    except (OSError, ValueError, TypeError) as e:
        return None, f"{path}: {type(e).__name__}: {e}; times only"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--util-a", type=float, default=0.6, help="A's gpu_memory_utilization (default 0.6)")
    p.add_argument("--util-b", type=float, default=0.57, help="B's, below A's (default 0.57)")
    p.add_argument("--reps", type=int, default=3, help="measured rounds (default 3; medians reported)")
    p.add_argument("--wake-wait-s", type=float, default=30.0, help="B's wake_wait_seconds in the overlapped swap")
    p.add_argument("--floor-json", help="benchmarks/probe_duplex.py's JSON from the same machine")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs (default: eager, for a short start)")
    p.add_argument("--mp", action="store_true", help="each engine core in a process of its own")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for an engine to start")
    p.add_argument("--op-timeout", type=float, default=120.0, help="seconds for any other call")
    p.add_argument("--json")
    d = p.add_argument_group("dry run (no vLLM, no GPU: the CPU tests of the orchestration)")
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--dry-total-gb", type=float, default=10.0)
    d.add_argument("--dry-gbps", type=float, default=20.0)
    d.add_argument("--dry-weights-share", type=float, default=0.12, help="each engine's weights, of the device")
    d.add_argument("--dry-lose-at-wake-a", type=int, help="A's outputs differ after its Nth wake")
    d.add_argument("--dry-lose-at-wake-b", type=int, help="B's outputs differ after its Nth wake")
    d.add_argument("--dry-hang-at-wake-b", type=int, help="B's check after its Nth wake never answers")
    a = p.parse_args(argv)
    if not (0 < a.util_a < 1 and 0 < a.util_b < 1):
        p.error(f"--util-a and --util-b must be between 0 and 1, got {a.util_a}, {a.util_b}")
    if a.util_a + a.util_b <= 1:
        p.error(f"--util-a {a.util_a} + --util-b {a.util_b} <= 1: both engines fit awake at once, no swap needs to wait")
    if a.util_b >= a.util_a:
        p.error(f"--util-b {a.util_b} must be below --util-a {a.util_a}: vLLM's sleep asserts free memory did not "
                f"shrink, which B waking into what A frees breaks if B needs more than A frees")
    if a.reps < 1 or not 0 < a.wake_wait_s <= 3600 or a.start_timeout <= 0 or a.op_timeout <= 0:
        p.error(f"need --reps >= 1, 0 < --wake-wait-s <= 3600, positive timeouts; got {a.reps}, {a.wake_wait_s}, "
                f"{a.start_timeout}, {a.op_timeout}")
    return a


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # through the Engines block, which ends both processes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    who = "stock" if os.environ.get("VLLM_PLUGINS") == "" else "ours"
    can_wait = who == "ours"  # stock vLLM's wake fails at once when the memory is not free yet
    rates, floor_note = load_rates(args.floor_json)
    result: dict[str, Any] = {"script": "swap", "who": who, "model": args.model, "util_a": args.util_a,
                              "util_b": args.util_b, "graphs": args.graphs, "inproc": not args.mp, "reps": args.reps,
                              "dry_run": args.dry_run, "wake_wait_s": args.wake_wait_s if can_wait else None,
                              "floor": floor_note, "rates_gbps": dataclasses.asdict(rates) if rates else None}
    say(f"INFO swap [{who}]: {floor_note}" + ("" if can_wait else "; no overlapped swap (stock vLLM cannot wait)"))
    checks = Checks()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with Engines(args) as (a, b):
            run_swaps(a, b, can_wait, args, checks, result)
    except EngineError as e:
        result["error"] = str(e)
        say(f"FAIL swap: {e}")
    except Exception as e:  # noqa: BLE001 - the driver's own failure: reported like an engine's, processes ended
        result["error"] = traceback.format_exc()[-3000:]
        say(f"FAIL swap: {type(e).__name__}: {e}\n{result['error']}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["vllm"] = result.get("engines", {}).get("b", {}).get("vllm")
    result["checks"], result["mismatches"] = checks.summary(), checks.mismatches
    for line in checks.lines():
        say(line)
    if result.get("rounds"):
        result["summary"] = summarize(result["rounds"], rates)
        for line in summary_lines(result["summary"], who, result["vllm"]):
            say(line)
    result["failed"] = bool(result.get("error") or checks.failed)
    say("RESULT " + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
