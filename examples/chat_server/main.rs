//! A chat back end's tool runner over WebSocket: the demo tools, the demo users'
//! tokens, the reference page and the library's session ([`tool_dispatch::ws`]).
//!
//! ```text
//! cargo run --example chat_server --features axum                  # 127.0.0.1:3000
//! cargo run --example chat_server --features axum -- --port 0      # any free port
//! cargo run --example chat_server --features axum -- --grace-secs 5
//! cargo run --example chat_server --features axum,redis -- --redis redis://127.0.0.1:6379 --node a
//! PORT=8080 cargo run --example chat_server --features axum
//! ```
//!
//! It prints `listening on http://127.0.0.1:NNNN` once bound.
//!
//! - `GET /`: the reference front end (one card per call, live progress, automatic
//!   reconnect and resume, approvals, a Stop button).
//! - `GET /ws?token=alice-token` (or `Authorization: Bearer alice-token`): the
//!   session, protocol version 1 (`docs/ws.md`). Demo tokens: `alice-token` (scopes
//!   `weather:read`, `admin`) and `bob-token` (scope `weather:read`).
//! - `GET /metrics`: Prometheus text (with `--features prometheus`; the JSON below
//!   otherwise); `GET /metrics.json`: the engine's counters and the session's, as JSON.
//! - `GET /client/tool-dispatch.js`: the session's JavaScript client
//!   (`clients/js/src/index.js`), which the page imports.
//! - `/mcp` (with the `mcp` feature): the same tools over MCP, bearer tokens; each
//!   user's MCP calls go to their run `mcp`, which every connection of theirs follows.
//!
//! With `--features otel` and `OTEL_EXPORTER_OTLP_ENDPOINT` set, every call's span goes
//! to that OpenTelemetry collector (OTLP/HTTP).

#[path = "../common/demo.rs"]
mod demo;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tool_dispatch::ws::{WsEvent, WsServer, router};
use tool_dispatch::{Engine, RunLog, RunLogConfig};

/// The run of each user that their calls made by MCP clients go to.
const MCP_RUN: &str = "mcp";

const PAGE: &str = include_str!("index.html");
/// The session's client, served from `clients/js` (not a copy).
const CLIENT_JS: &str = include_str!("../../clients/js/src/index.js");

/// The command line: `--port N` (else `PORT`, else 3000), `--grace-secs N` (else
/// 30), `--rate-per-minute N` (every demo user's rate, burst N), `--redis URL` (else
/// `REDIS_URL`; shares limits, cancellation, approvals and runs with the other nodes
/// on that Redis; needs the `redis` feature) and `--node NAME` (shown in `ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    pub(crate) port: u16,
    pub(crate) grace: Duration,
    pub(crate) rate_per_minute: Option<u32>,
    pub(crate) redis: Option<String>,
    pub(crate) node: Option<String>,
}

const USAGE: &str = "usage: chat_server [--port N] [--grace-secs N] [--rate-per-minute N] \
                     [--redis URL] [--node NAME]";

/// Reads the [`Options`] from the arguments (without the program name), `PORT` and
/// `REDIS_URL`; a flag wins over the environment.
pub(crate) fn options_from(
    args: impl IntoIterator<Item = String>,
    env_port: Option<String>,
    env_redis: Option<String>,
) -> Result<Options, String> {
    let mut args = args.into_iter();
    let mut port = None;
    let mut grace = Duration::from_secs(30);
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

/// The engine and run log the command line asks for: both on Redis when `--redis`
/// is given, so that limits, cancellation, approvals and runs are the cluster's.
pub(crate) async fn engine_for(
    options: &Options,
) -> Result<(Engine, RunLog), Box<dyn std::error::Error>> {
    let builder = demo::demo_engine_builder(options.rate_per_minute);
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

/// The routes: the session at `/ws`, the page at `/` and its client, `/metrics` and
/// `/metrics.json`, and `/mcp` with the `mcp` feature.
pub(crate) fn app(server: WsServer) -> Router {
    let users = demo::demo_users();
    let pages = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/client/tool-dispatch.js", get(client_js))
        .route("/metrics.json", get(metrics));
    #[cfg(not(feature = "prometheus"))]
    let pages = pages.route("/metrics", get(metrics));
    let pages = pages.with_state(server.clone());
    #[cfg(feature = "mcp")]
    let mcp = mcp(&server);
    #[cfg(feature = "prometheus")]
    let pages = pages.route(
        "/metrics",
        prometheus(&server, |_registry| {
            #[cfg(feature = "mcp")]
            mcp.register_metrics(_registry);
        }),
    );
    #[cfg(feature = "mcp")]
    let pages = {
        let users = users.clone();
        pages.merge(tool_dispatch::mcp::router(mcp, move |token| {
            users.get(token).cloned()
        }))
    };
    router(server, move |token: &str| users.get(token).cloned()).merge(pages)
}

async fn client_js() -> impl IntoResponse {
    let js = [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")];
    (js, CLIENT_JS)
}

async fn metrics(State(server): State<WsServer>) -> Response {
    let mut m = json!(server.engine().metrics());
    m["session"] = json!(server.stats());
    axum::Json(m).into_response()
}

/// `/metrics` in Prometheus text, in the format the scraper asks for: the engine's,
/// the run log's and the session's series, and those `more` adds.
#[cfg(feature = "prometheus")]
fn prometheus(
    server: &WsServer,
    more: impl FnOnce(&mut tool_dispatch::prometheus::prometheus_client::registry::Registry),
) -> axum::routing::MethodRouter {
    use axum::http::{HeaderMap, StatusCode};
    use tool_dispatch::prometheus::{encode, prometheus_client::registry::Registry};
    let mut registry = Registry::default();
    server.engine().register_metrics(&mut registry);
    server.runs().register_metrics(&mut registry);
    server.register_metrics(&mut registry);
    more(&mut registry);
    let registry = std::sync::Arc::new(registry);
    get(move |headers: HeaderMap| async move {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        match encode(&registry, accept) {
            Ok(e) => ([(header::CONTENT_TYPE, e.content_type)], e.body).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    })
}

/// The server of `/mcp`: the same engine served over MCP (streamable HTTP, the demo
/// bearer tokens). Each user's MCP calls go to their run [`MCP_RUN`], which every
/// connection of theirs follows: the page shows calls made by an MCP client too.
#[cfg(feature = "mcp")]
fn mcp(server: &WsServer) -> tool_dispatch::mcp::McpServer {
    let runs = server.runs().clone();
    tool_dispatch::mcp::McpServer::per_request(server.engine().clone())
        .in_run(MCP_RUN)
        .events(move |user| std::sync::Arc::new(runs.writer(user.user_id(), MCP_RUN)))
}

/// Prints each disconnection (unless `CHAT_SERVER_QUIET` is set).
fn log_disconnections(server: &WsServer) {
    if std::env::var_os("CHAT_SERVER_QUIET").is_some() {
        return;
    }
    let mut events = server.subscribe();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if let WsEvent::Disconnected { user_id, runs, end } = e {
                eprintln!(
                    "{user_id} disconnected ({end}); runs {runs:?} go on for the grace period"
                );
            }
        }
    });
}

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
    let mut server = WsServer::new(engine.clone())
        .run_log(runs)
        .grace(options.grace);
    if cfg!(feature = "mcp") {
        server = server.follow_on_connect(MCP_RUN);
    }
    if let Some(node) = &options.node {
        server = server.node(node);
    }
    log_disconnections(&server);
    tokio::select! {
        r = tool_dispatch::http::serve(listener, app(server)) => r?,
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
