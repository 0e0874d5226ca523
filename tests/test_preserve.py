"""The preserve scope on the host backend (no GPU): what a level-2 sleep keeps, and that no tensor
anywhere in the process can make a sleep fail. See Note [Preserve scope] in vllm_sleep_ext/preserve.py."""

from __future__ import annotations

import ctypes
import gc
import logging
import random
import sys
import threading

import pytest
import torch
from torch import nn

from vllm_sleep_ext import CuMemAllocator, _core
from vllm_sleep_ext.preserve import PreserveSet, intersect, merge, ranges_of, storage_ranges, subtract

MiB = 1 << 20


@pytest.fixture
def alloc() -> CuMemAllocator:
    return CuMemAllocator(backend="host", capacity_bytes=256 * MiB)


def level2(alloc: CuMemAllocator) -> None:
    """sleep(offload_tags=()) then wake everything; the host backend hands back zeroed memory."""
    alloc.sleep(offload_tags=())
    alloc.wake_up()


def pool_tensor(alloc: CuMemAllocator, tag: str, n: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with alloc.use_memory_pool(tag=tag):
        t = alloc.empty((n,), dtype)
    t.copy_(torch.arange(n, dtype=torch.float64).to(dtype) + 1)
    return t


def reference(n: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64).to(dtype) + 1


class ExpertConstants:
    """Shaped like vLLM's MoE expert objects: not an nn.Module, constants kept as plain attributes."""

    def __init__(self, alpha: torch.Tensor) -> None:
        self.gemm1_alpha = alpha


class Wrapper(torch.Tensor):
    """A _make_wrapper_subclass tensor (the DTensor / torchao / Float8 pattern) over one inner tensor."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "Wrapper":
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"Wrapper does not run {func}")


class OpaqueWrapper(Wrapper):
    """A wrapper subclass that does not say what it wraps: it has no bytes we can find."""

    __tensor_flatten__ = None  # type: ignore[assignment]

    def __getattribute__(self, name):
        if name == "__tensor_flatten__":
            raise AttributeError(name)
        return super().__getattribute__(name)


def odd_tensors() -> dict[str, torch.Tensor]:
    dense = torch.eye(4)
    return {
        "sparse_coo": dense.to_sparse(),
        "sparse_csr": dense.to_sparse_csr(),
        "sparse_csc": dense.to_sparse_csc(),
        "sparse_bsr": dense.to_sparse_bsr((2, 2)),
        "meta": torch.empty(8, device="meta"),
        "wrapper": Wrapper(torch.ones(4)),
        "opaque_wrapper": OpaqueWrapper(torch.ones(4)),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "empty": torch.empty(0),
    }


# -- resolving tensors to byte ranges ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(odd_tensors()))
def test_storage_ranges_of_odd_tensors_never_raise(name):
    ranges = storage_ranges(odd_tensors()[name])
    assert all(ptr and nbytes > 0 for ptr, nbytes in ranges)


def test_sparse_and_wrapper_tensors_resolve_to_their_inner_storages():
    coo = torch.eye(4).to_sparse()
    assert set(storage_ranges(coo)) == set(storage_ranges(coo._indices()) + storage_ranges(coo._values()))
    csr = torch.eye(4).to_sparse_csr()
    parts = (csr.crow_indices(), csr.col_indices(), csr.values())
    assert set(storage_ranges(csr)) == {r for p in parts for r in storage_ranges(p)}
    inner = torch.ones(4)
    assert storage_ranges(Wrapper(inner)) == storage_ranges(inner)
    assert storage_ranges(torch.empty(3, device="meta")) == []


@pytest.mark.parametrize("mode", ["off", "buffers", "live"])
def test_odd_tensors_anywhere_in_the_process_never_fail_a_sleep(alloc, mode):
    # Today's bug: one sparse-CSR buffer on any CPU module made every sleep() raise.
    holder = nn.Module()
    for name, tensor in odd_tensors().items():
        holder.register_buffer(name, tensor, persistent=False)
    inner = pool_tensor(alloc, "weights")
    holder.register_buffer("wrapped_in_pool", Wrapper(inner), persistent=False)
    alloc.preserve(*odd_tensors().values())
    alloc.preserve_mode = mode
    level2(alloc)
    level2(alloc)
    assert torch.equal(inner, reference()) == (mode != "off"), "a wrapper buffer keeps its inner tensor"


def test_dtensor_buffer_is_kept_through_its_local_tensor(alloc, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    from torch.distributed.tensor import DeviceMesh, DTensor, Replicate

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        local = pool_tensor(alloc, "weights")
        holder = nn.Module()
        holder.register_buffer("d", DTensor.from_local(local, DeviceMesh("cpu", torch.arange(1)), [Replicate()],
                                                       run_check=False), persistent=False)
        alloc.preserve_mode = "buffers"
        level2(alloc)
        assert torch.equal(local, reference())
    finally:
        dist.destroy_process_group()


# -- the scope --------------------------------------------------------------------------------------

def test_live_keeps_plain_attributes_of_weights_only(alloc):
    assert alloc.preserve_mode == "live" and alloc.preserve_tags == ("weights",), "the defaults"
    experts = ExpertConstants(pool_tensor(alloc, "weights"))
    kv = pool_tensor(alloc, "kv_cache")
    default = pool_tensor(alloc, "default")
    level2(alloc)
    assert torch.equal(experts.gemm1_alpha, reference()), "a plain-attribute constant of the weights pool"
    assert not torch.equal(kv, reference()), "the KV cache is never preserved"
    assert not torch.equal(default, reference()), "tags outside preserve_tags are not preserved"


def test_preserve_tags_widen_the_scope_but_never_to_engine_pools(alloc):
    default = pool_tensor(alloc, "default")
    alloc.preserve_tags = "weights, default"
    assert alloc.preserve_tags == ("weights", "default")
    level2(alloc)
    assert torch.equal(default, reference())
    for tag in ("kv_cache", "runtime", "cudagraph", "workspace"):
        with pytest.raises(ValueError, match="never preserved"):
            alloc.preserve_tags = ("weights", tag)
    assert alloc.preserve_tags == ("weights", "default"), "a refused setting changes nothing"


def test_buffers_mode_loses_plain_attributes(alloc):
    alloc.preserve_mode = "buffers"
    experts = ExpertConstants(pool_tensor(alloc, "weights"))
    level2(alloc)
    assert not torch.equal(experts.gemm1_alpha, reference())


@pytest.mark.parametrize("mode", ["buffers", "live"])
def test_preserve_keeps_a_parameter_in_every_mode_but_off(alloc, mode):
    # Today "live" subtracted parameters from preserve() and dropped them silently.
    module = nn.Linear(16, 16)
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(module)
    kept = module.weight.detach().clone()
    alloc.preserve(module.weight)
    alloc.preserve_mode = mode
    level2(alloc)
    assert torch.equal(module.weight.detach(), kept)
    assert not module.bias.detach().any(), "a parameter nobody preserved is discarded (woken zeroed here)"


def test_preserve_does_nothing_when_off(alloc):
    t = pool_tensor(alloc, "weights")
    alloc.preserve(t)
    alloc.preserve_mode = "off"
    level2(alloc)
    assert not torch.equal(t, reference())


def test_live_excludes_only_the_bytes_a_parameter_covers(alloc):
    # A parameter that is a view into a larger storage: the rest of the storage is someone else's.
    with alloc.use_memory_pool(tag="weights"):
        flat = alloc.empty((512,), torch.float32)
    flat.copy_(reference(512))
    module = nn.Module()
    module.weight = nn.Parameter(flat[:256], requires_grad=False)
    tail = flat[256:]
    assert module.weight.untyped_storage().data_ptr() == tail.untyped_storage().data_ptr()
    level2(alloc)
    assert torch.equal(tail, reference(512)[256:]), "non-parameter bytes sharing the parameter's storage"
    assert not module.weight.any(), "the parameter's own bytes are the trainer's to send"
    assert alloc.last_preserved.bytes == 256 * 4


def test_live_keeps_a_strided_parameter_storage_whole(alloc):
    # Its elements do not fill one span: excluding its span could drop other tensors' bytes between them.
    with alloc.use_memory_pool(tag="weights"):
        flat = alloc.empty((64,), torch.float32)
    flat.copy_(reference(64))
    module = nn.Module()
    module.weight = nn.Parameter(flat[::2], requires_grad=False)
    level2(alloc)
    assert torch.equal(flat, reference(64))


def test_sleep_reports_bytes_and_ranges_kept(alloc, caplog):
    a = pool_tensor(alloc, "weights", 256)
    module = nn.Linear(8, 8)
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(module)
    b = pool_tensor(alloc, "weights", 128)
    with caplog.at_level(logging.INFO, logger="vllm_sleep_ext.allocator"):
        alloc.sleep(offload_tags=())
    kept = alloc.last_preserved
    assert kept.bytes == a.nbytes + b.nbytes == alloc.stats().tags["weights"].preserved_bytes
    assert kept.ranges == 2
    assert f"in {kept.ranges} ranges" in caplog.text and "preserve_mode=live" in caplog.text
    alloc.wake_up()
    assert torch.equal(a, reference(256)) and torch.equal(b, reference(128))


def test_live_says_once_when_it_keeps_a_lot(alloc, caplog, monkeypatch):
    import vllm_sleep_ext.allocator as allocator_module

    monkeypatch.setattr(allocator_module, "LARGE_PRESERVE_BYTES", 512)
    kept = pool_tensor(alloc, "weights", 1024)  # noqa: F841 - alive through the sleeps
    with caplog.at_level(logging.WARNING, logger="vllm_sleep_ext.allocator"):
        level2(alloc)
        level2(alloc)
    assert caplog.text.count("VLLM_SLEEP_EXT_PRESERVE=buffers") == 1


def test_offloaded_tags_are_not_counted_as_preserved(alloc):
    w = pool_tensor(alloc, "weights")
    alloc.sleep(offload_tags=("weights",))  # level 1: weights go to host whole
    assert alloc.last_preserved.bytes == 0 and alloc.last_preserved.ranges == 0
    alloc.wake_up()
    assert torch.equal(w, reference())


@pytest.mark.parametrize("env, mode, tags", [
    ({}, "live", ("weights",)),
    ({"VLLM_SLEEP_EXT_PRESERVE": "buffers"}, "buffers", ("weights",)),
    ({"VLLM_SLEEP_EXT_PRESERVE": "off", "VLLM_SLEEP_EXT_PRESERVE_TAGS": "weights,default"}, "off",
     ("weights", "default")),
])
def test_environment_sets_mode_and_tags(monkeypatch, env, mode, tags):
    for name in ("VLLM_SLEEP_EXT_PRESERVE", "VLLM_SLEEP_EXT_PRESERVE_TAGS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    alloc = CuMemAllocator(backend="host", capacity_bytes=MiB)
    assert (alloc.preserve_mode, alloc.preserve_tags) == (mode, tags)


# -- the CUDA path of "live", on a snapshot made up over host allocations ---------------------------------

def _fake_cuda(alloc, monkeypatch, segments) -> None:
    """Makes ``alloc`` read ``segments`` as PyTorch's memory snapshot (a callable raises instead)."""
    import vllm_sleep_ext.allocator as allocator_module

    def snapshot():
        if callable(segments):
            return segments()
        return segments

    monkeypatch.setattr(allocator_module, "_memory_snapshot", snapshot)
    monkeypatch.setattr(alloc, "backend", "cuda")


def _segment(address: int, *blocks: tuple) -> dict:
    """Blocks as (state, size) or (state, size, requested_size)."""
    return {"address": address, "total_size": sum(b[1] for b in blocks),
            "blocks": [{"state": b[0], "size": b[1], **({"requested_size": b[2]} if len(b) > 2 else {})}
                       for b in blocks]}


def test_live_on_cuda_keeps_active_blocks_of_preserve_tags_only(alloc, monkeypatch):
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((16384,), torch.float32)  # one allocation of 64 KiB: a made-up segment
        block = alloc.empty((256,), torch.float32)  # a 1024 B block holding a 1000 B parameter storage
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = alloc.empty((4096,), torch.float32)
    p, q, k = w.data_ptr(), block.data_ptr(), kv.data_ptr()
    storage_1000 = torch.frombuffer((ctypes.c_uint8 * 1000).from_address(q), dtype=torch.uint8)
    module = nn.Module()
    module.weight = nn.Parameter(storage_1000.view(torch.float32), requires_grad=False)
    _fake_cuda(alloc, monkeypatch, [
        _segment(p, ("active_allocated", 4096), ("inactive", 8192), ("active_awaiting_free", 512, 500),
                 ("inactive", 65536 - 4096 - 8192 - 512)),
        _segment(q, ("active_allocated", 1024)),  # the parameter's block, rounding tail included
        _segment(k, ("active_allocated", 16384)),  # the KV cache: never in scope
        _segment(1 << 40, ("active_allocated", 512)),  # memory that is not ours
    ])
    keep, exclude = alloc._preserved_ranges(())
    assert keep == [(p, 4096), (p + 4096 + 8192, 500)] and exclude == [], "no block tails, no parameter"
    assert alloc.last_preserved.bytes == 4096 + 500 and alloc.last_preserved.ranges == 2
    alloc.preserve(module.weight)  # preserve() wins: the parameter's block is kept after all
    keep, _ = alloc._preserved_ranges(())
    assert any(start <= q and q + 1000 <= start + n for start, n in keep), keep


def test_live_on_cuda_keeps_whole_allocations_the_snapshot_does_not_explain(alloc, monkeypatch):
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((1024,), torch.float32)
    _fake_cuda(alloc, monkeypatch, [])  # PyTorch lists no segment there: the core's allocation counts
    assert alloc._preserved_ranges(())[0] == [(w.data_ptr(), 4096)]

    def broken():
        raise RuntimeError("snapshot crashed")

    _fake_cuda(alloc, monkeypatch, broken)  # never fails a sleep: keeps more, never less
    assert alloc._preserved_ranges(())[0] == [(w.data_ptr(), 4096)]


# -- byte-range algebra, against a set of bytes ------------------------------------------------------

def _bytes(spans) -> set[int]:
    return {b for s, e in spans for b in range(s, e)}


def test_range_algebra_matches_sets_of_bytes():
    # Seeded random cases (no hypothesis: the GPU machines run this file too and may not have it).
    rng = random.Random(9)
    for _ in range(400):
        a, b = ([(rng.randint(0, 200), rng.randint(0, 40)) for _ in range(rng.randint(0, 12))] for _ in range(2))
        ma, mb = merge(a), merge(b)
        assert _bytes(ma) == {x for p, n in a for x in range(p, p + n)}
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(ma, ma[1:])), "sorted, disjoint, not adjacent"
        assert _bytes(subtract(ma, mb)) == _bytes(ma) - _bytes(mb), (a, b)
        assert _bytes(intersect(ma, mb)) == _bytes(ma) & _bytes(mb), (a, b)


# -- preserve() of temporaries (issue 16, item 2) ----------------------------------------------------

@pytest.mark.parametrize("mode", ["buffers", "live"])
@pytest.mark.parametrize("name_it", [
    lambda w: w.data,
    lambda w: w.detach().view(-1),
    lambda w: w.data[3:5],  # a view keeps its whole storage
], ids=["data", "view", "slice"])
def test_preserve_of_a_temporary_keeps_its_storage_while_the_storage_lives(alloc, mode, name_it):
    # Today preserve() held the object passed weakly, so a temporary was forgotten at once and its
    # bytes lost at level 2 without a word. A parameter: "live" would not keep it by itself.
    module = nn.Linear(16, 16)
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(module)
    kept = module.weight.detach().clone()
    alloc.preserve(name_it(module.weight))  # no reference to what was passed survives this line
    alloc.preserve_mode = mode
    gc.collect()
    for _ in range(2):
        level2(alloc)  # memory comes back zeroed: only the backup restores it
        assert torch.equal(module.weight.detach(), kept), "the bytes preserve() was given were lost"
    assert not module.bias.detach().any(), "a parameter nobody preserved is discarded (woken zeroed here)"


def test_preserve_forgets_a_storage_once_it_dies(alloc):
    alloc.preserve_mode = "buffers"
    awake = pool_tensor(alloc, "weights")  # noqa: F841 - keeps a weights allocation to sleep
    t = pool_tensor(alloc, "weights")
    alloc.preserve(t.view(-1), t[8:])
    level2(alloc)
    assert torch.equal(t, reference()), "preserve() of views kept while their storage lives"
    assert alloc.last_preserved.bytes == t.nbytes
    del t
    gc.collect()
    after = pool_tensor(alloc, "weights")  # may take the dead storage's addresses
    level2(alloc)
    assert alloc.last_preserved.bytes == 0, "no range of a dead storage is kept"
    assert not after.any()


def test_preserve_set_holds_dead_storages_no_longer():
    pset = PreserveSet()
    t = torch.arange(8.0)
    pset.add(t.view(-1), t[2:])
    assert pset.ranges() == storage_ranges(t) and len(pset) == 1, "one storage, whatever names it"
    del t
    assert pset.ranges() == [] and len(pset) == 0
    for _ in range(1000):
        pset.add(torch.empty(4).view(2, 2))  # never swept by a sleep: add() drops the dead itself
    assert len(pset) <= 2


# -- PreserveSet under threads (issue 10, item 7) -----------------------------------------------------

def test_preserve_set_add_while_a_sleep_reads_it():
    # The old tensors() rebuilt its list after walking it and lost what add() appended meanwhile.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the window is hit
    try:
        for _ in range(3):
            keep = [torch.empty(1) for _ in range(2000)]
            pset = PreserveSet()
            errors: list[BaseException] = []
            done = threading.Event()

            def reader() -> None:
                try:
                    while not done.is_set():
                        for ptr, nbytes in pset.ranges():
                            assert ptr and nbytes > 0
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            threads = [threading.Thread(target=reader) for _ in range(2)]
            for t in threads:
                t.start()
            for t in keep:
                pset.add(t, torch.empty(1))  # the second dies at once: dead references get dropped
            done.set()
            for t in threads:
                t.join()
            assert not errors, errors
            assert set(pset.ranges()) == set(ranges_of(keep)), "every live tensor added is kept"
            assert len(pset) == 2 * len(keep), "each live tensor and its storage; nothing of the dead ones"
    finally:
        sys.setswitchinterval(switch)


# -- fill_unrestored ------------------------------------------------------------------------------------

def _core_has_fill_unrestored() -> bool:
    return hasattr(_core.Allocator("host", MiB), "fill_unrestored")


needs_fill = pytest.mark.skipif(not _core_has_fill_unrestored(),
                                reason="this build of _core.Allocator has no fill_unrestored option (issue 9)")


@needs_fill
def test_fill_unrestored_makes_unrestored_floats_nan_and_keeps_preserved_bytes(alloc):
    assert alloc.fill_unrestored is False, "off by default"
    alloc.fill_unrestored = True
    alloc.preserve_mode = "buffers"
    lost = pool_tensor(alloc, "weights")
    kept = pool_tensor(alloc, "weights")
    alloc.preserve(kept)
    level2(alloc)
    assert torch.isnan(lost).all(), "bytes nobody restored read as NaN"
    assert torch.equal(kept, reference())


@needs_fill
def test_fill_unrestored_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_SLEEP_EXT_FILL_UNRESTORED", "1")
    assert CuMemAllocator(backend="host", capacity_bytes=MiB).fill_unrestored is True


@pytest.mark.skipif(_core_has_fill_unrestored(), reason="the core has fill_unrestored")
def test_fill_unrestored_without_core_support_warns_and_stays_off(alloc, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_sleep_ext.allocator"):
        alloc.fill_unrestored = True
    assert alloc.fill_unrestored is False and "no such option" in caplog.text
