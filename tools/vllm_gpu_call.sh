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
    bash "$src/$installer" "$parts" 2>&1 | tee "$OUT/install-$kit.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && rm -rf "$parts"  # the parts are not needed once the site dir verified (0.33: 890 MB)
    exit "$rc" ;;
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
