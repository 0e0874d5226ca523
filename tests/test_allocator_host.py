"""The Python surface of CuMemAllocator, run on the host backend (no GPU needed)."""

from __future__ import annotations

import gc
import threading

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
    alloc.preserve_mode = "buffers"  # "live" (the default) would keep `plain` too
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



def test_tensor_freed_while_awake_is_held_until_the_next_sleep_or_wake(alloc: CuMemAllocator) -> None:
    for settle in (alloc.wake_up, alloc.sleep):
        with alloc.use_memory_pool(tag="weights"):
            t = alloc.empty((MiB,), torch.uint8)
        del t
        gc.collect()
        assert alloc.stats().quarantined_bytes == 2 * MiB, "kernels may still use it: held, not handed out"
        settle()
        assert alloc.stats().quarantined_bytes == 0, f"{settle.__name__} settles what was freed"
    alloc.wake_up()


@pytest.mark.parametrize(
    "bad, error",
    [(("weight",), ValueError), ([1], TypeError), (42, TypeError), ((None,), TypeError)],
)
def test_bad_tags_are_rejected_with_the_reason(alloc: CuMemAllocator, bad, error) -> None:
    with pytest.raises(error, match="tag"):
        alloc.sleep(offload_tags=bad)
    with pytest.raises(error, match="tag"):
        alloc.wake_up(bad)


def weights_asleep(alloc: CuMemAllocator) -> tuple[torch.Tensor, torch.Tensor]:
    """8 MiB of random "weights" put to sleep with a backup; the tensor and a copy of its bytes."""
    with alloc.use_memory_pool(tag="weights"):
        w = alloc.empty((8 * MiB,), torch.uint8)
    w.copy_(torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8))
    expected = w.clone()
    alloc.sleep(offload_tags=("weights",))
    return w, expected


def test_wake_without_room_names_tag_and_bytes_and_can_be_retried() -> None:
    alloc = CuMemAllocator(backend="host", capacity_bytes=16 * MiB)
    w, expected = weights_asleep(alloc)
    with alloc.use_memory_pool(tag="other"):
        hog = alloc.empty((12 * MiB,), torch.uint8)
    with pytest.raises(DeviceOutOfMemoryError, match=r"cannot wake tag 'weights'.*needs 8\.00 MiB.*free"):
        alloc.wake_up(["weights"])
    assert all(d.is_asleep for d in alloc.pointer_to_data.values() if d.tag == "weights")
    del hog
    gc.collect()
    alloc.wake_up(["weights"])
    assert torch.equal(w, expected)


def test_wake_up_waits_for_memory_another_engine_frees(caplog: pytest.LogCaptureFixture) -> None:
    # Issue 18: engine B wakes while engine A, on the same card, is going to sleep.
    engine_a = CuMemAllocator(backend="host", capacity_bytes=32 * MiB, card="two-engines")
    engine_b = CuMemAllocator(backend="host", capacity_bytes=32 * MiB, card="two-engines")
    w, expected = weights_asleep(engine_b)
    with engine_a.use_memory_pool(tag="kv_cache"):
        kv = engine_a.empty((28 * MiB,), torch.uint8)
    with pytest.raises(DeviceOutOfMemoryError, match="cannot wake tag 'weights'"):
        engine_b.wake_up(["weights"])  # the default stays today's: at once
    engine_a_sleeps = threading.Timer(0.05, lambda: engine_a.sleep(offload_tags=()))
    engine_a_sleeps.start()
    with caplog.at_level("INFO", logger="vllm_sleep_ext"):
        engine_b.wake_up(["weights"], wait_for_memory=30)
    engine_a_sleeps.join()
    assert torch.equal(w, expected)
    assert engine_b.stats().last_wake.wait_seconds > 0
    assert "s for memory" in caplog.records[-1].getMessage()
    del kv


def test_wake_wait_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SLEEP_EXT_WAKE_WAIT_S", "0.05")
    alloc = CuMemAllocator(backend="host", capacity_bytes=16 * MiB)
    assert alloc.wake_wait_seconds == 0.05
    w, _ = weights_asleep(alloc)
    with alloc.use_memory_pool(tag="other"):
        hog = alloc.empty((12 * MiB,), torch.uint8)
    with pytest.raises(DeviceOutOfMemoryError, match=r"waited \d+\.\d+ s for memory"):
        alloc.wake_up(["weights"])  # as vLLM calls it
    with pytest.raises(DeviceOutOfMemoryError) as at_once:
        alloc.wake_up(["weights"], wait_for_memory=0)
    assert "waited" not in str(at_once.value)
    with pytest.raises(ValueError, match="wake_wait_seconds"):
        alloc.wake_wait_seconds = -1
    del hog, w


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


# -- Python-side machinery that the GPU suite relies on, checked here with PyTorch's calls stubbed ------

from vllm_sleep_ext import alloc_conf, envs, pools  # noqa: E402
from vllm_sleep_ext import allocator as allocator_module  # noqa: E402


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("expandable_segments:True,max_split_size_mb:512", "expandable_segments:False,max_split_size_mb:512"),
        ("max_split_size_mb:512, expandable_segments : True", "max_split_size_mb:512, expandable_segments : False"),
        (
            "roundup_power2_divisions:[256:1,512:2,>:8],expandable_segments:True,garbage_collection_threshold:0.6",
            "roundup_power2_divisions:[256:1,512:2,>:8],expandable_segments:False,garbage_collection_threshold:0.6",
        ),
    ],
)
def test_turning_expandable_segments_off_keeps_every_other_option(settings: str, expected: str) -> None:
    assert alloc_conf.expandable_segments_enabled(settings)
    off = alloc_conf.with_expandable_segments(settings, False)
    assert off == expected
    assert not alloc_conf.expandable_segments_enabled(off)


@pytest.mark.parametrize(
    "settings",
    ["", "max_split_size_mb:512", "expandable_segments:False", "expandable_segments:True,expandable_segments:False"],
)
def test_expandable_segments_reads_as_off(settings: str) -> None:
    assert not alloc_conf.expandable_segments_enabled(settings)


def test_settings_come_from_pytorch_alloc_conf_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", None, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:512")
    assert alloc_conf.current_allocator_settings() == "expandable_segments:True,max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert alloc_conf.current_allocator_settings() == "expandable_segments:True"


def test_expandable_segments_off_writes_whole_settings_and_restores_after_the_last_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = {"settings": "expandable_segments:True,max_split_size_mb:512,garbage_collection_threshold:0.6"}
    writes: list[str] = []

    def set_settings(s: str) -> None:
        writes.append(s)
        state["settings"] = s

    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: state["settings"], raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", set_settings, raising=False)
    with alloc_conf.expandable_segments_off():
        assert state["settings"] == "expandable_segments:False,max_split_size_mb:512,garbage_collection_threshold:0.6"
        with alloc_conf.expandable_segments_off():  # a nested pool, or another thread's
            pass
        assert len(writes) == 1, "an inner user must neither write again nor restore early"
    assert state["settings"] == "expandable_segments:True,max_split_size_mb:512,garbage_collection_threshold:0.6"
    assert len(writes) == 2
    state["settings"] = "max_split_size_mb:512"
    with alloc_conf.expandable_segments_off():
        pass
    assert len(writes) == 2, "settings without expandable segments are left alone"


def test_nested_pool_takes_the_outer_pool_out_of_routing_and_puts_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    for name in ("_cuda_endAllocateToPool", "_cuda_beginAllocateCurrentThreadToPool", "_cuda_releasePool"):
        monkeypatch.setattr(torch._C, name, lambda device, pool_id, name=name: calls.append((name, device, pool_id)),
                            raising=False)

    class Pool:
        def __init__(self, pool_id: tuple[int, int]) -> None:
            self.id = pool_id

    Route = pools.Route
    with pools.sole_route(Route(Pool((0, 1)), 0)):
        assert calls == [], "a pool with no pool of ours around it changes nothing"
        with pools.sole_route(Route(Pool((0, 2)), 0)):
            assert calls == [("_cuda_endAllocateToPool", 0, (0, 1))]
            with pools.sole_route(Route(None, 0)):  # the CUDA graph pool inside
                assert len(calls) == 2 and calls[1] == ("_cuda_endAllocateToPool", 0, (0, 2))
            assert calls[2:] == [("_cuda_beginAllocateCurrentThreadToPool", 0, (0, 2)),
                                 ("_cuda_releasePool", 0, (0, 2))]
        assert calls[4:] == [("_cuda_beginAllocateCurrentThreadToPool", 0, (0, 1)), ("_cuda_releasePool", 0, (0, 1))]
    assert len(calls) == 6 and pools.thread_routes() == []


def test_get_instance_makes_one_allocator_for_racing_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[CuMemAllocator] = []
    real_init = CuMemAllocator.__init__
    barrier = threading.Barrier(8)

    def slow_init(self: CuMemAllocator, backend: str = "cuda", capacity_bytes: int = 0) -> None:
        made.append(self)
        real_init(self, backend="host", capacity_bytes=MiB)

    monkeypatch.setattr(CuMemAllocator, "instance", None)
    monkeypatch.setattr(CuMemAllocator, "__init__", slow_init)
    monkeypatch.setattr(allocator_module.atexit, "register", lambda fn: fn)
    got: list[CuMemAllocator] = []

    def ask() -> None:
        barrier.wait()
        got.append(CuMemAllocator.get_instance())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got) and len(got) == 8


@pytest.mark.parametrize(("value", "keep"), [(None, True), ("1", True), ("0", False), ("false", False)])
def test_host_memory_policy_follows_keep_host_env(monkeypatch: pytest.MonkeyPatch, value, keep: bool) -> None:
    if value is None:
        monkeypatch.delenv(envs.KEEP_HOST.name, raising=False)
    else:
        monkeypatch.setenv(envs.KEEP_HOST.name, value)
    alloc = CuMemAllocator(backend="host", capacity_bytes=MiB)
    assert alloc.keep_host_backups is keep
    assert f"{envs.KEEP_HOST.name}={int(keep)}" in allocator_module.describe(alloc)
