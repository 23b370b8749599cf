// Types of @tool-dispatch/client: the session protocol's frames (version 1) and the client.
//
// Frames keep every field the server sends; the interfaces name the known ones. The
// protocol changes additively: a frame of a type this file does not know still
// reaches the app (typed `UnknownFrame`).

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION: 1;

// ------------------------------------------------------------------------------------
// Server → client frames
// ------------------------------------------------------------------------------------

/** First frame of every connection. */
export interface ReadyFrame {
  type: "ready";
  user_id: string;
  /** The connection's default run. */
  run_id: string;
  /** The run log's epoch, to keep with every `seq` (below 2^53). */
  epoch: number;
  /** The tools this user may call. */
  tools: string[];
  /** Absent before the field existed: version 1. */
  protocol_version?: number;
  /** The server node's name, when it has one. */
  node?: string;
  [field: string]: unknown;
}

/** Fields of every frame recorded in a run. */
export interface RunFrame {
  /** Position in the run, from 1, contiguous. */
  seq: number;
  run_id: string;
  [field: string]: unknown;
}

/** Fields of every tool event. */
export interface ToolEventFields extends RunFrame {
  call_id: string;
  thread_id: string | null;
  user_id: string;
  tool_name: string;
  /** RFC 3339. */
  timestamp: string;
}

/** A call starts (exactly one per call, first). */
export interface ToolExecutingFrame extends ToolEventFields {
  type: "tool_executing";
  /** Arguments, with sensitive keys redacted and long values cut. */
  parameters: unknown;
}

/** A running tool's report. */
export interface ToolProgressFrame extends ToolEventFields {
  type: "tool_progress";
  /** 0 to 1. */
  progress: number;
  message: string | null;
}

/** A call waits for its user's decision: answer with `approve` or `reject`. */
export interface ToolApprovalRequiredFrame extends ToolEventFields {
  type: "tool_approval_required";
  parameters: unknown;
  /** Why a person must decide. */
  reason: string;
  /** When the call stops waiting (`approval_timeout`); null: no limit. */
  expires_at: string | null;
}

/** What became of an approval request. */
export type ApprovalDecision = "approved" | "rejected" | "expired" | "withdrawn";

/**
 * An approval request was answered (on this page, another one, by MCP) or its wait
 * ended: before the call runs or ends, so every view of the run learns it at once.
 */
export interface ToolApprovalResolvedFrame extends ToolEventFields {
  type: "tool_approval_resolved";
  decision: ApprovalDecision;
  /** The user's message with a rejection. */
  message: string | null;
}

/** How a call ended. */
export type ToolStatus =
  | "success" | "error" | "invalid_input" | "unknown_tool" | "denied" | "rate_limited"
  | "timeout" | "panicked" | "cancelled" | "busy" | "unavailable" | "undelivered"
  | "rejected" | "approval_timeout";

/** A call ended (exactly one per call, last). */
export interface ToolCompletedFrame extends ToolEventFields {
  type: "tool_completed";
  /** A status this file does not know may come too (statuses are additive). */
  status: ToolStatus | (string & {});
  duration_ms: number;
  /** The result (cut for the event); null unless `status` is success. */
  result: unknown;
  /** The model-safe error; null on success. */
  error: string | null;
  cached?: boolean;
  /** For a call that needed approval. */
  approval?: { decision: ApprovalDecision; at: string };
}

/** A model turn's results, in the turn's own provider format, after its calls' events. */
export interface ToolResultsFrame extends RunFrame {
  type: "tool_results";
  format: "openai" | "anthropic";
  call_ids: string[];
  /** OpenAI: `role: "tool"` messages; Anthropic: a `role: "user"` message of `tool_result` blocks. */
  results: unknown;
}

/** The answer to a resume: the run's frames after `after_seq` follow. */
export interface ResumedFrame {
  type: "resumed";
  run_id: string;
  after_seq: number;
  [field: string]: unknown;
}

/** Why a run cannot be resumed. */
export type ResyncReason = "truncated" | "unknown_run" | "epoch_changed" | "unavailable";

/**
 * A run cannot be resumed: the client forgets it (the current run becomes a new
 * one). `unavailable` (the log's store is away) is asked again, later.
 */
export interface ResyncRequiredFrame {
  type: "resync_required";
  run_id: string;
  reason: ResyncReason | (string & {});
  [field: string]: unknown;
}

/** The answer to `cancel`. */
export interface RunCancelledFrame {
  type: "run_cancelled";
  run_id: string;
  /** Calls cancelled on the node that answered. */
  calls: number;
  other_nodes_told: boolean;
  [field: string]: unknown;
}

/** The answer to `approve` / `reject`. */
export interface DecisionRecordedFrame {
  type: "decision_recorded";
  call_id: string;
  decision: "approve" | "reject";
  [field: string]: unknown;
}

/** The server refused a message (the session goes on). */
export interface ErrorFrame {
  type: "error";
  error: string;
  [field: string]: unknown;
}

/** A frame of a type this version of the client does not know: passed on as it came. */
export interface UnknownFrame {
  type: string;
  seq?: number;
  run_id?: string;
  [field: string]: unknown;
}

/** Every frame type this file knows. */
export type KnownFrame =
  | ReadyFrame | ToolExecutingFrame | ToolProgressFrame | ToolApprovalRequiredFrame
  | ToolApprovalResolvedFrame | ToolCompletedFrame | ToolResultsFrame | ResumedFrame
  | ResyncRequiredFrame | RunCancelledFrame | DecisionRecordedFrame | ErrorFrame;

// ------------------------------------------------------------------------------------
// Events the client adds
// ------------------------------------------------------------------------------------

/** The connection's state. */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** The connection's state changed. */
export interface StateEvent {
  type: "state";
  state: Exclude<ConnectionState, "idle">;
  previous: ConnectionState;
  /** `reconnecting`: which retry is next, and after how long. */
  attempt?: number;
  delay_ms?: number;
  /** The WebSocket close code and reason, when a socket closed. */
  code?: number;
  reason?: string;
  /** `reconnecting` after a refused upgrade: its HTTP status, when known. */
  status?: number;
  /** `closed` for good by a failure (an `AuthError`, say); absent when the app closed. */
  error?: unknown;
}

/** A server frame that is not a JSON object with a string `type` (the session goes on). */
export interface MalformedFrameEvent {
  type: "malformed_frame";
  error: MalformedFrameError;
}

/** Frames of a run were skipped: `seq` came after `after_seq` + 1 (should never happen). */
export interface GapEvent {
  type: "gap";
  run_id: string;
  after_seq: number;
  seq: number;
}

/** Async iterators only: `count` events were dropped because the reader fell `bufferSize` behind. */
export interface DroppedEvent {
  type: "dropped";
  count: number;
}

/** Events by type, for `on` and `waitFor`. */
export interface EventMap {
  ready: ReadyFrame;
  tool_executing: ToolExecutingFrame;
  tool_progress: ToolProgressFrame;
  tool_approval_required: ToolApprovalRequiredFrame;
  tool_approval_resolved: ToolApprovalResolvedFrame;
  tool_completed: ToolCompletedFrame;
  tool_results: ToolResultsFrame;
  resumed: ResumedFrame;
  resync_required: ResyncRequiredFrame;
  run_cancelled: RunCancelledFrame;
  decision_recorded: DecisionRecordedFrame;
  error: ErrorFrame;
  state: StateEvent;
  malformed_frame: MalformedFrameEvent;
  gap: GapEvent;
}

/**
 * What `on("*")` and the async iterators give: the known frames and the client's own
 * events, a union to `switch` on. Frames of types added to the protocol after this
 * version come too, unchanged (an `UnknownFrame` at run time): handle them in
 * `default:`, never assert that `default:` is unreachable.
 */
export type ClientEvent = KnownFrame | StateEvent | MalformedFrameEvent | GapEvent;

// ------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------

/** Base of every error the client raises or reports; match on `code` or the class. */
export class ToolDispatchError extends Error {
  readonly code: "auth_failed" | "malformed_frame" | "not_connected" | "message_too_big" | "closed" | "timeout" | (string & {});
}
/** The server refused the credentials: HTTP 401/403 before the upgrade, or a close code 1008/4001/4003/4401/4403. */
export class AuthError extends ToolDispatchError {
  readonly code: "auth_failed";
  readonly status: number | undefined;
  readonly closeCode: number | undefined;
}
/** A server frame that is not a JSON object with a string `type`. */
export class MalformedFrameError extends ToolDispatchError {
  readonly code: "malformed_frame";
  /** The start of what came (at most 200 characters). */
  readonly excerpt: string;
}
/** A message was sent while the session was not open. */
export class NotConnectedError extends ToolDispatchError {
  readonly code: "not_connected";
  readonly state: ConnectionState;
}
/** A message over `maxMessageBytes`. */
export class MessageTooBigError extends ToolDispatchError {
  readonly code: "message_too_big";
  readonly bytes: number;
  readonly limit: number;
}
/** The client closed while something waited on it. */
export class ClosedError extends ToolDispatchError {
  readonly code: "closed";
}
/** A `waitFor` ran out of time. */
export class TimeoutError extends ToolDispatchError {
  readonly code: "timeout";
}

// ------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------

/** The `getItem`/`setItem` part of the Web Storage API (`sessionStorage`, `localStorage`). */
export interface RunStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** Reconnect backoff: `initialMs · factor^attempt`, capped at `maxMs`, less up to `jitter` of it at random. */
export interface Backoff {
  /** Default 250. */
  initialMs?: number;
  /** Default 5000. */
  maxMs?: number;
  /** Default 2. */
  factor?: number;
  /** 0 to 1; default 0.5. */
  jitter?: number;
}

/** A WebSocket constructor (the browser's, Node 22's, or a compatible one). */
export type WebSocketConstructor = new (url: string) => {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
};

export interface ClientOptions {
  /** The session endpoint: `ws(s)://host/ws`, or `http(s)://` (turned into `ws(s)://`); relative to the page in a browser. */
  url: string | URL;
  /** Sent as `?token=` (browsers cannot set headers on a WebSocket); a function is asked again at each connect. */
  token?: string | (() => string | Promise<string>);
  /** Where `{run_id, epoch, last_seq}` of each run is kept: memory by default; `sessionStorage` makes a reload resume. */
  storage?: RunStorage;
  /** The storage key; default `"tool-dispatch"`. */
  storageKey?: string;
  backoff?: Backoff;
  /** Events an async iterator keeps for a reader that does not read; default 1024. */
  bufferSize?: number;
  /** Runs followed at once (the oldest other than the current one goes); default 8, the server's limit. */
  maxRuns?: number;
  /** Largest message sent; default 65536, the server's limit. */
  maxMessageBytes?: number;
  /** After a refused upgrade, ask the URL over HTTP whether the token was the reason (401/403: stop); default true. */
  authProbe?: boolean;
  /** Bound on that request; default 5000. */
  authProbeTimeoutMs?: number;
  /** Default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
}

/** A run followed by the client. */
export interface RunState {
  run_id: string;
  /** The epoch of the `ready` frame the run was first seen under. */
  epoch: number | null;
  /** The last `seq` the app was given. */
  last_seq: number;
}

/** Counters since the client was made. */
export interface ClientStats {
  /** WebSockets opened (attempts). */
  connects: number;
  /** Frames dropped because their `seq` was not new. */
  duplicates: number;
  /** Frames dropped because they came ahead of a resume's replay (which brings them again). */
  held: number;
  gaps: number;
  malformed: number;
  /** Storage reads or writes that failed (the state in memory still holds). */
  storage_errors: number;
}

/** An OpenAI or Anthropic assistant message (a model turn). */
export type ModelTurn = { [field: string]: unknown };

export interface WaitOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface EventsOptions {
  /** Default: the client's `bufferSize`. */
  bufferSize?: number;
  /** Only these event types. */
  types?: string[];
}

export class ToolDispatchClient implements AsyncIterable<ClientEvent | DroppedEvent> {
  constructor(options: ClientOptions);

  /** The connection's state. */
  readonly state: ConnectionState;
  /** The run model turns go to when they name none (null before the first `ready`). */
  readonly runId: string | null;
  /** The last `ready` frame. */
  readonly ready: ReadyFrame | null;
  /** The server's protocol version (a `ready` without one: 1); null before the first `ready`. */
  readonly protocolVersion: number | null;
  readonly stats: ClientStats;
  /** The runs followed (resumed on every connect). */
  runs(): RunState[];

  /** Opens the session (again after `close`); reconnects by itself until `close` or an auth failure. */
  connect(): this;
  /** Closes for good: no reconnect; iterators end; waiters reject with `ClosedError`. */
  close(): void;
  /** Resolves when the session is open; rejects when the client closes first (with the `AuthError` of an auth failure). */
  whenOpen(options?: WaitOptions): Promise<void>;

  /** Sends a model turn in `runId` (default: the current run); returns the run. Throws `NotConnectedError` unless open. */
  sendTurn(message: ModelTurn, options?: { runId?: string }): string;
  /** Approves a call waiting for approval. */
  approve(callId: string, message?: string): void;
  /** Rejects a call waiting for approval, with a message for the model. */
  reject(callId: string, message?: string): void;
  /** Cancels a run's calls in flight (default: the current run); answered by `run_cancelled`. */
  cancel(runId?: string): void;
  /** Follows a run of this user (another tab's, say) from after `afterSeq` (default 0), now and at every reconnect. */
  follow(runId: string, options?: { afterSeq?: number }): void;
  /** Stops following a run: no longer resumed nor stored (the current run becomes a new one). */
  forget(runId: string): void;
  /** Makes a new, empty run the current one; returns its id. */
  newRun(): string;
  /** Sends any message: an object as JSON, a string as it is. */
  send(payload: object | string): void;

  /** Calls `fn` for every event of `type`; returns a function that removes it. */
  on<K extends keyof EventMap>(type: K, fn: (event: EventMap[K]) => void): () => void;
  on(type: "*", fn: (event: ClientEvent) => void): () => void;
  /** A frame type this version does not know. */
  on(type: string, fn: (event: UnknownFrame) => void): () => void;
  off(type: string, fn: (event: any) => void): void;
  /** The next event of `type` for which `predicate` holds. */
  waitFor<K extends keyof EventMap>(type: K, predicate?: (event: EventMap[K]) => boolean, options?: WaitOptions): Promise<EventMap[K]>;
  waitFor(type: string, predicate?: (event: UnknownFrame) => boolean, options?: WaitOptions): Promise<UnknownFrame>;
  /**
   * Every event, as an async iterator with its own buffer of `bufferSize` events. A
   * reader that falls behind loses the oldest: its next item is a `DroppedEvent`.
   * Ends when the client closes.
   */
  events(options?: EventsOptions): AsyncIterableIterator<ClientEvent | DroppedEvent>;
  [Symbol.asyncIterator](): AsyncIterableIterator<ClientEvent | DroppedEvent>;
}

/** `new ToolDispatchClient(options).connect()`. */
export function connect(options: ClientOptions): ToolDispatchClient;

/** The wait before reconnect attempt `attempt` (0-based). */
export function backoffDelay(attempt: number, backoff?: Backoff, random?: () => number): number;

/** A storage in memory (the default). */
export function memoryStorage(): RunStorage & { removeItem(key: string): void };

/** Default bounds and timings. */
export const DEFAULTS: Readonly<{
  backoff: Readonly<Required<Backoff>>;
  bufferSize: number;
  maxRuns: number;
  maxMessageBytes: number;
  storageKey: string;
  authProbeTimeoutMs: number;
}>;
