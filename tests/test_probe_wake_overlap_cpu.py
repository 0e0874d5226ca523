"""Issue 17 item 1's wake-overlap probe, on the CPU: its figures, medians, diagnosis and table from made-up
runs (the driver calls themselves need a GPU: benchmarks/probe_wake_overlap.py on one)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import probe_wake_overlap as probe  # noqa: E402

GB = int(1e9)
SIZES = [4 * GB] * 4  # 16 GB copied, one event per 4 GB


def run(total, calls=(), copy=None):
    """copy: (start_s, enqueue_s, [end_s of each 4 GB])."""
    r = {"total_s": total, "calls": [list(c) for c in calls]}
    if copy:
        r.update(copy_start_s=copy[0], enqueue_s=copy[1], copy_ends_s=list(copy[2]), copy_sizes=SIZES)
    return r


COPIES_ALONE = run(0.30, copy=(0.0, 0.01, [0.075, 0.15, 0.225, 0.30]))  # 53.3 GB/s
K_ALONE = run(0.25, calls=[("create", 0.0, 0.20), ("map", 0.20, 0.24), ("access", 0.24, 0.25)])
# The core's order where the copies crawl while cuMemCreate runs and catch up after it.
CORE_SERIALIZED = run(0.45, calls=[("create", 0.01, 0.21), ("map", 0.21, 0.25), ("access", 0.25, 0.26)],
                      copy=(0.0, 0.01, [0.10, 0.20, 0.35, 0.45]))
# K created first (0.01 s), the copies at full speed beside map + access.
CREATED_FIRST = run(0.31, calls=[("create", 0.0, 0.01), ("map", 0.02, 0.22), ("access", 0.22, 0.24)],
                    copy=(0.01, 0.01, [0.085, 0.16, 0.235, 0.31]))
SPLIT_SERIALIZED = run(0.52, calls=[("create", 0.01, 0.23), ("map", 0.23, 0.27), ("access", 0.27, 0.29)],
                       copy=(0.0, 0.01, [0.12, 0.24, 0.40, 0.52]))
THREAD_SERIALIZED = run(0.48, calls=[("create", 0.0, 0.22), ("map", 0.22, 0.26), ("access", 0.26, 0.27)],
                        copy=(0.0, 0.01, [0.11, 0.22, 0.37, 0.48]))


def scenario(**override):
    runs = {"a": COPIES_ALONE, "b": K_ALONE, "c": CORE_SERIALIZED, "d": CREATED_FIRST, "e": SPLIT_SERIALIZED,
            "f": THREAD_SERIALIZED}
    runs.update(override)
    return {k: [v] * 3 for k, v in runs.items()}


def test_figures_of_a_run_with_copies_and_calls():
    f = probe.run_figures(CORE_SERIALIZED)
    assert f["total_s"] == 0.45 and f["copy_done_s"] == 0.45 and f["copy_s"] == 0.45
    assert f["copy_gbps"] == pytest.approx(16 / 0.45)
    assert f["driver_s"] == pytest.approx(0.25)
    assert f["driver_by_call_s"] == pytest.approx({"create": 0.20, "map": 0.04, "access": 0.01})
    assert f["driver_end_s"] == 0.26
    # calls from 0.01 to 0.26 s: 0.4 GB done by 0.01, 9.6 GB by 0.26 -> 9.2 GB in 0.25 s
    assert f["copy_gbps_during_driver"] == pytest.approx(9.2 / 0.25)


def test_figures_of_the_calls_alone_and_the_copies_alone_leave_the_other_side_empty():
    b = probe.run_figures(K_ALONE)
    assert b["copy_done_s"] is None and b["copy_gbps"] is None and b["copy_gbps_during_driver"] is None
    assert b["driver_s"] == pytest.approx(0.25)
    a = probe.run_figures(COPIES_ALONE)
    assert a["driver_s"] == 0 and a["driver_end_s"] is None and a["copy_gbps_during_driver"] is None
    assert a["copy_gbps"] == pytest.approx(16 / 0.30)


def test_copy_times_count_from_the_start_event_not_the_run_start():
    f = probe.run_figures(CREATED_FIRST)  # copies enqueued 0.01 s in, after K's create
    assert f["copy_done_s"] == 0.31 and f["copy_s"] == pytest.approx(0.30)


@pytest.mark.parametrize("call", [("unmap", 0.0, 1.0), ("map", 0.5, 0.4), ("map", 0.1)])
def test_a_malformed_call_record_is_named(call):
    with pytest.raises(ValueError, match="a call must be"):
        probe.run_figures(run(1.0, calls=[call]))


def test_summary_takes_medians_and_compares_with_the_fully_overlapped_wake():
    runs = scenario()
    runs["c"] = [CORE_SERIALIZED, run(0.60, calls=CORE_SERIALIZED["calls"], copy=(0.0, 0.01, [0.1, 0.2, 0.35, 0.6])),
                 run(0.40, calls=CORE_SERIALIZED["calls"], copy=(0.0, 0.01, [0.1, 0.2, 0.3, 0.4]))]
    s = probe.summarize(runs)
    assert s["ideal_s"] == 0.30 and s["serial_s"] == pytest.approx(0.55)
    c = s["variants"]["c"]
    assert c["total_s"] == 0.45 and c["total_all_s"] == [0.45, 0.60, 0.40]
    assert c["x_ideal"] == pytest.approx(1.5)
    assert s["variants"]["b"]["x_ideal"] == pytest.approx(0.25 / 0.30)
    assert list(s["variants"]) == [v for v in probe.VARIANTS if v in runs]  # in the table's order


def test_summary_needs_both_references_and_known_variants():
    with pytest.raises(ValueError, match=r"\['b'\] have no runs"):
        probe.summarize({"a": [COPIES_ALONE], "c": [CORE_SERIALIZED]})
    with pytest.raises(ValueError, match=r"unknown variants \['z'\]"):
        probe.summarize({**scenario(), "z": [COPIES_ALONE]})


def test_diagnosis_when_create_collides_and_creating_first_fixes_it():
    lines = probe.diagnose(probe.summarize(scenario()))
    text = "\n".join(lines)
    assert "c (the core's order) takes 1.50 x" in text
    assert "the copies slow down while the driver calls run (36.8 GB/s vs 53.3 alone)" in text
    assert "copy enqueue blocks" not in text and "take longer beside the copies" not in text
    assert "cuMemCreate is what collides" in text
    assert any(line.startswith("d overlaps (1.03 x): fix: create the handles") for line in lines)
    assert not any(line.startswith(("e overlaps", "f overlaps")) for line in lines)


def test_diagnosis_names_a_blocking_enqueue_and_slow_calls():
    blocked = run(0.55, calls=[("create", 0.25, 0.45), ("map", 0.45, 0.50), ("access", 0.50, 0.52)],
                  copy=(0.0, 0.25, [0.075, 0.15, 0.225, 0.55]))
    text = "\n".join(probe.diagnose(probe.summarize(scenario(c=blocked))))
    assert "the copy enqueue blocks (0.250 s vs 0.010 s alone)" in text
    assert "the driver calls take longer beside the copies (0.270 s vs 0.250 s alone" not in text  # within 1.2 x
    slow = run(0.50, calls=[("create", 0.0, 0.01), ("map", 0.01, 0.45), ("access", 0.45, 0.50)],
               copy=(0.0, 0.01, [0.075, 0.15, 0.225, 0.30]))
    text = "\n".join(probe.diagnose(probe.summarize(scenario(c=slow))))
    assert "the driver calls take longer beside the copies (0.500 s vs 0.250 s alone; map, access)" in text


def test_diagnosis_when_nothing_overlaps_names_the_best_order():
    late = run(0.50, calls=[("create", 0.0, 0.20), ("map", 0.21, 0.25), ("access", 0.25, 0.26)],
               copy=(0.20, 0.01, [0.275, 0.35, 0.425, 0.50]))
    lines = probe.diagnose(probe.summarize(scenario(d=late)))
    assert "map / access collide too" not in "\n".join(lines)  # d's copies ran at full speed
    assert lines[-1].startswith("no variant overlaps within 1.05 x: the best is c (1.50 x, 0.450 s)")


def test_diagnosis_when_the_core_order_already_overlaps():
    fine = run(0.31, calls=K_ALONE["calls"], copy=(0.0, 0.01, [0.08, 0.16, 0.235, 0.31]))
    lines = probe.diagnose(probe.summarize(scenario(c=fine)))
    assert lines[-1].startswith("c (the core's order) overlaps here (1.03 x)")


def test_table_and_json_of_a_result():
    summary = probe.summarize(scenario())
    res = {"copy_bytes": 16 << 30, "k_bytes": 96 << 30, "piece_bytes": 64 << 20, "split_bytes": 2 << 30, "reps": 3,
           "summary": summary, "diagnosis": probe.diagnose(summary)}
    out = probe.table(res)
    rows = {line.split()[0]: line for line in out.splitlines() if line[:2] in {f"{k} " for k in probe.VARIANTS}}
    assert set(rows) == set(summary["variants"])
    assert rows["b"].split()[-10:] == ["0.250", "-", "-", "0.250", "0.250", "0.200/0.040/0.010", "-", "-", "-", "0.83"]
    assert len({len(rows[k]) for k in rows}) == 1  # the columns line up, "-" included
    assert rows["c"].split()[-1] == "1.50" and "0.200/0.040/0.010" in rows["c"]
    assert rows["c"].split()[-10:-6] == ["0.450", "0.450", "0.450", "0.260"]  # total, copies done, their time, calls done
    assert "WAKE-OVERLAP 16 GiB + K 96 GiB: copies alone 0.300 s (53.3 GB/s), K alone 0.250 s, core order (c) 1.50 x" \
        in out
    assert "best d 1.03 x" in out
    assert "diagnosis: d overlaps" in out
    json.loads(json.dumps(res))


def test_sizes_cap_k_at_free_memory_and_refuse_when_nothing_is_left():
    GiB = 1 << 30
    assert probe.plan_sizes(16, 96, 4, 140 * GiB) == (16 * GiB, 96 * GiB, "")
    copy, k, note = probe.plan_sizes(16, 96, 4, 100 * GiB)
    assert k == 80 * GiB and "K capped from 96 to 80.00 GiB" in note
    with pytest.raises(ValueError, match="no room for K: 18.00 GiB free"):
        probe.plan_sizes(16, 96, 4, 18 * GiB)


def test_bad_options_are_named(capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["--copy-gib", "0", "--pause-s", "-1"])
    err = capsys.readouterr().err
    assert "--copy-gib=0.0" in err and "--pause-s=-1.0" in err


def test_without_a_gpu_the_probe_says_so_and_exits_2(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: main() would run the probe")
    assert probe.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


# ---- the variants' orchestration, against a stand-in for the driver ------------------------------------------


class FakeDriver:
    """Records every call and checks the VMM bookkeeping a real driver would refuse; the copy stream
    "runs" at 50 GB/s from its start event (elapsed times come from the bytes enqueued before each event)."""

    GRAN = 2 << 20

    def __init__(self):
        self.log, self.handles, self.mapped, self.reserved = [], {}, {}, {}
        self.bytes_enqueued, self.event_bytes, self.next = 0, {}, 1
        self.threads = set()

    def _note(self, name, *args):
        import threading
        self.log.append((name, threading.current_thread().name) + args)

    def stream(self):
        return "stream"

    def granularity(self):
        return self.GRAN

    def reserve(self, size):
        base = self.next << 44
        self.next += 1
        self.reserved[base] = size
        return base

    def address_free(self, base, size):
        assert self.reserved.pop(base) == size
        assert not any(base <= a < base + size for a in self.mapped), "address freed while mapped"

    def create(self, size):
        assert size % self.GRAN == 0
        h = self.next
        self.next += 1
        self.handles[h] = size
        self._note("create", size)
        return h

    def map(self, ptr, size, h):
        assert self.handles[h] == size and ptr not in self.mapped
        self.mapped[ptr] = size
        self._note("map", size)

    def set_access(self, ptr, size):
        assert self.mapped[ptr] == size
        self._note("access", size)

    def unmap(self, ptr, size):
        assert self.mapped.pop(ptr) == size

    def release(self, h):
        del self.handles[h]

    def event(self):
        self.next += 1
        return self.next

    def record(self, event, stream):
        self.event_bytes[event] = self.bytes_enqueued

    def memset_d8(self, dst, value, size, stream):
        assert any(b <= dst and dst + size <= b + s for b, s in self.mapped.items()), "memset of unmapped memory"
        self._note("memset", size)

    def copy_h2d(self, dst, src, size, stream):
        assert any(b <= dst and dst + size <= b + s for b, s in self.mapped.items()), "copy into unmapped memory"
        self.bytes_enqueued += size
        self._note("copy", size)

    def sync(self, stream):
        pass

    def elapsed_s(self, start, end):
        return (self.event_bytes[end] - self.event_bytes[start]) / 50e9

    def current_context(self):
        return "ctx"

    def set_current(self, ctx):
        assert ctx == "ctx"


MiB = 1 << 20


def make_probe():
    drv = FakeDriver()
    p = probe.Probe(drv, host_ptr=1 << 40, copy_bytes=256 * MiB, piece_bytes=64 * MiB, event_every=128 * MiB,
                    k_bytes=1000 * MiB + 5, split_bytes=384 * MiB)
    return drv, p


@pytest.mark.parametrize("variant,k_calls", [
    ("b", ["create", "map", "access"]),
    ("c", ["create", "map", "access"]),
    ("d", ["create", "map", "access"]),
    ("e", ["create", "map", "access"] * 3),
    ("f", ["create", "map", "access"]),
])
def test_each_variant_makes_its_calls_in_its_order_and_leaves_nothing_of_k(variant, k_calls):
    drv, p = make_probe()
    assert p.k_bytes == 1000 * MiB and p.k_split == [384 * MiB, 384 * MiB, 232 * MiB]
    drv.log.clear()
    r = p.run(variant)
    names = [e[0] for e in drv.log]
    assert [n for n in names if n != "copy"] == k_calls
    assert [c[0] for c in r["calls"]] == k_calls
    if variant == "b":
        assert "copy" not in names and "copy_ends_s" not in r
    else:
        assert names.count("copy") == 4
        assert r["copy_sizes"] == [128 * MiB, 128 * MiB] and len(r["copy_ends_s"]) == 2
        assert r["copy_ends_s"][-1] == pytest.approx(r["copy_start_s"] + 256 * MiB / 50e9)
    if variant == "c":
        assert names.index("create") > max(i for i, n in enumerate(names) if n == "copy")  # copies enqueued first
    if variant == "d":
        assert names[0] == "create" and names[-1] == "access" and names[1:5] == ["copy"] * 4
    if variant == "f":
        assert {e[1] for e in drv.log if e[0] != "copy"} == {"probe-k-calls"}
        assert {e[1] for e in drv.log if e[0] == "copy"} == {"MainThread"}
    assert r["total_s"] >= max(c[2] for c in r["calls"])  # the second thread's calls too
    p.release_k()
    assert set(drv.handles) == {p.dst_handle} and list(drv.mapped) == [p.dst[0]]
    p.close()
    assert not drv.handles and not drv.mapped and not drv.reserved


def test_copies_alone_and_a_second_thread_failure_is_reported_and_cleaned_up():
    drv, p = make_probe()
    r = p.run("a")
    assert r["calls"] == [] and len(r["copy_ends_s"]) == 2
    figs = probe.run_figures(r)
    assert figs["copy_gbps"] == pytest.approx(256 * MiB / (256 * MiB / 50e9) / 1e9)

    def refuse(size):
        raise RuntimeError("cuMemCreate failed: CUresult 2 (CUDA_ERROR_OUT_OF_MEMORY)")

    drv.create = refuse
    with pytest.raises(RuntimeError, match="variant f: the second thread's driver calls failed: cuMemCreate failed"):
        p.run("f")
    p.close()
    assert not drv.mapped and not drv.reserved


def test_unknown_variant_is_named():
    _, p = make_probe()
    with pytest.raises(ValueError, match="unknown variant 'z'"):
        p.run("z")


def test_a_second_thread_that_fails_before_the_start_does_not_hang_the_probe():
    drv, p = make_probe()

    def no_context(ctx):
        raise RuntimeError("cuCtxSetCurrent failed: CUresult 201 (CUDA_ERROR_INVALID_CONTEXT)")

    drv.set_current = no_context
    with pytest.raises(RuntimeError, match="failed before the start: cuCtxSetCurrent failed"):
        p.run("f")
    assert "copy" not in [e[0] for e in drv.log]
    p.close()


def segments_probe():
    """A probe whose copies' destination is in 3 segments (g to j), its driver log empty."""
    drv = FakeDriver()
    p = probe.Probe(drv, host_ptr=1 << 40, copy_bytes=256 * MiB - 6, piece_bytes=64 * MiB, event_every=128 * MiB,
                    k_bytes=1000 * MiB, split_bytes=384 * MiB, segments=3)
    drv.log.clear()
    return drv, p


@pytest.mark.parametrize("variant", ["g", "h"])
def test_many_segments_mapped_between_the_copies_or_before_them(variant):
    drv, p = segments_probe()
    assert p.seg_sizes == [86 * MiB, 86 * MiB, 84 * MiB]
    r = p.run(variant)
    names = [e[0] for e in drv.log]
    copies = [i for i, n in enumerate(names) if n == "copy"]
    maps = [i for i, n in enumerate(names) if n == "map"]
    assert names.count("create") == 4 and len(maps) == 4  # three segments, then K
    assert sum(e[2] for e in drv.log if e[0] == "copy") == 256 * MiB - 6  # every byte, no copy over a segment's end
    if variant == "g":  # each segment's copies right after its map, K after all of them
        assert maps[0] < copies[0] < maps[1] < maps[2] < copies[-1] < maps[3]
    else:
        assert maps[-1] < copies[0]
    assert r["copy_sizes"] == [256 * MiB - 6]
    assert r["copy_ends_s"][0] == pytest.approx(r["copy_start_s"] + (256 * MiB - 6) / 50e9)
    assert [c[0] for c in r["calls"]] == ["create", "map", "access"] * 4
    p.release_k()
    assert set(drv.handles) == {p.dst_handle}
    p.close()
    assert not drv.handles and not drv.mapped and not drv.reserved


@pytest.mark.parametrize("variant", ["k", "n"])
def test_segments_mapped_first_or_created_first_keep_k_behind_the_copies(variant):
    drv, p = segments_probe()
    r = p.run(variant)
    names = [e[0] for e in drv.log]
    copies = [i for i, n in enumerate(names) if n == "copy"]
    creates = [i for i, n in enumerate(names) if n == "create"]
    maps = [i for i, n in enumerate(names) if n == "map"]
    assert len(creates) == 4 and len(maps) == 4
    assert sum(e[2] for e in drv.log if e[0] == "copy") == 256 * MiB - 6
    assert creates[-1] > copies[-1] and maps[-1] > copies[-1]  # K's calls after every copy was enqueued
    if variant == "k":  # every segment mapped before the first copy
        assert maps[2] < copies[0]
        assert [c[0] for c in r["calls"]] == ["create", "map", "access"] * 4
    else:  # every segment's handle created first, each mapped just before its copies
        assert creates[2] < maps[0] < copies[0] < maps[1] < maps[2] < copies[-1]
        assert [c[0] for c in r["calls"]] == ["create"] * 3 + ["map", "access"] * 3 + ["create", "map", "access"]
    assert r["copy_ends_s"][0] == pytest.approx(r["copy_start_s"] + (256 * MiB - 6) / 50e9)
    p.release_k()
    p.close()
    assert not drv.handles and not drv.mapped and not drv.reserved


def test_segments_mapped_on_a_second_thread_are_copied_in_order_once_mapped():
    drv, p = segments_probe()
    r = p.run("m")
    calls = [e for e in drv.log if e[0] != "copy"]
    copies = [e for e in drv.log if e[0] == "copy"]
    assert {e[1] for e in calls} == {"probe-segment-calls"} and {e[1] for e in copies} == {"MainThread"}
    assert [e[0] for e in calls] == ["create", "map", "access"] * 4
    assert sum(e[2] for e in copies) == 256 * MiB - 6
    # a segment's copies only after its access: the n-th copy group follows the n-th access in the log
    log = [e[0] for e in drv.log]
    accesses = [i for i, n in enumerate(log) if n == "access"]
    first_copy = log.index("copy")
    assert accesses[0] < first_copy
    assert r["copy_ends_s"][0] == pytest.approx(r["copy_start_s"] + (256 * MiB - 6) / 50e9)
    assert r["total_s"] >= max(c[2] for c in r["calls"])
    p.release_k()
    p.close()
    assert not drv.handles and not drv.mapped and not drv.reserved


def test_a_second_thread_that_fails_to_map_a_segment_is_reported_and_cleaned_up():
    drv, p = segments_probe()
    made = []
    real_create = drv.create

    def create(size):
        if len(made) == 2:
            raise RuntimeError("cuMemCreate failed: CUresult 2 (CUDA_ERROR_OUT_OF_MEMORY)")
        made.append(size)
        return real_create(size)

    drv.create = create
    with pytest.raises(RuntimeError, match="variant m: the second thread's driver calls failed: cuMemCreate failed"):
        p.run("m")
    p.release_k()
    p.close()
    assert not drv.mapped and not drv.reserved


def variant(total, driver):
    """A variant's medians, as far as the comparison lines read them."""
    return {"total_s": total, "driver_s": driver}


def test_segment_order_lines_compare_k_m_and_n_with_g():
    v = {"a": variant(0.311, 0.0), "g": variant(0.340, 0.040), "k": variant(0.320, 0.045),
         "m": variant(0.341, 0.041), "n": variant(0.360, 0.040)}
    lines = probe.segment_orders({"variants": v})
    assert lines[0] == ("segments, every segment mapped before the copies, K after them (k): 0.320 s (driver 0.045 s, "
                        "1.03 x the copies alone) against g 0.340 s: faster")
    assert lines[1].startswith("segments, the calls on a second thread (m)") and lines[1].endswith(": the same")
    assert lines[2].startswith("segments, every handle created first (n)") and lines[2].endswith(": slower")
    del v["g"]
    assert probe.segment_orders({"variants": v}) == []


def test_many_maps_line_compares_g_and_h():
    summary = {"variants": {"a": variant(0.30, 0.0), "g": variant(0.45, 0.25), "h": variant(0.31, 0.013)}}
    [line] = probe.many_maps(summary)
    assert "(g) 0.450 s (driver 0.250 s)" in line and "(h) 0.310 s" in line and line.endswith("mapping first is faster")
    summary["variants"]["h"] = variant(0.45, 0.02)
    assert probe.many_maps(summary)[0].endswith("the two orders cost the same")
    del summary["variants"]["g"]
    assert probe.many_maps(summary) == []


@pytest.mark.parametrize("variant,like", [("i", "g"), ("j", "h"), ("l", "k")])
def test_right_after_a_release_runs_g_or_h_on_memory_written_and_released_just_before(variant, like):
    drv, p = segments_probe()
    r = p.run(variant)
    drv_like, p_like = segments_probe()
    plain = p_like.run(like)
    names = [e[0] for e in drv.log]
    prime = names[:names.index("memset")]
    assert [n for n in prime if n != "copy"] == ["create", "map", "access"] * 4  # three segments and K
    memsets = [e[2] for e in drv.log if e[0] == "memset"]
    assert sum(memsets) == 256 * MiB + 1000 * MiB  # every byte of what the run then maps again was written
    run_part = names[len(prime) + len(memsets):]
    assert "memset" not in run_part
    assert run_part == [e[0] for e in drv_like.log]  # then exactly g's, h's or k's sequence
    assert [c[0] for c in r["calls"]] == [c[0] for c in plain["calls"]]  # the priming's calls are not the run's
    assert r["release_s"] >= 0 and "release_s" not in plain
    p.release_k()
    p.close()
    assert not drv.handles and not drv.mapped and not drv.reserved


def test_just_released_lines_compare_i_with_g_and_j_with_h():
    v = {"a": variant(0.31, 0.0), "g": variant(0.338, 0.039), "h": variant(0.355, 0.042),
         "i": variant(0.470, 0.160), "j": variant(0.360, 0.045)}
    lines = probe.just_released({"variants": v})
    assert len(lines) == 2
    assert lines[0].startswith("just released: g's order 0.338 s (driver 0.039 s) after a pause, 0.470 s (driver 0.160 s)")
    assert lines[0].endswith("re-creating just-freed memory costs 0.132 s more")
    assert lines[1].endswith("re-creating just-freed memory costs nothing more")
    v["k"], v["l"] = variant(0.320, 0.045), variant(0.560, 0.250)
    [*_, line] = probe.just_released({"variants": v})
    assert line.startswith("just released: k's order 0.320 s") and line.endswith("costs 0.240 s more")
    del v["i"], v["j"], v["k"], v["l"]
    assert probe.just_released({"variants": v}) == []
    slow = run(0.50, calls=K_ALONE["calls"], copy=(0.0, 0.01, [0.08, 0.16, 0.235, 0.31]))
    lines = probe.diagnose(probe.summarize(scenario(g=CREATED_FIRST, h=CREATED_FIRST, i=slow, j=CREATED_FIRST)))
    assert lines[-2].startswith("just released: g's order 0.310 s") and lines[-2].endswith("costs 0.190 s more")
    assert lines[-1].endswith("costs nothing more")
