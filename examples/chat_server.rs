//! A chat back end's tool runner over WebSocket.
//!
//! ```text
//! cargo run --example chat_server --features axum              # 127.0.0.1:3000
//! cargo run --example chat_server --features axum -- --port 0  # any free port
//! PORT=8080 cargo run --example chat_server --features axum
//! ```
//!
//! It prints `listening on http://127.0.0.1:NNNN` once bound.
//!
//! - `GET /` — a self-contained page: connect as a demo user, send a sample OpenAI- or
//!   Anthropic-shaped tool call, watch the live events.
//! - `GET /ws?token=alice-token` (or `Authorization: Bearer alice-token`) — one
//!   WebSocket per user. An unknown or missing token is refused with 401 before the
//!   upgrade. Demo tokens: `alice-token` (scopes `weather:read`, `admin`) and
//!   `bob-token` (scope `weather:read`).
//! - `GET /metrics` — the engine's counters as JSON.
//!
//! ## Protocol
//!
//! Client → server, one JSON text message per model turn:
//!
//! - OpenAI Chat Completions: an assistant message with `tool_calls`
//!   (`{"role":"assistant","tool_calls":[{"id":"call_1","type":"function",
//!   "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]}`);
//! - Anthropic Messages: an assistant message with `tool_use` blocks
//!   (`{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1",
//!   "name":"get_weather","input":{"city":"Paris"}}]}`).
//!
//! Server → client: `{"type":"ready","user_id":..,"tools":[..]}` once connected; then
//! the pipeline's events (`tool_executing`, `tool_progress`, `tool_completed`) as they
//! happen; then, per message, `{"type":"tool_results","format":"openai"|"anthropic",
//! "call_ids":[..],"results":..}` with the results rendered in the message's own
//! format (errors in-band). Messages are handled concurrently: a slow call does not
//! hold up the next message.
//!
//! ## Robustness
//!
//! - A message that is not JSON, or neither shape, gets
//!   `{"type":"error","error":".."}`; the connection stays up.
//! - A message over 64 KiB ([`MAX_MESSAGE_BYTES`]) is refused by the WebSocket layer
//!   before it is buffered whole: the server sends `{"type":"error",..}` and closes
//!   the connection with code 1009 (message too big). Reading cannot resume after
//!   that (the frame's remainder is still on the wire), so the connection ends.
//! - Each connection has its own bounded queue ([`QUEUE_CAPACITY`] frames) and writer
//!   task; a client that stops reading fills only its own queue, its progress updates
//!   are dropped and counted, its other events wait for the engine's delivery timeout
//!   and then count as sink failures. Other users are not slowed. At most
//!   [`MAX_IN_FLIGHT_MESSAGES`] messages per connection are in progress; past that the
//!   server stops reading that socket until one finishes.
//! - Closing the socket drops that connection's in-flight calls: each ends as
//!   `cancelled` (counted in `/metrics`). Other connections, even of the same user,
//!   are untouched.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tool_dispatch::axum::{Outbound, WsSink, split_socket};
use tool_dispatch::provider::{anthropic, openai};
use tool_dispatch::{
    Dispatcher, Engine, Registry, ToolCall, ToolContext, ToolError, ToolSettings, UserContext,
    tool_fn,
};

/// Largest accepted WebSocket message.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Frames that may wait for one client.
pub const QUEUE_CAPACITY: usize = 64;
/// Messages in progress per connection before the server stops reading it.
pub const MAX_IN_FLIGHT_MESSAGES: usize = 32;
/// Tool calls accepted in one message.
pub const MAX_CALLS_PER_MESSAGE: usize = 16;
/// How long a result message may wait for room in a full queue.
pub const RESULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The demo tools: `get_weather` (sensitive `api_key`, scope `weather:read`),
/// `slow_task` (progress, long timeout), `list_users` (scope `admin`) and `firehose`
/// (many progress updates, to show a slow client's bounded queue).
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
            .sensitive("api_key"),
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
    let built = Registry::builder()
        .tool(weather)
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

/// What happened on a connection; for logs and for tests that need to know when the
/// server has finished with something.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerLog {
    /// A user connected.
    Connected {
        /// The user.
        user_id: String,
    },
    /// A message's calls all ended and their results were queued (or not).
    MessageDone {
        /// The user.
        user_id: String,
        /// The call ids, in message order.
        call_ids: Vec<String>,
        /// Whether the results message was queued.
        delivered: bool,
    },
    /// A connection ended; `cancelled` calls were still in flight and were dropped.
    Disconnected {
        /// The user.
        user_id: String,
        /// Calls dropped mid-flight.
        cancelled: usize,
    },
}

/// Shared server state.
#[derive(Clone)]
pub struct Server {
    engine: Engine,
    users: Arc<HashMap<String, UserContext>>,
    log: broadcast::Sender<ServerLog>,
    result_timeout: Duration,
}

impl Server {
    /// A server over `engine` with the given token table.
    pub fn new(engine: Engine, users: HashMap<String, UserContext>) -> Self {
        Server {
            engine,
            users: Arc::new(users),
            log: broadcast::channel(1024).0,
            result_timeout: RESULT_DELIVERY_TIMEOUT,
        }
    }

    /// How long a results message may wait for room in a full queue (default
    /// [`RESULT_DELIVERY_TIMEOUT`]).
    pub fn result_timeout(mut self, wait: Duration) -> Self {
        self.result_timeout = wait;
        self
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
}

/// The routes: `/`, `/ws`, `/metrics`.
pub fn router(server: Server) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/metrics", get(metrics))
        .with_state(server)
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, server: Server) -> std::io::Result<()> {
    axum::serve(listener, router(server)).await
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics(State(server): State<Server>) -> Response {
    axum::Json(server.engine.metrics()).into_response()
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

/// Reads one client message into its format and calls.
fn parse_message(text: &str) -> Result<(Format, Vec<ToolCall>), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
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
    Ok((format, calls))
}

/// Whether a read error is tungstenite's "message/frame too long" capacity error.
fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}

fn error_message(text: impl Into<String>) -> Value {
    json!({"type": "error", "error": text.into()})
}

/// Runs one message's calls concurrently and queues the rendered results.
async fn handle(
    server: &Server,
    d: &Dispatcher,
    sink: &WsSink,
    running: &AtomicUsize,
    format: Format,
    calls: Vec<ToolCall>,
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
    let results = futures_util::future::join_all(calls.iter().cloned().map(|c| async move {
        // Counted while running; a call dropped mid-flight is never uncounted.
        running.fetch_add(1, Ordering::Relaxed);
        let r = d.dispatch(c).await;
        running.fetch_sub(1, Ordering::Relaxed);
        r
    }))
    .await;
    let rendered = match format {
        Format::OpenAi => openai::render_results(&calls, &results),
        Format::Anthropic => anthropic::render_results(&calls, &results),
    };
    let call_ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    let msg = json!({
        "type": "tool_results",
        "format": format.name(),
        "call_ids": call_ids,
        "results": rendered,
    });
    let delivered = sink
        .send_outbound(Outbound::Json(msg), server.result_timeout)
        .await
        .is_ok();
    server.log(ServerLog::MessageDone {
        user_id: d.user_context().user_id().to_owned(),
        call_ids,
        delivered,
    });
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One connection: one user, one sink, one dispatcher.
async fn connection(server: Server, user: UserContext, socket: WebSocket) {
    let user_id = user.user_id().to_owned();
    let (sink, mut incoming, writer) = split_socket(socket, QUEUE_CAPACITY);
    let d = server.engine.dispatcher().sink(sink.clone()).user(user);
    let running = AtomicUsize::new(0);
    let tools: Vec<&str> = server.engine.registry().names().collect();
    let _ = sink.try_send_outbound(Outbound::Json(
        json!({"type": "ready", "user_id": user_id, "tools": tools}),
    ));
    server.log(ServerLog::Connected {
        user_id: user_id.clone(),
    });

    let mut in_flight = FuturesUnordered::new();
    // `Some(reason)` when the server refuses the connection (oversized message);
    // `None` when the client went away.
    let refused: Option<String> = loop {
        tokio::select! {
            // Reading stops while too many messages are in progress: the client's
            // own TCP window then holds what it sends next.
            msg = incoming.next(), if in_flight.len() < MAX_IN_FLIGHT_MESSAGES => match msg {
                None | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(Message::Text(text))) => match parse_message(text.as_str()) {
                    Ok((format, calls)) => {
                        in_flight.push(handle(&server, &d, &sink, &running, format, calls));
                    }
                    Err(e) => {
                        let _ = sink.try_send_outbound(Outbound::Json(error_message(format!("malformed message: {e}"))));
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    let _ = sink.try_send_outbound(Outbound::Json(error_message("binary messages are not accepted; send JSON text")));
                }
                Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
                // The stream cannot be read further. An oversized message is the
                // client's to know about; anything else (a reset, a protocol
                // violation) means the client is gone.
                Some(Err(e)) if is_too_big(&e) => {
                    break Some(format!("message refused: larger than {MAX_MESSAGE_BYTES} bytes"));
                }
                Some(Err(_)) => break None,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    };
    // Nobody will read the answers of the calls still in flight: drop them; each
    // ends as `cancelled` (counted). When the client is gone the sink is closed
    // first, so those events count as undelivered rather than queued for nobody.
    let cancelled = running.load(Ordering::Relaxed);
    if refused.is_none() {
        sink.close();
    }
    drop(in_flight);
    if let Some(why) = refused {
        let _ = sink.try_send_outbound(Outbound::Json(error_message(why.clone())));
        let _ = sink.try_send_outbound(Outbound::Close {
            code: 1009,
            reason: why,
        });
    }
    drop(d);
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
    log_disconnect(&user_id, cancelled, &report);
    server.log(ServerLog::Disconnected { user_id, cancelled });
}

fn log_disconnect(user_id: &str, cancelled: usize, report: &str) {
    if std::env::var_os("CHAT_SERVER_QUIET").is_none() {
        eprintln!("{user_id} disconnected: {cancelled} call(s) cancelled; writer: {report}");
    }
}

// ------------------------------------------------------------------------------------
// Entry point.
// ------------------------------------------------------------------------------------

/// The port from `--port N`, else `PORT`, else 3000.
pub fn port_from(
    args: impl IntoIterator<Item = String>,
    env: Option<String>,
) -> Result<u16, String> {
    let mut args = args.into_iter();
    let mut port = None;
    while let Some(a) = args.next() {
        let v = if a == "--port" {
            args.next().ok_or("--port needs a value")?
        } else if let Some(v) = a.strip_prefix("--port=") {
            v.to_owned()
        } else {
            return Err(format!(
                "unknown argument `{a}`; usage: chat_server [--port N]"
            ));
        };
        port = Some(v.parse().map_err(|e| format!("bad port `{v}`: {e}"))?);
    }
    if let Some(p) = port {
        return Ok(p);
    }
    match env {
        Some(v) => v.parse().map_err(|e| format!("bad PORT `{v}`: {e}")),
        None => Ok(3000),
    }
}

/// The demo engine: the demo tools, default limits, a 2 s delivery timeout.
pub fn demo_engine() -> Engine {
    Engine::builder(demo_registry())
        .delivery_timeout(Duration::from_secs(2))
        .build()
}

#[allow(dead_code)] // unused when the file is included by the integration test
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = port_from(std::env::args().skip(1), std::env::var("PORT").ok())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let server = Server::new(demo_engine(), demo_users());
    let engine = server.engine().clone();
    tokio::select! {
        r = serve(listener, server) => r?,
        _ = tokio::signal::ctrl_c() => {
            let report = engine.shutdown(Duration::from_secs(5)).await;
            eprintln!("shut down: {report:?}");
        }
    }
    Ok(())
}

const PAGE: &str = include_str!("chat_server/index.html");
