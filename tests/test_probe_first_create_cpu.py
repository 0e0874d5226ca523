"""The first-create probe (issue 17 item 1) on the CPU: its plan, medians, table and diagnosis from made-up runs
(the driver calls need a GPU: benchmarks/probe_first_create.py on one)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import probe_first_create as probe  # noqa: E402


def runs_where(first_ms):
    """One run per planned case (2 reps); first_ms(case) gives its first create in ms, the rest are fast."""
    out = []
    for c in probe.plan(96.0, 2):
        out.append(dict(c, info_s=0.0001, create1_s=first_ms(c) / 1e3, create2_s=0.00002, create_big_s=0.0003))
    return out


def test_plan_covers_every_case_once_per_rep():
    cases = probe.plan(96.0, 3)
    keys = {probe.key(c) for c in cases}
    assert len(cases) == 3 * len(keys)
    assert "plain R=0 GiB P=3 s" in keys and "busy R=96 GiB P=1 s" in keys and "warm_0.05 R=96 GiB P=1 s" in keys


def test_a_delay_after_a_release_that_a_warm_up_removes():
    def first(c):
        if c["case"] == "plain" and c["released_gib"] > 0 and c["pause_s"] >= 0.3:
            return 30.0
        if c["case"] in ("info_first", "warm_0.5", "warm_0.05", "busy") and c["released_gib"] > 0:
            return 0.05 if c["case"] == "warm_0.5" else 30.0
        return 0.05
    s = probe.summarize(runs_where(first))
    assert s["plain R=96 GiB P=1 s"]["create1_s"] == 30.0 and s["plain R=96 GiB P=1 s"]["reps"] == 2
    diag = "\n".join(probe.diagnose(s, 96.0))
    assert "a release makes it slow: 30.0 ms after 96 GiB, 0.1 ms with nothing released" in diag
    assert "released 0.5 s before: first create 0.1 ms against 30.0 ms (takes it away)" in diag
    assert "released 0.05 s before: first create 30.0 ms against 30.0 ms (no help)" in diag
    assert "cuMemGetInfo first does not take the delay" in diag
    assert len(probe.table(s)) == len(s) + 1


def test_idle_alone_is_named_when_nothing_released_is_slow_too():
    s = probe.summarize(runs_where(lambda c: 0.05 if c["case"] == "busy" else 25.0))
    diag = "\n".join(probe.diagnose(s, 96.0))
    assert "idle alone makes it slow: 25.0 ms with nothing released" in diag
    assert "GPU busy through the pause: first create 0.1 ms after 96 GiB (25.0 ms idle)" in diag


def test_refuses_bad_arguments(capsys):
    import pytest
    with pytest.raises(SystemExit):
        probe.parse_args(["--big-gib", "8"])
    assert "--big-gib must be > 16" in capsys.readouterr().err
