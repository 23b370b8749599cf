#!/usr/bin/env python3
"""Drives tool-dispatch's MCP server (examples/mcp_server.rs) with the Python `mcp`
SDK (2.x), over stdio and over streamable HTTP with bearer tokens, in both protocol
revisions the SDK speaks: the initialize handshake with sessions (`legacy`,
2025-11-25) and the stateless 2026-07-28.

Usage:
  mcp_client.py stdio PATH_TO_mcp_server     (run as alice; events read from its stderr)
  mcp_client.py http http://127.0.0.1:PORT/mcp

Exits 0 when every check passes, 1 otherwise.
"""
import json
import os
import sys
import tempfile

import anyio
import jsonschema
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

TIMEOUT = 30  # seconds; a bound on a stuck server, not a performance threshold
checks = 0


def ok(what):
    global checks
    checks += 1
    print(f"  ok: {what}")


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def common_checks(client, who, admin):
    """What every connection must see; returns nothing, raises on a failure."""
    who = f"{who} (protocol {client.session.protocol_version})"
    tools = (await client.list_tools()).tools
    names = [t.name for t in tools]
    expected = ["get_weather", "send_email", "slow_task"] + (["list_users"] if admin else []) + ["firehose"]
    assert names == expected, (who, names)
    weather = next(t for t in tools if t.name == "get_weather")
    assert weather.output_schema and weather.output_schema["required"] == ["city", "temp_c", "conditions"], weather
    assert weather.annotations and weather.annotations.read_only_hint is True, weather.annotations
    ok(f"{who}: tools/list in registry order, scopes applied, output schema and hints")

    result = await client.call_tool("get_weather", {"city": "Paris"})
    assert not result.is_error, result
    # The SDK checks structuredContent against the tool's outputSchema itself; check
    # it here too, with the schema as listed.
    jsonschema.validate(result.structured_content, weather.output_schema)
    assert result.structured_content["temp_c"] == 21.0, result.structured_content
    ok(f"{who}: a call's structuredContent fits its outputSchema")

    bad = await client.call_tool("get_weather", {"city": 5})
    assert bad.is_error and "city" in text_of(bad), bad
    missing = await client.call_tool("get_weather", {})
    assert missing.is_error and "city" in text_of(missing), missing
    ok(f"{who}: invalid input is an error result naming the field")

    try:
        await client.call_tool("no_such_tool", {})
        raise AssertionError("an unknown tool must be a protocol error")
    except MCPError as e:
        assert e.error.code == -32602, e.error
    ok(f"{who}: an unknown tool is JSON-RPC -32602")

    if not admin:
        denied = await client.call_tool("list_users", {})
        assert denied.is_error and "admin" in text_of(denied), denied
        ok(f"{who}: a tool outside the user's scopes is an error result with the denial")

    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    done = await client.call_tool("slow_task", {"steps": 5, "step_ms": 20}, progress_callback=on_progress)
    assert not done.is_error, done
    await anyio.sleep(0.2)  # a late notification would land here
    assert len(seen) == 5 and all(a < b for a, b in zip(seen, seen[1:])) and seen[-1] == 1.0, seen
    ok(f"{who}: progress strictly increasing, nothing after the result")

    # Cancellation: the SDK sends notifications/cancelled when the caller gives up.
    started = anyio.Event()

    async def first_progress(progress, total, message):
        started.set()

    async with anyio.create_task_group() as tg:
        async def long_call():
            await client.call_tool("slow_task", {"steps": 1000, "step_ms": 50}, progress_callback=first_progress)

        tg.start_soon(long_call)
        with anyio.fail_after(TIMEOUT):
            await started.wait()
        tg.cancel_scope.cancel()
    # The connection is still good afterwards.
    again = await client.call_tool("get_weather", {"city": "Tokyo"})
    assert not again.is_error and again.structured_content["temp_c"] == 26.5, again
    ok(f"{who}: a call given up by the client; the connection goes on")


async def run_stdio(server_path):
    with tempfile.TemporaryFile(mode="w+") as errlog:
        params = StdioServerParameters(command=server_path, args=[], env={**os.environ, "TOOL_DISPATCH_TOKEN": "alice-token"})
        for mode in ["legacy", "auto"]:
            from mcp.client.stdio import stdio_client

            with anyio.fail_after(TIMEOUT * 4):
                async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:
                    await common_checks(client, f"stdio/{mode}", admin=True)
        # The server wrote every event of its calls to stderr: the given-up calls ended
        # `cancelled` on the server, each with its pair.
        errlog.seek(0)
        events = [json.loads(line) for line in errlog if line.startswith("{")]
        completed = [e for e in events if e["type"] == "tool_completed"]
        executing = [e for e in events if e["type"] == "tool_executing"]
        assert {e["call_id"] for e in completed} == {e["call_id"] for e in executing}, "pairs"
        cancelled = [e for e in completed if e["tool_name"] == "slow_task" and e["status"] == "cancelled"]
        assert len(cancelled) == 2, [(e["tool_name"], e["status"]) for e in completed]
        assert all(e["user_id"] == "alice" for e in events)
        ok("stdio: the server saw both cancellations, every call paired, all as alice")


async def run_http(url):
    for mode, version in [("legacy", "2025-11-25"), ("2026-07-28", "2026-07-28")]:
        for token, who, admin in [("alice-token", "alice", True), ("bob-token", "bob", False)]:
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            with anyio.fail_after(TIMEOUT * 4):
                async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
                    await common_checks(client, f"http/{version}/{who}", admin=admin)
    # No token, or a wrong one: 401 before anything runs, and the SDK cannot connect.
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "probe", "version": "1"}}}
    for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "alice-token"}]:
        async with create_mcp_http_client(headers=headers) as raw:
            response = await raw.post(url, json=init, headers={"Accept": "application/json, text/event-stream"})
            assert response.status_code == 401, (headers, response.status_code)
        connected = False
        try:
            http = create_mcp_http_client(headers=headers)
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                await client.list_tools()
                connected = True
        except BaseException:  # noqa: BLE001 - the SDK's error for a refused connection
            pass
        assert not connected, headers
    ok("http: no token, an unknown one or a malformed header is 401, and no session")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("stdio", "http"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    kind, target = sys.argv[1], sys.argv[2]
    try:
        anyio.run(run_stdio if kind == "stdio" else run_http, target)
    except BaseException as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"mcp client ({kind}): FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
    print(f"mcp client ({kind}): {checks} checks passed")


if __name__ == "__main__":
    main()
