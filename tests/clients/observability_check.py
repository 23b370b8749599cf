"""Calls and checks for .ci/e2e-observability.sh, each check against what the server
says it did (its /metrics.json).

    observability_check.py calls ws://ADDR
        Makes calls with many endings over the chat server's WebSocket protocol:
        success, invalid input, an unknown tool, a denial (bob is no admin), a
        cancellation (a long call stopped), each turn awaited to its tool_results.

    observability_check.py prometheus PROMETHEUS_ADDR METRICS_JSON_FILE
        A real Prometheus that scrapes the chat server answers
        `sum by (tool, status) (tool_dispatch_calls_total)` with exactly the calls made,
        by tool and status (polled until its next scrape, at most 60 s).

    observability_check.py dashboard DASHBOARD_JSON PROMETHEUS_ADDR METRICS_TEXT_FILE
        Every query of the Grafana dashboard is valid PromQL that Prometheus runs, and
        every series it names is one the server exports.

    observability_check.py spans SPANS_FILE METRICS_JSON_FILE
        The chat server's exported spans: one `execute_tool {tool}` span per call, with
        the GenAI attributes, kind INTERNAL, `error.type` and an ERROR status exactly on
        the calls that failed. The tracing example's: each call a child of its agent
        turn's span, in the same trace, arguments and results redacted.
"""

import asyncio
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter

UNKNOWN = "(unknown)"


def expected_calls(metrics):
    """(tool, status) -> calls, from the JSON counters; calls of no tool under (unknown)."""
    out = Counter()
    for t in metrics["tools"]:
        for status, n in t["by_status"].items():
            if n:
                out[(t["name"], status)] += n
    named = sum(t["calls"] for t in metrics["tools"])
    for status, n in metrics["by_status"].items():
        n -= sum(t["by_status"][status] for t in metrics["tools"])
        if n:
            out[(UNKNOWN, status)] += n
    assert sum(out.values()) == metrics["total"] and named <= metrics["total"], (out, metrics)
    return out


def prometheus(addr, metrics_file):
    with open(metrics_file, encoding="utf-8") as f:
        metrics = json.load(f)
    want = expected_calls(metrics)
    assert sum(want.values()) > 0, "no calls were made"
    query = "sum by (tool, status) (tool_dispatch_calls_total)"
    url = f"http://{addr}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    got, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        got = Counter()
        for series in body["data"]["result"]:
            n = int(float(series["value"][1]))
            if n:
                got[(series["metric"]["tool"], series["metric"]["status"])] = n
        if got == want:
            print(f"prometheus: {query} = the {sum(want.values())} calls made, by tool and status:")
            for (tool, status), n in sorted(want.items()):
                print(f"  {tool:>12} {status:<14} {n}")
            return
        time.sleep(0.5)
    raise SystemExit(f"prometheus answered {dict(got)}, the server made {dict(want)}")


def dashboard(dashboard_file, addr, metrics_text_file):
    with open(dashboard_file, encoding="utf-8") as f:
        dash = json.load(f)
    exported = set()
    for line in open(metrics_text_file, encoding="utf-8"):
        m = re.match(r"# TYPE (\w+) ", line)
        if m:
            exported.add(m.group(1))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs, "no queries"
    for expr in exprs:
        for name in re.findall(r"tool_dispatch_\w+", expr):
            family = re.sub(r"_bucket$", "", name)
            assert family in exported, f"{name} is not exported: {expr}"
        q = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        url = f"http://{addr}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", (expr, body)
    print(f"dashboard: {len(exprs)} queries of {len(dash['panels'])} panels run in Prometheus, "
          f"every series they name exported")


def spans(spans_file, metrics_file):
    with open(metrics_file, encoding="utf-8") as f:
        metrics = json.load(f)
    lines = [json.loads(line) for line in open(spans_file, encoding="utf-8")]
    errors = [line for line in lines if "error" in line]
    assert not errors, errors

    # The chat server: one span per call, attributed as the conventions say.
    server = [s for s in lines if s["service"] == "chat_server"]
    calls = [s for s in server if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    want = expected_calls(metrics)
    assert len(calls) == metrics["total"], f"{len(calls)} spans for {metrics['total']} calls"
    ids = [s["attributes"]["gen_ai.tool.call.id"] for s in calls]
    assert len(set(ids)) == len(ids), "two spans for one call"
    got = Counter()
    for s in calls:
        a = s["attributes"]
        tool, status = a["gen_ai.tool.name"], a["status"]
        assert s["name"] == f"execute_tool {tool}", s
        assert s["kind"] == "SPAN_KIND_INTERNAL", s
        assert a["gen_ai.tool.type"] == "function", s
        if status == "success":
            assert "error.type" not in a and s["status"] != "STATUS_CODE_ERROR", s
        else:
            assert a["error.type"] == status and s["status"] == "STATUS_CODE_ERROR", s
        assert "gen_ai.tool.call.arguments" not in a, "content is opt-in"
        known = any(t["name"] == tool for t in metrics["tools"])
        got[(tool if known else UNKNOWN, status)] += 1
    assert got == want, (got, want)
    print(f"otlp: {len(calls)} execute_tool spans from chat_server, one per call, "
          f"statuses {dict(Counter(s['attributes']['status'] for s in calls))}")

    # The tracing example: the calls are children of the agent turn's span.
    example = [s for s in lines if s["service"] == "tracing-example"]
    turns = [s for s in example if s["name"] == "invoke_agent demo"]
    assert len(turns) == 1, example
    turn = turns[0]
    children = [s for s in example if s["name"].startswith("execute_tool ")]
    assert sorted(s["attributes"]["gen_ai.tool.call.id"] for s in children) == \
        ["call_err", "call_ok", "call_timeout"], children
    for s in children:
        assert s["parent_span_id"] == turn["span_id"], (s, turn)
        assert s["trace_id"] == turn["trace_id"], (s, turn)
        assert json.loads(s["attributes"]["gen_ai.tool.call.arguments"]) is not None, s
    ok = next(s for s in children if s["attributes"]["gen_ai.tool.call.id"] == "call_ok")
    assert json.loads(ok["attributes"]["gen_ai.tool.call.result"])["city"] == "Paris", ok
    print(f"otlp: the tracing example's 3 calls are children of its agent turn "
          f"(trace {turn['trace_id']})")


async def turn(ws, calls, stop=None):
    """Sends one OpenAI-shaped turn; waits for its tool_results; returns the statuses."""
    await ws.send(json.dumps({"role": "assistant", "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for cid, name, args in calls]}))
    statuses = {}
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if m["type"] == "tool_executing" and m["call_id"] == stop:
            await ws.send(json.dumps({"type": "cancel", "run_id": m["run_id"]}))
        if m["type"] == "tool_completed":
            statuses[m["call_id"]] = m["status"]
        if m["type"] == "tool_results":
            return statuses


async def drive(base):
    from websockets.asyncio.client import connect
    async with connect(f"{base}/ws?token=alice-token") as alice, \
            connect(f"{base}/ws?token=bob-token") as bob:
        for ws in (alice, bob):
            assert json.loads(await ws.recv())["type"] == "ready"
        got = await turn(alice, [
            ("o1", "get_weather", {"city": "Paris"}),
            ("o2", "get_weather", {"city": "Tokyo"}),
            ("o3", "get_weather", {"town": "Paris"}),
            ("o4", "no_such_tool", {}),
            ("o5", "slow_task", {"steps": 2, "step_ms": 5}),
        ])
        assert got == {"o1": "success", "o2": "success", "o3": "invalid_input",
                       "o4": "unknown_tool", "o5": "success"}, got
        got = await turn(bob, [("b1", "list_users", {}), ("b2", "get_weather", {"city": "London"})])
        assert got == {"b1": "denied", "b2": "success"}, got
        got = await turn(alice, [("c1", "slow_task", {"steps": 1, "step_ms": 60000})], stop="c1")
        assert got == {"c1": "cancelled"}, got
    print("calls: 8 calls made (success, invalid_input, unknown_tool, denied, cancelled)")


def calls(base):
    asyncio.run(drive(base))


if __name__ == "__main__":
    commands = {"calls": calls, "prometheus": prometheus, "dashboard": dashboard, "spans": spans}
    commands[sys.argv[1]](*sys.argv[2:])
