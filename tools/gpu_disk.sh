#!/usr/bin/env bash
# Issue 18 section 2 on a GPU machine: build, the disk tier's cuda test, the disk probe and the disk-tier
# benchmark (level-1 sleep/wake of ~16 GB, 8B shape, half of the backups past the host limit on disk),
# the disk directory under /tmp. Under 4 minutes on an H200.
#
# Call (device tool `run`, carry nothing):   OUT=$OUT bash tools/gpu_disk.sh
# Read: $OUT/bench_disk_tier.log (the table and the DISKTIER PASS/FAIL line: the disk part of the last
# cycle's sleep and wake each >= 0.9 x the probe's write/read rate, data intact), $OUT/tests.log
# (2 passed), $OUT/bench_disk_tier.json, $OUT/probe_disk.log.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_lib.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VSE_DISK_DIR=${VSE_DISK_DIR:-/tmp}
machine_facts df -hT "$VSE_DISK_DIR"
step build make build
step tests timeout 120 python3 -m pytest -m cuda -v -rs tests/test_disk_tier_cuda.py
step probe_disk timeout 60 python3 benchmarks/probe_disk.py --gib 4 --dir "$VSE_DISK_DIR" --out "$OUT"
step bench_disk_tier timeout 150 python3 benchmarks/bench_disk_tier.py --dir "$VSE_DISK_DIR" --out "$OUT"
exit $status
