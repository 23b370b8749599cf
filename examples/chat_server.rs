//! A chat back end's tool runner over WebSocket, with run streams that outlive their
//! socket.
//!
//! ```text
//! cargo run --example chat_server --features axum                  # 127.0.0.1:3000
//! cargo run --example chat_server --features axum -- --port 0      # any free port
//! cargo run --example chat_server --features axum -- --grace-secs 5
//! PORT=8080 cargo run --example chat_server --features axum
//! ```
//!
//! It prints `listening on http://127.0.0.1:NNNN` once bound.
//!
//! - `GET /` — the reference front end: one card per call, live progress, automatic
//!   reconnect and resume, a Stop button.
//! - `GET /ws?token=alice-token` (or `Authorization: Bearer alice-token`) — a
//!   WebSocket for that user. An unknown or missing token is refused with 401 before
//!   the upgrade. Demo tokens: `alice-token` (scopes `weather:read`, `admin`) and
//!   `bob-token` (scope `weather:read`).
//! - `GET /metrics` — Prometheus text (with `--features prometheus`; the JSON below
//!   otherwise); `GET /metrics.json` — the engine's counters as JSON.
//! - `GET /client/tool-dispatch.js` — the session's JavaScript client
//!   (`clients/js/src/index.js`), which the page imports.
//!
//! With `--features otel` and `OTEL_EXPORTER_OTLP_ENDPOINT` set, every call's span
//! goes to that OpenTelemetry collector (OTLP/HTTP).
//!
//! ## Protocol
//!
//! Server → client on connect: `{"type":"ready","user_id":..,"run_id":R,"epoch":E,
//! "tools":[..]}`. `R` is the connection's default run; `E` is the run log's epoch
//! (below 2^53), to keep with every `seq`.
//!
//! Client → server, one JSON text message each:
//!
//! - a model turn: an OpenAI assistant message with `tool_calls`, or an Anthropic
//!   assistant message with `tool_use` blocks; an optional `"run_id"` continues
//!   another run of the same user (default: the connection's). Its calls run in that
//!   run; their events (`tool_executing`, `tool_progress`, `tool_completed`) and then
//!   `{"type":"tool_results","run_id":R,"format":"openai"|"anthropic","call_ids":[..],
//!   "results":..}` are recorded in the run, each with its `"seq"`, and sent to every
//!   connection following the run;
//! - `{"type":"resume","run_id":R,"after_seq":N,"epoch":E}` (`epoch` optional):
//!   answered by `{"type":"resumed","run_id":R,"after_seq":N}`, then every frame of
//!   `R` with `seq > N`, in order, then its live frames; or by
//!   `{"type":"resync_required","run_id":R,"reason":"truncated"|"unknown_run"|
//!   "epoch_changed"}`. Another user's run is `unknown_run`, like one that never was;
//! - `{"type":"cancel","run_id":R}`: cancels `R`'s calls in flight now; answered by
//!   `{"type":"run_cancelled","run_id":R,"calls":n,"other_nodes_told":bool}` (`calls`
//!   counts this node's; with `--redis` the other nodes cancel theirs);
//! - `{"type":"tool_approval_decision","call_id":C,"decision":"approve"|"reject",
//!   "message":".."}`: answers a call waiting for approval (`send_email` always does;
//!   its run shows a `tool_approval_required` frame with `reason` and `expires_at`).
//!   Answered by `{"type":"decision_recorded",..}`; an unknown, already decided or
//!   another user's call id gets the same `{"type":"error",..}` and changes nothing.
//!
//! A connection follows the runs its messages worked in (its default run among
//! them) and the runs it resumed (at most [`MAX_RUNS_PER_CONNECTION`]). A run enters
//! the log with its first message, so resuming a default run nothing was sent in is
//! `unknown_run`.
//!
//! ## Robustness
//!
//! - **A disconnect does not cancel.** A run's calls belong to the run, not to the
//!   socket. When the last connection following a run goes, its calls go on for the
//!   grace period ([`DEFAULT_GRACE`], `--grace-secs`); if no connection of the user
//!   follows the run again by then, they are cancelled (and the `cancelled` events are
//!   still recorded, so a late resume sees them).
//! - A message that is not JSON, of an unknown `type`, a `resume` without `run_id` or
//!   with a negative or absurd `after_seq`, gets `{"type":"error","error":".."}`; the
//!   connection stays up.
//! - A message over 64 KiB ([`MAX_MESSAGE_BYTES`]) is refused by the WebSocket layer
//!   before it is buffered whole: the server sends `{"type":"error",..}` and closes
//!   the connection with code 1009 (message too big).
//! - Each connection has its own bounded queue ([`QUEUE_CAPACITY`] frames) and writer
//!   task. Runs never wait for a socket: events go to the run log, and each
//!   connection reads the log at its own pace. A client that stops reading is let go
//!   once a frame has waited [`RESULT_DELIVERY_TIMEOUT`]; its runs go on, and it can
//!   resume (or is told `truncated` if it fell behind the log's bounds). Other users
//!   are not slowed. At most [`MAX_IN_FLIGHT_MESSAGES`] messages per connection are in
//!   progress; past that a message gets an error.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::task::JoinHandle;
use tool_dispatch::axum::{Outbound, WsSink, split_socket};
use tool_dispatch::provider::{anthropic, openai};
use tool_dispatch::{
    Engine, Registry, Resync, RunLog, RunLogConfig, RunReader, RunWriter, SinkError, ToolCall,
    ToolContext, ToolError, ToolSettings, UserContext, Verdict, tool_fn,
};

/// Largest accepted WebSocket message.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Frames that may wait for one client.
pub const QUEUE_CAPACITY: usize = 64;
/// Messages in progress per connection before the server stops reading it.
pub const MAX_IN_FLIGHT_MESSAGES: usize = 32;
/// Tool calls accepted in one message.
pub const MAX_CALLS_PER_MESSAGE: usize = 16;
/// How long a frame may wait for room in a client's full queue before the server
/// lets that connection go.
pub const RESULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a run's calls go on after its last connection left (`--grace-secs`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Runs one connection may follow at once.
pub const MAX_RUNS_PER_CONNECTION: usize = 8;

// ------------------------------------------------------------------------------------
// Demo tools and users.
// ------------------------------------------------------------------------------------

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    /// City name.
    city: String,
    /// Upstream API key (redacted in events).
    #[serde(default)]
    api_key: Option<String>,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SlowIn {
    /// Number of steps (1 to 1,000,000).
    steps: u32,
    /// Milliseconds per step (at most 60,000).
    #[serde(default = "default_step_ms")]
    step_ms: u64,
}

fn default_step_ms() -> u64 {
    200
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FirehoseIn {
    /// Progress updates to emit (at most 100,000).
    events: u32,
    /// Bytes of text per update (at most 16,384).
    #[serde(default)]
    bytes: u32,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoInput {}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct EmailIn {
    /// Recipient address.
    to: String,
    /// Subject line.
    subject: String,
    /// Message text.
    body: String,
}

/// The demo tools: `get_weather` (sensitive `api_key`, scope `weather:read`),
/// `slow_task` (progress, long timeout), `list_users` (scope `admin`), `firehose`
/// (many progress updates, to show a slow client's bounded queue) and `send_email`
/// (every call waits for its user's approval).
pub fn demo_registry() -> Registry {
    let weather = tool_fn(
        "get_weather",
        "Current weather in a city.",
        |i: WeatherIn, cx: ToolContext| async move {
            cx.progress(0.5, format!("looking up {}", i.city));
            let temp_c = match i.city.as_str() {
                "Paris" => 21.0,
                "Tokyo" => 26.5,
                "London" => 14.0,
                _ => 18.0,
            };
            Ok::<_, ToolError>(json!({"city": i.city, "temp_c": temp_c, "conditions": "clear"}))
        },
    )
    .settings(
        ToolSettings::new()
            .scope("weather:read")
            .sensitive("api_key")
            .read_only(true)
            // Published to MCP clients, which check `structuredContent` against it.
            .output_schema(json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "temp_c": {"type": "number"},
                    "conditions": {"type": "string"}
                },
                "required": ["city", "temp_c", "conditions"]
            })),
    );
    let slow = tool_fn(
        "slow_task",
        "A long job that reports progress at every step.",
        |i: SlowIn, cx: ToolContext| async move {
            let steps = i.steps.clamp(1, 1_000_000);
            let step = Duration::from_millis(i.step_ms.min(60_000));
            for n in 1..=steps {
                tokio::select! {
                    _ = cx.cancelled() => return Err(ToolError::new("cancelled")),
                    _ = tokio::time::sleep(step) => {}
                }
                cx.progress(f64::from(n) / f64::from(steps), format!("step {n}/{steps}"));
            }
            Ok::<_, ToolError>(json!({"steps": steps}))
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    let users = tool_fn(
        "list_users",
        "The demo users (administrators only).",
        |_: NoInput, _cx: ToolContext| async move { Ok::<_, ToolError>(json!(["alice", "bob"])) },
    )
    .settings(ToolSettings::new().scope("admin"));
    let firehose = tool_fn(
        "firehose",
        "Emits many progress updates as fast as the server allows.",
        |i: FirehoseIn, cx: ToolContext| async move {
            let events = i.events.min(100_000);
            let text = "x".repeat(i.bytes.min(16_384) as usize);
            let mut delivered = 0u32;
            for n in 0..events {
                if cx.progress(f64::from(n + 1) / f64::from(events), text.clone()) {
                    delivered += 1;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, ToolError>(json!({"events": events, "delivered": delivered}))
        },
    );
    let email = tool_fn(
        "send_email",
        "Sends an email in the user's name (each call needs the user's approval).",
        |i: EmailIn, _cx: ToolContext| async move {
            Ok::<_, ToolError>(json!({"sent": true, "to": i.to, "subject": i.subject,
                                      "bytes": i.body.len()}))
        },
    )
    .settings(
        ToolSettings::new()
            .requires_approval("sends an email in your name")
            .destructive(false),
    );
    let built = Registry::builder()
        .tool(weather)
        .tool(email)
        .tool(slow)
        .tool(users)
        .tool(firehose)
        .build();
    match built {
        Ok(r) => r,
        Err(e) => panic!("the demo tools are valid: {e}"),
    }
}

/// The fixed demo token table: token → user.
pub fn demo_users() -> HashMap<String, UserContext> {
    let user = |id: &str, scopes: &[&str]| {
        UserContext::builder(id)
            .thread_id(format!("thread_{id}"))
            .scopes(scopes.iter().copied())
            .build()
    };
    let mut m = HashMap::new();
    for (token, id, scopes) in [
        ("alice-token", "alice", &["weather:read", "admin"][..]),
        ("bob-token", "bob", &["weather:read"][..]),
    ] {
        match user(id, scopes) {
            Ok(u) => m.insert(token.to_owned(), u),
            Err(e) => panic!("the demo users are valid: {e}"),
        };
    }
    m
}

// ------------------------------------------------------------------------------------
// The server.
// ------------------------------------------------------------------------------------

/// What happened on a connection or a run; for logs and for tests that need to know
/// when the server has finished with something.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerLog {
    /// A user connected; `run_id` is the connection's default run.
    Connected {
        /// The user.
        user_id: String,
        /// The default run named in the `ready` frame.
        run_id: String,
    },
    /// A message's calls all ended and their results frame was recorded in the run
    /// (or not).
    MessageDone {
        /// The user.
        user_id: String,
        /// The run the calls belonged to.
        run_id: String,
        /// The call ids, in message order.
        call_ids: Vec<String>,
        /// Whether the results frame was recorded in the run.
        delivered: bool,
    },
    /// A connection ended. The calls of the runs it followed go on for the grace
    /// period.
    Disconnected {
        /// The user.
        user_id: String,
        /// The runs the connection followed.
        runs: Vec<String>,
    },
    /// No connection of the user followed the run for a whole grace period after
    /// calls were started in it: its calls still in flight were cancelled.
    RunAbandoned {
        /// The user.
        user_id: String,
        /// The run.
        run_id: String,
        /// Calls cancelled.
        cancelled: usize,
    },
}

/// Who follows a run, whether calls were ever started in it, and when its last
/// follower left (with at most one grace timer per run).
#[derive(Default)]
struct Followers {
    connections: usize,
    worked: bool,
    left_at: Option<tokio::time::Instant>,
    timer: bool,
}

type RunKey = (String, String);

/// Shared server state.
#[derive(Clone)]
pub struct Server {
    engine: Engine,
    users: Arc<HashMap<String, UserContext>>,
    runs: RunLog,
    followers: Arc<Mutex<HashMap<RunKey, Followers>>>,
    log: broadcast::Sender<ServerLog>,
    result_timeout: Duration,
    grace: Duration,
    node: Option<String>,
}

impl Server {
    /// A server over `engine` with the given token table and a run log with the
    /// default bounds.
    pub fn new(engine: Engine, users: HashMap<String, UserContext>) -> Self {
        Server {
            engine,
            users: Arc::new(users),
            runs: RunLog::new(RunLogConfig::default()),
            followers: Arc::default(),
            log: broadcast::channel(1024).0,
            result_timeout: RESULT_DELIVERY_TIMEOUT,
            grace: DEFAULT_GRACE,
            node: None,
        }
    }

    /// How long a frame may wait for room in a client's full queue before the server
    /// gives up on that connection (default [`RESULT_DELIVERY_TIMEOUT`]). The client
    /// can reconnect and resume.
    pub fn result_timeout(mut self, wait: Duration) -> Self {
        self.result_timeout = wait;
        self
    }

    /// How long a run's calls go on once no connection follows it (default
    /// [`DEFAULT_GRACE`]); then they are cancelled.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The run log (default: this process's own, with the default bounds; a shared
    /// one lets a client resume on another node).
    pub fn run_log(mut self, runs: RunLog) -> Self {
        self.runs = runs;
        self
    }

    /// This node's name, shown in the `ready` frame.
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// The run logs (for their bounds and figures).
    pub fn runs(&self) -> &RunLog {
        &self.runs
    }

    /// The engine (metrics, cancellation, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Subscribes to connection events.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerLog> {
        self.log.subscribe()
    }

    fn log(&self, entry: ServerLog) {
        let _ = self.log.send(entry);
    }

    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<RunKey, Followers>> {
        self.followers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection starts following a run.
    fn attach(&self, user_id: &str, run_id: &str) {
        let key = (user_id.to_owned(), run_id.to_owned());
        self.followers().entry(key).or_default().connections += 1;
    }

    /// Calls are being started in a run: it has something a grace timer may cancel.
    fn worked(&self, user_id: &str, run_id: &str) {
        let key = (user_id.to_owned(), run_id.to_owned());
        self.followers().entry(key).or_default().worked = true;
    }

    /// A connection stops following a run. When the last one leaves a run that had
    /// calls, its calls are cancelled after the grace period unless a connection
    /// follows it again meanwhile; one timer per run, however often it is left.
    fn detach(&self, user_id: &str, run_id: &str) {
        let key = (user_id.to_owned(), run_id.to_owned());
        {
            let mut followers = self.followers();
            let f = followers.entry(key.clone()).or_default();
            f.connections = f.connections.saturating_sub(1);
            if f.connections > 0 {
                return;
            }
            if !f.worked {
                followers.remove(&key); // nothing ever ran there: nothing to cancel
                return;
            }
            f.left_at = Some(tokio::time::Instant::now());
            if std::mem::replace(&mut f.timer, true) {
                return; // the run's timer is already counting
            }
        }
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                let until = {
                    let mut followers = server.followers();
                    let Some(f) = followers.get_mut(&key) else {
                        return;
                    };
                    match f.left_at {
                        Some(left) if f.connections == 0 => left + server.grace,
                        _ => {
                            f.timer = false; // followed again
                            return;
                        }
                    }
                };
                if tokio::time::Instant::now() >= until {
                    // A client that reconnected to another node follows it there.
                    if server.runs.is_followed(&key.0, &key.1).await {
                        if let Some(f) = server.followers().get_mut(&key) {
                            f.left_at = Some(tokio::time::Instant::now());
                        }
                        continue;
                    }
                    server.followers().remove(&key);
                    break;
                }
                tokio::time::sleep_until(until).await;
            }
            let (user_id, run_id) = key;
            let cancelled = server.engine.cancel_run(&user_id, &run_id).here;
            server.log(ServerLog::RunAbandoned {
                user_id,
                run_id,
                cancelled,
            });
        });
    }
}

/// The routes: `/`, `/ws`, `/metrics`, `/metrics.json`, `/client/tool-dispatch.js`.
pub fn router(server: Server) -> Router {
    let app = Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/metrics.json", get(metrics))
        .route("/client/tool-dispatch.js", get(client_js))
        .with_state(server.clone());
    #[cfg(feature = "prometheus")]
    let app = {
        let mut registry =
            tool_dispatch::prometheus::prometheus_client::registry::Registry::default();
        server.engine.register_metrics(&mut registry);
        server.runs.register_metrics(&mut registry);
        let registry = Arc::new(registry);
        app.route(
            "/metrics",
            get(move |h: HeaderMap| prometheus(Arc::clone(&registry), h)),
        )
    };
    #[cfg(not(feature = "prometheus"))]
    let app = app.route("/metrics", get(metrics).with_state(server.clone()));
    #[cfg(feature = "mcp")]
    let app = app.merge(mcp_router(&server));
    app
}

/// The run of each user that their calls made by MCP clients go to.
pub const MCP_RUN: &str = "mcp";

/// `/mcp`: the same engine served over MCP (streamable HTTP, the demo bearer tokens).
/// Each user's MCP calls go to their run [`MCP_RUN`], which every connection of
/// theirs follows: the page shows calls made by an MCP client too.
#[cfg(feature = "mcp")]
fn mcp_router(server: &Server) -> Router {
    use tool_dispatch::mcp::{McpServer, router};
    let runs = server.runs.clone();
    let mcp = McpServer::per_request(server.engine.clone())
        .in_run(MCP_RUN)
        .events(move |user| Arc::new(runs.writer(user.user_id(), MCP_RUN)));
    let users = Arc::clone(&server.users);
    router(mcp, move |token| users.get(token).cloned())
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, server: Server) -> std::io::Result<()> {
    axum::serve(listener, router(server)).await
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn client_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT_JS,
    )
}

async fn metrics(State(server): State<Server>) -> Response {
    axum::Json(server.engine.metrics()).into_response()
}

/// The Prometheus text of `registry`, in the format the scraper asks for.
#[cfg(feature = "prometheus")]
async fn prometheus(
    registry: Arc<tool_dispatch::prometheus::prometheus_client::registry::Registry>,
    headers: HeaderMap,
) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match tool_dispatch::prometheus::encode(&registry, accept) {
        Ok(e) => ([(header::CONTENT_TYPE, e.content_type)], e.body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn token<'a>(query: &'a HashMap<String, String>, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(t) = query.get("token") {
        return Some(t);
    }
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn ws(
    State(server): State<Server>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // Authenticate before anything else, the upgrade included.
    let Some(user) = token(&query, &headers)
        .and_then(|t| server.users.get(t))
        .cloned()
    else {
        let body = axum::Json(json!({"error": "unknown or missing token"}));
        return (StatusCode::UNAUTHORIZED, body).into_response();
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| connection(server, user, socket))
}

/// The provider format of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    OpenAi,
    Anthropic,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::OpenAi => "openai",
            Format::Anthropic => "anthropic",
        }
    }
}

/// The largest `seq` a client may name: the largest integer a JavaScript number
/// holds exactly.
const MAX_SEQ: u64 = (1 << 53) - 1;

/// One client message.
#[derive(Debug)]
enum Incoming {
    /// A model turn: tool calls in a provider's format, in the connection's default
    /// run or the one the message names.
    Calls {
        format: Format,
        calls: Vec<ToolCall>,
        run_id: Option<String>,
    },
    /// Follow a run again from after `after_seq`.
    Resume {
        run_id: String,
        after_seq: u64,
        epoch: Option<u64>,
    },
    /// Cancel a run's calls in flight.
    Cancel { run_id: String },
    /// Answer a call waiting for approval.
    Decision { call_id: String, verdict: Verdict },
}

/// A short, printable excerpt of something the client sent, for error messages.
fn excerpt(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn run_id_field(v: &Value, kind: &str) -> Result<String, String> {
    match v.get("run_id") {
        Some(Value::String(r)) => Ok(r.clone()),
        Some(other) => Err(format!("`run_id` must be a string, not {}", excerpt(other))),
        None => Err(format!("a `{kind}` message needs a `run_id`")),
    }
}

/// Reads one client message.
fn parse_incoming(text: &str) -> Result<Incoming, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    match v.get("type") {
        Some(Value::String(t)) if t == "resume" => {
            let run_id = run_id_field(&v, "resume")?;
            let after_seq = match v.get("after_seq") {
                Some(n) => n.as_u64().filter(|n| *n <= MAX_SEQ).ok_or_else(|| {
                    format!(
                        "`after_seq` must be a whole number from 0 to {MAX_SEQ}, not {}",
                        excerpt(n)
                    )
                })?,
                None => return Err("a `resume` message needs an `after_seq`".into()),
            };
            let epoch = match v.get("epoch") {
                None | Some(Value::Null) => None,
                Some(e) => Some(e.as_u64().ok_or_else(|| {
                    format!(
                        "`epoch` must be the number from `ready`, not {}",
                        excerpt(e)
                    )
                })?),
            };
            return Ok(Incoming::Resume {
                run_id,
                after_seq,
                epoch,
            });
        }
        Some(Value::String(t)) if t == "cancel" => {
            return Ok(Incoming::Cancel {
                run_id: run_id_field(&v, "cancel")?,
            });
        }
        Some(Value::String(t)) if t == "tool_approval_decision" => {
            let call_id = match v.get("call_id") {
                Some(Value::String(c)) => c.clone(),
                _ => return Err("a `tool_approval_decision` needs a `call_id` string".into()),
            };
            let message = match v.get("message") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) => Some(m.clone()),
                Some(other) => {
                    return Err(format!(
                        "`message` must be a string, not {}",
                        excerpt(other)
                    ));
                }
            };
            let verdict = match v.get("decision").and_then(Value::as_str) {
                Some("approve") => Verdict::Approve,
                Some("reject") => Verdict::Reject { message },
                _ => return Err("`decision` must be \"approve\" or \"reject\"".into()),
            };
            return Ok(Incoming::Decision { call_id, verdict });
        }
        // An Anthropic response object is `"type": "message"`: a model turn.
        None => {}
        Some(Value::String(t)) if t == "message" => {}
        Some(other) => {
            return Err(format!(
                "unknown message type {}; expected `resume`, `cancel`, \
                 `tool_approval_decision` or a model turn",
                excerpt(other)
            ));
        }
    }
    let run_id = match v.get("run_id") {
        None => None,
        Some(_) => Some(run_id_field(&v, "model turn")?),
    };
    let format = if v.get("tool_calls").is_some() || v.get("choices").is_some() {
        Format::OpenAi
    } else if v
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|b| b.get("type") == Some(&json!("tool_use"))))
    {
        Format::Anthropic
    } else {
        return Err(
            "expected an OpenAI assistant message with `tool_calls` or an \
                    Anthropic assistant message with `tool_use` content blocks"
                .into(),
        );
    };
    let calls = match format {
        Format::OpenAi => openai::parse_calls(&v),
        Format::Anthropic => anthropic::parse_calls(&v),
    }
    .map_err(|e| e.to_string())?;
    if calls.is_empty() {
        return Err("the message contains no tool call".into());
    }
    if calls.len() > MAX_CALLS_PER_MESSAGE {
        return Err(format!(
            "{} tool calls in one message; at most {MAX_CALLS_PER_MESSAGE} are accepted",
            calls.len()
        ));
    }
    Ok(Incoming::Calls {
        format,
        calls,
        run_id,
    })
}

/// Whether a read error is tungstenite's "message/frame too long" capacity error.
fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}

fn error_message(text: impl Into<String>) -> Value {
    json!({"type": "error", "error": text.into()})
}

/// Runs one message's calls concurrently in `user`'s run and records the rendered
/// results in the run. Owned by the run, not by the connection: it goes on when the
/// socket closes, until the calls end or the run is cancelled.
async fn run_message(
    server: Server,
    user: UserContext,
    writer: RunWriter,
    format: Format,
    calls: Vec<ToolCall>,
    _permit: OwnedSemaphorePermit,
) {
    // Give every call an id up front so the results name the same ids as the events.
    let calls: Vec<ToolCall> = calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c.id {
            Some(ref id) if !id.is_empty() => c,
            _ => {
                let id = format!("call_{}_{i}", unique());
                c.with_id(id)
            }
        })
        .collect();
    let run_id = user.run_id().unwrap_or_default().to_owned();
    let user_id = user.user_id().to_owned();
    let d = server.engine.dispatcher().sink(writer.clone()).user(user);
    let results =
        futures_util::future::join_all(calls.iter().cloned().map(|c| d.dispatch(c))).await;
    let rendered = match format {
        Format::OpenAi => openai::render_results(&calls, &results),
        Format::Anthropic => anthropic::render_results(&calls, &results),
    };
    let call_ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    let delivered = writer
        .append(json!({
            "type": "tool_results",
            "run_id": run_id,
            "format": format.name(),
            "call_ids": call_ids,
            "results": rendered,
        }))
        .await
        .is_ok();
    server.log(ServerLog::MessageDone {
        user_id,
        run_id,
        call_ids,
        delivered,
    });
}

/// A name part no other process of the cluster hands out: a random start for this
/// process, then one more each time. Runs and calls are the cluster's once their log
/// and approvals live in Redis, so two nodes must never name two runs alike.
fn unique() -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = START.get_or_init(|| {
        std::hash::BuildHasher::hash_one(
            &std::hash::RandomState::new(),
            (std::process::id(), std::time::SystemTime::now()),
        ) >> 24
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}", start.wrapping_add(n))
}

/// Sends a run's frames to the socket as they come; stops when the run is gone, the
/// reader fell behind (the client is told to resync), or the socket is.
async fn forward(sink: WsSink, run_id: String, mut reader: RunReader, wait: Duration) {
    let reason = loop {
        let frame = match reader.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(resync)) => break resync,
            None => break Resync::UnknownRun,
        };
        match sink.send_outbound(Outbound::Text(frame.json), wait).await {
            Ok(()) => {}
            // The client stopped reading: let it go. It can reconnect and resume;
            // the run goes on meanwhile.
            Err(SinkError::TimedOut(_)) => return sink.close(),
            Err(_) => return,
        }
    };
    let msg = json!({"type": "resync_required", "run_id": run_id, "reason": reason.as_str()});
    if let Err(SinkError::TimedOut(_)) = sink.send_outbound(Outbound::Json(msg), wait).await {
        sink.close();
    }
}

/// One connection: one user, the runs it follows, one socket.
struct Connection {
    server: Server,
    user: UserContext,
    sink: WsSink,
    default_run: String,
    /// The runs this connection follows, each with its forwarding task.
    follows: HashMap<String, JoinHandle<()>>,
    permits: Arc<Semaphore>,
}

impl Connection {
    fn user_id(&self) -> &str {
        self.user.user_id()
    }

    async fn reply(&self, msg: Value) {
        if let Err(SinkError::TimedOut(_)) = self
            .sink
            .send_outbound(Outbound::Json(msg), self.server.result_timeout)
            .await
        {
            self.sink.close();
        }
    }

    /// Follows `run_id` through `reader`, replacing an earlier reader of the same run.
    fn follow(&mut self, run_id: &str, reader: RunReader) {
        let task = tokio::spawn(forward(
            self.sink.clone(),
            run_id.to_owned(),
            reader,
            self.server.result_timeout,
        ));
        match self.follows.insert(run_id.to_owned(), task) {
            Some(old) => old.abort(),
            None => self.server.attach(self.user.user_id(), run_id),
        }
    }

    /// Whether one more run can be followed.
    fn room_for(&self, run_id: &str) -> Result<(), String> {
        if self.follows.contains_key(run_id) || self.follows.len() < MAX_RUNS_PER_CONNECTION {
            Ok(())
        } else {
            Err(format!(
                "this connection follows {MAX_RUNS_PER_CONNECTION} runs already; \
                 open another connection"
            ))
        }
    }

    async fn on_text(&mut self, text: &str) {
        let incoming = match parse_incoming(text) {
            Ok(i) => i,
            Err(e) => {
                return self
                    .reply(error_message(format!("malformed message: {e}")))
                    .await;
            }
        };
        match incoming {
            Incoming::Calls {
                format,
                calls,
                run_id,
            } => {
                let run_id = run_id.unwrap_or_else(|| self.default_run.clone());
                if let Err(e) = self.start(format, calls, &run_id) {
                    self.reply(error_message(e)).await;
                }
            }
            Incoming::Resume {
                run_id,
                after_seq,
                epoch,
            } => self.resume(run_id, after_seq, epoch).await,
            Incoming::Decision { call_id, verdict } => {
                let decision = match verdict {
                    Verdict::Approve => "approve",
                    _ => "reject",
                };
                let msg = match self
                    .server
                    .engine
                    .resolve_approval(self.user_id(), &call_id, verdict)
                    .await
                {
                    Ok(()) => json!({"type": "decision_recorded", "call_id": call_id,
                                     "decision": decision}),
                    // The same answer for an unknown, a decided and another user's call.
                    Err(e) => error_message(format!("{e}: `{}`", excerpt(&json!(call_id)))),
                };
                self.reply(msg).await;
            }
            Incoming::Cancel { run_id } => {
                let report = self.server.engine.cancel_run(self.user_id(), &run_id);
                self.reply(json!({"type": "run_cancelled", "run_id": run_id,
                                  "calls": report.here, "other_nodes_told": report.peers_told}))
                    .await;
            }
        }
    }

    /// Starts a message's calls in `run_id`, following the run if this connection
    /// does not already.
    fn start(&mut self, format: Format, calls: Vec<ToolCall>, run_id: &str) -> Result<(), String> {
        let user = self
            .user
            .with_run_id(run_id)
            .map_err(|e| format!("bad run_id: {e}"))?;
        self.room_for(run_id)?;
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            format!(
                "{MAX_IN_FLIGHT_MESSAGES} messages are in progress on this connection; \
                 wait for a `tool_results` frame"
            )
        })?;
        let writer = self.server.runs.writer(self.user_id(), run_id);
        self.server.worked(self.user_id(), run_id);
        if !self.follows.contains_key(run_id) {
            self.follow(run_id, writer.subscribe());
        }
        let server = self.server.clone();
        tokio::spawn(run_message(server, user, writer, format, calls, permit));
        Ok(())
    }

    async fn resume(&mut self, run_id: String, after_seq: u64, epoch: Option<u64>) {
        if let Err(e) = self.room_for(&run_id) {
            return self.reply(error_message(e)).await;
        }
        match self
            .server
            .runs
            .resume(self.user_id(), &run_id, after_seq, epoch)
            .await
        {
            Err(reason) => {
                let msg = json!({"type": "resync_required", "run_id": run_id,
                                 "reason": reason.as_str()});
                self.reply(msg).await;
            }
            Ok(reader) => {
                // Stop the run's old reader first, so nothing of it follows `resumed`.
                if let Some(old) = self.follows.get(&run_id) {
                    old.abort();
                }
                let msg = json!({"type": "resumed", "run_id": run_id, "after_seq": after_seq});
                self.reply(msg).await;
                self.follow(&run_id, reader);
            }
        }
    }

    /// The socket is gone: stop forwarding; each run followed starts its grace period.
    fn leave(mut self) -> Vec<String> {
        let mut runs = Vec::new();
        for (run_id, task) in self.follows.drain() {
            task.abort();
            self.server.detach(self.user.user_id(), &run_id);
            runs.push(run_id);
        }
        runs.sort();
        runs
    }
}

/// One connection: reads client messages until the socket closes.
async fn connection(server: Server, user: UserContext, socket: WebSocket) {
    let user_id = user.user_id().to_owned();
    let (sink, mut incoming, writer) = split_socket(socket, QUEUE_CAPACITY);
    let default_run = format!("run_{}", unique());
    let mut conn = Connection {
        server: server.clone(),
        user,
        sink: sink.clone(),
        default_run: default_run.clone(),
        follows: HashMap::new(),
        permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT_MESSAGES)),
    };
    let tools: Vec<&str> = server.engine.registry().names().collect();
    let mut ready = json!({"type": "ready", "user_id": user_id, "run_id": default_run,
                           "epoch": server.runs.epoch(), "tools": tools});
    if let Some(node) = &server.node {
        ready["node"] = json!(node);
    }
    // The default run enters the log with its first message: a reconnecting client
    // that only resumes an older run adds nothing that could crowd it out.
    conn.reply(ready).await;
    // Calls the user makes through an MCP client show up here too, live.
    #[cfg(feature = "mcp")]
    conn.follow(MCP_RUN, server.runs.writer(&user_id, MCP_RUN).subscribe());
    server.log(ServerLog::Connected {
        user_id: user_id.clone(),
        run_id: default_run,
    });

    // `Some(reason)` when the server refuses the connection (oversized message);
    // `None` when the client went away (or stopped reading).
    let refused: Option<String> = loop {
        let msg = tokio::select! {
            msg = incoming.next() => msg,
            () = sink.closed() => break None,
        };
        match msg {
            None | Some(Ok(Message::Close(_))) => break None,
            Some(Ok(Message::Text(text))) => conn.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => {
                conn.reply(error_message(
                    "binary messages are not accepted; send JSON text",
                ))
                .await;
            }
            Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
            // The stream cannot be read further. An oversized message is the
            // client's to know about; anything else (a reset, a protocol violation)
            // means the client is gone.
            Some(Err(e)) if is_too_big(&e) => {
                break Some(format!(
                    "message refused: larger than {MAX_MESSAGE_BYTES} bytes"
                ));
            }
            Some(Err(_)) => break None,
        }
    };
    let runs = conn.leave();
    match refused {
        Some(why) => {
            let _ = sink.try_send_outbound(Outbound::Json(error_message(why.clone())));
            let _ = sink.try_send_outbound(Outbound::Close {
                code: 1009,
                reason: why,
            });
        }
        None => sink.close(),
    }
    // The writer ends after the close frame (or at once when closed); a client that
    // does not read cannot hold it longer than the result timeout.
    let report = match tokio::time::timeout(server.result_timeout, writer).await {
        Ok(r) => format!("{r:?}"),
        Err(_) => {
            sink.close();
            "timed out".to_owned()
        }
    };
    drop(sink);
    log_disconnect(&user_id, &runs, &report);
    server.log(ServerLog::Disconnected { user_id, runs });
}

fn log_disconnect(user_id: &str, runs: &[String], report: &str) {
    if std::env::var_os("CHAT_SERVER_QUIET").is_none() {
        eprintln!(
            "{user_id} disconnected; runs {runs:?} go on for the grace period; writer: {report}"
        );
    }
}

// ------------------------------------------------------------------------------------
// Entry point.
// ------------------------------------------------------------------------------------

/// The command line: `--port N` (else `PORT`, else 3000), `--grace-secs N` (else
/// [`DEFAULT_GRACE`]), `--rate-per-minute N` (every demo user's rate, burst N; else
/// the engine's default), `--redis URL` (else `REDIS_URL`; shares limits,
/// cancellation, approvals and runs with the other nodes on that Redis; needs the `redis`
/// feature) and `--node NAME` (shown in the `ready` frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The port to listen on (0: any free port).
    pub port: u16,
    /// How long a run's calls go on once no connection follows it.
    pub grace: Duration,
    /// Calls per minute for every demo user.
    pub rate_per_minute: Option<u32>,
    /// The Redis shared with the other nodes.
    pub redis: Option<String>,
    /// This node's name.
    pub node: Option<String>,
}

/// Reads the [`Options`] from the arguments (without the program name) and `PORT`.
pub fn options_from(
    args: impl IntoIterator<Item = String>,
    env_port: Option<String>,
    env_redis: Option<String>,
) -> Result<Options, String> {
    const USAGE: &str = "usage: chat_server [--port N] [--grace-secs N] \
                         [--rate-per-minute N] [--redis URL] [--node NAME]";
    let mut args = args.into_iter();
    let mut port = None;
    let mut grace = DEFAULT_GRACE;
    let (mut rate_per_minute, mut redis, mut node) = (None, env_redis, None);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (a.clone(), None),
        };
        let mut value = || match inline.clone() {
            Some(v) => Ok(v),
            None => args.next().ok_or(format!("{flag} needs a value; {USAGE}")),
        };
        match flag.as_str() {
            "--port" => {
                let v = value()?;
                port = Some(v.parse().map_err(|e| format!("bad port `{v}`: {e}"))?);
            }
            "--grace-secs" => {
                let v = value()?;
                let secs: u64 = v
                    .parse()
                    .map_err(|e| format!("bad --grace-secs `{v}`: {e}"))?;
                grace = Duration::from_secs(secs);
            }
            "--rate-per-minute" => {
                let v = value()?;
                let n: u32 = v
                    .parse()
                    .map_err(|e| format!("bad --rate-per-minute `{v}`: {e}"))?;
                if n == 0 {
                    return Err("--rate-per-minute must be at least 1".into());
                }
                rate_per_minute = Some(n);
            }
            "--redis" => redis = Some(value()?),
            "--node" => node = Some(value()?),
            _ => return Err(format!("unknown argument `{a}`; {USAGE}")),
        }
    }
    let port = match (port, env_port) {
        (Some(p), _) => p,
        (None, Some(v)) => v.parse().map_err(|e| format!("bad PORT `{v}`: {e}"))?,
        (None, None) => 3000,
    };
    Ok(Options {
        port,
        grace,
        rate_per_minute,
        redis,
        node,
    })
}

/// The demo engine: the demo tools, default limits, a 2 s delivery timeout.
pub fn demo_engine() -> Engine {
    demo_engine_builder(None).build()
}

/// The demo engine's builder, with every user's rate set to `per_minute` (burst the
/// same) when given.
pub fn demo_engine_builder(per_minute: Option<u32>) -> tool_dispatch::EngineBuilder {
    let builder = Engine::builder(demo_registry()).delivery_timeout(Duration::from_secs(2));
    match per_minute {
        Some(n) => builder.limits(tool_dispatch::Limits::default().per_user(
            tool_dispatch::UserLimits {
                concurrency: 10,
                rate: Some(tool_dispatch::Rate::per_minute(n)),
            },
        )),
        None => builder,
    }
}

/// The engine and run log the command line asks for: both on Redis when `--redis`
/// is given, so that limits, cancellation, approvals and runs are the cluster's.
async fn engine_for(options: &Options) -> Result<(Engine, RunLog), Box<dyn std::error::Error>> {
    let builder = demo_engine_builder(options.rate_per_minute);
    match &options.redis {
        None => Ok((builder.build(), RunLog::new(RunLogConfig::default()))),
        #[cfg(feature = "redis")]
        Some(url) => {
            use tool_dispatch::redis::{Redis, RedisConfig};
            let redis = Redis::connect(url, RedisConfig::default().prefix("chat")).await?;
            let runs = RunLog::redis(RunLogConfig::default(), &redis).await?;
            Ok((builder.redis(&redis).build(), runs))
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => Err(
            "--redis needs the `redis` feature: cargo run --example chat_server \
                        --features axum,redis -- --redis URL"
                .into(),
        ),
    }
}

#[allow(dead_code)] // unused when the file is included by the integration test
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = options_from(
        std::env::args().skip(1),
        std::env::var("PORT").ok(),
        std::env::var("REDIS_URL").ok(),
    )?;
    #[cfg(feature = "otel")]
    let traces = {
        use tracing_subscriber::prelude::*;
        let traces = tool_dispatch::otel::OtlpTraces::from_env("chat_server")?;
        if let Some(t) = &traces {
            tracing_subscriber::registry().with(t.layer()).init();
        }
        traces
    };
    let (engine, runs) = engine_for(&options).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let mut server = Server::new(engine, demo_users())
        .grace(options.grace)
        .run_log(runs);
    if let Some(node) = &options.node {
        server = server.node(node);
    }
    let engine = server.engine().clone();
    tokio::select! {
        r = serve(listener, server) => r?,
        _ = tokio::signal::ctrl_c() => {
            let report = engine.shutdown(Duration::from_secs(5)).await;
            eprintln!("shut down: {report:?}");
        }
    }
    #[cfg(feature = "otel")]
    if let Some(t) = traces {
        t.shutdown()?; // the spans still buffered
    }
    Ok(())
}

const PAGE: &str = include_str!("chat_server/index.html");
/// The session's client, served from `clients/js` (not a copy).
const CLIENT_JS: &str = include_str!("../clients/js/src/index.js");
