#!/usr/bin/env bash
# The whole GPU job, for one call of a lent GPU machine: build, the cuda tests, the demo, the benchmarks.
# Usage: tools/gpu_job.sh [build|tests|demo|bench|soak|probe|wakeprobe|firstcreate|wakerested|multi|vllm|all]...   Logs go to $OUT (default ./gpu-out).
# The vllm stage needs vLLM 0.26.0 unpacked at /tmp/vsite (../shared/vllm-gpu); VLLM_SCENARIOS picks its
# scenarios (tests/vllm_gpu/run.sh). `all` leaves vllm out (it needs the two calls that send vLLM first).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_lib.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Wheels carried to a machine with no registry (e.g. torch_memory_saver for the peer comparison).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
want() { for s in "${stages[@]}"; do [ "$s" = "$1" ] || [ "$s" = all ] && return 0; done; return 1; }
machine_facts
step build make build
want tests && step tests python3 -m pytest -m cuda -v -rs tests --ignore=tests/test_multi_gpu_cuda.py
want multi && step multi python3 -m pytest -m cuda -v -rs tests/test_multi_gpu_cuda.py
want demo && step demo python3 -m vllm_sleep_ext demo
# BENCH_ARGS: e.g. "--skip level1 peers --l2-cycles 10" for a shorter run.
want bench && step bench python3 benchmarks/bench_sleep.py --out "$OUT" ${BENCH_ARGS:-}
want soak && step soak python3 benchmarks/soak.py
want vllm && [ "${stages[*]}" != all ] && step vllm_summary bash tests/vllm_gpu/run.sh ${VLLM_SCENARIOS:-flows}
want probe && step probe_vmm python3 benchmarks/probe_vmm_calls.py
want probe && step probe_pin python3 benchmarks/probe_pin.py ${PROBE_PIN_ARGS:-}
want probe && step probe_level2 python3 benchmarks/probe_level2.py
# Issue 17 item 1: do creating/mapping a KV-sized allocation and the wake's copies overlap? ~1 min, 16 GiB pinned.
# Alone: OUT=$OUT bash tools/gpu_job.sh wakeprobe (carry nothing; ~2-3 min with the build). WAKEPROBE_ARGS: e.g. "--kv-gib 64".
want wakeprobe && step wakeprobe python3 benchmarks/probe_wake_overlap.py --out "$OUT" ${WAKEPROBE_ARGS:-}
# Alone: OUT=$OUT bash tools/gpu_job.sh firstcreate (~1.5 min): the first cuMemCreate after a pause (issue 17 item 1).
want firstcreate && step firstcreate python3 benchmarks/probe_first_create.py --out "$OUT"
# Alone: OUT=$OUT bash tools/gpu_job.sh build wakerested (~1.5 min): the wake after a rest, primed and not (issue 17 item 1).
want wakerested && step wakerested python3 benchmarks/bench_wake_rested.py --out "$OUT" ${WAKERESTED_ARGS:-}
exit $status
