#!/usr/bin/env bash
# End-to-end observability, with tools this project did not write:
#
# 1. `promtool check metrics` (Debian's `prometheus` package) accepts the chat
#    server's /metrics.
# 2. A real Prometheus server scrapes the chat server while a Python websockets
#    client makes calls with many endings; its HTTP API answers the calls made, by tool and status,
#    exactly as the server's /metrics.json counts them; every query of the Grafana
#    dashboard (docs/grafana) runs there.
# 3. A test OTLP/HTTP receiver decodes the exported spans with the official protobuf
#    definitions (PyPI's `opentelemetry-proto`): one `execute_tool {tool}` span per
#    call of the chat server with the GenAI attributes, and the calls of the tracing
#    example as children of its agent turn.
#
# Needs: cargo, python3 with venv; installs what else it needs (each step idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/e2e/observability
venv=target/e2e/venv
rm -rf "$out"
mkdir -p "$out"

echo "==> prometheus and promtool (Debian's prometheus package)"
if ! command -v promtool > /dev/null || ! command -v prometheus > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus > /dev/null
fi
promtool --version 2>&1 | head -1

echo "==> python venv + websockets + opentelemetry-proto"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check websockets opentelemetry-proto

echo "==> build the chat server and the tracing example (all features: prometheus, otel)"
cargo build --quiet --example chat_server --all-features
cargo build --quiet --example tracing --all-features

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2> /dev/null || true
        wait "$pid" 2> /dev/null || true
    done
}
trap cleanup EXIT
wait_for() { # wait_for WHAT COMMAND...: up to 30 s
    local what=$1
    shift
    for _ in $(seq 1 300); do
        if "$@" > /dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "$what did not come up" >&2
    return 1
}

echo "==> the OTLP/HTTP receiver"
"$venv/bin/python" tests/clients/otlp_receiver.py "$out/otlp.port" "$out/spans.jsonl" &
pids+=($!)
wait_for "the OTLP receiver" test -s "$out/otlp.port"
otlp="http://127.0.0.1:$(cat "$out/otlp.port")"
touch "$out/spans.jsonl"

echo "==> the chat server, exporting to $otlp"
OTEL_EXPORTER_OTLP_ENDPOINT="$otlp" OTEL_BSP_SCHEDULE_DELAY=200 CHAT_SERVER_QUIET=1 \
    target/debug/examples/chat_server --port 0 > "$out/server.out" 2> "$out/server.err" &
server_pid=$!
pids+=("$server_pid")
wait_for "the chat server" grep -q '^listening on http://' "$out/server.out"
addr=$(sed -n 's|^listening on http://||p' "$out/server.out")

echo "==> prometheus scraping $addr every second"
prom_port=$(free_port)
cat > "$out/prometheus.yml" << EOF
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: chat_server
    static_configs:
      - targets: ["$addr"]
EOF
promtool check config "$out/prometheus.yml" > /dev/null
prometheus --config.file="$out/prometheus.yml" --storage.tsdb.path="$out/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" > "$out/prometheus.log" 2>&1 &
pids+=($!)
wait_for "prometheus" curl -sf "http://127.0.0.1:$prom_port/-/ready"

echo "==> calls with many endings, over the WebSocket (Python websockets)"
"$venv/bin/python" tests/clients/observability_check.py calls "ws://$addr"

echo "==> promtool check metrics"
curl -sf "http://$addr/metrics" > "$out/metrics.txt"
promtool check metrics < "$out/metrics.txt"
grep -c '^tool_dispatch_' "$out/metrics.txt" | sed 's/^/series: /'
curl -sf "http://$addr/metrics.json" > "$out/metrics.json"

echo "==> prometheus has the calls made"
"$venv/bin/python" tests/clients/observability_check.py prometheus "127.0.0.1:$prom_port" "$out/metrics.json"

echo "==> the Grafana dashboard's queries run in prometheus"
"$venv/bin/python" tests/clients/observability_check.py dashboard docs/grafana/tool-dispatch.json \
    "127.0.0.1:$prom_port" "$out/metrics.txt"

echo "==> the chat server shuts down (its spans flushed)"
kill -INT "$server_pid"
wait "$server_pid"

echo "==> the tracing example, exporting to $otlp"
OTEL_EXPORTER_OTLP_ENDPOINT="$otlp" target/debug/examples/tracing

echo "==> the spans the receiver decoded"
"$venv/bin/python" tests/clients/observability_check.py spans "$out/spans.jsonl" "$out/metrics.json"

echo "observability e2e passed"
