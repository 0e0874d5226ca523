"""The core driven by hypothesis against a plain Python model: random sequences of calls, where
tests/cpp/core_tests.cpp checks each behaviour by hand. It runs on the "host-async" backend, whose copies
complete later on another thread (as on a GPU), so every sequence also exercises the copy ordering.

The model is a dict of allocations (tag, state, size, the bytes last written, and the byte ranges whose
contents are still known: all of them after a write, the offloaded whole or the preserved ranges after a
sleep, none after a discard). Rules: alloc, free, write, sleep (offload subset, preserve and exclude
ranges), wake (subset or all), discard, settle, keep_host_backups on/off, release_host_cache, and injected
faults: a "hog" allocation that leaves too little device memory for a wake (DeviceOutOfMemoryError, and
nothing may change), and a host-memory limit below what a sleep needs (HostOutOfMemoryError, nothing
released). The capacity is small, so mallocs and wakes also run out of room by themselves, and the model
predicts exactly when. After every step: states, sizes, tags, backup and preserved bytes, tag_stats, the
last sleep/wake numbers, host memory, the quarantine (bytes freed while mapped, held until a settle),
the device memory in use, and every byte the model knows of every mapped allocation.

It runs twice: with slabs off (every allocation its own memory: the model predicts device memory exactly)
and with slabs of 4 MiB on a card of three (small allocations share slabs, wake maps only what rows
cover; the model bounds device memory from both sides where the slabs' free parts make it inexact).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from core_helpers import (  # noqa: E402
    GRANULARITY,
    KiB,
    MiB,
    clip_relative,
    intersect,
    load_core,
    read,
    round_up,
    subtract,
    total,
    union,
    write,
)

core = load_core()

CAPACITY = 12 * MiB  # six 2 MiB pages: full often enough for the out-of-memory paths to run by themselves
TAGS = ("weights", "kv_cache", "buffers")
MAX_SIZE = 3 * MiB


@dataclass
class Model:
    ptr: int
    size: int
    tag: str
    state: str = "mapped"
    data: bytearray = field(default_factory=bytearray)  # the bytes last written (valid where known)
    known: list = field(default_factory=list)  # relative ranges whose contents must survive
    backup: list = field(default_factory=list)  # relative ranges held on the host while asleep
    whole: bool = False  # backed up because its tag was offloaded

    @property
    def mapped_size(self) -> int:
        return round_up(self.size)

    @property
    def mapped(self) -> bool:
        return self.state == "mapped"

    @property
    def asleep(self) -> bool:
        return self.state in ("backed_up", "discarded")


sizes = st.one_of(st.integers(1, 8 * KiB), st.integers(1, MAX_SIZE), st.sampled_from([GRANULARITY, MAX_SIZE]))
tag_sets = st.lists(st.sampled_from(TAGS), unique=True, max_size=len(TAGS))
# A range spec: (allocation index, start as a fraction of its size, length, shift): the start may fall a
# little before the allocation and the length may run past its end (into the next allocation).
range_specs = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.floats(0, 1), st.integers(1, 4 * MiB), st.integers(-4096, 0)),
    max_size=4,
)


class CoreMachine(RuleBasedStateMachine):
    SLAB_BYTES = 0  # every allocation its own memory: device memory in use is exactly what the model says

    def __init__(self):
        super().__init__()
        self.core = core.Allocator("host-async", capacity_bytes=CAPACITY)
        self.core.staging_threads = 2
        self.core.staging_piece_bytes = 2 * MiB  # backups of a few MiB take several pieces
        self.core.slab_bytes = self.SLAB_BYTES
        self.model: dict[int, Model] = {}
        self.quarantined = 0  # spans freed while mapped since the last settle: still held
        self.rng = random.Random(0)
        self.expect_sleep = None  # (allocations, bytes_copied, bytes_device) of the last sleep
        self.expect_wake = None

    @initialize(seed=st.integers(0, 2**32 - 1),
                first=st.lists(st.tuples(sizes, st.sampled_from(TAGS)), min_size=1, max_size=4))
    def start(self, seed, first):
        self.rng = random.Random(seed)
        for size, tag in first:  # something to sleep from the first step on
            self.alloc(size, tag)

    # ---- helpers ----------------------------------------------------------------------------------

    def used(self) -> int:
        return sum(m.mapped_size for m in self.model.values() if m.mapped)

    def device_used(self) -> int:
        return CAPACITY - self.core._device_free_bytes()

    def pick(self, index: int, only=None) -> Model | None:
        # Insertion order, not address order: addresses differ between runs, and a choice that
        # depends on them makes hypothesis's replays (and so its shrinking) inconsistent.
        candidates = [m for m in self.model.values() if only is None or only(m)]
        return candidates[index % len(candidates)] if candidates else None

    def absolute_ranges(self, specs) -> list[tuple[int, int]]:
        out = []
        ordered = list(self.model.values())
        for index, fraction, length, shift in specs:
            if not ordered:
                break
            m = ordered[index % len(ordered)]
            begin = max(0, m.ptr + int(fraction * m.size) + shift)
            out.append((begin, length))
        return out

    def snapshot(self):
        return (
            sorted((x.ptr, x.size, x.tag, x.state, x.backup_bytes, x.preserved_bytes)
                   for x in self.core.allocations()),
            {t: (s.allocations, s.mapped_bytes, s.asleep_bytes, s.backed_up_bytes, s.preserved_bytes)
             for t, s in self.core.tag_stats().items()},
        )

    def backup_bytes_for(self, offload, preserve_abs, exclude_abs) -> int:
        kept = subtract(union((b, b + n) for b, n in preserve_abs), union((b, b + n) for b, n in exclude_abs))
        needed = 0
        for m in self.model.values():
            if not m.mapped:
                continue
            needed += m.size if m.tag in offload else total(clip_relative(kept, m.ptr, m.ptr + m.size))
        return needed

    # ---- rules ------------------------------------------------------------------------------------

    @rule(size=sizes, tag=st.sampled_from(TAGS))
    def alloc(self, size, tag):
        # Room once the quarantine is settled, which malloc does when it would fail otherwise.
        fits = self.used() + round_up(size) <= CAPACITY
        fits_now = round_up(size) <= self.core._device_free_bytes()  # its own memory fits at least
        try:
            ptr = self.core.malloc(size, tag=tag)
        except core.DeviceOutOfMemoryError as e:
            assert not fits_now, f"malloc of {size} failed with {self.core._device_free_bytes()} free: {e}"
            if not self.SLAB_BYTES:
                assert not fits, f"malloc of {size} failed with {CAPACITY - self.used()} free once settled: {e}"
            assert f"'{tag}'" in str(e)
            assert self.core.quarantined_bytes() == 0, "malloc failed without settling the quarantine"
            self.quarantined = 0
            event("malloc: device full")
            return
        assert fits, "malloc succeeded beyond the capacity"
        if self.core.quarantined_bytes() != self.quarantined:
            assert self.core.quarantined_bytes() == 0 and not fits_now, "malloc settled with room to spare"
            self.quarantined = 0
            event("malloc: settled the quarantine")
        assert ptr not in self.model
        data = bytearray(self.rng.randbytes(size))
        write(ptr, data)
        self.model[ptr] = Model(ptr, size, tag, data=data, known=[(0, size)])

    @precondition(lambda self: self.model)
    @rule(index=st.integers(0, 1 << 16))
    def free(self, index):
        m = self.pick(index)
        self.core.free(m.ptr)
        if m.mapped:
            self.quarantined += m.mapped_size  # the device may still use it: held until settled
        event(f"free: {m.state}")
        del self.model[m.ptr]

    @rule()
    def settle(self):
        self.core.settle()
        self.quarantined = 0
        if not self.SLAB_BYTES:
            assert self.device_used() == self.used()

    @precondition(lambda self: any(m.mapped for m in self.model.values()))
    @rule(index=st.integers(0, 1 << 16), fraction=st.floats(0, 1), length=st.integers(1, 64 * KiB))
    def write_bytes(self, index, fraction, length):
        m = self.pick(index, lambda m: m.mapped)
        offset = min(int(fraction * m.size), m.size - 1)
        length = min(length, m.size - offset)
        data = self.rng.randbytes(length)
        write(m.ptr + offset, data)
        m.data[offset:offset + length] = data
        m.known = union(m.known + [(offset, offset + length)])

    @rule(offload=tag_sets, preserve=range_specs, exclude=range_specs)
    def sleep(self, offload, preserve, exclude):
        preserve_abs = self.absolute_ranges(preserve)
        exclude_abs = self.absolute_ranges(exclude)
        stats = self.core.sleep(offload, preserve_abs, exclude_abs)
        self.quarantined = 0  # a sleep settles first
        kept = subtract(union((b, b + n) for b, n in preserve_abs), union((b, b + n) for b, n in exclude_abs))
        count = copied = released = 0
        for m in self.model.values():
            if not m.mapped:
                continue  # sleeping allocations are left as they are
            count += 1
            released += m.mapped_size
            m.whole = m.tag in offload
            m.backup = [(0, m.size)] if m.whole else clip_relative(kept, m.ptr, m.ptr + m.size)
            copied += total(m.backup)
            m.state = "backed_up" if m.backup else "discarded"
            m.known = intersect(m.known, m.backup)
        event(f"sleep: {'nothing to do' if not count else 'backed up bytes' if copied else 'discarded all'}")
        assert self.device_used() == 0, "a sleep left device memory mapped"
        if count:
            assert (stats.allocations, stats.bytes_copied) == (count, copied)
            # A slab goes whole, its free part too.
            assert stats.bytes_device == released if not self.SLAB_BYTES else stats.bytes_device >= released
            self.expect_sleep = (count, copied, stats.bytes_device)

    @rule(offload=st.lists(st.sampled_from(TAGS), unique=True, min_size=1), preserve=range_specs)
    def sleep_offloading(self, offload, preserve):
        self.sleep(offload, preserve, [])  # level-1 style; twice as many sleeps as wakes otherwise

    def _wake_targets(self, tags):
        return [m for m in self.model.values() if m.asleep and (tags is None or m.tag in tags)]

    @rule(tags=st.one_of(st.none(), tag_sets))
    def wake(self, tags):
        targets = self._wake_targets(tags)
        needed = sum(m.mapped_size for m in targets)
        fits = needed <= CAPACITY - self.used()
        before = self.snapshot()
        try:
            stats = self.core.wake(tags)
        except core.DeviceOutOfMemoryError as e:
            self.quarantined = 0  # a wake settles first
            assert needed > self.core._device_free_bytes(), f"wake needing {needed} failed: {e}"
            if not self.SLAB_BYTES:
                assert not fits, f"wake needing {needed} failed with {CAPACITY - self.used()} free: {e}"
            assert self.snapshot() == before
            assert all(f"'{m.tag}'" in str(e) for m in targets)
            event("wake: device full")
            return
        self.quarantined = 0
        assert fits, "wake succeeded beyond the capacity"
        self._woke(targets, stats)

    def _woke(self, targets, stats):
        # Only what the rows cover is mapped, in slabs too.
        copied = 0
        for m in targets:
            copied += total(m.backup)
            m.state, m.backup, m.whole = "mapped", [], False
        woke = (len(targets), copied, sum(m.mapped_size for m in targets))
        if targets:  # a wake with nothing asleep leaves last_wake as it was
            self.expect_wake = woke
        assert (stats.allocations, stats.bytes_copied, stats.bytes_device) == woke

    @rule(tags=tag_sets)
    def discard(self, tags):
        self.core.discard(tags)
        self.quarantined = 0  # a discard settles first
        for m in self.model.values():
            if m.tag in tags:
                m.state, m.backup, m.whole, m.known = "discarded", [], False, []

    @rule(keep=st.booleans())
    def keep_host_backups(self, keep):
        self.core.keep_host_backups = keep
        assert self.core.keep_host_backups == keep
        if not keep and not self.held_arenas_exist():
            assert self.core.host_bytes() == 0  # idle cached memory goes at once

    @rule()
    def release_host_cache(self):
        self.core.release_host_cache()
        if not self.held_arenas_exist():
            assert self.core.host_bytes() == 0

    # ---- injected faults --------------------------------------------------------------------------

    @precondition(lambda self: any(m.asleep for m in self.model.values()))
    @rule(tags=st.one_of(st.none(), tag_sets))
    def fault_no_room_to_wake(self, tags):
        targets = self._wake_targets(tags)
        needed = sum(m.mapped_size for m in targets)
        self.settle()  # so that the device's free memory is what a wake finds
        free = self.core._device_free_bytes()
        if not targets or needed > free:
            event("fault_no_room_to_wake: not injected")
            return  # nothing to wake, or it fails without help (the wake rule covers that)
        event("fault_no_room_to_wake: injected")
        self.core.slab_bytes = 0  # the hog takes exactly its size
        try:
            hog = self.core.malloc(free - needed + GRANULARITY, tag="hog")  # leaves one page too few
        finally:
            self.core.slab_bytes = self.SLAB_BYTES
        try:
            before = self.snapshot()
            host_before = self.core.host_bytes()
            try:
                self.core.wake(tags)
            except core.DeviceOutOfMemoryError as e:
                message = str(e)
            else:
                raise AssertionError("wake succeeded with too little device memory")
            assert self.snapshot() == before, "a failed wake changed the table"
            assert self.core.host_bytes() == host_before
            for m in targets:
                assert f"'{m.tag}'" in message
        finally:
            self.core.free(hog)  # quarantined: the wake settles it first
        stats = self.core.wake(tags)  # the same wake, once memory is free
        self.quarantined = 0
        self._woke(targets, stats)

    @precondition(lambda self: any(m.mapped for m in self.model.values()))
    @rule(offload=tag_sets, preserve=range_specs)
    def fault_no_host_memory_for_sleep(self, offload, preserve):
        preserve_abs = self.absolute_ranges(preserve)
        needed = self.backup_bytes_for(offload, preserve_abs, [])
        self.core.release_host_cache()  # so that host_bytes() counts only backups in use, as the limit does
        limit = self.core.host_bytes() + needed - 1
        if needed == 0 or limit <= 0:
            event("fault_no_host_memory_for_sleep: not injected")
            return  # nothing to back up, or no limit below it (0 means none)
        event("fault_no_host_memory_for_sleep: injected")
        before = self.snapshot()
        self.core.host_memory_limit = limit
        try:
            try:
                self.core.sleep(offload, preserve_abs, [])
            except core.HostOutOfMemoryError:
                self.quarantined = 0  # the sleep settled before it found no host memory
            else:
                raise AssertionError(f"sleep needing {needed} host bytes succeeded under a limit of {limit}")
            assert self.snapshot() == before, "a failed sleep changed the table"
        finally:
            self.core.host_memory_limit = 0

    # ---- checks after every step ------------------------------------------------------------------

    def held_host_bytes_lower_bound(self) -> int:
        return sum(total(m.backup) for m in self.model.values())

    def held_arenas_exist(self) -> bool:
        return any(m.backup for m in self.model.values())

    @invariant()
    def table_matches_model(self):
        actual = {x.ptr: x for x in self.core.allocations()}
        assert set(actual) == set(self.model)
        for ptr, m in self.model.items():
            x = actual[ptr]
            assert (x.size, x.tag, x.state, x.device) == (m.size, m.tag, m.state, 0), (x.state, m.state)
            assert x.backup_bytes == total(m.backup)
            assert x.preserved_bytes == (0 if m.whole else total(m.backup))

    @invariant()
    def tag_stats_match_model(self):
        expected: dict[str, list[int]] = {}
        for m in self.model.values():
            s = expected.setdefault(m.tag, [0, 0, 0, 0, 0])
            s[0] += 1
            s[1 if m.mapped else 2] += m.size
            s[3] += total(m.backup)
            s[4] += 0 if m.whole else total(m.backup)
        actual = {t: [s.allocations, s.mapped_bytes, s.asleep_bytes, s.backed_up_bytes, s.preserved_bytes]
                  for t, s in self.core.tag_stats().items()}
        assert actual == expected

    @invariant()
    def last_operations_match_model(self):
        for got, want in ((self.core.last_sleep, self.expect_sleep), (self.core.last_wake, self.expect_wake)):
            if want is None:
                assert got is None
            else:
                assert (got.allocations, got.bytes_copied, got.bytes_device) == want

    @invariant()
    def quarantine_and_device_memory_match_model(self):
        assert self.core.quarantined_bytes() == self.quarantined
        in_use = self.used() + self.quarantined  # mapped rows and what was freed while mapped, at least
        if self.SLAB_BYTES:
            assert in_use <= self.device_used() <= CAPACITY
        else:
            assert self.device_used() == in_use

    @invariant()
    def host_memory_covers_backups(self):
        held = self.held_host_bytes_lower_bound()
        assert self.core.host_bytes() >= held

    @invariant()
    def known_bytes_survive(self):
        for m in self.model.values():
            if not m.mapped:
                continue  # unreadable (unmapped); checked once it wakes
            for begin, end in m.known:
                expected = m.data if (begin, end) == (0, m.size) else m.data[begin:end]
                assert expected == read(m.ptr + begin, end - begin), (
                    f"{m.tag} allocation of {m.size} bytes lost bytes in [{begin}, {end})")


CoreMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
TestCoreStateMachine = CoreMachine.TestCase


class SlabMachine(CoreMachine):
    SLAB_BYTES = 4 * MiB  # a card of three slabs; rows up to 2 MiB share them, larger ones have their own


SlabMachine.TestCase.settings = CoreMachine.TestCase.settings
TestSlabStateMachine = SlabMachine.TestCase
