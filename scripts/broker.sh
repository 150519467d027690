#!/usr/bin/env bash
# Starts or stops a Tansu Kafka-protocol broker (in memory) on a free loopback port.
#   scripts/broker.sh start DIR   writes DIR/broker.pid, DIR/broker.port, DIR/broker.log
#   scripts/broker.sh stop DIR    stops the broker started with that DIR
# Tansu comes from scripts/setup.sh. It keeps nothing on disk: a restarted broker is empty.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
action=${1:?usage: broker.sh start|stop DIR}
dir=${2:?usage: broker.sh start|stop DIR}
mkdir -p "$dir"

case "$action" in
  start)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    url="tcp://127.0.0.1:$port"
    "$root/.tools/bin/tansu" broker --listener-url "$url" --advertised-listener-url "$url" \
      --storage-engine memory://tansu/ >"$dir/broker.log" 2>&1 &
    echo $! >"$dir/broker.pid"
    echo "$port" >"$dir/broker.port"
    for _ in $(seq 1 100); do
      if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null; then
        echo "broker: listening on 127.0.0.1:$port (pid $(cat "$dir/broker.pid"))" >&2
        exit 0
      fi
      sleep 0.1
    done
    echo "broker: did not start; see $dir/broker.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$dir/broker.pid" ]; then
      pid=$(cat "$dir/broker.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/broker.pid"
    fi
    ;;
  *)
    echo "usage: broker.sh start|stop DIR" >&2
    exit 2
    ;;
esac
