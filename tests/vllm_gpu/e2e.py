"""Real vLLM engines on a GPU, driven the way RLHF frameworks drive them, with and without this allocator.

One engine per run. Which allocator serves it is vLLM's choice through its plugin loader:
``VLLM_PLUGINS=vllm_sleep_ext`` (ours) or ``VLLM_PLUGINS=""`` (stock), so the same command measures both.

    python tests/vllm_gpu/e2e.py flows  --model llama-tiny [--tp 2] [--inproc]   # state kept?
    python tests/vllm_gpu/e2e.py timing --model llama3-8b [--asleep-s 2]         # sleep/wake seconds
    python tests/vllm_gpu/e2e.py cycles --model llama-tiny --cycles 50           # memory over cycles
    python tests/vllm_gpu/e2e.py first  --model qwen25-32b --first-sleep-after 10  # issue 17: the first sleep
    VLLM_SLEEP_EXT_RECORD_ALLOCATIONS=1 python tests/vllm_gpu/e2e.py scope --model llama3-8b  # who holds the kept

Every flow overwrites the GPU memory a sleep released before waking (freed pages often come back with
their old contents, which would hide a lost byte). Level 2 is the RLHF flow: sleep(2), memory
overwritten, wake weights, the parameters (only) copied back in by the "trainer", wake kv_cache.

The judge is the engine's state: every tensor reachable from the model runner (state.py, as a 64-bit
digest per tensor computed on the GPU) captured before each sleep and compared after the wake. With this
allocator, a changed tensor in a sleep-mode pool fails the run; stock vLLM's losses are reported, not
failures. Greedy tokens and logprobs are compared with those from before the first sleep as a second
signal, reported only: on vLLM 0.33 (torch 2.14) the logprobs of two identical calls differ (by up to
1e-3 on the 8B shape), stock and ours alike, so outputs can neither prove nor disprove a loss.
Results go to stdout as ``RESULT {json}`` lines, and to ``--json`` if given. Exit status 1 when this
allocator lost state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: gpu_helpers
sys.path.insert(0, HERE)

import state  # noqa: E402  (the state judge; sent to workers by value, see main)

# Before vLLM is imported: callables sent to workers, settings the GPU machines need.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")

PROMPTS = [list(range(1 + 7 * i, 41 + 7 * i)) for i in range(4)]
GiB = float(1 << 30)


# -- run inside each worker (collective_rpc passes the worker first) ---------------------------------

def worker_info(worker) -> dict:
    from vllm.device_allocator.cumem import CuMemAllocator

    allocator = CuMemAllocator.get_instance()
    cls = type(allocator)
    return {"pid": os.getpid(), "allocator": f"{cls.__module__}.{cls.__qualname__}",
            "rank": getattr(worker, "rank", None)}


def pool_bytes(worker) -> dict[str, int]:
    """Bytes per tag in the worker's sleep-mode pools, asleep or awake (stock or ours)."""
    from vllm.device_allocator.cumem import CuMemAllocator

    per_tag: dict[str, int] = {}
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        size = getattr(data, "size", None)
        if size is None:  # stock vLLM: handle = (device, size, ptr, handle)
            size = data.handle[1]
        per_tag[data.tag] = per_tag.get(data.tag, 0) + int(size)
    return per_tag


def weights_pool_nonparams(worker) -> dict:
    """Python-visible tensors in the weights pool that are not parameters: what level 2 must keep."""
    import gc

    import torch
    from vllm.device_allocator.cumem import CuMemAllocator

    spans = []
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "weights":
            ptr, size = (data.ptr, data.size) if hasattr(data, "ptr") else data.handle[2:0:-1]  # stock: handle
            spans.append((int(ptr), int(ptr) + int(size)))
    params = {p.untyped_storage().data_ptr() for p in worker.get_model().parameters()}
    found: dict[int, tuple] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or isinstance(obj, torch.nn.Parameter) or not obj.is_cuda:
            continue
        try:
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - wrapper subclasses and the like
            continue
        ptr = storage.data_ptr()
        if ptr in params or ptr in found or not any(a <= ptr < b for a, b in spans):
            continue
        found[ptr] = (storage.nbytes(), list(obj.shape), str(obj.dtype))
    largest = sorted(found.values(), key=lambda v: -v[0])[:6]
    return {"tensors": len(found), "bytes": sum(v[0] for v in found.values()), "largest": largest}


def live_scope_breakdown(worker) -> dict:
    """What the live scope keeps of the weights pool at a level-2 sleep, by block state, with the largest
    kept blocks and the parameters whose storage lies in them (why a block is kept though no Python
    tensor but parameters lives there)."""
    import torch
    from vllm.device_allocator.cumem import CuMemAllocator

    from vllm_sleep_ext.allocator import blocks_in_scope
    from vllm_sleep_ext.preserve import merge, parameter_spans, registry, subtract

    alloc = CuMemAllocator.get_instance()
    scope = {a.ptr: a.size for a in alloc._core.allocations() if a.state == "mapped" and a.tag == "weights"}
    params = list(registry.parameters())
    own, whole = parameter_spans(params)
    own_spans = merge(own)
    by_state: dict[str, int] = {}
    kept = []
    blocks, unseen = blocks_in_scope(torch.cuda.memory_snapshot(), scope)
    for start, size, used, state in blocks:
        if state != "inactive" and start not in whole:
            n = sum(e - b for b, e in subtract([(start, start + used)], own_spans))
            if n:
                by_state[state] = by_state.get(state, 0) + n
                kept.append((n, start, size, used, state))
    kept.sort(reverse=True)
    largest = []
    for n, start, size, used, state in kept[:6]:
        inside = []
        for p in params:
            try:
                sp = p.untyped_storage().data_ptr()
                if start <= sp < start + size:
                    inside.append({"shape": list(p.shape), "dtype": str(p.dtype), "offset": p.data_ptr() - start,
                                   "nbytes": p.nbytes, "contiguous": p.is_contiguous(),
                                   "storage_nbytes": p.untyped_storage().nbytes()})
            except Exception:  # noqa: BLE001
                continue
        largest.append({"kept": n, "block": size, "requested": used, "state": state, "params": inside[:3]})
    return {"allocations": len(scope), "parameters": len(params), "whole_blocks": len(whole),
            "kept_by_state": by_state, "unseen_allocations": len(unseen), "unseen_bytes": sum(unseen.values()),
            "largest": largest}


def kept_owners(worker, count: int = 6) -> list[dict]:
    """Who holds the largest ranges the live scope keeps (issue 17 item 3): for each, the frames that
    allocated its block (VLLM_SLEEP_EXT_RECORD_ALLOCATIONS=1, vllm_sleep_ext/alloc_history.py) and the
    attribute paths from the worker that reach a tensor stored in it."""
    import torch
    from vllm.device_allocator.cumem import CuMemAllocator

    from vllm_sleep_ext import alloc_history
    from vllm_sleep_ext.allocator import blocks_in_scope
    from vllm_sleep_ext.preserve import merge, parameter_spans, registry, subtract

    alloc = CuMemAllocator.get_instance()
    scope = {a.ptr: a.size for a in alloc._core.allocations() if a.state == "mapped" and a.tag == "weights"}
    own, whole = parameter_spans(list(registry.parameters()))
    own_spans = merge(own)
    snapshot = torch.cuda.memory_snapshot()
    blocks, _ = blocks_in_scope(snapshot, scope)
    kept = []
    for start, size, used, state in blocks:
        if state != "inactive" and start not in whole:
            n = sum(e - b for b, e in subtract([(start, start + used)], own_spans))
            if n:
                kept.append((n, start, size))
    kept.sort(reverse=True)
    kept = kept[:count]
    paths = tensor_paths(worker, [(start, size) for _, start, size in kept])
    history = alloc_history.owners([(start, size) for _, start, size in kept], snapshot) if alloc_history.recording() else []
    out = []
    for i, (n, start, size) in enumerate(kept):
        frames = [b["frames"] for b in history[i]["blocks"]] if history else []
        out.append({"kept": n, "block": size, "paths": paths.get(start, [])[:4],
                    "allocated_at": frames[0] if frames else ["(not recorded: VLLM_SLEEP_EXT_RECORD_ALLOCATIONS=1)"]})
    return out


def tensor_paths(root, ranges: list[tuple[int, int]], max_depth: int = 6, max_objects: int = 200000) -> dict[int, list]:
    """Attribute paths from `root` (the worker) to CUDA tensors whose storage starts in one of `ranges`,
    by range start with each tensor's shape and dtype: names what a block holds when gc finds no owner."""
    from collections import deque

    import torch

    found: dict[int, list] = {}
    seen: set[int] = set()
    queue = deque([(root, "worker", 0)])
    while queue and len(seen) < max_objects:
        obj, path, depth = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_cuda:
                ptr = obj.untyped_storage().data_ptr()
                for start, size in ranges:
                    if start <= ptr < start + size:
                        found.setdefault(start, []).append(f"{path} {list(obj.shape)} {obj.dtype}")
            continue
        if depth >= max_depth or isinstance(obj, (str, bytes, int, float, bool, type)) or obj is None:
            continue
        if isinstance(obj, dict):
            items = [(f"{path}[{k!r}]", v) for k, v in list(obj.items())[:1000]]
        elif isinstance(obj, (list, tuple, set)):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(list(obj)[:1000])]
        else:
            attrs = getattr(obj, "__dict__", None)
            items = [(f"{path}.{k}", v) for k, v in attrs.items()] if isinstance(attrs, dict) else []
        queue.extend((v, p, depth + 1) for p, v in items)
    return found


def level2_driver_floor(worker, pause_s: float = 1.0) -> dict:
    """While the engine sleeps at level 2: the driver's own release and create + map time for the handles
    this worker's allocator holds (benchmarks/vmm_floor.py), the floor issue 17 item 3 measures against.
    Ours: its allocations with its slabs; stock: one handle per allocation."""
    from vllm.device_allocator.cumem import CuMemAllocator

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), os.pardir, "benchmarks"))
    import vmm_floor

    alloc = CuMemAllocator.get_instance()
    core = getattr(alloc, "_core", None)
    if core is not None:
        sizes = vmm_floor.handle_sizes([a.size for a in core.allocations()], int(core.slab_bytes))
    else:  # stock: handle = (device, size, ptr, handle)
        sizes = vmm_floor.handle_sizes([int(d.handle[1]) for d in alloc.pointer_to_data.values()], 0)
    return vmm_floor.floor(sizes, pause_s=pause_s)


def restart_host_prepare(worker, rate: float) -> float:
    """Drops the host memory kept for backups and prepares it again in the background at `rate` bytes/s."""
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    alloc._core.wait_host()
    alloc.release_host_cache()
    alloc._core.host_prepare_rate = int(rate)
    alloc._prepare_host_backups(wait=False)
    return alloc._core.host_pinned_bytes() / GiB


def restart_host_prepare_as_configured(worker) -> float:
    """Drops the host memory kept for backups and prepares it again in the background at the pace the
    allocator sets itself (ours in vLLM: full speed while idle, throttled while serving)."""
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    alloc._core.wait_host()
    alloc.release_host_cache()
    alloc._prepare_host_backups(wait=False)
    return alloc._core.host_pinned_bytes() / GiB


def host_state(worker) -> dict:
    """Ours: host memory pinned for backups and the background preparation's rate now; stock: {}."""
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    core = getattr(alloc, "_core", None)
    if core is None:
        return {}
    return {"pinned_gib": round(core.host_pinned_bytes() / GiB, 2), "rate": int(core.host_prepare_rate)}


def host_pages(worker=None, rollup: str = "/proc/self/smaps_rollup") -> dict:
    """The process's anonymous memory, how much of it is on transparent huge pages, and how much is locked
    (pinned), in GiB. Ours keeps its backups in one anonymous arena advised for huge pages: if the copies' host
    side is on 4 KiB pages the device translates 512 x more of them, a suspect for a wake slower than its
    sleep. Stock's pinned memory is the driver's, not anonymous. {} where the kernel has no smaps_rollup."""
    fields = {"Anonymous": "anon_gib", "AnonHugePages": "anon_huge_gib", "Locked": "locked_gib"}
    out = {}
    try:
        with open(rollup) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[fields[key]] = round(int(rest.split()[0]) * 1024 / GiB, 2)  # the file counts kB
    except OSError:
        return {}
    return out


def last_sleep_stats(worker) -> dict:
    """Ours: where the last sleep's time went (pinning and faulting host memory in included); stock: {}."""
    from vllm.device_allocator.cumem import CuMemAllocator

    core = getattr(CuMemAllocator.get_instance(), "_core", None)
    stats = core.last_sleep if core is not None else None
    if stats is None:
        return {}
    keys = ("seconds", "bytes_copied", "populate_seconds", "pin_seconds", "sync_seconds", "copy_wait_seconds",
            "unmap_seconds", "release_seconds")
    return {k: getattr(stats, k) for k in keys}


def core_seconds(worker) -> dict:
    """Ours: the allocator's own seconds for its last sleep and last wake (in the worker, without vLLM's RPC
    and bookkeeping around llm.sleep()/wake_up()); stock: {}."""
    from vllm.device_allocator.cumem import CuMemAllocator

    core = getattr(CuMemAllocator.get_instance(), "_core", None)
    if core is None:
        return {}
    return {op: stats.seconds for op, stats in (("sleep", core.last_sleep), ("wake", core.last_wake)) if stats}


def host_pinned_gib(worker) -> float:
    from vllm.device_allocator.cumem import CuMemAllocator

    return CuMemAllocator.get_instance()._core.host_pinned_bytes() / GiB


def wait_host(worker) -> float:
    from vllm.device_allocator.cumem import CuMemAllocator

    alloc = CuMemAllocator.get_instance()
    alloc._core.wait_host()
    return alloc._core.host_pinned_bytes() / GiB


def save_params(worker, exclude: Sequence[str] = ()) -> int:
    """The trainer's copy of the parameters (named_parameters only: never buffers or anything else),
    less those matching a glob of ``exclude`` (what vLLM's sleep_preserve_parameter_names keeps: the
    trainer must not send them)."""
    from fnmatch import fnmatch

    import torch

    model = worker.get_model()
    worker._vse_params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                          if not any(fnmatch(n, pattern) for pattern in exclude)}
    torch.cuda.synchronize()
    return sum(t.numel() * t.element_size() for t in worker._vse_params.values())


def load_params(worker) -> int:
    """The trainer sends the parameters after a level-2 wake of the weights: in place, same addresses."""
    import torch

    model = worker.get_model()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in worker._vse_params.items():
            params[name].data.copy_(value, non_blocking=True)
    torch.cuda.synchronize()
    return len(worker._vse_params)


# -- the driver ---------------------------------------------------------------------------------------

def gpu_used_mib() -> list[int]:
    """Device memory in use per GPU, every process counted (nvidia-smi: no CUDA context needed here)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def scribble(tp: int) -> int:
    """Overwrites the GPU memory that a sleep released (in this process, then gives it back)."""
    from gpu_helpers import scribble_free_gpu_memory

    return sum(scribble_free_gpu_memory(leave_free_bytes=1 << 30, device=d) for d in range(tp))


def make_llm(args):
    from models import model_dir
    from vllm import LLM

    kwargs = dict(model=model_dir(args.model), load_format="dummy", skip_tokenizer_init=True,
                  enable_sleep_mode=True, seed=0, max_model_len=1024, tensor_parallel_size=args.tp,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  attention_config={"backend": "TRITON_ATTN"})
    if args.eager:
        kwargs["enforce_eager"] = True
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    return llm, time.perf_counter() - t0


def decode_tokens_per_s(llm, seconds: float = 4.0) -> float:
    """Greedy decode throughput of a batch of 64 sequences, over about `seconds`."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(1 + i, 33 + i))} for i in range(64)]
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - t0)


def generate(llm) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=16, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return result


class Run:
    def __init__(self, args) -> None:
        import vllm

        self.args = args
        self.llm, self.startup_s = make_llm(args)
        self.ready_at = time.perf_counter()
        self.workers = self.llm.collective_rpc(worker_info)
        self.ours = "vllm_sleep_ext" in str(self.workers)
        self.result: dict = {"command": args.command, "vllm": vllm.__version__, "model": args.model,
                             "tp": args.tp, "inproc": args.inproc, "plugins": os.environ.get("VLLM_PLUGINS"),
                             "workers": self.workers, "startup_s": round(self.startup_s, 2), "checks": {},
                             "state": {}, "outputs": {}}
        print(f"workers' allocator: {self.workers}", flush=True)
        t0 = time.perf_counter()
        self.reference = generate(self.llm)
        self.reference_s = time.perf_counter() - t0
        self.failed = False
        self.flows_since_check: list[dict] = []  # per sleep-wake since the last check: what changed

    def rpc(self, fn, *args):
        return self.llm.collective_rpc(fn, args=args)

    def capture(self) -> None:
        """Before a sleep (never inside a timed section)."""
        self.rpc(state.capture_state, "digest")

    def compare(self, flow: str) -> None:
        """After the wake (level 2: after the trainer's reload): what changed, per worker."""
        reports = self.rpc(state.compare_state)
        examples: dict[str, list] = {}  # changed category -> a few of its tensors (the last worker's)
        for r in reports:
            for c in state.state_differs(r):
                examples[c] = r["categories"][c]["examples"][:2]
        changed = sorted(examples)
        missing = sum(r["missing_count"] for r in reports)
        # Outside the sleep-mode pools ("other:none") nothing is the allocator's: reported, not judged.
        self.flows_since_check.append({"flow": flow, "changed": changed, "missing": missing,
                                       "lost": [c for c in changed if c != "other:none"] + (["(missing)"] if missing else []),
                                       "examples": examples})

    def check(self, name: str) -> bool:
        """The state of every sleep-wake since the last check (the judge), then the outputs (reported).
        With no sleep since the last check (cmd_first's after_prepare_again) only the outputs are news."""
        lost = sorted({c for f in self.flows_since_check for c in f["lost"]})
        self.result["state"][name] = {"lost": lost, "flows": self.flows_since_check}
        self.flows_since_check = []
        self.llm.reset_prefix_cache()
        got = generate(self.llm)
        tokens_same = [g[0] for g in got] == [r[0] for r in self.reference]
        lp = [abs(a - b) for g, r in zip(got, self.reference) if g[0] == r[0] for a, b in zip(g[1], r[1])]
        self.result["outputs"][name] = {"tokens_same": tokens_same, "identical": got == self.reference,
                                        "max_logprob_diff": max(lp, default=None)}
        same = not lost
        self.result["checks"][name] = same
        if lost and self.ours:
            self.failed = True
        verdict = ("PASS" if same else "FAIL") if self.ours else "INFO"
        what = "no sleep since the last check" if not self.result["state"][name]["flows"] else \
            "identical" if same else "DIFFERS in " + ", ".join(lost)
        print(f"{verdict} {name}: state {what}; tokens "
              f"{'identical' if tokens_same else 'DIFFER'} (max logprob difference "
              f"{self.result['outputs'][name]['max_logprob_diff']})", flush=True)
        for f in self.result["state"][name]["flows"]:
            for cat, examples in f["examples"].items():
                print(f"    {f['flow']}: {cat} changed, e.g. {examples}", flush=True)
        return same

    def timed(self, fn, *a, **kw) -> float:
        t0 = time.perf_counter()
        fn(*a, **kw)
        return time.perf_counter() - t0

    def level1(self, overwrite: bool = True, asleep=None) -> tuple[float, float]:
        """Sleep, [asleep()], [overwrite the freed memory], wake; the state compared across it."""
        self.capture()
        s = self.timed(self.llm.sleep, level=1)
        if asleep:
            asleep()
        if overwrite:
            scribble(self.args.tp)
        w = self.timed(self.llm.wake_up)
        self.compare("level1")
        return s, w

    def level2(self, overwrite: bool = True, pause: float = 0.0, asleep=None,
               core: list | None = None) -> tuple[float, float, float]:
        """The RLHF flow (sleep, [asleep()], [overwrite], wake weights, reload, wake kv_cache), compared.
        `core`: ours, appends the allocator's own seconds of the three steps, slowest worker's each."""
        def own(op: str) -> float:
            return max(w.get(op, 0.0) for w in self.rpc(core_seconds))

        self.capture()
        s = self.timed(self.llm.sleep, level=2)
        own_s = own("sleep") if core is not None else None
        if asleep:
            asleep()
        if overwrite:
            scribble(self.args.tp)
        time.sleep(pause)
        ww = self.timed(self.llm.wake_up, tags=["weights"])
        own_ww = own("wake") if core is not None else None
        self.rpc(load_params)
        wk = self.timed(self.llm.wake_up, tags=["kv_cache"])
        if core is not None:
            core.append((own_s, own_ww, own("wake")))
        self.compare("level2")
        return s, ww, wk

    def finish(self) -> int:
        self.result["failed"] = self.failed
        print("RESULT " + json.dumps(self.result), flush=True)
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.result, f, indent=1)
        return 1 if self.failed else 0


def cmd_flows(run: Run) -> None:
    """Level 1, then the level-2 RLHF flow, then level 1 again, each checked."""
    run.rpc(save_params)
    run.level1()
    run.check("level1")
    run.level2()
    run.check("level2_rlhf")
    run.level1()
    run.check("level1_after_level2")


def cmd_timing(run: Run) -> None:
    """llm.sleep()/wake_up() seconds: the first level-1 sleep of the process, warm ones (waking at once, and
    waking after --asleep-s asleep), level 2."""
    r = run.result
    r["weights_bytes"] = sum(run.rpc(save_params))
    r["pools_awake"] = run.rpc(pool_bytes)
    # What level 1 copies to host: the weights pool, and in vLLM 0.33 the "runtime" and "cudagraph" pools
    # too (0.26 has neither); the GB/s below are of the parameters' bytes.
    r["level1_offload_bytes"] = sum(b for pools in r["pools_awake"] for tag, b in pools.items()
                                    if tag in ("weights", "runtime", "cudagraph"))
    r["weights_pool_nonparams"] = run.rpc(weights_pool_nonparams)
    print(f"weights pool, non-parameter tensors: {r['weights_pool_nonparams']}", flush=True)
    if "vllm_sleep_ext" in str(run.workers):
        r["live_scope"] = run.rpc(live_scope_breakdown)
        print(f"live scope of the weights pool: {r['live_scope']}", flush=True)
        decode_during_prepare(run)
    first = run.level1(overwrite=True)
    r["host_pages_after_first_sleep"] = run.rpc(host_pages)
    print(f"worker's host memory after the first sleep: {r['host_pages_after_first_sleep']}", flush=True)
    run.check("level1_first")
    warm = [run.level1(overwrite=False) for _ in range(3)]
    run.check("level1_warm")
    # Warm cycles that stay asleep a while, as between an RL trainer's steps: the warm ones above wake at once,
    # and then the driver's map time follows how recently the sleep released memory (RESULTS.md section 16).
    rested = [run.level1(overwrite=False, asleep=lambda: time.sleep(run.args.asleep_s)) for _ in range(3)]
    run.check("level1_rested")
    own_l2: list | None = [] if run.ours else None  # the allocator's own seconds of each step
    l2 = [run.level2(overwrite=(i == 0), pause=1.0, core=own_l2) for i in range(3)]
    run.check("level2_rlhf")

    def used_mib() -> int:  # device memory in use (every process on the GPU: this driver's scribble context too)
        return sum(gpu_used_mib()[:run.args.tp])

    def keep(key: str, fn):  # while asleep: fn()'s value into the result as `key`
        return lambda: r.update({key: fn()})

    run.level1(overwrite=False, asleep=keep("asleep_mib_level1", used_mib))  # memory in use while asleep
    run.level2(overwrite=False, asleep=keep("asleep_mib_level2", used_mib))
    run.check("memory_probe_cycle")
    # The driver's floor for the same handles, measured in the worker while the engine sleeps at level 2.
    run.level2(overwrite=False, asleep=keep("level2_driver_floor", lambda: run.rpc(level2_driver_floor)))
    run.check("after_driver_floor")
    gb = r["weights_bytes"] / 1e9
    r["level1_first_sleep_s"], r["level1_first_wake_s"] = first
    r["level1_warm_sleep_s"] = sorted(s for s, _ in warm)[1]
    r["level1_warm_wake_s"] = sorted(w for _, w in warm)[1]
    r["level1_rested_asleep_s"] = run.args.asleep_s
    r["level1_rested_sleep_s"] = sorted(s for s, _ in rested)[1]
    r["level1_rested_wake_s"] = sorted(w for _, w in rested)[1]
    r["level2_sleep_s"] = sorted(x[0] for x in l2)[1]
    r["level2_wake_weights_s"] = sorted(x[1] for x in l2)[1]
    r["level2_wake_kv_s"] = sorted(x[2] for x in l2)[1]
    print(f"weights {gb:.2f} GB; level 1 first sleep {first[0]:.3f} s ({gb / first[0]:.1f} GB/s), "
          f"wake {first[1]:.3f} s; warm sleep {r['level1_warm_sleep_s']:.3f} s "
          f"({gb / r['level1_warm_sleep_s']:.1f} GB/s), wake {r['level1_warm_wake_s']:.3f} s "
          f"({gb / r['level1_warm_wake_s']:.1f} GB/s), wake after {run.args.asleep_s:g} s asleep "
          f"{r['level1_rested_wake_s']:.3f} s ({gb / r['level1_rested_wake_s']:.1f} GB/s); "
          f"level 2 sleep {r['level2_sleep_s']:.3f} s, "
          f"wake weights {r['level2_wake_weights_s']:.3f} s, wake kv {r['level2_wake_kv_s']:.3f} s; "
          f"GPU used asleep: level 1 {r['asleep_mib_level1']} MiB, level 2 {r['asleep_mib_level2']} MiB; level 1 "
          f"offloads {r['level1_offload_bytes'] / 1e9:.2f} GB of pools {r['pools_awake']}", flush=True)
    level2 = r["level2_sleep_s"] + r["level2_wake_weights_s"] + r["level2_wake_kv_s"]
    floor = max(f["total_s"] for f in r["level2_driver_floor"])
    r["level2_total_s"], r["level2_over_floor"] = level2, level2 / floor
    if own_l2:  # the allocator's part alone: what the driver floor, measured in the worker too, compares with
        r["level2_core_s"] = [list(x) for x in own_l2]
        own = sorted(sum(x) for x in own_l2)[1]
        print(f"level 2 in the allocator (its own seconds; sleep, wake weights, wake kv per cycle {r['level2_core_s']}): "
              f"{own:.3f} s, {own / floor:.2f} x the driver floor", flush=True)
    print(f"level 2 sleep + wake {level2:.3f} s; driver floor {floor:.3f} s (release + create/map of "
          f"{r['level2_driver_floor'][0]['handles']} handles, {r['level2_driver_floor'][0]['bytes'] / GiB:.1f} GiB): "
          f"{level2 / floor:.2f} x", flush=True)


def decode_during_prepare(run: Run) -> None:
    """vLLM decode throughput while host backup memory is prepared in the background, against none,
    at two throttle rates. The engine prepared it once already after loading; this drops it and
    starts again, as a weight reload would."""
    llm, r = run.llm, run.result
    decode_tokens_per_s(llm, 2.0)  # warm
    rows = []
    for rate in (2e9, 1e9, 0.5e9):
        before = decode_tokens_per_s(llm)
        run.rpc(lambda w, rate=rate: restart_host_prepare(w, rate))
        during = decode_tokens_per_s(llm)
        pinned_at_end = max(run.rpc(host_pinned_gib))
        ready = max(run.rpc(wait_host))
        after = decode_tokens_per_s(llm)
        ratio = during / ((before + after) / 2)
        rows.append({"rate_gbps": rate / 1e9, "before": round(before, 1), "during": round(during, 1),
                     "after": round(after, 1), "ratio": round(ratio, 4),
                     "pinned_gib_at_end": round(pinned_at_end, 2), "ready_gib": round(ready, 2)})
        print(f"decode tokens/s with the background prepare at {rate / 1e9:g} GB/s: before {before:.0f}, "
              f"during {during:.0f}, after {after:.0f}: {ratio:.3f} x (pinned {pinned_at_end:.2f} of "
              f"{ready:.2f} GiB when the measurement ended)", flush=True)
    r["decode_during_prepare"] = rows


def cmd_first(run: Run) -> None:
    """Issue 17 item 2: the first level-1 sleep of a large model, `--first-sleep-after` seconds after the
    engine is ready (one short request before it, as a smoke test), then a warm one, and decode
    throughput after the first request (ours against stock in the same call: >= 0.97 x), then, ours only,
    decode while the preparation runs again throttled by serving. No parameters are copied to host here
    (the 32B shape's 65 GB would not fit beside the backup): outputs are checked after each wake."""
    r, llm = run.result, run.llm
    pools = run.rpc(pool_bytes)
    r["pools_awake"] = pools
    r["level1_offload_bytes"] = sum(b for per_tag in pools for tag, b in per_tag.items()
                                    if tag in ("weights", "runtime", "cudagraph"))
    wait = run.ready_at + run.args.first_sleep_after - time.perf_counter()
    r["first_request_s"] = round(run.reference_s, 3)
    if wait > 0:
        time.sleep(wait)
    r["first_sleep_after_ready_s"] = round(time.perf_counter() - run.ready_at, 2)
    r["host_before_first_sleep"] = run.rpc(host_state)
    first = run.level1(overwrite=True)
    r["first_sleep_stats"] = run.rpc(last_sleep_stats)
    r["host_pages_after_first_sleep"] = run.rpc(host_pages)
    print(f"worker's host memory after the first sleep: {r['host_pages_after_first_sleep']}", flush=True)
    run.check("level1_first")
    warm = run.level1(overwrite=True)
    run.check("level1_warm")
    gb = r["level1_offload_bytes"] / 1e9
    r["level1_first_sleep_s"], r["level1_first_wake_s"] = first
    r["level1_warm_sleep_s"], r["level1_warm_wake_s"] = warm
    r["level1_first_sleep_gbps"] = round(gb / first[0], 2)
    r["level1_warm_sleep_gbps"] = round(gb / warm[0], 2)
    print(f"first sleep {first[0]:.3f} s ({gb / first[0]:.1f} GB/s) {r['first_sleep_after_ready_s']} s after "
          f"ready, host before it {r['host_before_first_sleep']}; first wake {first[1]:.3f} s; warm sleep "
          f"{warm[0]:.3f} s ({gb / warm[0]:.1f} GB/s), wake {warm[1]:.3f} s; level 1 offloads {gb:.2f} GB",
          flush=True)
    decode_tokens_per_s(llm, 2.0)  # warm
    r["decode_after_first_request"] = round(decode_tokens_per_s(llm), 1)
    print(f"decode tokens/s after the first request: {r['decode_after_first_request']:.0f}", flush=True)
    if "vllm_sleep_ext" in str(run.workers):
        run.rpc(restart_host_prepare_as_configured)
        during = decode_tokens_per_s(llm)
        pinned_during = max(run.rpc(host_pinned_gib))
        prepare = run.rpc(host_state)
        ready = max(run.rpc(wait_host))
        after = decode_tokens_per_s(llm)
        r["decode_during_serving_prepare"] = {"during": round(during, 1), "after": round(after, 1),
                                              "ratio": round(during / after, 4), "rate_while_serving": prepare,
                                              "pinned_gib_at_end": round(pinned_during, 2),
                                              "ready_gib": round(ready, 2)}
        print(f"decode tokens/s while the preparation runs throttled by serving: {during:.0f}, after it "
              f"{after:.0f}: {during / after:.3f} x (pinned {pinned_during:.2f} of {ready:.2f} GiB when it "
              f"ended; rate then {prepare})", flush=True)
        run.check("after_prepare_again")


def cmd_scope(run: Run) -> None:
    """Issue 17 item 3: what the live scope keeps of the weights pool, who holds its largest ranges
    (allocation stacks and attribute paths), then a level-2 cycle, checked."""
    r = run.result
    r["weights_pool_nonparams"] = run.rpc(weights_pool_nonparams)
    if "vllm_sleep_ext" not in str(run.workers):
        print("scope: needs our allocator", flush=True)
        return
    r["live_scope"] = run.rpc(live_scope_breakdown)
    print(f"live scope of the weights pool: {r['live_scope']}", flush=True)
    t0 = time.perf_counter()
    r["kept_owners"] = run.rpc(kept_owners)
    r["kept_owners_s"] = round(time.perf_counter() - t0, 2)
    for rank, owners in enumerate(r["kept_owners"]):
        for o in owners:
            print(f"kept range rank {rank}: {o['kept'] / (1 << 20):.1f} MiB of a {o['block'] / (1 << 20):.1f} MiB "
                  f"block; tensors {o['paths'] or 'none reached from the worker'}; allocated at "
                  f"{' <- '.join(o['allocated_at'])}", flush=True)
    run.rpc(save_params)
    s, ww, wk = run.level2(overwrite=True)
    r["level2"] = {"sleep_s": s, "wake_weights_s": ww, "wake_kv_s": wk}
    run.check("level2_rlhf")


def cmd_cycles(run: Run) -> None:
    """Many cycles, alternating level 1 and the level-2 RLHF flow; memory while asleep must stay flat."""
    run.rpc(save_params)
    asleep_mib, pools = [], []

    def measure() -> None:  # while asleep
        asleep_mib.append(sum(gpu_used_mib()[:run.args.tp]))
        pools.append(sum(sum(d.values()) for d in run.rpc(pool_bytes)))

    for i in range(run.args.cycles):
        (run.level1 if i % 2 == 0 else run.level2)(overwrite=False, asleep=measure)
        if i % 10 == 9:
            run.check(f"cycle{i + 1}")
    r = run.result
    r.update(cycles=run.args.cycles, asleep_mib_first=asleep_mib[0], asleep_mib_last=asleep_mib[-1],
             asleep_mib_max=max(asleep_mib), pool_bytes_first=pools[0], pool_bytes_last=pools[-1],
             pool_bytes_max=max(pools))
    grew = asleep_mib[-1] > asleep_mib[0] + 64 or pools[-1] > pools[0]
    r["checks"]["memory_flat"] = not grew
    run.failed |= grew
    print(f"{'PASS' if not grew else 'FAIL'} memory_flat: GPU used while asleep {asleep_mib[0]} -> "
          f"{asleep_mib[-1]} MiB (max {max(asleep_mib)}); pool bytes {pools[0]} -> {pools[-1]}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["flows", "timing", "cycles", "first", "scope"])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--inproc", action="store_true", help="engine core and worker in this process")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (default: vLLM's, graphs on)")
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--first-sleep-after", type=float, default=10.0,
                   help="first: seconds after the engine is ready that the first sleep comes")
    p.add_argument("--asleep-s", type=float, default=2.0,
                   help="timing: seconds the rested warm level-1 cycles stay asleep (default 2)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.inproc:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import cloudpickle

    cloudpickle.register_pickle_by_value(state)  # workers need not import it
    run = Run(args)
    {"flows": cmd_flows, "timing": cmd_timing, "cycles": cmd_cycles, "first": cmd_first,
     "scope": cmd_scope}[args.command](run)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
