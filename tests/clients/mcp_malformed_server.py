#!/usr/bin/env python3
"""A hostile MCP server over stdio, written without any SDK: it completes the
handshake and lists one tool, `odd`, then answers every `tools/call` with something
that is not a tool result (the mode in argv[1]: `garbage`, a result whose `content`
is not a list; `not_json`, a line that is not JSON; `silent`, no answer at all).
"""
import json
import sys

mode = sys.argv[1] if len(sys.argv) > 1 else "garbage"


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    method, rid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": rid, "result": {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "malformed", "version": "0"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": rid, "result": {"tools": [{
            "name": "odd", "description": "Answers oddly.",
            "inputSchema": {"type": "object", "properties": {}}}]}})
    elif method == "tools/call":
        if mode == "garbage":
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": "not a list", "isError": 7}})
        elif mode == "not_json":
            sys.stdout.write("this is not JSON\n")
            sys.stdout.flush()
        # silent: nothing
    elif rid is not None:
        send({"jsonrpc": "2.0", "id": rid, "result": {}})
