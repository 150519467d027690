#!/usr/bin/env bash
# Runs the inference bench (benches/inference.rs) on an NVIDIA GPU in one go and prints a short
# Markdown table of four rows: cpu fp32, cuda fp32, cuda fp16, cuda fp16 + io_binding.
#
# On a Linux machine with an NVIDIA GPU whose driver runs CUDA 13, Python 3 with pip, Rust, and
# the Taobao slice (../shared/data, linked by scripts/sample-data.sh), it:
#   1. checks the GPU with nvidia-smi, and stops with a message where there is none;
#   2. creates .tools/gpu-venv and installs onnxruntime-gpu[cuda,cudnn] at the ONNX Runtime
#      version of scripts/setup.sh; the extras bring CUDA 13 and cuDNN 9 as nvidia-* wheels;
#   3. points the processor at that wheel's libonnxruntime.so (ORT_DYLIB_PATH) and the loader
#      at the nvidia-* libraries (LD_LIBRARY_PATH);
#   4. builds with --features cuda and writes the float16 model to .tools/models-fp16;
#   5. runs the bench once per row and prints sequences/s through the workers scoring every
#      sequence whole, the ratio to the bare session on the same provider, the speed-up over
#      the cpu row, sequences/s with variants scored from cached prefixes (float32 rows; the
#      float16 variant has no prefix graph), and the largest score difference from the
#      shipped model on the cpu.
# Every row's full bench output is kept in .tools/gpu-bench/. Exit status: 0 done, 2 no GPU,
# 1 anything else. The wheels are about 2.5 GB; where PyPI cannot be reached, pip's own
# PIP_NO_INDEX=1 and PIP_FIND_LINKS=DIR install them from a folder.
#
# Usage: scripts/gpu-bench.sh [--cpu-only] [USERS]
#   --cpu-only  no GPU check and no CUDA rows: the cpu row alone, with the CPU library that
#               scripts/setup.sh installs (for checking the script on a machine without a GPU)
#   USERS       windows of that many Taobao users (the bench's default: 1,500)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools="$root/.tools"
out="$tools/gpu-bench"
fp16_dir="$tools/models-fp16"

log() { printf 'gpu-bench: %s\n' "$*" >&2; }
fail() {
  log "$*"
  exit 1
}
no_gpu() {
  log "no NVIDIA GPU: $* This script needs a machine with an NVIDIA GPU and its driver; \
run it with --cpu-only for the cpu row alone."
  exit 2
}

cpu_only=false
users=""
gpus=""
for arg in "$@"; do
  case "$arg" in
    --cpu-only) cpu_only=true ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *[!0-9]* | "") fail "unknown argument '$arg' (usage: $0 [--cpu-only] [USERS])" ;;
    *) users="$arg" ;;
  esac
done

ort_version=$(sed -n 's/^ort_version=\([0-9.]*\)$/\1/p' scripts/setup.sh)
[ -n "$ort_version" ] || fail "cannot read ort_version from scripts/setup.sh"

# 1. The GPU.
if ! $cpu_only; then
  command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not installed."
  if ! gpus=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) \
    || [ -z "$gpus" ]; then
    no_gpu "nvidia-smi lists none (${gpus:-no output})."
  fi
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1)
  if [ -n "$cuda" ] && [ "$cuda" -lt 13 ]; then
    fail "the driver runs CUDA $cuda; onnxruntime-gpu $ort_version is built for CUDA 13 \
(driver 580 or newer)"
  fi
  log "GPU: $gpus (driver CUDA ${cuda:-unknown})"
fi

command -v cargo >/dev/null 2>&1 || fail "cargo is not installed (https://rustup.rs)"
slice=clickstream/taobao-userbehavior-slice.csv
if [ ! -f "$tools/data/$slice" ] && [ ! -f "$root/../shared/data/$slice" ]; then
  scripts/sample-data.sh >/dev/null
  [ -f "$tools/data/$slice" ] || fail "the bench needs the Taobao slice: put \
taobao-userbehavior-slice.csv in $tools/data/clickstream/ or ../shared/data/clickstream/"
fi

# 2 and 3. ONNX Runtime: the GPU wheel and its CUDA libraries, or setup.sh's CPU library.
features=()
if $cpu_only; then
  ort_lib="$tools/onnxruntime/libonnxruntime.so.$ort_version"
  [ -f "$ort_lib" ] || scripts/setup.sh
else
  venv="$tools/gpu-venv"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  installed=$("$venv/bin/python" -m pip show onnxruntime-gpu 2>/dev/null \
    | sed -n 's/^Version: //p')
  if [ "$installed" != "$ort_version" ]; then
    log "installing onnxruntime-gpu[cuda,cudnn]==$ort_version from PyPI (CUDA 13, cuDNN 9)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "onnxruntime-gpu[cuda,cudnn]==$ort_version"
  fi
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ort_lib="$site/onnxruntime/capi/libonnxruntime.so.$ort_version"
  [ -f "$ort_lib" ] || fail "the onnxruntime-gpu wheel has no $ort_lib"
  # Every folder of the nvidia-* wheels that holds a shared library (their layout differs
  # between CUDA releases), then the wheel's own folder with the CUDA provider.
  libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  [ -n "$libs" ] || fail "no CUDA libraries under $site/nvidia (did the extras install?)"
  LD_LIBRARY_PATH="$libs:$(dirname "$ort_lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  features=(--features cuda)
fi
export ORT_DYLIB_PATH="$ort_lib"
log "ONNX Runtime: $ort_lib"

# 4. The build and the float16 model.
log "building the bench${features[*]:+ with ${features[*]}}"
cargo bench "${features[@]}" --bench inference --no-run
if ! $cpu_only; then
  cargo build --release "${features[@]}" --bin mindstream-train
  rm -rf "$fp16_dir"
  target/release/mindstream-train fp16 --model models --out "$fp16_dir" >&2
fi

# 5. The rows: name, model folder, provider, io_binding.
rows=("cpu fp32|models|cpu|false")
if ! $cpu_only; then
  rows+=(
    "cuda fp32|models|cuda|false"
    "cuda fp16|$fp16_dir|cuda|false"
    "cuda fp16 + io_binding|$fp16_dir|cuda|true"
  )
fi
mkdir -p "$out"
# The value column of a bench row, the first number in it.
value() { awk -F'|' -v m="$1" '$2 ~ m { split($3, v, " "); print v[1]; exit }' "$2"; }

table=()
cpu_rate=""
for row in "${rows[@]}"; do
  IFS='|' read -r name dir provider binding <<<"$row"
  file="$out/${name//[^a-z0-9]/-}.md"
  log "row '$name': model.dir=$dir execution_provider=$provider io_binding=$binding"
  if ! MINDSTREAM__MODEL__DIR="$dir" MINDSTREAM__MODEL__EXECUTION_PROVIDER="$provider" \
    MINDSTREAM__MODEL__IO_BINDING="$binding" \
    cargo bench "${features[@]}" --bench inference -- ${users:+"$users"} 2>&1 \
    | tee "$file" >&2; then
    fail "row '$name' failed: see the error above (kept in $file)"
  fi
  bare=$(value '^ bare session' "$file")
  workers=$(value '^ through the workers' "$file")
  ratio=$(value '^ ratio, workers' "$file")
  reusing=$(value '^ through the workers, variants' "$file")
  difference=$(value '^ largest score difference' "$file")
  [ -n "$workers" ] || fail "row '$name' printed no result (see $file)"
  cpu_rate=${cpu_rate:-$workers}
  speedup=$(awk -v a="$workers" -v b="$cpu_rate" 'BEGIN { printf "%.2f", a / b }')
  table+=("| $name | $workers | $bare | $ratio | ${speedup}x | ${reusing:--} \
| ${difference:-0 (reference)} |")
done

windows=$(value '^ windows' "$file")
echo
echo "${gpus:-no GPU (--cpu-only)}; ONNX Runtime $ort_version ($ort_lib); $windows Taobao windows"
echo
echo "| row | sequences/s through the workers | bare session | ratio to bare | vs cpu \
| sequences/s reusing prefixes | largest score difference from cpu fp32 |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${table[@]}"
