#!/usr/bin/env bash
# End-to-end across nodes: a redis-server and two chat_server processes sharing it,
# driven by the Python `websockets` client (tests/clients/cluster_client.py), which
# kills the redis-server under a running call last.
#
# Needs: cargo, redis-server, python3 with venv (the venv of .ci/e2e.sh is reused).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/e2e
venv="$out/venv"
mkdir -p "$out"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check websockets

free_port() { "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "==> build the chat_server example with redis"
cargo build --example chat_server --features axum,redis

pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2> /dev/null || true
        wait "$pid" 2> /dev/null || true
    done
}
trap stop_all EXIT

redis_port=$(free_port)
echo "==> redis-server on $redis_port"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no > "$out/redis.out" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
for _ in $(seq 1 100); do
    redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break
    sleep 0.1
done

addrs=()
for node in a b; do
    : > "$out/node-$node.out"
    CHAT_SERVER_QUIET=1 target/debug/examples/chat_server --port 0 --node "$node" \
        --rate-per-minute 5 --redis "redis://127.0.0.1:$redis_port" \
        > "$out/node-$node.out" 2> "$out/node-$node.err" &
    pids+=($!)
    addr=""
    for _ in $(seq 1 300); do
        addr=$(sed -n 's|^listening on http://||p' "$out/node-$node.out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "node $node did not start:" >&2
        cat "$out/node-$node.err" >&2
        exit 1
    fi
    echo "node $node at $addr"
    addrs+=("$addr")
done

echo "==> python websockets client across the nodes"
"$venv/bin/python" tests/clients/cluster_client.py "ws://${addrs[0]}" "ws://${addrs[1]}" "$redis_pid"

stop_all
trap - EXIT
echo "e2e cluster passed"
