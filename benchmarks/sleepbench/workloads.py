"""Model-like workloads and round-trip checks (shared with soak.py and probe_level2.py)."""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional, Sequence

from .common import GiB, KiB, MiB, round_up, torch


def model_like_sizes(total_bytes: int, seed: int, large_frac: float = 0.9,
                     max_small: int = 3000) -> list[int]:
    """Tensor sizes in bytes: ~90% in 64-256 MiB tensors, the rest in up to ~3000 tensors of
    4 KiB-1 MiB (log-uniform), shuffled like the layers of a model. All multiples of 512 bytes."""
    rng = random.Random(seed)
    total_bytes = round_up(max(total_bytes, 512), 512)
    small_budget = int(total_bytes * (1.0 - large_frac))
    n_small = int(min(max_small, max(8, small_budget // (64 * KiB))))
    raw = [math.exp(rng.uniform(math.log(4 * KiB), math.log(MiB))) for _ in range(n_small)]
    scale = small_budget / sum(raw)
    small = [round_up(int(min(max(r * scale, 4 * KiB), MiB)), 512) for r in raw]
    while small and sum(small) > total_bytes // 2:
        small.pop()
    large = _large_sizes(total_bytes - sum(small), rng)
    sizes = small + large
    rng.shuffle(sizes)
    return sizes


def _large_sizes(remaining: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while remaining > 0:
        if remaining <= 256 * MiB:
            s = remaining
        else:
            s = rng.randrange(64, 257, 2) * MiB
            if remaining - s < 64 * MiB:
                s = remaining - 64 * MiB
        out.append(s)
        remaining -= s
    return out


def alloc_tensors(sizes: Sequence[int], device: str = "cuda") -> list["torch.Tensor"]:
    """bf16 tensors of the given byte sizes (allocated wherever the caller's pool context says)."""
    return [torch.empty(n // 2, dtype=torch.bfloat16, device=device) for n in sizes]


def as_parameters(tensors: Sequence["torch.Tensor"]) -> "torch.nn.Module":
    """A module holding `tensors` as frozen parameters (same storage), as a model's weights are: level 2
    discards parameters (the trainer sends them) and keeps the rest of the weights pool. Keep it alive
    as long as the tensors are used."""
    holder = torch.nn.Module()
    for i, t in enumerate(tensors):
        holder.register_parameter(f"w{i}", torch.nn.Parameter(t, requires_grad=False))
    return holder


def fill_random(tensors: Sequence["torch.Tensor"], seed: int) -> None:
    gen = torch.Generator(device=tensors[0].device) if tensors else None
    if gen is not None:
        gen.manual_seed(seed)
    for t in tensors:
        t.view(torch.int32).random_(generator=gen)


def checksums(tensors: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """One exact int64 sum per tensor (bits viewed as int32)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([t.reshape(-1).view(torch.int32).sum(dtype=torch.int64) for t in tensors])


@dataclasses.dataclass
class Reference:
    """What a round trip must give back: per-tensor sums and full copies of a few tensors."""
    sums: "torch.Tensor"
    picks: list[int]
    copies: list["torch.Tensor"]

    @staticmethod
    def capture(tensors: Sequence["torch.Tensor"]) -> "Reference":
        picks = _pick_indices(tensors)
        return Reference(checksums(tensors), picks, [tensors[i].clone() for i in picks])

    def check(self, tensors: Sequence["torch.Tensor"]) -> Optional[str]:
        """None when intact, else what differs."""
        for i, copy in zip(self.picks, self.copies):
            if not torch.equal(tensors[i].view(torch.int16), copy.view(torch.int16)):
                return f"tensor #{i} ({tensors[i].nbytes} bytes) differs from its copy"
        sums = checksums(tensors)
        bad = (sums != self.sums).nonzero().flatten().tolist()
        if bad:
            return f"{len(bad)} of {len(tensors)} tensor checksums differ (first: #{bad[0]})"
        return None


def _pick_indices(tensors: Sequence["torch.Tensor"]) -> list[int]:
    if not tensors:
        return []
    by_size = sorted(range(len(tensors)), key=lambda i: tensors[i].nbytes)
    picks = {by_size[0], by_size[len(by_size) // 2], by_size[-1], 0, len(tensors) - 1}
    return sorted(picks)


def make_buffer_modules(n: int, device: str = "cuda") -> list["torch.nn.Module"]:
    """Modules with rotary-like registered buffers (inv_freq, cos/sin cache, position ids, scales).
    Call inside a pool so the buffers are allocated (and tracked) there."""
    mods = []
    for i in range(n):
        m = torch.nn.Module()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, device=device,
                                                     dtype=torch.float32) / 128.0))
        freqs = torch.outer(torch.arange(4096, device=device, dtype=torch.float32), inv_freq)
        m.register_buffer("inv_freq", inv_freq, persistent=False)
        m.register_buffer("cos_sin_cache",
                          torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.bfloat16),
                          persistent=False)
        m.register_buffer("position_ids", torch.arange(8192, device=device).unsqueeze(0))
        m.register_buffer("scale", torch.rand(4096, device=device) + float(i))
        mods.append(m)
    return mods


def module_buffers(mods: Sequence["torch.nn.Module"]) -> list["torch.Tensor"]:
    return [b for m in mods for b in m.buffers()]


def buffers_mismatch(mods: Sequence["torch.nn.Module"],
                     ref: Sequence["torch.Tensor"]) -> Optional[str]:
    for i, (b, r) in enumerate(zip(module_buffers(mods), ref)):
        if not torch.equal(b, r):
            return f"buffer #{i} (shape {tuple(b.shape)}, {b.dtype}) differs after wake"
    return None


def alloc_kv(nbytes: int, chunk: int = 8 * GiB) -> list:
    """A KV cache of `nbytes` in chunks of at most `chunk` (allocated in the caller's pool)."""
    n = max(1, math.ceil(nbytes / chunk))
    each = round_up(nbytes // n, 2 * MiB)
    return [torch.empty(each, dtype=torch.uint8, device="cuda") for _ in range(n)]
