"""The Python face of the C++ core (`vllm_sleep_ext._core`), on its Linux host backend: no GPU, no torch.

What only Python can see is tested here: argument conversion, the exception types errors become, the
views and option properties, the GIL while the core works, and real host-memory exhaustion in a child
interpreter. The semantics of the table (states, ranges, backups, faults, threads, copy ordering) are
tested once, in C++ (tests/cpp/core_tests.cpp, also under ASan/UBSan/TSan), and the random sequences of
calls against a model in test_state_machine.py.

"Device memory" is host memory (memfd mappings at reserved addresses): it is read and written with ctypes
at the addresses the core returns.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from core_helpers import (
    MiB,
    core_path,
    load_core,
    pattern,
    read,
    write,
)

core = load_core()

CAPACITY = 256 * MiB

def make(capacity: int = CAPACITY, *, piece_bytes: int = 2 * MiB, threads: int = 2):
    """A fresh allocator over the host backend. Small staging pieces, so that backups of a few MiB
    are staged in several pieces on several threads (the path big backups take)."""
    a = core.Allocator("host", capacity_bytes=capacity)
    a.staging_piece_bytes = piece_bytes
    a.staging_threads = threads
    return a


def info(a, ptr):
    for x in a.allocations():
        if x.ptr == ptr:
            return x
    raise AssertionError(f"no allocation at {ptr:#x}")


def states(a) -> dict[int, str]:
    return {x.ptr: x.state for x in a.allocations()}


def snapshot(a) -> list[tuple]:
    """Everything observable about the table, to check that a failed call changed nothing."""
    return sorted((x.ptr, x.size, x.device, x.tag, x.state, x.backup_bytes, x.preserved_bytes)
                  for x in a.allocations())


def stats_tuple(a) -> dict[str, tuple]:
    return {tag: (s.allocations, s.mapped_bytes, s.asleep_bytes, s.backed_up_bytes, s.preserved_bytes)
            for tag, s in a.tag_stats().items()}


def filled(a, size: int, tag: str, seed: int) -> tuple[int, bytes]:
    ptr = a.malloc(size, tag=tag)
    data = pattern(size, seed)
    write(ptr, data)
    return ptr, data


# ---- tags and states ------------------------------------------------------------------------------

def test_malloc_returns_a_mapped_allocation_of_its_tag():
    a = make()
    p = a.malloc(100, tag="weights")
    q = a.malloc(3 * MiB, device=0)
    x = info(a, p)
    assert (x.ptr, x.size, x.device, x.tag, x.state) == (p, 100, 0, "weights", "mapped")
    assert (x.backup_bytes, x.preserved_bytes) == (0, 0)
    assert info(a, q).tag == "default"
    write(p, b"hello")
    assert read(p, 5) == b"hello"
    assert a.backend == "host"


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -1, -(1 << 40)])
def test_malloc_of_a_non_positive_size_is_a_value_error(size):
    a = make()
    with pytest.raises(ValueError):
        a.malloc(size)
    assert a.allocations() == []


def test_bad_malloc_arguments_are_value_errors():
    a = make()
    with pytest.raises(ValueError):
        a.malloc(10, tag="")
    with pytest.raises(ValueError):
        a.malloc(10, device=1)  # the host backend has one device
    with pytest.raises(ValueError):
        core.Allocator("no-such-backend")
    assert a.allocations() == []


def test_free_of_an_unknown_pointer_is_a_value_error():
    a = make()
    p = a.malloc(10)
    with pytest.raises(ValueError, match="did not allocate"):
        a.free(p + 1)
    with pytest.raises(ValueError):
        a.free(0)
    a.free(p)
    with pytest.raises(ValueError):
        a.free(p)  # double free
    other = make()
    q = other.malloc(10)
    with pytest.raises(ValueError):
        a.free(q)  # another allocator's pointer
    assert [x.ptr for x in other.allocations()] == [q]


# ---- faults: device full at wake ------------------------------------------------------------------

def test_wake_without_room_raises_names_tag_and_bytes_and_keeps_everything():
    a = make(capacity=8 * MiB)
    w, w_data = filled(a, 4 * MiB, "weights", 1)
    kv, kv_data = filled(a, 2 * MiB, "kv_cache", 2)
    a.sleep(["weights"], preserve=[(kv, 1000)])
    hog = a.malloc(6 * MiB, tag="trainer")  # made while asleep: 2 MiB left
    before, stats_before, host_before = snapshot(a), stats_tuple(a), a.host_bytes()
    last_wake_before = a.last_wake

    with pytest.raises(core.DeviceOutOfMemoryError) as excinfo:
        a.wake(None)
    message = str(excinfo.value)
    assert "'weights'" in message and "'kv_cache'" in message
    assert "6291456 bytes" in message  # needed: 4 MiB + 2 MiB
    assert "2097152 bytes" in message  # free
    assert isinstance(excinfo.value, core.SleepExtError) and isinstance(excinfo.value, RuntimeError)
    assert snapshot(a) == before
    assert stats_tuple(a) == stats_before
    assert a.host_bytes() == host_before
    assert a.last_wake is last_wake_before is None

    with pytest.raises(core.DeviceOutOfMemoryError, match="'weights'"):
        a.wake(["weights"])  # the same, for the tag alone
    assert snapshot(a) == before

    a.free(hog)
    stats = a.wake(None)  # the same wake succeeds once memory is free
    assert stats.allocations == 2
    assert read(w, 4 * MiB) == w_data
    assert read(kv, 1000) == kv_data[:1000]


# ---- a wake that waits for memory another process frees (issue 18) ---------------------------------
# Two allocators on one simulated card stand for two processes on one GPU. The order of maps and
# copies, the undo at the deadline and the async backend are tested in C++ (tests/cpp/slab_tests.cpp).

def test_allocators_on_one_card_share_its_capacity():
    a = core.Allocator("host", capacity_bytes=8 * MiB, card="shared-capacity")
    b = core.Allocator("host", capacity_bytes=8 * MiB, card="shared-capacity")
    p = a.malloc(6 * MiB, tag="kv_cache")
    assert b._device_free_bytes() == 2 * MiB
    with pytest.raises(core.DeviceOutOfMemoryError):
        b.malloc(4 * MiB, tag="weights")
    a.free(p)
    a.settle()
    b.malloc(4 * MiB, tag="weights")


@pytest.mark.parametrize("backend, capacity, card, why", [
    ("host", 16 * MiB, "shared-capacity-mismatch", "has 8.00 MiB"),  # the card exists with 8 MiB
    ("host", 0, "no-capacity", "needs a capacity"),
    ("cuda", 0, "any", "host backends only"),
])
def test_a_card_is_refused_where_it_cannot_be_shared(backend, capacity, card, why):
    first = core.Allocator("host", capacity_bytes=8 * MiB, card="shared-capacity-mismatch")
    with pytest.raises(ValueError, match=why):
        core.Allocator(backend, capacity_bytes=capacity, card=card)
    del first


def test_wake_waits_until_another_allocator_on_the_card_sleeps():
    a = core.Allocator("host", capacity_bytes=16 * MiB, card="swap")
    b = core.Allocator("host", capacity_bytes=16 * MiB, card="swap")
    w, w_data = filled(b, 8 * MiB, "weights", 3)
    b.sleep(["weights"])
    a_w, a_data = filled(a, 4 * MiB, "weights", 4)
    a.malloc(8 * MiB, tag="kv_cache")  # 12 MiB held: b's 8 MiB do not fit
    with pytest.raises(core.DeviceOutOfMemoryError) as excinfo:
        b.wake(None)  # the default: no wait
    assert "waited" not in str(excinfo.value)

    other_process = threading.Timer(0.05, lambda: a.sleep(["weights"]))
    other_process.start()
    stats = b.wake(None, wait_seconds=30)
    other_process.join()
    assert stats.wait_seconds > 0 and b.last_wake.wait_seconds == stats.wait_seconds
    assert read(w, 8 * MiB) == w_data
    b.sleep(["weights"])
    a.wake(None)
    assert read(a_w, 4 * MiB) == a_data


def test_wake_past_its_wait_raises_says_so_and_keeps_everything():
    a = make(capacity=8 * MiB)
    filled(a, 4 * MiB, "weights", 1)
    a.sleep(["weights"])
    hog = a.malloc(6 * MiB, tag="trainer")
    before = snapshot(a)
    start = time.monotonic()
    with pytest.raises(core.DeviceOutOfMemoryError, match=r"'weights'.*Nothing was changed.*waited \d+\.\d+ s"):
        a.wake(None, wait_seconds=0.05)
    assert time.monotonic() - start >= 0.05
    assert snapshot(a) == before and a.last_wake is None
    a.free(hog)
    assert a.wake(None).wait_seconds == 0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 1e9])
def test_wake_wait_out_of_range_is_a_value_error(bad):
    a = make()
    filled(a, MiB, "weights", 1)
    a.sleep(["weights"])
    before = snapshot(a)
    with pytest.raises(ValueError, match="wait for memory"):
        a.wake(None, wait_seconds=bad)
    assert snapshot(a) == before


def test_malloc_without_room_raises_and_names_the_tag():
    a = make(capacity=4 * MiB)
    a.malloc(3 * MiB, tag="weights")
    with pytest.raises(core.DeviceOutOfMemoryError, match="'kv_cache'"):
        a.malloc(1, tag="kv_cache")
    assert len(a.allocations()) == 1



def test_memory_freed_while_mapped_is_held_until_settled_and_malloc_settles_only_when_allowed():
    a = make(capacity=4 * MiB)
    a.free(a.malloc(4 * MiB, tag="weights"))
    assert a.quarantined_bytes() == 4 * MiB  # the device may still be using it
    assert a._device_free_bytes() == 0
    with pytest.raises(core.DeviceOutOfMemoryError, match="'kv_cache'"):
        a.malloc(MiB, tag="kv_cache", may_synchronize=False)  # e.g. while its stream captures a graph
    assert a.quarantined_bytes() == 4 * MiB
    a.malloc(MiB, tag="kv_cache")  # may synchronize: settles, then fits
    assert a.quarantined_bytes() == 0
    a.settle()
    assert a._device_free_bytes() == 2 * MiB


# ---- faults: no host memory for backups -----------------------------------------------------------

def test_sleep_over_the_host_memory_limit_raises_and_releases_nothing():
    a = make()
    w, w_data = filled(a, 3 * MiB, "weights", 1)
    kv, kv_data = filled(a, MiB, "kv_cache", 2)
    a.host_memory_limit = 2 * MiB
    assert a.host_memory_limit == 2 * MiB
    before, stats_before = snapshot(a), stats_tuple(a)
    with pytest.raises(core.HostOutOfMemoryError) as excinfo:
        a.sleep(["weights"], preserve=[(kv, 100)])
    assert "Nothing was released" in str(excinfo.value)
    assert snapshot(a) == before and set(states(a).values()) == {"mapped"}
    assert stats_tuple(a) == stats_before
    assert a.host_bytes() == 0 and a.last_sleep is None
    assert read(w, 3 * MiB) == w_data and read(kv, MiB) == kv_data
    w_data = pattern(3 * MiB, 3)
    write(w, w_data)  # still ordinary mapped memory

    a.host_memory_limit = 8 * MiB  # raise the limit: the same sleep works
    a.sleep(["weights"], preserve=[(kv, 100)])
    assert states(a) == {w: "backed_up", kv: "backed_up"}
    a.wake(None)
    assert read(w, 3 * MiB) == w_data and read(kv, 100) == kv_data[:100]
    a.host_memory_limit = 0
    assert a.host_memory_limit == 0


def test_failed_calls_leave_no_sticky_state():
    a = make(capacity=8 * MiB)
    p, p_data = filled(a, 4 * MiB, "weights", 1)
    failures = 0
    for call, error in [
        (lambda: a.malloc(0), ValueError),
        (lambda: a.free(12345), ValueError),
        (lambda: a.malloc(16 * MiB, tag="big"), core.DeviceOutOfMemoryError),
    ]:
        with pytest.raises(error):
            call()
        failures += 1
    a.host_memory_limit = MiB
    with pytest.raises(core.HostOutOfMemoryError):
        a.sleep(["weights"])
    a.host_memory_limit = 0
    a.sleep(["weights"])
    hog = a.malloc(6 * MiB, tag="hog")
    with pytest.raises(core.DeviceOutOfMemoryError):
        a.wake(None)
    a.free(hog)
    # Every call after the failures works as on a fresh allocator.
    for cycle in range(3):
        a.wake(None)
        assert read(p, 4 * MiB) == p_data
        q, q_data = filled(a, MiB, "kv_cache", 10 + cycle)
        a.sleep(["weights"], preserve=[(q, 10)])
        a.wake(["kv_cache"])
        assert read(q, 10) == q_data[:10]
        a.free(q)
    a.wake(None)
    assert read(p, 4 * MiB) == p_data


# ---- views, options, the GIL ---------------------------------------------------------------------

def test_stats_views_carry_the_core_numbers():
    a = make()
    assert a.last_sleep is None and a.last_wake is None and a.tag_stats() == {}
    a.slab_bytes = 0  # one handle per allocation: bytes_device is the allocations' own
    w = a.malloc(MiB + 5, tag="weights")
    kv = a.malloc(2 * MiB, tag="kv_cache")
    s = a.sleep(["weights"], preserve=[(kv + 100, 300)])
    assert (s.allocations, s.bytes_copied, s.bytes_device, s.mappings) == (2, MiB + 5 + 300, 4 * MiB, 2)
    assert s.seconds >= 0 and s.populate_seconds >= 0 and s.pin_seconds >= 0
    assert a.last_sleep.bytes_copied == s.bytes_copied
    assert stats_tuple(a) == {"weights": (1, 0, MiB + 5, MiB + 5, 0), "kv_cache": (1, 0, 2 * MiB, 300, 300)}
    assert (info(a, w).backup_bytes, info(a, kv).preserved_bytes) == (MiB + 5, 300)
    assert a.wake(None).bytes_copied == MiB + 5 + 300 and a.last_wake.allocations == 2
    # The host backend leaves the driver no work to prime (csrc/create_primer.h): no rounds, ever.
    p = a.prime_stats
    assert (p.rounds, p.skipped, p.failures, p.last_seconds, p.longest_seconds, p.last_error) == (0, 0, 0, 0, 0, "")


def test_option_properties_round_trip_and_reject_bad_values():
    a = make()
    for name, value in [("keep_host_backups", False), ("host_memory_limit", 3 * MiB), ("staging_threads", 3),
                        ("staging_piece_bytes", 8 * MiB), ("fill_unrestored", True), ("slab_bytes", 8 * MiB),
                        ("prime_after_release", False)]:
        setattr(a, name, value)
        assert getattr(a, name) == value
    assert core.Allocator("host").fill_unrestored is False  # off by default
    assert core.Allocator("host").slab_bytes == 64 * MiB  # on by default
    assert core.Allocator("host").prime_after_release is True
    with pytest.raises(ValueError):
        a.slab_bytes = 2**64 - 1
    with pytest.raises(ValueError):
        a.staging_threads = 0
    with pytest.raises(ValueError):
        a.staging_piece_bytes = 2**64 - 1  # once wrapped to 0 and killed the process with SIGFPE
    assert (a.staging_threads, a.staging_piece_bytes) == (3, 8 * MiB)


def test_small_allocations_share_slabs_and_sleep_as_one_handle():
    a = make(256 * MiB)
    a.slab_bytes = 64 * MiB
    rows = [filled(a, 2 * MiB, "weights", seed) for seed in range(20)]  # 40 MiB: one slab
    big, big_data = filled(a, 40 * MiB, "weights", 99)  # over half a slab: its own handle
    s = a.sleep(["weights"])
    assert (s.allocations, s.mappings, s.bytes_device) == (21, 2, 64 * MiB + 40 * MiB)
    w = a.wake(None)
    assert (w.allocations, w.mappings) == (21, 2)
    assert all(read(p, 2 * MiB) == data for p, data in rows) and read(big, 40 * MiB) == big_data


def test_fill_unrestored_reaches_the_core():
    a = make()
    a.fill_unrestored = True
    kv, kv_data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(kv + 10, 20)])
    a.wake(None)
    assert read(kv, 10) == b"\xff" * 10 and read(kv + 10, 20) == kv_data[10:30]
    assert read(kv + 30, MiB - 30) == b"\xff" * (MiB - 30)


def test_async_host_backend_is_available_by_name():
    a = core.Allocator("host-async", capacity_bytes=64 * MiB)
    assert a.backend == "host-async"
    p, data = filled(a, 3 * MiB, "weights", 1)
    a.sleep(["weights"])
    a.wake(None)
    assert read(p, 3 * MiB) == data


def test_read_only_calls_do_not_hold_the_gil_while_a_sleep_runs():
    """A sleep holds the core's lock for its whole length; a thread asking for stats meanwhile must wait for
    it without the GIL, or every Python thread (vLLM's I/O threads among them) stops until the sleep ends."""
    a = make(capacity=1024 * MiB, threads=1)
    p = a.malloc(512 * MiB, tag="weights")
    ctypes.memset(p, 1, 512 * MiB)
    sleeping = threading.Event()
    calls = [lambda: a.tag_stats(), lambda: a.allocations(), lambda: a.host_bytes(), lambda: a.last_sleep,
             lambda: a.keep_host_backups, lambda: setattr(a, "host_memory_limit", 0)]

    def sleeper():
        sleeping.set()
        a.sleep(["weights"])

    def asker():
        sleeping.wait()
        time.sleep(0.005)  # let the sleep take the lock
        for call in calls:
            call()

    threads = [threading.Thread(target=sleeper), threading.Thread(target=asker)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    sleeping.wait()
    longest, last = 0.0, time.perf_counter()
    while threads[0].is_alive():  # this thread must keep running: measure its longest stall
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    a.wake(None)
    assert took > 0.05, f"sleep too short ({took:.3f} s) to show a stall"
    assert longest < took / 2, f"main thread stalled {longest:.3f} s of a {took:.3f} s sleep"

# ---- real exhaustion of host memory (address space) -----------------------------------------------

# Runs in a fresh interpreter: loads the extension by itself, fills 64 MiB of "weights", caps the
# address space (RLIMIT_AS) at what the process uses now plus HEADROOM MiB, and sleeps with the weights
# offloaded. The backup needs 66 MiB of address space (the arena and one huge page of alignment) and
# staging threads need stacks, so a small headroom makes the backup's mmap fail and a middling one may
# leave room for the arena but not for every thread. Either the sleep works, or it raises
# HostOutOfMemoryError with every allocation mapped and intact; then the limit is lifted, and sleep +
# wake must give the bytes back. Prints one JSON line.
_EXHAUSTION_CHILD = textwrap.dedent(r"""
    import ctypes, hashlib, importlib.util, json, resource, sys

    path, headroom = sys.argv[1], int(sys.argv[2]) << 20
    spec = importlib.util.spec_from_file_location("vllm_sleep_ext._core", path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    MiB = 1 << 20
    size = 64 * MiB
    a = core.Allocator("host", capacity_bytes=256 * MiB)
    a.staging_threads = 4
    a.staging_piece_bytes = 2 * MiB
    a.keep_host_backups = False
    p = a.malloc(size, tag="weights")
    q = a.malloc(MiB, tag="kv_cache")
    for i in range(size // MiB):
        ctypes.memset(p + i * MiB, i % 251 + 1, MiB)
    ctypes.memset(q, 7, MiB)
    view = (ctypes.c_char * size).from_address(p)

    def digest():
        return hashlib.sha256(view).hexdigest()

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    before = digest()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + headroom
    if hard != resource.RLIM_INFINITY and limit > hard:
        print(json.dumps({"skip": "hard RLIMIT_AS too low"}))
        sys.exit(0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    outcome, message = "slept", ""
    try:
        a.sleep(["weights"], [(q, 100)])
    except core.HostOutOfMemoryError as e:
        outcome, message = "host_oom", str(e)
    after_states = sorted(x.state for x in a.allocations())
    intact = outcome == "slept" or digest() == before
    host_after = a.host_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if outcome == "host_oom":
        a.sleep(["weights"], [(q, 100)])  # the retry, with room
    a.wake(None)
    print(json.dumps({"outcome": outcome, "message": message, "states": after_states,
                      "intact_after_failure": intact, "host_bytes_after_failure": host_after,
                      "intact_after_wake": digest() == before,
                      "kept_preserved": ctypes.string_at(q, 100) == b"\x07" * 100}))
""")


def _run_exhaustion_child(headroom_mib: int) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # a preloaded sanitizer runtime would need more address space
    proc = subprocess.run([sys.executable, "-c", _EXHAUSTION_CHILD, str(core_path()), str(headroom_mib)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, (
        f"child with {headroom_mib} MiB of address-space headroom died with status {proc.returncode}:\n"
        f"{proc.stdout}\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the child:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def _check_exhaustion_result(result: dict) -> None:
    assert result["intact_after_wake"] and result["kept_preserved"], result
    if result["outcome"] == "host_oom":
        assert result["states"] == ["mapped", "mapped"], result  # nothing was released
        assert result["intact_after_failure"], result
        assert result["host_bytes_after_failure"] == 0, result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_real_host_exhaustion_makes_sleep_raise_and_keeps_data():
    result = _run_exhaustion_child(16)  # far less than the 66 MiB the backup needs
    assert result["outcome"] == "host_oom", result
    assert "host memory" in result["message"], result
    _check_exhaustion_result(result)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
@pytest.mark.parametrize("headroom_mib", [40, 66, 70, 75, 80, 85, 90, 100, 120])
def test_sleep_under_any_address_space_limit_works_or_raises_host_oom(headroom_mib):
    # Near 66 MiB the arena fits but not every staging thread's stack: the sleep must then go on with
    # the threads it could start, or fail cleanly, never abort the process.
    _check_exhaustion_result(_run_exhaustion_child(headroom_mib))
