"""The Python surface of CuMemAllocator, run on the host backend (no GPU needed)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from vllm_sleep_ext import (
    CuMemAllocator,
    DeviceOutOfMemoryError,
    DriverUnavailableError,
    HostOutOfMemoryError,
)
from vllm_sleep_ext import _core

MiB = 1 << 20


class TinyRotaryModel(nn.Module):
    """A linear layer and a rotary cos/sin cache computed at init (non-persistent, as in vLLM)."""

    def __init__(self, dim: int = 32, max_pos: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat([angles.cos(), angles.sin()], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.cos_sin_cache.index_select(0, positions)


@pytest.fixture
def alloc() -> CuMemAllocator:
    return CuMemAllocator(backend="host", capacity_bytes=256 * MiB)


@pytest.fixture
def model_in_pools(alloc: CuMemAllocator):
    torch.manual_seed(0)
    model = TinyRotaryModel()
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(model)
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = alloc.empty((4, MiB // 4), torch.float32)
        kv.fill_(3.0)
    x = torch.randn(5, 32)
    positions = torch.tensor([0, 3, 7, 11, 63])
    with torch.no_grad():
        reference = model(x, positions)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return model, kv, x, positions, reference, params


def reload_parameters(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def test_get_instance_without_driver_says_no_cuda_driver() -> None:
    try:
        _core.cuda_allocator()
    except DriverUnavailableError:
        pass
    else:
        pytest.skip("a CUDA driver is present")
    with pytest.raises(RuntimeError, match="no CUDA driver found"):
        CuMemAllocator.get_instance()


def test_allocations_carry_the_tag_of_their_pool(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((1024,), torch.float32)
        with alloc.use_memory_pool(tag="kv_cache"):
            k = alloc.empty((1024,), torch.float32)
        w2 = alloc.empty((16,), torch.int64)
    d = alloc.empty((8,), torch.float32)
    tags = {data.ptr: data.tag for data in alloc.pointer_to_data.values()}
    assert tags[w.data_ptr()] == "weights"
    assert tags[k.data_ptr()] == "kv_cache"
    assert tags[w2.data_ptr()] == "weights"
    assert tags[d.data_ptr()] == CuMemAllocator.default_tag
    assert alloc.get_current_usage() == 1024 * 4 * 2 + 16 * 8 + 8 * 4


def test_level1_sleep_keeps_weights_and_frees_their_memory(alloc: CuMemAllocator, model_in_pools) -> None:
    model, kv, x, positions, reference, _ = model_in_pools
    alloc.sleep(offload_tags=("weights",))
    assert all(d.is_asleep for d in alloc.pointer_to_data.values())
    stats = alloc.stats()
    assert stats.tags["weights"].mapped_bytes == 0
    assert stats.tags["weights"].backed_up_bytes == stats.tags["weights"].asleep_bytes
    assert stats.tags["kv_cache"].backed_up_bytes == 0
    assert stats.last_sleep is not None and stats.last_sleep.bytes_copied == stats.tags["weights"].asleep_bytes
    alloc.wake_up()
    with torch.no_grad():
        assert torch.equal(model(x, positions), reference)
    assert not torch.equal(kv, torch.full_like(kv, 3.0)), "kv_cache was discarded; it must not come back"


def test_level2_keeps_rotary_cache_after_param_reload(alloc: CuMemAllocator, model_in_pools) -> None:
    model, kv, x, positions, reference, params = model_in_pools
    alloc.sleep(offload_tags=())
    stats = alloc.stats()
    buffer_bytes = model.inv_freq.nbytes + model.cos_sin_cache.nbytes
    assert stats.tags["weights"].preserved_bytes == buffer_bytes
    assert stats.host_bytes < 4 * MiB, "level 2 must keep only buffer bytes on the host"
    alloc.wake_up(["weights"])
    assert alloc.stats().tags["kv_cache"].mapped_bytes == 0, "kv_cache waits for its own wake_up"
    reload_parameters(model, params)
    alloc.wake_up(["kv_cache"])
    with torch.no_grad():
        assert torch.equal(model(x, positions), reference)


def test_level2_without_preservation_loses_buffers(alloc: CuMemAllocator, model_in_pools) -> None:
    # The seed bug: proves the test above can fail.
    model, kv, x, positions, reference, params = model_in_pools
    alloc.preserve_mode = "off"
    alloc.sleep(offload_tags=())
    alloc.wake_up(["weights"])
    reload_parameters(model, params)
    alloc.wake_up(["kv_cache"])
    with torch.no_grad():
        assert not torch.equal(model(x, positions), reference)


def test_reassigned_and_recast_buffers_are_resolved_at_sleep(alloc: CuMemAllocator) -> None:
    model = TinyRotaryModel()
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(model)
        model.inv_freq = alloc.empty((16,), torch.float64)  # reassigned after registration
        model.inv_freq.fill_(0.25)
    alloc.sleep(offload_tags=())
    alloc.wake_up()
    assert torch.equal(model.inv_freq, torch.full((16,), 0.25, dtype=torch.float64))


def test_preserve_keeps_tensors_that_are_not_buffers(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        derived = alloc.empty((256,), torch.float32)
        plain = alloc.empty((256,), torch.float32)
    derived.copy_(torch.arange(256.0))
    plain.copy_(torch.arange(256.0))
    alloc.preserve(derived)
    alloc.sleep(offload_tags=())
    alloc.wake_up()
    assert torch.equal(derived, torch.arange(256.0))
    assert not torch.equal(plain, torch.arange(256.0))


def test_live_mode_keeps_every_tensor_but_parameters(alloc: CuMemAllocator, model_in_pools) -> None:
    model, kv, *_ = model_in_pools
    with alloc.use_memory_pool(tag="weights"):
        derived = alloc.empty((64,), torch.float32)
    derived.copy_(torch.arange(64.0))
    alloc.preserve_mode = "live"
    alloc.sleep(offload_tags=())
    assert alloc.stats().tags["weights"].preserved_bytes == (
        derived.nbytes + model.inv_freq.nbytes + model.cos_sin_cache.nbytes
    )
    alloc.wake_up()
    assert torch.equal(derived, torch.arange(64.0))


def test_slab_bytes_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CuMemAllocator(backend="host")._core.slab_bytes == 64 * MiB
    monkeypatch.setenv("VLLM_SLEEP_EXT_SLAB_BYTES", "0")
    assert CuMemAllocator(backend="host")._core.slab_bytes == 0


def test_preserve_mode_rejects_unknown_modes(alloc: CuMemAllocator) -> None:
    with pytest.raises(ValueError, match="preserve_mode must be one of"):
        alloc.preserve_mode = "everything"


def test_wake_up_of_one_tag_also_wakes_tags_vllm_never_defers(alloc: CuMemAllocator) -> None:
    tensors = []
    for tag in ("weights", "kv_cache", "runtime", "workspace"):
        with alloc.use_memory_pool(tag=tag):
            tensors.append(alloc.empty((16,), torch.float32))
    alloc.sleep(offload_tags=())
    alloc.wake_up(["weights"])
    asleep = {d.tag for d in alloc.pointer_to_data.values() if d.is_asleep}
    assert asleep == {"kv_cache"}


def test_sleep_and_wake_twice_are_no_ops(alloc: CuMemAllocator, model_in_pools) -> None:
    model, kv, x, positions, reference, _ = model_in_pools
    alloc.sleep(offload_tags="weights")
    alloc.sleep(offload_tags="weights")
    alloc.wake_up()
    alloc.wake_up()
    with torch.no_grad():
        assert torch.equal(model(x, positions), reference)


def test_discard_drops_even_preserved_bytes(alloc: CuMemAllocator, model_in_pools) -> None:
    model, *_ = model_in_pools
    alloc.discard("weights")
    assert alloc.stats().tags["weights"].backed_up_bytes == 0
    assert all(d.is_asleep for d in alloc.pointer_to_data.values() if d.tag == "weights")
    alloc.wake_up()


def test_tensor_freed_while_asleep_releases_its_allocation(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        t = alloc.empty((MiB,), torch.uint8)
    ptr = t.data_ptr()
    alloc.sleep(offload_tags=("weights",))
    del t
    gc.collect()
    assert ptr not in alloc.pointer_to_data
    alloc.wake_up()
    assert alloc.get_current_usage() == 0


@pytest.mark.parametrize(
    "bad, error",
    [(("weight",), ValueError), ([1], TypeError), (42, TypeError), ((None,), TypeError)],
)
def test_bad_tags_are_rejected_with_the_reason(alloc: CuMemAllocator, bad, error) -> None:
    with pytest.raises(error, match="tag"):
        alloc.sleep(offload_tags=bad)
    with pytest.raises(error, match="tag"):
        alloc.wake_up(bad)


def test_wake_without_room_names_tag_and_bytes_and_can_be_retried() -> None:
    alloc = CuMemAllocator(backend="host", capacity_bytes=16 * MiB)
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((8 * MiB,), torch.uint8)
    w.copy_(torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8))
    expected = w.clone()
    alloc.sleep(offload_tags=("weights",))
    with alloc.use_memory_pool(tag="other"):
        hog = alloc.empty((12 * MiB,), torch.uint8)
    with pytest.raises(DeviceOutOfMemoryError, match=r"cannot wake tag 'weights'.*needs 8\.00 MiB.*free"):
        alloc.wake_up(["weights"])
    assert all(d.is_asleep for d in alloc.pointer_to_data.values() if d.tag == "weights")
    del hog
    gc.collect()
    alloc.wake_up(["weights"])
    assert torch.equal(w, expected)


def test_sleep_beyond_host_limit_fails_before_releasing_anything(alloc: CuMemAllocator) -> None:
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((8 * MiB,), torch.uint8)
    w.fill_(7)
    alloc.host_memory_limit = 4 * MiB
    with pytest.raises(HostOutOfMemoryError, match="host memory"):
        alloc.sleep(offload_tags=("weights",))
    assert not any(d.is_asleep for d in alloc.pointer_to_data.values())
    assert int(w.sum()) == 7 * 8 * MiB
    alloc.host_memory_limit = 0
    alloc.sleep(offload_tags=("weights",))
    alloc.wake_up()
    assert int(w.sum()) == 7 * 8 * MiB


def test_host_backups_are_reused_or_returned_as_configured(alloc: CuMemAllocator, model_in_pools) -> None:
    alloc.sleep(offload_tags=("weights",))
    held = alloc.stats().host_bytes
    alloc.wake_up()
    assert alloc.stats().host_bytes == held, "kept for the next sleep"
    alloc.sleep(offload_tags=("weights",))
    assert alloc.stats().host_bytes == held, "the kept memory is reused, not added to"
    alloc.wake_up()
    alloc.keep_host_backups = False
    assert alloc.stats().host_bytes == 0
    alloc.sleep(offload_tags=("weights",))
    alloc.wake_up()
    assert alloc.stats().host_bytes == 0


def test_host_backend_helpers_refuse_cuda_only_calls(alloc: CuMemAllocator) -> None:
    with pytest.raises(RuntimeError, match="CUDA backend"):
        with alloc.cudagraph_pool():
            pass
