"""`make demo`: a small rotary-embedding language model through sleep and wake at both levels.

Level 2 is run twice, with buffer preservation off (vLLM's stock behaviour: the rotary cos/sin cache
is lost and the reloaded model answers garbage) and on (logits bit-identical), side by side.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from vllm_sleep_ext.allocator import CuMemAllocator

MiB = float(1 << 20)


class RotaryAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_positions: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        head_dim = dim // heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # Like vLLM's rotary embedding: computed once at init, not in the state dict.
        self.register_buffer("cos_sin_cache", torch.cat([angles.cos(), angles.sin()], dim=-1), persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k = self.rotate(q, positions[:, None]), self.rotate(k, positions[:, None])
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_positions: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(RotaryAttentionBlock(dim, heads, max_positions) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(x)


@dataclasses.dataclass
class Row:
    run: str
    released_mib: float
    host_mib: float
    sleep_s: float
    wake_s: float
    identical: bool


def _free_bytes(alloc: CuMemAllocator) -> int:
    if alloc.backend == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]
    return -sum(s.mapped_bytes for s in alloc.stats().tags.values())


def _overwrite_freed_memory(alloc: CuMemAllocator) -> None:
    """Someone else (the trainer) uses the freed memory; released pages must not be trusted."""
    if alloc.backend != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    junk = torch.full((max(free - (1 << 30), 1 << 20),), 0x3C, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    del junk
    torch.cuda.empty_cache()


def _cycle(alloc: CuMemAllocator, model: TinyLM, tokens: torch.Tensor, reference: torch.Tensor,
           level: int, params: dict[str, torch.Tensor], run: str) -> Row:
    free_before = _free_bytes(alloc)
    start = time.perf_counter()
    alloc.sleep(offload_tags=("weights",) if level == 1 else ())
    sleep_s = time.perf_counter() - start
    released = _free_bytes(alloc) - free_before
    host = alloc.stats().tags["weights"].backed_up_bytes
    _overwrite_freed_memory(alloc)
    start = time.perf_counter()
    if level == 1:
        alloc.wake_up()
    else:  # the RLHF order: weights, new parameters from the trainer, then the KV cache
        alloc.wake_up(["weights"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        alloc.wake_up(["kv_cache"])
    wake_s = time.perf_counter() - start
    with torch.no_grad():
        identical = torch.equal(model(tokens), reference)
    return Row(run, released / MiB, host / MiB, sleep_s, wake_s, identical)


def run_demo(backend: str = "auto") -> bool:
    if backend == "auto":
        backend = "cuda" if torch.cuda.is_available() else "host"
    if backend == "cuda":
        alloc = CuMemAllocator.get_instance()
        device, dims = torch.device("cuda"), dict(vocab=32000, dim=1024, heads=16, layers=8, max_positions=4096)
        print(f"vllm_sleep_ext demo on the CUDA backend: {torch.cuda.get_device_name()}")
    else:
        alloc = CuMemAllocator(backend="host")
        device, dims = torch.device("cpu"), dict(vocab=2000, dim=128, heads=4, layers=2, max_positions=512)
        print("vllm_sleep_ext demo on the HOST backend (no GPU here): 'device memory' is mmap/memfd host memory")

    torch.manual_seed(0)
    with alloc.use_memory_pool(tag="weights"):
        if backend == "cuda":
            with torch.device(device):
                model = TinyLM(**dims).eval()
        else:
            model = alloc.place_module(TinyLM(**dims).eval())
    with alloc.use_memory_pool(tag="kv_cache"):
        shape = (dims["layers"], 2, 256, dims["dim"]) if backend == "host" else (dims["layers"], 2, 8192, 4 * dims["dim"])
        kv_cache = alloc.empty(shape) if backend == "host" else torch.zeros(shape, device=device)
    tokens = torch.randint(0, dims["vocab"], (2, 64), device=device)
    with torch.no_grad():
        reference = model(tokens)
    params = {name: p.detach().clone().cpu() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, {sum(b.nbytes for b in buffers.values()) / MiB:.2f} MiB "
          f"of rotary cos/sin cache buffers; kv cache {kv_cache.nbytes / MiB:.1f} MiB")

    rows = [_cycle(alloc, model, tokens, reference, 1, params, "level 1 (weights to host)")]
    alloc.preserve_mode = "off"
    rows.append(_cycle(alloc, model, tokens, reference, 2, params, "level 2, buffers NOT kept (vLLM stock)"))
    with torch.no_grad():  # repair by hand, so the next run starts from a working model
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    alloc.preserve_mode = "buffers"
    rows.append(_cycle(alloc, model, tokens, reference, 2, params, "level 2, buffers kept (vllm_sleep_ext)"))

    print(f"\n{'run':42} {'released MiB':>12} {'host MiB':>9} {'sleep s':>8} {'wake s':>8}  logits after wake")
    for r in rows:
        verdict = "bit-identical" if r.identical else "DIFFERENT (model broken)"
        print(f"{r.run:42} {r.released_mib:12.1f} {r.host_mib:9.2f} {r.sleep_s:8.3f} {r.wake_s:8.3f}  {verdict}")
    ok = rows[0].identical and not rows[1].identical and rows[2].identical
    print("\nresult:", "as expected: only preserved buffers survive level 2" if ok else "UNEXPECTED")
    return ok
