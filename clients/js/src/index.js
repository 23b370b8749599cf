// Client for the tool-dispatch WebSocket session (protocol version 1).
//
// One ES module, no dependencies: the browser's WebSocket, or Node 22's built-in one.
// It keeps the front-end contract of a resumable run stream (docs/run-streams.md):
//
// - keep {run_id, epoch, last_seq} per run followed (memory by default, or a Web
//   Storage such as sessionStorage, so a reload resumes too);
// - drop every frame with seq <= last_seq (a frame may arrive twice across a resume);
// - on every connect, resume each followed run after its last_seq;
// - on resync_required, forget the run and start again from the server's state;
// - reconnect by itself, with capped, jittered backoff; stop on an auth failure.
//
// Every frame reaches the app, unknown types and unknown fields included: changes to
// the protocol are additive.

/** The protocol version this client speaks; a `ready` frame without one is version 1. */
export const PROTOCOL_VERSION = 1;

/** Default bounds and timings, each overridable in the constructor's options. */
export const DEFAULTS = Object.freeze({
  /** Reconnect backoff: initialMs · factor^attempt, capped at maxMs, minus up to `jitter` of it at random. */
  backoff: Object.freeze({ initialMs: 250, maxMs: 5000, factor: 2, jitter: 0.5 }),
  /** Events each async iterator keeps for a reader that does not read; past it the oldest go. */
  bufferSize: 1024,
  /** Runs followed at once (the server's default limit per connection). */
  maxRuns: 8,
  /** Largest message sent (the server's default limit); larger ones throw. */
  maxMessageBytes: 64 * 1024,
  /** Where the run state is kept in the storage. */
  storageKey: "tool-dispatch",
  /** Bound on the HTTP request that tells an auth failure from a network failure. */
  authProbeTimeoutMs: 5000,
});

/** Close codes that mean "these credentials will not do": the client stops retrying. */
const AUTH_CLOSE_CODES = new Set([1008, 4001, 4003, 4401, 4403]);
/** HTTP statuses of a refused upgrade that mean the same. */
const AUTH_STATUSES = new Set([401, 403]);

// ------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------

/** Base class of every error this client raises or reports; `code` says which. */
export class ToolDispatchError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    this.name = "ToolDispatchError";
    /** @type {string} */
    this.code = code;
  }
}

/** The server refused the credentials (HTTP 401/403 before the upgrade, or an auth close code). */
export class AuthError extends ToolDispatchError {
  /** @param {string} message @param {{status?: number, closeCode?: number}} [detail] */
  constructor(message, detail = {}) {
    super("auth_failed", message);
    this.name = "AuthError";
    /** HTTP status of the refused upgrade, when known. */
    this.status = detail.status;
    /** WebSocket close code, when the server closed with an auth code. */
    this.closeCode = detail.closeCode;
  }
}

/** A server frame that is not a JSON object with a string `type` (reported, never thrown). */
export class MalformedFrameError extends ToolDispatchError {
  /** @param {string} message @param {string} excerpt */
  constructor(message, excerpt) {
    super("malformed_frame", message);
    this.name = "MalformedFrameError";
    /** The start of what was received (at most 200 characters). */
    this.excerpt = excerpt;
  }
}

/** A message was sent while the session was not open. */
export class NotConnectedError extends ToolDispatchError {
  /** @param {string} state */
  constructor(state) {
    super("not_connected", `not connected (state: ${state}); wait for the "open" state`);
    this.name = "NotConnectedError";
    this.state = state;
  }
}

/** A message larger than `maxMessageBytes` (the server would refuse it and close). */
export class MessageTooBigError extends ToolDispatchError {
  /** @param {number} bytes @param {number} limit */
  constructor(bytes, limit) {
    super("message_too_big", `message of ${bytes} bytes; at most ${limit} are accepted`);
    this.name = "MessageTooBigError";
    this.bytes = bytes;
    this.limit = limit;
  }
}

/** The client was closed (or failed for good) while something waited on it. */
export class ClosedError extends ToolDispatchError {
  /** @param {string} message @param {ErrorOptions} [options] */
  constructor(message, options) {
    super("closed", message, options);
    this.name = "ClosedError";
  }
}

/** A `waitFor` that ran out of time. */
export class TimeoutError extends ToolDispatchError {
  /** @param {string} message */
  constructor(message) {
    super("timeout", message);
    this.name = "TimeoutError";
  }
}

// ------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------

/**
 * The wait before reconnect attempt `attempt` (0 for the first retry).
 * @param {number} attempt
 * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number}} [backoff]
 * @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, backoff = {}, random = Math.random) {
  const { initialMs, maxMs, factor, jitter } = { ...DEFAULTS.backoff, ...backoff };
  const exp = Math.min(Math.max(0, attempt), 64);
  const base = Math.min(maxMs, initialMs * factor ** exp);
  const j = Math.min(1, Math.max(0, jitter));
  return Math.max(0, Math.round(base * (1 - j * random())));
}

/**
 * A storage kept in memory (the default): the `getItem`/`setItem`/`removeItem`
 * subset of the Web Storage API.
 * @returns {{getItem(key: string): string | null, setItem(key: string, value: string): void, removeItem(key: string): void}}
 */
export function memoryStorage() {
  const map = new Map();
  return {
    getItem: (key) => (map.has(key) ? map.get(key) : null),
    setItem: (key, value) => { map.set(key, String(value)); },
    removeItem: (key) => { map.delete(key); },
  };
}

/** @param {unknown} v */
const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
/** @param {unknown} v */
const isSeq = (v) => Number.isSafeInteger(v) && /** @type {number} */ (v) >= 0;
/** @param {string} text */
const excerpt = (text) => (text.length > 200 ? `${text.slice(0, 200)}…` : text);

/** A run id no other client picks: `run_` and 64 random bits. */
function freshRunId() {
  const bytes = new Uint8Array(8);
  globalThis.crypto.getRandomValues(bytes);
  return `run_${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** @param {string} text */
function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/** Reports an exception thrown by app code without stopping the client. */
function reportAppError(/** @type {unknown} */ error) {
  queueMicrotask(() => { throw error; });
}

/**
 * The session URL with the token (browsers cannot set headers on a WebSocket).
 * @param {string | URL} url @param {string | undefined} token
 */
function sessionUrl(url, token) {
  const u = new URL(String(url), globalThis.location?.href);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (token !== undefined) u.searchParams.set("token", token);
  return u;
}

// ------------------------------------------------------------------------------------
// The async iterator's bounded queue
// ------------------------------------------------------------------------------------

/**
 * One reader's events: at most `size` wait; when a new one arrives at a full queue
 * the oldest goes, and the reader's next item is `{type: "dropped", count}` (how many
 * went) before the oldest still kept. The socket is never slowed by a reader.
 */
class EventQueue {
  /** @param {number} size @param {Set<string> | null} types @param {() => void} detach */
  constructor(size, types, detach) {
    this.size = Math.max(1, Math.floor(size));
    this.types = types;
    this.detach = detach;
    /** @type {object[]} */
    this.items = [];
    this.dropped = 0;
    this.done = false;
    /** @type {((r: IteratorResult<object>) => void) | null} */
    this.waiter = null;
  }

  /** @param {{type: string}} event */
  push(event) {
    if (this.done || (this.types && !this.types.has(event.type))) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w({ value: event, done: false });
      return;
    }
    if (this.items.length >= this.size) {
      this.items.shift();
      this.dropped += 1;
    }
    this.items.push(event);
  }

  /** No more events: the reader gets what is buffered, then the end. */
  end() {
    this.done = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w({ value: undefined, done: true });
    }
  }

  /** @returns {Promise<IteratorResult<object>>} */
  next() {
    if (this.dropped > 0) {
      const count = this.dropped;
      this.dropped = 0;
      return Promise.resolve({ value: { type: "dropped", count }, done: false });
    }
    if (this.items.length > 0) {
      return Promise.resolve({ value: /** @type {object} */ (this.items.shift()), done: false });
    }
    if (this.done) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => { this.waiter = resolve; });
  }

  /** @returns {Promise<IteratorResult<object>>} */
  return() {
    this.items = [];
    this.dropped = 0;
    this.end();
    this.detach();
    return Promise.resolve({ value: undefined, done: true });
  }
}

// ------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------

/**
 * A session with a tool-dispatch server: see index.d.ts for the documented API.
 */
export class ToolDispatchClient {
  /** @type {any} */ #opts;
  /** @type {any} */ #WebSocket;
  /** @type {any} */ #storage;
  /** @type {"idle" | "connecting" | "open" | "reconnecting" | "closed"} */
  #state = "idle";
  /** @type {any} */ #ws = null;
  #generation = 0;
  #attempt = 0;
  /** @type {ReturnType<typeof setTimeout> | null} */ #timer = null;
  /** @type {any} */ #ready = null;
  /** @type {Map<string, {run_id: string, epoch: number | null, last_seq: number, resuming: boolean, retries: number, timer: ReturnType<typeof setTimeout> | null}>} */
  #runs = new Map();
  /** @type {string | null} */ #current = null;
  /** @type {unknown} */ #closeError = null;
  /** @type {Map<string, Set<Function>>} */ #listeners = new Map();
  /** @type {Set<EventQueue>} */ #queues = new Set();
  #stats = { connects: 0, duplicates: 0, held: 0, gaps: 0, malformed: 0, storage_errors: 0 };

  /** @param {any} options */
  constructor(options) {
    if (!isObject(options) || (typeof options.url !== "string" && !(options.url instanceof URL))) {
      throw new TypeError("new ToolDispatchClient({url, token}): `url` is the session's ws(s):// or http(s):// URL");
    }
    const t = options.token;
    if (t !== undefined && typeof t !== "string" && typeof t !== "function") {
      throw new TypeError("`token` is a string or a function returning one");
    }
    this.#opts = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
    };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("no WebSocket here: use a browser or Node 22+, or pass `WebSocket` in the options");
    }
    try {
      const u = sessionUrl(options.url, undefined);
      if (u.protocol !== "ws:" && u.protocol !== "wss:") throw new TypeError(`scheme ${u.protocol}`);
    } catch (error) {
      throw new TypeError(`\`url\` ${String(options.url)} is not a ws(s):// or http(s):// URL (a relative one needs a page)`, { cause: error });
    }
    this.#storage = options.storage ?? memoryStorage();
    this.#load();
  }

  // ---- what the app reads ----------------------------------------------------------

  /** @returns {"idle" | "connecting" | "open" | "reconnecting" | "closed"} */
  get state() { return this.#state; }

  /** The run model turns go to when they name none. */
  get runId() { return this.#current; }

  /** The last `ready` frame (null before the first). */
  get ready() { return this.#ready; }

  /** The server's protocol version (absent in the `ready` frame means 1). */
  get protocolVersion() {
    if (!this.#ready) return null;
    const v = this.#ready.protocol_version;
    return Number.isSafeInteger(v) ? v : 1;
  }

  /** Counters: connects, duplicates dropped, frames held during a resume, gaps, malformed frames, storage errors. */
  get stats() { return { ...this.#stats }; }

  /** The runs followed, each `{run_id, epoch, last_seq}`. */
  runs() {
    return [...this.#runs.values()].map(({ run_id, epoch, last_seq }) => ({ run_id, epoch, last_seq }));
  }

  // ---- connection ------------------------------------------------------------------

  /** Opens the session (again, after `close`). Does nothing while connecting or open. */
  connect() {
    if (this.#state === "connecting" || this.#state === "open" || this.#state === "reconnecting") return this;
    this.#attempt = 0;
    this.#closeError = null;
    this.#setState("connecting", {});
    void this.#dial();
    return this;
  }

  /** Closes the session for good (until `connect`): no reconnect, iterators end, waiters reject. */
  close() {
    this.#shutdown({ code: 1000, reason: "closed by the app" });
  }

  /**
   * Resolves once the session is open (at once if it is); rejects when the client
   * closes first (with the AuthError of an auth failure).
   * @param {{timeoutMs?: number, signal?: AbortSignal}} [options]
   */
  whenOpen(options = {}) {
    if (this.#state === "open") return Promise.resolve();
    return this.waitFor("state", (e) => e.state === "open", options).then(() => undefined);
  }

  // ---- messages --------------------------------------------------------------------

  /**
   * Sends a model turn: an OpenAI assistant message with `tool_calls` or an Anthropic
   * assistant message with `tool_use` blocks. Returns the run it goes to.
   * @param {object} message @param {{runId?: string}} [options]
   */
  sendTurn(message, options = {}) {
    if (!isObject(message)) {
      throw new TypeError("a model turn is an object (an OpenAI or Anthropic assistant message)");
    }
    const m = /** @type {any} */ (message);
    const runId = options.runId ?? (typeof m.run_id === "string" ? m.run_id : this.#current);
    if (typeof runId !== "string" || runId === "") throw new NotConnectedError(this.#state);
    this.#sendJson({ ...m, run_id: runId });
    if (!this.#runs.has(runId)) this.#track(runId, 0);
    this.#persist();
    return runId;
  }

  /** Approves a call waiting for approval (`message` optional). @param {string} callId @param {string} [message] */
  approve(callId, message) {
    this.#decide(callId, "approve", message);
  }

  /** Rejects a call waiting for approval, with an optional message for the model. @param {string} callId @param {string} [message] */
  reject(callId, message) {
    this.#decide(callId, "reject", message);
  }

  /** Cancels the calls in flight of a run (the current one by default). @param {string} [runId] */
  cancel(runId = this.#current ?? undefined) {
    if (typeof runId !== "string") throw new NotConnectedError(this.#state);
    this.#sendJson({ type: "cancel", run_id: runId });
  }

  /**
   * Follows a run of this user (another tab's, say) from after `afterSeq`, now and on
   * every reconnect. @param {string} runId @param {{afterSeq?: number}} [options]
   */
  follow(runId, options = {}) {
    const afterSeq = options.afterSeq ?? 0;
    if (typeof runId !== "string" || runId === "") throw new TypeError("`runId` is a non-empty string");
    if (!isSeq(afterSeq)) throw new TypeError("`afterSeq` is a whole number from 0");
    if (this.#state !== "open") throw new NotConnectedError(this.#state);
    const run = this.#runs.get(runId) ?? this.#track(runId, afterSeq);
    run.last_seq = afterSeq;
    run.epoch = this.#ready?.epoch ?? run.epoch;
    this.#resume(run);
    this.#persist();
  }

  /** Stops following a run: it is no longer resumed (nor kept in the storage). @param {string} runId */
  forget(runId) {
    const run = this.#runs.get(runId);
    if (!run) return;
    if (run.timer !== null) clearTimeout(run.timer);
    this.#runs.delete(runId);
    if (this.#current === runId) this.#current = this.#unusedRunId(runId);
    this.#persist();
  }

  /** Makes a new, empty run the current one; returns its id. */
  newRun() {
    this.#current = this.#unusedRunId();
    this.#persist();
    return this.#current;
  }

  /** Sends any message as is (an object is sent as JSON, a string as it is). @param {object | string} payload */
  send(payload) {
    if (typeof payload === "string") this.#sendText(payload);
    else this.#sendJson(payload);
  }

  // ---- events ----------------------------------------------------------------------

  /**
   * Calls `fn` with every event of `type` (`"*"`: every event). Returns a function
   * that removes it. @param {string} type @param {Function} fn
   */
  on(type, fn) {
    if (typeof fn !== "function") throw new TypeError("on(type, fn): `fn` is a function");
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** Removes a listener added with `on`. @param {string} type @param {Function} fn */
  off(type, fn) {
    const set = this.#listeners.get(type);
    if (set && set.delete(fn) && set.size === 0) this.#listeners.delete(type);
  }

  /**
   * The next event of `type` for which `predicate` holds. Rejects with a
   * ClosedError when the client closes first, a TimeoutError after `timeoutMs`.
   * @param {string} type @param {(e: any) => boolean} [predicate]
   * @param {{timeoutMs?: number, signal?: AbortSignal}} [options]
   * @returns {Promise<any>}
   */
  waitFor(type, predicate = () => true, options = {}) {
    return new Promise((resolve, reject) => {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      const done = () => {
        offEvent();
        offState();
        if (timer !== undefined) clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
      };
      const offEvent = this.on(type, (/** @type {any} */ e) => {
        let hit;
        try {
          hit = predicate(e);
        } catch (err) {
          done();
          reject(err);
          return;
        }
        if (hit) { done(); resolve(e); }
      });
      const offState = this.on("state", (/** @type {any} */ e) => {
        if (e.state !== "closed") return;
        done();
        reject(e.error ?? new ClosedError(`the client closed while waiting for "${type}"`));
      });
      const onAbort = () => { done(); reject(options.signal?.reason); };
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener("abort", onAbort);
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          done();
          reject(new TimeoutError(`no "${type}" event within ${options.timeoutMs} ms`));
        }, options.timeoutMs);
      }
      if (this.#state === "closed") {
        done();
        reject(this.#closeError ?? new ClosedError(`the client is closed; "${type}" will not come`));
      }
    });
  }

  /**
   * The events as an async iterator with its own bounded buffer (`bufferSize`,
   * default 1024). Past it the oldest events go and the next item is
   * `{type: "dropped", count}`. Ends when the client closes.
   * @param {{bufferSize?: number, types?: string[]}} [options]
   */
  events(options = {}) {
    const queue = new EventQueue(
      options.bufferSize ?? this.#opts.bufferSize,
      options.types ? new Set(options.types) : null,
      () => this.#queues.delete(queue),
    );
    if (this.#state === "closed") queue.end();
    else this.#queues.add(queue);
    return {
      next: () => queue.next(),
      return: () => queue.return(),
      [Symbol.asyncIterator]() { return this; },
    };
  }

  [Symbol.asyncIterator]() {
    return this.events();
  }

  // ---- internals: connection -------------------------------------------------------

  async #dial() {
    this.#timer = null;
    const generation = ++this.#generation;
    let token;
    try {
      const t = this.#opts.token;
      token = typeof t === "function" ? await t() : t;
      if (token !== undefined && typeof token !== "string") throw new TypeError("the token function returned no string");
    } catch (error) {
      if (generation === this.#generation && this.#state !== "closed") this.#retry({ error });
      return;
    }
    if (generation !== this.#generation || this.#state === "closed") return;
    let url, ws;
    try {
      url = sessionUrl(this.#opts.url, token);
      ws = new this.#WebSocket(url.href);
    } catch (error) {
      // A URL the WebSocket refuses (syntax, scheme, blocked port) will not get better.
      this.#shutdown({ code: 1006, reason: "the WebSocket could not be created", error });
      return;
    }
    this.#ws = ws;
    const link = { opened: false };
    this.#stats.connects += 1;
    ws.onopen = () => { link.opened = true; };
    ws.onmessage = (/** @type {{data: unknown}} */ e) => {
      if (this.#ws === ws) this.#onData(e.data);
    };
    /** @param {{code: number, reason: string}} e */
    const finish = (e) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#stopRunTimers();
      void this.#closed(e, link, url, generation);
    };
    // A failed handshake fires `error`; browsers then fire `close` (1006), but Node
    // 22's WebSocket (undici 6) fires nothing more: take the error as the end.
    ws.onerror = () => { if (!link.opened) finish({ code: 1006, reason: "" }); };
    ws.onclose = finish;
  }

  /**
   * The socket closed by itself: an auth failure ends the client; anything else is
   * retried.
   * @param {{code: number, reason: string}} e @param {{opened: boolean}} link
   * @param {URL} url @param {number} generation
   */
  async #closed(e, link, url, generation) {
    if (this.#state === "closed") return;
    if (AUTH_CLOSE_CODES.has(e.code)) {
      const error = new AuthError(`the server closed the session: ${e.code} ${e.reason || "(no reason)"}`, { closeCode: e.code });
      return this.#shutdown({ code: e.code, reason: e.reason, error });
    }
    let status;
    if (!link.opened && this.#opts.authProbe !== false) {
      // A refused upgrade looks like any network failure to a WebSocket (code 1006):
      // ask the same URL over HTTP to learn its status.
      status = await this.#probe(url);
      if (generation !== this.#generation) return; // closed (or dialled again) meanwhile
      if (status !== undefined && AUTH_STATUSES.has(status)) {
        const error = new AuthError(`the server refused the token (HTTP ${status})`, { status });
        return this.#shutdown({ code: e.code, reason: e.reason, error });
      }
    }
    this.#retry({ code: e.code, reason: e.reason, status });
  }

  /** @param {URL} wsUrl @returns {Promise<number | undefined>} */
  async #probe(wsUrl) {
    if (typeof globalThis.fetch !== "function") return undefined;
    const u = new URL(wsUrl.href);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    try {
      const signal = typeof AbortSignal.timeout === "function" ? AbortSignal.timeout(this.#opts.authProbeTimeoutMs) : undefined;
      const r = await globalThis.fetch(u.href, { cache: "no-store", signal });
      await r.body?.cancel().catch(() => {});
      return r.status;
    } catch {
      return undefined; // unreachable, or not allowed to ask: a network failure
    }
  }

  /** @param {Record<string, unknown>} detail */
  #retry(detail) {
    const attempt = this.#attempt++;
    const delay = backoffDelay(attempt, this.#opts.backoff);
    this.#setState("reconnecting", { attempt: attempt + 1, delay_ms: delay, ...detail });
    if (this.#state !== "reconnecting") return; // a listener closed the client
    this.#timer = setTimeout(() => { void this.#dial(); }, delay);
  }

  /** @param {{code: number, reason: string, error?: unknown}} detail */
  #shutdown(detail) {
    if (this.#state === "closed") return;
    this.#generation += 1;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    this.#stopRunTimers();
    const ws = this.#ws;
    this.#ws = null;
    if (ws && (ws.readyState === 0 || ws.readyState === 1)) {
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this.#closeError = detail.error ?? null;
    this.#setState("closed", detail);
    for (const q of this.#queues) q.end();
    this.#queues.clear();
  }

  /** @param {"connecting" | "open" | "reconnecting" | "closed"} state @param {Record<string, unknown>} detail */
  #setState(state, detail) {
    const previous = this.#state;
    this.#state = state;
    this.#emit({ type: "state", state, previous, ...detail });
  }

  // ---- internals: frames -----------------------------------------------------------

  /** @param {unknown} data */
  #onData(data) {
    if (typeof data !== "string") {
      this.#malformed("a binary frame; the protocol sends JSON text", "(binary)");
      return;
    }
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      this.#malformed(`a frame that is not JSON: ${/** @type {Error} */ (error).message}`, excerpt(data));
      return;
    }
    if (!isObject(frame) || typeof frame.type !== "string") {
      this.#malformed("a frame that is not a JSON object with a string `type`", excerpt(data));
      return;
    }
    if ("seq" in frame && !isSeq(frame.seq)) {
      this.#malformed("a frame whose `seq` is not a whole number", excerpt(data));
      return;
    }
    switch (frame.type) {
      case "ready":
        if (typeof frame.run_id !== "string" || frame.run_id === "" || ("epoch" in frame && !isSeq(frame.epoch))) {
          this.#malformed("a `ready` frame without a `run_id` string or with a bad `epoch`", excerpt(data));
          return;
        }
        this.#onReady(frame);
        return;
      case "resumed": {
        const run = typeof frame.run_id === "string" ? this.#runs.get(frame.run_id) : undefined;
        if (run) { run.resuming = false; run.retries = 0; }
        break;
      }
      case "resync_required":
        this.#onResync(frame);
        break;
      default:
        if (typeof frame.seq === "number" && typeof frame.run_id === "string" && !this.#accept(frame)) return;
    }
    this.#emit(frame);
  }

  /** @param {string} message @param {string} text */
  #malformed(message, text) {
    this.#stats.malformed += 1;
    this.#emit({ type: "malformed_frame", error: new MalformedFrameError(message, text) });
  }

  /** @param {any} ready */
  #onReady(ready) {
    this.#ready = ready;
    this.#attempt = 0;
    // The current run goes on if it holds anything; otherwise this connection's own.
    if (this.#current === null || !this.#runs.has(this.#current)) this.#current = ready.run_id;
    const previous = this.#state;
    this.#state = "open"; // the resumes go first, before anything the app sends
    for (const run of this.#runs.values()) {
      try {
        this.#resume(run);
      } catch {
        break; // the socket is closing: the next connection resumes
      }
    }
    this.#persist();
    this.#emit({ type: "state", state: "open", previous });
    this.#emit(ready);
  }

  /** @param {{run_id: string, epoch: number | null, last_seq: number, resuming: boolean}} run */
  #resume(run) {
    run.resuming = true;
    /** @type {Record<string, unknown>} */
    const msg = { type: "resume", run_id: run.run_id, after_seq: run.last_seq };
    if (run.epoch !== null) msg.epoch = run.epoch;
    this.#sendJson(msg);
  }

  /** @param {any} frame */
  #onResync(frame) {
    const run = typeof frame.run_id === "string" ? this.#runs.get(frame.run_id) : undefined;
    if (!run) return;
    if (frame.reason === "unavailable") {
      // The log cannot be read now (its store is away): ask again, later.
      run.resuming = false;
      const ws = this.#ws;
      const delay = backoffDelay(run.retries++, this.#opts.backoff);
      if (run.timer !== null) clearTimeout(run.timer);
      run.timer = setTimeout(() => {
        run.timer = null;
        if (this.#ws === ws && this.#state === "open" && this.#runs.get(run.run_id) === run) this.#resume(run);
      }, delay);
      return;
    }
    this.forget(run.run_id); // the current run starts again from scratch
  }

  /**
   * Whether a run frame is new: duplicates (seq <= last_seq) are dropped; a frame
   * ahead of the next one while the run is being resumed comes from before the
   * resume and comes again after `resumed`.
   * @param {any} frame
   */
  #accept(frame) {
    let run = this.#runs.get(frame.run_id);
    if (!run) run = this.#track(frame.run_id, 0);
    const seq = frame.seq;
    if (seq <= run.last_seq) {
      this.#stats.duplicates += 1;
      return false;
    }
    if (seq > run.last_seq + 1) {
      if (run.resuming) {
        this.#stats.held += 1;
        return false;
      }
      // A run first seen in the middle (one the server follows for us) starts where it is.
      if (run.last_seq > 0) {
        this.#stats.gaps += 1;
        this.#emit({ type: "gap", run_id: run.run_id, after_seq: run.last_seq, seq });
      }
    }
    run.last_seq = seq;
    this.#persist();
    return true;
  }

  /** @param {string} runId @param {number} lastSeq */
  #track(runId, lastSeq) {
    const run = { run_id: runId, epoch: this.#ready?.epoch ?? null, last_seq: lastSeq, resuming: false, retries: 0, timer: null };
    this.#runs.set(runId, run);
    // Bounded: the oldest run other than the current one goes.
    while (this.#runs.size > Math.max(1, this.#opts.maxRuns)) {
      const victim = [...this.#runs.keys()].find((id) => id !== this.#current && id !== runId);
      if (victim === undefined) break;
      const v = this.#runs.get(victim);
      if (v && v.timer !== null) clearTimeout(v.timer);
      this.#runs.delete(victim);
    }
    return run;
  }

  /** A run id nothing was sent in: this connection's default run if unused, else a new one. @param {string} [not] */
  #unusedRunId(not) {
    const def = this.#ready?.run_id;
    if (typeof def === "string" && def !== not && !this.#runs.has(def)) return def;
    return freshRunId();
  }

  #stopRunTimers() {
    for (const run of this.#runs.values()) {
      if (run.timer !== null) clearTimeout(run.timer);
      run.timer = null;
      run.resuming = false;
    }
  }

  // ---- internals: sending ----------------------------------------------------------

  /** @param {string} callId @param {"approve" | "reject"} decision @param {string | undefined} message */
  #decide(callId, decision, message) {
    if (typeof callId !== "string" || callId === "") throw new TypeError("`callId` is the call's id (a non-empty string)");
    if (message !== undefined && typeof message !== "string") throw new TypeError("`message` is a string");
    /** @type {Record<string, unknown>} */
    const msg = { type: "tool_approval_decision", call_id: callId, decision };
    if (message !== undefined) msg.message = message;
    this.#sendJson(msg);
  }

  /** @param {unknown} payload */
  #sendJson(payload) {
    if (!isObject(payload)) throw new TypeError("a message is a JSON object");
    this.#sendText(JSON.stringify(payload));
  }

  /** @param {string} text */
  #sendText(text) {
    const ws = this.#ws;
    if (this.#state !== "open" || !ws || ws.readyState !== 1) throw new NotConnectedError(this.#state);
    const limit = this.#opts.maxMessageBytes;
    if (text.length > limit / 3) {
      const bytes = utf8Length(text);
      if (bytes > limit) throw new MessageTooBigError(bytes, limit);
    }
    ws.send(text);
  }

  // ---- internals: events and storage -----------------------------------------------

  /** @param {{type: string} & Record<string, unknown>} event */
  #emit(event) {
    for (const key of [event.type, "*"]) {
      const set = this.#listeners.get(key);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(event);
        } catch (error) {
          reportAppError(error);
        }
      }
    }
    for (const q of this.#queues) q.push(event);
  }

  #load() {
    let stored;
    try {
      const text = this.#storage.getItem(this.#opts.storageKey);
      stored = text ? JSON.parse(text) : null;
    } catch {
      this.#stats.storage_errors += 1;
      return;
    }
    if (!isObject(stored) || !Array.isArray(stored.runs)) return;
    for (const r of stored.runs.slice(-this.#opts.maxRuns)) {
      if (!isObject(r) || typeof r.run_id !== "string" || r.run_id === "" || !isSeq(r.last_seq)) continue;
      const epoch = isSeq(r.epoch) ? r.epoch : null;
      this.#runs.set(r.run_id, { run_id: r.run_id, epoch, last_seq: r.last_seq, resuming: false, retries: 0, timer: null });
    }
    if (typeof stored.run_id === "string" && stored.run_id !== "") this.#current = stored.run_id;
  }

  #persist() {
    const current = this.#current === null ? undefined : this.#runs.get(this.#current);
    const value = JSON.stringify({
      version: 1,
      run_id: this.#current,
      last_seq: current ? current.last_seq : 0,
      runs: this.runs(),
    });
    try {
      this.#storage.setItem(this.#opts.storageKey, value);
    } catch {
      this.#stats.storage_errors += 1; // full or disabled: the state in memory still holds
    }
  }
}

/**
 * Creates a client and connects it.
 * @param {any} options
 */
export function connect(options) {
  return new ToolDispatchClient(options).connect();
}
