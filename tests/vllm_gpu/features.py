"""Engine features that keep state in the weights pool, through level 1 and the level-2 RLHF flow, with
the state compared byte for byte in the worker (state.py) and tokens as a second signal.

One engine per run; ours or stock by vLLM's plugin loader (``VLLM_PLUGINS=vllm_sleep_ext`` / ``""``):

    python tests/vllm_gpu/features.py lora            # also: ngram draft eagle runner-v1 runner-v2 prefix moe
    python tests/vllm_gpu/features.py discard         # 0.33: cudagraph-offload preserve-params discard backend

Each flow: capture the state -> sleep -> overwrite the freed GPU memory -> wake (level 2: weights, the
trainer's parameters copied back, kv_cache) -> compare the state -> generate and compare the tokens.
- level1: llm.sleep(1), llm.wake_up().
- level2: what verl does: sleep(2), wake_up(["weights"]), the parameters only (named_parameters of the
  target model, less those vLLM keeps by sleep_preserve_parameter_names), wake_up(["kv_cache"]).
- discard (0.33): sleep(level=0), in-process the engine stepped until idle (complete_inproc_pause),
  release_kv_cache_memory() (the allocator's discard of "kv_cache"), wake_up(["kv_cache", "scheduling"]).
Result: ``RESULT {json}`` with the vLLM version, per flow the categories whose bytes differ. Exit 1 when
this allocator lost state it keeps (every category in a sleep-mode pool but the draft's parameters at
level 2, which the trainer here does not send); stock vLLM's losses are findings, not failures. Exit 0 with
"skipped" where the vLLM in use lacks the feature.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # e2e, models, state, lora_adapter; tests/: gpu_helpers

import e2e  # noqa: E402  (sets the environment vLLM needs here)
import state  # noqa: E402
from models import CONFIGS, model_dir  # noqa: E402

PREFIX = list(range(100, 164))  # a shared 64-token prefix (prefix caching)
PROMPTS = [list(range(1 + 7 * i, 41 + 7 * i)) for i in range(3)] + [PREFIX + [7, 8, 9], PREFIX + [10, 11]]
REPEATING = [[5, 6, 7, 8] * 10, [20, 21, 22] * 12]  # n-gram lookups find matches in these


@dataclasses.dataclass
class Feature:
    engine: dict = dataclasses.field(default_factory=dict)  # extra LLM(...) arguments
    env: dict = dataclasses.field(default_factory=dict)
    since: tuple = (0, 26)  # the first vLLM with the feature
    flows: tuple = ("level1", "level2")
    graphs: bool = False  # CUDA graphs (and torch.compile) on; eager otherwise, for a short start
    stock: bool = True  # run with stock vLLM too
    preserve_names: tuple = ()  # sleep_preserve_parameter_names: the trainer omits these
    draft: Optional[str] = None  # models.py config of the draft model
    spec: Optional[dict] = None  # speculative_config without the model
    lora: bool = False
    model: Optional[str] = None  # models.py config of the target model, if not --model's
    prompts: tuple = tuple(map(tuple, PROMPTS))


FEATURES: dict[str, Feature] = {
    "lora": Feature(engine=dict(enable_lora=True, max_lora_rank=8, max_loras=1), lora=True),
    "ngram": Feature(spec={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                           "prompt_lookup_min": 1}, prompts=tuple(map(tuple, REPEATING + PROMPTS))),
    "draft": Feature(spec={"method": "draft_model", "num_speculative_tokens": 2}, draft="llama-draft-tiny"),
    "eagle": Feature(spec={"method": "eagle", "num_speculative_tokens": 2}, draft="llama-eagle-tiny"),
    "runner-v1": Feature(env={"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    "runner-v2": Feature(env={"VLLM_USE_V2_MODEL_RUNNER": "1"}),
    "prefix": Feature(engine=dict(enable_prefix_caching=True)),
    "cudagraph-offload": Feature(engine=dict(sleep_mode_offload_cudagraph=True), since=(0, 33), graphs=True),
    "preserve-params": Feature(engine=dict(sleep_preserve_parameter_names=["*embed_tokens*", "draft.*"]),
                               since=(0, 33), preserve_names=("*embed_tokens*",),
                               spec={"method": "draft_model", "num_speculative_tokens": 2},
                               draft="llama-draft-tiny"),
    "discard": Feature(since=(0, 33), flows=("discard",)),
    # Routed experts through vLLM's fused MoE kernels, torch.compile and CUDA graphs (their constants and
    # the graph pool, offloaded at level 1 on 0.33).
    "moe": Feature(model="qwen3moe-tiny", graphs=True),
    "backend": Feature(engine=dict(sleep_mode_backend="vllm_sleep_ext"), since=(0, 33), stock=False),
}


def engine_facts(worker, preserve_names: tuple = ()) -> dict:
    """Worker side: which model runner, sleep-mode backend and draft model this engine really uses; what
    our allocator kept at its last sleep, beside the bytes of the parameters vLLM keeps itself (by
    sleep_preserve_parameter_names): the two must not overlap (no double copy)."""
    import dataclasses
    from fnmatch import fnmatch

    from vllm.device_allocator.cumem import CuMemAllocator

    runner = worker.model_runner
    backend = getattr(worker, "_sleep_mode_backend", None)
    get_draft = getattr(runner, "get_draft_model", None)
    draft = get_draft() if callable(get_draft) else None
    name = lambda obj: None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"  # noqa: E731
    kept = getattr(CuMemAllocator.get_instance(), "last_preserved", None)
    return {"runner": name(runner), "sleep_mode_backend": name(backend), "draft_model": name(draft),
            "prefix_caching": worker.vllm_config.cache_config.enable_prefix_caching,
            "ours_last_sleep_preserved": dataclasses.asdict(kept) if dataclasses.is_dataclass(kept) else None,
            "vllm_preserved_parameter_bytes": sum(p.nbytes for n, p in worker.get_model().named_parameters()
                                                  if any(fnmatch(n, g) for g in preserve_names))}


@contextmanager
def gpu_turn(lock_path: Optional[str]) -> Iterator[None]:
    """With --lock, several runs share the GPU: engine start, generation and each sleep-overwrite-wake
    take turns, so that no run overwrites free memory while another starts (vLLM sizes its KV cache
    from free memory) or sleeps (vLLM asserts free memory grew). The rest (imports, the state copies
    to host) overlaps."""
    if not lock_path:
        yield
        return
    import fcntl

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def vllm_version() -> tuple[str, tuple]:
    import vllm

    v = vllm.__version__
    return v, tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def make_llm(name: str, f: Feature, args) -> Any:
    from vllm import LLM

    kwargs = dict(model=model_dir(args.model), load_format="dummy", skip_tokenizer_init=True,
                  enable_sleep_mode=True, seed=0, max_model_len=1024,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  attention_config={"backend": "TRITON_ATTN"}, enforce_eager=not f.graphs, **f.engine)
    if f.spec is not None:
        kwargs["speculative_config"] = {**f.spec, **({"model": model_dir(f.draft)} if f.draft else {})}
    return LLM(**kwargs)


def generate(llm, prompts, lora_request) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=16, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False,
                        lora_request=lora_request)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]


def run_flow(llm, flow: str) -> None:
    if flow == "level1":
        llm.sleep(level=1)
        e2e.scribble(1)
        llm.wake_up()
    elif flow == "level2":
        llm.sleep(level=2)
        e2e.scribble(1)
        llm.wake_up(tags=["weights"])
        llm.collective_rpc(e2e.load_params)
        llm.wake_up(tags=["kv_cache"])
    elif flow == "discard":
        llm.sleep(level=0)
        complete_inproc_pause(llm)
        llm.release_kv_cache_memory()
        e2e.scribble(1)
        # EngineCore.wake_up resumes scheduling (resume_scheduler) only once nothing sleeps; a paused
        # in-process engine would leave the next generate stepping forever.
        if not llm.wake_up(tags=["kv_cache", "scheduling"]):
            raise RuntimeError("wake_up(['kv_cache', 'scheduling']) after the discard left the engine asleep")
    else:
        raise ValueError(f"unknown flow {flow!r}")


def complete_inproc_pause(llm, max_steps: int = 8) -> None:
    """vLLM 0.33 in-process (InprocClient, no busy loop), vllm/v1/engine/core.py: EngineCore.pause_scheduler
    returns at once without draining, so after sleep(level=0) the requests the last generate finished stay in
    scheduler.finished_req_ids (has_requests() true until the next schedule()), and with async scheduling a
    batch may stay in batch_queue; release_kv_cache_memory() wants neither ("requires a completed pause
    first"). The engine process's busy loop steps until idle (EngineCoreProc.has_work) before its pause
    completes; in-process we step it ourselves. With --mp there is no EngineCore here and nothing to do."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    for _ in range(max_steps):  # if still busy after these, release_kv_cache_memory() says so
        if core is None or not (core.scheduler.has_requests() or core.batch_queue):
            return
        llm.llm_engine.step()


def allowed_losses(flow: str, f: Feature) -> tuple[str, ...]:
    """Categories this allocator may lose in a flow: the draft's parameters at level 2, which vLLM
    keeps only when told (sleep_preserve_parameter_names "draft.*") and the trainer here does not send."""
    if flow == "level2" and not any(n.startswith("draft") for n in f.engine.get("sleep_preserve_parameter_names", ())):
        return ("draft_params",)
    return ()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("feature", choices=sorted(FEATURES))
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--mp", action="store_true", help="engine core in its own process (default: this one)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.12)
    p.add_argument("--lock", help="a lock file shared by runs on the same GPU at once (see gpu_turn)")
    args = p.parse_args()
    f = FEATURES[args.feature]
    if f.model:
        args.model = f.model
    os.environ.update(f.env)
    if not args.mp:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import cloudpickle

    for module in (e2e, state):  # callables sent to workers travel by value (workers need not import them)
        cloudpickle.register_pickle_by_value(module)
    version, vt = vllm_version()
    who = "stock" if os.environ.get("VLLM_PLUGINS") == "" else "ours"
    result: dict = {"script": "features", "feature": args.feature, "vllm": version, "who": who,
                    "model": args.model, "inproc": not args.mp, "graphs": f.graphs, "flows": {}}
    skip = (f"vLLM {version} has no {args.feature} (since {'.'.join(map(str, f.since))})" if vt < f.since
            else "stock vLLM has no such backend" if who == "stock" and not f.stock else None)
    if skip:
        result.update(skipped=skip, failed=False)
        print(f"SKIP {args.feature}: {skip}\nRESULT " + json.dumps(result), flush=True)
        return 0
    lora_request = None
    if f.lora:
        from lora_adapter import make_adapter
        from vllm.lora.request import LoRARequest

        path, made = make_adapter(CONFIGS[args.model])
        result["adapter"] = made
        print(f"LoRA adapter {path}: {made}", flush=True)
        lora_request = LoRARequest("vse-adapter", 1, path)
    with gpu_turn(args.lock):
        t0 = time.perf_counter()
        llm = make_llm(args.feature, f, args)
        result["startup_s"] = round(time.perf_counter() - t0, 2)
    result["workers"] = llm.collective_rpc(e2e.worker_info)
    print(f"workers' allocator: {result['workers']}", flush=True)
    with gpu_turn(args.lock):
        reference = generate(llm, f.prompts, lora_request)
        if f.lora:  # the adapter must matter, or keeping its slot proves nothing
            result["adapter_changes_tokens"] = generate(llm, f.prompts, None) != reference
    llm.collective_rpc(e2e.save_params, args=(f.preserve_names,))
    failed = False
    for flow in f.flows:
        captured = llm.collective_rpc(state.capture_state)[0]
        with gpu_turn(args.lock):
            run_flow(llm, flow)
        report = llm.collective_rpc(state.compare_state)[0]
        with gpu_turn(args.lock):
            got = generate(llm, f.prompts, lora_request)
        tokens_same = [g[0] for g in got] == [r[0] for r in reference]
        lp = [abs(a - b) for g, r in zip(got, reference) if g[0] == r[0] for a, b in zip(g[1], r[1])]
        differs = state.state_differs(report)
        # Outside the sleep-mode pools ("other:none") nothing is the allocator's: reported, not judged.
        lost = [c for c in differs if c not in allowed_losses(flow, f) and c != "other:none"]
        flow_failed = who == "ours" and bool(lost or report["missing_count"])
        failed |= flow_failed
        result["flows"][flow] = {"state_identical": report["identical"], "differs": differs,
                                 "categories": report["categories"], "missing": report["missing"],
                                 "missing_count": report["missing_count"], "replaced": report["replaced"],
                                 "replaced_count": report["replaced_count"], "captured": captured["categories"],
                                 "not_compared": captured["skipped"], "tokens_same": tokens_same,
                                 "max_logprob_diff": max(lp, default=None)}
        verdict = "FAIL" if flow_failed else "PASS" if who == "ours" else "INFO"
        print(f"{verdict} {args.feature} {flow} [{who}, vLLM {version}]: state "
              f"{'identical' if report['identical'] else 'DIFFERS in ' + ', '.join(differs or ['(missing tensors)'])}"
              f"; tokens {'identical' if tokens_same else 'DIFFER'}", flush=True)
        if report["replaced_count"]:
            print(f"    replaced by the engine (not compared): {report['replaced_count']} tensors, e.g. "
                  f"{report['replaced'][:2]}", flush=True)
        for cat in differs:
            r = report["categories"][cat]
            print(f"    {cat}: {r['differing_tensors']} of {r['tensors']} tensors, {r['differing_bytes']} of "
                  f"{r['bytes']} B differ, e.g. {r['examples'][:2]}", flush=True)
    result["engine"] = llm.collective_rpc(engine_facts, args=(f.preserve_names,))[0]  # after the flows
    print(f"engine: {result['engine']}", flush=True)
    result["failed"] = failed
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
