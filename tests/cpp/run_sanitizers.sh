#!/usr/bin/env bash
# Builds the C++ core tests (targets core_tests, slab_tests, host_policy_tests, disk_tier_tests and compress_tests,
# tests/cpp/*_tests.cpp,
# sharing tests/cpp/test_harness.h) under
# AddressSanitizer (with LeakSanitizer), UndefinedBehaviorSanitizer and ThreadSanitizer, into build/asan, build/ubsan and
# build/tsan, and runs each. Fails on any failed check and on any sanitizer report.
#
# Usage: tests/cpp/run_sanitizers.sh [asan] [ubsan] [tsan]     (default: all three, in that order)
# Environment: CMAKE (default cmake), CUDA_HOME / CUDAToolkit_ROOT (where cuda.h is; CMake's
# find_package(CUDAToolkit) looks in /usr/local/cuda by itself), extra ASAN_OPTIONS / UBSAN_OPTIONS /
# TSAN_OPTIONS are appended to the ones set here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cmake_bin="${CMAKE:-cmake}"

if [[ $# -eq 0 ]]; then
  set -- asan ubsan tsan
fi

flags_for() {
  case "$1" in
    asan) echo "-fsanitize=address -fno-omit-frame-pointer" ;;
    ubsan) echo "-fsanitize=undefined -fno-sanitize-recover=all" ;;
    tsan) echo "-fsanitize=thread" ;;
    *) echo "unknown sanitizer '$1' (expected asan, ubsan or tsan)" >&2; return 1 ;;
  esac
}

# Sanitizer options: stop at the first report with a non-zero exit status.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="exitcode=87${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=88${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TSAN_OPTIONS="halt_on_error=1:exitcode=89:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"

# What a sanitizer prints when it finds something (belt and braces beside the exit status).
report_pattern='ERROR: AddressSanitizer|ERROR: LeakSanitizer|WARNING: ThreadSanitizer|ThreadSanitizer: reported|runtime error:|SUMMARY: (Address|Thread|UndefinedBehavior|Leak)Sanitizer'

failed=()
mkdir -p build
for san in "$@"; do
  flags="$(flags_for "$san")"
  build="build/$san"
  echo "=== $san: configure + build ($build) ==="
  "$cmake_bin" -S . -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DVSE_BUILD_PYTHON=OFF -DVSE_BUILD_TESTS=ON \
    "-DCMAKE_CXX_FLAGS=$flags" >"$build.configure.log" 2>&1 \
    || { cat "$build.configure.log" >&2; echo "=== $san: configure FAILED ===" >&2; failed+=("$san"); continue; }
  rm -f "$build.configure.log"
  "$cmake_bin" --build "$build" --target core_tests slab_tests host_policy_tests disk_tier_tests compress_tests \
    || { echo "=== $san: build FAILED ===" >&2; failed+=("$san"); continue; }
  for tests in core_tests slab_tests host_policy_tests disk_tier_tests compress_tests; do
    log="$build/$tests.log"

    echo "=== $san: run $tests ==="
    runner=()
    status=0
    ${runner[@]+"${runner[@]}"} "$build/$tests" >"$log" 2>&1 || status=$?
    # ThreadSanitizer of older toolchains (gcc 12) cannot map its shadow under the larger mmap
    # randomization of recent kernels; it then dies at start with "unexpected memory mapping".
    # Rerun without address-space randomization in that case.
    if [[ "$san" == tsan && $status -ne 0 ]] && grep -q "unexpected memory mapping" "$log"; then
      echo "(tsan: rerunning with address-space randomization off: setarch -R)"
      runner=(setarch "$(uname -m)" -R)
      status=0
      ${runner[@]+"${runner[@]}"} "$build/$tests" >"$log" 2>&1 || status=$?
    fi
    cat "$log"
    last="$(tail -n 1 "$log")"
    if [[ $status -ne 0 ]]; then
      echo "=== $san: $tests FAILED (exit status $status) ===" >&2
      failed+=("$san:$tests")
    elif grep -Eq "$report_pattern" "$log"; then
      echo "=== $san: $tests FAILED (sanitizer report above) ===" >&2
      failed+=("$san:$tests")
    elif ! [[ "$last" =~ ^[0-9]+\ passed,\ 0\ failed$ ]]; then
      echo "=== $san: $tests FAILED (unexpected last line: '$last') ===" >&2
      failed+=("$san:$tests")
    else
      echo "=== $san: $tests OK ($last) ==="
    fi
  done
done

if [[ ${#failed[@]} -ne 0 ]]; then
  echo "sanitizer runs failed: ${failed[*]}" >&2
  exit 1
fi
echo "all sanitizer runs passed: $*"
