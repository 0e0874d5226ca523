#!/usr/bin/env bash
# The real-vLLM GPU suite: a vLLM kit unpacked under /tmp, this package installed into the machine's
# python so vLLM's plugin loader finds it, then engines run with our allocator and with stock vLLM's
# (VLLM_PLUGINS=""), side by side.
#
# Usage: [VLLM_KIT=0.26|0.33] tests/vllm_gpu/run.sh SCENARIO...
#   scenarios: quick flows flows-small timing timing-ours timing-stock cycles plain tp2 features duplex swap
#              first32b scope level2
#              (default: flows)
#   VLLM_KIT=0.26 (default): vLLM 0.26.0 at /tmp/vsite (../shared/vllm-gpu), the machine's torch 2.11.
#   VLLM_KIT=0.33: vLLM 0.33.0 at /tmp/vsite033 with its carried torch 2.14 (../shared/vllm-gpu-033).
#   FEATURES="lora ngram ...": the features scenario's list (default: all of tests/vllm_gpu/features.py);
#   FEATURE_JOBS (default 4): its runs at once on the one GPU (they take turns for GPU work).
#   WHO="ours" (default "stock ours"): which engines the features and cycles scenarios run (stock's
#   runs already recorded need not be repeated).
#   VLLM_SITE: the kit's site dir, if not the default above.
#   REINSTALL=0 keeps an installed vllm_sleep_ext (default: reinstall from this tree).
# Output: $OUT/vllm-<kit>.log (everything) and $OUT/vllm-results.jsonl (one RESULT per engine run, each
# with the kit and the vLLM version).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
KIT=${VLLM_KIT:-0.26}
case $KIT in
  0.26) VSITE=${VLLM_SITE:-/tmp/vsite}; KIT_ENV=() ;;
  # torch 2.14 against the machine's cuDNN 9.19: its Python-side version check would refuse (kit README)
  0.33) VSITE=${VLLM_SITE:-/tmp/vsite033}; KIT_ENV=(PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1) ;;
  *) echo "VLLM_KIT=$KIT: must be 0.26 or 0.33"; exit 2 ;;
esac
LOG="$OUT/vllm-$KIT.log"
RESULTS="$OUT/vllm-results.jsonl"
test -d "$VSITE" || { echo "no $VSITE: install the vLLM $KIT kit first (tools/vllm_gpu_calls.md)"; exit 3; }
VLLM_VERSION=$(cd "$VSITE" && ls -d vllm-*.dist-info | sed 's/^vllm-//; s/\.dist-info$//')
export PYTHONPATH=$VSITE VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1 VLLM_ALLOW_INSECURE_SERIALIZATION=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 ${KIT_ENV[@]+"${KIT_ENV[@]}"}
echo "=== vLLM $VLLM_VERSION from $VSITE (kit $KIT)" | tee -a "$LOG"
# One build serves both kits: the core needs pybind11 and cuda.h, no torch headers (setup.py, CMakeLists.txt),
# so it goes into the machine's python (outside PYTHONPATH), where both kits' vLLM find its entry point.
if [ "${REINSTALL:-1}" = 1 ] || ! (cd /tmp && python3 -c "import vllm_sleep_ext._core") 2>/dev/null; then
  (PYTHONPATH= python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3) || exit 4
fi
# Run from /tmp so that `import vllm_sleep_ext` finds the installed copy, not the source tree.
REPO=$PWD
E2E="$REPO/tests/vllm_gpu/e2e.py"
FEATURES_PY="$REPO/tests/vllm_gpu/features.py"
PLAIN="$REPO/tests/vllm_gpu/check_plain_attributes.py"
status=0
engine_run() {  # engine_run ours|stock TMP SCRIPT ARGS...: one engine run (timeout ENGINE_TIMEOUT, default
                # 400 s), its output into TMP and its exit status into TMP.rc
  local who=$1 tmp=$2 script=$3; shift 3
  local plugins=vllm_sleep_ext
  [ "$who" = stock ] && plugins=""
  (cd /tmp && VLLM_PLUGINS="$plugins" timeout "${ENGINE_TIMEOUT:-400}" python3 "$script" "$@" 2>&1) > "$tmp"
  echo $? > "$tmp.rc.part" && mv "$tmp.rc.part" "$tmp.rc"  # whole, or not there yet
}
report() {  # report ours|stock TMP TITLE TIME: the run's output into $LOG, its summary lines shown, its
            # RESULT line (if any) appended to $RESULTS with the kit and the vLLM version
  local who=$1 tmp=$2 title=$3 seconds=$4 rc
  rc=$(cat "$tmp.rc")
  { echo "=== [$who] $title"; cat "$tmp"; } >> "$LOG"
  echo "=== [$who] $title"
  grep -E "^(PASS|FAIL|INFO|SKIP|MISMATCH|workers' allocator|engine:|LoRA adapter|weights |decode tokens|live scope|first sleep|kept range|level 2 sleep|FIRST32B|LEVEL2|    )|vllm_sleep_ext|Traceback|Error" "$tmp" \
    | grep -v -e "^\s*File " -e "^RESULT " | head -40
  grep "^RESULT " "$tmp" | sed "s/^RESULT /{\"kit\": \"$KIT\", \"vllm\": \"$VLLM_VERSION\", \"who\": \"$who\", \"rc\": $rc, \"r\": /; s/\$/}/" >> "$RESULTS"
  rm -f "$tmp" "$tmp.rc"
  echo "=== [$who] exit $rc after $seconds" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
in_budget() {  # SUITE_BUDGET_S: no engine run starts later than that many seconds into this script, so a
               # device call ends on time with every finished run reported
  [ -z "${SUITE_BUDGET_S:-}" ] || [ "$SECONDS" -lt "$SUITE_BUDGET_S" ] && return 0
  echo "=== SKIPPED (SUITE_BUDGET_S=$SUITE_BUDGET_S reached): $*" | tee -a "$LOG"
  status=1
  return 1
}
run_script() {  # run_script ours|stock SCRIPT ARGS...: one engine run, then its report
  in_budget "$@" || return 0
  local who=$1 t0=$SECONDS title="vLLM $VLLM_VERSION $(basename "$2") ${*:3} ($(date -u +%T))"
  engine_run "$who" "$OUT/engine.tmp" "${@:2}"
  report "$who" "$OUT/engine.tmp" "$title" "$((SECONDS - t0)) s"
}
FEATURE_RUNS=()  # "who feature" of the features scenario's runs
FEATURE_TMP=/tmp/vse-features
FEATURE_NEXT=0   # the next of them to report
report_finished_features() {  # reports, in order, every run finished so far
  while [ "$FEATURE_NEXT" -lt "${#FEATURE_RUNS[@]}" ] && [ -f "$FEATURE_TMP/$FEATURE_NEXT.rc" ]; do
    set -- ${FEATURE_RUNS[$FEATURE_NEXT]}
    report "$1" "$FEATURE_TMP/$FEATURE_NEXT" "vLLM $VLLM_VERSION features.py $2" "$((SECONDS - FEATURE_T0)) s of the scenario"
    FEATURE_NEXT=$((FEATURE_NEXT + 1))
  done
}
features() {  # features.py for each of FEATURES (default: all), stock then ours, FEATURE_JOBS (default 4)
              # runs at once; their GPU work takes turns (features.py --lock), reports come in order
  local jobs=${FEATURE_JOBS:-4} lock="$FEATURE_TMP/gpu.lock" i f who
  local list=${FEATURES:-$(cd "$REPO/tests/vllm_gpu" && python3 -c "from features import FEATURES; print(*FEATURES)")}
  FEATURE_RUNS=() FEATURE_NEXT=0 FEATURE_T0=$SECONDS
  rm -rf "$FEATURE_TMP" && mkdir -p "$FEATURE_TMP"
  for f in $list; do for who in ${WHO:-stock ours}; do FEATURE_RUNS+=("$who $f"); done; done
  echo "=== features on vLLM $VLLM_VERSION, $jobs at a time: $list ($(date -u +%T))" | tee -a "$LOG"
  for i in "${!FEATURE_RUNS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; report_finished_features; done
    in_budget "features.py ${FEATURE_RUNS[*]:$i}" || break
    set -- ${FEATURE_RUNS[$i]}
    ENGINE_TIMEOUT=${ENGINE_TIMEOUT:-300} engine_run "$1" "$FEATURE_TMP/$i" "$FEATURES_PY" "$2" --lock "$lock" &
  done
  wait
  report_finished_features
}
engine() { local who=$1; shift; run_script "$who" "$E2E" "$@"; }  # engine ours|stock E2E-ARGS...
limit() {  # the pinned-copy limit at 16 GiB on this machine, for the ratios of the timing scenarios (also
          # into $OUT/limit.json for tests/vllm_gpu/first_sleep_report.py)
  echo "=== pinned-copy limit, 16 GiB (this machine, this run)" | tee -a "$LOG"
  (cd "$REPO/benchmarks" && LIMIT_JSON="$OUT/limit.json" python3 -c "import json, os
from sleepbench.impls.limit import worker_limit
r = worker_limit({'headroom_gib': 4, 'sizes_gib': [16], 'reps': 5})['sizes']['16.0']
json.dump({'bytes': r['bytes'], 'd2h_gbps': r['d2h_gbps'], 'h2d_gbps': r['h2d_gbps']}, open(os.environ['LIMIT_JSON'], 'w'))
print(f\"LIMIT 16 GiB: D2H {r['d2h_gbps']:.1f} GB/s, H2D {r['h2d_gbps']:.1f} GB/s\")" 2>&1) | tee -a "$LOG" | grep LIMIT
}

scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(flows)
for s in "${scenarios[@]}"; do
  case $s in
    quick)  # one dense and one MoE model, multiprocess engine
      engine ours flows --model llama-tiny
      engine ours flows --model qwen3moe-tiny ;;
    flows)  # level 1 and the level-2 RLHF flow, several architectures, both engine modes
      engine ours flows --model llama-tiny
      engine ours flows --model llama-tiny --inproc
      engine ours flows --model qwen2-tiny
      engine ours flows --model gptneox-tiny
      engine ours flows --model qwen3moe-tiny
      engine ours flows --model llama3-8b --gpu-memory-utilization 0.6 ;;
    flows-small)  # the same without the 8B shape (the timing scenario checks its outputs)
      engine ours flows --model llama-tiny
      engine ours flows --model llama-tiny --inproc
      engine ours flows --model qwen2-tiny
      engine ours flows --model gptneox-tiny
      engine ours flows --model qwen3moe-tiny ;;
    timing)  # the 8B-shaped model, stock then ours, and the pinned-copy limit, same machine; each run measures
             # the driver's level-2 floor for its own handles in its worker (issue 17 item 3)
      engine stock timing --model llama3-8b --gpu-memory-utilization 0.85
      engine ours timing --model llama3-8b --gpu-memory-utilization 0.85
      limit
      python3 "$REPO/tests/vllm_gpu/first_sleep_report.py" "$RESULTS" "$OUT/limit.json" --kit "$KIT" --timing 2>&1 | tee -a "$LOG" ;;
    timing-ours)  # ours and the limit only (stock measured in another call on the same machine)
      engine ours timing --model llama3-8b --gpu-memory-utilization 0.85
      limit ;;
    timing-stock)  # stock vLLM only (ours measured in another call on the same machine)
      engine stock timing --model llama3-8b --gpu-memory-utilization 0.85 ;;
    cycles)
      for who in ${WHO:-stock ours}; do engine "$who" cycles --model llama-tiny --cycles 50; done ;;
    plain)  # plain-attribute state built after loading (issue 9): stock loses it, ours keeps it
      ENGINE_TIMEOUT=300 run_script stock "$PLAIN" --expect-differ
      ENGINE_TIMEOUT=300 run_script ours "$PLAIN" ;;
    tp2)
      engine ours flows --model llama-tiny --tp 2
      engine ours flows --model qwen3moe-tiny --tp 2 ;;
    features)  # engine features that keep state in the weights pool: state compared byte for byte, stock vs ours
      features ;;
    duplex)  # issue 18: pinned copies D2H, H2D and both at once, 8 GiB: the duplex floor the swap scenario uses
      (cd /tmp && timeout 120 python3 "$REPO/benchmarks/probe_duplex.py" --out "$OUT" 2>&1) | tee -a "$LOG" | grep -v "^wrote" || status=1 ;;
    first32b)  # issue 17 item 2: Qwen2.5-32B shape (65.5 GB bf16), first level-1 sleep 10 s after the engine is
               # ready, ours then stock, one at a time: ours holds one 65.8 GB arena; stock pins a backup per
               # allocation through PyTorch's pinned caching allocator, 65.5 GB and up to ~120 GB if it rounds
               # each to a power of two, near the 137 GB (128 GiB) host: ours first, so a stock run the host
               # cannot hold leaves ours measured. Then the limit and the table.
      engine ours first --model qwen25-32b --gpu-memory-utilization 0.9 --first-sleep-after 10
      engine stock first --model qwen25-32b --gpu-memory-utilization 0.9 --first-sleep-after 10
      limit
      python3 "$REPO/tests/vllm_gpu/first_sleep_report.py" "$RESULTS" "$OUT/limit.json" --kit "$KIT" 2>&1 | tee -a "$LOG" ;;
    scope)  # issue 17 item 3: who holds the ranges of the weights pool the live scope keeps that no Python object
            # holds (allocation stacks recorded from the allocator's creation; attribute paths from the worker), ours
      VLLM_SLEEP_EXT_RECORD_ALLOCATIONS=1 engine ours scope --model llama3-8b --gpu-memory-utilization 0.85 ;;
    swap)  # issue 18: two 8B-shaped engines on one GPU, A.sleep + B.wake overlapped (ours) vs sequential, then stock
      for who in ${WHO:-ours stock}; do run_script "$who" "$REPO/tests/vllm_gpu/swap.py" --floor-json "$OUT/probe_duplex.json"; done ;;
    *) echo "unknown scenario $s"; status=1 ;;
  esac
done
echo "=== allocator lines in vLLM's log: $(grep -c 'vllm_sleep_ext' "$LOG")"
exit $status
