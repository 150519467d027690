#!/usr/bin/env bash
# The demo: a real broker on loopback, real public data replayed into it, the processor run
# until the input is consumed, and a summary of the signal topic. Stops what it starts.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
run="$root/run/demo"
rm -rf "$run"
mkdir -p "$run"
bin="$root/target/release"
trap 'scripts/broker.sh stop "$run"' EXIT

data=$(scripts/sample-data.sh)
echo "== events"
"$bin/mindstream-train" import --source cdnow --input "$data/purchases/cdnow-master.txt" \
  --output "$run/purchases.jsonl"
cp "$run/purchases.jsonl" "$run/clickstream.jsonl"
if [ -f "$data/clickstream/taobao-userbehavior-slice.csv" ]; then
  "$bin/mindstream-train" import --source taobao \
    --input "$data/clickstream/taobao-userbehavior-slice.csv" --output "$run/taobao.jsonl"
  cat "$run/taobao.jsonl" >>"$run/clickstream.jsonl"
fi
"$bin/mindstream-train" import --source reviews-zh --input "$data/reviews-zh" \
  --output "$run/reviews.jsonl" --limit 3000
clicks=$(wc -l <"$run/clickstream.jsonl")
reviews=$(wc -l <"$run/reviews.jsonl")
echo "clickstream events: $clicks, review events: $reviews"

echo "== broker"
scripts/broker.sh start "$run"
export MINDSTREAM_CONFIG="$root/deploy/config/demo.toml"
export MINDSTREAM__KAFKA__BROKERS="127.0.0.1:$(cat "$run/broker.port")"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/pseudonym.key"
export MINDSTREAM__PRIVACY__PSEUDONYM_KEY_FILE="$run/pseudonym.key"
"$bin/mindstream" topics --partitions 3

echo "== replay"
"$bin/mindstream" replay --input "$run/clickstream.jsonl" --topic demo-clickstream --format json
"$bin/mindstream" replay --input "$run/reviews.jsonl" --topic demo-reviews --format protobuf

echo "== processor"
start=$(date +%s.%N)
"$bin/mindstream" run --until-caught-up 2>"$run/processor.log" || {
  tail -n 40 "$run/processor.log" >&2
  exit 1
}
end=$(date +%s.%N)
grep -E 'model loaded|done' "$run/processor.log" | sed 's/^/  /' || true

echo "== summary"
"$bin/mindstream" summary --min-users 1000 --latest-out "$run/latest.jsonl"
python3 - "$start" "$end" "$clicks" "$reviews" <<'PY'
import sys
start, end, clicks, reviews = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
events = clicks + reviews
print(f"throughput: {events} events through the processor in {end - start:.1f} s "
      f"({events / (end - start):.0f} events/s, model load and group join included)")
PY
