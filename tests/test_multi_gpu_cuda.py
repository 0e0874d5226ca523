"""GPU suite, two GPUs: pools on several devices, and sleep/wake next to NCCL.

- Two processes, one per GPU, joined by torch.distributed over NCCL, each with its own
  `CuMemAllocator.get_instance()`: a small model (linears, rotary cos/sin cache and inv_freq as
  non-persistent buffers, a vLLM-shaped KV cache) goes through the RLHF loop: level-2 sleep, the freed
  memory is overwritten, wake "weights", parameters are reloaded from a CPU copy (only them), wake
  "kv_cache"; the all-reduced output is bit-identical to the one before sleep and buffers are intact.
- One process with pools on both devices (`with torch.cuda.device(d), alloc.use_memory_pool(tag)`):
  allocations carry their device; one sleep (weights to host, KV cache discarded) and one wake cover
  both devices and restore every byte of each device's weights on that device; a level-2 cycle keeps each
  device's buffers; a wake with no room on device 1 raises DeviceOutOfMemoryError and wakes nothing on
  either device (all or nothing), and succeeds once device 1 has room.

NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for the children and kept set (the
machines these run on must not use NVLink multicast).
"""

from __future__ import annotations

import datetime
import gc
import os
import queue
import socket
import time
import traceback
from collections import defaultdict

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vllm_sleep_ext import CuMemAllocator, DeviceOutOfMemoryError, SleepExtError

try:
    from gpu_helpers import (
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE, anything_asleep, assert_in_pool, assert_tensors_match,
    buffer_snapshot, driver_access_flags, find_allocation, hog_device_memory, load_params, param_snapshot,
    release_cuda_memory, scribble_free_gpu_memory, tag_sleep_states, tensors_differing,
    )
except ImportError:  # tests/ collected as a package
    from tests.gpu_helpers import (
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE, anything_asleep, assert_in_pool, assert_tensors_match,
    buffer_snapshot, driver_access_flags, find_allocation, hog_device_memory, load_params, param_snapshot,
    release_cuda_memory, scribble_free_gpu_memory, tag_sleep_states, tensors_differing,
    )

pytestmark = pytest.mark.cuda

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
MiB = 1 << 20
GiB = 1 << 30
DEVICES = (0, 1)
WORLD_SIZE = 2
CHILD_TIMEOUT_S = 180
# NVLink multicast must stay off on these machines: set for every child, never unset.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def two_gpus():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {count}")


@pytest.fixture
def held():
    """Named lists of tensors a test keeps alive; cleared (after the wake) by `alloc`'s teardown."""
    return defaultdict(list)


@pytest.fixture
def alloc(two_gpus, held):
    """The process-wide allocator, awake at start; awake, clean, no host limit at end."""
    allocator = CuMemAllocator.get_instance()
    if anything_asleep(allocator):
        allocator.wake_up()
    allocator.host_memory_limit = 0
    yield allocator
    try:
        held.pop("hog", None)
        torch.cuda.empty_cache()
        if anything_asleep(allocator):
            allocator.wake_up()
    finally:
        allocator.host_memory_limit = 0
        held.clear()
        release_cuda_memory()
        allocator.release_pools()
        for d in DEVICES:
            with torch.cuda.device(d):
                release_cuda_memory()


# --------------------------------------------------------------------------------------------------
# A small model with vLLM's kinds of state
# --------------------------------------------------------------------------------------------------

VOCAB, HIDDEN, HEADS, MAX_POS = 512, 256, 4, 2048
NUM_BLOCKS, BLOCK_SIZE = 64, 16
TOKENS = 48


class TinyRopeModel(nn.Module):
    """Embedding, attention with rotary embeddings over a paged KV cache, MLP, LM head.

    `inv_freq` and `cos_sin_cache` are non-persistent buffers, as in vLLM's RotaryEmbedding: no
    `load_weights` ever restores them. The forward writes this step's keys/values into the KV cache at
    `slots` before it reads them back, as prefill does, so stale KV-cache contents never matter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[0]
        h = self.embed(tokens)
        q, k, v = self.qkv(h).view(t, 3, HEADS, self.head_dim).unbind(1)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        k_cache = kv_cache[0].view(-1, HEADS, self.head_dim)
        v_cache = kv_cache[1].view(-1, HEADS, self.head_dim)
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        k, v = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
        scores = torch.einsum("thd,shd->hts", q, k) / self.head_dim ** 0.5
        causal = positions[None, :] > positions[:, None]
        scores = scores.masked_fill(causal[None], float("-inf"))
        attn = torch.einsum("hts,shd->thd", scores.softmax(dim=-1), v).reshape(t, HIDDEN)
        h = h + self.o_proj(attn)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.lm_head(h)


def kv_cache_shape() -> tuple[int, ...]:
    return (2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HIDDEN // HEADS)  # vLLM's [2, blocks, block_size, heads, dim]


# --------------------------------------------------------------------------------------------------
# a. Two processes, NCCL, level-2 sleep
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_rank(rank: int, device: torch.device) -> str:
    """One rank of the NCCL test, in a process group already set up; raises on failure."""
    import torch.distributed as dist

    alloc = CuMemAllocator.get_instance()
    torch.manual_seed(1000 + rank)  # different weights on each rank: the all-reduce mixes them
    with alloc.use_memory_pool(WEIGHTS), torch.device(device):
        model = TinyRopeModel()
    model.eval()
    with alloc.use_memory_pool(KV_CACHE):
        kv_cache = torch.randn(kv_cache_shape(), device=device)
    assert_in_pool(alloc, model.named_parameters(), WEIGHTS)
    assert_in_pool(alloc, model.named_buffers(), WEIGHTS)
    assert_in_pool(alloc, [("kv_cache", kv_cache)], KV_CACHE)
    rows = alloc.pointer_to_data.values()
    assert rows and all(d.device == rank for d in rows), \
        f"rank {rank}: allocations on devices {sorted({d.device for d in rows})}"

    g = torch.Generator().manual_seed(7)  # the same inputs on every rank, made outside the pools
    tokens = torch.randint(0, VOCAB, (TOKENS,), generator=g).to(device)
    positions = torch.arange(TOKENS).to(device)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:TOKENS].to(device)

    def step() -> torch.Tensor:
        with torch.no_grad():
            logits = model(tokens, positions, kv_cache, slots)
        reduced = logits.float().sum(dim=-1).contiguous()  # outside the pools
        dist.all_reduce(reduced)
        torch.cuda.synchronize()
        return reduced.cpu()

    before = step()
    assert torch.equal(step(), before), f"rank {rank}: test setup: the step is not deterministic"
    params = param_snapshot(model)
    buffers = buffer_snapshot(model)
    assert set(buffers) == {"inv_freq", "cos_sin_cache"}
    addresses = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    kv_address = kv_cache.data_ptr()

    alloc.sleep(offload_tags=())  # level 2: weights and KV cache discarded, buffers preserved
    states = tag_sleep_states(alloc, [WEIGHTS, KV_CACHE])
    assert states == {WEIGHTS: {True}, KV_CACHE: {True}}, f"rank {rank}: after sleep {states}"
    scribble_free_gpu_memory(device=device)  # the trainer uses the memory

    alloc.wake_up([WEIGHTS])
    states = tag_sleep_states(alloc, [WEIGHTS, KV_CACHE])
    assert states == {WEIGHTS: {False}, KV_CACHE: {True}}, f"rank {rank}: after wake of weights {states}"
    bad = tensors_differing(buffer_snapshot(model), buffers)
    assert not bad, f"rank {rank}: buffers lost by the level-2 sleep: {bad}"
    load_params(model, params)  # the trainer sends parameters, never buffers
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc)

    now = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert now == addresses and kv_cache.data_ptr() == kv_address, f"rank {rank}: addresses moved"
    after = step()
    assert torch.equal(after, before), (
        f"rank {rank}: all-reduced output differs after sleep/wake: max abs diff "
        f"{(after - before).abs().nan_to_num(float('inf')).max().item()}")
    assert_tensors_match(buffer_snapshot(model), buffers, f"rank {rank}: buffers after the step")
    return f"rank {rank}: ok, {alloc.stats().last_wake}"


def _nccl_worker(rank: int, world_size: int, port: int, results) -> None:
    """Spawned child: runs one rank and reports ("ok"|"fail", text) through `results`."""
    try:
        os.environ.update(NO_MULTICAST_ENV)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        import torch.distributed as dist

        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.use_deterministic_algorithms(True, warn_only=True)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device,
                                timeout=datetime.timedelta(seconds=120))
        text = _nccl_rank(rank, device)
        results.put((rank, "ok", text))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        # Reported before the process group is torn down, which may block if the other rank is stuck.
        results.put((rank, "fail", traceback.format_exc()))
        ok = False
    else:
        ok = True
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        if ok:
            results.put((rank, "fail", "destroy_process_group failed:\n" + traceback.format_exc()))
        ok = False
    if not ok:
        raise SystemExit(1)


def test_two_processes_nccl_level2_sleep_keeps_outputs_and_buffers():
    os.environ.update(NO_MULTICAST_ENV)  # inherited by the spawned children; kept set afterwards
    port = _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_nccl_worker, args=(rank, WORLD_SIZE, port, results), daemon=True,
                         name=f"nccl-rank{rank}") for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()

    deadline = time.monotonic() + CHILD_TIMEOUT_S
    reports: dict[int, tuple[str, str]] = {}
    try:
        while len(reports) < WORLD_SIZE and time.monotonic() < deadline:
            try:
                rank, status, text = results.get(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                reports[rank] = (status, text)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    try:  # a last report may still be in flight
                        rank, status, text = results.get(timeout=5)
                        reports[rank] = (status, text)
                        continue
                    except queue.Empty:
                        break
            if any(status == "fail" for status, _ in reports.values()):
                # The other rank may now wait forever in a collective: give it a moment to report too.
                grace = time.monotonic() + 15
                while len(reports) < WORLD_SIZE and time.monotonic() < grace:
                    try:
                        rank, status, text = results.get(timeout=1)
                        reports[rank] = (status, text)
                    except queue.Empty:
                        pass
                break
        for p in procs:
            p.join(max(1.0, min(30.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)

    lines = []
    for rank, p in enumerate(procs):
        status, text = reports.get(rank, ("no report", f"(timed out after {CHILD_TIMEOUT_S} s or died)"))
        lines.append(f"--- rank {rank}: {status}, exit code {p.exitcode}\n{text}")
    summary = "\n".join(lines)
    assert all(reports.get(r, ("",))[0] == "ok" for r in range(WORLD_SIZE)), summary
    assert all(p.exitcode == 0 for p in procs), summary


# --------------------------------------------------------------------------------------------------
# b. One process, pools on two devices
# --------------------------------------------------------------------------------------------------

class Rope(nn.Module):
    """Only a non-persistent rotary cache: the state a level-2 sleep must keep."""

    def __init__(self, positions: int = 4096, dim: int = 128) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)


def build_pools_on_both_devices(alloc: CuMemAllocator, held, weights_bytes: int, kv_bytes: int,
                                pieces: int = 4) -> None:
    """Per device d: held[f"w{d}"] random weights (CPU copies in held[f"ref{d}"]), a Rope module in
    held[f"rope{d}"] (its buffer's CPU copy in held[f"buf{d}"]), all in "weights"; held[f"kv{d}"] in
    "kv_cache". Each device gets different data, so a backup restored on the wrong device shows."""
    piece = weights_bytes // pieces // (2 * MiB) * (2 * MiB)
    for d in DEVICES:
        dev = torch.device("cuda", d)
        g = torch.Generator(device=dev).manual_seed(100 + d)
        with torch.cuda.device(d), alloc.use_memory_pool(WEIGHTS):
            held[f"w{d}"].extend(torch.randn(piece // 4, device=dev, generator=g) for _ in range(pieces))
            with torch.device(dev):
                held[f"rope{d}"].append(Rope(dim=64 * (d + 1)))
        with torch.cuda.device(d), alloc.use_memory_pool(KV_CACHE):
            held[f"kv{d}"].append(torch.full((kv_bytes // 2,), d + 1, dtype=torch.bfloat16, device=dev))
        torch.cuda.synchronize(dev)
        held[f"ref{d}"].extend(t.to("cpu", copy=True) for t in held[f"w{d}"])
        held[f"buf{d}"].append(held[f"rope{d}"][0].cos_sin_cache.to("cpu", copy=True))


def assert_on_device(alloc: CuMemAllocator, tensors: list[torch.Tensor], device: int, tag: str) -> None:
    wrong = []
    for i, t in enumerate(tensors):
        data = find_allocation(alloc, t)
        if data is None or data.device != device or data.tag != tag:
            wrong.append((i, None if data is None else (data.device, data.tag)))
    assert not wrong, f"expected these tensors in {tag!r} allocations on device {device}: {wrong}"


def differing(tensors: list[torch.Tensor], expected: list[torch.Tensor]) -> list[int]:
    """Indexes whose bytes differ from the CPU copy (bit for bit, on the tensor's own device)."""
    return [i for i, (t, want) in enumerate(zip(tensors, expected))
            if not torch.equal(t.view(torch.int32), want.to(t.device).view(torch.int32))]


def assert_weights_restored(held, what: str) -> None:
    bad = {d: differing(held[f"w{d}"], held[f"ref{d}"]) for d in DEVICES}
    assert not any(bad.values()), f"{what}: weights differing from before sleep, per device: {bad}"


def assert_buffers_restored(held, what: str) -> None:
    bad = [d for d in DEVICES
           if not torch.equal(held[f"rope{d}"][0].cos_sin_cache.cpu(), held[f"buf{d}"][0])]
    assert not bad, f"{what}: rotary buffers lost on devices {bad}"


def table(alloc: CuMemAllocator) -> dict[int, tuple]:
    return {p: (d.size, d.device, d.tag, d.state) for p, d in alloc.pointer_to_data.items()}


def rows_on(alloc: CuMemAllocator, device: int) -> list:
    return [d for d in alloc.pointer_to_data.values() if d.device == device]


def free_on(device: int) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def test_pools_on_two_devices_sleep_and_wake_together(alloc, held):
    weights_bytes, kv_bytes = 512 * MiB, 256 * MiB
    build_pools_on_both_devices(alloc, held, weights_bytes, kv_bytes)
    for d in DEVICES:
        assert_on_device(alloc, held[f"w{d}"], d, WEIGHTS)
        assert_on_device(alloc, [held[f"rope{d}"][0].cos_sin_cache], d, WEIGHTS)
        assert_on_device(alloc, held[f"kv{d}"], d, KV_CACHE)
        tags = {r.tag for r in rows_on(alloc, d)}
        assert {WEIGHTS, KV_CACHE} <= tags, f"device {d} holds tags {tags}"
    assert {r.device for r in alloc.pointer_to_data.values()} <= set(DEVICES)
    addresses = {d: [t.data_ptr() for t in held[f"w{d}"] + held[f"kv{d}"]] for d in DEVICES}

    # Level 1 for the weights and level 2 for the KV cache, on both devices, in one call.
    torch.cuda.empty_cache()
    free_before = {d: free_on(d) for d in DEVICES}
    alloc.sleep(offload_tags=(WEIGHTS,))
    assert all(r.is_asleep for r in alloc.pointer_to_data.values()), "a sleep left allocations mapped"
    for d in DEVICES:
        pool_bytes = sum(r.size for r in rows_on(alloc, d))
        gained = free_on(d) - free_before[d]
        assert gained >= pool_bytes - 64 * MiB, (
            f"device {d}: sleep gave back {gained / MiB:.0f} MiB of {pool_bytes / MiB:.0f} MiB in the pools")
    stats = alloc.stats().tags
    assert stats[WEIGHTS].backed_up_bytes >= sum(t.nbytes for d in DEVICES for t in held[f"ref{d}"])
    for d in DEVICES:
        scribble_free_gpu_memory(device=d)
    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert {d: [t.data_ptr() for t in held[f"w{d}"] + held[f"kv{d}"]] for d in DEVICES} == addresses
    assert_weights_restored(held, "after a level-1 wake on two devices")
    assert_buffers_restored(held, "after a level-1 wake on two devices")
    for d in DEVICES:  # the discarded KV cache is mapped and usable again
        kv = held[f"kv{d}"][0]
        kv.fill_(10 + d)
        assert bool((kv == 10 + d).all()), f"device {d}: KV cache not usable after wake"

    # Level 2 on both devices: each device's buffer comes back, on its own device.
    alloc.sleep(offload_tags=())
    assert all(r.is_asleep for r in alloc.pointer_to_data.values())
    for d in DEVICES:
        scribble_free_gpu_memory(device=d)
    alloc.wake_up([WEIGHTS])
    assert tag_sleep_states(alloc, [WEIGHTS, KV_CACHE]) == {WEIGHTS: {False}, KV_CACHE: {True}}
    assert_buffers_restored(held, "after a level-2 wake on two devices")
    with torch.no_grad():  # the trainer sends the weights again
        for d in DEVICES:
            for t, ref in zip(held[f"w{d}"], held[f"ref{d}"]):
                t.copy_(ref)
    alloc.wake_up([KV_CACHE])
    assert not anything_asleep(alloc)
    assert_weights_restored(held, "after reloading")


def test_wake_oom_on_device1_wakes_nothing_on_either_device(alloc, held):
    weights_bytes, kv_bytes = 512 * MiB, 256 * MiB
    build_pools_on_both_devices(alloc, held, weights_bytes, kv_bytes)
    alloc.sleep(offload_tags=(WEIGHTS,))
    assert all(r.is_asleep for r in alloc.pointer_to_data.values())
    table_before = table(alloc)
    backed_up = alloc.stats().tags[WEIGHTS].backed_up_bytes
    needed_1 = sum(-(-r.size // (2 * MiB)) * (2 * MiB) for r in rows_on(alloc, 1))
    weights_1 = sum(r.size for r in rows_on(alloc, 1) if r.tag == WEIGHTS)
    for d in DEVICES:
        scribble_free_gpu_memory(device=d)

    # Device 1 gets too full for its weights alone; device 0 has room for everything.
    held["hog"] = hog_device_memory(leave_free_bytes=min(needed_1 // 2, weights_1 // 2), device=1)
    try:
        assert free_on(1) < weights_1, f"test setup: {free_on(1)} bytes free on device 1"
        torch.cuda.empty_cache()
        free0 = free_on(0)
        for attempt in (None, [WEIGHTS], None):
            with pytest.raises(DeviceOutOfMemoryError) as err:
                alloc.wake_up(attempt)
            message = str(err.value)
            assert isinstance(err.value, RuntimeError) and isinstance(err.value, SleepExtError)
            assert WEIGHTS in message and "needs" in message and "free" in message, message
            assert table(alloc) == table_before, f"a failed wake ({attempt}) changed the table"
            assert all(r.is_asleep for r in rows_on(alloc, 0)), "a failed wake woke device 0"
            assert all(r.is_asleep for r in rows_on(alloc, 1)), "a failed wake woke device 1"
            assert alloc.stats().tags[WEIGHTS].backed_up_bytes == backed_up, "a failed wake dropped backups"
            assert abs(free_on(0) - free0) <= 8 * MiB, "a failed wake kept memory on device 0"
    finally:
        held.pop("hog", None)
        torch.cuda.empty_cache()

    alloc.wake_up()
    assert not anything_asleep(alloc)
    assert_weights_restored(held, "after the retried wake")
    assert_buffers_restored(held, "after the retried wake")
    gc.collect()


def test_peer_devices_can_access_pool_memory_across_a_sleep(alloc, held):
    """Peer copies and kernels reading another GPU's weights (weight sync between ranks) need access
    rights for every peer device, set again on the memory each wake creates (as ExpandableSegment does)."""
    if not torch.cuda.can_device_access_peer(1, 0):
        pytest.skip("device 1 cannot access device 0 as a peer on this machine")
    with torch.cuda.device(0), alloc.use_memory_pool(WEIGHTS):
        weights = torch.randn(8 * MiB // 4, device="cuda:0")
    held["w"].append(weights)
    reference = weights.cpu()
    for when in ("awake", "after a wake"):
        for d in DEVICES:
            assert driver_access_flags(weights.data_ptr(), d) == CU_MEM_ACCESS_FLAGS_PROT_READWRITE, (
                f"{when}: device {d} has no read-write access to a device-0 pool allocation")
        assert torch.equal(weights.to("cuda:1").cpu(), reference), f"{when}: peer copy to device 1 differs"
        alloc.sleep(offload_tags=(WEIGHTS,))
        scribble_free_gpu_memory(device=0)
        alloc.wake_up()
