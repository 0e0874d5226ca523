#!/usr/bin/env bash
# Issue 19 on one GPU: builds the package, runs the compression GPU tests (tests/test_compress_cuda.py) and
# benchmarks/bench_compress.py (8B-shaped bf16 and random bytes; off / auto / on against the pinned-copy
# limit), logs under $OUT. nvCOMP comes from the two carried wheels (no registry there), installed with
# pip --target into /tmp/nvcomp-site; vllm_sleep_ext.compress loads libnvcomp.so.6 from it. About 3 minutes
# (build ~1, tests ~0.5, benchmark ~1.5).
#
# Call (device tool), from the repository root:
#   command: OUT=$OUT bash tools/gpu_compress.sh
#   carry:   [".whl/nvidia_nvcomp_cu13-6.0.0.12-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
#             ".whl/nvidia_libnvcomp_cu13-6.0.0.12-py3-none-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"]
#   timeout: 420 s
# Read: $OUT/bench_compress.md (table + verdict lines "... MET / NOT MET"), $OUT/tests.log (pytest summary).
# Branch plainwake: "random auto vs plain: ... wake" should reach >= 0.97 x (0.914 x before), the random rows'
# "staging MiB sleep / wake" showing a wake staging of one piece's slot (or 0), not 866 (tools/vllm_gpu_calls.md).
set -uo pipefail
cd "$(dirname "$0")/.."
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
source tools/gpu_lib.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
machine_facts
if ls .whl/nvidia_*nvcomp_cu13-*.whl >/dev/null 2>&1; then
  step nvcomp_install python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nvcomp-site \
    .whl/nvidia_*nvcomp_cu13-*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/nvcomp-site"
else
  echo "no nvCOMP wheels carried in .whl/: the tests will skip and the benchmark will stop" | tee "$OUT/nvcomp_install.log"
fi
step build make build
step tests python3 -m pytest -m cuda -v -rs tests/test_compress_cuda.py
step bench python3 benchmarks/bench_compress.py --out "$OUT" ${BENCH_ARGS:-}
exit $status
