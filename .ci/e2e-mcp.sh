#!/usr/bin/env bash
# End-to-end MCP: examples/mcp_server.rs driven by clients no one here wrote: the
# Python `mcp` SDK (2.x) over stdio and over streamable HTTP, in both protocol
# revisions, and the TypeScript client (@modelcontextprotocol/client, 2.x) over HTTP;
# then examples/mcp_conformance.rs checked by the official conformance suite
# (@modelcontextprotocol/conformance, on Node 22 from npm's node@22 package) and by
# the Python SDK for content blocks and approvals by elicitation.
#
# Needs: cargo, python3 with venv, node with npm. Each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/e2e
venv="$out/venv"
conformance_version=0.1.16
mkdir -p "$out/ts" "$out/conformance"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "mcp>=2,<3" jsonschema
if [ ! -d "$out/ts/node_modules/@modelcontextprotocol/client" ]; then
    (cd "$out/ts" && npm init -y > /dev/null && npm install --silent --no-audit --no-fund "@modelcontextprotocol/client@2")
fi
cp tests/clients/mcp_ts_client.mjs "$out/ts/"
installed="$out/conformance/node_modules/@modelcontextprotocol/conformance/package.json"
if ! grep -qs "\"version\": \"$conformance_version\"" "$installed" \
    || [ ! -x "$out/conformance/node_modules/.bin/node" ]; then
    (cd "$out/conformance" && npm init -y > /dev/null \
        && npm install --silent --no-audit --no-fund node@22 "@modelcontextprotocol/conformance@$conformance_version")
fi

echo "==> build the mcp_server, mcp_import and mcp_conformance examples"
cargo build --example mcp_server --example mcp_import --example mcp_conformance --features mcp
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

echo "==> the official MCP conformance suite against examples/mcp_conformance"
target/debug/examples/mcp_conformance --port 0 > "$out/conformance.out" 2> "$out/conformance.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true' EXIT
url=""
for _ in $(seq 1 300); do
    url=$(sed -n 's|^listening on ||p' "$out/conformance.out")
    [ -n "$url" ] && break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "mcp_conformance did not start:" >&2
    cat "$out/conformance.err" >&2
    exit 1
fi
# Scenarios of features the library does not serve (docs/mcp.md says why): expected
# to fail; the suite fails the run if one of them passes (a stale list) or if any
# other scenario fails.
cat > "$out/conformance/not-applicable.yml" << 'EOF'
server:
  - logging-set-level
  - tools-call-with-logging
  - completion-complete
  - tools-call-sampling
  - tools-call-elicitation
  - elicitation-sep1034-defaults
  - elicitation-sep1330-enums
  - resources-list
  - resources-read-text
  - resources-read-binary
  - resources-templates-read
  - resources-subscribe
  - resources-unsubscribe
  - prompts-list
  - prompts-get-simple
  - prompts-get-with-args
  - prompts-get-embedded-resource
  - prompts-get-with-image
EOF
(
    cd "$out/conformance"
    rm -rf results
    export PATH="$PWD/node_modules/.bin:$PATH"
    if ! conformance server --url "$url" --expected-failures not-applicable.yml -o results > suite.log 2>&1; then
        cat suite.log >&2
        exit 1
    fi
    sed -n '/SUMMARY/,$p' suite.log
    # Not in this version's default run: asked for by name.
    for scenario in json-schema-2020-12 server-sse-polling; do
        if ! conformance server --url "$url" --scenario "$scenario" -o results > "$scenario.log" 2>&1; then
            cat "$scenario.log" >&2
            exit 1
        fi
        grep -E "^Passed" "$scenario.log" | sed "s/^/$scenario: /"
    done
)

echo "==> Python mcp SDK: content blocks and approvals by elicitation, both revisions"
"$venv/bin/python" tests/clients/mcp_content_client.py "$url"
kill "$pid" 2> /dev/null || true
wait "$pid" 2> /dev/null || true
trap - EXIT
echo "e2e mcp passed"
