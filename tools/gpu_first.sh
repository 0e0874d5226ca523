#!/usr/bin/env bash
# Issue 17 items 2 and 3 without vLLM, one GPU call (about 4-6 min on an H200): the build, the cuda tests
# (the whole cuda suite but multi-GPU: the new alloc_history test and the host-preparation tests among them),
# benchmarks/first_sleep.py (the first sleep right after loading, full speed vs throttled preparation, against
# the pinned-copy limit of the same run) and benchmarks/probe_level2.py (level 2 against the driver's floor
# for the same handles, same run). Logs under $OUT: build.log, cuda-tests.log, first_sleep.log,
# probe_level2.log, machine.txt.
#
# Call (device tool): command "bash tools/gpu_first.sh", carry [], kind nvidia-h200, timeout_s 600.
# Read: cuda-tests.log ends "N passed"; first_sleep.log's table: "full speed" rows >= 0.9 x limit at 0 s
# and later; probe_level2.log's "driver floor" line against the 1 s pause row's total (target <= 1.1 x).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_lib.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
machine_facts
step build timeout 240 make PYTHON=python3 build
step cuda-tests timeout 200 python3 -m pytest -m cuda -q -rs tests --ignore=tests/test_multi_gpu_cuda.py
step first_sleep timeout 120 python3 benchmarks/first_sleep.py --weights-gib 32 --rates 0 5e8 --after 0 2 10
step probe_level2 timeout 120 python3 benchmarks/probe_level2.py --weights-gib 16 --kv-gib 48 --cycles 4
exit $status
