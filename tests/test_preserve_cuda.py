"""GPU suite: the preserve scope at level 2 (Note [Preserve scope] in vllm_sleep_ext/preserve.py).

What vLLM's worker loses at level 2 even though it saves named_buffers(): tensors built after loading and
kept as plain attributes or on objects that are not nn.Modules (MoE expert constants). The RLHF flow and
its checks are those of test_buffers_cuda.py: sleep(offload_tags=()) -> the trainer overwrites the freed
GPU memory -> wake weights -> parameters reloaded -> wake kv_cache -> outputs bit-identical.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch import nn

try:
    from gpu_helpers import (anything_asleep, assert_in_pool, find_allocation, load_params, param_snapshot,
                             scribble_free_gpu_memory)
    from test_preserve import Wrapper  # a _make_wrapper_subclass tensor, device-agnostic
    from test_buffers_cuda import (Expected, TinyVllmLikeModel, alloc, deterministic,  # noqa: F401 (fixtures)
                                   level2_sleep_and_wake, make_kv_cache, named_tensors, preserve_mode,
                                   tiny_inputs)
except ImportError:  # tests/ collected as a package
    from tests.gpu_helpers import (anything_asleep, assert_in_pool, find_allocation, load_params,
                                   param_snapshot, scribble_free_gpu_memory)
    from tests.test_preserve import Wrapper
    from tests.test_buffers_cuda import (Expected, TinyVllmLikeModel, alloc, deterministic,  # noqa: F401
                                         level2_sleep_and_wake, make_kv_cache, named_tensors, preserve_mode,
                                         tiny_inputs)

pytestmark = pytest.mark.cuda

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
MiB = 1 << 20


# --------------------------------------------------------------------------------------------------
# The MoE-expert pattern: constants built after loading, on an object that is not an nn.Module
# --------------------------------------------------------------------------------------------------

class ExpertConstants:
    """Like vLLM's TrtLlmFp8ExpertsBase / FlashInferExperts / CutlassExpertsW4A8Fp8: not an nn.Module,
    so named_buffers() (what vLLM's worker saves at level 2) never sees these tensors."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        rows = w2.float().sum(dim=1)
        self.gemm1_alpha = (1.0 + 0.5 * torch.tanh(w1.float().sum(dim=1))).to(w1.dtype)  # [inter]
        self.gemm1_beta = (rows / rows.abs().max()).to(w2.dtype)  # [hidden]
        self.gemm1_clamp_limit = torch.tensor(3.0, device=w1.device)
        self.fake_input_scale = torch.ones(1, dtype=torch.float32, device=w1.device) * 0.75
        self.stride_w1 = torch.tensor(w1.stride(), dtype=torch.int64, device=w1.device)  # index tensors
        self.index_map = torch.arange(w1.shape[0] - 1, -1, -1, device=w1.device)  # a permutation

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class TinyMoELayer(nn.Module):
    """Two "experts"; process_weights_after_loading() builds their constants, as vLLM's quant methods do."""

    def __init__(self, hidden: int = 64, inter: int = 128, num_experts: int = 2) -> None:
        super().__init__()
        self.w1 = nn.ParameterList(nn.Parameter(torch.randn(inter, hidden) * 0.1) for _ in range(num_experts))
        self.w2 = nn.ParameterList(nn.Parameter(torch.randn(hidden, inter) * 0.1) for _ in range(num_experts))
        self.experts: list[ExpertConstants] = []

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        self.experts = [ExpertConstants(w1, w2) for w1, w2 in zip(self.w1, self.w2)]
        self.routing_scale = torch.linspace(0.5, 1.5, len(self.experts), device=self.w1[0].device)  # plain attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for i, (w1, w2, c) in enumerate(zip(self.w1, self.w2, self.experts)):
            h = (x * c.fake_input_scale) @ w1.t()
            # Indices clamped: a garbage index must give wrong numbers, not a device-side assert that
            # would poison the CUDA context for the rest of the session.
            h = h.index_select(-1, c.index_map.clamp(0, h.shape[-1] - 1)) * c.gemm1_alpha
            h = h.clamp(-c.gemm1_clamp_limit, c.gemm1_clamp_limit) * c.stride_w1[1].float()  # stride 1
            out = out + self.routing_scale[i] * (torch.tanh(h) @ w2.t() + c.gemm1_beta)
        return out


def build_moe(alloc) -> TinyMoELayer:
    torch.manual_seed(0)
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        layer = TinyMoELayer()
        layer.process_weights_after_loading()  # inside the pool, as vLLM's loader runs it
    return layer.eval()


def moe_constants(layer: TinyMoELayer) -> dict[str, torch.Tensor]:
    out = {f"experts.{i}.{k}": v for i, c in enumerate(layer.experts) for k, v in c.tensors().items()}
    out["routing_scale"] = layer.routing_scale
    return out


def moe_level2_round_trip(alloc, layer: TinyMoELayer) -> tuple[Expected, list[str]]:
    """The level-2 RLHF flow; returns the reference and the names of the constants that changed."""
    before = {k: v.cpu() for k, v in moe_constants(layer).items()}
    kv = make_kv_cache(alloc)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).cuda()
    expected = Expected(layer, lambda: layer(x))
    level2_sleep_and_wake(alloc, [expected], kv)
    return expected, [k for k, v in moe_constants(layer).items() if not torch.equal(v.cpu(), before[k])]


def test_level2_keeps_moe_expert_constants_built_after_loading(alloc, preserve_mode):
    preserve_mode("live")  # the default
    layer = build_moe(alloc)
    assert not dict(layer.named_buffers()), "test setup: the constants must not be buffers"
    assert_in_pool(alloc, named_tensors(layer) + list(moe_constants(layer).items()), WEIGHTS)
    shares = {find_allocation(alloc, t).ptr for t in moe_constants(layer).values()} & \
        {find_allocation(alloc, p).ptr for p in layer.parameters()}
    assert shares, "test setup: constants and parameters should share segments (parameters excluded by block)"
    expected, changed = moe_level2_round_trip(alloc, layer)
    assert not changed, f"preserve_mode='live' lost MoE expert constants {changed}"
    expected.check("level-2 round trip of MoE expert constants")


def test_level2_in_buffers_mode_loses_moe_expert_constants(alloc, preserve_mode):
    # What vLLM's own buffer copy amounts to: proves the test above can fail.
    preserve_mode("buffers")
    _, changed = moe_level2_round_trip(alloc, build_moe(alloc))
    assert changed, "preserve_mode='buffers' kept the constants (or the scribble missed them)"


def test_live_mode_keeps_far_less_than_the_parameters_and_never_the_kv_cache(alloc, preserve_mode, caplog):
    preserve_mode("live")
    model = build_in_weights(alloc, lambda: TinyVllmLikeModel(vocab=8192, hidden=256))
    layer = build_moe(alloc)
    kv = make_kv_cache(alloc, 64 * MiB)
    kept = sum(b.untyped_storage().nbytes() for b in model.buffers()) + \
        sum(t.nbytes for t in moe_constants(layer).values())
    param_bytes = sum(p.nbytes for p in list(model.parameters()) + list(layer.parameters()))
    torch.cuda.synchronize()
    with caplog.at_level(logging.INFO, logger="vllm_sleep_ext.allocator"):
        alloc.sleep(offload_tags=())
    try:
        stats = alloc.stats()
        summary = alloc.last_preserved
    finally:
        alloc.wake_up()
    assert stats.tags[KV_CACHE].preserved_bytes == 0 and stats.tags[KV_CACHE].backed_up_bytes == 0
    assert sum(t.preserved_bytes for t in stats.tags.values()) == summary.bytes
    assert kept <= summary.bytes < param_bytes // 4, (kept, summary, param_bytes)
    assert f"in {summary.ranges} ranges" in caplog.text
    del kv


def build_in_weights(alloc, factory):
    torch.manual_seed(0)
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        return factory().eval()


# --------------------------------------------------------------------------------------------------
# preserve() wins
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["buffers", "live"])
@pytest.mark.parametrize("name_it", [
    lambda p: p,
    lambda p: p.data,  # a temporary: only its storage outlives the call (issue 16, item 2)
    lambda p: p.detach().view(-1),
], ids=["parameter", "data", "view"])
def test_preserve_keeps_a_parameter_the_trainer_does_not_send(alloc, preserve_mode, mode, name_it):
    preserve_mode(mode)
    model = build_in_weights(alloc, lambda: TinyVllmLikeModel())
    alloc.preserve(name_it(model.norm_weight))  # e.g. a frozen parameter the trainer never sends
    gc.collect()
    kv = make_kv_cache(alloc)
    input_ids, positions = tiny_inputs()
    expected = Expected(model, lambda: model(input_ids, positions))
    sent = {k: v for k, v in expected.params.items() if k != "norm_weight"}
    torch.cuda.synchronize()
    alloc.sleep(offload_tags=())
    scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    load_params(model, sent, strict=False)
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc)
    assert torch.equal(model.norm_weight.detach().cpu(), expected.params["norm_weight"]), \
        f"preserve() of a parameter was dropped in preserve_mode={mode!r}"
    expected.check(f"level 2 with a preserved parameter in preserve_mode={mode!r}")
    del kv


# --------------------------------------------------------------------------------------------------
# Odd tensors anywhere in the process never fail a sleep
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["off", "buffers", "live"])
def test_odd_tensors_in_the_process_never_fail_a_sleep(alloc, preserve_mode, mode):
    preserve_mode(mode)
    model = build_in_weights(alloc, lambda: TinyVllmLikeModel())
    eye = torch.eye(16)
    cpu_module = nn.Module()  # today one sparse-CSR buffer on any CPU module made every sleep raise
    cpu_module.register_buffer("csr", eye.to_sparse_csr(), persistent=False)
    cpu_module.register_buffer("coo", eye.to_sparse(), persistent=False)
    cpu_module.register_buffer("meta", torch.empty(4, device="meta"), persistent=False)
    with alloc.use_memory_pool(tag=WEIGHTS):
        inner = torch.linspace(-1.0, 1.0, 4096, device="cuda")
        gpu_module = nn.Module()
        gpu_module.register_buffer("csr", eye.cuda().to_sparse_csr(), persistent=False)
        gpu_module.register_buffer("bsr", eye.cuda().to_sparse_bsr((4, 4)), persistent=False)
        gpu_module.register_buffer("wrapped", Wrapper(inner), persistent=False)
    outside = eye.cuda().to_sparse()  # outside every pool
    nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(5)], device="cuda")
    alloc.preserve(outside, nested, cpu_module, gpu_module)
    csr_before = gpu_module.csr.to_dense().cpu()
    kv = make_kv_cache(alloc)
    input_ids, positions = tiny_inputs()
    expected = Expected(model, lambda: model(input_ids, positions))
    for cycle in range(2):
        if mode == "off":
            torch.cuda.synchronize()
            alloc.sleep(offload_tags=())
            alloc.wake_up()
            continue
        level2_sleep_and_wake(alloc, [expected], kv)
        expected.check(f"cycle {cycle} with odd tensors in the process")
        assert torch.equal(inner.cpu(), torch.linspace(-1.0, 1.0, 4096)), "a wrapper buffer keeps its inner tensor"
        assert torch.equal(gpu_module.csr.to_dense().cpu(), csr_before), "a CSR buffer keeps its three tensors"
    del kv, outside, nested


def test_dtensor_buffer_is_kept_through_its_local_tensor(alloc, preserve_mode, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.tensor import DeviceMesh, DTensor, Replicate

    created = not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        except Exception as e:  # noqa: BLE001 - the set-up of a one-process group, not what is tested
            pytest.skip(f"test setup: no one-process gloo group here ({type(e).__name__}: {e})")
    try:
        preserve_mode("buffers")
        with alloc.use_memory_pool(tag=WEIGHTS):
            local = torch.linspace(0.0, 1.0, 8192, device="cuda")
        holder = nn.Module()
        try:
            mesh = DeviceMesh("cuda", torch.arange(1))
            dtensor = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
        except Exception as e:  # noqa: BLE001 - the set-up of a one-process mesh, not what is tested
            pytest.skip(f"test setup: no one-process DTensor here ({type(e).__name__}: {e})")
        holder.register_buffer("d", dtensor, persistent=False)
        assert isinstance(holder.d, DTensor)
        torch.cuda.synchronize()
        alloc.sleep(offload_tags=())
        scribble_free_gpu_memory()
        alloc.wake_up()
        assert torch.equal(local.cpu(), torch.linspace(0.0, 1.0, 8192)), "a DTensor buffer's local tensor"
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Discarded bytes made loud
# --------------------------------------------------------------------------------------------------

def _core_has_fill_unrestored(alloc) -> bool:
    return hasattr(alloc._core, "fill_unrestored")


def test_fill_unrestored_turns_an_unrestored_tensor_into_nan(alloc, preserve_mode):
    if not _core_has_fill_unrestored(alloc):
        pytest.skip("this build of _core.Allocator has no fill_unrestored option (issue 9)")
    preserve_mode("buffers")  # the plain-attribute constants are deliberately not preserved
    layer = build_moe(alloc)
    model = build_in_weights(alloc, lambda: TinyVllmLikeModel())
    kv = make_kv_cache(alloc)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).cuda()
    input_ids, positions = tiny_inputs()
    expected_model = Expected(model, lambda: model(input_ids, positions))
    params = param_snapshot(layer)
    alloc.fill_unrestored = True
    try:
        # No scribble: the pattern alone must make the unrestored bytes loud.
        level2_sleep_and_wake(alloc, [expected_model], kv, scribble=False)
        load_params(layer, params)
    finally:
        alloc.fill_unrestored = False
    alpha = layer.experts[0].gemm1_alpha
    assert torch.isnan(alpha).all(), "an unrestored bf16 constant must read as NaN"
    with torch.no_grad():
        assert torch.isnan(layer(x)).any(), "a model reading unrestored state fails at once"
    expected_model.check("level 2 with fill_unrestored on: restored bytes are untouched")
    del kv
    gc.collect()
