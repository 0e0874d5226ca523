#!/usr/bin/env bash
# One step of a device call for the real-vLLM GPU suite (the calls, in order: tools/vllm_gpu_calls.md).
#   tools/vllm_gpu_call.sh part KIT PNN...     keep carried parts of a vLLM kit under /tmp/vparts-KIT
#   tools/vllm_gpu_call.sh install KIT         the kit's installer on every part (the last ones carried now)
#   tools/vllm_gpu_call.sh suite KIT SCENARIO...   tests/vllm_gpu/run.sh with VLLM_KIT=KIT (SUITE_BUDGET_S,
#                                              FEATURES, REINSTALL pass through)
# KIT: 0.33 (parts in .vllm033, ../shared/vllm-gpu-033) or 0.26 (parts in .vllm-gpu, ../shared/vllm-gpu).
# Logs go to $OUT (at most 8 files come back from a call): install-KIT.log, vllm-KIT.log, vllm-results.jsonl,
# machine.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
step=${1:?usage: vllm_gpu_call.sh part|install|suite KIT ...}
kit=${2:?KIT: 0.33 or 0.26}
shift 2
case $kit in
  0.33) src=.vllm033; installer=install033.sh ;;
  0.26) src=.vllm-gpu; installer=install.sh ;;
  *) echo "KIT $kit: must be 0.33 or 0.26"; exit 2 ;;
esac
parts=/tmp/vparts-$kit
keep_carried() {  # every part file and parts.sha256 carried in this call, into $parts
  mkdir -p "$parts" && cp "$src/parts.sha256" "$parts/" || return 1
  for p in "$src"/p[0-9][0-9]; do [ -f "$p" ] && cp "$p" "$parts/"; done
  echo "[call] kit $kit: $(cd "$parts" && ls p[0-9][0-9] | tr '\n' ' ')of $(wc -l < "$parts/parts.sha256") parts here"
}
case $step in
  part)
    keep_carried ;;
  install)
    keep_carried || exit 2
    if [ "$kit" = 0.33 ]; then
      # The 0.33 kit as packed lacks compressed-tensors (imported on vLLM 0.33's model-loading path) and
      # loguru and frozendict (its needs), and its smoke test wants a platform class named "Cuda*" where
      # vLLM 0.33 has NvmlCudaPlatform (first GPU run, 2026-12-02). So: install without the smoke test,
      # add the carried wheels (.whl/ct), then run the kit's smoke test and our own checks.
      SKIP_SMOKE=1 bash "$src/$installer" "$parts" 2>&1 | tee "$OUT/install-$kit.log"
      rc=${PIPESTATUS[0]}
      [ "$rc" -eq 0 ] || exit "$rc"
      ls .whl/ct/*.whl >/dev/null 2>&1 || { echo "[call] .whl/ct/*.whl not carried (tools/vllm_gpu_calls.md)"; exit 7; }
      python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/vsite033 .whl/ct/*.whl 2>&1 | grep -v WARNING
      PYTHONPATH=/tmp/vsite033 PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1 python3 /tmp/vsite033/_vsite/smoke033.py \
        > /tmp/smoke033.log 2>&1
      cat /tmp/smoke033.log >> "$OUT/install-$kit.log"
      if grep "FAIL" /tmp/smoke033.log | grep -q -v -e "vllm platform NvmlCudaPlatform" -e "FAIL in "; then
        grep "FAIL" /tmp/smoke033.log; exit 6
      fi
      PYTHONPATH=/tmp/vsite033 python3 -c "import compressed_tensors, vllm.model_executor.models.llama
from vllm.platforms import current_platform as p
assert p.is_cuda(), type(p).__name__
print('[call] compressed_tensors', compressed_tensors.__version__, 'and a CUDA platform:', type(p).__name__)" \
        2>&1 | tail -1 | tee -a "$OUT/install-$kit.log" | grep -q "^\[call\]" || exit 6
    else
      bash "$src/$installer" "$parts" 2>&1 | tee "$OUT/install-$kit.log"
      rc=${PIPESTATUS[0]}
      [ "$rc" -eq 0 ] || exit "$rc"
    fi
    rm -rf "$parts"  # the parts are not needed once the site dir verified (0.33: 890 MB)
    exit 0 ;;
  suite)
    { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; df -h /tmp; } \
      >> "$OUT/machine.txt" 2>&1
    VLLM_KIT=$kit bash tests/vllm_gpu/run.sh "$@"
    rc=$?
    # a log over the 16 MiB that a call brings back is brought back compressed
    for f in "$OUT"/vllm-*.log; do [ "$(stat -c %s "$f")" -gt $((15 << 20)) ] && gzip -f "$f"; done
    exit "$rc" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
