#!/usr/bin/env python3
"""An independent client for the chat_server example, written against its documented
protocol with the `websockets` package (PyPI), not against this project's code.

Usage: python_client.py ws://127.0.0.1:PORT
Exits 0 when every check passes, 1 (with the failed check) otherwise.
"""
import asyncio
import json
import pathlib
import sys

import jsonschema
import websockets

try:  # websockets >= 13
    from websockets.asyncio.client import connect
except ImportError:  # pragma: no cover - older releases
    from websockets import connect

TIMEOUT = 30  # seconds; a bound on a stuck server, not a performance threshold

# The published schema of the protocol's frames: every frame the server sends must
# be a ServerFrame or a RunFrame of it.
SCHEMA = json.loads((pathlib.Path(__file__).parents[2] / "docs" / "ws-protocol.schema.json").read_text())
FROM_SERVER = jsonschema.Draft202012Validator({
    "$defs": SCHEMA["$defs"],
    "anyOf": [{"$ref": "#/$defs/ServerFrame"}, {"$ref": "#/$defs/RunFrame"}],
})
FRAMES_CHECKED = 0


async def recv_json(ws):
    global FRAMES_CHECKED
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(raw, str), f"expected a text frame, got {type(raw).__name__}"
    msg = json.loads(raw)
    errors = list(FROM_SERVER.iter_errors(msg))
    assert not errors, f"a frame outside the published schema: {msg}: {errors[0].message}"
    FRAMES_CHECKED += 1
    return msg


async def close_politely(ws):
    """The close handshake: our close 1000 is answered with a close frame."""
    await ws.close()
    code = getattr(ws, "close_code", None)
    if code is None:  # websockets >= 13 keeps it on the received close frame
        code = ws.close_rcvd.code if ws.close_rcvd else None
    assert code == 1000, f"the server answered our close with {code!r}"


async def until_results(ws):
    seen = []
    while True:
        msg = await recv_json(ws)
        seen.append(msg)
        if msg["type"] == "tool_results":
            return seen


def check_pairing(msgs, user):
    """One tool_executing, then progress, then one tool_completed per call id."""
    state = {}
    for m in msgs:
        kind = m["type"]
        if kind not in ("tool_executing", "tool_progress", "tool_completed"):
            continue
        assert m["user_id"] == user, f"event for another user: {m}"
        prev = state.get(m["call_id"])
        if kind == "tool_executing":
            assert prev is None, f"duplicate tool_executing: {m}"
        else:
            assert prev in ("tool_executing", "tool_progress"), f"{kind} out of order after {prev}: {m}"
        state[m["call_id"]] = kind
    assert state, "no tool events at all"
    for call_id, last in state.items():
        assert last == "tool_completed", f"{call_id} never completed"
    return state


def completed(msgs, call_id):
    for m in msgs:
        if m["type"] == "tool_completed" and m["call_id"] == call_id:
            return m
    raise AssertionError(f"no tool_completed for {call_id}")


async def main(base):
    checks = 0
    async with connect(f"{base}/ws?token=alice-token", max_size=2**20) as ws:
        ready = await recv_json(ws)
        assert ready["type"] == "ready" and ready["user_id"] == "alice", ready
        assert "get_weather" in ready["tools"], ready
        assert ready["protocol_version"] == 1, ready
        checks += 1

        # OpenAI Chat Completions shape: arguments are a JSON string.
        await ws.send(json.dumps({
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_py_1", "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": json.dumps({"city": "Paris", "api_key": "sk-py-secret"})}},
                {"id": "call_py_2", "type": "function",
                 "function": {"name": "slow_task", "arguments": json.dumps({"steps": 2, "step_ms": 10})}},
            ],
        }))
        msgs = await until_results(ws)
        check_pairing(msgs, "alice")
        executing = [m for m in msgs if m["type"] == "tool_executing" and m["call_id"] == "call_py_1"][0]
        assert executing["parameters"]["api_key"] == "[REDACTED]", executing
        assert "sk-py-secret" not in json.dumps(msgs), "the secret leaked into the stream"
        assert completed(msgs, "call_py_1")["status"] == "success"
        assert completed(msgs, "call_py_1")["result"]["temp_c"] == 21.0
        assert completed(msgs, "call_py_2")["status"] == "success"
        assert sum(1 for m in msgs if m["type"] == "tool_progress" and m["call_id"] == "call_py_2") == 2
        results = msgs[-1]
        assert results["format"] == "openai", results
        tool_msgs = results["results"]
        assert [m["role"] for m in tool_msgs] == ["tool", "tool"], tool_msgs
        assert [m["tool_call_id"] for m in tool_msgs] == ["call_py_1", "call_py_2"], tool_msgs
        assert json.loads(tool_msgs[0]["content"])["city"] == "Paris", tool_msgs
        checks += 1

        # Anthropic Messages shape: input is an object; one call is invalid.
        await ws.send(json.dumps({
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look that up."},
                {"type": "tool_use", "id": "toolu_py_1", "name": "get_weather", "input": {"city": "Tokyo"}},
                {"type": "tool_use", "id": "toolu_py_2", "name": "get_weather", "input": {"town": "Oslo"}},
            ],
        }))
        msgs = await until_results(ws)
        check_pairing(msgs, "alice")
        assert completed(msgs, "toolu_py_1")["status"] == "success"
        assert completed(msgs, "toolu_py_2")["status"] == "invalid_input"
        results = msgs[-1]
        assert results["format"] == "anthropic", results
        message = results["results"]
        assert message["role"] == "user", message
        blocks = message["content"]
        assert [b["type"] for b in blocks] == ["tool_result", "tool_result"], blocks
        assert [b["tool_use_id"] for b in blocks] == ["toolu_py_1", "toolu_py_2"], blocks
        assert not blocks[0].get("is_error", False), blocks[0]
        assert blocks[1]["is_error"] is True, blocks[1]
        checks += 1

        # A malformed message gets an error message; the connection stays usable.
        await ws.send("{ definitely not json")
        err = await recv_json(ws)
        assert err["type"] == "error" and "malformed" in err["error"], err
        await ws.send(json.dumps({"role": "assistant", "tool_calls": [
            {"id": "call_py_3", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"London\"}"}}]}))
        msgs = await until_results(ws)
        assert completed(msgs, "call_py_3")["status"] == "success"
        await close_politely(ws)
        checks += 1

    # A dropped connection resumes its run after the last seq it saw: the remaining
    # progress, tool_completed and the results arrive once each, seq contiguous.
    async with connect(f"{base}/ws?token=alice-token", max_size=2**20) as ws:
        ready = await recv_json(ws)
        run, epoch = ready["run_id"], ready["epoch"]
        await ws.send(json.dumps({"role": "assistant", "tool_calls": [
            {"id": "call_py_resume", "type": "function",
             "function": {"name": "slow_task", "arguments": json.dumps({"steps": 5, "step_ms": 60})}}]}))
        first = []
        while not first or first[-1]["type"] != "tool_executing":
            first.append(await recv_json(ws))
        last = first[-1]["seq"]
        assert [m["seq"] for m in first] == list(range(1, last + 1)), first
    async with connect(f"{base}/ws?token=alice-token", max_size=2**20) as ws:
        await recv_json(ws)  # ready (a new default run)
        await ws.send(json.dumps({"type": "resume", "run_id": run, "after_seq": last, "epoch": epoch}))
        resumed = await recv_json(ws)
        assert resumed == {"type": "resumed", "run_id": run, "after_seq": last}, resumed
        rest = await until_results(ws)
        assert [m["seq"] for m in rest] == list(range(last + 1, last + 1 + len(rest))), rest
        check_pairing(first + rest, "alice")
        assert sum(1 for m in rest if m["type"] == "tool_progress") == 5, rest
        assert completed(rest, "call_py_resume")["status"] == "success"
        assert rest[-1]["call_ids"] == ["call_py_resume"], rest[-1]
        # Resuming again from the start replays the same frames, byte for byte.
        await ws.send(json.dumps({"type": "resume", "run_id": run, "after_seq": 0}))
        assert (await recv_json(ws))["type"] == "resumed"
        replay = [await recv_json(ws) for _ in range(last + len(rest))]
        assert replay == first + rest, "a replay differs from the live stream"
    checks += 1

    # Approvals: one call approved, one rejected with a message; bob cannot answer for
    # alice; a second answer is refused.
    def email(call_id, to):
        return {"id": call_id, "type": "function", "function": {"name": "send_email",
                "arguments": json.dumps({"to": to, "subject": "hi", "body": "see you"})}}

    async with connect(f"{base}/ws?token=alice-token", max_size=2**20) as ws, \
            connect(f"{base}/ws?token=bob-token", max_size=2**20) as bob:
        ready = await recv_json(ws)
        assert "send_email" in ready["tools"], ready
        await recv_json(bob)
        await ws.send(json.dumps({"role": "assistant", "tool_calls": [
            email("call_py_ok", "ann@example.com"), email("call_py_no", "boss@example.com")]}))
        seen = []
        while sum(1 for m in seen if m["type"] == "tool_approval_required") < 2:
            seen.append(await recv_json(ws))
        for m in seen:
            if m["type"] == "tool_approval_required":
                assert m["reason"] and m["expires_at"] and isinstance(m["seq"], int), m
        await bob.send(json.dumps({"type": "tool_approval_decision", "call_id": "call_py_ok", "decision": "approve"}))
        err = await recv_json(bob)
        assert err["type"] == "error" and err["error"].startswith("no such pending approval"), err
        await ws.send(json.dumps({"type": "tool_approval_decision", "call_id": "call_py_ok", "decision": "approve"}))
        await ws.send(json.dumps({"type": "tool_approval_decision", "call_id": "call_py_no", "decision": "reject",
                                  "message": "wrong address"}))
        await ws.send(json.dumps({"type": "tool_approval_decision", "call_id": "call_py_no", "decision": "approve"}))
        rest = await until_results(ws)
        # The refused second answer may be read after the turn's results went out
        # (the reject ended the turn): its error frame still comes.
        while not any(m["type"] == "error" for m in rest):
            rest.append(await recv_json(ws))
        msgs = seen + rest
        check_pairing([m for m in msgs if m["type"] != "tool_approval_required"], "alice")
        assert completed(msgs, "call_py_ok")["status"] == "success"
        assert completed(msgs, "call_py_ok")["approval"]["decision"] == "approved"
        no = completed(msgs, "call_py_no")
        assert no["status"] == "rejected" and "wrong address" in no["error"], no
        assert sum(1 for m in rest if m["type"] == "error") == 1, rest
    checks += 1

    # A reconnect while an approval is pending replays the request; approving on the
    # new socket completes the call.
    async with connect(f"{base}/ws?token=bob-token", max_size=2**20) as ws:
        ready = await recv_json(ws)
        pending_run, epoch2 = ready["run_id"], ready["epoch"]
        await ws.send(json.dumps({"role": "assistant", "tool_calls": [email("call_py_later", "ann@example.com")]}))
        msg = await recv_json(ws)
        assert msg["type"] == "tool_executing", msg
        last = msg["seq"]
    async with connect(f"{base}/ws?token=bob-token", max_size=2**20) as ws:
        await recv_json(ws)
        await ws.send(json.dumps({"type": "resume", "run_id": pending_run, "after_seq": last, "epoch": epoch2}))
        assert (await recv_json(ws))["type"] == "resumed"
        req = await recv_json(ws)
        assert req["type"] == "tool_approval_required" and req["seq"] == last + 1, req
        await ws.send(json.dumps({"type": "tool_approval_decision", "call_id": "call_py_later", "decision": "approve"}))
        rest = await until_results(ws)
        assert completed(rest, "call_py_later")["status"] == "success", rest
    checks += 1

    # Another user's run does not exist for bob; a stale epoch must resync.
    async with connect(f"{base}/ws?token=bob-token", max_size=2**20) as ws:
        await recv_json(ws)
        await ws.send(json.dumps({"type": "resume", "run_id": run, "after_seq": 0}))
        msg = await recv_json(ws)
        assert msg == {"type": "resync_required", "run_id": run, "reason": "unknown_run"}, msg
        await ws.send(json.dumps({"type": "resume", "run_id": "r", "after_seq": -1}))
        msg = await recv_json(ws)
        assert msg["type"] == "error", msg
    async with connect(f"{base}/ws?token=alice-token", max_size=2**20) as ws:
        await recv_json(ws)
        await ws.send(json.dumps({"type": "resume", "run_id": run, "after_seq": 0, "epoch": epoch + 1}))
        msg = await recv_json(ws)
        assert msg == {"type": "resync_required", "run_id": run, "reason": "epoch_changed"}, msg
    checks += 1

    # An unknown token is refused before the upgrade.
    try:
        async with connect(f"{base}/ws?token=mallory") as ws:
            raise AssertionError("an unknown token was accepted")
    except websockets.exceptions.InvalidStatus as e:  # websockets >= 14
        assert e.response.status_code == 401, e
    except getattr(websockets.exceptions, "InvalidStatusCode", ()) as e:  # older
        assert e.status_code == 401, e
    checks += 1

    print(f"python client (websockets {websockets.__version__}): {checks} checks passed, "
          f"{FRAMES_CHECKED} frames matched docs/ws-protocol.schema.json")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(main(sys.argv[1].rstrip("/")))
    except Exception as e:  # noqa: BLE001 - any failure fails the run
        import traceback
        traceback.print_exc()
        print(f"python client: FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
