#!/usr/bin/env bash
# End-to-end: the chat_server example driven by clients this project did not write.
#
# 1. A Python client using the `websockets` package from PyPI (installed into a
#    virtual environment under target/e2e/venv); every frame it gets is checked
#    against docs/ws-protocol.schema.json with `jsonschema`.
# 2. With TOOL_DISPATCH_BROWSER=1: the demo page in headless Chromium (Debian's
#    `chromium` package), clicked through the DevTools protocol; the DOM and a
#    screenshot are kept in target/e2e/ (chat_page.html, chat_page.png).
#
# Needs: cargo, python3 with venv, network access to PyPI; chromium for step 2.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/e2e
venv="$out/venv"
mkdir -p "$out"

echo "==> python venv + websockets, jsonschema"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check websockets jsonschema
"$venv/bin/python" -c 'import websockets; print("websockets", websockets.__version__)'

echo "==> build the chat_server example"
cargo build --example chat_server --features axum

echo "==> start the server on an ephemeral port"
: > "$out/server.out"
CHAT_SERVER_QUIET=1 cargo run --quiet --example chat_server --features axum -- --port 0 \
    > "$out/server.out" 2> "$out/server.err" &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2> /dev/null; then
        kill "$server_pid" 2> /dev/null || true
        wait "$server_pid" 2> /dev/null || true
    fi
}
trap stop_server EXIT

addr=""
for _ in $(seq 1 600); do # up to 60 s for the first line
    addr=$(sed -n 's|^listening on http://||p' "$out/server.out")
    [ -n "$addr" ] && break
    if ! kill -0 "$server_pid" 2> /dev/null; then
        echo "the server exited before listening:" >&2
        cat "$out/server.err" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$addr" ]; then
    echo "the server did not print its address" >&2
    exit 1
fi
echo "server at $addr (pid $server_pid)"

echo "==> python websockets client"
"$venv/bin/python" tests/clients/python_client.py "ws://$addr"

if [ "${TOOL_DISPATCH_BROWSER:-0}" = "1" ]; then
    echo "==> demo page in headless chromium"
    if ! command -v chromium > /dev/null; then
        echo "chromium is not installed (apt-get install -y chromium)" >&2
        exit 1
    fi
    "$venv/bin/python" tests/clients/browser_check.py "http://$addr" "$out"
else
    echo "==> skipping the headless Chromium check of the demo page (set TOOL_DISPATCH_BROWSER=1 to run it)"
fi

echo "==> server still healthy after the clients"
"$venv/bin/python" - "$addr" << 'PY'
import json, sys, urllib.request
m = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics.json"))
assert m["total"] == sum(m["by_status"].values()), m
assert m["active"] == 0, m
print("metrics:", {k: v for k, v in m["by_status"].items() if v}, "active", m["active"])
PY

stop_server
trap - EXIT
echo "e2e passed"
