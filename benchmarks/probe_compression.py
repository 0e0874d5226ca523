"""Issue 19's probe: can lossless GPU compression move level-1 backups faster than the pinned-copy link?

In one run on one card, for three data sets of the same size:
  bf16    weight-like bf16: a Llama-8B-shaped mix of per-tensor Gaussians (linear weights with std
          0.008-0.05, embeddings and lm_head at 0.02, norm weights near 1.0), cut to --gib
  fp8     the same tensors cast to e4m3 with a per-tensor scale (half the bytes)
  random  incompressible random bytes (--gib)
it measures
  1. the pinned-copy limit, D2H and H2D (one large copy each; also chunked as a sleep copies);
  2. nvCOMP's GPU codecs (ANS, Bitcomp, Cascaded, Zstd, LZ4, GDeflate; typed variants where the codec
     has them) on the raw bytes and, for bf16, on a byte split (high byte = sign and 7 exponent bits,
     low byte = exponent LSB and mantissa), timed with the split: ratio and compress / decompress GB/s
     per pipeline chunk size (one encode call per chunk, CUDA events, warm-up, median of --reps) on a
     --sample-mib sample of evenly spaced windows, every round trip checked bit-exact;
  3. a modelled pipelined sleep (compress chunk i while chunk i-1's compressed bytes go D2H) and wake
     (H2D of chunk i while chunk i-1 decompresses), 2 staging slots, against the limit;
  4. the real thing for the rows of --measure (default: the best codec of each data set): two streams
     (codec, copies) with events between them, --slots staging slots, every byte through pinned host
     memory and back, timed on the host clock and checked bit-exact, next to a plain chunked copy of the
     same chunk size in the same run. Sleep compresses chunks k+1..k+lag before it waits for chunk k's
     compressed size, read from the output's header by a small async copy into pinned memory (the header's
     size field is learned from the binding's sizes in the warm-up); wake queues the copies of chunks
     k+1..k+ahead before chunk k's decode. Per pass it reports how long each lane was busy, how long both
     were, which bounds the pass, and the host's seconds inside the codec's calls; --diagnose runs the
     first rows also with the binding's sizes, unaligned host parts, and as first measured (lockstep).
The table comes last; --out DIR receives probe_compression.json (rewritten after every section, so a
run cut short keeps what it measured).

Needs nvidia-nvcomp-cu13 and nvidia-libnvcomp-cu13 (module nvidia.nvcomp; .whl/ carries them to the
GPU machines). --device cpu is a dry run of the logic (tests/test_probe_compression_cpu.py); its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

MiB = 1 << 20
GiB = 1 << 30
FP8_MAX = 448.0  # largest finite e4m3fn value: each tensor's absolute maximum is scaled onto it
SLOW_PASS_S = 0.4  # a warm-up pass slower than this is timed once more, not --reps times
STAGE_SLOTS = 2  # staging buffers in the model; the measured run's are --slots


def say(msg: str) -> None:
    print(msg, flush=True)


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


# ---- the data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    numel: int
    mean: float
    std: float


def weight_mix(total_bytes: int, hidden: int = 4096, seed: int = 0) -> list[TensorSpec]:
    """bf16 tensors shaped like a Llama-3-8B checkpoint (vocab 128256 at hidden 4096, GQA kv = hidden/4,
    ffn 3.5 x hidden), in checkpoint order: embedding, as many layers as fit, final norm, lm_head; the
    last layer is cut so the mix totals exactly total_bytes (even)."""
    if total_bytes <= 0 or total_bytes % 2:
        raise ValueError(f"weight_mix: total_bytes must be positive and even, got {total_bytes}")
    rng = random.Random(seed)
    vocab, kv, ffn = round(hidden * 128256 / 4096), hidden // 4, hidden * 7 // 2
    budget = total_bytes // 2

    def linear(name: str, numel: int) -> TensorSpec:
        return TensorSpec(name, numel, 0.0, math.exp(rng.uniform(math.log(0.008), math.log(0.05))))

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, hidden, 1.0, 0.05)

    head = [TensorSpec("embed_tokens", vocab * hidden, 0.0, 0.02)]
    tail = [norm("norm"), TensorSpec("lm_head", vocab * hidden, 0.0, 0.02)]
    fixed = head + tail
    if sum(t.numel for t in fixed) >= budget:  # too small for a layer: the fixed tensors, cut
        return _cut(fixed, budget)
    room = budget - sum(t.numel for t in fixed)
    layers: list[TensorSpec] = []
    i = 0
    while room > 0:
        p = f"layers.{i}."
        for t in (norm(p + "input_layernorm"), linear(p + "q_proj", hidden * hidden),
                  linear(p + "k_proj", kv * hidden), linear(p + "v_proj", kv * hidden),
                  linear(p + "o_proj", hidden * hidden), norm(p + "post_attention_layernorm"),
                  linear(p + "gate_proj", ffn * hidden), linear(p + "up_proj", ffn * hidden),
                  linear(p + "down_proj", hidden * ffn)):
            layers.append(t)
            room -= t.numel
            if room <= 0:
                break
        i += 1
    return head + _cut(layers, sum(t.numel for t in layers) + room) + tail


def _cut(specs: list[TensorSpec], numel: int) -> list[TensorSpec]:
    out, left = [], numel
    for t in specs:
        if left <= 0:
            break
        out.append(TensorSpec(t.name, min(t.numel, left), t.mean, t.std))
        left -= out[-1].numel
    return out


def make_bf16(specs: Sequence[TensorSpec], device: torch.device, seed: int = 0) -> torch.Tensor:
    """One flat bf16 buffer holding the tensors back to back, as a pool holds them."""
    flat = torch.empty(sum(t.numel for t in specs), dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    off = 0
    for t in specs:
        flat[off:off + t.numel].normal_(t.mean, t.std, generator=gen)
        off += t.numel
    return flat


def fp8_per_tensor(flat: torch.Tensor, specs: Sequence[TensorSpec]) -> torch.Tensor:
    """The e4m3fn bytes of each tensor scaled so its absolute maximum lands on the format's largest value."""
    out = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    off = 0
    for t in specs:
        x = flat[off:off + t.numel].float()
        amax = float(x.abs().max()) or 1.0
        out[off:off + t.numel] = (x * (FP8_MAX / amax)).to(torch.float8_e4m3fn).view(torch.uint8)
        off += t.numel
    return out


def sample_offsets(total: int, window: int, count: int, align: int = 4096) -> list[int]:
    """Starts of `count` windows spread evenly over `total` bytes (aligned, not overlapping), so a
    sample of them keeps the mix's proportions; one window at 0 when the windows would cover it all."""
    if total <= 0 or window <= 0 or count <= 0:
        raise ValueError(f"sample_offsets: total, window and count must be positive, got {total}, {window}, {count}")
    if window * count >= total:
        return [0]
    stride = total // count
    return [min(i * stride // align * align, total - window) for i in range(count)]


# ---- the byte split ---------------------------------------------------------------------------------


def split_bytes(x: torch.Tensor, hi: Optional[torch.Tensor] = None,
                lo: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Planes of a 2-byte tensor's little-endian bytes: hi (bf16: sign and 7 exponent bits) and lo
    (exponent LSB and mantissa); into hi/lo when given."""
    pairs = x.reshape(-1).view(torch.uint8).view(-1, 2)
    if hi is None or lo is None:
        return pairs[:, 1].contiguous(), pairs[:, 0].contiguous()
    hi.copy_(pairs[:, 1])
    lo.copy_(pairs[:, 0])
    return hi, lo


def join_bytes(hi: torch.Tensor, lo: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The uint8 bytes that split_bytes took apart (into out, a uint8 tensor of 2 x the plane, when given)."""
    if hi.shape != lo.shape:
        raise ValueError(f"join_bytes: planes differ in shape ({tuple(hi.shape)} vs {tuple(lo.shape)})")
    if out is None:
        out = torch.empty(2 * hi.numel(), dtype=torch.uint8, device=hi.device)
    pairs = out.view(-1, 2)
    pairs[:, 1].copy_(hi)
    pairs[:, 0].copy_(lo)
    return out


# ---- the model of a pipelined sleep and wake -------------------------------------------------------------


def pipeline_seconds(first: Sequence[float], second: Sequence[float], slots: int = STAGE_SLOTS) -> float:
    """Time for chunks through two stages, each stage one chunk at a time, with `slots` staging buffers:
    stage 1 of chunk i starts when stage 1 of chunk i-1 is done and its slot is free (stage 2 of chunk
    i-slots done); stage 2 of chunk i starts when its stage 1 and stage 2 of chunk i-1 are done."""
    if len(first) != len(second):
        raise ValueError(f"pipeline_seconds: {len(first)} first-stage times but {len(second)} second-stage times")
    if slots < 1:
        raise ValueError(f"pipeline_seconds: slots must be >= 1, got {slots}")
    end1: list[float] = []
    end2: list[float] = []
    for i, (a, b) in enumerate(zip(first, second)):
        start1 = max(end1[-1] if end1 else 0.0, end2[i - slots] if i >= slots else 0.0)
        end1.append(start1 + a)
        end2.append(max(end1[-1], end2[-1] if end2 else 0.0) + b)
    return end2[-1] if end2 else 0.0


def chunk_sizes(total: int, chunk: int) -> list[int]:
    if total < 0 or chunk <= 0:
        raise ValueError(f"chunk_sizes: need total >= 0 and chunk > 0, got {total}, {chunk}")
    return [min(chunk, total - o) for o in range(0, total, chunk)]


@dataclass
class Modelled:
    sleep_s: float
    wake_s: float
    plain_sleep_s: float
    plain_wake_s: float

    @property
    def sleep_x(self) -> float:
        return self.plain_sleep_s / self.sleep_s

    @property
    def wake_x(self) -> float:
        return self.plain_wake_s / self.wake_s

    @property
    def cycle_x(self) -> float:
        return (self.plain_sleep_s + self.plain_wake_s) / (self.sleep_s + self.wake_s)


def model_cycle(total: int, chunk: int, ratio: float, compress_gbps: float, decompress_gbps: float,
                d2h_gbps: float, h2d_gbps: float, slots: int = STAGE_SLOTS) -> Modelled:
    """A pipelined sleep (compress, then D2H of ratio x the bytes) and wake (H2D, then decompress) of
    `total` bytes in `chunk`-sized pieces, against one plain copy of the whole at the limit. GB/s count
    uncompressed bytes."""
    for name, v in (("ratio", ratio), ("compress_gbps", compress_gbps), ("decompress_gbps", decompress_gbps),
                    ("d2h_gbps", d2h_gbps), ("h2d_gbps", h2d_gbps)):
        if not v > 0:
            raise ValueError(f"model_cycle: {name} must be positive, got {v}")
    sizes = chunk_sizes(total, chunk)
    comp = [b / (compress_gbps * 1e9) for b in sizes]
    down = [b * ratio / (d2h_gbps * 1e9) for b in sizes]
    up = [b * ratio / (h2d_gbps * 1e9) for b in sizes]
    dec = [b / (decompress_gbps * 1e9) for b in sizes]
    return Modelled(pipeline_seconds(comp, down, slots), pipeline_seconds(up, dec, slots),
                    total / (d2h_gbps * 1e9), total / (h2d_gbps * 1e9))


# ---- device lanes -----------------------------------------------------------------------------------------


class Lane:
    """One CUDA stream, where work is queued and timed; on the CPU dry run, plain sequential code."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._entered: list = []

    @property
    def ptr(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    def __enter__(self) -> "Lane":
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        ctx.__enter__()
        self._entered.append(ctx)  # a stack: a lane may be entered again inside itself
        return self

    def __exit__(self, *exc: Any) -> None:
        self._entered.pop().__exit__(*exc)

    def mark(self) -> Any:
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def wait(self, mark: Any) -> None:
        if self.stream is not None and mark is not None:
            self.stream.wait_event(mark)

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of fn's work on this lane (CUDA events; host clock on the CPU), after the work already
        queued on the caller's stream (the data fn reads was made there)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with self:
            if self.stream is None:
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            fn()
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3


def sync_all(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- codecs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSpec:
    name: str
    algorithm: str
    options: dict = field(default_factory=dict)
    view: torch.dtype = torch.uint8  # the dtype the codec sees the bytes as (its data_type)
    datasets: tuple = ("bf16", "fp8", "random")
    split: bool = True  # also on bf16's byte planes (always as bytes)


CODECS = (
    CodecSpec("ANS", "ANS"),
    CodecSpec("ANS-f2", "ANS", {"data_type": "<f2"}, torch.float16, ("bf16",), split=False),
    CodecSpec("ANS-f1", "ANS", {"data_type": "|f1"}, torch.uint8, ("fp8",), split=False),
    CodecSpec("Bitcomp", "Bitcomp"),
    CodecSpec("Bitcomp-i2", "Bitcomp", {"data_type": "<i2"}, torch.int16, ("bf16",), split=False),
    # Cascaded's default word is wider than a byte; |u1 keeps a byte view whole.
    CodecSpec("Cascaded", "Cascaded", {"data_type": "|u1"}),
    CodecSpec("Zstd", "Zstd"),
    CodecSpec("LZ4", "LZ4"),
    CodecSpec("GDeflate-0", "GDeflate", {"algorithm_type": 0}),  # entropy-only, its fastest mode
)


class TorchScratch:
    """nvCOMP's device scratch from torch's caching allocator (for nvcomp.set_device_allocator), taken on
    the stream nvCOMP names, so a freed block is reused only behind that stream's work. For a second run
    in case the binding's own allocator frees with cudaFree, which waits for the whole device (the
    copies of the other stream too)."""

    def __init__(self, nbytes: int, stream: Any):
        ptr = int(getattr(stream, "ptr", 0) or 0)
        s = torch.cuda.ExternalStream(ptr) if ptr not in (0, 1, 2) else torch.cuda.default_stream()
        with torch.cuda.stream(s):
            self.buf = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda")
        self.ptr = self.buf.data_ptr()


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class Coder:
    """One nvCOMP codec queued on one lane. Buffers are torch uint8 tensors, viewed as the codec's dtype;
    compression configs are built once per input size (nvCOMP's sync-free path). Where the binding
    refuses a preconfigured call or a caller-owned output, the call is made without it and `notes` says so."""

    def __init__(self, nvcomp: Any, spec: CodecSpec, lane: Lane, device: torch.device):
        kwargs = {"algorithm": spec.algorithm, **spec.options}
        if lane.stream is not None:
            kwargs.update(cuda_stream=lane.ptr, device_id=device.index or 0)
        self.nv, self.spec, self.lane = nvcomp, spec, lane
        self.codec = nvcomp.Codec(**kwargs)
        self.notes: set[str] = set()
        self._configs: dict[int, tuple] = {}
        self._caps: dict[tuple, int] = {}
        self._use_configs = self._encode_into = self._decode_into = True
        # Whether the binding wrote into the buffer given, once seen: asking again (its array's
        # __cuda_array_interface__) may wait for the work, so a confirmed in-place write is trusted.
        self.in_place: dict[str, Optional[bool]] = {"encode": None, "decode": None}
        self.host_s: dict[str, float] = {"encode": 0.0, "decode": 0.0, "size": 0.0}  # host seconds in its calls
        self.size_layout: Optional[tuple] = None  # where the native header keeps the compressed size, once found

    def array(self, t: torch.Tensor) -> Any:
        return self.nv.as_array(t, cuda_stream=self.lane.ptr)

    def typed(self, u8: torch.Tensor, as_bytes: bool) -> torch.Tensor:
        return u8 if as_bytes else u8.view(self.spec.view)

    def capacity(self, src: torch.Tensor, as_bytes: bool) -> int:
        """Largest compressed size of src's size (256-aligned, so outputs laid end to end stay aligned)."""
        key = (src.numel(), as_bytes)
        if key not in self._caps:
            arr = self.array(self.typed(src, as_bytes))
            self._caps[key] = round_up(int(self.codec.get_max_comp_buffer_size(arr)), 256)
        return self._caps[key]

    def configs(self, nbytes: int) -> tuple:
        if not self._use_configs:
            return None, None
        if nbytes not in self._configs:
            try:
                c = self.codec.compression_config(nbytes)
                self._configs[nbytes] = (c, self.codec.decompression_config(c))
            except Exception as e:  # noqa: BLE001 - any refusal: the binding configures each call itself
                self._use_configs = False
                self.notes.add(f"configured per call ({short(e)})")
                return None, None
        return self._configs[nbytes]

    def encode(self, src: torch.Tensor, out: torch.Tensor, as_bytes: bool = False) -> tuple:
        """Queues src's compression into out; the handle's size (size()) waits for it."""
        t0 = time.perf_counter()
        try:
            return self._encode(src, out, as_bytes)
        finally:
            self.host_s["encode"] += time.perf_counter() - t0

    def _encode(self, src: torch.Tensor, out: torch.Tensor, as_bytes: bool) -> tuple:
        arr = self.array(self.typed(src, as_bytes))
        ccfg = self.configs(src.numel())[0]
        if self._encode_into:
            try:
                return ("into", self.codec.encode(arr, out=self.array(out), compression_config=ccfg), out)
            except Exception as e:  # noqa: BLE001 - retried below with a binding-owned output
                self._encode_into = False
                self.notes.add(f"encode into own buffer refused, copied ({short(e)})")
        return ("copy", self.codec.encode(arr, compression_config=ccfg), out)

    def size(self, handle: tuple) -> int:
        """The compressed size as the binding reports it (it waits for the encode)."""
        t0 = time.perf_counter()
        try:
            return self._size(handle)
        finally:
            self.host_s["size"] += time.perf_counter() - t0

    def _size(self, handle: tuple) -> int:
        kind, res, out = handle
        n = int(res.buffer_size)
        if n > out.numel():
            raise RuntimeError(f"{self.spec.name}: compressed {n} bytes, more than its buffer's {out.numel()}")
        if kind == "copy" or not self._in_place(res, out, "encode"):
            self._copy_out(res, out[:n])
        return n

    def decode(self, comp: torch.Tensor, out: torch.Tensor, as_bytes: bool = False) -> None:
        """Queues the decompression of comp (the exact compressed bytes) into out (its uncompressed size)."""
        t0 = time.perf_counter()
        try:
            self._decode(comp, out, as_bytes)
        finally:
            self.host_s["decode"] += time.perf_counter() - t0

    def _decode(self, comp: torch.Tensor, out: torch.Tensor, as_bytes: bool) -> None:
        arr = self.array(comp)
        dcfg = self.configs(out.numel())[1]
        if self._decode_into:
            try:
                res = self.codec.decode(arr, out=self.array(self.typed(out, as_bytes)), decompression_config=dcfg)
            except Exception as e:  # noqa: BLE001 - retried below with a binding-owned output
                self._decode_into = False
                self.notes.add(f"decode into own buffer refused, copied ({short(e)})")
            else:
                if not self._in_place(res, out, "decode"):
                    self._copy_out(res, out)
                return
        self._copy_out(self.codec.decode(arr, decompression_config=dcfg), out)

    def _in_place(self, res: Any, out: torch.Tensor, call: str) -> bool:
        """Whether the binding wrote into out: its docs say an Array passed as out may be "resized to fit"."""
        if self.in_place[call]:
            return True
        try:
            ptr = res.__cuda_array_interface__["data"][0]
        except Exception:  # noqa: BLE001 - no interface to ask: trust the documented in-place write
            self.in_place[call] = True
            return True
        self.in_place[call] = ptr == out.data_ptr()
        if not self.in_place[call]:
            self.notes.add(f"{call} wrote outside the buffer given, copied")
        return bool(self.in_place[call])

    def _copy_out(self, res: Any, out: torch.Tensor) -> None:
        with self.lane:
            out.copy_(torch.from_dlpack(res).reshape(-1).view(torch.uint8)[:out.numel()])


# ---- 1. the pinned-copy limit ----------------------------------------------------------------------------------


def measure_limit(dev: torch.Tensor, host: torch.Tensor, chunks: Sequence[int], reps: int, lane: Lane) -> dict:
    """D2H and H2D GB/s between dev and pinned host: one copy of the whole (the limit), and in chunks."""
    n = dev.numel()
    h = host[:n]

    def rate(fn: Callable[[], Any]) -> float:
        lane.timed(fn)
        return n / statistics.median(lane.timed(fn) for _ in range(reps)) / 1e9

    def chunked(dst: torch.Tensor, src: torch.Tensor, c: int) -> Callable[[], None]:
        return lambda: [dst[o:o + c].copy_(src[o:o + c], non_blocking=True) for o in range(0, n, c)]

    out = {"bytes": n, "d2h_gbps": rate(lambda: h.copy_(dev, non_blocking=True)),
           "h2d_gbps": rate(lambda: dev.copy_(h, non_blocking=True)), "chunked": {}}
    for c in chunks:
        out["chunked"][mib_label(c)] = {
            "d2h_gbps": rate(chunked(h, dev, c)), "h2d_gbps": rate(chunked(dev, h, c))}
    return out


# ---- 2. and 3. the codec sweep and its model ----------------------------------------------------------


def measure_plane(coder: Coder, plane: torch.Tensor, chunk: int, reps: int, as_bytes: bool) -> dict:
    """One codec over one buffer in chunk-sized encode calls: median seconds to compress and to
    decompress all of it, compressed bytes, and whether every round trip gave back every byte."""
    lane, n = coder.lane, plane.numel()
    pieces = [(o, c) for o, c in zip(range(0, n, chunk), chunk_sizes(n, chunk))]
    caps = [coder.capacity(plane[o:o + c], as_bytes) for o, c in pieces]
    offs = [sum(caps[:i]) for i in range(len(caps))]
    out = torch.empty(sum(caps), dtype=torch.uint8, device=plane.device)
    back = torch.empty_like(plane)
    handles: list[tuple] = []
    sizes: list[int] = []

    def encode_all() -> None:
        handles[:] = [coder.encode(plane[o:o + c], out[f:f + cap], as_bytes)
                      for (o, c), f, cap in zip(pieces, offs, caps)]

    def decode_all() -> None:
        for (o, c), f, s in zip(pieces, offs, sizes):
            coder.decode(out[f:f + s], back[o:o + c], as_bytes)

    def encode_timed() -> float:
        t = lane.timed(encode_all)
        sizes[:] = [coder.size(h) for h in handles]
        return t

    exact = True

    def decode_checked() -> float:
        nonlocal exact
        back.fill_(0xA5)  # a decode that writes nothing must not pass for one that gives the bytes back
        t = lane.timed(decode_all)
        exact = exact and bool(torch.equal(back, plane))
        return t

    warm = encode_timed() + decode_checked()
    runs = reps if warm < SLOW_PASS_S else 1
    comp = [encode_timed() for _ in range(runs)]
    dec = [decode_checked() for _ in range(runs)]
    return {"bytes": n, "out_bytes": sum(sizes), "chunks": len(pieces), "compress_s": statistics.median(comp),
            "decompress_s": statistics.median(dec), "exact": exact, "runs": runs}


def measure_split(sample: torch.Tensor, chunk: int, reps: int, lane: Lane) -> dict:
    """Seconds to split the sample into byte planes and to join them back, chunk by chunk."""
    hi, lo = split_bytes(sample)
    back = torch.empty_like(sample)
    pieces = [(o, c) for o, c in zip(range(0, sample.numel(), chunk), chunk_sizes(sample.numel(), chunk))]

    def split_all() -> None:
        for o, c in pieces:
            split_bytes(sample[o:o + c], hi[o // 2:(o + c) // 2], lo[o // 2:(o + c) // 2])

    def join_all() -> None:
        for o, c in pieces:
            join_bytes(hi[o // 2:(o + c) // 2], lo[o // 2:(o + c) // 2], back[o:o + c])

    lane.timed(split_all)
    lane.timed(join_all)
    return {"split_s": statistics.median(lane.timed(split_all) for _ in range(reps)),
            "join_s": statistics.median(lane.timed(join_all) for _ in range(reps)),
            "exact": bool(torch.equal(back, sample)), "planes": (hi, lo)}


def layout_rows(dataset: str, codec: str, chunk: int, raw: Optional[dict], split: Optional[dict],
                planes: Optional[dict], total: int, limit: dict) -> list[dict]:
    """Table rows for one codec, data set and chunk size: raw bytes; byte planes both coded ("split");
    high plane coded, low plane sent as it is ("split-hi"). GB/s count the uncompressed bytes, split and
    join included; the model runs over the data set's full size."""
    rows = []

    def row(layout: str, in_b: int, out_b: int, comp_s: float, dec_s: float, exact: bool, parts: dict) -> dict:
        r = {"dataset": dataset, "codec": codec, "layout": layout, "chunk": chunk, "ratio": out_b / in_b,
             "compress_gbps": in_b / comp_s / 1e9, "decompress_gbps": in_b / dec_s / 1e9, "exact": exact,
             "parts": parts}
        m = model_cycle(total, chunk, r["ratio"], r["compress_gbps"], r["decompress_gbps"],
                        limit["d2h_gbps"], limit["h2d_gbps"])
        r["model"] = {"sleep_s": m.sleep_s, "wake_s": m.wake_s, "sleep_x": m.sleep_x, "wake_x": m.wake_x,
                      "cycle_x": m.cycle_x}
        return r

    if raw is not None:
        rows.append(row("raw", raw["bytes"], raw["out_bytes"], raw["compress_s"], raw["decompress_s"],
                        raw["exact"], {"raw": raw}))
    if split is not None and planes is not None:
        hi, lo = planes["hi"], planes["lo"]
        n = hi["bytes"] + lo["bytes"]
        base = {"split_s": split["split_s"], "join_s": split["join_s"]}
        rows.append(row("split", n, hi["out_bytes"] + lo["out_bytes"],
                        split["split_s"] + hi["compress_s"] + lo["compress_s"],
                        split["join_s"] + hi["decompress_s"] + lo["decompress_s"],
                        split["exact"] and hi["exact"] and lo["exact"], {**base, "hi": hi, "lo": lo}))
        rows.append(row("split-hi", n, hi["out_bytes"] + lo["bytes"], split["split_s"] + hi["compress_s"],
                        split["join_s"] + hi["decompress_s"], split["exact"] and hi["exact"], {**base, "hi": hi}))
    return rows


# ---- 4. the measured pipeline ---------------------------------------------------------------------------------------

HEADER_BYTES = 128  # read back after each encode: nvCOMP's native format opens with a header holding the size
HOST_ALIGN = 4096  # each part's start in pinned host memory (an unaligned DMA may run below the link's rate)
# nvCOMP's common header as its 2.x-4.x sources lay it out: comp_data_size (u64 at 8) + comp_data_offset (u32 at
# 56) is the whole compressed buffer. Tried first; any other field that matches the binding's sizes also does.
NVCOMP_COMMON_LAYOUT = (("Q", 8), ("I", 56))


def size_layouts(header_len: int = HEADER_BYTES) -> list[tuple]:
    """Candidate places of the compressed size in a header: nvCOMP's common layout, one u64 or u32 field,
    then a u64 plus a u32 (a size past an offset), each a tuple of (struct code, byte offset)."""
    u64 = [("Q", o) for o in range(0, header_len - 7, 8)]
    u32 = [("I", o) for o in range(0, header_len - 3, 4)]
    return [NVCOMP_COMMON_LAYOUT] + [(f,) for f in u64 + u32] + [(a, b) for a in u64 for b in u32 if a[1] != b[1]]


def read_layout(header: bytes, layout: tuple) -> int:
    return sum(int.from_bytes(header[o:o + (8 if code == "Q" else 4)], "little") for code, o in layout)


def find_size_layout(samples: Sequence[tuple[bytes, int]]) -> Optional[tuple]:
    """The first candidate layout whose fields give every sample's size (header bytes, size from the
    binding), or None (no samples, or no field holds it)."""
    if not samples:
        return None
    n = min(len(h) for h, _ in samples)
    for layout in size_layouts(n):
        if all(read_layout(h, layout) == size for h, size in samples):
            return layout
    return None


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def stage_stats(intervals: dict, wall_s: float) -> dict:
    """Per stage, seconds its lane was busy; the seconds both stages were busy at once; the GPU span; and
    what bounds the pass: the busier stage when it was busy >= 85 % of the wall time, else "stalls" (the
    stages wait on each other or on the host)."""
    busy = {k: union_length(v) for k, v in intervals.items()}
    every = [iv for v in intervals.values() for iv in v]
    both = sum(busy.values()) - union_length(every)
    span = (max(e for _, e in every) - min(s for s, _ in every)) if every else 0.0
    top = max(busy, key=busy.get) if busy else None
    bound = top if top is not None and wall_s > 0 and busy[top] >= 0.85 * wall_s else "stalls"
    return {"busy_s": busy, "overlap_s": both, "span_s": span, "bound": bound}


class StageClock:
    """Start and end stamps of every stage run on its lane during one pass (CUDA timing events; host clock on
    the CPU), read as seconds from the pass's start once the pass is done."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.origin = self._stamp(None)
        self.marks: list[tuple[str, Any, Any]] = []

    def _stamp(self, lane: Optional[Lane]) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(lane.stream if lane is not None else None)
        return ev

    @contextlib.contextmanager
    def stage(self, name: str, lane: Lane):
        start = self._stamp(lane)
        yield
        self.marks.append((name, start, self._stamp(lane)))

    def intervals(self) -> dict:
        def since(m: Any) -> float:
            return self.origin.elapsed_time(m) / 1e3 if self.cuda else m - self.origin

        out: dict[str, list] = {}
        for name, a, b in self.marks:
            out.setdefault(name, []).append((since(a), since(b)))
        return out


@dataclass(frozen=True)
class Variant:
    """How the measured pipeline is driven. size_from: where the host learns a chunk's compressed size
    (header: a 128-byte async copy of the output's header into pinned memory, read after an event;
    binding: the binding's buffer_size, which waits); lag: chunks compressed ahead of the one whose size is
    awaited; ahead: chunks copied up ahead of the one decoding; host_align: start of each part in host memory."""
    name: str
    slots: int
    lag: int
    ahead: int
    size_from: str
    host_align: int

    def __post_init__(self):
        if self.slots < 1 or not 0 <= self.lag < self.slots or not 0 <= self.ahead < self.slots:
            raise ValueError(f"Variant {self.name}: need slots >= 1, 0 <= lag < slots, 0 <= ahead < slots; got "
                             f"{self.slots}, {self.lag}, {self.ahead}")
        if self.size_from not in ("header", "binding") or self.host_align < 1:
            raise ValueError(f"Variant {self.name}: size_from must be header or binding and host_align >= 1, got "
                             f"{self.size_from!r}, {self.host_align}")


def variants(slots: int) -> dict[str, Variant]:
    """The pipeline as it should run ("async"), and as it ran before (one chunk compressed ahead, sizes from
    the binding, unaligned host parts, wake copying and decoding in lockstep: "lockstep"), with the two
    steps between them, so a diagnosed row shows which change moved it."""
    lag, ahead = max(1, slots - 2), slots - 1
    return {"async": Variant("async", slots, lag, ahead, "header", HOST_ALIGN),
            "async-binding": Variant("async-binding", slots, lag, ahead, "binding", HOST_ALIGN),
            "async-unaligned": Variant("async-unaligned", slots, lag, ahead, "header", 1),
            "lockstep": Variant("lockstep", 3, 1, 0, "binding", 1)}


class Pipeline:
    """Sleep and wake of one data set through pinned host memory, chunk by chunk, on two lanes: `work`
    (split, encode, decode, join: the codec's own stream) and `copy` (D2H, H2D), with events between them
    and variant.slots staging slots. layout: plain (chunks copied as they are), raw, split, split-hi.

    Sleep queues the compression of chunks k+1..k+lag before it waits for chunk k's compressed size, so the
    copy lane always has queued work; wake knows every size already and queues the copies of chunks
    k+1..k+ahead before chunk k's decode. The only waits are slot reuse (events on the device) and the
    size of the chunk due next (an event on the host)."""

    def __init__(self, src: torch.Tensor, host: torch.Tensor, chunk: int, layout: str,
                 coder: Optional[Coder], work: Lane, copy: Lane, variant: Optional[Variant] = None):
        if layout != "plain" and coder is None:
            raise ValueError(f"Pipeline: layout {layout!r} needs a codec")
        self.src, self.host, self.chunk, self.layout, self.coder = src, host, chunk, layout, coder
        self.work, self.copy = work, copy
        self.v = variant or variants(4)["async"]
        self.pieces = [(o, c) for o, c in zip(range(0, src.numel(), chunk), chunk_sizes(src.numel(), chunk))]
        self.back = torch.empty_like(src)
        self.records: list[list[tuple]] = []  # per chunk: (host offset, bytes, where it lands on wake)
        self.clock: Optional[StageClock] = None
        self.calibrating = False  # sizes from the binding, headers kept to find where they hold the size
        self.samples: list[tuple[bytes, int]] = []
        dev = src.device
        self.slots = []
        if layout == "plain":
            return
        split = layout != "raw"
        pinned = dev.type == "cuda"
        for _ in range(self.v.slots):
            s: dict = {"hdr": torch.zeros((2, HEADER_BYTES), dtype=torch.uint8, pin_memory=pinned)}
            if split:
                s["hi"] = torch.empty(chunk // 2, dtype=torch.uint8, device=dev)
                s["lo"] = torch.empty(chunk // 2, dtype=torch.uint8, device=dev)
                cap = coder.capacity(s["hi"], True)
                s["hi_out"] = torch.empty(cap, dtype=torch.uint8, device=dev)
                if layout == "split":
                    s["lo_out"] = torch.empty(cap, dtype=torch.uint8, device=dev)
            else:
                s["out"] = torch.empty(coder.capacity(src[:chunk], False), dtype=torch.uint8, device=dev)
            self.slots.append(s)

    @property
    def size_from(self) -> str:
        """Where this pass reads compressed sizes: the header once its size field is known, else the binding."""
        coder = self.coder
        if self.v.size_from == "header" and coder is not None and coder.size_layout is not None \
                and coder.in_place["encode"] and not self.calibrating:
            return "header"
        return "binding"

    def _host(self, off: int, n: int) -> torch.Tensor:
        if off + n > self.host.numel():
            raise RuntimeError(f"pinned host buffer of {self.host.numel()} bytes too small: needs {off + n}")
        return self.host[off:off + n]

    def _stage(self, name: str, lane: Lane):
        return self.clock.stage(name, lane) if self.clock is not None else contextlib.nullcontext()

    def sleep(self) -> None:
        self.records = []
        if self.layout == "plain":
            for o, c in self.pieces:
                with self.copy, self._stage("copy", self.copy):
                    self._host(o, c).copy_(self.src[o:o + c], non_blocking=True)
                self.records.append([(o, c, None)])
            return
        n, lag = len(self.pieces), self.v.lag
        freed: list[Any] = [None] * self.v.slots
        queued: list[tuple] = []  # per chunk compressed and not yet sent: (slot, parts, done mark, header ready)
        off = 0
        for i in range(n + lag):
            if i < n:
                o, c = self.pieces[i]
                k = i % self.v.slots
                with self.work:
                    self.work.wait(freed[k])
                    with self._stage("code", self.work):
                        parts = self._compress(self.slots[k], self.src[o:o + c])
                    done = self.work.mark()
                    ready = self._read_headers(self.slots[k], parts) if self.v.size_from == "header" else None
                queued.append((k, parts, done, ready))
            if i >= lag:
                off = self._send(queued.pop(0), off, freed)

    def _compress(self, s: dict, x: torch.Tensor) -> list[tuple]:
        """(encode handle or None for a part sent plain, device buffer, plain bytes, name) per part."""
        if self.layout == "raw":
            return [(self.coder.encode(x, s["out"]), s["out"], 0, "out")]
        h, lo = s["hi"][:x.numel() // 2], s["lo"][:x.numel() // 2]
        split_bytes(x, h, lo)
        parts = [(self.coder.encode(h, s["hi_out"], True), s["hi_out"], 0, "hi")]
        if self.layout == "split":
            return parts + [(self.coder.encode(lo, s["lo_out"], True), s["lo_out"], 0, "lo")]
        return parts + [(None, lo, lo.numel(), "lo")]

    def _read_headers(self, s: dict, parts: list[tuple]) -> Any:
        """Queues the copy of each coded part's header into the slot's pinned bytes (on the work lane, behind
        the encode); the mark says when they have landed."""
        for j, (h, buf, _, _) in enumerate(parts):
            if h is not None:
                m = min(HEADER_BYTES, buf.numel())
                s["hdr"][j, :m].copy_(buf[:m], non_blocking=True)
        return self.work.mark()

    def _sizes(self, s: dict, parts: list[tuple], ready: Any) -> list[int]:
        coder = self.coder
        if self.size_from == "binding":
            sizes = [coder.size(h) if h is not None else n for h, _, n, _ in parts]
            if self.calibrating:
                wait_mark(ready)
                self.samples += [(s["hdr"][j].numpy().tobytes(), n)
                                 for j, ((h, _, _, _), n) in enumerate(zip(parts, sizes)) if h is not None]
            return sizes
        t0 = time.perf_counter()
        wait_mark(ready)
        sizes = []
        for j, (h, buf, n, _) in enumerate(parts):
            if h is not None:
                n = read_layout(s["hdr"][j].numpy().tobytes(), coder.size_layout)
                if not 0 < n <= buf.numel():
                    raise RuntimeError(f"{coder.spec.name}: header says {n} compressed bytes, outside its buffer "
                                       f"of {buf.numel()} (size field {coder.size_layout} is wrong)")
            sizes.append(n)
        coder.host_s["size"] += time.perf_counter() - t0
        return sizes

    def _send(self, item: tuple, off: int, freed: list) -> int:
        k, parts, done, ready = item
        sizes = self._sizes(self.slots[k], parts, ready)
        rec = []
        with self.copy:
            self.copy.wait(done)
            with self._stage("copy", self.copy):
                for (h, buf, _, name), n in zip(parts, sizes):
                    self._host(off, n).copy_(buf[:n], non_blocking=True)
                    rec.append((off, n, name if h is not None else "plain-" + name))
                    off = round_up(off + n, self.v.host_align)
            freed[k] = self.copy.mark()
        self.records.append(rec)
        return off

    def wake(self) -> None:
        if self.layout == "plain":
            for (o, c), rec in zip(self.pieces, self.records):
                with self.copy, self._stage("copy", self.copy):
                    self.back[o:o + c].copy_(self._host(rec[0][0], c), non_blocking=True)
            return
        n, ahead = len(self.pieces), self.v.ahead
        freed: list[Any] = [None] * self.v.slots
        arrived: list[Any] = []
        for i in range(n + ahead):
            if i < n:
                s = self.slots[i % self.v.slots]
                with self.copy:
                    self.copy.wait(freed[i % self.v.slots])
                    with self._stage("copy", self.copy):
                        for off, m, name in self.records[i]:
                            self._part(s, name)[:m].copy_(self._host(off, m), non_blocking=True)
                    arrived.append(self.copy.mark())
            j = i - ahead
            if j >= 0:
                freed[j % self.v.slots] = self._decompress(j, arrived[j])

    def _part(self, s: dict, name: str) -> torch.Tensor:
        return s["lo"] if name == "plain-lo" else s[name + "_out"] if name in ("hi", "lo") else s["out"]

    def _decompress(self, j: int, arrived: Any) -> Any:
        (o, c), rec, s = self.pieces[j], self.records[j], self.slots[j % self.v.slots]
        with self.work:
            self.work.wait(arrived)
            with self._stage("code", self.work):
                x = self.back[o:o + c]
                if self.layout == "raw":
                    self.coder.decode(s["out"][:rec[0][1]], x)
                else:
                    h, lo = s["hi"][:c // 2], s["lo"][:c // 2]
                    for _, m, name in rec:
                        if name in ("hi", "lo"):
                            self.coder.decode(s[name + "_out"][:m], h if name == "hi" else lo, True)
                    join_bytes(h, lo, x)
            return self.work.mark()

    def host_bytes(self) -> int:
        return sum(n for rec in self.records for _, n, _ in rec)


def wait_mark(mark: Any) -> None:
    """The host waits for one event (not for a whole stream or device)."""
    if mark is not None:
        mark.synchronize()


def measure_pipeline(p: Pipeline, reps: int, device: torch.device) -> dict:
    """A warm-up sleep and wake (where a header-sized row also learns its size field from the binding's
    sizes), then reps timed ones: median wall times, the stage busy times and host seconds in the codec's
    calls of the median pass, and whether every byte came back."""
    def timed(fn: Callable[[], None]) -> tuple[float, dict]:
        coder_host = dict(p.coder.host_s) if p.coder else {}
        sync_all(device)
        p.clock = StageClock(device)
        t0 = time.perf_counter()
        fn()
        p.work.sync()
        p.copy.sync()
        wall = time.perf_counter() - t0
        stats = stage_stats(p.clock.intervals(), wall)
        copy_s = stats["busy_s"].get("copy", 0.0)
        stats["copy_gbps"] = p.host_bytes() / copy_s / 1e9 if copy_s > 0 else None  # the link's rate while busy
        if p.coder:
            stats["host_s"] = {k: v - coder_host[k] for k, v in p.coder.host_s.items()}
        p.clock = None
        return wall, stats

    notes = []
    if p.layout != "plain" and p.v.size_from == "header" and p.coder.size_layout is None:
        p.calibrating, p.samples = True, []
    timed(p.sleep)
    if p.calibrating:
        p.calibrating = False
        p.coder.size_layout = find_size_layout(p.samples)
        if p.coder.size_layout is None:
            notes.append(f"no header field held the binding's sizes ({len(p.samples)} samples): sizes read from "
                         "the binding, which waits")
    p.back.fill_(0xA5)
    timed(p.wake)
    exact = bool(torch.equal(p.back, p.src))
    sleeps, wakes = [], []
    for _ in range(reps):
        sleeps.append(timed(p.sleep))
        p.back.fill_(0xA5)  # a wake that writes nothing must not pass for one that gives the bytes back
        wakes.append(timed(p.wake))
        exact = exact and bool(torch.equal(p.back, p.src))
    sleep, wake = sorted(sleeps, key=lambda t: t[0])[len(sleeps) // 2], sorted(wakes, key=lambda t: t[0])[len(wakes) // 2]
    return {"sleep_s": sleep[0], "wake_s": wake[0], "sleep_stages": sleep[1], "wake_stages": wake[1],
            "host_bytes": p.host_bytes(), "exact": exact, "size_from": p.size_from, "variant": asdict(p.v),
            "size_layout": p.coder.size_layout if p.coder else None, "pipeline_notes": notes}


@dataclass(frozen=True)
class MeasureSpec:
    dataset: str
    codec: Optional[str]  # None: the plain copy
    layout: str
    chunk: int


def parse_measure(text: str) -> MeasureSpec:
    """DATASET:CODEC:LAYOUT:CHUNK_MIB (e.g. bf16:ANS-f2:raw:64, bf16:ANS:split-hi:256) or DATASET:plain:CHUNK_MIB."""
    f = text.split(":")
    codecs = {c.name: c for c in CODECS}
    if len(f) == 3 and f[1] == "plain":
        f = [f[0], "plain", "plain", f[2]]
    if len(f) != 4:
        raise ValueError(f"--measure {text!r}: want DATASET:CODEC:LAYOUT:CHUNK_MIB or DATASET:plain:CHUNK_MIB")
    dataset, codec, layout, mib = f
    if dataset not in ("bf16", "fp8", "random"):
        raise ValueError(f"--measure {text!r}: unknown data set {dataset!r} (bf16, fp8, random)")
    try:
        chunk = max(4096, round_up(int(float(mib) * MiB), 4096))
        if float(mib) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--measure {text!r}: chunk {mib!r} is not a positive number of MiB") from None
    if codec == "plain":
        return MeasureSpec(dataset, None, "plain", chunk)
    if codec not in codecs:
        raise ValueError(f"--measure {text!r}: unknown codec {codec!r}; known: {sorted(codecs)}")
    layouts = ("raw", "split", "split-hi") if codecs[codec].split else ("raw",)
    if layout not in layouts:
        raise ValueError(f"--measure {text!r}: {codec} takes layouts {', '.join(layouts)}, not {layout!r}")
    if layout != "raw" and dataset == "fp8":
        raise ValueError(f"--measure {text!r}: the byte split is for 2-byte data, fp8 has 1-byte elements")
    return MeasureSpec(dataset, codec, layout, chunk)


def with_baselines(specs: Sequence[MeasureSpec]) -> list[MeasureSpec]:
    """The rows asked for, each data set and chunk size's plain copy before its first coded row, once."""
    out: list[MeasureSpec] = []
    for s in specs:
        plain = MeasureSpec(s.dataset, None, "plain", s.chunk)
        for item in (plain, s):
            if item not in out:
                out.append(item)
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------


def mib_label(n: int) -> str:
    return f"{n / MiB:g}"


def table(res: dict) -> str:
    """Per data set and codec/layout, its best chunk size by the modelled sleep+wake; measured rows beside."""
    lim = res.get("limit") or {}
    lines = [f"pinned-copy limit ({(lim.get('bytes') or 0) / GiB:.2f} GiB, one copy): "
             f"D2H {lim.get('d2h_gbps', 0):.1f} GB/s, H2D {lim.get('h2d_gbps', 0):.1f} GB/s"]
    measured = {(m["dataset"], m["codec"], m["layout"], m["chunk"]): m for m in res.get("measured", [])
                if m.get("variant", {}).get("name", "async") == "async"}
    head = (f"{'data':6} {'codec':11} {'layout':8} {'chunk':>5} {'ratio':>6} {'comp GB/s':>9} {'dec GB/s':>8} "
            f"{'model sleep x':>13} {'model wake x':>12} {'meas sleep x':>12} {'meas wake x':>11}  exact")
    lines += [head, "-" * len(head)]
    best: dict = {}
    for r in res.get("rows", []):
        key = (r["dataset"], r["codec"], r["layout"])
        if key not in best or r["model"]["cycle_x"] > best[key]["model"]["cycle_x"]:
            best[key] = r
    order = {"bf16": 0, "fp8": 1, "random": 2}
    for r in sorted(best.values(), key=lambda r: (order.get(r["dataset"], 9), -r["model"]["cycle_x"])):
        m = measured.get((r["dataset"], r["codec"], r["layout"], r["chunk"]))
        ms = f"{m['sleep_x']:12.2f} {m['wake_x']:11.2f}" if m and "sleep_x" in m else f"{'':12} {'':11}"
        lines.append(f"{r['dataset']:6} {r['codec']:11} {r['layout']:8} {mib_label(r['chunk']):>5} {r['ratio']:6.3f} "
                     f"{r['compress_gbps']:9.1f} {r['decompress_gbps']:8.1f} {r['model']['sleep_x']:13.2f} "
                     f"{r['model']['wake_x']:12.2f} {ms}  {r['exact']}")
    lines.append("measured (two streams, every byte through pinned host memory and back; per pass the busy ms of "
                 "the code and copy lanes, ms both busy at once, what bounds it):")
    for m in res.get("measured", []):
        lines.append(measured_line(m))
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    lines.append("ratio = bytes kept / bytes in; GB/s count uncompressed bytes; x = plain one-copy time at the "
                 f"limit / time (model: {STAGE_SLOTS} staging slots, stage times from the sweep; measured: host "
                 "clock, variant async unless named: sizes from each output's header, lag/ahead chunks queued; "
                 "lockstep = the pipeline as first measured); split = byte planes both coded, split-hi = low "
                 "plane sent plain; bound = the lane busy >= 85 % of the wall time, else stalls")
    return "\n".join(lines)


def stages_text(st: dict) -> str:
    busy = st.get("busy_s", {})
    rate = f" at {st['copy_gbps']:.1f} GB/s" if st.get("copy_gbps") else ""
    text = (f"[code {busy.get('code', 0) * 1e3:.1f} copy {busy.get('copy', 0) * 1e3:.1f}{rate} both "
            f"{st.get('overlap_s', 0) * 1e3:.1f} ms, {st.get('bound')}")
    host = {k: v for k, v in st.get("host_s", {}).items() if v > 0}
    if host:
        text += "; host in " + " ".join(f"{k} {v * 1e3:.1f}" for k, v in host.items()) + " ms"
    return text + "]"


def measured_line(m: dict) -> str:
    v = m.get("variant") or {}
    name = "" if m["layout"] == "plain" else f" {v.get('name', '')}/{m.get('size_from', '')}"
    what = f"  {m['dataset']:6} {m['codec'] or '(none)':11} {m['layout']:8} {mib_label(m['chunk']):>5} MiB{name}:"
    if "sleep_x" not in m:
        return f"{what} {m.get('error', 'not run')}"
    return (f"{what} sleep {m['sleep_s'] * 1e3:.1f} ms x{m['sleep_x']:.2f} {stages_text(m['sleep_stages'])}, wake "
            f"{m['wake_s'] * 1e3:.1f} ms x{m['wake_x']:.2f} {stages_text(m['wake_stages'])}, host bytes "
            f"{m['host_ratio']:.3f} x, exact {m['exact']}")


def save(res: dict, out_dir: Optional[str]) -> None:
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "probe_compression.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def load_nvcomp() -> tuple[Any, Optional[str]]:
    """nvidia.nvcomp, or why not. A regular `nvidia` package elsewhere on the path (an __init__.py in some
    other NVIDIA wheel) hides the namespace the nvcomp wheels install into; their directories are then
    added to that package's path."""
    try:
        from nvidia import nvcomp  # noqa: PLC0415 - optional: the probe reports its absence
        return nvcomp, None
    except Exception as e:  # noqa: BLE001
        first = e
    try:
        import nvidia  # noqa: PLC0415

        dirs = [os.path.join(p, "nvidia") for p in sys.path
                if os.path.isdir(os.path.join(p or ".", "nvidia", "nvcomp"))]
        missing = [d for d in dirs if d not in list(nvidia.__path__)]
        if not missing:
            return None, short(first)
        nvidia.__path__ = list(nvidia.__path__) + missing
        from nvidia import nvcomp  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return None, f"{short(first)}; with nvidia.__path__ widened: {short(e)}"
    return nvcomp, None


def env_info(device: torch.device, nvcomp: Any) -> dict:
    info = {"torch": torch.__version__, "device": str(device),
            "nvcomp": getattr(nvcomp, "__version__", None), "nvcomp_cuda": getattr(nvcomp, "__cuda_version__", None)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=p.total_memory / GiB, cuda=torch.version.cuda)
    return info


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="size of the bf16 and random data sets (default 4)")
    ap.add_argument("--sample-mib", type=float, default=512, help="the codec sweep's sample of each data set")
    ap.add_argument("--chunk-mib", type=float, nargs="+", default=[16, 64, 4, 256, 1],
                    help="pipeline chunk sizes, most wanted first (the budget may cut the last)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=100, help="time for the codec sweep; the rest is skipped")
    ap.add_argument("--slow-gbps", type=float, default=20,
                    help="a codec compressing slower than this (far below the link) is measured at one chunk size")
    ap.add_argument("--codecs", nargs="+", default=None, help=f"subset of: {' '.join(c.name for c in CODECS)}")
    ap.add_argument("--datasets", nargs="+", default=["bf16", "fp8", "random"], choices=["bf16", "fp8", "random"])
    ap.add_argument("--skip-measured", action="store_true", help="no two-stream run")
    ap.add_argument("--measure", nargs="+", default=["best"],
                    help="rows to run through pinned memory and back: DATASET:CODEC:LAYOUT:CHUNK_MIB (bf16:ANS-f2:raw:64, "
                         "bf16:ANS:split-hi:256), DATASET:plain:CHUNK_MIB, or best (the sweep's picks; default); "
                         "each data set and chunk size's plain copy runs too")
    ap.add_argument("--slots", type=int, default=4, help="staging slots of the measured pipeline (default 4)")
    ap.add_argument("--diagnose", type=int, default=0,
                    help="the first N coded rows also run as async-binding, async-unaligned and lockstep")
    ap.add_argument("--nvcomp-alloc", choices=["default", "torch"], default="default",
                    help="nvCOMP's device scratch: the binding's allocator or torch's caching allocator")
    ap.add_argument("--out", default=None, help="directory for probe_compression.json")
    ap.add_argument("--device", default="cuda", help="cuda (the probe) or cpu (a dry run of the logic)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    unknown = set(a.codecs or ()) - {c.name for c in CODECS}
    if unknown:
        ap.error(f"--codecs: unknown {sorted(unknown)}; known: {[c.name for c in CODECS]}")
    if a.gib <= 0 or a.sample_mib <= 0 or a.reps < 1 or any(c <= 0 for c in a.chunk_mib):
        ap.error("--gib, --sample-mib, --chunk-mib must be positive and --reps at least 1")
    if a.slots < 2 or a.diagnose < 0:
        ap.error(f"--slots must be at least 2 and --diagnose at least 0, got {a.slots}, {a.diagnose}")
    for item in a.measure:
        if item == "best":
            continue
        try:
            spec = parse_measure(item)
        except ValueError as e:
            ap.error(str(e))
        if spec.dataset not in a.datasets:
            ap.error(f"--measure {item!r}: data set {spec.dataset} is not among --datasets {' '.join(a.datasets)}")
        if a.codecs is not None and spec.codec and spec.codec not in a.codecs:
            a.codecs.append(spec.codec)  # a measured codec is made (and swept) though --codecs left it out
    return a


def make_data(names: Sequence[str], total: int, device: torch.device, seed: int) -> tuple[dict, list]:
    """The data sets as uint8 buffers, and the weight mix's tensors."""
    specs = weight_mix(total, seed=seed)
    bf16 = make_bf16(specs, device, seed)
    data: dict[str, torch.Tensor] = {}
    if "bf16" in names:
        data["bf16"] = bf16.view(torch.uint8)
    if "fp8" in names:
        data["fp8"] = fp8_per_tensor(bf16, specs)
    if "random" in names:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + 1)
        data["random"] = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device, generator=gen)
    sync_all(device)
    return data, specs


def make_coders(nvcomp: Any, specs: Sequence[CodecSpec], lane: Lane, device: torch.device, res: dict) -> dict:
    """One Coder per codec, or the reason it could not be made."""
    coders: dict[str, Any] = {}
    for spec in specs if nvcomp is not None else ():
        try:
            coders[spec.name] = Coder(nvcomp, spec, lane, device)
        except Exception as e:  # noqa: BLE001 - the codec's row says why
            coders[spec.name] = short(e)
            res["errors"].append(f"{spec.name}: codec not made: {short(e)}")
    return coders


def run_sweep(a: argparse.Namespace, res: dict, data: dict, coders: dict, chunks: Sequence[int], lane: Lane) -> None:
    """2. and 3.: every codec on every data set's sample, per chunk size (most wanted first, until
    --budget-s is spent), with the model of each row; into res["sweep"] and res["rows"]."""
    specs = [c for c in CODECS if c.name in coders]
    samples = {}
    for name, d in data.items():
        win = max(4096, round_up(int(a.sample_mib * MiB) // 8, 4096))
        offs = sample_offsets(d.numel(), win, 8)
        samples[name] = d if offs == [0] else torch.cat([d[o:o + win] for o in offs])
    deadline = time.perf_counter() + a.budget_s
    slow: set = set()
    skipped = 0
    res["split_timing"] = {}
    for chunk in chunks:
        for name, sample in samples.items():
            c = min(chunk, sample.numel())
            split = None
            if name == "bf16" and any(s.split for s in specs) and time.perf_counter() < deadline:
                try:
                    split = measure_split(sample, c, a.reps, lane)
                    res["split_timing"][mib_label(chunk)] = {k: v for k, v in split.items() if k != "planes"}
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"split {name} {mib_label(chunk)} MiB: {short(e)}")
            for spec in specs:
                coder = coders[spec.name]
                if name not in spec.datasets or not isinstance(coder, Coder) or (name, spec.name) in slow:
                    continue
                if time.perf_counter() > deadline:
                    skipped += 1
                    continue
                rec = {"dataset": name, "codec": spec.name, "chunk": chunk}
                try:
                    raw = rec["raw"] = measure_plane(coder, sample, c, a.reps, False)
                    planes = None
                    if spec.split and split is not None:
                        hi, lo = split["planes"]
                        planes = rec["planes"] = {"hi": measure_plane(coder, hi, c // 2, a.reps, True),
                                                  "lo": measure_plane(coder, lo, c // 2, a.reps, True)}
                    rows = layout_rows(name, spec.name, chunk, raw, split, planes, data[name].numel(), res["limit"])
                    res["rows"].extend(rows)
                    if raw["bytes"] / raw["compress_s"] / 1e9 < a.slow_gbps:
                        slow.add((name, spec.name))
                    say(f"  {name:6} {spec.name:11} {mib_label(chunk):>5} MiB: " + "; ".join(
                        f"{r['layout']} {r['ratio']:.3f} {r['compress_gbps']:.0f}/{r['decompress_gbps']:.0f} GB/s "
                        f"x{r['model']['sleep_x']:.2f}/{r['model']['wake_x']:.2f}{'' if r['exact'] else ' NOT EXACT'}"
                        for r in rows))
                except Exception as e:  # noqa: BLE001 - one codec's failure must not end the probe
                    rec["error"] = short(e)
                    res["errors"].append(f"{name} {spec.name} {mib_label(chunk)} MiB: {short(e)}")
                    say(f"  {name:6} {spec.name:11} {mib_label(chunk):>5} MiB: {short(e)}")
                rec["notes"] = sorted(coder.notes)
                res["sweep"].append(rec)
        save(res, a.out)
    if skipped:
        res["errors"].append(f"{skipped} sweep points skipped: --budget-s {a.budget_s} spent")


def run_measured(a: argparse.Namespace, res: dict, data: dict, coders: dict, host: torch.Tensor,
                 lanes: tuple[Lane, Lane], device: torch.device, plain_chunk: int) -> None:
    """4.: the rows of --measure ("best": the sweep's plan) for real, each data set and chunk size's plain
    copy first; the first --diagnose coded rows under every variant, the rest as "async"; into
    res["measured"]."""
    limit = res["limit"]
    specs: list[MeasureSpec] = []
    for item in a.measure:
        specs += plan_measured(res["rows"], data, plain_chunk) if item == "best" else [parse_measure(item)]
    every = variants(a.slots)
    coded = 0
    for spec in with_baselines(specs):
        if spec.layout == "plain":
            runs = [every["async"]]
        else:
            coded += 1
            runs = list(every.values()) if coded <= a.diagnose else [every["async"]]
        for v in runs:
            rec: dict = asdict(spec)
            what = (f"  measured {spec.dataset:6} {spec.codec or '(none)':11} {spec.layout:8} {mib_label(spec.chunk)} MiB"
                    f"{'' if spec.layout == 'plain' else ' ' + v.name}:")
            try:
                coder = coders.get(spec.codec) if spec.codec else None
                if spec.codec and not isinstance(coder, Coder):
                    raise RuntimeError(f"codec {spec.codec} not available")
                p = Pipeline(data[spec.dataset], host, spec.chunk, spec.layout, coder, *lanes, variant=v)
                m = measure_pipeline(p, a.reps, device)
                del p
                n = data[spec.dataset].numel()
                rec.update(m, sleep_x=n / (limit["d2h_gbps"] * 1e9) / m["sleep_s"],
                           wake_x=n / (limit["h2d_gbps"] * 1e9) / m["wake_s"], host_ratio=m["host_bytes"] / n,
                           notes=sorted(coder.notes) if coder else [])
                res["errors"] += [f"measured {spec.dataset} {spec.codec} {spec.layout} {v.name}: {t}"
                                  for t in m["pipeline_notes"]]
                say(measured_line(rec).replace("  ", "  measured ", 1))
            except Exception as e:  # noqa: BLE001 - the next row may still run
                rec.update(error=short(e), variant=asdict(v))
                res["errors"].append(f"measured {spec.dataset} {spec.codec} {spec.layout} {v.name}: {short(e)}")
                say(f"{what} {short(e)}")
            res["measured"].append(rec)
            save(res, a.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            say("no CUDA device: torch.cuda.is_available() is False (--device cpu runs the logic only)")
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    nvcomp, why = load_nvcomp()
    if nvcomp is not None and a.nvcomp_alloc == "torch":
        nvcomp.set_device_allocator(TorchScratch)
    res: dict = {"config": vars(a), "env": env_info(device, nvcomp), "errors": [], "rows": [], "sweep": [],
                 "measured": []}
    if nvcomp is None:
        res["errors"].append(f"nvidia.nvcomp not importable ({why}): only the copy limit is measured")
    say(f"env: {res['env']}")
    total = round_up(int(a.gib * GiB), 4096)
    chunks = [max(4096, round_up(int(c * MiB), 4096)) for c in a.chunk_mib]
    work, copy = Lane(device), Lane(device)

    t0 = time.perf_counter()
    data, specs = make_data(a.datasets, total, device, a.seed)
    res["datasets"] = {k: {"bytes": v.numel()} for k, v in data.items()}
    res["mix"] = [asdict(t) for t in specs]
    say(f"data: {', '.join(f'{k} {v.numel() / GiB:.2f} GiB' for k, v in data.items())} "
        f"({len(specs)} tensors) in {time.perf_counter() - t0:.1f} s")

    # 1. the limit
    t0 = time.perf_counter()
    host = torch.empty(total + total // 16 + 64 * MiB, dtype=torch.uint8, pin_memory=device.type == "cuda")
    res["pin_s"] = time.perf_counter() - t0
    res["limit"] = limit = measure_limit(next(iter(data.values())), host, chunks, a.reps, work)
    say(f"limit: D2H {limit['d2h_gbps']:.1f} GB/s, H2D {limit['h2d_gbps']:.1f} GB/s (pinned {host.numel() / GiB:.2f} "
        f"GiB in {res['pin_s']:.1f} s); chunked: {limit['chunked']}")
    save(res, a.out)

    coders = make_coders(nvcomp, [c for c in CODECS if a.codecs is None or c.name in a.codecs], work, device, res)
    run_sweep(a, res, data, coders, chunks, work)
    say(f"sweep done at {time.perf_counter() - t_start:.0f} s")
    if not a.skip_measured:
        run_measured(a, res, data, {k: v for k, v in coders.items() if isinstance(v, Coder)}, host, (work, copy),
                     device, chunks[0])
    res["wall_s"] = time.perf_counter() - t_start
    save(res, a.out)
    say("")
    say(table(res))
    say(f"wall {res['wall_s']:.1f} s" + (f"; JSON in {a.out}/probe_compression.json" if a.out else ""))
    return 0


def plan_measured(rows: Sequence[dict], data: dict, plain_chunk: int) -> list[MeasureSpec]:
    """The sweep's picks: per data set a plain chunked copy and its best exact row by the modelled
    sleep+wake; random bytes also through bf16's best (what compression costs where it cannot pay)."""
    best: dict = {}
    for r in rows:
        if r["exact"] and (r["dataset"] not in best or r["model"]["cycle_x"] > best[r["dataset"]]["model"]["cycle_x"]):
            best[r["dataset"]] = r
    plans = []
    for dataset in data:
        b = best.get(dataset)
        plans.append(MeasureSpec(dataset, None, "plain", b["chunk"] if b else plain_chunk))
        if b:
            plans.append(MeasureSpec(dataset, b["codec"], b["layout"], b["chunk"]))
    if "bf16" in best and "random" in data:
        b = best["bf16"]
        item = MeasureSpec("random", b["codec"], b["layout"], b["chunk"])
        if item not in plans:
            plans.append(item)
    return plans


if __name__ == "__main__":
    sys.exit(main())
