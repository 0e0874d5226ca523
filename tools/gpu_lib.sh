# Sourced by the GPU job scripts (tools/gpu_job.sh, gpu_first.sh, gpu_disk.sh, gpu_compress.sh), from the
# repository root: the log folder $OUT, `step` and the machine's facts.
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: runs it (at most $STEP_TIMEOUT s when set), logs to $OUT/NAME.log, remembers a failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if [ -n "${STEP_TIMEOUT:-}" ]; then timeout "$STEP_TIMEOUT" "$@"; else "$@"; fi 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}
machine_facts() {  # machine_facts [COMMAND...]: the card, driver, cores and memory (and COMMAND's output) into $OUT/machine.txt
  { date -u; git rev-parse --verify -q HEAD || echo "commit: not a git checkout here (RESULTS.md names it)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g
    [ $# -eq 0 ] || "$@"; } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
}
