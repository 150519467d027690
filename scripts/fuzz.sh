#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each one for a bounded time, starting from its
# committed seeds (fuzz/README.md says what each target covers).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   every target (or those named) for SECONDS each;
#                                           default $FUZZ_SECONDS, else 60
#   scripts/fuzz.sh repro TARGET FILE...    runs TARGET once on each FILE (a saved crash)
#
# Each target's seeds are copied into a scratch corpus, fuzz/corpus/<target>/ (git-ignored and
# kept between runs, so longer runs build on earlier ones); fuzz/seeds/ is never written. A
# crash, a panic, a per-input timeout or running out of memory stops that target; its input
# is saved under fuzz/artifacts/<target>/ and printed, the other targets still run, and the
# script exits non-zero. Logs are in fuzz/target/logs/.
#
# cargo-fuzz comes from scripts/setup.sh (.tools/cargo). libFuzzer's instrumentation needs
# rustc flags that are unstable, and only the stable compiler is installed, so the build runs
# with RUSTC_BOOTSTRAP=1; nothing else is built that way.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$root/.tools/cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

log() { printf 'fuzz: %s\n' "$*" >&2; }

if ! command -v cargo-fuzz >/dev/null; then
  log "cargo-fuzz is missing: run scripts/setup.sh"
  exit 2
fi

# Two builds, each in its own folder so that switching between them rebuilds nothing:
# - quick (the default; `make test` and `make fuzz`): opt-level 1 with debug assertions and
#   overflow checks, no sanitizer, 16 codegen units. The main crate and all its dependencies
#   are built instrumented, so for a bounded run the cold build is the cost that matters.
# - asan (FUZZ_BUILD=asan): cargo-fuzz's own release build (opt-level 3, one codegen unit) with
#   debug assertions and AddressSanitizer, which also checks the unsafe code under the
#   decoders, the window store and the tokenizer. It does not build at present: zstd-sys
#   compiles libzstd with the sanitizer, and librdkafka's configure script then fails to link
#   its zstd check (fuzz/README.md).
case ${FUZZ_BUILD:=quick} in
  quick)
    build=(-O --debug-assertions --sanitizer none --codegen-units 16
      --target-dir fuzz/target/quick)
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=1
    ;;
  asan) build=(-O --debug-assertions --sanitizer address --target-dir fuzz/target/asan) ;;
  *)
    log "FUZZ_BUILD must be quick or asan, not $FUZZ_BUILD"
    exit 2
    ;;
esac

if [ "${1:-}" = repro ]; then
  [ $# -ge 3 ] || { log "usage: scripts/fuzz.sh repro TARGET FILE..."; exit 2; }
  target=$2
  shift 2
  exec cargo fuzz run --fuzz-dir fuzz "${build[@]}" "$target" "$@"
fi

seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
  log "SECONDS must be a whole number, not $seconds"
  exit 2
fi
# Memory: far above what any target needs (tens of MB); past it the input is saved as an
# out-of-memory crash. Time: an input that takes seconds is a denial-of-service finding.
limits=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10)

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

started=$SECONDS
log "building ${targets[*]} ($FUZZ_BUILD)"
for target in "${targets[@]}"; do
  cargo fuzz build --fuzz-dir fuzz "${build[@]}" "$target"
done
log "built in $((SECONDS - started)) s"

logs="$root/fuzz/target/logs"
mkdir -p "$logs"
failed=()
for target in "${targets[@]}"; do
  corpus="fuzz/corpus/$target"
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fuzz/seeds/$target" ]; then
    cp -n "fuzz/seeds/$target"/* "$corpus"/
  fi
  # The JSON targets start from the field names and values of the event schema.
  dict=()
  case $target in
    decode_json | render_tokenize) dict=(-dict=fuzz/json.dict) ;;
  esac
  stamp=$(mktemp)
  log "running $target for $seconds s (log: fuzz/target/logs/$target.log)"
  if cargo fuzz run --fuzz-dir fuzz "${build[@]}" "$target" "$corpus" -- \
    -max_total_time="$seconds" -print_final_stats=1 "${limits[@]}" "${dict[@]}" \
    >"$logs/$target.log" 2>&1; then
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$target.log" | tail -n1 || true)
    log "$target: ${done_line:-finished}"
  else
    failed+=("$target")
    tail -n 40 "$logs/$target.log" >&2
    log "$target FAILED; input saved as:"
    found=$(find "$artifacts" -type f -newer "$stamp" | sort)
    printf '%s\n' "${found:-(none: see the log above)}" | sed 's/^/  /' >&2
    log "reproduce: FUZZ_BUILD=$FUZZ_BUILD scripts/fuzz.sh repro $target <input>"
  fi
  rm -f "$stamp"
done

if [ ${#failed[@]} -gt 0 ]; then
  log "crashes in ${failed[*]} (fuzz/README.md: turning a crash into a regression test)"
  exit 1
fi
log "no crash in ${targets[*]} ($seconds s each; $((SECONDS - started)) s in all)"
