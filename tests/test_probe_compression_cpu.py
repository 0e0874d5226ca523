"""The compression probe's pure parts, on the CPU without nvCOMP: the byte split and its rejoin, the
pipeline model's arithmetic, the weight mix; and the whole script as a dry run (--device cpu) against a
stand-in for nvidia.nvcomp that follows the binding's documented calls (zlib inside)."""
import json
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import probe_compression as probe  # noqa: E402

MiB = 1 << 20


def random_bf16(n: int, seed: int = 0) -> torch.Tensor:
    """Every bit pattern, NaNs and infinities included: the split must not care what the bytes mean."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int32, generator=g).to(torch.int16).view(torch.bfloat16)


# ---- byte split -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 4095, 4097, 1 << 16, (1 << 16) + 1])
def test_byte_split_then_join_gives_back_every_bf16_bit(n):
    x = random_bf16(n, seed=n)
    hi, lo = probe.split_bytes(x)
    assert hi.numel() == lo.numel() == n and hi.dtype == lo.dtype == torch.uint8
    back = probe.join_bytes(hi, lo).view(torch.bfloat16)
    assert torch.equal(back.view(torch.int16), x.view(torch.int16))


def test_byte_split_puts_sign_and_exponent_high_and_mantissa_low():
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16)  # 0x3F80, 0xC000, 0x3F00, 0x4040
    hi, lo = probe.split_bytes(x)
    assert hi.tolist() == [0x3F, 0xC0, 0x3F, 0x40]
    assert lo.tolist() == [0x80, 0x00, 0x00, 0x40]


def test_byte_split_into_given_planes_of_a_slice_matches_the_whole():
    x = random_bf16(1001, seed=3)
    hi, lo = probe.split_bytes(x)
    hi2, lo2 = torch.zeros(1001, dtype=torch.uint8), torch.zeros(1001, dtype=torch.uint8)
    probe.split_bytes(x[:500], hi2[:500], lo2[:500])
    probe.split_bytes(x[500:], hi2[500:], lo2[500:])
    assert torch.equal(hi, hi2) and torch.equal(lo, lo2)
    out = torch.empty(2002, dtype=torch.uint8)
    probe.join_bytes(hi2[:500], lo2[:500], out[:1000])
    probe.join_bytes(hi2[500:], lo2[500:], out[1000:])
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


def test_join_refuses_planes_of_different_sizes():
    with pytest.raises(ValueError, match="planes differ"):
        probe.join_bytes(torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))


# ---- pipeline model ------------------------------------------------------------------------------------------


def test_pipeline_of_equal_stages_takes_one_stage_more_than_the_chunks():
    assert probe.pipeline_seconds([1.0] * 4, [1.0] * 4) == pytest.approx(5.0)


def test_pipeline_is_bound_by_its_slower_stage_plus_fill_and_drain():
    # compress 1, copy 3 per chunk: 1 (fill) + 4 x 3
    assert probe.pipeline_seconds([1.0] * 4, [3.0] * 4) == pytest.approx(13.0)
    # compress 3, copy 1 per chunk: 4 x 3 + 1 (drain)
    assert probe.pipeline_seconds([3.0] * 4, [1.0] * 4) == pytest.approx(13.0)


def test_pipeline_with_one_slot_runs_the_stages_one_after_the_other():
    assert probe.pipeline_seconds([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], slots=1) == pytest.approx(12.0)


def test_pipeline_waits_for_a_free_slot():
    # Stage 1 is fast, stage 2 slow; with 2 slots chunk 2's stage 1 waits for chunk 0's stage 2 (ends at 11).
    first, second = [1.0, 1.0, 1.0], [10.0, 10.0, 10.0]
    assert probe.pipeline_seconds(first, second, slots=2) == pytest.approx(31.0)
    assert probe.pipeline_seconds(first, second, slots=8) == pytest.approx(31.0)
    # ... which shows when stage 1 is slow and uneven: chunk 2 may not start before 11 with 2 slots
    assert probe.pipeline_seconds([1.0, 1.0, 9.0, 1.0], [10.0, 1.0, 1.0, 1.0], slots=2) == pytest.approx(22.0)
    assert probe.pipeline_seconds([1.0, 1.0, 9.0, 1.0], [10.0, 1.0, 1.0, 1.0], slots=3) == pytest.approx(14.0)


def test_pipeline_rejects_stage_lists_of_different_lengths():
    with pytest.raises(ValueError, match="2 first-stage times but 3"):
        probe.pipeline_seconds([1.0, 1.0], [1.0, 1.0, 1.0])
    assert probe.pipeline_seconds([], []) == 0.0


def test_chunk_sizes_cover_the_total_with_a_short_last_chunk():
    assert probe.chunk_sizes(10, 4) == [4, 4, 2]
    assert probe.chunk_sizes(8, 4) == [4, 4]
    assert probe.chunk_sizes(0, 4) == []
    with pytest.raises(ValueError):
        probe.chunk_sizes(8, 0)


def test_model_of_a_codec_that_halves_the_bytes_at_link_speed_nearly_doubles_a_sleep():
    gb = 10 ** 9
    # 64 chunks; compress at 4 x the link, half the bytes: copy-bound, 64 x 0.5/50 s + fill
    m = probe.model_cycle(64 * 16 * MiB, 16 * MiB, ratio=0.5, compress_gbps=200, decompress_gbps=200,
                          d2h_gbps=50, h2d_gbps=50)
    chunk = 16 * MiB
    assert m.plain_sleep_s == pytest.approx(64 * chunk / (50 * gb))
    assert m.sleep_s == pytest.approx(chunk / (200 * gb) + 64 * chunk * 0.5 / (50 * gb))
    assert m.wake_s == pytest.approx(64 * chunk * 0.5 / (50 * gb) + chunk / (200 * gb))
    assert m.sleep_x == pytest.approx(m.plain_sleep_s / m.sleep_s)
    assert 1.9 < m.sleep_x < 2.0 and 1.9 < m.cycle_x < 2.0


def test_model_of_a_slow_codec_is_bound_by_compression():
    m = probe.model_cycle(8 * MiB, MiB, ratio=0.5, compress_gbps=25, decompress_gbps=100, d2h_gbps=50, h2d_gbps=50)
    # per chunk: plain copy t, compress 2t, compressed copy 0.5t: 8 compresses back to back, then the last copy
    assert m.sleep_x == pytest.approx(8 / (8 * 2 + 0.5), rel=1e-9)


def test_model_rejects_a_zero_rate():
    with pytest.raises(ValueError, match="compress_gbps must be positive"):
        probe.model_cycle(MiB, MiB, 0.5, 0.0, 1.0, 1.0, 1.0)


# ---- data ----------------------------------------------------------------------------------------------------------


def test_weight_mix_totals_exactly_and_has_embeddings_layers_and_norms():
    total = 2 * (probe.round_up(40 * 1024 * 1024, 2) // 2)
    specs = probe.weight_mix(total, hidden=256)
    assert sum(t.numel for t in specs) * 2 == total
    names = [t.name for t in specs]
    assert names[0] == "embed_tokens" and names[-1] == "lm_head" and names[-2] == "norm"
    assert any(n.endswith("down_proj") for n in names) and any(n.endswith("input_layernorm") for n in names)
    norms = [t for t in specs if "norm" in t.name]
    assert all(t.mean == 1.0 for t in norms)
    assert all(0.008 <= t.std <= 0.05 for t in specs if t.name.endswith("_proj"))


def test_weight_mix_at_4_gib_is_llama_8b_shaped():
    specs = probe.weight_mix(4 << 30)
    assert sum(t.numel for t in specs) * 2 == 4 << 30
    by_name = {t.name: t for t in specs}
    assert by_name["embed_tokens"].numel == 128256 * 4096
    assert by_name["layers.0.gate_proj"].numel == 14336 * 4096
    assert by_name["layers.0.k_proj"].numel == 1024 * 4096


def test_weight_mix_smaller_than_its_embedding_is_cut_not_refused():
    specs = probe.weight_mix(1 << 20, hidden=4096)
    assert [t.name for t in specs] == ["embed_tokens"] and specs[0].numel * 2 == 1 << 20
    with pytest.raises(ValueError, match="even"):
        probe.weight_mix(3)


def test_fp8_per_tensor_uses_each_tensors_range():
    specs = [probe.TensorSpec("a", 1000, 0.0, 0.01), probe.TensorSpec("b", 1000, 1.0, 0.05)]
    flat = probe.make_bf16(specs, torch.device("cpu"))
    f8 = probe.fp8_per_tensor(flat, specs).view(torch.float8_e4m3fn).float()
    assert f8.numel() == 2000
    for part in (f8[:1000], f8[1000:]):
        assert part.abs().max().item() == pytest.approx(probe.FP8_MAX)


def test_sample_windows_spread_over_the_whole_and_do_not_overlap():
    offs = probe.sample_offsets(1 << 30, 64 << 20, 8)
    assert len(offs) == 8 and offs[0] == 0 and offs[-1] >= (1 << 30) * 7 // 8 - 4096
    assert all(b - a >= 64 << 20 for a, b in zip(offs, offs[1:]))
    assert all(o % 4096 == 0 and o + (64 << 20) <= 1 << 30 for o in offs)
    assert probe.sample_offsets(100, 50, 2) == [0]


# ---- the dry run ---------------------------------------------------------------------------------------------------


class FakeArray:
    def __init__(self, t, size=None):
        self.t = t
        self.buffer_size = t.numel() * t.element_size() if size is None else size

    @property
    def __cuda_array_interface__(self):  # what the probe reads to see where the bytes went
        return {"data": (self.t.data_ptr(), False), "shape": (self.buffer_size,), "typestr": "|u1", "version": 3}

    def __dlpack__(self, stream=None):
        return self.t.view(torch.uint8)[:self.buffer_size].__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


HEADER_LEN = 64


def native_header(payload: int, raw: int) -> bytes:
    """A header laid out as nvCOMP's common header: magic, versions, comp_data_size (u64 at 8, the payload),
    decomp_data_size (u64 at 16), comp_data_offset (u32 at 56, where the payload starts)."""
    h = bytearray(HEADER_LEN)
    h[0:4] = b"NVCP"
    h[8:16] = payload.to_bytes(8, "little")
    h[16:24] = raw.to_bytes(8, "little")
    h[56:60] = HEADER_LEN.to_bytes(4, "little")
    return bytes(h)


class FakeCodec:
    """nvcomp.Codec's calls as the binding documents them; zlib does the work."""

    broken: set = set()  # algorithms whose construction fails
    headerless: set = set()  # algorithms whose output has no header holding its size (the zlib stream alone)
    lossy: set = set()  # algorithms whose decode flips a byte
    elsewhere: set = set()  # algorithms that write their output to a buffer of their own, not the one given

    def __init__(self, algorithm, **kwargs):
        if algorithm in self.broken:
            raise RuntimeError(f"fake: {algorithm} not available")
        self.algorithm, self.kwargs = algorithm, kwargs

    def get_max_comp_buffer_size(self, arr):
        return arr.buffer_size + arr.buffer_size // 8 + 64

    def compression_config(self, n):
        return ("c", n)

    def decompression_config(self, cfg):
        return ("d", cfg[1])

    def encode(self, arr, out=None, compression_config=None):
        assert compression_config is None or compression_config[1] == arr.buffer_size
        raw = arr.t.reshape(-1).view(torch.uint8).numpy().tobytes()
        data = zlib.compress(raw, 1)
        if self.algorithm not in self.headerless:
            data = native_header(len(data), len(raw)) + data
        dst = out.t.view(torch.uint8)
        if self.algorithm in self.elsewhere:
            dst = torch.empty(len(data), dtype=torch.uint8)
        if len(data) > dst.numel():
            raise ValueError("output buffer too small")
        dst[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return FakeArray(dst, len(data))

    def decode(self, arr, out=None, decompression_config=None):
        start = 0 if self.algorithm in self.headerless else HEADER_LEN
        data = zlib.decompress(arr.t.view(torch.uint8)[start:arr.buffer_size].numpy().tobytes())
        dst = out.t.view(torch.uint8)
        if len(data) != dst.numel():
            raise ValueError(f"decoded {len(data)} bytes into {dst.numel()}")
        if self.algorithm in self.elsewhere:
            dst = torch.empty_like(dst)
        dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if self.algorithm in self.lossy:
            dst[0] ^= 1
        return FakeArray(dst)


def install_fake_nvcomp(mp: pytest.MonkeyPatch) -> types.ModuleType:
    fake = types.ModuleType("nvidia.nvcomp")
    fake.__version__, fake.__cuda_version__ = "fake", 0
    fake.Codec = FakeCodec
    fake.as_array = lambda t, cuda_stream=0: FakeArray(t)
    pkg = types.ModuleType("nvidia")
    pkg.nvcomp = fake
    mp.setitem(sys.modules, "nvidia", pkg)
    mp.setitem(sys.modules, "nvidia.nvcomp", fake)
    mp.setattr(FakeCodec, "broken", {"LZ4"})
    mp.setattr(FakeCodec, "lossy", {"Zstd"})
    mp.setattr(FakeCodec, "elsewhere", {"Cascaded"})
    mp.setattr(FakeCodec, "headerless", {"Bitcomp"})
    return fake


@pytest.fixture
def fake_nvcomp(monkeypatch):
    return install_fake_nvcomp(monkeypatch)


def dry_run(out_dir: Path) -> dict:
    """The whole script on the CPU: 512 KiB data sets, a sample of 8 windows of 16 KiB, chunks of 32 and 64 KiB."""
    rc = probe.main(["--device", "cpu", "--gib", str(0.5 / 1024), "--sample-mib", "0.125", "--chunk-mib", "0.03125",
                     "0.0625",
                     "--reps", "1", "--slow-gbps", "0", "--out", str(out_dir)])
    assert rc == 0
    return json.loads((out_dir / "probe_compression.json").read_text())


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run with the stand-in (LZ4 cannot be made, Zstd flips a byte, Cascaded writes to its own buffers),
    shared by the tests that read it."""
    out_dir = tmp_path_factory.mktemp("probe")
    with pytest.MonkeyPatch.context() as mp:
        install_fake_nvcomp(mp)
        stdout = []
        mp.setattr(probe, "say", stdout.append)
        return dry_run(out_dir), "\n".join(stdout)


def test_dry_run_measures_every_codec_layout_and_the_pipelines(dry):
    res, out = dry
    rows = res["rows"]
    layouts = {(r["dataset"], r["codec"], r["layout"]) for r in rows}
    assert ("bf16", "ANS", "split") in layouts and ("bf16", "ANS", "split-hi") in layouts
    assert ("bf16", "ANS-f2", "raw") in layouts and ("fp8", "ANS-f1", "raw") in layouts
    assert ("random", "Cascaded", "raw") in layouts and ("fp8", "ANS", "split") not in layouts
    assert {r["chunk"] for r in rows} == {32 * 1024, 64 * 1024}
    assert all(r["parts"]["raw"]["bytes"] == 128 * 1024 for r in rows if r["layout"] == "raw")
    good = [r for r in rows if r["codec"] != "Zstd"]
    assert good and all(r["exact"] for r in good)
    assert all(r["ratio"] < 0.9 for r in good if r["dataset"] == "bf16" and r["layout"] == "split")
    # every measured run gave back every byte, through the host and back
    measured = res["measured"]
    assert {m["layout"] for m in measured} >= {"plain"} and all("error" not in m for m in measured), measured
    assert all(m["exact"] for m in measured)
    coded = [m for m in measured if m["layout"] != "plain"]
    assert {m["dataset"] for m in coded} >= {"bf16", "fp8", "random"}
    assert any(m["dataset"] == "bf16" and m["host_ratio"] < 0.9 for m in coded)
    assert "model sleep x" in out and "measured" in out.split("model sleep x")[1]


def test_dry_run_reports_a_codec_that_loses_bytes_and_never_picks_it(dry):
    res, _ = dry
    zstd = [r for r in res["rows"] if r["codec"] == "Zstd"]
    assert zstd and not any(r["exact"] for r in zstd)
    assert all(m["codec"] != "Zstd" for m in res["measured"])


def test_dry_run_copies_from_where_a_codec_wrote_when_not_into_the_buffer_given(dry):
    res, _ = dry
    cascaded = [r for r in res["rows"] if r["codec"] == "Cascaded"]
    assert cascaded and all(r["exact"] for r in cascaded)
    notes = {n for rec in res["sweep"] if rec["codec"] == "Cascaded" for n in rec["notes"]}
    assert notes == {"encode wrote outside the buffer given, copied", "decode wrote outside the buffer given, copied"}


def test_dry_run_names_a_codec_that_cannot_be_made_and_goes_on(dry):
    res, _ = dry
    assert any(e.startswith("LZ4: codec not made: RuntimeError: fake: LZ4 not available") for e in res["errors"])
    assert not any(r["codec"] == "LZ4" for r in res["rows"])


@pytest.mark.parametrize("layout", ["raw", "split", "split-hi"])
def test_measured_pipeline_round_trips_odd_sized_data_through_the_host(layout, fake_nvcomp):
    dev = torch.device("cpu")
    src = random_bf16(3 * 2048 + 61, seed=7).view(torch.uint8)  # 3 chunks and a short one
    host = torch.empty(2 * src.numel() + 4096, dtype=torch.uint8)
    coder = probe.Coder(fake_nvcomp, probe.CODECS[0], probe.Lane(dev), dev)
    p = probe.Pipeline(src, host, 4096, layout, coder, probe.Lane(dev), probe.Lane(dev))
    m = probe.measure_pipeline(p, 2, dev)
    assert m["exact"] and len(p.records) == 4


def test_measured_pipeline_refuses_a_host_buffer_too_small_with_its_size(fake_nvcomp):
    dev = torch.device("cpu")
    src = torch.randint(0, 256, (3 * 4096,), dtype=torch.uint8)  # incompressible: grows a little
    coder = probe.Coder(fake_nvcomp, probe.CODECS[0], probe.Lane(dev), dev)
    p = probe.Pipeline(src, torch.empty(src.numel(), dtype=torch.uint8), 4096, "raw", coder, probe.Lane(dev),
                       probe.Lane(dev))
    with pytest.raises(RuntimeError, match="pinned host buffer of 12288 bytes too small"):
        p.sleep()


def test_dry_run_without_nvcomp_still_measures_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "load_nvcomp", lambda: (None, "ModuleNotFoundError: No module named 'nvidia'"))
    res = dry_run(tmp_path)
    assert res["limit"]["d2h_gbps"] > 0 and res["rows"] == []
    assert any("nvidia.nvcomp not importable" in e for e in res["errors"])
    assert all(m["layout"] == "plain" and m["exact"] for m in res["measured"])


def test_nvcomp_is_found_behind_a_regular_nvidia_package_that_hides_the_namespace(tmp_path, monkeypatch):
    regular, wheels = tmp_path / "site-packages", tmp_path / "site"
    (regular / "nvidia").mkdir(parents=True)
    (regular / "nvidia" / "__init__.py").write_text("")
    (wheels / "nvidia" / "nvcomp").mkdir(parents=True)
    (wheels / "nvidia" / "nvcomp" / "__init__.py").write_text("__version__ = 'from the wheel dir'\n")
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(wheels), str(regular)] + sys.path)
    nvcomp, why = probe.load_nvcomp()
    assert why is None and nvcomp.__version__ == "from the wheel dir"


def test_nvcomp_absent_says_why():
    nvcomp, why = probe.load_nvcomp()
    assert (nvcomp is None) == (why is not None)
    if why is not None:
        assert "nvidia" in why


def test_unknown_codec_name_is_refused_by_name():
    with pytest.raises(SystemExit):
        probe.parse_args(["--codecs", "ANS", "Brotli"])


# ---- the measured pipeline: sizes from headers, stage times, rows asked for ---------------------------------------


def test_size_field_is_found_where_nvcomps_common_header_keeps_it():
    samples = [(native_header(p, 4096) + bytes(64), HEADER_LEN + p) for p in (1000, 2345, 77)]
    layout = probe.find_size_layout(samples)
    assert layout == probe.NVCOMP_COMMON_LAYOUT
    assert probe.read_layout(native_header(5000, 1) + bytes(64), layout) == HEADER_LEN + 5000


def test_size_field_elsewhere_is_found_and_a_header_without_one_gives_none():
    def header(size):
        h = bytearray(128)
        h[40:48] = size.to_bytes(8, "little")
        h[8:16] = (size * 3).to_bytes(8, "little")  # a field that moves with the size but is not it
        return bytes(h)

    assert probe.find_size_layout([(header(n), n) for n in (300, 9000)]) == (("Q", 40),)
    assert probe.find_size_layout([(bytes(128), 300), (bytes(128), 9000)]) is None
    assert probe.find_size_layout([]) is None


def test_union_length_counts_overlapping_time_once():
    assert probe.union_length([]) == 0.0
    assert probe.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]) == pytest.approx(3.0)


def test_stage_stats_name_the_busy_lane_or_say_the_pass_stalled():
    copy_bound = probe.stage_stats({"code": [(0.0, 0.2), (1.0, 1.1)], "copy": [(0.2, 1.0), (1.1, 2.0)]}, 2.0)
    assert copy_bound["busy_s"] == pytest.approx({"code": 0.3, "copy": 1.7})
    assert copy_bound["overlap_s"] == pytest.approx(0.0) and copy_bound["span_s"] == pytest.approx(2.0)
    assert copy_bound["bound"] == "copy"
    overlapped = probe.stage_stats({"code": [(0.0, 1.0)], "copy": [(0.2, 1.8)]}, 1.8)
    assert overlapped["overlap_s"] == pytest.approx(0.8) and overlapped["bound"] == "copy"
    # lanes busy 1.0 and 0.8 s of a 2.5 s pass: the pipeline waited, neither lane bounds it
    assert probe.stage_stats({"code": [(0.0, 1.0)], "copy": [(1.5, 2.3)]}, 2.5)["bound"] == "stalls"


def test_measure_rows_parse_and_bad_ones_say_what_is_wrong():
    assert probe.parse_measure("bf16:ANS-f2:raw:64") == probe.MeasureSpec("bf16", "ANS-f2", "raw", 64 * MiB)
    assert probe.parse_measure("random:plain:256") == probe.MeasureSpec("random", None, "plain", 256 * MiB)
    assert probe.parse_measure("bf16:ANS:split-hi:0.001").chunk == 4096
    for text, why in [("bf16:ANS:64", "want DATASET:CODEC"), ("int8:ANS:raw:64", "unknown data set"),
                      ("bf16:Brotli:raw:64", "unknown codec"), ("bf16:ANS-f2:split-hi:64", "ANS-f2 takes layouts raw"),
                      ("bf16:ANS:split:-1", "not a positive number"), ("fp8:ANS:split:64", "2-byte data")]:
        with pytest.raises(ValueError, match=why):
            probe.parse_measure(text)


def test_measure_rows_get_their_plain_copy_first_and_once():
    a, b = probe.parse_measure("bf16:ANS-f2:raw:64"), probe.parse_measure("bf16:ANS:split-hi:64")
    c = probe.parse_measure("random:ANS-f2:raw:256")
    assert probe.with_baselines([a, b, c, a]) == [probe.MeasureSpec("bf16", None, "plain", 64 * MiB), a, b,
                                                 probe.MeasureSpec("random", None, "plain", 256 * MiB), c]


def test_measure_option_refuses_a_data_set_not_made_and_adds_its_codec():
    with pytest.raises(SystemExit):
        probe.parse_args(["--datasets", "bf16", "--measure", "random:ANS:raw:64"])
    with pytest.raises(SystemExit):
        probe.parse_args(["--measure", "bf16:ANS:diagonal:64"])
    a = probe.parse_args(["--codecs", "ANS", "--measure", "bf16:ANS-f2:raw:64", "best"])
    assert a.codecs == ["ANS", "ANS-f2"]


def test_variant_refuses_a_lag_that_would_wait_on_its_own_slot():
    with pytest.raises(ValueError, match="lag < slots"):
        probe.Variant("x", 3, 3, 0, "header", 4096)
    with pytest.raises(ValueError, match="header or binding"):
        probe.Variant("x", 3, 1, 0, "guess", 4096)
    v = probe.variants(4)
    assert (v["async"].lag, v["async"].ahead, v["async"].size_from) == (2, 3, "header")
    assert (v["lockstep"].slots, v["lockstep"].lag, v["lockstep"].ahead) == (3, 1, 0)


def cpu_pipeline(nvcomp, spec_index: int, layout: str, variant: str, n: int = 5 * 4096 + 61):
    dev = torch.device("cpu")
    src = random_bf16(n, seed=11).view(torch.uint8)[: n // 2 * 2]
    host = torch.empty(2 * src.numel() + 64 * 4096, dtype=torch.uint8)
    coder = probe.Coder(nvcomp, probe.CODECS[spec_index], probe.Lane(dev), dev)
    return probe.Pipeline(src, host, 8192, layout, coder, probe.Lane(dev), probe.Lane(dev),
                          variant=probe.variants(4)[variant])


@pytest.mark.parametrize("variant", ["async", "async-binding", "async-unaligned", "lockstep"])
@pytest.mark.parametrize("layout", ["raw", "split", "split-hi"])
def test_every_variant_round_trips_every_layout_and_times_both_lanes(variant, layout, fake_nvcomp):
    p = cpu_pipeline(fake_nvcomp, 0, layout, variant)  # ANS: its stand-in writes a native header
    m = probe.measure_pipeline(p, 2, torch.device("cpu"))
    assert m["exact"] and len(p.records) == len(p.pieces)
    assert m["size_from"] == ("binding" if variant in ("async-binding", "lockstep") else "header")
    for stages in (m["sleep_stages"], m["wake_stages"]):
        assert stages["busy_s"]["code"] > 0 and stages["busy_s"]["copy"] > 0
        assert stages["host_s"]["encode" if stages is m["sleep_stages"] else "decode"] > 0
    align = probe.variants(4)[variant].host_align
    assert all(off % align == 0 for rec in p.records for off, _, _ in rec)


def test_header_sizes_are_learned_once_per_codec_and_agree_with_the_binding(fake_nvcomp):
    p = cpu_pipeline(fake_nvcomp, 0, "raw", "async")
    probe.measure_pipeline(p, 1, torch.device("cpu"))
    assert p.coder.size_layout == probe.NVCOMP_COMMON_LAYOUT
    by_header = [rec[0][1] for rec in p.records]
    q = probe.Pipeline(p.src, p.host, 8192, "raw", p.coder, p.work, p.copy, variant=probe.variants(4)["async-binding"])
    q.sleep()
    assert [rec[0][1] for rec in q.records] == by_header


def test_a_codec_without_a_size_in_its_header_is_measured_with_the_bindings_sizes_and_says_so(fake_nvcomp):
    p = cpu_pipeline(fake_nvcomp, 3, "raw", "async")  # Bitcomp: its stand-in writes no header
    m = probe.measure_pipeline(p, 1, torch.device("cpu"))
    assert m["exact"] and m["size_from"] == "binding" and p.coder.size_layout is None
    assert any("no header field held the binding's sizes" in n for n in m["pipeline_notes"])


def test_a_header_size_outside_the_buffer_stops_the_sleep_with_its_value(fake_nvcomp):
    p = cpu_pipeline(fake_nvcomp, 0, "raw", "async")
    p.coder.size_layout = (("I", 0),)  # the magic number: no size
    magic = int.from_bytes(b"NVCP", "little")
    with pytest.raises(RuntimeError, match=rf"header says {magic} compressed bytes, outside its buffer"):
        p.sleep()


def test_dry_run_measures_the_rows_asked_for_under_every_variant_when_diagnosed(tmp_path, fake_nvcomp, monkeypatch):
    monkeypatch.setattr(probe, "say", lambda _: None)
    rc = probe.main(["--device", "cpu", "--gib", str(0.25 / 1024), "--sample-mib", "0.0625", "--chunk-mib", "0.03125",
                     "--reps", "1", "--slow-gbps", "0", "--datasets", "bf16", "random", "--codecs", "ANS",
                     "--measure", "bf16:ANS-f2:raw:0.03125", "bf16:ANS:split-hi:0.0625", "random:ANS-f2:raw:0.03125",
                     "--diagnose", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "probe_compression.json").read_text())
    got = [(m["dataset"], m["codec"], m["layout"], m["chunk"] // 1024, m["variant"]["name"]) for m in res["measured"]]
    assert got == [("bf16", None, "plain", 32, "async"),
                   *[("bf16", "ANS-f2", "raw", 32, v) for v in ("async", "async-binding", "async-unaligned", "lockstep")],
                   ("bf16", None, "plain", 64, "async"), ("bf16", "ANS", "split-hi", 64, "async"),
                   ("random", None, "plain", 32, "async"), ("random", "ANS-f2", "raw", 32, "async")]
    assert all(m["exact"] and "error" not in m for m in res["measured"])
    assert all(m["sleep_stages"]["bound"] and "copy" in m["wake_stages"]["busy_s"] for m in res["measured"])


def logged_pipeline(nvcomp, monkeypatch, variant: str):
    """A raw ANS pipeline of 6 chunks whose codec calls and host-memory accesses land in a log, in order."""
    log: list[str] = []
    for name in ("encode", "size", "decode"):
        real = getattr(probe.Coder, name)
        monkeypatch.setattr(probe.Coder, name, lambda self, *a, _real=real, _n=name, **k: (log.append(_n), _real(self, *a, **k))[1])
    real_host = probe.Pipeline._host
    monkeypatch.setattr(probe.Pipeline, "_host", lambda self, off, n: (log.append("host"), real_host(self, off, n))[1])
    dev = torch.device("cpu")
    src = random_bf16(6 * 4096, seed=5).view(torch.uint8)
    coder = probe.Coder(nvcomp, probe.CODECS[0], probe.Lane(dev), dev)
    kwargs = {"variant": probe.variants(4)[variant]} if hasattr(probe, "variants") else {}
    p = probe.Pipeline(src, torch.empty(4 * src.numel(), dtype=torch.uint8), 8192, "raw", coder, probe.Lane(dev),
                       probe.Lane(dev), **kwargs)
    return p, log


def test_sleep_compresses_ahead_and_asks_the_binding_no_size_once_the_header_is_known(fake_nvcomp, monkeypatch):
    p, log = logged_pipeline(fake_nvcomp, monkeypatch, "async")
    probe.measure_pipeline(p, 1, torch.device("cpu"))  # warm-up learns the header's size field
    log.clear()
    p.sleep()
    assert log.count("encode") == 6 and log.count("size") == 0, log
    # with the binding's sizes, chunk 0's size is asked only after chunks 1 and 2 are queued for compression
    p, log = logged_pipeline(fake_nvcomp, monkeypatch, "async-binding")
    p.sleep()
    assert log[:4] == ["encode", "encode", "encode", "size"], log


def test_wake_copies_chunks_ahead_of_the_one_it_decodes(fake_nvcomp, monkeypatch):
    p, log = logged_pipeline(fake_nvcomp, monkeypatch, "async")
    p.sleep()
    log.clear()
    p.wake()
    assert log[:5] == ["host", "host", "host", "host", "decode"], log
    assert torch.equal(p.back, p.src)


def test_measured_stages_give_the_copy_lanes_rate_in_the_bytes_it_moved(fake_nvcomp):
    p = cpu_pipeline(fake_nvcomp, 0, "split-hi", "async")
    m = probe.measure_pipeline(p, 1, torch.device("cpu"))
    for st in (m["sleep_stages"], m["wake_stages"]):
        assert st["copy_gbps"] == pytest.approx(m["host_bytes"] / st["busy_s"]["copy"] / 1e9)
        assert " GB/s both " in probe.stages_text(st)
