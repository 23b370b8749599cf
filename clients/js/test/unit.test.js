// The client's own rules without a server: backoff bounds, retries against a port
// nobody listens on, bad options, bounds on what it keeps, hostile storage, and a
// newer server (protocol_version 2) through a scripted WebSocket.
import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import {
  DEFAULTS,
  MessageTooBigError,
  NotConnectedError,
  ToolDispatchClient,
  backoffDelay,
  connect,
} from "../src/index.js";
import { DEADLINE_MS, recorder } from "./helpers.js";

/** A WebSocket that opens at once and says `ready`; records what is sent. */
function scriptedWebSocket(ready) {
  const sockets = [];
  class Scripted {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => {
        this.readyState = 1;
        this.onopen?.({});
        this.onmessage?.({ data: JSON.stringify(ready) });
      });
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.readyState = 3; }
    /** A frame from the server. */
    frame(obj) { this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) }); }
  }
  return { Scripted, sockets };
}

const READY = { type: "ready", user_id: "u", run_id: "run_default", epoch: 7, tools: [] };

test("backoff grows by its factor, stays under its cap, and jitter only shortens it", () => {
  const b = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 };
  assert.deepEqual([0, 1, 2, 3, 4, 10, 1e9].map((a) => backoffDelay(a, b, () => 0)), [100, 200, 400, 800, 1000, 1000, 1000]);
  assert.equal(backoffDelay(2, b, () => 1), 200, "at most half taken off");
  for (let a = 0; a < 50; a++) {
    const d = backoffDelay(a, b);
    assert.ok(d >= 50 && d <= 1000, `${a}: ${d}`);
  }
  assert.equal(backoffDelay(-3, b, () => 0), 100);
  assert.equal(backoffDelay(3, {}, () => 0), DEFAULTS.backoff.initialMs * 8);
});

test("nobody listening: the client keeps retrying with growing, capped waits, and stops at close", { timeout: DEADLINE_MS }, async () => {
  const port = await new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
  const client = new ToolDispatchClient({
    url: `ws://127.0.0.1:${port}/ws`, token: "t", backoff: { initialMs: 5, maxMs: 20, jitter: 0 },
  });
  const rec = recorder(client);
  client.connect();
  await rec.until((ev) => ev.filter((e) => e.state === "reconnecting").length >= 5, "five retries");
  client.close();
  const retries = rec.frames("state").filter((e) => e.state === "reconnecting").slice(0, 5);
  assert.deepEqual(retries.map((e) => e.attempt), [1, 2, 3, 4, 5]);
  assert.deepEqual(retries.map((e) => e.delay_ms), [5, 10, 20, 20, 20]);
  assert.equal(client.state, "closed");
  assert.equal(rec.frames("state").at(-1).error, undefined, "closed by the app, not by a failure");
  await assert.rejects(client.whenOpen(), { code: "closed" });
});

test("bad options are a TypeError at once; sending before the session is open is a NotConnectedError", () => {
  assert.throws(() => new ToolDispatchClient({ token: "t" }), TypeError);
  assert.throws(() => new ToolDispatchClient({ url: "ws://x/ws", token: 42 }), TypeError);
  assert.throws(() => new ToolDispatchClient({ url: "ws://x/ws", WebSocket: {} }), TypeError);
  assert.throws(() => new ToolDispatchClient({ url: "/ws" }), TypeError, "relative, and no page");
  assert.throws(() => new ToolDispatchClient({ url: "ftp://x/ws" }), TypeError);
  const client = new ToolDispatchClient({ url: "ws://127.0.0.1:9/ws", token: "t" });
  assert.throws(() => client.sendTurn({ role: "assistant", tool_calls: [] }), NotConnectedError);
  assert.throws(() => client.approve("call_1"), NotConnectedError);
  assert.throws(() => client.sendTurn("not an object"), TypeError);
  assert.equal(client.state, "idle");
});

test("a newer server (protocol_version 2, fields unknown here) works; a message over the limit is refused before it is sent", { timeout: DEADLINE_MS }, async () => {
  const { Scripted, sockets } = scriptedWebSocket({ ...READY, protocol_version: 2, feature_from_the_future: { on: true } });
  const client = connect({ url: "http://example.test/ws", token: "t&x=1", WebSocket: Scripted, maxMessageBytes: 1000 });
  const ready = await client.waitFor("ready", () => true, { timeoutMs: DEADLINE_MS });
  assert.deepEqual(ready.feature_from_the_future, { on: true });
  assert.equal(client.protocolVersion, 2);
  const url = new URL(sockets[0].url);
  assert.equal(url.protocol, "ws:");
  assert.equal(url.searchParams.get("token"), "t&x=1", "the token is escaped in the query");
  assert.throws(() => client.sendTurn({ role: "assistant", content: "é".repeat(600) }), MessageTooBigError);
  assert.deepEqual(sockets[0].sent, [], "nothing sent");
  client.sendTurn({ role: "assistant", tool_calls: [] });
  assert.deepEqual(sockets[0].sent.map((m) => m.run_id), ["run_default"]);
  client.close();
});

test("the runs kept are bounded (the current one stays); a run frame with a bad seq is malformed, not counted", { timeout: DEADLINE_MS }, async () => {
  const { Scripted, sockets } = scriptedWebSocket(READY);
  const client = connect({ url: "ws://x/ws", WebSocket: Scripted, maxRuns: 3 });
  const rec = recorder(client);
  await client.whenOpen({ timeoutMs: DEADLINE_MS });
  client.sendTurn({ role: "assistant", tool_calls: [] });
  for (let i = 0; i < 10; i++) sockets[0].frame({ type: "tool_progress", run_id: `run_${i}`, seq: 1 });
  assert.deepEqual(client.runs().map((r) => r.run_id), ["run_default", "run_8", "run_9"]);
  for (const seq of [-1, 1.5, "2", 2 ** 60]) sockets[0].frame({ type: "tool_progress", run_id: "run_9", seq });
  assert.equal(rec.frames("malformed_frame").length, 4);
  assert.equal(client.runs().find((r) => r.run_id === "run_9").last_seq, 1);
  client.close();
});

test("a storage that throws or holds garbage costs nothing but a count", { timeout: DEADLINE_MS }, async () => {
  const hostile = {
    getItem: () => "{ not json",
    setItem: () => { throw new Error("QuotaExceededError"); },
  };
  const { Scripted, sockets } = scriptedWebSocket(READY);
  const client = connect({ url: "ws://x/ws", WebSocket: Scripted, storage: hostile });
  const rec = recorder(client);
  await client.whenOpen({ timeoutMs: DEADLINE_MS });
  sockets[0].frame({ type: "tool_executing", run_id: "run_default", seq: 1, call_id: "c" });
  sockets[0].frame({ type: "tool_executing", run_id: "run_default", seq: 1, call_id: "c" });
  assert.equal(rec.frames("tool_executing").length, 1);
  assert.ok(client.stats.storage_errors >= 2);
  const odd = { getItem: () => JSON.stringify({ run_id: 5, runs: [{ run_id: "", last_seq: 1 }, { run_id: "r", last_seq: -1 }, null, "x"] }), setItem() {} };
  const other = new ToolDispatchClient({ url: "ws://x/ws", WebSocket: Scripted, storage: odd });
  assert.deepEqual(other.runs(), []);
  assert.equal(other.runId, null);
  client.close();
  other.close();
});
