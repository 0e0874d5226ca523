"""Option compress (issue 19) on the host backends, with the reference codec: bit-exact round trips of every
dtype, odd sizes and chunk boundaries, pieces kept compressed and pieces sent plain, the host memory it saves,
and the faults a user would hit (no device memory for staging at sleep or wake): nothing lost, retryable.
The injected copy and codec failures are in tests/cpp/compress_tests.cpp (under the sanitizers)."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from tests.core_helpers import load_core, read, write

_core = load_core()
DeviceOutOfMemoryError = _core.DeviceOutOfMemoryError

KiB = 1 << 10
MiB = 1 << 20
BACKENDS = ("host", "host-async")
PIECE = 64 * KiB  # small pieces and chunks, so that a few MiB cross many chunk boundaries
CHUNK_PIECES = 3


def make(backend: str, mode: str, capacity: int = 256 * MiB, piece: int = PIECE, chunk_pieces: int = CHUNK_PIECES):
    a = _core.Allocator(backend, capacity)
    a.compress_piece_bytes = piece
    a.compress_chunk_pieces = chunk_pieces
    a.compress_slots = 2
    a.compress = mode
    return a


def bf16_like(nbytes: int, seed: int, std: float = 0.02) -> bytes:
    """Bytes of Gaussian weights in bf16 (the shape of trained weights), cut to `nbytes` (odd sizes too)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn((nbytes + 1) // 2, generator=g) * std).to(torch.bfloat16)
    return values.view(torch.uint8).numpy().tobytes()[:nbytes]


def dtype_bytes(dtype: torch.dtype, nbytes: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    count = nbytes // dtype.itemsize + 1
    if dtype.is_floating_point:
        values = (torch.randn(count, generator=g) * 0.05).to(dtype)
    else:
        info = torch.iinfo(dtype)
        values = torch.randint(max(info.min, -100), min(info.max, 100) + 1, (count,), generator=g).to(dtype)
    return values.view(torch.uint8).numpy().tobytes()[:nbytes]


def random_bytes(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def fill(a, data: bytes, tag: str = "weights") -> int:
    ptr = a.malloc(len(data), tag=tag)
    write(ptr, data)
    return ptr


def overwrite_free_memory(a) -> None:
    """Takes whatever the card has free and scribbles on it, so a wake cannot find old bytes by luck."""
    size = (a._device_free_bytes() // (2 * MiB)) * 2 * MiB
    if size:
        ptr = a.malloc(size, tag="scribble")
        write(ptr, b"\xa5" * size)
        a.free(ptr)
        a.settle()


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.int32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["off", "auto", "on"])
def test_round_trip_is_bit_exact_for_every_dtype_and_odd_size(backend: str, mode: str) -> None:
    a = make(backend, mode)
    sizes = [1, 15, PIECE - 1, PIECE, PIECE + 1, CHUNK_PIECES * PIECE + 3, 5 * CHUNK_PIECES * PIECE - 7]
    kept = {}
    for i, dtype in enumerate(DTYPES):
        for j, size in enumerate(sizes):
            data = dtype_bytes(dtype, size, seed=100 * i + j)
            kept[fill(a, data)] = data
    noise = random_bytes(3 * PIECE + 5, seed=7)
    kept[fill(a, noise)] = noise
    a.sleep(["weights"])
    overwrite_free_memory(a)
    a.wake(None)
    for ptr, data in kept.items():
        assert read(ptr, len(data)) == data, f"allocation of {len(data)} bytes changed"
    s = a.last_sleep
    if mode == "off":
        assert s.compress_plain_bytes == 0 and s.pieces_packed == 0
    else:
        assert s.compress_plain_bytes == sum(len(d) for d in kept.values())
        assert s.pieces_plain > 0  # random bytes do not pack
        assert s.pieces_packed > 0  # bf16 does, also after the chunks of other data auto sent plain
        assert a.last_wake.compress_plain_bytes == s.compress_plain_bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weights_take_less_host_memory_and_come_back_exact(backend: str) -> None:
    a = make(backend, "auto")
    data = bf16_like(24 * MiB + 6, seed=1)
    ptr = fill(a, data)
    a.sleep(["weights"])
    s = a.last_sleep
    assert s.bytes_copied == len(data)
    assert s.pieces_plain <= 1  # the last piece, 6 bytes, does not pay
    assert s.compress_stored_bytes <= 0.8 * len(data)  # the reference codec keeps ~0.76 of bf16 weights
    tags = a.tag_stats()["weights"]
    assert tags.backed_up_bytes == len(data) and tags.stored_bytes == s.compress_stored_bytes
    assert a.host_pinned_bytes() < len(data)  # the arena's ready prefix holds only what is stored
    overwrite_free_memory(a)
    a.wake(["weights"])
    assert read(ptr, len(data)) == data


@pytest.mark.parametrize("backend", BACKENDS)
def test_incompressible_data_is_sent_plain_by_auto(backend: str) -> None:
    a = make(backend, "auto")
    data = random_bytes(4 * MiB + 1, seed=3)
    ptr = fill(a, data)
    a.sleep(["weights"])
    s = a.last_sleep
    assert s.pieces_packed == 0 and s.compress_stored_bytes == len(data)
    overwrite_free_memory(a)
    a.wake(None)
    assert read(ptr, len(data)) == data


def test_on_keeps_a_piece_compressed_where_auto_sends_it_plain() -> None:
    # Pieces that shrink by less than 5 %: auto sends them plain, on keeps them packed.
    words = bytearray(random_bytes(2 * MiB, seed=5))
    for i in range(1, len(words), 2):  # high bytes: 14 values (escape-free); low bytes random
        words[i] = 0x3C + (words[i] % 14)
    data = bytes(words)
    results = {}
    for mode in ("auto", "on"):
        a = make("host", mode)
        ptr = fill(a, data)
        a.sleep(["weights"])
        results[mode] = a.last_sleep
        a.wake(None)
        assert read(ptr, len(data)) == data
    assert results["auto"].pieces_packed == results["on"].pieces_packed  # ~0.75: both keep these
    marginal = bytearray(random_bytes(2 * MiB, seed=6))
    for i in range(1, len(marginal), 2):  # 114/256 = 45 % escapes: packed size ~0.97 of plain
        if marginal[i] >= 114:
            marginal[i] = 0x40 + marginal[i] % 14
        else:
            marginal[i] = 0x80 | marginal[i]
    data = bytes(marginal)
    for mode in ("auto", "on"):
        a = make("host", mode)
        ptr = fill(a, data)
        a.sleep(["weights"])
        ratio = a.last_sleep.compress_stored_bytes / len(data)
        packed = a.last_sleep.pieces_packed
        a.wake(None)
        assert read(ptr, len(data)) == data
        if mode == "auto":
            assert packed == 0 and ratio == 1.0
        else:
            assert packed > 0 and 0.95 < ratio < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_preserved_ranges_of_other_tags_round_trip_compressed(backend: str) -> None:
    # Level 2: only preserved ranges (unaligned, odd) of a discarded tag go to host, through the codec too.
    a = make(backend, "on")
    data = bf16_like(3 * MiB, seed=11)
    ptr = fill(a, data, tag="kv_cache")
    ranges = [(ptr + 17, 5 * PIECE + 3), (ptr + MiB + 1, 101), (ptr + 2 * MiB, MiB)]
    a.sleep([], ranges, [])
    overwrite_free_memory(a)
    a.wake(None)
    for begin, size in ranges:
        assert read(begin, size) == data[begin - ptr:begin - ptr + size]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleep_with_compress_on_and_no_room_for_staging_fails_before_releasing(backend: str) -> None:
    a = make(backend, "on", capacity=24 * MiB, piece=MiB, chunk_pieces=4)  # staging: 2 slots of ~5 MiB
    data = bf16_like(8 * MiB, seed=2)
    ptr = fill(a, data)
    hog = a.malloc(a._device_free_bytes(), tag="other")
    with pytest.raises(DeviceOutOfMemoryError, match=r"compress is 'on'.*staging.*nothing was changed"):
        a.sleep(["weights"])
    assert {i.state for i in a.allocations()} == {"mapped"}
    assert read(ptr, len(data)) == data
    a.free(hog)
    a.settle()
    a.sleep(["weights"])  # the same sleep, retried once there is room
    assert a.last_sleep.pieces_packed > 0
    a.wake(None)
    assert read(ptr, len(data)) == data


def test_sleep_with_compress_auto_and_no_room_for_staging_copies_plain(capfd: pytest.CaptureFixture) -> None:
    a = make("host", "auto", capacity=16 * MiB, piece=MiB, chunk_pieces=4)
    data = bf16_like(8 * MiB, seed=2)
    ptr = fill(a, data)
    a.malloc(a._device_free_bytes(), tag="other")
    a.sleep(["weights"])
    assert a.last_sleep.compress_plain_bytes == 0 and a.last_sleep.bytes_copied == len(data)
    assert "this sleep copies plain" in capfd.readouterr().err
    a.wake(["weights"])
    assert read(ptr, len(data)) == data


@pytest.mark.parametrize("backend", BACKENDS)
def test_wake_counts_compression_staging_as_memory_it_needs(backend: str) -> None:
    a = make(backend, "on", capacity=24 * MiB, piece=MiB, chunk_pieces=4)
    data = bf16_like(8 * MiB, seed=4)
    ptr = fill(a, data)
    a.sleep(["weights"])
    # Room for the weights but not for the weights and the staging beside them.
    hog = a.malloc(a._device_free_bytes() - 10 * MiB, tag="other")
    with pytest.raises(DeviceOutOfMemoryError, match=r"cannot wake tag 'weights'.*needs"):
        a.wake(["weights"])
    assert {i.state for i in a.allocations() if i.tag == "weights"} == {"backed_up"}
    a.free(hog)
    a.settle()
    a.wake(["weights"])
    assert read(ptr, len(data)) == data
    assert a.last_wake.staging_device_bytes > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_incompressible_backup_wakes_like_a_plain_one_without_staging(backend: str) -> None:
    # Auto sends every piece of random bytes plain: the wake then decodes nothing, so it makes no staging
    # and needs no room for it, only the weights' own memory.
    a = make(backend, "auto", capacity=24 * MiB, piece=MiB, chunk_pieces=4)
    data = random_bytes(8 * MiB - 3, seed=8)
    ptr = fill(a, data)
    a.sleep(["weights"])
    s = a.last_sleep
    assert s.pieces_packed == 0 and s.pieces_plain == 8 and s.staging_device_bytes > 0
    overwrite_free_memory(a)
    hog = a.malloc(a._device_free_bytes() - 10 * MiB, tag="other")  # room for the weights, not for staging
    a.wake(["weights"])
    assert read(ptr, len(data)) == data
    w = a.last_wake
    assert w.staging_device_bytes == 0
    assert (w.pieces_packed, w.pieces_plain) == (0, 8)  # what the wake restored, as the sleep stored it
    assert w.compress_plain_bytes == w.compress_stored_bytes == len(data) == w.bytes_copied
    a.free(hog)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wake_makes_staging_only_when_a_backup_it_restores_has_a_packed_piece(backend: str) -> None:
    a = make(backend, "auto", piece=MiB, chunk_pieces=4)
    noise, weights = random_bytes(4 * MiB + 5, seed=9), bf16_like(4 * MiB + 7, seed=10)
    noise_ptr, weights_ptr = fill(a, noise, tag="noise"), fill(a, weights)
    a.sleep(["noise", "weights"])
    assert a.last_sleep.pieces_packed > 0 and a.last_sleep.pieces_plain >= 5
    overwrite_free_memory(a)
    a.wake(["noise"])  # all plain: no staging
    assert a.last_wake.staging_device_bytes == 0 and a.last_wake.pieces_packed == 0
    a.wake(["weights"])  # 4 packed pieces: staging of one slot of 4, less than the sleep's 2 slots
    assert a.last_wake.pieces_packed == 4
    assert 0 < a.last_wake.staging_device_bytes < a.last_sleep.staging_device_bytes
    assert read(noise_ptr, len(noise)) == noise and read(weights_ptr, len(weights)) == weights
    # Both in one wake: a mixed device decodes, and the plain backup beside it comes back as well.
    a.sleep(["noise", "weights"])
    overwrite_free_memory(a)
    a.wake(None)
    assert a.last_wake.staging_device_bytes > 0
    assert a.last_wake.compress_plain_bytes == a.last_sleep.compress_plain_bytes
    assert read(noise_ptr, len(noise)) == noise and read(weights_ptr, len(weights)) == weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_wake_after_the_piece_size_changed_restores_the_pieces_as_the_sleep_cut_them(backend: str) -> None:
    # The wake's staging fits the pieces stored, not today's setting (slots as wide as the old pieces).
    a = make(backend, "on", piece=MiB, chunk_pieces=4)
    data = bf16_like(6 * MiB + 3, seed=12)
    ptr = fill(a, data)
    a.sleep(["weights"])
    a.compress_piece_bytes = 64 * KiB
    a.compress_chunk_pieces = 16
    overwrite_free_memory(a)
    a.wake(None)
    assert read(ptr, len(data)) == data
    assert a.last_wake.pieces_packed == a.last_sleep.pieces_packed == 6


def test_compress_options_reject_bad_values_naming_them() -> None:
    a = _core.Allocator("host", 64 * MiB)
    with pytest.raises(ValueError, match=r"compress must be one of 'off', 'auto', 'on', got 'maybe'"):
        a.compress = "maybe"
    with pytest.raises(ValueError, match=r"piece bytes"):
        a.compress_piece_bytes = 100
    with pytest.raises(ValueError, match=r"chunk pieces"):
        a.compress_chunk_pieces = 0
    with pytest.raises(ValueError, match=r"slots"):
        a.compress_slots = 1
    assert a.compress == "off"


def test_host_backends_always_have_the_reference_codec() -> None:
    assert _core.Allocator("host", 64 * MiB).compress_unavailable() == ""
    assert _core.Allocator("host-async", 64 * MiB).compress_unavailable() == ""


# -- the Python surface ----------------------------------------------------------------------------

def test_allocator_compress_comes_from_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_sleep_ext import CuMemAllocator, envs

    monkeypatch.setenv("VLLM_SLEEP_EXT_COMPRESS", "auto")
    assert CuMemAllocator(backend="host", capacity_bytes=64 * MiB).compress == "auto"
    assert CuMemAllocator(backend="host", capacity_bytes=64 * MiB, compress="on").compress == "on"
    monkeypatch.setenv("VLLM_SLEEP_EXT_COMPRESS", "sometimes")
    with pytest.raises(envs.EnvError, match=r"VLLM_SLEEP_EXT_COMPRESS='sometimes'"):
        CuMemAllocator(backend="host", capacity_bytes=64 * MiB)


class _NoCodecCore:
    """A core whose codec cannot be had, as CUDA without libnvcomp.so.6."""

    compress = "off"

    def compress_unavailable(self) -> str:
        return "libnvcomp.so.6 could not be loaded (not found)"


def test_compress_on_without_codec_says_why_and_auto_logs_and_copies_plain(caplog: pytest.LogCaptureFixture) -> None:
    from vllm_sleep_ext import compress

    core = _NoCodecCore()
    with pytest.raises(compress.CompressUnavailableError, match=r"compress='on'.*libnvcomp.so.6 could not be loaded"):
        compress.apply(core, "on", "host")
    assert core.compress == "off"
    with caplog.at_level(logging.WARNING):
        compress.apply(core, "auto", "host")
    assert core.compress == "auto"
    assert "copied plain: libnvcomp.so.6 could not be loaded" in caplog.text


def test_level1_sleep_of_a_bf16_model_reports_ratio_and_restores_it(caplog: pytest.LogCaptureFixture) -> None:
    from vllm_sleep_ext import CuMemAllocator

    alloc = CuMemAllocator(backend="host", capacity_bytes=256 * MiB, compress="auto")
    alloc._core.compress_piece_bytes = 256 * KiB
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    with alloc.use_memory_pool(tag="weights"):
        alloc.place_module(model)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO):
        alloc.sleep(offload_tags=("weights",))
        alloc.wake_up()
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.uint8), expected[n].view(torch.uint8)), n
    stats = alloc.stats()
    assert stats.last_sleep.compress_ratio < 0.85
    assert stats.last_wake.compress_plain_bytes == stats.last_sleep.compress_plain_bytes
    assert "compressed backups" in caplog.text and "ratio" in caplog.text


def test_host_memory_prepared_ahead_is_the_expected_compressed_size() -> None:
    from vllm_sleep_ext import CuMemAllocator
    from vllm_sleep_ext.compress import EXPECTED_RATIO

    sizes = {}
    for mode in ("off", "auto"):
        alloc = CuMemAllocator(backend="host", capacity_bytes=256 * MiB, compress=mode)
        with alloc.use_memory_pool(tag="weights"):
            weights = alloc.empty((64 * MiB,), torch.uint8)
        alloc.prepare_host_backups()
        sizes[mode] = alloc._core.host_pinned_bytes()
        del weights
    assert sizes["off"] >= 64 * MiB
    assert sizes["auto"] <= EXPECTED_RATIO * 64 * MiB + 2 * MiB  # rounded up to a huge page


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_the_first_sleep_takes_the_arena_prepared_ahead_and_prepares_nothing(mode: str) -> None:
    # A compressed sleep asks for an arena of its plain bytes: the one prepared ahead must be that large
    # (made ready only to the expected compressed size), or the sleep makes a new one from nothing and
    # the preparation was for naught (vLLM 0.33, 8B shape: first compressed sleep 1.33 s, RESULTS.md 16).
    from vllm_sleep_ext import CuMemAllocator

    alloc = CuMemAllocator(backend="host", capacity_bytes=256 * MiB, compress=mode)
    alloc._core.compress_piece_bytes = 1 * MiB  # staging that fits beside the weights on this backend
    alloc._core.compress_chunk_pieces = 4
    with alloc.use_memory_pool(tag="weights"):
        weights = alloc.empty((64 * MiB,), torch.uint8)
    weights.zero_()
    alloc.prepare_host_backups()
    held, prepared = alloc._core.host_bytes(), alloc._core.host_pinned_bytes()
    alloc.sleep(offload_tags=("weights",))
    s = alloc._core.last_sleep
    assert alloc._core.host_bytes() == held, "the sleep made another arena beside the prepared one"
    if mode == "off":
        assert s.populate_seconds == 0 and s.pin_seconds == 0
    else:  # the reference codec stores 0.75 of these bytes, a little more than was prepared: only that is added
        assert s.pieces_packed > 0 and s.compress_stored_bytes < 0.8 * 64 * MiB
        assert alloc._core.host_pinned_bytes() <= max(prepared, s.compress_stored_bytes + 2 * MiB)
    alloc.wake_up()
    assert torch.count_nonzero(weights) == 0


def test_nvcomp_is_preloaded_from_a_wheel_installed_with_target(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip install --target DIR nvidia-libnvcomp-cu13 puts DIR/nvidia/libnvcomp/lib64/libnvcomp.so.6; the
    # core opens the library by its soname, so it must be loaded first. (A stand-in shared object here.)
    import _ctypes
    import importlib.util
    import shutil
    import sys

    from vllm_sleep_ext import compress

    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.libnvcomp"):
        pytest.skip("the real nvidia-libnvcomp-cu13 is installed here")
    lib64 = tmp_path / "nvidia" / "libnvcomp" / "lib64"
    lib64.mkdir(parents=True)
    shutil.copy(_ctypes.__file__, lib64 / compress.NVCOMP_SONAME)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert compress.preload_nvcomp() == str(lib64 / compress.NVCOMP_SONAME)
