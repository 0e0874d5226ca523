"""The C++ core (`vllm_sleep_ext._core`) through its Linux host backend: no GPU, no torch needed.

"Device memory" is host memory (memfd mappings at reserved addresses): it is read and written with ctypes
at the addresses the core returns. On this backend a woken discarded allocation happens to read zero;
the contract says its bytes are undefined, so the tests assert only that kept bytes survive and that
discarded bytes do not still hold the old pattern (patterns never contain a zero byte).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from core_helpers import (
    GRANULARITY,
    KiB,
    MiB,
    core_path,
    differs_everywhere,
    filled,
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


def test_sleep_backs_up_offloaded_tags_and_discards_the_rest():
    a = make()
    w, w_data = filled(a, 3 * MiB + 7, "weights", 1)
    kv, kv_data = filled(a, MiB, "kv_cache", 2)
    a.sleep(["weights"])
    assert states(a) == {w: "backed_up", kv: "discarded"}
    assert info(a, w).backup_bytes == 3 * MiB + 7
    assert info(a, kv).backup_bytes == 0
    a.wake(None)
    assert states(a) == {w: "mapped", kv: "mapped"}
    assert read(w, len(w_data)) == w_data  # same address, every byte
    assert differs_everywhere(read(kv, MiB), kv_data)


@pytest.mark.parametrize("size", [1, 4095, GRANULARITY, GRANULARITY + 1, 5 * MiB + 3, 9 * MiB])
@pytest.mark.parametrize("threads", [1, 3])
def test_level1_sleep_keeps_every_byte_of_offloaded_tags(size, threads):
    a = make(threads=threads)
    allocations = [filled(a, size, "weights", seed) for seed in range(3)]
    for cycle in range(2):
        stats = a.sleep(["weights"])
        assert stats.allocations == 3 and stats.bytes_copied == 3 * size
        assert set(states(a).values()) == {"backed_up"}
        a.wake(None)
        for ptr, data in allocations:
            assert read(ptr, size) == data, f"cycle {cycle}"
        for i, (ptr, _) in enumerate(allocations):  # new contents for the next cycle
            allocations[i] = (ptr, pattern(size, 100 * cycle + i))
            write(ptr, allocations[i][1])


def test_woken_discarded_allocation_is_ordinary_memory_again():
    a = make()
    kv, old = filled(a, MiB, "kv_cache", 3)
    a.sleep([])
    a.wake(None)
    assert differs_everywhere(read(kv, MiB), old)
    new = pattern(MiB, 4)
    write(kv, new)
    assert read(kv, MiB) == new


# ---- preserved ranges ----------------------------------------------------------------------------

def test_preserved_range_inside_one_allocation_is_kept():
    a = make()
    p, data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(p + 1000, 5000)])
    x = info(a, p)
    assert (x.state, x.backup_bytes, x.preserved_bytes) == ("backed_up", 5000, 5000)
    a.wake(None)
    now = read(p, MiB)
    assert now[1000:6000] == data[1000:6000]
    assert differs_everywhere(now[:1000], data[:1000])
    assert differs_everywhere(now[6000:], data[6000:])


def test_preserved_range_across_two_allocations_is_clipped_to_each():
    a = make()
    n = MiB
    allocations = sorted([filled(a, n, "kv_cache", seed) for seed in range(3)])
    (lo, lo_data), (hi, hi_data), (other, other_data) = allocations  # lo < hi < other
    # From the last 100 bytes of `lo`, over the gap (the rest of lo's 2 MiB reservation, and whatever
    # lies between), to the first 200 bytes of `hi`.
    span_begin = lo + n - 100
    a.sleep([], preserve=[(span_begin, hi + 200 - span_begin)])
    assert info(a, lo).preserved_bytes == 100
    assert info(a, hi).preserved_bytes == 200
    assert info(a, other).state == "discarded"
    assert a.last_sleep.bytes_copied == 300
    a.wake(None)
    assert read(lo + n - 100, 100) == lo_data[-100:]
    assert differs_everywhere(read(lo, n - 100), lo_data[:-100])
    assert read(hi, 200) == hi_data[:200]
    assert differs_everywhere(read(hi + 200, n - 200), hi_data[200:])
    assert differs_everywhere(read(other, n), other_data)


def test_overlapping_and_adjacent_preserved_ranges_are_merged():
    a = make()
    p, data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(p + 10, 20), (p + 20, 20), (p + 40, 10), (p + 15, 5), (p + 1000, 1)])
    # [10, 30) + [20, 40) + [40, 50) + [15, 20) = [10, 50): 40 bytes, counted once; plus one byte.
    assert info(a, p).preserved_bytes == 41
    assert a.last_sleep.bytes_copied == 41
    a.wake(None)
    now = read(p, 2000)
    assert now[10:50] == data[10:50] and now[1000] == data[1000]
    assert differs_everywhere(now[:10], data[:10])
    assert differs_everywhere(now[50:1000], data[50:1000])
    assert differs_everywhere(now[1001:], data[1001:2000])


def test_excluded_middle_of_a_preserved_range_keeps_both_ends_only():
    a = make()
    p, data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(p, 1000)], exclude=[(p + 300, 400)])
    assert info(a, p).preserved_bytes == 600
    a.wake(None)
    now = read(p, 1000)
    assert now[:300] == data[:300]
    assert now[700:1000] == data[700:1000]
    assert differs_everywhere(now[300:700], data[300:700])


def test_exclude_covering_every_preserved_byte_discards():
    a = make()
    p, data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(p + 10, 100)], exclude=[(p, 4096), (p + 9, 1)])
    assert info(a, p).state == "discarded"
    a.wake(None)
    assert differs_everywhere(read(p, MiB), data)


def test_preserved_range_outside_allocations_is_ignored():
    a = make()
    p, data = filled(a, MiB, "kv_cache", 1)
    a.sleep([], preserve=[(4096, 4096), (p + MiB, 4096)])  # past the size (inside the reservation)
    assert info(a, p).state == "discarded"
    assert a.last_sleep.bytes_copied == 0
    a.wake(None)


def test_preserved_range_in_offloaded_tag_changes_nothing():
    a = make()
    p, data = filled(a, MiB, "weights", 1)
    a.sleep(["weights"], preserve=[(p + 10, 10)], exclude=[(p, MiB)])  # exclude does not touch offloads
    x = info(a, p)
    assert (x.backup_bytes, x.preserved_bytes) == (MiB, 0)
    a.wake(None)
    assert read(p, MiB) == data


# ---- selective wake, no-ops, discard -------------------------------------------------------------

def test_selective_wake_leaves_other_tags_asleep():
    a = make()
    p, p_data = filled(a, MiB, "a", 1)
    q, q_data = filled(a, MiB, "b", 2)
    a.sleep(["a", "b"])
    stats = a.wake(["a"])
    assert (stats.allocations, stats.bytes_copied, stats.bytes_device) == (1, MiB, GRANULARITY)
    assert states(a) == {p: "mapped", q: "backed_up"}
    assert read(p, MiB) == p_data
    a.wake(["b"])
    assert read(q, MiB) == q_data


def test_wake_of_an_awake_tag_is_a_noop_and_keeps_its_bytes():
    a = make()
    p, p_data = filled(a, MiB, "a", 1)
    before = snapshot(a)
    stats = a.wake(["a"])
    assert (stats.allocations, stats.bytes_copied, stats.bytes_device) == (0, 0, 0)
    assert a.wake(None).allocations == 0
    assert a.wake(["no-such-tag"]).allocations == 0
    assert a.wake([]).allocations == 0
    assert snapshot(a) == before
    assert read(p, MiB) == p_data


def test_sleep_when_everything_sleeps_is_a_noop():
    a = make()
    p, p_data = filled(a, MiB, "a", 1)
    q, q_data = filled(a, MiB, "b", 2)
    a.sleep(["a"], preserve=[(q, 100)])
    before, stats_before, host_before = snapshot(a), stats_tuple(a), a.host_bytes()
    # A second sleep, even one that names other tags, neither backs up nor drops anything.
    again = a.sleep(["a", "b"], preserve=[(q, MiB)])
    assert (again.allocations, again.bytes_copied, again.bytes_device) == (0, 0, 0)
    assert snapshot(a) == before
    assert stats_tuple(a) == stats_before
    assert a.host_bytes() == host_before
    a.wake(None)
    assert read(p, MiB) == p_data
    now = read(q, MiB)
    assert now[:100] == q_data[:100]
    assert differs_everywhere(now[100:], q_data[100:])


def test_allocation_made_while_others_sleep_is_mapped_and_sleeps_next_time():
    a = make()
    p, p_data = filled(a, MiB, "weights", 1)
    a.sleep(["weights"])
    q, q_data = filled(a, MiB, "weights", 2)
    assert states(a) == {p: "backed_up", q: "mapped"}
    assert a.sleep(["weights"]).allocations == 1  # only q: p already sleeps
    assert states(a) == {p: "backed_up", q: "backed_up"}
    a.wake(None)
    assert read(p, MiB) == p_data and read(q, MiB) == q_data


def test_discard_drops_backups_too():
    a = make()
    p, p_data = filled(a, MiB, "weights", 1)
    q, q_data = filled(a, MiB, "kv_cache", 2)
    r, r_data = filled(a, MiB, "other", 3)
    a.sleep(["weights"], preserve=[(q, 100)])
    assert states(a) == {p: "backed_up", q: "backed_up", r: "discarded"}
    a.discard(["weights", "kv_cache", "no-such-tag"])  # no backup at all, not even preserved ranges
    assert states(a) == {p: "discarded", q: "discarded", r: "discarded"}
    for tag, s in a.tag_stats().items():
        assert (s.backed_up_bytes, s.preserved_bytes) == (0, 0), tag
    a.wake(None)
    assert differs_everywhere(read(p, MiB), p_data)
    assert differs_everywhere(read(q, MiB), q_data)


def test_discard_of_a_mapped_tag_releases_it_and_leaves_other_tags_mapped():
    a = make(capacity=4 * MiB)
    p, p_data = filled(a, MiB, "kv_cache", 1)
    q, q_data = filled(a, MiB, "weights", 2)
    a.discard(["kv_cache"])
    assert states(a) == {p: "discarded", q: "mapped"}
    assert read(q, MiB) == q_data
    extra = a.malloc(2 * MiB, tag="x")  # the discarded memory is free again
    a.free(extra)
    a.discard(["kv_cache"])  # again: nothing
    a.wake(["kv_cache"])
    assert states(a) == {p: "mapped", q: "mapped"}
    assert differs_everywhere(read(p, MiB), p_data)


# ---- free -----------------------------------------------------------------------------------------

def test_free_in_every_state_returns_capacity():
    cap = 8 * MiB
    a = make(capacity=cap)
    backed_up, _ = filled(a, 2 * MiB, "weights", 1)
    discarded, _ = filled(a, 2 * MiB, "kv_cache", 2)
    preserved, _ = filled(a, 2 * MiB, "buffers", 3)
    last, _ = filled(a, 2 * MiB - 1, "kv_cache", 4)
    with pytest.raises(core.DeviceOutOfMemoryError):
        a.malloc(1, tag="x")  # full
    a.sleep(["weights"], preserve=[(preserved, 10)])
    mapped, _ = filled(a, 2 * MiB, "new", 5)  # made while the others sleep
    assert states(a) == {backed_up: "backed_up", discarded: "discarded", preserved: "backed_up",
                         last: "discarded", mapped: "mapped"}
    for ptr in (backed_up, discarded, preserved, last, mapped):
        a.free(ptr)
    assert a.allocations() == [] and a.tag_stats() == {}
    everything, data = filled(a, cap, "x", 6)  # a full-capacity malloc succeeds
    assert read(everything, cap) == data
    a.free(everything)


def test_free_of_a_sleeping_allocation_drops_its_backup():
    a = make()
    a.keep_host_backups = False
    p, _ = filled(a, 3 * MiB, "weights", 1)
    q, q_data = filled(a, MiB, "weights", 2)
    a.sleep(["weights"])
    assert a.host_bytes() >= 4 * MiB
    a.free(p)
    assert a.tag_stats()["weights"].backed_up_bytes == MiB
    a.wake(None)
    assert read(q, MiB) == q_data
    a.free(q)
    assert a.host_bytes() == 0


# ---- trim (PyTorch keeps a segment it will never use again) --------------------------------------

def test_trim_releases_an_allocation_for_good():
    a = make(capacity=4 * MiB)
    p, _ = filled(a, 2 * MiB, "weights", 1)
    q, q_data = filled(a, MiB, "weights", 2)
    a.trim(p)
    assert states(a) == {p: "unused", q: "mapped"}
    assert (info(a, p).backup_bytes, info(a, p).preserved_bytes) == (0, 0)
    assert stats_tuple(a) == {"weights": (1, MiB, 0, 0, 0)}  # unused rows are not counted
    extra = a.malloc(2 * MiB, tag="x")  # its memory is free again
    a.free(extra)
    # Never slept, woken or discarded again; only freed.
    assert a.sleep(["weights"], preserve=[(p, 100)]).allocations == 1
    assert a.wake(None).allocations == 1
    a.discard(["weights"])
    assert states(a) == {p: "unused", q: "discarded"}
    a.wake(None)
    assert states(a) == {p: "unused", q: "mapped"}
    a.trim(p)  # again: nothing
    a.free(p)
    assert list(states(a)) == [q]
    with pytest.raises(ValueError):
        a.trim(p)


def test_trim_of_a_sleeping_allocation_drops_its_backup():
    a = make()
    a.keep_host_backups = False
    p, _ = filled(a, 3 * MiB, "weights", 1)
    q, q_data = filled(a, MiB, "kv_cache", 2)
    a.sleep(["weights"], preserve=[(q, 10)])
    a.trim(p)
    assert states(a) == {p: "unused", q: "backed_up"}
    assert "weights" not in a.tag_stats()
    a.trim(q)
    assert a.host_bytes() == 0  # no backup left: the host memory went with them
    assert a.wake(None).allocations == 0
    assert set(states(a).values()) == {"unused"}


# ---- stats ----------------------------------------------------------------------------------------

def test_tag_stats_and_op_stats_are_exact():
    a = make()
    assert a.last_sleep is None and a.last_wake is None
    assert a.tag_stats() == {}
    w1 = a.malloc(MiB + 5, tag="weights")   # 2 MiB mapped
    w2 = a.malloc(3 * MiB, tag="weights")   # 4 MiB mapped
    kv = a.malloc(2 * MiB, tag="kv_cache")  # 2 MiB mapped
    a.malloc(7, tag="other")                # 2 MiB mapped
    assert stats_tuple(a) == {"weights": (2, 4 * MiB + 5, 0, 0, 0), "kv_cache": (1, 2 * MiB, 0, 0, 0),
                              "other": (1, 7, 0, 0, 0)}

    s = a.sleep(["weights"], preserve=[(kv + 100, 300), (w1, 10)])
    assert (s.allocations, s.bytes_copied, s.bytes_device) == (4, 4 * MiB + 5 + 300, 10 * MiB)
    assert s.seconds >= 0
    last = a.last_sleep
    assert (last.allocations, last.bytes_copied, last.bytes_device) == (4, 4 * MiB + 5 + 300, 10 * MiB)
    assert stats_tuple(a) == {"weights": (2, 0, 4 * MiB + 5, 4 * MiB + 5, 0),
                              "kv_cache": (1, 0, 2 * MiB, 300, 300),
                              "other": (1, 0, 7, 0, 0)}
    assert info(a, w2).backup_bytes == 3 * MiB and info(a, kv).preserved_bytes == 300

    w = a.wake(["weights"])
    assert (w.allocations, w.bytes_copied, w.bytes_device) == (2, 4 * MiB + 5, 6 * MiB)
    assert stats_tuple(a)["weights"] == (2, 4 * MiB + 5, 0, 0, 0)
    w = a.wake(None)
    assert (w.allocations, w.bytes_copied, w.bytes_device) == (2, 300, 4 * MiB)
    last = a.last_wake
    assert (last.allocations, last.bytes_copied, last.bytes_device) == (2, 300, 4 * MiB)
    assert stats_tuple(a)["kv_cache"] == (1, 2 * MiB, 0, 0, 0)
    assert (a.last_sleep.allocations, a.last_sleep.bytes_copied) == (4, 4 * MiB + 5 + 300)  # unchanged


# ---- host memory for backups ----------------------------------------------------------------------

def test_host_backups_are_kept_and_reused_across_cycles():
    a = make()
    assert a.keep_host_backups is True
    p, data = filled(a, 3 * MiB, "weights", 1)
    assert a.host_bytes() == 0
    a.sleep(["weights"])
    held = a.host_bytes()
    assert 3 * MiB <= held <= 3 * MiB * 1.01  # host memory within 1% of the bytes backed up
    a.wake(None)
    assert a.host_bytes() == held  # kept for the next sleep
    for cycle in range(5):
        data = pattern(3 * MiB, 10 + cycle)
        write(p, data)
        a.sleep(["weights"])
        assert a.host_bytes() == held  # the same memory, reused: flat over cycles
        a.wake(None)
        assert a.host_bytes() == held
        assert read(p, 3 * MiB) == data
    a.release_host_cache()
    assert a.host_bytes() == 0


def test_host_backups_not_kept_are_returned_at_wake():
    a = make()
    a.keep_host_backups = False
    assert a.keep_host_backups is False
    p, data = filled(a, 3 * MiB, "weights", 1)
    for _ in range(3):
        a.sleep(["weights"])
        assert a.host_bytes() >= 3 * MiB
        a.wake(None)
        assert a.host_bytes() == 0
        assert read(p, 3 * MiB) == data


def test_turning_keep_host_backups_off_drops_the_cache_at_once():
    a = make()
    filled(a, 3 * MiB, "weights", 1)
    a.sleep(["weights"])
    a.wake(None)
    assert a.host_bytes() > 0
    a.keep_host_backups = False
    assert a.host_bytes() == 0


def test_release_host_cache_keeps_backups_in_use():
    a = make()
    p, data = filled(a, 3 * MiB, "weights", 1)
    a.sleep(["weights"])
    held = a.host_bytes()
    a.release_host_cache()
    assert a.host_bytes() == held
    a.wake(None)
    assert read(p, 3 * MiB) == data
    a.release_host_cache()
    assert a.host_bytes() == 0


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


def test_wake_without_room_for_all_can_wake_the_tags_that_fit():
    a = make(capacity=8 * MiB)
    w, w_data = filled(a, 4 * MiB, "weights", 1)
    kv, kv_data = filled(a, 2 * MiB, "kv_cache", 2)
    a.sleep(["weights", "kv_cache"])
    hog = a.malloc(4 * MiB, tag="trainer")
    with pytest.raises(core.DeviceOutOfMemoryError):
        a.wake(None)
    a.wake(["kv_cache"])
    assert read(kv, 2 * MiB) == kv_data
    assert info(a, w).state == "backed_up"
    a.free(hog)
    a.wake(None)
    assert read(w, 4 * MiB) == w_data


def test_malloc_without_room_raises_and_names_the_tag():
    a = make(capacity=4 * MiB)
    a.malloc(3 * MiB, tag="weights")
    with pytest.raises(core.DeviceOutOfMemoryError, match="'kv_cache'"):
        a.malloc(1, tag="kv_cache")
    assert len(a.allocations()) == 1


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


def test_host_memory_limit_counts_backups_still_held():
    a = make()
    a.host_memory_limit = 4 * MiB
    w, w_data = filled(a, 3 * MiB, "weights", 1)
    a.sleep(["weights"])  # 4 MiB held until the weights wake
    extra, extra_data = filled(a, 3 * MiB, "more", 2)
    with pytest.raises(core.HostOutOfMemoryError):
        a.sleep(["more"])
    assert info(a, extra).state == "mapped" and read(extra, 3 * MiB) == extra_data
    a.wake(None)
    assert read(w, 3 * MiB) == w_data
    # Now the cached 4 MiB is idle: reused for the same size, or dropped for a different one.
    a.free(extra)
    a.sleep(["weights"])
    a.wake(None)
    assert read(w, 3 * MiB) == w_data


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


# ---- threads --------------------------------------------------------------------------------------

def test_threads_allocating_and_freeing_while_another_sleeps_and_wakes():
    """Workers malloc/write/check/free tag "w" while a sleeper offloads "w", keeps a preserved range of
    its own tag "s", wakes "s" alone, then everything; a reader polls the stats. malloc and free run
    unsynchronized against sleep/wake (so workers free sleeping allocations and allocate while others
    sleep). Touching memory while a sleep may unmap it is a caller error (as kernels on a GPU would be),
    so a gate keeps memory accesses, and only they, out of the sleeper's sleep-wake window."""
    a = make(capacity=512 * MiB)
    gate = threading.Lock()
    done = threading.Event()
    errors: list[str] = []
    cycles = [0]

    def guarded(name, fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(f"{name}: {e!r}")
        return run

    def worker(index):
        rng = random.Random(index)
        live = []
        for it in range(150):
            n = rng.randint(1, 256 * KiB)
            data = pattern(n, index * 1000 + it)
            p = a.malloc(n, tag="w")
            with gate:
                write(p, data)
            live.append((p, data))
            if len(live) > 3 or rng.random() < 0.5:
                p, data = live.pop(rng.randrange(len(live)))
                with gate:
                    if read(p, len(data)) != data:
                        errors.append(f"worker {index}: bytes lost at {p:#x}")
                a.free(p)
        with gate:
            for p, data in live:
                if read(p, len(data)) != data:
                    errors.append(f"worker {index}: bytes lost at {p:#x}")
                a.free(p)

    def sleeper():
        n = 64 * KiB
        s = a.malloc(n, tag="s")
        while not done.is_set():
            data = pattern(n, cycles[0])
            with gate:
                write(s, data)
                a.sleep(["w"], preserve=[(s + 100, 5000)])
                if info(a, s).state != "backed_up":
                    errors.append("sleeper: own allocation not backed up")
                a.wake(["s"])  # "w" sleeps on while the workers malloc and free
                if read(s + 100, 5000) != data[100:5100]:
                    errors.append("sleeper: preserved bytes lost")
                a.wake(None)
            cycles[0] += 1
            time.sleep(0.002)  # Python locks are not fair: let the workers in
        a.free(s)

    def reader():
        while not done.is_set():
            a.tag_stats()
            a.allocations()
            a.host_bytes()
            a.last_sleep  # noqa: B018
            time.sleep(0.001)  # a spinning thread would hold the GIL for whole switch intervals

    side = [threading.Thread(target=guarded("sleeper", sleeper)), threading.Thread(target=guarded("reader", reader))]
    workers = [threading.Thread(target=guarded(f"worker {i}", lambda i=i: worker(i))) for i in range(4)]
    for t in side + workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    done.set()
    for t in side:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in side + workers), "a thread hung"
    assert errors == []
    assert cycles[0] > 0, "the sleeper never ran"
    assert a.allocations() == []


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
