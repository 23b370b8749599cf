// The client against the crate's chat_server example: the ready frame, a turn's
// events, approvals, cancel, a bad token, and hostile frames slipped into the
// server's stream by a proxy (unknown, malformed, duplicated, an auth close).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";

import {
  AuthError,
  MalformedFrameError,
  NotConnectedError,
  ToolDispatchClient,
  connect,
} from "../src/index.js";
import {
  ALICE,
  DEADLINE_MS,
  Proxy,
  anthropicTurn,
  closeFrame,
  openaiTurn,
  range1,
  recorder,
  seqsOf,
  startServer,
  wsFrame,
} from "./helpers.js";

const FAST = { initialMs: 20, maxMs: 200 };
const opts = { timeout: DEADLINE_MS * 2 };

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

/** A connected client of alice's (through `url`), with a recorder. */
async function alice(url = server.ws, extra = {}) {
  const client = connect({ url, token: ALICE, backoff: FAST, ...extra });
  const rec = recorder(client);
  await client.whenOpen({ timeoutMs: DEADLINE_MS });
  return { client, rec };
}

/** Checks the tool events of `callIds`: one tool_executing first, one tool_completed last, each. */
function checkPairs(events, callIds) {
  for (const id of callIds) {
    const mine = events.filter((e) => e.call_id === id && e.type.startsWith("tool_") && e.type !== "tool_results");
    assert.ok(mine.length >= 2, `events of ${id}: ${JSON.stringify(mine)}`);
    assert.equal(mine[0].type, "tool_executing", id);
    assert.equal(mine.at(-1).type, "tool_completed", id);
    assert.equal(mine.filter((e) => e.type === "tool_executing").length, 1, id);
    assert.equal(mine.filter((e) => e.type === "tool_completed").length, 1, id);
  }
}

describe("the example serves this client", () => {
  test("GET /client/tool-dispatch.js is src/index.js itself, as JavaScript; the page imports it", opts, async () => {
    const r = await fetch(`${server.http}/client/tool-dispatch.js`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-type"), /^text\/javascript/);
    const served = await r.text();
    assert.equal(served, readFileSync(new URL("../src/index.js", import.meta.url), "utf8"), "a stale or edited copy");
    const page = await (await fetch(`${server.http}/`)).text();
    assert.match(page, /import \{ ToolDispatchClient \} from "\/client\/tool-dispatch\.js";/);
    assert.ok(!page.includes("new WebSocket"), "the page opens no socket of its own");
  });
});

describe("a session", () => {
  test("ready names the user, the run, the epoch and the tools; the states go connecting → open", opts, async () => {
    const { client, rec } = await alice();
    const ready = rec.frames("ready")[0];
    assert.equal(ready.user_id, "alice");
    for (const tool of ["get_weather", "slow_task", "send_email"]) assert.ok(ready.tools.includes(tool), tool);
    assert.equal(client.runId, ready.run_id);
    assert.equal(client.protocolVersion, 1, "a ready frame without protocol_version is version 1");
    assert.ok(Number.isSafeInteger(ready.epoch));
    assert.deepEqual(rec.frames("state").map((e) => e.state), ["open"]);
    assert.equal(rec.frames("state")[0].previous, "connecting");
    client.close();
    assert.equal(client.state, "closed");
  });

  test("an OpenAI turn: every call's events in order, one pair per call, seq from 1 without a gap, then the results", opts, async () => {
    const { client, rec } = await alice();
    const runId = client.sendTurn(openaiTurn([
      ["call_js_1", "get_weather", { city: "Paris", api_key: "sk-js-secret" }],
      ["call_js_2", "slow_task", { steps: 3, step_ms: 10 }],
    ]));
    assert.equal(runId, client.runId);
    const results = await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    const events = rec.events;
    checkPairs(events, ["call_js_1", "call_js_2"]);
    const seqs = seqsOf(events, runId);
    assert.deepEqual(seqs, range1(seqs.length), "seq 1..n, each once, in order");
    assert.equal(results.seq, seqs.length, "the results come last");
    assert.equal(results.format, "openai");
    assert.deepEqual(results.call_ids, ["call_js_1", "call_js_2"]);
    assert.equal(events.filter((e) => e.type === "tool_progress" && e.call_id === "call_js_2").length, 3);
    const executing = events.find((e) => e.type === "tool_executing" && e.call_id === "call_js_1");
    assert.equal(executing.parameters.api_key, "[REDACTED]");
    assert.ok(!JSON.stringify(events).includes("sk-js-secret"), "the secret reached the client");
    const done = events.find((e) => e.type === "tool_completed" && e.call_id === "call_js_1");
    assert.equal(done.status, "success");
    assert.equal(done.result.temp_c, 21);
    assert.deepEqual(client.runs(), [{ run_id: runId, epoch: rec.frames("ready")[0].epoch, last_seq: seqs.length }]);
    client.close();
  });

  test("an Anthropic turn in a run the app names: results in Anthropic form, an invalid call in band", opts, async () => {
    const { client, rec } = await alice();
    const runId = client.sendTurn(anthropicTurn([
      ["toolu_js_1", "get_weather", { city: "Tokyo" }],
      ["toolu_js_2", "get_weather", { town: "Oslo" }],
    ]), { runId: "run_js_anthropic" });
    assert.equal(runId, "run_js_anthropic");
    const results = await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    checkPairs(rec.events, ["toolu_js_1", "toolu_js_2"]);
    assert.equal(results.run_id, "run_js_anthropic");
    assert.equal(results.format, "anthropic");
    assert.deepEqual(results.results.content.map((b) => b.tool_use_id), ["toolu_js_1", "toolu_js_2"]);
    const statuses = rec.frames("tool_completed").map((e) => e.status);
    assert.deepEqual(statuses, ["success", "invalid_input"]);
    assert.deepEqual(seqsOf(rec.events, runId), range1(results.seq));
    client.close();
  });

  test("approve and reject (with a message) answer calls waiting for approval", opts, async () => {
    const { client, rec } = await alice();
    const email = { to: "ann@example.com", subject: "Lunch", body: "Noon?" };
    client.sendTurn(openaiTurn([["call_js_ok", "send_email", email], ["call_js_no", "send_email", email]]));
    await rec.until((ev) => ev.filter((e) => e.type === "tool_approval_required").length === 2, "two approval requests");
    const ask = rec.frames("tool_approval_required").find((e) => e.call_id === "call_js_ok");
    assert.equal(ask.tool_name, "send_email");
    assert.equal(typeof ask.reason, "string");
    client.approve("call_js_ok");
    client.reject("call_js_no", "not today");
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    const done = Object.fromEntries(rec.frames("tool_completed").map((e) => [e.call_id, e]));
    assert.equal(done.call_js_ok.status, "success");
    assert.equal(done.call_js_ok.approval.decision, "approved");
    assert.equal(done.call_js_no.status, "rejected");
    assert.equal(done.call_js_no.approval.decision, "rejected");
    assert.match(done.call_js_no.error, /not today/);
    const resolved = rec.frames("tool_approval_resolved").map((e) => [e.call_id, e.decision, e.message]);
    assert.deepEqual(resolved.sort(), [["call_js_no", "rejected", "not today"], ["call_js_ok", "approved", null]]);
    for (const id of ["call_js_ok", "call_js_no"]) {
      const order = rec.events.filter((e) => e.call_id === id && e.type.startsWith("tool_approval")).map((e) => e.type);
      assert.deepEqual(order, ["tool_approval_required", "tool_approval_resolved"], id);
    }
    const recorded = rec.frames("decision_recorded").map((e) => [e.call_id, e.decision]);
    assert.deepEqual(recorded, [["call_js_ok", "approve"], ["call_js_no", "reject"]]);
    // A decision on a call that no longer waits: an `error` frame, as such.
    client.approve("call_js_ok");
    const err = await client.waitFor("error", () => true, { timeoutMs: DEADLINE_MS });
    assert.match(err.error, /no such pending approval/);
    assert.equal(client.state, "open");
    client.close();
  });

  test("cancel ends the run's call in flight (cancelled, paired) and is answered", opts, async () => {
    const { client, rec } = await alice();
    const runId = client.sendTurn(openaiTurn([["call_js_long", "slow_task", { steps: 10_000, step_ms: 20 }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_progress"), "the first progress");
    client.cancel();
    const answer = await client.waitFor("run_cancelled", (e) => e.run_id === runId, { timeoutMs: DEADLINE_MS });
    assert.equal(answer.calls, 1);
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    checkPairs(rec.events, ["call_js_long"]);
    assert.equal(rec.frames("tool_completed")[0].status, "cancelled");
    client.close();
  });

  test("a bad token: reported as an AuthError once, no retry loop", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const client = new ToolDispatchClient({ url: proxy.ws, token: "not-a-token", backoff: { initialMs: 1, maxMs: 1 } });
    const rec = recorder(client);
    const opened = client.connect().whenOpen();
    await assert.rejects(opened, (e) => e instanceof AuthError && e.status === 401 && e.code === "auth_failed");
    assert.equal(client.state, "closed");
    const states = rec.frames("state");
    assert.deepEqual(states.map((e) => e.state), ["connecting", "closed"]);
    assert.ok(states[1].error instanceof AuthError);
    assert.equal(client.stats.connects, 1, "one WebSocket attempt");
    assert.ok(proxy.accepted <= 2, `the WebSocket and the probe, nothing more: ${proxy.accepted}`);
    assert.throws(() => client.sendTurn(openaiTurn([["c", "get_weather", { city: "Paris" }]])), NotConnectedError);
    await proxy.close();
  });

  test("a close with an auth code (4001) ends the session instead of reconnecting", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const { client, rec } = await alice(proxy.ws);
    proxy.inject(closeFrame(4001, "token revoked"));
    const closed = await client.waitFor("state", (e) => e.state === "closed", { timeoutMs: DEADLINE_MS });
    assert.ok(closed.error instanceof AuthError);
    assert.equal(closed.error.closeCode, 4001);
    assert.ok(!rec.frames("state").some((e) => e.state === "reconnecting"));
    assert.equal(client.stats.connects, 1);
    await proxy.close();
  });

  test("unknown frames and unknown fields reach the app unchanged; malformed frames are reported, not thrown", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const { client, rec } = await alice(proxy.ws);
    const unknown = { type: "shiny_new_frame", nested: { list: [1, { deep: true }] }, note: "é ✓" };
    const later = {
      type: "tool_approval_resolved", call_id: "call_elsewhere", run_id: "run_js_other", user_id: "alice",
      tool_name: "send_email", decision: "escalated", seq: 1, field_from_the_future: [42],
    };
    proxy.inject(wsFrame(0x1, "this is { not json"));
    proxy.inject(wsFrame(0x1, "[1, 2, 3]"));
    proxy.inject(wsFrame(0x1, JSON.stringify({ type: 5 })));
    proxy.inject(wsFrame(0x2, Buffer.from([1, 2, 3])));
    proxy.inject(wsFrame(0x1, JSON.stringify(unknown)));
    proxy.inject(wsFrame(0x1, JSON.stringify(later)));
    const seen = await client.waitFor("tool_approval_resolved", () => true, { timeoutMs: DEADLINE_MS });
    assert.deepEqual(seen, later, "a known frame with a new value and a new field, unchanged");
    assert.deepEqual(rec.frames("shiny_new_frame"), [unknown]);
    const bad = rec.frames("malformed_frame");
    assert.equal(bad.length, 4);
    assert.ok(bad.every((e) => e.error instanceof MalformedFrameError && e.error.code === "malformed_frame"));
    assert.equal(bad[0].error.excerpt, "this is { not json");
    assert.equal(client.stats.malformed, 4);
    // The session goes on.
    assert.equal(client.state, "open");
    client.sendTurn(openaiTurn([["call_js_after", "get_weather", { city: "London" }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    assert.equal(rec.frames("tool_completed")[0].status, "success");
    client.close();
    await proxy.close();
  });

  test("a frame that comes twice reaches the app once", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const { client, rec } = await alice(proxy.ws);
    const runId = client.sendTurn(openaiTurn([["call_js_dup", "get_weather", { city: "Paris" }]]));
    const results = await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    const first = proxy.serverFrames.find((t) => t.includes('"seq":1,') && t.includes(runId));
    assert.ok(first, "the run's first frame went through the proxy");
    proxy.inject(wsFrame(0x1, first));
    proxy.inject(wsFrame(0x1, proxy.serverFrames.find((t) => t.includes('"type":"tool_results"'))));
    proxy.inject(wsFrame(0x1, JSON.stringify({ type: "marker" })));
    await client.waitFor("marker", () => true, { timeoutMs: DEADLINE_MS });
    assert.deepEqual(seqsOf(rec.events, runId), range1(results.seq), "no frame twice");
    assert.equal(client.stats.duplicates, 2);
    client.close();
    await proxy.close();
  });

  test("a frame past a gap in seq is passed on, after a `gap` event", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const { client, rec } = await alice(proxy.ws);
    const runId = client.sendTurn(openaiTurn([["call_js_gap", "get_weather", { city: "Paris" }]]));
    const results = await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    const later = { ...results, seq: results.seq + 2 };
    proxy.inject(wsFrame(0x1, JSON.stringify(later)));
    const gap = await client.waitFor("gap", () => true, { timeoutMs: DEADLINE_MS });
    assert.deepEqual(gap, { type: "gap", run_id: runId, after_seq: results.seq, seq: results.seq + 2 });
    await rec.until((ev) => ev.filter((e) => e.type === "tool_results").length === 2, "the frame after the gap");
    assert.equal(client.stats.gaps, 1);
    assert.equal(client.runs()[0].last_seq, results.seq + 2);
    client.close();
    await proxy.close();
  });

  test("the async iterator keeps its newest events for a reader that does not read, after a `dropped` marker", opts, async () => {
    const { client, rec } = await alice();
    const kinds = ["tool_executing", "tool_progress", "tool_completed", "tool_results"];
    const iterator = client.events({ bufferSize: 3, types: kinds });
    client.sendTurn(openaiTurn([["call_js_many", "slow_task", { steps: 6, step_ms: 1 }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "tool_results");
    const all = rec.events.filter((e) => kinds.includes(e.type));
    assert.ok(all.length > 3);
    const read = [];
    client.close(); // the iterator ends after what it kept
    for await (const e of iterator) read.push(e);
    assert.deepEqual(read, [{ type: "dropped", count: all.length - 3 }, ...all.slice(-3)]);
  });

  test("for await over the client sees the events in order and stops at break", opts, async () => {
    const { client } = await alice();
    client.sendTurn(openaiTurn([["call_js_iter", "slow_task", { steps: 2, step_ms: 1 }]]));
    const types = [];
    for await (const e of client) {
      if (e.call_id === "call_js_iter" || e.type === "tool_results") types.push(e.type);
      if (e.type === "tool_results") break;
    }
    assert.deepEqual(types, ["tool_executing", "tool_progress", "tool_progress", "tool_completed", "tool_results"]);
    client.close();
  });
});
