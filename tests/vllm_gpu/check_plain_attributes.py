"""Level-2 RLHF round trip in real vLLM (0.26.0) of a model whose layers keep plain-attribute constants.

generate (greedy) -> llm.sleep(level=2) -> the "trainer" overwrites the freed GPU memory ->
llm.wake_up(["weights"]) -> the trainer sends the parameters (the same ones: copied back into
named_parameters(), nothing else) -> llm.wake_up(["kv_cache"]) -> compare the constants byte for byte
(the verdict), generate again and compare the tokens (reported).

    # this allocator (run from the repository root, the built package importable):
    python3 tests/vllm_gpu/check_plain_attributes.py                 # PASS: constants unchanged
    # stock vLLM, for contrast:
    VLLM_PLUGINS="" python3 tests/vllm_gpu/check_plain_attributes.py --expect-differ   # PASS: constants changed

Needs vLLM on PYTHONPATH (e.g. /tmp/vsite) and VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
VLLM_NO_USAGE_STATS=1. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the
model registered by importing plain_attr_model is known to the worker, and unless VLLM_PLUGINS is ""
this script calls our plugin's register() itself (what vLLM does for an installed plugin; here the
package may be importable without being installed). Exit status 0 on PASS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # plain_attr_model, the repository root
import plain_attr_model  # noqa: E402  (registers the architecture)
from vllm import LLM, SamplingParams  # noqa: E402

if os.environ.get("VLLM_PLUGINS") != "":
    from vllm_sleep_ext.plugin import register

    register()

PROMPTS = [[1, 17, 99, 250, 3, 512], [1, 800, 801, 802], [1, 5, 6, 7, 8, 9, 10, 11, 12]]


def _model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def save_parameters(worker) -> int:
    """Worker side: what the trainer will send back, kept on the worker (CPU copies)."""
    worker._trainer_params = {n: p.detach().cpu().clone() for n, p in _model(worker).named_parameters()}
    return len(worker._trainer_params)


def load_parameters(worker) -> int:
    """Worker side: the trainer's load_weights, parameters only."""
    with torch.no_grad():
        for name, param in _model(worker).named_parameters():
            param.copy_(worker._trainer_params[name].to(param.device))
    torch.cuda.synchronize()
    return len(worker._trainer_params)


def constants(worker) -> dict[str, torch.Tensor]:
    """Worker side: CPU copies of the plain-attribute constants (for the report only, never restored)."""
    out = {}
    for name, module in _model(worker).named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, plain_attr_model.ExpertConstants):
            for attr in ("gemm1_alpha", "gemm1_beta", "clamp_limit"):
                out[f"{name}.experts.{attr}"] = getattr(experts, attr).detach().cpu().clone()
            out[f"{name}.output_scale"] = module.output_scale.detach().cpu().clone()
    return out


def allocator_class(worker) -> str:
    from vllm.device_allocator import get_mem_allocator_instance

    cls = type(get_mem_allocator_instance())
    return f"{cls.__module__}.{cls.__qualname__}"


def preserved_at_last_sleep(worker) -> str:
    from vllm.device_allocator import get_mem_allocator_instance

    kept = getattr(get_mem_allocator_instance(), "last_preserved", None)  # absent in vLLM's allocator
    return "n/a (stock allocator)" if kept is None else f"{kept.bytes} bytes in {kept.ranges} ranges"


def scribble_free_gpu_memory(leave_bytes: int = 512 << 20) -> int:
    """The trainer takes the memory the sleep gave back: fill it with 0xFF / 0x7F, then free it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    chunks, written, chunk, patterns = [], 0, 1 << 30, (0xFF, 0x7F)
    while chunk >= (2 << 20):
        if torch.cuda.mem_get_info()[0] - leave_bytes < chunk:
            chunk //= 2
            continue
        t = torch.empty(chunk, dtype=torch.uint8, device="cuda")
        t.fill_(patterns[len(chunks) % 2])
        chunks.append(t)
        written += chunk
    torch.cuda.synchronize()
    del chunks
    torch.cuda.empty_cache()
    return written


def generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-differ", action="store_true",
                        help="PASS when the constants changed in the round trip (stock vLLM)")
    args = parser.parse_args()

    model_dir = plain_attr_model.write_config(tempfile.mkdtemp(prefix="plain_attr_model_"))
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, enable_sleep_mode=True, seed=0,
              dtype="bfloat16", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.3,
              attention_config={"backend": "TRITON_ATTN"})
    print(f"allocator: {llm.collective_rpc(allocator_class)[0]}", flush=True)

    before = generate(llm)
    consts_before = llm.collective_rpc(constants)[0]
    n = llm.collective_rpc(save_parameters)[0]
    print(f"before sleep: {before[0]} ... ({len(consts_before)} plain-attribute constants, {n} parameters)")

    llm.sleep(level=2)
    print(f"level-2 sleep kept of the weights pool: {llm.collective_rpc(preserved_at_last_sleep)[0]}")
    written = scribble_free_gpu_memory()
    print(f"trainer overwrote {written / (1 << 30):.2f} GiB of free GPU memory")
    llm.wake_up(tags=["weights"])
    llm.collective_rpc(load_parameters)
    llm.wake_up(tags=["kv_cache"])

    consts_after = llm.collective_rpc(constants)[0]
    lost = sorted(k for k, v in consts_before.items() if not torch.equal(v, consts_after[k]))
    try:
        after = generate(llm)
    except Exception as e:  # noqa: BLE001 - garbage constants may break the forward outright
        print(f"after wake:   generate failed: {type(e).__name__}: {e}")
        after = None
    else:
        print(f"after wake:   {after[0]} ...")
    print(f"plain-attribute constants changed: {len(lost)} of {len(consts_before)} {lost[:4]}")

    # The judge is the constants, byte for byte; the outputs are a second signal (vLLM 0.33's logprobs move
    # between identical calls; greedy tokens mostly do not).
    identical = after == before
    ok = bool(lost) if args.expect_differ else not lost
    if not consts_before:
        print("the model built no plain-attribute constants: process_weights_after_loading never ran")
        ok = False
    want = "change" if args.expect_differ else "stay the same"
    print(f"{'PASS' if ok else 'FAIL'}: {len(lost)} of {len(consts_before)} plain-attribute constants changed "
          f"in the level-2 round trip (expected to {want}); outputs after it "
          f"{'identical' if identical else 'different'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
