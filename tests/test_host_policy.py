"""Host policies ("pinned", "reclaimable", "release") and host memory prepared before the first sleep,
through the core's host backend (no GPU). The host backend pins nothing for real, but the arenas keep
their registrations all the same, so `host_pinned_bytes()` tells what would be pinned on CUDA."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from core_helpers import MiB, filled, lazyfree, load_core, pattern, read, write

core = load_core()
BACKEND = "host"


@pytest.fixture(autouse=True, params=["host", "host-async"])
def _backend(request, monkeypatch):
    """Every test on both host backends: copies done at once, and done later on another thread."""
    monkeypatch.setattr(sys.modules[__name__], "BACKEND", request.param)


def make(policy: str = "pinned"):
    a = core.Allocator(BACKEND, capacity_bytes=256 * MiB)
    a.staging_piece_bytes = 2 * MiB
    a.staging_threads = 2
    a.host_policy = policy
    return a


def test_host_policy_names_and_keep_host_backups_alias():
    a = make()
    assert a.host_policy == "pinned" and a.keep_host_backups is True
    a.keep_host_backups = False
    assert a.host_policy == "release"
    a.keep_host_backups = True
    assert a.host_policy == "pinned"
    a.host_policy = "reclaimable"
    assert a.keep_host_backups is True and a.host_policy == "reclaimable"
    a.host_policy = "release"
    assert a.keep_host_backups is False
    with pytest.raises(ValueError, match="host policy"):
        a.host_policy = "sometimes"


@pytest.mark.parametrize("policy, kept, pinned_awake", [("pinned", True, True), ("reclaimable", True, False),
                                                        ("release", False, False)])
def test_each_host_policy_keeps_what_it_says_while_awake(policy, kept, pinned_awake):
    a = make(policy)
    p, data = filled(a, 6 * MiB + 123, "weights", 1)
    a.sleep(["weights"])
    held = a.host_bytes()
    assert a.host_pinned_bytes() >= 6 * MiB  # pinned while asleep, whatever the policy
    a.wake(None)
    a.wait_host()
    assert read(p, 6 * MiB + 123) == data
    assert a.host_bytes() == (held if kept else 0)
    assert (a.host_pinned_bytes() > 0) == pinned_awake


def test_reclaimable_backups_survive_when_the_kernel_took_every_page():
    a = make("reclaimable")
    p, _ = filled(a, 10 * MiB, "weights", 1)
    q, kept = filled(a, 4 * MiB, "other", 2)
    a.sleep(["weights", "other"])
    held = a.host_bytes()
    a.wake(None)
    for cycle in range(4):
        data = pattern(10 * MiB, 100 + cycle)
        write(p, data)
        a.wait_host()
        assert a.host_pinned_bytes() == 0
        lazy = lazyfree()
        a._simulate_host_reclaim()  # the kernel reclaims the kept arena: its MADV_FREE'd pages are dropped
        if lazy is not None:
            assert lazy - lazyfree() >= 12 * MiB  # (of 14 MiB) they were lazily freed, and now they are gone
        a.sleep(["weights", "other"])
        assert a.host_bytes() == held  # the same arena, pinned again
        a._simulate_host_reclaim()  # touches only arenas no backup uses: the backups stay
        a.wake(None)
        assert read(p, 10 * MiB) == data
        assert read(q, 4 * MiB) == kept


def test_reclaimable_never_unpins_a_backup_in_use():
    a = make("reclaimable")
    p, data = filled(a, 6 * MiB, "weights", 1)
    other = a.malloc(2 * MiB, tag="kv_cache")
    for _ in range(2):  # the second time round, the arena kept from the first is reused
        a.sleep(["weights"])
        a.free(other)  # recycles arenas while the backup is still needed
        other = a.malloc(2 * MiB, tag="kv_cache")
        a.wait_host()
        assert a.host_pinned_bytes() >= 6 * MiB
        a._simulate_host_reclaim()
        a.wake(None)
        assert read(p, 6 * MiB) == data


@pytest.mark.parametrize("backup_mib, prepared_mib", [(12, 12), (8, 32)])
def test_first_sleep_after_prepare_host_stages_nothing(backup_mib, prepared_mib):
    """The prepared arena serves the first sleep, also a smaller backup than it was prepared for."""
    a = make("pinned")
    p, data = filled(a, backup_mib * MiB, "weights", 3)
    a.prepare_host(prepared_mib * MiB, 0, True)
    assert a.host_error() == ""
    prepared = a.host_bytes()
    assert prepared_mib * MiB <= prepared <= prepared_mib * MiB * 1.01
    assert a.host_pinned_bytes() >= prepared_mib * MiB
    a.sleep(["weights"])
    s = a.last_sleep
    assert s.populate_seconds == 0 and s.pin_seconds == 0  # found ready
    assert a.host_bytes() == prepared  # and no second arena
    a.wake(None)
    assert read(p, backup_mib * MiB) == data


def test_background_prepare_is_taken_over_by_a_sleep_that_comes_early():
    a = make("pinned")
    a.host_prepare_rate = 4 * MiB  # bytes per second: far too slow to finish before the sleep
    p, data = filled(a, 16 * MiB, "weights", 4)
    a.prepare_host(16 * MiB, 0, False)
    a.sleep(["weights"])  # cancels the background work and prepares the rest itself
    assert a.host_bytes() <= 16 * MiB * 1.01
    a.wake(None)
    assert read(p, 16 * MiB) == data
    assert a.host_error() == ""


def test_prepared_memory_too_small_for_the_backup_is_not_kept_twice():
    a = make("pinned")
    p, data = filled(a, 8 * MiB, "weights", 5)
    a.prepare_host(2 * MiB, 0, True)
    a.sleep(["weights"])
    assert a.host_bytes() <= 8 * MiB * 1.01  # the 2 MiB arena could not hold it and was dropped
    a.wake(None)
    assert read(p, 8 * MiB) == data


def test_reclaimable_keeps_the_pinned_share_and_the_kernel_takes_only_the_rest():
    a = make("reclaimable")
    a.reclaimable_pinned_share = 0.5
    p, data = filled(a, 8 * MiB, "weights", 7)
    a.sleep(["weights"])
    a.wake(None)
    a.wait_host()
    assert 3 * MiB <= a.host_pinned_bytes() <= 4 * MiB + 4096, "about half of the kept arena stays pinned"
    a._simulate_host_reclaim()  # memory pressure: only the unpinned half is taken
    for _ in range(2):  # a sleep after the reclaim, and a warm one
        a.sleep(["weights"])
        a.wake(None)
        a.wait_host()
        assert read(p, 8 * MiB) == data
    with pytest.raises(ValueError, match="between 0 and 1"):
        a.reclaimable_pinned_share = 1.5


def test_prepare_beyond_the_host_memory_limit_is_reported_not_raised_in_the_background():
    a = make("pinned")
    a.host_memory_limit = 4 * MiB
    a.prepare_host(8 * MiB, 0, False)
    assert "limit" in a.host_error()
    assert a.host_bytes() == 0
    with pytest.raises(core.HostOutOfMemoryError):
        a.prepare_host(8 * MiB, 0, True)


def test_destroying_the_allocator_during_a_background_prepare_is_clean():
    for _ in range(5):
        a = make("reclaimable")
        a.host_prepare_rate = 1 * MiB
        a.prepare_host(64 * MiB, 0, False)
        del a  # cancels and joins the host thread; nothing left behind


def test_calls_from_several_threads_while_host_work_runs_in_the_background():
    a = make("reclaimable")
    a.host_prepare_rate = 64 * MiB
    ptrs = [filled(a, 3 * MiB, "weights", 10 + i) for i in range(4)]
    errors = []

    def cycle():
        try:
            for _ in range(5):
                a.sleep(["weights"])
                a.wake(None)
                a.prepare_host(12 * MiB, 0, False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=cycle) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p, data in ptrs:
        assert read(p, 3 * MiB) == data


@pytest.mark.parametrize("piece", [0, 1, MiB, 2 * MiB - 1])
def test_staging_piece_bytes_below_a_huge_page_is_refused_naming_the_option(piece):
    """Such pieces were accepted, and a background prepare then spun forever pinning nothing."""
    a = make()
    with pytest.raises(ValueError, match=r"staging_piece_bytes must be between 2\.00 MiB .* and 1024\.00 GiB"):
        a.staging_piece_bytes = piece
    assert a.staging_piece_bytes == 2 * MiB


@pytest.mark.parametrize("policy", ["pinned", "reclaimable"])
def test_preparing_again_after_a_cycle_reuses_the_idle_arena(policy):
    """A second preparation pinned a second arena beside the idle one: twice the host memory."""
    a = make(policy)
    p, data = filled(a, 16 * MiB, "weights", 8)
    a.sleep(["weights"])
    a.wake(None)
    a.wait_host()
    held = a.host_bytes()
    a.prepare_host(16 * MiB, 0, True)
    assert a.host_bytes() == held
    assert 16 * MiB <= a.host_pinned_bytes() <= held
    a.prepare_host(16 * MiB, 0, False)
    a.wait_host()
    assert a.host_bytes() == held and a.host_error() == ""
    a.sleep(["weights"])
    assert a.last_sleep.pin_seconds == 0 and a.host_bytes() == held
    a.wake(None)
    assert read(p, 16 * MiB) == data


def _wait_for_child(pid: int, seconds: float) -> int:
    """The child's wait status; a child still running after `seconds` is killed (and says so)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_forked_child_sleeps_and_wakes_with_a_cache_of_its_own_while_the_parent_prepares():
    """A child forked while the host-memory thread had a job hung in its first sleep; it must also never
    use the parent's arenas, which are not in the child at all (MADV_DONTFORK)."""
    if BACKEND == "host-async":
        pytest.skip("the asynchronous host backend's copy thread does not survive a fork")
    a = make("pinned")
    p, data = filled(a, 8 * MiB, "weights", 9)
    a.sleep(["weights"])
    a.wake(None)  # an idle arena, kept
    a.host_prepare_rate = 4 * MiB
    a.prepare_host(32 * MiB, 0, False)  # 8 s at this rate: running when the fork comes
    time.sleep(0.1)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            signal.alarm(20)
            assert a.host_bytes() == 0 and a.host_pinned_bytes() == 0
            a.sleep(["weights"])
            assert 8 * MiB <= a.host_bytes() <= 8 * MiB * 1.01  # an arena of its own, only
            a.wake(None)
            assert read(p, 8 * MiB) == data
            a.prepare_host(8 * MiB, 0, True)  # its host-memory thread works
            assert a.host_error() == ""
            code = 0
        finally:
            os._exit(code)
    status = _wait_for_child(pid, 30)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child wait status {status}"
    a.sleep(["weights"])  # the parent goes on as before
    a.wake(None)
    assert read(p, 8 * MiB) == data


# ---- the Python surface ---------------------------------------------------------------------------

def test_cumem_allocator_host_policy_follows_its_environment_variable(monkeypatch):
    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.setenv("VLLM_SLEEP_EXT_HOST_POLICY", "reclaimable")
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    assert alloc.host_policy == "reclaimable" and alloc.keep_host_backups is True
    alloc.keep_host_backups = False
    assert alloc.host_policy == "release"
    with pytest.raises(ValueError):
        alloc.host_policy = "never"


def test_leaving_the_weights_pool_prepares_host_memory_for_the_first_sleep(monkeypatch):
    import torch

    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.setenv("VLLM_SLEEP_EXT_PREPARE_HOST", "1")
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    assert alloc.prepare_host is True
    with alloc.use_memory_pool("weights"):
        w = alloc.empty((4 << 20,), torch.float32)  # 16 MiB
        w.copy_(torch.arange(4 << 20, dtype=torch.float32))
    alloc._core.wait_host()
    assert alloc._core.host_pinned_bytes() >= 16 * MiB
    alloc.sleep(offload_tags=("weights",))
    s = alloc.stats().last_sleep
    assert s.populate_seconds == 0 and s.pin_seconds == 0
    alloc.wake_up()
    assert torch.equal(w, torch.arange(4 << 20, dtype=torch.float32))


def test_prepare_host_backups_is_off_by_default_on_the_host_backend_and_blocking_when_asked(monkeypatch):
    import torch

    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.delenv("VLLM_SLEEP_EXT_PREPARE_HOST", raising=False)
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    assert alloc.prepare_host is False
    with alloc.use_memory_pool("weights"):
        w = alloc.empty((1 << 20,), torch.float32)
    assert alloc.stats().host_bytes == 0
    alloc.prepare_host_backups()
    assert alloc._core.host_pinned_bytes() >= w.nbytes == 4 * MiB


def test_the_active_line_names_the_host_policy(monkeypatch):
    from vllm_sleep_ext import allocator as allocator_module
    from vllm_sleep_ext import envs

    monkeypatch.setenv(envs.HOST_POLICY.name, "reclaimable")
    alloc = allocator_module.CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    assert f"{envs.HOST_POLICY.name}=reclaimable" in allocator_module.describe(alloc)
    assert "unpinned" in allocator_module.describe(None)


def test_leaving_the_weights_pool_again_or_preparing_after_a_cycle_keeps_one_arena(monkeypatch):
    """64 MiB of weights ended with 128 MiB of pinned host memory: a second arena beside the idle one."""
    import torch

    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.setenv("VLLM_SLEEP_EXT_PREPARE_HOST", "1")
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    with alloc.use_memory_pool("weights"):
        w = alloc.empty((4 << 20,), torch.float32)  # 16 MiB
        w.copy_(torch.arange(4 << 20, dtype=torch.float32))
    alloc._core.wait_host()
    held = alloc.stats().host_bytes
    assert 16 * MiB <= held <= 16 * MiB * 1.01
    with alloc.use_memory_pool("weights"):
        pass  # leaving it again prepares again
    alloc._core.wait_host()
    assert alloc.stats().host_bytes == held
    alloc.sleep(offload_tags=("weights",))
    alloc.wake_up()
    alloc.prepare_host_backups()
    assert alloc.stats().host_bytes == held
    assert alloc._core.host_pinned_bytes() <= held
    assert torch.equal(w, torch.arange(4 << 20, dtype=torch.float32))


def test_first_level1_sleep_of_weights_runtime_and_cudagraph_finds_one_arena_ready(monkeypatch):
    """vLLM 0.33's level 1 backs up "runtime" and "cudagraph" beside "weights": the preparation made on
    leaving the weights pool was too small, and the first sleep populated and pinned a second arena."""
    import torch

    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.setenv("VLLM_SLEEP_EXT_PREPARE_HOST", "1")
    alloc = CuMemAllocator(backend="host", capacity_bytes=256 * MiB)  # a slab of its own for each tag
    alloc._core.staging_piece_bytes = 2 * MiB
    tensors = []
    for tag, mib in (("weights", 16), ("runtime", 4), ("cudagraph", 2)):
        with alloc.use_memory_pool(tag):
            t = alloc.empty((mib * MiB // 4,), torch.float32)
            t.copy_(torch.arange(t.numel(), dtype=torch.float32) * len(tensors))
            tensors.append(t)
    alloc._core.wait_host()
    assert alloc._core.host_error() == ""
    expected = [t.clone() for t in tensors]
    alloc.sleep(offload_tags=("weights", "runtime", "cudagraph"))
    stats = alloc.stats()
    s = stats.last_sleep
    assert s.bytes_copied == 22 * MiB
    assert (s.populate_seconds, s.pin_seconds) == (0, 0), "no host memory was made ready during the sleep"
    assert 22 * MiB <= stats.host_bytes <= 22 * MiB * 1.01, "one arena of the backup's size, not two"
    alloc.wake_up()
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))


def test_preparation_restarted_for_a_later_pool_grows_the_same_arena_and_keeps_its_ready_part(monkeypatch):
    import torch

    from vllm_sleep_ext.allocator import CuMemAllocator

    monkeypatch.setenv("VLLM_SLEEP_EXT_PREPARE_HOST", "1")
    alloc = CuMemAllocator(backend="host", capacity_bytes=256 * MiB)  # a slab of its own for each tag
    alloc._core.staging_piece_bytes = 2 * MiB
    alloc._core.host_prepare_rate = 8 * MiB  # 2 s for the weights: still under way when the runtime pool comes
    with alloc.use_memory_pool("weights"):
        w = alloc.empty((4 * MiB,), torch.float32)  # 16 MiB
    time.sleep(0.3)
    with alloc.use_memory_pool("runtime"):
        r = alloc.empty((MiB,), torch.float32)  # 4 MiB
    alloc._core.host_prepare_rate = 0  # as fast as it goes from here
    alloc.prepare_host_backups()
    assert alloc._core.host_error() == ""
    held = alloc.stats().host_bytes
    assert 20 * MiB <= held <= 20 * MiB * 1.01, "one arena, grown"
    assert alloc._core.host_pinned_bytes() <= held
    alloc.sleep(offload_tags=("weights", "runtime", "cudagraph"))
    s = alloc.stats().last_sleep
    assert (s.populate_seconds, s.pin_seconds) == (0, 0) and alloc.stats().host_bytes == held
    alloc.wake_up()
    del w, r
