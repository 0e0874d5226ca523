"""benchmarks/probe_disk.py on the CPU: it measures a real (small) file the way the disk tier writes one,
leaves nothing in the directory, and reports what bench_disk_tier.py reads."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import probe_disk  # noqa: E402


def test_probe_measures_both_directions_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    assert probe_disk.main(["--dir", str(data), "--gib", str(40 / 1024), "--threads", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| write (sequential) |" in printed and "DISK write" in printed
    result = json.loads((out / "probe_disk.json").read_text())
    assert result["bytes"] == 40 << 20 and result["threads"] == 2
    assert result["write_gbps"] > 0 and result["read_gbps"] > 0
    assert os.listdir(data) == []  # the file never had a name
