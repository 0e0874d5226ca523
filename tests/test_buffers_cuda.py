"""GPU suite: level-2 sleep keeps model buffers.

The RLHF loop these tests replay: the model is built inside `use_memory_pool(tag="weights")`, a KV cache
inside `use_memory_pool(tag="kv_cache")`; `sleep(offload_tags=())` (level 2) discards both; the trainer
takes the freed GPU memory (here: `scribble_free_gpu_memory()` overwrites it); `wake_up(["weights"])`;
the trainer sends parameters only (`load_params`, as vLLM's `load_weights`); `wake_up(["kv_cache"])`.
Buffers (rotary caches, position ids, masks, scales) are never reloaded by anyone but the allocator, so
the outputs are bit-identical only if the allocator preserved them.

Before every forward after a wake the buffers are compared with a CPU copy taken before sleep (only to
check them, never to restore them): a clear failure message, and no device-side assert from a garbage
index buffer (BERT's position_ids) that would poison the CUDA context for the rest of the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import weakref
from collections.abc import Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at cuBLAS init

import pytest
import torch
from torch import nn

from vllm_sleep_ext import CuMemAllocator

try:
    from gpu_helpers import (anything_asleep, assert_in_pool, assert_tensors_match, buffer_snapshot,
                             find_allocation, load_params, param_snapshot, release_cuda_memory,
                             scribble_free_gpu_memory, tag_sleep_states, tensors_differing)
except ImportError:  # tests/ collected as a package
    from tests.gpu_helpers import (anything_asleep, assert_in_pool, assert_tensors_match, buffer_snapshot,
                                   find_allocation, load_params, param_snapshot, release_cuda_memory,
                                   scribble_free_gpu_memory, tag_sleep_states, tensors_differing)

pytestmark = pytest.mark.cuda

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
VOCAB = 128
MiB = 1 << 20


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def alloc():
    """The process-wide allocator, awake at start and at end, in preserve_mode "buffers" during the test
    (what these tests prove: buffers alone; the default "live" keeps more) and in its original mode
    after it, its pools released."""
    allocator = CuMemAllocator.get_instance()
    if anything_asleep(allocator):
        allocator.wake_up()
    original_mode = allocator.preserve_mode
    allocator.preserve_mode = "buffers"
    yield allocator
    try:
        if anything_asleep(allocator):
            allocator.wake_up()
    finally:
        allocator.preserve_mode = original_mode
        release_cuda_memory()
        allocator.release_pools()
        release_cuda_memory()


@pytest.fixture
def preserve_mode(alloc):
    """Returns a setter for `alloc.preserve_mode`; the original mode is restored after the test."""
    original = alloc.preserve_mode

    def set_mode(mode: str) -> None:
        alloc.preserve_mode = mode
        assert alloc.preserve_mode == mode

    yield set_mode
    alloc.preserve_mode = original


@pytest.fixture(autouse=True)
def deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# --------------------------------------------------------------------------------------------------
# The RLHF round trip and the reference it is checked against
# --------------------------------------------------------------------------------------------------

class Expected:
    """Reference outputs, buffers and addresses of a model, taken before sleep.

    `forward` must be a pure function of the model's state and fixed inputs. The parameter snapshot in
    `params` is what the "trainer" sends back after a level-2 wake.
    """

    def __init__(self, model: nn.Module, forward: Callable[[], torch.Tensor]):
        self.model = model
        self.forward = forward
        torch.cuda.synchronize()
        self.out = self._run()
        again = self._run()
        assert torch.equal(again, self.out), "test setup: the forward pass is not deterministic"
        self.params = param_snapshot(model)
        self.buffers = buffer_snapshot(model)
        self.addresses = self._addresses()

    def _run(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.forward()
        torch.cuda.synchronize()
        return out.detach().to("cpu", copy=True)

    def _addresses(self) -> dict[str, int]:
        named = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        return {name: t.data_ptr() for name, t in named}

    def check(self, after: str) -> None:
        assert self._addresses() == self.addresses, f"tensors moved after {after}"
        assert_tensors_match(dict(self.model.named_buffers()), self.buffers, f"buffers after {after}")
        out = self._run()
        if not torch.equal(out, self.out):
            diff = (out.float() - self.out.float()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"outputs after {after} are not bit-identical (max abs diff {diff})")


def make_kv_cache(alloc, nbytes: int = 8 * MiB) -> torch.Tensor:
    with alloc.use_memory_pool(tag=KV_CACHE):
        kv = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    kv.fill_(1.0)
    return kv


def level2_sleep_and_wake(alloc, reload: list[Expected], kv: torch.Tensor | None = None, *,
                          scribble: bool = True) -> None:
    """sleep(offload_tags=()) -> trainer fills the GPU -> wake weights -> reload params -> wake kv_cache."""
    torch.cuda.synchronize()
    alloc.sleep(offload_tags=())
    states = tag_sleep_states(alloc, (WEIGHTS, KV_CACHE))
    assert states[WEIGHTS] == {True}, f"level-2 sleep left weights awake: {states}"
    if kv is not None:
        assert states[KV_CACHE] == {True}, f"level-2 sleep left kv_cache awake: {states}"
    if scribble:
        scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    states = tag_sleep_states(alloc, (WEIGHTS, KV_CACHE))
    assert states[WEIGHTS] == {False}, f"wake_up(['weights']) left weights asleep: {states}"
    if kv is not None:
        assert states[KV_CACHE] == {True}, f"wake_up(['weights']) woke kv_cache too: {states}"
    for expected in reload:
        load_params(expected.model, expected.params)
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc), "something still asleep after waking weights and kv_cache"
    if kv is not None:
        kv.fill_(0.5)  # the KV cache is usable again (its content after a level-2 sleep is undefined)
        torch.cuda.synchronize()


def level1_sleep_and_wake(alloc, kv: torch.Tensor | None = None, *, scribble: bool = True) -> None:
    """sleep(offload_tags=("weights",)) -> trainer fills the GPU -> wake weights -> wake kv_cache."""
    torch.cuda.synchronize()
    alloc.sleep(offload_tags=(WEIGHTS,))
    if scribble:
        scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc), "something still asleep after waking weights and kv_cache"
    if kv is not None:
        kv.fill_(0.5)
        torch.cuda.synchronize()


def build_in_pool(pool: Callable[[], contextlib.AbstractContextManager], factory: Callable[[], nn.Module],
                  how: str, device: str = "cuda") -> nn.Module:
    """Build `factory()` so that its tensors land in `pool()`:
    "moved": built on CPU, then `.to(device)` inside the pool; "direct": built under
    `torch.device(device)` inside the pool (as vLLM builds models)."""
    torch.manual_seed(0)
    if how == "moved":
        model = factory()
        with pool():
            model = model.to(device)
    elif how == "direct":
        with pool(), torch.device(device):
            model = factory()
    else:
        raise ValueError(how)
    return model.eval()


def weights_pool(alloc):
    return lambda: alloc.use_memory_pool(tag=WEIGHTS)


def named_tensors(model: nn.Module):
    return list(itertools.chain(model.named_parameters(), model.named_buffers()))


# --------------------------------------------------------------------------------------------------
# Modules shaped like vLLM's, and small modules for the edge cases
# --------------------------------------------------------------------------------------------------

class VllmLikeRotaryEmbedding(nn.Module):
    """Shaped like vllm.model_executor.layers.rotary_embedding.RotaryEmbedding: `cos_sin_cache` computed
    from inv_freq at __init__, registered with persistent=False, gathered by position in forward."""

    def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int, base: float,
                 is_neox_style: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.is_neox_style = is_neox_style
        cache = self.compute_cos_sin_cache(base).to(dtype or torch.get_default_dtype())
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def compute_cos_sin_cache(self, base: float) -> torch.Tensor:
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim))
        t = torch.arange(self.max_position_embeddings, dtype=torch.float)
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos = cos.unsqueeze(-2).to(x.dtype)
        sin = sin.unsqueeze(-2).to(x.dtype)
        if self.is_neox_style:
            x1, x2 = torch.chunk(x, 2, dim=-1)
        else:
            x1, x2 = x[..., ::2], x[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            return torch.cat((o1, o2), dim=-1)
        return torch.stack((o1, o2), dim=-1).flatten(-2)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        num_tokens = positions.shape[0]
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
        out = []
        for x in (query, key):
            shape = x.shape
            x = x.view(num_tokens, -1, self.head_size)
            rot = self._rotate(x[..., :self.rotary_dim], cos, sin)
            out.append(torch.cat((rot, x[..., self.rotary_dim:]), dim=-1).reshape(shape))
        return out[0], out[1]


class TinyVllmLikeModel(nn.Module):
    """One attention block over a flat batch of tokens (vLLM style: input_ids and positions, both [T]).
    Buffers: the rotary `cos_sin_cache` (partial rotary) and a boolean `causal_mask`. CUDA-graph safe."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 64, num_heads: int = 4, rotary_dim: int = 8,
                 max_position: int = 256, base: float = 10000.0, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = hidden // num_heads
        self.embed_tokens = nn.Embedding(vocab, hidden, dtype=dtype)
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False, dtype=dtype)
        self.rotary_emb = VllmLikeRotaryEmbedding(self.head_size, rotary_dim, max_position, base, dtype=dtype)
        self.o_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.norm_weight = nn.Parameter(torch.ones(hidden, dtype=dtype) + 0.1 * torch.randn(hidden, dtype=dtype))
        self.lm_head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        mask = torch.ones(max_position, max_position, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        h = self.embed_tokens(input_ids)
        q, k, v = self.qkv_proj(h).chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        q, k, v = (x.reshape(t, self.num_heads, self.head_size).transpose(0, 1) for x in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * self.head_size ** -0.5
        mask = self.causal_mask.index_select(0, positions).index_select(1, positions)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = (scores.float().softmax(-1).to(v.dtype) @ v).transpose(0, 1).reshape(t, -1)
        h = h + self.o_proj(attn)
        h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype) * self.norm_weight
        return self.lm_head(h)


def tiny_inputs(num_tokens: int = 24, max_position: int = 256, seed: int = 0, device: str = "cuda"):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_tokens,), generator=g)
    positions = torch.randperm(max_position, generator=g)[:num_tokens].sort().values
    return input_ids.to(device), positions.to(device)


class ViewBufferModule(nn.Module):
    """Buffers that are views into one larger storage: a contiguous slice at an offset and a strided
    (non-contiguous) column block."""

    def __init__(self, width: int = 64):
        super().__init__()
        backing = torch.randn(4 * width, width)
        self.register_buffer("window", backing[width + 3: 2 * width + 3], persistent=False)
        self.register_buffer("columns", backing[:, 5: 5 + width // 4], persistent=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.proj(x) @ self.window)
        return y @ self.columns[: x.shape[-1]]


class SharedSegmentModule(nn.Module):
    """Many small parameters and buffers, allocated interleaved so that they share caching-allocator
    segments (small allocations share one 2 MiB segment)."""

    def __init__(self, layers: int = 16, width: int = 16):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(layers):
            lin = nn.Linear(width, width)
            lin.register_buffer("gain", torch.linspace(0.5, 1.5, width) + i / layers, persistent=False)
            lin.register_buffer("keep", torch.arange(width) % (i % 3 + 2) != 0, persistent=False)
            self.layers.append(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = torch.tanh(lin(x) * lin.gain) * lin.keep + 0.5 * x
        return x


class DerivedAttributeModule(nn.Module):
    """A tensor derived at __init__ and kept as a plain attribute (neither buffer nor parameter), large
    enough (4 MiB) to get its own caching-allocator segment, apart from the small parameters."""

    def __init__(self, width: int = 16, numel: int = 1 << 20):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.derived = torch.linspace(1.0, 2.0, numel).view(-1, width)  # plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.derived[:: self.derived.shape[0] // x.shape[0]][: x.shape[0]]


# --------------------------------------------------------------------------------------------------
# Real transformers architectures from tiny random configurations (no downloads)
# --------------------------------------------------------------------------------------------------

def _decoder(**overrides) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class HfArch:
    name: str
    config: Callable  # transformers module -> config object
    buffers: tuple[str, ...]  # buffers that must exist (and are in the weights pool)
    covers: str
    masked_lm: bool = False
    dtype: torch.dtype = torch.float32

    def build(self, pool, how: str, device: str = "cuda") -> nn.Module:
        transformers = pytest.importorskip("transformers")
        cfg = self.config(transformers)
        auto = transformers.AutoModelForMaskedLM if self.masked_lm else transformers.AutoModelForCausalLM
        return build_in_pool(pool, lambda: auto.from_config(cfg, attn_implementation="eager", dtype=self.dtype),
                             how, device)


_ROTARY = ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq")

ROTARY_ARCHS = [
    HfArch("llama", lambda T: T.LlamaConfig(**_decoder()), _ROTARY,
           "rotary inv_freq, no scaling"),
    HfArch("llama-rope-linear",
           lambda T: T.LlamaConfig(**_decoder(), rope_scaling={"rope_type": "linear", "factor": 2.0}),
           _ROTARY, "rotary inv_freq with linear scaling"),
    HfArch("llama-rope-llama3",
           lambda T: T.LlamaConfig(**_decoder(), rope_scaling={
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}),
           _ROTARY, "rotary inv_freq with llama3 frequency-band scaling"),
    HfArch("qwen2-bf16", lambda T: T.Qwen2Config(**_decoder()), _ROTARY,
           "bf16 parameters, fp32 rotary inv_freq", dtype=torch.bfloat16),
    HfArch("phi3-partial-rotary", lambda T: T.Phi3Config(**_decoder(partial_rotary_factor=0.5)), _ROTARY,
           "partial rotary (half of head_dim)"),
    HfArch("gpt-neox-partial-rotary",
           lambda T: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, rotary_pct=0.25,
                                     max_position_embeddings=64, **_SPECIAL),
           ("gpt_neox.rotary_emb.inv_freq", "gpt_neox.rotary_emb.original_inv_freq"),
           "partial rotary (a quarter of head_dim)"),
    HfArch("gptj-sincos-table",
           lambda T: T.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                  n_positions=64, **_SPECIAL),
           ("transformer.h.0.attn.embed_positions", "transformer.h.1.attn.embed_positions"),
           "precomputed sin/cos position table per layer (like vLLM's cos_sin_cache)"),
]

SCALED_EMBEDDING_ARCHS = [
    HfArch("gemma-bf16", lambda T: T.GemmaConfig(**_decoder(head_dim=16)),
           ("model.embed_tokens.embed_scale",) + _ROTARY,
           "scaled embedding (0-dim bf16 embed_scale = sqrt(hidden)) + rotary", dtype=torch.bfloat16),
]

POSITION_IDS_ARCHS = [
    HfArch("bert",
           lambda T: T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, pad_token_id=0),
           ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids"),
           "learned absolute positions indexed by an int64 position_ids buffer; token_type_ids buffer",
           masked_lm=True),
]

MASK_ARCHS = [
    HfArch("gpt-neo-causal-mask",
           lambda T: T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]], window_size=8,
                                    max_position_embeddings=64, **_SPECIAL),
           ("transformer.h.0.attn.attention.bias", "transformer.h.1.attn.attention.bias"),
           "boolean causal mask buffers (global, and sliding-window local)"),
]

HOW = ["moved", "direct"]


def _arch_cases(archs):
    return [pytest.param(arch, how, id=f"{arch.name}-{how}") for arch in archs for how in HOW]


def hf_token_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _check_hf_arch_survives_level2(alloc, arch: HfArch, how: str) -> None:
    model = arch.build(weights_pool(alloc), how)
    missing = set(arch.buffers) - dict(model.named_buffers()).keys()
    assert not missing, f"test setup: {arch.name} has no buffer {sorted(missing)}; transformers changed?"
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    kv = make_kv_cache(alloc)
    input_ids = hf_token_ids().cuda()
    expected = Expected(model, lambda: model(input_ids=input_ids).logits)
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check(f"level-2 sleep, wake and parameter reload of {arch.name} ({arch.covers})")


@pytest.mark.parametrize("arch, how", _arch_cases(ROTARY_ARCHS))
def test_level2_keeps_rotary_cache_after_param_reload(alloc, arch, how):
    _check_hf_arch_survives_level2(alloc, arch, how)


@pytest.mark.parametrize("arch, how", _arch_cases(SCALED_EMBEDDING_ARCHS))
def test_level2_keeps_embedding_scale_after_param_reload(alloc, arch, how):
    _check_hf_arch_survives_level2(alloc, arch, how)


@pytest.mark.parametrize("arch, how", _arch_cases(POSITION_IDS_ARCHS))
def test_level2_keeps_position_ids_after_param_reload(alloc, arch, how):
    _check_hf_arch_survives_level2(alloc, arch, how)


@pytest.mark.parametrize("arch, how", _arch_cases(MASK_ARCHS))
def test_level2_keeps_attention_mask_after_param_reload(alloc, arch, how):
    _check_hf_arch_survives_level2(alloc, arch, how)


# --------------------------------------------------------------------------------------------------
# vLLM-shaped rotary embedding and CUDA graphs
# --------------------------------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("dtype", DTYPES)
def test_level2_keeps_vllm_cos_sin_cache_after_param_reload(alloc, dtype, how):
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(dtype=dtype), how)
    assert model.rotary_emb.cos_sin_cache.dtype == dtype
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    kv = make_kv_cache(alloc)
    input_ids, positions = tiny_inputs()
    expected = Expected(model, lambda: model(input_ids, positions))
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check("level-2 sleep, wake and parameter reload")


@pytest.mark.parametrize("graph_pool", ["private-pool", "allocator-cudagraph-pool"])
def test_cuda_graph_replays_identically_after_level2_and_param_reload(alloc, graph_pool):
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(), "direct")
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    kv = make_kv_cache(alloc)
    input_ids, positions = tiny_inputs()  # static inputs, outside the pools
    # cudagraph_pool() tags what capture allocates "cudagraph" and yields the pool id (as in vLLM 0.33).
    use_pool = graph_pool == "allocator-cudagraph-pool"
    with (alloc.cudagraph_pool() if use_pool else contextlib.nullcontext()) as pool_id, torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(input_ids, positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool_id):
            static_out = model(input_ids, positions)
    if pool_id is not None:
        data = find_allocation(alloc, static_out)
        assert data is not None and data.tag == "cudagraph", \
            f"test setup: graph output not in a 'cudagraph' allocation ({data})"

    graph.replay()
    torch.cuda.synchronize()
    reference = static_out.cpu()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out.cpu(), reference), "test setup: graph replay is not deterministic"
    params, buffers = param_snapshot(model), buffer_snapshot(model)

    torch.cuda.synchronize()
    alloc.sleep(offload_tags=())
    scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    load_params(model, params)
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc)

    assert_tensors_match(dict(model.named_buffers()), buffers, "buffers after level-2 round trip")
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out.cpu(), reference), "captured graph replays differently after level 2"
    del graph, static_out, kv


# --------------------------------------------------------------------------------------------------
# The test can fail: without preservation the same flow gives other outputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", ["hf-llama", "vllm-like"])
def test_level2_without_buffer_preservation_changes_outputs(alloc, preserve_mode, model_kind):
    preserve_mode("off")
    if model_kind == "hf-llama":
        model = ROTARY_ARCHS[0].build(weights_pool(alloc), "direct")
        input_ids = hf_token_ids().cuda()
        forward = lambda: model(input_ids=input_ids).logits  # noqa: E731
    else:
        model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(), "direct")
        input_ids, positions = tiny_inputs()
        forward = lambda: model(input_ids, positions)  # noqa: E731
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    kv = make_kv_cache(alloc)
    expected = Expected(model, forward)
    level2_sleep_and_wake(alloc, [expected], kv)

    changed = tensors_differing(dict(model.named_buffers()), expected.buffers)
    assert changed, "with preserve_mode='off' the buffers survived a level-2 sleep: the test proves nothing"
    with torch.no_grad():
        out = forward().cpu()
    assert not torch.equal(out, expected.out), \
        "with preserve_mode='off' outputs are still identical: the buffer tests cannot fail"


# --------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------

def test_level2_keeps_buffer_reassigned_after_registration(alloc):
    """`module.buf = new_tensor` replaces a registered buffer without calling register_buffer; sleep must
    preserve the current tensor, both when reassigned before the first sleep and between cycles."""
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(), "direct")
    input_ids, positions = tiny_inputs()
    kv = make_kv_cache(alloc)
    rotary = model.rotary_emb
    for cycle, base in enumerate((500000.0, 1234.5)):
        old = rotary.cos_sin_cache
        with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
            rotary.cos_sin_cache = rotary.compute_cos_sin_cache(base)
        assert "cos_sin_cache" in rotary._buffers and rotary.cos_sin_cache is not old
        del old
        assert_in_pool(alloc, named_tensors(model), WEIGHTS)
        expected = Expected(model, lambda: model(input_ids, positions))
        level2_sleep_and_wake(alloc, [expected], kv)
        expected.check(f"level-2 round trip {cycle} of a reassigned buffer")


def test_level2_keeps_buffers_that_are_views_into_larger_storage(alloc):
    # Built directly on the device: `.to("cuda")` would copy each view into a storage of its own.
    model = build_in_pool(weights_pool(alloc), lambda: ViewBufferModule(), "direct")
    assert model.window.untyped_storage().data_ptr() == model.columns.untyped_storage().data_ptr()
    assert model.window.storage_offset() > 0 and not model.columns.is_contiguous()
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    kv = make_kv_cache(alloc)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).cuda()
    expected = Expected(model, lambda: model(x))
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check("level-2 round trip of view buffers")


def test_level2_keeps_buffers_sharing_a_segment_with_parameters(alloc):
    model = build_in_pool(weights_pool(alloc), lambda: SharedSegmentModule(), "direct")
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    segments_with_params = {find_allocation(alloc, p).ptr for p in model.parameters()}
    segments_with_buffers = {find_allocation(alloc, b).ptr for b in model.buffers()}
    assert segments_with_params & segments_with_buffers, \
        "test setup: expected parameters and buffers in one caching-allocator segment"
    kv = make_kv_cache(alloc)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).cuda()
    expected = Expected(model, lambda: model(x))
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check("level-2 round trip of buffers interleaved with parameters")


def test_module_collected_before_sleep_is_released_and_sleep_still_works(alloc):
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        torch.manual_seed(0)
        keep = TinyVllmLikeModel().eval()
        doomed = TinyVllmLikeModel(max_position=512).eval()
    input_ids, positions = tiny_inputs()
    kv = make_kv_cache(alloc)
    with torch.no_grad():
        doomed(input_ids, positions)
    doomed_ref = weakref.ref(doomed)
    doomed_buffer_ref = weakref.ref(doomed.rotary_emb.cos_sin_cache)
    del doomed
    gc.collect()
    assert doomed_ref() is None, "the allocator keeps a garbage module alive"
    assert doomed_buffer_ref() is None, "the allocator keeps the buffer of a garbage module alive"

    expected = Expected(keep, lambda: keep(input_ids, positions))
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check("level-2 round trip after another module was collected")

    # The freed memory is still good for a new module in the same pool, across another round trip.
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        torch.manual_seed(1)
        fresh = TinyVllmLikeModel(base=5000.0).eval()
    assert_in_pool(alloc, named_tensors(fresh), WEIGHTS)
    expected_fresh = Expected(fresh, lambda: fresh(input_ids, positions))
    level2_sleep_and_wake(alloc, [expected, expected_fresh], kv)
    expected.check("second level-2 round trip")
    expected_fresh.check("level-2 round trip of a module built in reused memory")


@pytest.mark.parametrize("what", ["module", "buffer"])
def test_buffer_freed_while_asleep_then_wake_works(alloc, what):
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        torch.manual_seed(0)
        keep = TinyVllmLikeModel().eval()
        doomed = ViewBufferModule().eval()
        doomed.register_buffer("extra", torch.randn(4096), persistent=False)
    input_ids, positions = tiny_inputs()
    kv = make_kv_cache(alloc)
    expected = Expected(keep, lambda: keep(input_ids, positions))
    if what == "buffer":
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).cuda()
        expected_doomed = Expected(doomed, lambda: doomed(x))

    torch.cuda.synchronize()
    alloc.sleep(offload_tags=())
    if what == "module":
        del doomed
    else:
        del doomed.extra
    gc.collect()
    torch.cuda.empty_cache()
    scribble_free_gpu_memory()
    alloc.wake_up([WEIGHTS])
    load_params(keep, expected.params)
    if what == "buffer":
        load_params(doomed, expected_doomed.params)
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc)

    expected.check("wake after a buffer was freed while asleep")
    if what == "buffer":
        assert "extra" not in dict(doomed.named_buffers())
        expected_doomed.buffers.pop("extra")
        expected_doomed.addresses.pop("extra")
        expected_doomed.check("wake of a module that lost a buffer while asleep")
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check("a further level-2 round trip")


def test_level1_and_level2_alternate_for_20_cycles_with_identical_outputs(alloc):
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(), "direct")
    view_model = build_in_pool(weights_pool(alloc), lambda: ViewBufferModule(), "direct")
    input_ids, positions = tiny_inputs()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).cuda()
    kv = make_kv_cache(alloc)
    expected = [Expected(model, lambda: model(input_ids, positions)), Expected(view_model, lambda: view_model(x))]
    for cycle in range(20):
        level = 1 if cycle % 2 == 0 else 2
        if level == 1:
            level1_sleep_and_wake(alloc, kv)  # no parameter reload: level 1 backs the weights up
        else:
            level2_sleep_and_wake(alloc, expected, kv)
        for e in expected:
            e.check(f"cycle {cycle} (level {level})")


@pytest.mark.parametrize("recast", ["half", "bfloat16"])
def test_level2_keeps_buffers_recast_after_registration(alloc, recast):
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(), "direct")
    old_cache = model.rotary_emb.cos_sin_cache
    with alloc.use_memory_pool(tag=WEIGHTS):
        model = model.half() if recast == "half" else model.to(torch.bfloat16)
    dtype = torch.float16 if recast == "half" else torch.bfloat16
    assert model.rotary_emb.cos_sin_cache.dtype == dtype and model.rotary_emb.cos_sin_cache is not old_cache
    assert model.causal_mask.dtype == torch.bool
    del old_cache
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    input_ids, positions = tiny_inputs()
    kv = make_kv_cache(alloc)
    expected = Expected(model, lambda: model(input_ids, positions))
    level2_sleep_and_wake(alloc, [expected], kv)
    expected.check(f"level-2 round trip of buffers recast with .{recast}()")


def _derived_attribute_round_trip(alloc):
    with alloc.use_memory_pool(tag=WEIGHTS), torch.device("cuda"):
        torch.manual_seed(0)
        model = DerivedAttributeModule().eval()
    assert "derived" not in dict(model.named_buffers())
    assert_in_pool(alloc, named_tensors(model) + [("derived", model.derived)], WEIGHTS)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)).cuda()
    kv = make_kv_cache(alloc)
    expected = Expected(model, lambda: model(x))
    derived_before = model.derived.cpu()
    level2_sleep_and_wake(alloc, [expected], kv)
    return model, expected, derived_before


def test_live_preserve_mode_keeps_derived_plain_attribute_tensor(alloc, preserve_mode):
    preserve_mode("live")
    model, expected, derived_before = _derived_attribute_round_trip(alloc)
    assert torch.equal(model.derived.cpu(), derived_before), \
        "preserve_mode='live' lost a live tensor kept as a plain attribute"
    expected.check("level-2 round trip in preserve_mode='live'")


def test_buffers_preserve_mode_discards_derived_plain_attribute_tensor(alloc, preserve_mode):
    preserve_mode("buffers")
    model, expected, derived_before = _derived_attribute_round_trip(alloc)
    assert not torch.equal(model.derived.cpu(), derived_before), \
        "preserve_mode='buffers' kept a plain-attribute tensor that is no buffer (or the scribble missed it)"


def test_level2_backs_up_only_buffer_bytes(alloc):
    """Only preserved bytes go to host: far less than the parameters."""
    model = build_in_pool(weights_pool(alloc), lambda: TinyVllmLikeModel(vocab=8192, hidden=256), "direct")
    assert_in_pool(alloc, named_tensors(model), WEIGHTS)
    buffer_bytes = sum(b.untyped_storage().nbytes() for b in model.buffers())
    param_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert param_bytes > 16 * buffer_bytes
    torch.cuda.synchronize()
    alloc.sleep(offload_tags=())
    try:
        weights = alloc.stats().tags[WEIGHTS]
    finally:
        alloc.wake_up()
    assert weights.preserved_bytes >= buffer_bytes, (weights, buffer_bytes)
    assert weights.preserved_bytes < param_bytes // 2, (weights, param_bytes)
