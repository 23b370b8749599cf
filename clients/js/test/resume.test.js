// Resume: the network drops in the middle of a run and the client comes back with
// every frame once; a run the server cannot resume is reported and started again;
// a client made with the same storage (a reloaded page) picks the run up.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { ToolDispatchClient, connect, memoryStorage } from "../src/index.js";
import { ALICE, DEADLINE_MS, Proxy, openaiTurn, range1, recorder, seqsOf, startServer, wsFrame } from "./helpers.js";

const FAST = { initialMs: 20, maxMs: 200 };
const opts = { timeout: DEADLINE_MS * 2 };
const until = (client, type, pred = () => true) => client.waitFor(type, pred, { timeoutMs: DEADLINE_MS });

let server;
before(async () => { server = await startServer({ graceSecs: 5 }); });
after(async () => { await server?.stop(); });

describe("resume", () => {
  test("a drop in the middle of a run: reconnect, resume after the last seq, every frame once, the call not cancelled", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const client = connect({ url: proxy.ws, token: ALICE, backoff: FAST });
    const rec = recorder(client);
    await client.whenOpen({ timeoutMs: DEADLINE_MS });
    const runId = client.sendTurn(openaiTurn([["call_js_resume", "slow_task", { steps: 8, step_ms: 40 }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_progress"), "the first progress");

    // Cut the network, and hold the client's reconnect until the run has ended,
    // so that the frames it missed can only come from the resume.
    proxy.hold();
    assert.equal(proxy.cut(), 1);
    await rec.until((ev) => ev.find((e) => e.type === "state" && e.state === "reconnecting"), "reconnecting");
    const lastBefore = Math.max(...seqsOf(rec.events, runId));
    const watcher = connect({ url: server.ws, token: ALICE });
    await watcher.whenOpen({ timeoutMs: DEADLINE_MS });
    watcher.follow(runId); // another connection of alice's follows the same run
    const end = await until(watcher, "tool_results", (e) => e.run_id === runId);
    proxy.release();

    const resumed = await until(client, "resumed", (e) => e.run_id === runId);
    assert.equal(resumed.after_seq, lastBefore);
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "the results after the resume");
    const seqs = seqsOf(rec.events, runId);
    assert.ok(seqs.length > lastBefore, "frames came after the resume");
    assert.deepEqual(seqs, range1(end.seq), "no gap and no duplicate across the drop");
    const done = rec.frames("tool_completed");
    assert.equal(done.length, 1);
    assert.equal(done[0].status, "success", "the call went on while the client was away");
    const states = rec.frames("state").map((e) => e.state);
    assert.deepEqual(states.slice(-2), ["reconnecting", "open"]);
    assert.equal(client.runId, runId, "the run goes on as the current one");
    assert.deepEqual(client.runs(), [{ run_id: runId, epoch: rec.frames("ready")[0].epoch, last_seq: end.seq }]);
    assert.equal(client.stats.gaps, 0);
    watcher.close();
    client.close();
    await proxy.close();
  });

  test("a frame of a run being resumed that comes ahead of the replay (a run the server follows by itself) waits for the replay", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const client = connect({ url: proxy.ws, token: ALICE, backoff: FAST });
    const rec = recorder(client);
    await client.whenOpen({ timeoutMs: DEADLINE_MS });
    const runId = client.sendTurn(openaiTurn([["call_js_ahead", "slow_task", { steps: 8, step_ms: 20 }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_progress"), "the first progress");
    proxy.hold();
    proxy.cut();
    await rec.until((ev) => ev.find((e) => e.type === "state" && e.state === "reconnecting"), "reconnecting");
    const lastBefore = Math.max(...seqsOf(rec.events, runId));
    const watcher = connect({ url: server.ws, token: ALICE });
    const seen = recorder(watcher);
    await watcher.whenOpen({ timeoutMs: DEADLINE_MS });
    watcher.follow(runId);
    const end = await until(watcher, "tool_results", (e) => e.run_id === runId);
    assert.ok(end.seq >= lastBefore + 3);
    // Right after the new connection's `ready`, before the `resumed`: a later frame
    // of the run, as a subscription the server made by itself would send it.
    const ahead = seen.events.find((e) => e.run_id === runId && e.seq === lastBefore + 3);
    proxy.afterFrame = (text) => (text.includes('"type":"ready"') ? wsFrame(0x1, JSON.stringify(ahead)) : null);
    proxy.release();
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "the results after the resume");
    assert.deepEqual(seqsOf(rec.events, runId), range1(end.seq), "in order, each once");
    assert.equal(client.stats.held, 1);
    assert.equal(client.stats.gaps, 0);
    watcher.close();
    client.close();
    await proxy.close();
  });

  test("two drops in a row, the second during the resume's replay: still every frame once", opts, async () => {
    const proxy = await new Proxy(server.port).start();
    const client = connect({ url: proxy.ws, token: ALICE, backoff: FAST });
    const rec = recorder(client);
    await client.whenOpen({ timeoutMs: DEADLINE_MS });
    const runId = client.sendTurn(openaiTurn([["call_js_twice", "slow_task", { steps: 30, step_ms: 10 }]]));
    await rec.until((ev) => ev.find((e) => e.type === "tool_progress"), "the first progress");
    proxy.cut();
    await until(client, "resumed");
    proxy.cut(); // right after `resumed`: the replay is cut short
    await until(client, "resumed");
    await rec.until((ev) => ev.find((e) => e.type === "tool_results"), "the results");
    const end = rec.frames("tool_results")[0];
    assert.deepEqual(seqsOf(rec.events, runId), range1(end.seq));
    assert.equal(rec.frames("tool_completed")[0].status, "success");
    client.close();
    await proxy.close();
  });

  test("resync_required (a wrong epoch, an unknown run) is reported, the run is forgotten and a new one starts from seq 1", opts, async () => {
    // A real run of alice's, to resume with the wrong epoch.
    const first = connect({ url: server.ws, token: ALICE });
    await first.whenOpen({ timeoutMs: DEADLINE_MS });
    const oldRun = first.sendTurn(openaiTurn([["call_js_epoch", "get_weather", { city: "Paris" }]]));
    const done = await until(first, "tool_results");
    const epoch = first.ready.epoch;
    first.close();

    const storage = memoryStorage();
    storage.setItem("tool-dispatch", JSON.stringify({
      version: 1,
      run_id: oldRun,
      runs: [
        { run_id: "run_js_never_was", epoch, last_seq: 4 },
        { run_id: oldRun, epoch: epoch === 1 ? 2 : epoch - 1, last_seq: done.seq },
      ],
    }));
    const client = new ToolDispatchClient({ url: server.ws, token: ALICE, storage });
    const rec = recorder(client);
    assert.equal(client.runId, oldRun, "the stored run is the current one");
    client.connect();
    await rec.until((ev) => ev.filter((e) => e.type === "resync_required").length === 2, "two resync_required");
    const reasons = Object.fromEntries(rec.frames("resync_required").map((e) => [e.run_id, e.reason]));
    assert.deepEqual(reasons, { run_js_never_was: "unknown_run", [oldRun]: "epoch_changed" });
    assert.deepEqual(client.runs(), [], "both runs forgotten");
    const fresh = client.runId;
    assert.notEqual(fresh, oldRun);
    assert.equal(fresh, client.ready.run_id, "the connection's own run, nothing sent in it yet");
    assert.deepEqual(JSON.parse(storage.getItem("tool-dispatch")).runs, []);

    client.sendTurn(openaiTurn([["call_js_fresh", "get_weather", { city: "Tokyo" }]]));
    const results = await until(client, "tool_results");
    assert.equal(results.run_id, fresh);
    assert.deepEqual(seqsOf(rec.events, fresh), range1(results.seq));
    assert.equal(JSON.parse(storage.getItem("tool-dispatch")).last_seq, results.seq);
    client.close();
  });

  test("a new client with the same storage (a reloaded page) resumes the run: nothing again, then the next seq", opts, async () => {
    const storage = memoryStorage();
    const one = connect({ url: server.ws, token: ALICE, storage });
    await one.whenOpen({ timeoutMs: DEADLINE_MS });
    const runId = one.sendTurn(openaiTurn([["call_js_reload_1", "slow_task", { steps: 3, step_ms: 5 }]]));
    const firstResults = await until(one, "tool_results");
    one.close();

    const two = connect({ url: server.ws, token: ALICE, storage });
    const rec = recorder(two);
    const resumed = await until(two, "resumed");
    assert.deepEqual([resumed.run_id, resumed.after_seq], [runId, firstResults.seq]);
    assert.equal(two.runId, runId);
    two.sendTurn(openaiTurn([["call_js_reload_2", "get_weather", { city: "London" }]]));
    const results = await until(two, "tool_results");
    assert.equal(results.run_id, runId);
    const seqs = seqsOf(rec.events, runId);
    assert.equal(seqs[0], firstResults.seq + 1, "nothing from before the reload came again");
    assert.deepEqual(seqs, range1(results.seq).slice(firstResults.seq));
    two.close();
  });
});
