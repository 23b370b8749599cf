//! The WebSocket session (feature `axum`): a user's tool calls, live on that user's
//! own WebSocket, surviving a dropped connection, waiting for that user's approval,
//! cancellable. An app brings its tools, a token check and a listener:
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::time::Duration;
//! use tool_dispatch::ws::{WsServer, router};
//! use tool_dispatch::{Engine, Registry, RunLog, RunLogConfig, ToolError, ToolSettings,
//!                     UserContext, tool_fn};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct Steps { steps: u32 }
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct Email { to: String }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let slow = tool_fn("slow_task", "Counts.", |i: Steps, cx| async move {
//!     for n in 1..=i.steps { cx.progress(f64::from(n) / f64::from(i.steps), "step"); }
//!     Ok::<_, ToolError>(i.steps)
//! });
//! let email = tool_fn("send_email", "Sends an email.", |i: Email, _cx| async move {
//!     Ok::<_, ToolError>(format!("sent to {}", i.to))
//! })
//! .settings(ToolSettings::new().requires_approval("sends an email in your name"));
//! let users: HashMap<String, UserContext> =
//!     HashMap::from([("alice-token".into(), UserContext::builder("alice").build()?)]);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!
//! let engine = Engine::builder(Registry::builder().tool(slow).tool(email).build()?).build();
//! let server = WsServer::new(engine)
//!     .run_log(RunLog::new(RunLogConfig::default()))
//!     .grace(Duration::from_secs(30));
//! let app: axum::Router = router(server, move |token: &str| users.get(token).cloned()); // Option<UserContext>
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! (`tool_dispatch::http::serve(listener, app)` serves the same router with a header-read
//! and an idle timeout, which `axum::serve` does not set: prefer it on a network
//! where clients may open connections and never finish a request.)
//!
//! The protocol is in [`protocol`] (typed frames, version 1, a published JSON
//! Schema) and in `docs/ws.md`, with every setting and its default. In short: the
//! server sends `ready` (the user, the connection's run, the run log's epoch, the
//! tools); the client sends model turns (OpenAI or Anthropic assistant messages),
//! `resume`, `cancel` and `tool_approval_decision`; every event of a run carries a
//! `seq` and reaches every connection following the run; a dropped connection
//! resumes after the last `seq` it saw, or is told to resync.
//!
//! - [`router`] serves `GET /ws` with a token check (401 before the upgrade) and an
//!   `Origin` check (403); [`WsServer::upgrade`] and [`WsServer::serve_socket`] serve
//!   one connection for a user the app authenticated itself.
//! - [`WsServer::dispatcher`] gives a server-side agent loop a dispatcher bound to a
//!   user's run: its calls are recorded in the run like the socket's own.
//! - [`WsServer::on_message`] lets the app take the messages the session does not
//!   know (a chat text, an app command).
//! - [`socket`] is the layer underneath: one socket as a bounded, ordered queue with
//!   one writer task.

mod connection;
mod followers;
pub mod protocol;
mod router;
mod session;
pub mod socket;
mod stats;
mod turn;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::broadcast;

pub use router::router;
pub use session::Session;
pub use stats::{ResyncCounts, WsStats};

use crate::dispatcher::Dispatcher;
use crate::engine::Engine;
use crate::runlog::{RunLog, RunLogConfig};
use crate::user::{UserContext, UserContextError};

/// What an app's hook gets for a message the session does not know.
type Hook = Arc<dyn Fn(Session, Value) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The session server: an engine, a run log and the session's settings. Cheap to
/// clone (two `Arc`s); every clone serves the same users and runs.
///
/// Each setting has a default fit for a chat front end; the setters are meant for
/// building the server, before it serves (a setter called on a clone changes that
/// clone only).
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::ws::WsServer;
/// # fn f(engine: tool_dispatch::Engine) {
/// let server = WsServer::new(engine)
///     .grace(Duration::from_secs(60))
///     .max_message_bytes(128 * 1024)
///     .allow_origin("https://app.example.com");
/// # let _ = server; }
/// ```
#[derive(Clone)]
pub struct WsServer {
    engine: Engine,
    runs: RunLog,
    config: Arc<Config>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsServer")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The settings (see each setter for its default).
#[derive(Clone)]
struct Config {
    grace: Duration,
    max_message_bytes: usize,
    max_runs_per_connection: usize,
    max_calls_per_message: usize,
    max_messages_in_flight: usize,
    send_queue: usize,
    result_timeout: Duration,
    ping_interval: Option<Duration>,
    idle_timeout: Option<Duration>,
    origins: Origins,
    node: Option<String>,
    follow_on_connect: Vec<String>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grace", &self.grace)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_runs_per_connection", &self.max_runs_per_connection)
            .field("max_calls_per_message", &self.max_calls_per_message)
            .field("max_messages_in_flight", &self.max_messages_in_flight)
            .field("send_queue", &self.send_queue)
            .field("result_timeout", &self.result_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("origins", &self.origins)
            .field("node", &self.node)
            .field("follow_on_connect", &self.follow_on_connect)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

/// Which `Origin`s may open a connection (browsers send one; other clients need not).
#[derive(Debug, Clone, Default)]
struct Origins {
    any: bool,
    allowed: Vec<String>,
}

/// What every clone of a server shares.
struct Shared {
    followers: followers::Followers,
    events: broadcast::Sender<WsEvent>,
    counters: stats::Counters,
}

/// What happened on a connection or a run; for logs, and for tests that need to know
/// when the server is done with something ([`WsServer::subscribe`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WsEvent {
    /// A user connected; `run_id` is the connection's run (in its `ready` frame).
    Connected {
        /// The user.
        user_id: String,
        /// The connection's run.
        run_id: String,
    },
    /// A model turn's calls all ended, and its `tool_results` frame was recorded in
    /// the run (or not).
    TurnDone {
        /// The user.
        user_id: String,
        /// The run the calls belonged to.
        run_id: String,
        /// The call ids, in the turn's order.
        call_ids: Vec<String>,
        /// Whether the `tool_results` frame was recorded.
        recorded: bool,
    },
    /// A connection ended. The calls of the runs it followed go on for the grace
    /// period.
    Disconnected {
        /// The user.
        user_id: String,
        /// The runs the connection followed.
        runs: Vec<String>,
        /// How it ended.
        end: String,
    },
    /// No connection of the user followed the run for a whole grace period: its
    /// calls still in flight were cancelled.
    RunAbandoned {
        /// The user.
        user_id: String,
        /// The run.
        run_id: String,
        /// Calls cancelled.
        cancelled: usize,
    },
}

/// Largest accepted client message, by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

impl WsServer {
    /// A server over `engine`, with a run log of this process (default bounds) and
    /// the default settings.
    pub fn new(engine: Engine) -> WsServer {
        let config = Config {
            grace: Duration::from_secs(30),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_runs_per_connection: 8,
            max_calls_per_message: 16,
            max_messages_in_flight: 32,
            send_queue: 64,
            result_timeout: Duration::from_secs(5),
            ping_interval: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(90)),
            origins: Origins::default(),
            node: None,
            follow_on_connect: Vec::new(),
            hook: None,
        };
        WsServer {
            engine,
            runs: RunLog::new(RunLogConfig::default()),
            config: Arc::new(config),
            shared: Arc::new(Shared {
                followers: followers::Followers::default(),
                events: broadcast::channel(1024).0,
                counters: stats::Counters::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The run log (default: this process's own, with [`RunLogConfig::default`]; a
    /// shared one, `RunLog::redis`, lets a client resume on another node).
    pub fn run_log(mut self, runs: RunLog) -> Self {
        self.runs = runs;
        self
    }

    /// How long a run's calls go on once no connection of its user follows it
    /// (default 30 s); then they are cancelled. A connection that resumes the run
    /// meanwhile keeps them going.
    pub fn grace(self, grace: Duration) -> Self {
        self.edit(|c| c.grace = grace)
    }

    /// The largest client message (default 64 KiB). A larger one is refused before
    /// it is buffered whole: the client gets an `error` frame and close code 1009.
    pub fn max_message_bytes(self, n: usize) -> Self {
        self.edit(|c| c.max_message_bytes = n.max(1024))
    }

    /// Runs one connection may follow at once (default 8): past it, a turn in a new
    /// run or a resume gets an `error` frame.
    pub fn max_runs_per_connection(self, n: usize) -> Self {
        self.edit(|c| c.max_runs_per_connection = n.max(1))
    }

    /// Tool calls accepted in one model turn (default 16).
    pub fn max_calls_per_message(self, n: usize) -> Self {
        self.edit(|c| c.max_calls_per_message = n.max(1))
    }

    /// Messages (turns and the app hook's) in progress per connection (default 32):
    /// past it, a message gets an `error` frame until one ends.
    pub fn max_messages_in_flight(self, n: usize) -> Self {
        self.edit(|c| c.max_messages_in_flight = n.max(1))
    }

    /// Frames that may wait for one client (default 64). Runs never wait for a
    /// socket; this bounds what one slow client holds.
    pub fn send_queue(self, n: usize) -> Self {
        self.edit(|c| c.send_queue = n.max(1))
    }

    /// How long a frame may wait for room in a client's full queue before the server
    /// lets that connection go (default 5 s). The client can reconnect and resume;
    /// its runs go on meanwhile.
    pub fn result_timeout(self, wait: Duration) -> Self {
        self.edit(|c| c.result_timeout = wait)
    }

    /// How often the server pings a connection (default every 30 s; `None`: never).
    pub fn ping_interval(self, every: Option<Duration>) -> Self {
        self.edit(|c| c.ping_interval = every)
    }

    /// How long a connection may send nothing, not even a pong, before the server
    /// closes it with code 1001 (default 90 s; `None`: no limit). With the default
    /// ping interval, a live browser or client library answers well within it.
    pub fn idle_timeout(self, wait: Option<Duration>) -> Self {
        self.edit(|c| c.idle_timeout = wait)
    }

    /// Also accepts connections from pages of `origin` (`"https://app.example.com"`,
    /// scheme, host and port as the browser sends them). By default only same-origin
    /// pages (whose `Origin` names the `Host` they connect to) and clients that send
    /// no `Origin` (not browsers) may connect; any other is refused with 403.
    pub fn allow_origin(self, origin: impl Into<String>) -> Self {
        let origin = origin.into();
        self.edit(|c| c.origins.allowed.push(origin))
    }

    /// Accepts connections from pages of any origin (the token is then the only
    /// check: do not use with credentials a browser sends by itself).
    pub fn allow_any_origin(self) -> Self {
        self.edit(|c| c.origins.any = true)
    }

    /// This node's name, shown in the `ready` frame (default none).
    pub fn node(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.edit(|c| c.node = Some(name))
    }

    /// A run of every user that each of their connections follows from the start
    /// (default none): calls made elsewhere in it (an MCP client, a server-side loop)
    /// show up on every page the user has open.
    pub fn follow_on_connect(self, run_id: impl Into<String>) -> Self {
        let run_id = run_id.into();
        self.edit(|c| c.follow_on_connect.push(run_id))
    }

    /// The app's hook for messages the session does not know: a JSON object whose
    /// `type` is none of the session's, or that is no model turn. It gets the
    /// connection's [`Session`] and the message, runs on its own task (counted among
    /// the connection's messages in flight), and an `Err(text)` reaches the client as
    /// an `error` frame. Without a hook such a message gets an `error` frame; either
    /// way the connection goes on.
    ///
    /// ```
    /// use tool_dispatch::ws::WsServer;
    /// # fn f(engine: tool_dispatch::Engine) {
    /// let server = WsServer::new(engine).on_message(|session, msg| async move {
    ///     match msg["type"].as_str() {
    ///         Some("ping_app") => session.send(serde_json::json!({"type": "pong_app"})).await
    ///             .map_err(|e| e.to_string()),
    ///         _ => Err("unknown message".into()),
    ///     }
    /// });
    /// # let _ = server; }
    /// ```
    pub fn on_message<F, Fut>(self, hook: F) -> Self
    where
        F: Fn(Session, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let hook: Hook = Arc::new(move |s, v| Box::pin(hook(s, v)));
        self.edit(|c| c.hook = Some(hook))
    }

    /// The engine (metrics, cancellation, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The run log.
    pub fn runs(&self) -> &RunLog {
        &self.runs
    }

    /// The session's counters so far.
    pub fn stats(&self) -> WsStats {
        self.shared.counters.snapshot()
    }

    /// Reads the counters without holding the server (its engine and run log), for a
    /// metrics registry that outlives it.
    #[cfg(feature = "prometheus")]
    pub(crate) fn stats_reader(&self) -> impl Fn() -> WsStats + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        move || {
            shared
                .upgrade()
                .map(|s| s.counters.snapshot())
                .unwrap_or_default()
        }
    }

    /// Subscribes to what happens on connections and runs.
    pub fn subscribe(&self) -> broadcast::Receiver<WsEvent> {
        self.shared.events.subscribe()
    }

    fn event(&self, e: WsEvent) {
        let _ = self.shared.events.send(e);
    }

    /// A dispatcher bound to `user`'s run `run_id`, for an agent loop that runs on the
    /// server: its calls' events are recorded in the run, reach every connection
    /// following it (live, and on resume), and wait for approvals answered over the
    /// socket, exactly like the calls of a turn sent over the socket. Like those, the
    /// run's calls are cancelled once no connection of the user has followed it for
    /// the grace period.
    ///
    /// ```
    /// # async fn f(server: tool_dispatch::ws::WsServer, alice: tool_dispatch::UserContext)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// use tool_dispatch::ToolCall;
    /// let d = server.dispatcher(&alice, "run_42")?;
    /// let out = d.dispatch(ToolCall::new("get_weather", serde_json::json!({"city": "Paris"}))).await?;
    /// # let _ = out; Ok(()) }
    /// ```
    pub fn dispatcher(
        &self,
        user: &UserContext,
        run_id: &str,
    ) -> Result<Dispatcher, UserContextError> {
        let in_run = user.with_run_id(run_id)?;
        let writer = self.runs.writer(user.user_id(), run_id);
        self.worked(user.user_id(), run_id);
        Ok(self.engine.dispatcher().sink(writer).user(in_run))
    }

    /// Upgrades a request the app authenticated itself and serves the connection as
    /// `user`, with this server's message size bound.
    ///
    /// ```no_run
    /// use axum::extract::ws::WebSocketUpgrade;
    /// # async fn handler(upgrade: WebSocketUpgrade, server: tool_dispatch::ws::WsServer,
    /// #                  user: tool_dispatch::UserContext) -> axum::response::Response {
    /// server.upgrade(upgrade, user)
    /// # }
    /// ```
    pub fn upgrade(&self, upgrade: WebSocketUpgrade, user: UserContext) -> Response {
        let server = self.clone();
        let max = self.config.max_message_bytes;
        upgrade
            .max_message_size(max)
            .max_frame_size(max)
            .on_upgrade(move |socket| async move { server.serve_socket(socket, user).await })
    }

    /// Serves one socket, already upgraded, as `user` until it closes. (The message
    /// size bound is the upgrade's: [`upgrade`](Self::upgrade) sets it.)
    pub async fn serve_socket(&self, socket: WebSocket, user: UserContext) {
        connection::serve(self.clone(), user, socket).await
    }
}

/// A name part no other process of the cluster hands out: a random start for this
/// process, then one more each time. Runs and calls are the cluster's once their log
/// and approvals live in Redis, so two nodes must never name two runs alike.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = START.get_or_init(|| {
        std::hash::BuildHasher::hash_one(
            &std::hash::RandomState::new(),
            (std::process::id(), std::time::SystemTime::now()),
        ) >> 24
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}", start.wrapping_add(n))
}

// The session's handles cross tasks and threads.
const _: () = {
    const fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<WsServer>();
    send_sync::<Session>();
    send_sync::<socket::WsSink>();
};
