"""The disk tier (Note [Disk tier], csrc/disk_tier.h) on the host backend: backups past the host memory
limit go to an unnamed file in the directory set, and come back at wake.

What a user checks: the bytes after a round trip with part of the backups on disk (odd sizes, several
allocations, preserved ranges, partial wakes, two sleeps' files), that a full disk or a failed write
fails the sleep before anything is released, that a short or unreadable file fails the wake with the
allocations still asleep and the wake retryable, that a bad directory is refused naming it, and that
the files are 0600 and never visible in the directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from core_helpers import MiB, load_core, pattern, read, write

core = load_core()

CAPACITY = 512 * MiB


def make(disk_dir, limit: int):
    a = core.Allocator("host", capacity_bytes=CAPACITY)
    a.staging_piece_bytes = 2 * MiB
    a.staging_threads = 2
    a.disk_threads = 2
    a.host_memory_limit = limit
    a.disk_dir = str(disk_dir)
    return a


def filled(a, size: int, tag: str, seed: int) -> tuple[int, bytes]:
    ptr = a.malloc(size, tag=tag)
    data = pattern(size, seed)
    write(ptr, data)
    return ptr, data


def states(a) -> dict[int, str]:
    return {x.ptr: x.state for x in a.allocations()}


def snapshot(a) -> list[tuple]:
    return sorted((x.ptr, x.size, x.tag, x.state, x.backup_bytes, x.disk_bytes) for x in a.allocations())


def backup_fds(disk_dir) -> list[int]:
    """This process's open files that live in `disk_dir` (the disk tier's unnamed files)."""
    prefix = os.path.realpath(str(disk_dir)) + "/"
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefix):
            out.append(int(name))
    return out


def filesystem_type(path) -> str:
    """The type of the filesystem `path` lies on (the longest mount point above it in /proc/mounts)."""
    path, best, kind = os.path.realpath(str(path)), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def file_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd}")


# Odd sizes, several allocations, a weights tag backed up whole and a kv tag with preserved ranges.
SIZES = [3 * MiB + 17, 20 * MiB + 4095, MiB - 1, 7 * MiB + 1, 33 * MiB + 5]


def weights_and_kv(a):
    weights = [filled(a, size, "weights", seed) for seed, size in enumerate(SIZES)]
    kv, kv_data = filled(a, 9 * MiB + 3, "kv_cache", 99)
    preserve = [(kv + 5, 1000), (kv + 4 * MiB + 1, 3 * MiB + 7)]
    return weights, (kv, kv_data), preserve


def test_round_trip_with_half_the_backups_on_disk(tmp_path):
    total = sum(SIZES) + 1000 + 3 * MiB + 7
    limit = total // 2
    a = make(tmp_path, limit)
    weights, (kv, kv_data), preserve = weights_and_kv(a)

    a.sleep(["weights"], preserve=preserve)
    stats = a.tag_stats()
    on_disk = stats["weights"].disk_bytes + stats["kv_cache"].disk_bytes
    assert stats["weights"].backed_up_bytes == sum(SIZES)
    assert on_disk == a.last_sleep.disk_bytes and a.last_sleep.bytes_copied == total
    assert total - limit <= on_disk <= total - limit + 4096  # the host part is whole pages under the limit
    assert a.host_bytes() <= limit
    assert set(states(a).values()) == {"backed_up"}

    a.wake(["weights"])  # a partial wake: the file stays for the kv tag's part
    for ptr, data in weights:
        assert read(ptr, len(data)) == data
    a.wake(None)
    for begin, size in preserve:
        assert read(begin, size) == kv_data[begin - kv:begin - kv + size]
    assert a.last_wake.disk_bytes > 0 or stats["kv_cache"].disk_bytes == 0
    assert backup_fds(tmp_path) == []  # every backup woke: the file is closed


def test_second_sleep_past_a_full_host_limit_goes_all_to_disk(tmp_path):
    a = make(tmp_path, 8 * MiB)
    first, first_data = filled(a, 8 * MiB, "weights", 1)
    a.sleep(["weights"], preserve=[])
    assert a.last_sleep.disk_bytes == 0
    others = [filled(a, size, "runtime", seed) for seed, size in enumerate([5 * MiB + 3, 17 * MiB + 1], 10)]
    a.sleep(["runtime"], preserve=[])  # no host room left: everything on disk, no arena
    assert a.last_sleep.disk_bytes == a.last_sleep.bytes_copied == 22 * MiB + 4
    assert a.tag_stats()["runtime"].disk_bytes == 22 * MiB + 4
    a.wake(["runtime"])
    for ptr, data in others:
        assert read(ptr, len(data)) == data
    a.wake(None)
    assert read(first, 8 * MiB) == first_data


def test_backup_files_are_0600_and_not_visible_in_the_directory(tmp_path):
    a = make(tmp_path, 2 * MiB)
    ptr, data = filled(a, 12 * MiB, "weights", 3)
    a.sleep(["weights"], preserve=[])
    assert os.listdir(tmp_path) == []
    fds = backup_fds(tmp_path)
    assert len(fds) == 1
    st = os.fstat(fds[0])
    assert st.st_mode & 0o777 == 0o600
    assert st.st_nlink == 0  # no name anywhere: nothing is left after a crash
    assert st.st_size >= 10 * MiB
    if filesystem_type(tmp_path) in ("ext4", "xfs", "btrfs"):  # these take O_DIRECT: the tier must use it
        assert file_flags(fds[0]) & os.O_DIRECT
    a.wake(None)
    assert read(ptr, 12 * MiB) == data
    assert backup_fds(tmp_path) == []


def test_discard_drops_the_disk_part_and_closes_the_file(tmp_path):
    a = make(tmp_path, 2 * MiB)
    filled(a, 12 * MiB, "weights", 3)
    a.sleep(["weights"], preserve=[])
    assert len(backup_fds(tmp_path)) == 1
    a.discard(["weights"])
    assert backup_fds(tmp_path) == [] and a.tag_stats()["weights"].disk_bytes == 0


def test_tmpfs_directory_round_trips(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    a = make(shm, 4 * MiB)
    ptr, data = filled(a, 21 * MiB + 11, "weights", 4)
    a.sleep(["weights"], preserve=[])
    assert a.last_sleep.disk_bytes > 0
    a.wake(None)
    assert read(ptr, len(data)) == data


# ---- faults ------------------------------------------------------------------------------------------

def test_failed_write_fails_the_sleep_before_anything_is_released(tmp_path):
    a = make(tmp_path, 4 * MiB)
    weights, (kv, kv_data), preserve = weights_and_kv(a)
    before = snapshot(a)
    a._inject_disk_write_failure(20 * MiB)  # in the second chunk
    with pytest.raises(core.SleepExtError) as excinfo:
        a.sleep(["weights"], preserve=preserve)
    message = str(excinfo.value)
    assert str(tmp_path) in message and "Nothing was released" in message
    assert snapshot(a) == before and set(states(a).values()) == {"mapped"}
    for ptr, data in weights:
        assert read(ptr, len(data)) == data
    assert backup_fds(tmp_path) == [] and a.last_sleep is None

    a.sleep(["weights"], preserve=preserve)  # the same sleep, retried, works
    a.wake(None)
    for ptr, data in weights:
        assert read(ptr, len(data)) == data
    assert read(kv + 5, 1000) == kv_data[5:1005]


def test_short_read_fails_the_wake_and_keeps_the_backups(tmp_path):
    a = make(tmp_path, 4 * MiB)
    weights, _, preserve = weights_and_kv(a)
    a.sleep(["weights"], preserve=preserve)
    asleep = snapshot(a)
    a._inject_disk_short_read(17 * MiB)
    with pytest.raises(core.SleepExtError) as excinfo:
        a.wake(None)
    message = str(excinfo.value)
    assert "short" in message and "stay asleep" in message and str(tmp_path) in message
    assert snapshot(a) == asleep
    a.wake(None)  # retried: works
    for ptr, data in weights:
        assert read(ptr, len(data)) == data


def test_truncated_file_fails_every_wake_clearly_and_discard_still_works(tmp_path):
    a = make(tmp_path, 2 * MiB)
    ptr, _ = filled(a, 12 * MiB, "weights", 5)
    a.sleep(["weights"], preserve=[])
    (fd,) = backup_fds(tmp_path)
    os.ftruncate(fd, 4 * MiB)  # the file on disk lost its end (another process, a bad disk)
    asleep = snapshot(a)
    for _ in range(2):
        with pytest.raises(core.SleepExtError, match="short"):
            a.wake(None)
        assert snapshot(a) == asleep
    a.discard(["weights"])
    assert states(a) == {ptr: "discarded"}
    a.wake(None)
    assert states(a) == {ptr: "mapped"}


_FULL_DISK_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    sys.path.insert(0, {tests!r})
    from core_helpers import MiB, load_core, pattern, read, write
    core = load_core()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    a = core.Allocator("host", capacity_bytes=256 * MiB)
    a.disk_threads = 1
    a.host_memory_limit = 2 * MiB
    a.disk_dir = {dir!r}
    ptr = a.malloc(24 * MiB + 5, tag="weights")
    data = pattern(24 * MiB + 5, 7)
    write(ptr, data)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * MiB, hard))  # the disk holds 8 MiB
    try:
        a.sleep(["weights"], [], [])
    except core.SleepExtError as e:
        print("ERROR", e)
    else:
        print("NO ERROR")
    print("STATE", a.allocations()[0].state, read(ptr, len(data)) == data, a.last_sleep is None)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again: the same sleep works
    a.sleep(["weights"], [], [])
    a.wake(None)
    print("RETRY", read(ptr, len(data)) == data)
""")


def test_full_disk_fails_the_sleep_up_front_and_a_retry_works(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD.format(tests=tests, dir=str(tmp_path))],
                           capture_output=True, text=True, timeout=120, cwd=os.path.dirname(tests))
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    error = next(line for line in lines if line.startswith(("ERROR", "NO ERROR")))
    assert error.startswith("ERROR") and "no room" in error and str(tmp_path) in error
    assert "Nothing was released" in error
    assert "STATE mapped True True" in lines
    assert "RETRY True" in lines


def test_missing_or_unwritable_directory_is_refused_naming_it(tmp_path):
    a = core.Allocator("host", capacity_bytes=CAPACITY)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        a.disk_dir = str(missing)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        a.disk_dir = str(a_file)
    assert a.disk_dir == ""  # unchanged
    with pytest.raises(ValueError, match="disk threads"):
        a.disk_threads = 0


def test_unwritable_directory_is_refused_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(ValueError, match="not writable") as excinfo:
            core.Allocator("host", capacity_bytes=CAPACITY).disk_dir = str(locked)
        assert str(locked) in str(excinfo.value)
        return
    # Root may write anywhere: the check runs in a forked child that became an unprivileged user, on a
    # directory that user can reach (pytest's tmp_path lies under a 0700 directory of root's).
    import shutil
    import tempfile

    reachable = tempfile.mkdtemp(prefix="vse-disk-test-", dir="/tmp")
    os.chmod(reachable, 0o755)
    locked = os.path.join(reachable, "locked")
    os.mkdir(locked, 0o500)
    try:
        said = _as_unprivileged_user(locked)
    finally:
        shutil.rmtree(reachable)
    assert said.startswith("REFUSED") and "not writable" in said and locked in said


def _as_unprivileged_user(locked: str) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setuid(65534)
            try:
                core.Allocator("host", capacity_bytes=64 * MiB).disk_dir = str(locked)
                os.write(write_end, b"ACCEPTED")
            except ValueError as e:
                os.write(write_end, f"REFUSED {e}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        return f.read()


# ---- the Python allocator and the environment ------------------------------------------------------

def test_environment_sets_the_limit_and_the_directory(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from vllm_sleep_ext import CuMemAllocator, envs

    monkeypatch.setenv("VLLM_SLEEP_EXT_HOST_LIMIT", "8M")
    monkeypatch.setenv("VLLM_SLEEP_EXT_DISK_DIR", str(tmp_path))
    a = CuMemAllocator(backend="host", capacity_bytes=CAPACITY)
    assert a.host_memory_limit == 8 * MiB and a.disk_dir == str(tmp_path)

    b = CuMemAllocator(backend="host", capacity_bytes=CAPACITY, host_memory_limit=1 << 30, disk_dir="")
    assert b.host_memory_limit == 1 << 30 and b.disk_dir == ""  # arguments win over the environment

    monkeypatch.setenv("VLLM_SLEEP_EXT_DISK_DIR", str(tmp_path / "missing"))
    with pytest.raises(envs.EnvError) as excinfo:
        CuMemAllocator(backend="host", capacity_bytes=CAPACITY)
    assert "VLLM_SLEEP_EXT_DISK_DIR" in str(excinfo.value) and "missing" in str(excinfo.value)
    assert [e.name for e in envs.invalid()] == ["VLLM_SLEEP_EXT_DISK_DIR"]


def test_python_allocator_reports_bytes_on_disk(tmp_path):
    torch = pytest.importorskip("torch")
    from vllm_sleep_ext import CuMemAllocator

    a = CuMemAllocator(backend="host", capacity_bytes=CAPACITY, host_memory_limit=4 * MiB, disk_dir=tmp_path)
    with a.use_memory_pool("weights"):
        t = a.empty((3 * MiB + 7,), dtype=torch.uint8)
    t.copy_(torch.arange(t.numel(), dtype=torch.int64).remainder(251).to(torch.uint8))
    expected = t.clone()
    a.sleep(offload_tags=("weights",))
    s = a.stats()
    assert s.tags["weights"].disk_bytes == 0  # fits under the limit
    with a.use_memory_pool("weights"):
        u = a.empty((9 * MiB,), dtype=torch.uint8)
    u.fill_(7)
    a.sleep(offload_tags=("weights",))
    s = a.stats()
    on_disk = s.last_sleep.disk_bytes
    assert 8 * MiB <= on_disk < 9 * MiB and s.tags["weights"].disk_bytes == on_disk  # the rest under the limit
    a.wake_up()
    assert torch.equal(t, expected) and bool((u == 7).all())
    assert a.stats().last_wake.disk_bytes == on_disk


def test_the_active_line_names_the_limit_and_the_directory(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from vllm_sleep_ext.allocator import describe

    monkeypatch.setenv("VLLM_SLEEP_EXT_HOST_LIMIT", "8G")
    monkeypatch.setenv("VLLM_SLEEP_EXT_DISK_DIR", str(tmp_path))
    line = describe()
    assert "host limit 8.00 GiB" in line and str(tmp_path) in line
    monkeypatch.delenv("VLLM_SLEEP_EXT_DISK_DIR")
    assert "no disk tier" in describe()


def test_host_memory_prepared_ahead_stops_at_the_limit_and_the_sleep_uses_it(tmp_path):
    a = make(tmp_path, 6 * MiB)
    ptr, data = filled(a, 20 * MiB + 9, "weights", 8)
    a.prepare_host(20 * MiB + 9, 0, True)  # the part past the limit will go to disk: not prepared
    assert a.host_bytes() == 6 * MiB and a.host_error() == ""
    a.sleep(["weights"], preserve=[])
    assert a.host_bytes() == 6 * MiB  # the prepared arena, not a second one
    assert a.last_sleep.disk_bytes == 14 * MiB + 9
    a.wake(None)
    assert read(ptr, len(data)) == data

    a.disk_dir = ""  # without a disk tier, preparing past the limit is refused as before
    with pytest.raises(core.HostOutOfMemoryError):
        a.prepare_host(20 * MiB + 9, 0, True)


def test_compression_with_a_disk_part_copies_that_sleep_plain_and_keeps_every_byte(tmp_path):
    # The two are not combined yet (allocator.cpp, copy_backups): a sleep whose backups go partly to
    # disk is copied plain; one that fits under the limit is compressed as asked.
    a = make(tmp_path, 16 * MiB)
    a.compress_piece_bytes = 64 * 1024
    a.compress_chunk_pieces = 3
    a.compress_slots = 2
    a.compress = "on"
    big = [filled(a, size, "weights", seed) for seed, size in enumerate([12 * MiB + 5, 9 * MiB + 3], 20)]
    a.sleep(["weights"], preserve=[])
    assert a.last_sleep.disk_bytes > 0 and a.last_sleep.compress_plain_bytes == 0
    a.wake(None)
    for ptr, data in big:
        assert read(ptr, len(data)) == data
    for ptr, _ in big:
        a.free(ptr)
    small, small_data = filled(a, 4 * MiB + 1, "weights", 30)
    a.sleep(["weights"], preserve=[])
    assert a.last_sleep.disk_bytes == 0 and a.last_sleep.compress_plain_bytes == 4 * MiB + 1
    a.wake(None)
    assert read(small, len(small_data)) == small_data
