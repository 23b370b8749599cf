// Test helpers: the crate's chat_server example as a child process, and a TCP proxy
// between client and server that can cut the network, hold reconnects, and slip
// frames of its own into the server's stream.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "../../..");

/** A bound on a stuck server or client, not a performance threshold. */
export const DEADLINE_MS = 30_000;

/** Demo tokens of the example. */
export const ALICE = "alice-token";
export const BOB = "bob-token";

/** The example's binary (built by `npm test`'s pretest, or named by TOOL_DISPATCH_CHAT_SERVER). */
export function serverBinary() {
  const bin = process.env.TOOL_DISPATCH_CHAT_SERVER ?? path.join(repoRoot, "target/debug/examples/chat_server");
  if (!existsSync(bin)) {
    throw new Error(`${bin} is missing: run \`npm test\` (its pretest builds it) or ` +
      "`cargo build --example chat_server --features axum` at the repository's root");
  }
  return bin;
}

/**
 * Starts the chat_server example on a free port; resolves once it prints its address.
 * @returns {Promise<{port: number, http: string, ws: string, stop: () => Promise<void>}>}
 */
export function startServer({ graceSecs = 5 } = {}) {
  const child = spawn(serverBinary(), ["--port", "0", "--grace-secs", String(graceSecs)], {
    env: { ...process.env, CHAT_SERVER_QUIET: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d) => { stderr = (stderr + d).slice(-4000); });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    await exited;
  };
  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => { void stop(); reject(new Error(`the server printed no address: ${stderr}`)); }, DEADLINE_MS);
    child.stdout.setEncoding("utf8").on("data", (d) => {
      out += d;
      const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        const port = Number(m[1]);
        resolve({ port, http: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}/ws`, stop });
      }
    });
    child.once("exit", (code) => { clearTimeout(timer); reject(new Error(`the server exited (${code}): ${stderr}`)); });
  });
}

/** A WebSocket frame as a server sends it (unmasked). */
export function wsFrame(opcode, payload) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(payload, "utf8");
  let head;
  if (body.length < 126) {
    head = Buffer.from([0x80 | opcode, body.length]);
  } else if (body.length < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 126;
    head.writeUInt16BE(body.length, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(body.length), 2);
  }
  return Buffer.concat([head, body]);
}

/** A close frame with `code`. */
export function closeFrame(code, reason = "") {
  const body = Buffer.alloc(2 + Buffer.byteLength(reason));
  body.writeUInt16BE(code, 0);
  body.write(reason, 2);
  return wsFrame(0x8, body);
}

/**
 * Splits the server→client byte stream after the HTTP 101 response into whole
 * WebSocket frames, so that bytes of our own can be written between two frames.
 */
class FrameCutter {
  constructor() {
    this.buf = Buffer.alloc(0);
    this.headersDone = false;
    this.raw = false;
  }

  /** @param {Buffer} chunk @returns {Buffer[]} whole units (the HTTP head, then frames) */
  push(chunk) {
    if (this.raw) return [chunk];
    this.buf = Buffer.concat([this.buf, chunk]);
    const out = [];
    if (!this.headersDone) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end < 0) return out;
      out.push(this.buf.subarray(0, end + 4));
      this.headersDone = true;
      if (!this.buf.subarray(0, 12).toString("latin1").startsWith("HTTP/1.1 101")) {
        // Not an upgrade (a plain HTTP answer): the rest goes through as it is.
        this.raw = true;
        if (this.buf.length > end + 4) out.push(this.buf.subarray(end + 4));
        this.buf = Buffer.alloc(0);
        return out;
      }
      this.buf = this.buf.subarray(end + 4);
    }
    for (;;) {
      if (this.buf.length < 2) break;
      let len = this.buf[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.buf.length < 4) break;
        len = this.buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) break;
        len = Number(this.buf.readBigUInt64BE(2));
        off = 10;
      }
      if (this.buf[1] & 0x80) off += 4; // masked (never from a server)
      if (this.buf.length < off + len) break;
      out.push(this.buf.subarray(0, off + len));
      this.buf = this.buf.subarray(off + len);
    }
    return out;
  }
}

/**
 * A TCP proxy on a free loopback port in front of `target`.
 * - `cut()` resets every open connection;
 * - `hold()` makes new connections wait (accepted, not forwarded) until `release()`;
 * - `inject(bytes)` writes a frame to every client between two server frames;
 * - `serverFrames` keeps the text frames the server sent (for replaying one);
 * - `afterFrame(text)`, when set, may return bytes to write right after a server frame.
 */
export class Proxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.links = new Set();
    this.held = [];
    this.holding = false;
    this.accepted = 0;
    /** @type {string[]} */
    this.serverFrames = [];
    /** @type {((text: string) => Buffer | null) | null} */
    this.afterFrame = null;
    this.server = net.createServer((socket) => this.#accept(socket));
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = /** @type {net.AddressInfo} */ (this.server.address()).port;
    this.ws = `ws://127.0.0.1:${this.port}/ws`;
    return this;
  }

  #accept(socket) {
    this.accepted += 1;
    socket.on("error", () => {});
    if (this.holding) {
      socket.pause();
      this.held.push(socket);
      return;
    }
    this.#pipe(socket);
  }

  #pipe(client) {
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    upstream.on("error", () => {});
    const cutter = new FrameCutter();
    const link = { client, upstream, ready: false };
    this.links.add(link);
    client.on("data", (d) => upstream.write(d));
    upstream.on("data", (d) => {
      for (const unit of cutter.push(d)) {
        client.write(unit);
        if (link.ready) {
          const text = this.#record(unit);
          const extra = text === undefined ? null : this.afterFrame?.(text);
          if (extra) client.write(extra);
        }
        link.ready = !cutter.raw;
      }
    });
    const end = () => {
      this.links.delete(link);
      client.destroy();
      upstream.destroy();
    };
    client.on("close", end);
    upstream.on("close", end);
    client.resume();
  }

  /** Keeps a server text frame; returns its text. */
  #record(frame) {
    if ((frame[0] & 0x0f) !== 0x1) return undefined;
    let off = 2;
    const len7 = frame[1] & 0x7f;
    if (len7 === 126) off = 4;
    if (len7 === 127) off = 10;
    const text = frame.subarray(off).toString("utf8");
    this.serverFrames.push(text);
    if (this.serverFrames.length > 10_000) this.serverFrames.shift();
    return text;
  }

  /** Writes `bytes` to every client whose upgrade is done, between two server frames. */
  inject(bytes) {
    let n = 0;
    for (const link of this.links) {
      if (!link.ready) continue;
      link.client.write(bytes);
      n += 1;
    }
    return n;
  }

  /** Resets every open connection (as a dropped network would); returns how many. */
  cut() {
    const n = this.links.size;
    for (const { client, upstream } of [...this.links]) {
      client.resetAndDestroy();
      upstream.destroy();
    }
    this.links.clear();
    return n;
  }

  hold() { this.holding = true; }

  release() {
    this.holding = false;
    for (const socket of this.held.splice(0)) this.#pipe(socket);
  }

  async close() {
    this.cut();
    for (const s of this.held.splice(0)) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** An OpenAI assistant message calling `name` with `args`. */
export function openaiTurn(calls) {
  return {
    role: "assistant",
    content: null,
    tool_calls: calls.map(([id, name, args]) => ({
      id, type: "function", function: { name, arguments: JSON.stringify(args) },
    })),
  };
}

/** An Anthropic assistant message with `tool_use` blocks. */
export function anthropicTurn(calls) {
  return {
    role: "assistant",
    content: [
      { type: "text", text: "Let me run that." },
      ...calls.map(([id, name, input]) => ({ type: "tool_use", id, name, input })),
    ],
  };
}

/**
 * Records every event the client gives to `on("*")`, and lets a test wait until
 * what it recorded satisfies a condition (checked at each event, no polling).
 */
export function recorder(client) {
  const events = [];
  const waiters = new Set();
  client.on("*", (e) => {
    events.push(e);
    for (const w of [...waiters]) w();
  });
  return {
    events,
    frames: (type) => events.filter((e) => e.type === type),
    until(cond, what = "a condition") {
      return new Promise((resolve, reject) => {
        const check = () => {
          let v;
          try { v = cond(events); } catch (e) { waiters.delete(check); clearTimeout(t); reject(e); return; }
          if (v) { waiters.delete(check); clearTimeout(t); resolve(v); }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out waiting for ${what}; last events: ${JSON.stringify(events.slice(-5).map((e) => e.type))}`));
        }, DEADLINE_MS);
        waiters.add(check);
        check();
      });
    },
  };
}

/** The `seq`s of `run_id`'s frames among `events`. */
export function seqsOf(events, runId) {
  return events.filter((e) => e.run_id === runId && typeof e.seq === "number").map((e) => e.seq);
}

/** 1..n */
export function range1(n) {
  return Array.from({ length: n }, (_, i) => i + 1);
}
