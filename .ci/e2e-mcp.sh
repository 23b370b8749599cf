#!/usr/bin/env bash
# End-to-end MCP: examples/mcp_server.rs driven by clients no one here wrote: the
# Python `mcp` SDK (2.x) over stdio and over streamable HTTP, in both protocol
# revisions, and the TypeScript client (@modelcontextprotocol/client, 2.x) over HTTP.
#
# Needs: cargo, python3 with venv, node with npm. Each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/e2e
venv="$out/venv"
mkdir -p "$out/ts"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "mcp>=2,<3" jsonschema
if [ ! -d "$out/ts/node_modules/@modelcontextprotocol/client" ]; then
    (cd "$out/ts" && npm init -y > /dev/null && npm install --silent --no-audit --no-fund "@modelcontextprotocol/client@2")
fi
cp tests/clients/mcp_ts_client.mjs "$out/ts/"

echo "==> build the mcp_server and mcp_import examples"
cargo build --example mcp_server --example mcp_import --features mcp
server=target/debug/examples/mcp_server

echo "==> mcp_import: a Python MCPServer's tool, then mcp_server's, through the pipeline"
target/debug/examples/mcp_import --call add --args '{"a":2,"b":3}' -- \
    "$venv/bin/python" tests/clients/mcp_remote_server.py > "$out/mcp-import.out"
grep -q '"type":"tool_completed".*"status":"success".*"result":{"result":5}' "$out/mcp-import.out"
target/debug/examples/mcp_import --call get_weather --args '{"city":"Paris"}' -- "$server" \
    > "$out/mcp-import-self.out" 2> /dev/null
grep -q '"user_id":"importer".*"tool_name":"get_weather","status":"success"' "$out/mcp-import-self.out"
if target/debug/examples/mcp_import --call fail --args '{"reason":"x"}' -- \
    "$venv/bin/python" tests/clients/mcp_remote_server.py > "$out/mcp-import-fail.out" 2>&1; then
    echo "a failing remote tool must fail the call" >&2
    exit 1
fi
grep -q '"tool_name":"fail","status":"error".*it failed: x' "$out/mcp-import-fail.out"
echo "mcp_import: ok"

echo "==> Python mcp SDK over stdio"
"$venv/bin/python" tests/clients/mcp_client.py stdio "$server"

echo "==> over streamable HTTP"
: > "$out/mcp-http.out"
"$server" --http --port 0 > "$out/mcp-http.out" 2> "$out/mcp-http.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true' EXIT
url=""
for _ in $(seq 1 300); do
    url=$(sed -n 's|^listening on ||p' "$out/mcp-http.out")
    [ -n "$url" ] && break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "mcp_server did not start:" >&2
    cat "$out/mcp-http.err" >&2
    exit 1
fi
echo "mcp_server at $url"
"$venv/bin/python" tests/clients/mcp_client.py http "$url"
(cd "$out/ts" && node mcp_ts_client.mjs "$url")

kill "$pid" 2> /dev/null || true
wait "$pid" 2> /dev/null || true
trap - EXIT
echo "e2e mcp passed"
