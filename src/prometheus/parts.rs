//! The series of the engine's parts: each registers a reader of its plain stats.
//! A part with atomic stats joins with one `register_metrics` of a few lines here:
//! the run log, Redis, the WebSocket session and the MCP server.

use std::fmt;

use ::prometheus_client::registry::Registry;

use super::Series;
use crate::runlog::RunLog;

impl RunLog {
    /// Adds the run log's series to `registry`: `tool_dispatch_run_log_runs` (runs
    /// kept) and `tool_dispatch_run_log_bytes` (bytes of events kept in this process),
    /// read at each scrape.
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(
            registry,
            "tool-dispatch run log",
            self.clone(),
            read_run_log,
        );
    }
}

fn read_run_log(log: &RunLog, s: &mut Series<'_>) -> fmt::Result {
    let stats = log.stats();
    s.gauge(
        "tool_dispatch_run_log_runs",
        "Runs whose events the run log keeps (with a shared log: the runs this process follows).",
        stats.runs as u64,
    )?;
    s.gauge(
        "tool_dispatch_run_log_bytes",
        "Bytes of serialized events the run log keeps in this process.",
        stats.bytes as u64,
    )
}

#[cfg(feature = "redis")]
impl crate::redis::Redis {
    /// Adds the Redis connection's series to `registry`, read at each scrape:
    /// `tool_dispatch_redis_requests_total{result}` (rate checks and slot leases
    /// Redis `answered`, or that `failed`: no answer in time, or an error),
    /// `tool_dispatch_redis_fallbacks_total` (failed ones this node decided with its
    /// own limits), `tool_dispatch_redis_shed_locally_total` (calls refused by the
    /// local pre-check without a round trip) and
    /// `tool_dispatch_redis_log_frames_total{result}` (run log frames `recorded` in
    /// Redis, or that `failed`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(registry, "tool-dispatch redis", self.clone(), read_redis);
    }
}

#[cfg(feature = "redis")]
fn read_redis(redis: &crate::redis::Redis, s: &mut Series<'_>) -> fmt::Result {
    let stats = redis.stats();
    s.counters(
        "tool_dispatch_redis_requests",
        "Rate checks and slot leases sent to Redis, by result (answered, or failed: no answer in time or an error).",
        [("answered", stats.answers), ("failed", stats.failures)].map(|(r, n)| ([("result", r)], n)),
    )?;
    s.counter(
        "tool_dispatch_redis_fallbacks",
        "Failed Redis requests that this node decided with its own limits instead.",
        stats.fallbacks,
    )?;
    s.counter(
        "tool_dispatch_redis_shed_locally",
        "Calls refused by the local pre-check without a Redis round trip.",
        stats.shed_locally,
    )?;
    s.counters(
        "tool_dispatch_redis_log_frames",
        "Run log frames sent to Redis Streams, by result (recorded, or failed: Redis unreachable).",
        [
            ("recorded", stats.log_appends),
            ("failed", stats.log_failures),
        ]
        .map(|(r, n)| ([("result", r)], n)),
    )
}

#[cfg(feature = "axum")]
impl crate::ws::WsServer {
    /// Adds the WebSocket session's series to `registry`, read at each scrape:
    /// `tool_dispatch_ws_sessions_open` (connections served now),
    /// `tool_dispatch_ws_sessions_total`, `tool_dispatch_ws_messages_total` (client
    /// messages read), `tool_dispatch_ws_error_frames_total`,
    /// `tool_dispatch_ws_resumes_total` (resumes answered with `resumed`),
    /// `tool_dispatch_ws_resyncs_total{reason}` (`resync_required` frames sent) and
    /// `tool_dispatch_ws_closed_total{reason}` (connections the server closed:
    /// `not_reading`, `idle`, `protocol`). The registry does not keep the server alive.
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(
            registry,
            "tool-dispatch websocket session",
            self.stats_reader(),
            read_ws,
        );
    }
}

#[cfg(feature = "axum")]
fn read_ws<F: Fn() -> crate::ws::WsStats>(stats: &F, s: &mut Series<'_>) -> fmt::Result {
    let stats = stats();
    s.gauge(
        "tool_dispatch_ws_sessions_open",
        "WebSocket connections being served now.",
        stats.sessions_open,
    )?;
    s.counter(
        "tool_dispatch_ws_sessions",
        "WebSocket connections served.",
        stats.sessions,
    )?;
    s.counter(
        "tool_dispatch_ws_messages",
        "Client messages read on WebSocket connections.",
        stats.messages_in,
    )?;
    s.counter(
        "tool_dispatch_ws_error_frames",
        "error frames sent to WebSocket clients (a malformed or refused message).",
        stats.error_frames,
    )?;
    s.counter(
        "tool_dispatch_ws_resumes",
        "Resumes of a run answered with resumed.",
        stats.resumes,
    )?;
    let r = stats.resyncs;
    s.counters(
        "tool_dispatch_ws_resyncs",
        "resync_required frames sent, by reason.",
        [
            ("truncated", r.truncated),
            ("unknown_run", r.unknown_run),
            ("epoch_changed", r.epoch_changed),
            ("unavailable", r.unavailable),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )?;
    s.counters(
        "tool_dispatch_ws_closed",
        "WebSocket connections the server closed, by reason (not_reading: let go for not reading; idle: nothing sent within the idle timeout; protocol: a protocol violation or an oversized message).",
        [
            ("not_reading", stats.let_go_not_reading),
            ("idle", stats.closed_idle),
            ("protocol", stats.closed_protocol),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )
}

#[cfg(feature = "mcp")]
impl crate::mcp::McpServer {
    /// Adds the MCP server's series to `registry`, read at each scrape:
    /// `tool_dispatch_mcp_requests_total{method}` (requests answered, by method;
    /// `other` for the rest), `tool_dispatch_mcp_errors_total{code}` (JSON-RPC errors
    /// answered), `tool_dispatch_mcp_sessions_open`, `tool_dispatch_mcp_sessions_total`,
    /// `tool_dispatch_mcp_refused_total{reason}` (`foreign_session`: a session that is
    /// not the user's; `duplicate_id`: an id still in flight) and
    /// `tool_dispatch_mcp_elicitations_total{event}` (approvals asked of a client:
    /// `asked`, `answered`, `late`, `withdrawn`, `input_required`). The registry does
    /// not keep the server alive.
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(
            registry,
            "tool-dispatch mcp server",
            self.stats_reader(),
            read_mcp,
        );
    }
}

#[cfg(feature = "mcp")]
fn read_mcp<F: Fn() -> crate::mcp::McpStats>(stats: &F, s: &mut Series<'_>) -> fmt::Result {
    let stats = stats();
    s.counters(
        "tool_dispatch_mcp_requests",
        "MCP requests answered, by method (other for methods the server does not name).",
        stats.requests.iter().map(|(m, n)| ([("method", *m)], *n)),
    )?;
    s.counters(
        "tool_dispatch_mcp_errors",
        "JSON-RPC errors answered by the MCP server, by code.",
        stats
            .errors
            .iter()
            .map(|(c, n)| ([("code", c.to_string())], *n)),
    )?;
    s.gauge(
        "tool_dispatch_mcp_sessions_open",
        "MCP sessions open now.",
        stats.sessions_open,
    )?;
    s.counter(
        "tool_dispatch_mcp_sessions",
        "MCP sessions opened.",
        stats.sessions_opened,
    )?;
    s.counters(
        "tool_dispatch_mcp_refused",
        "MCP requests refused, by reason (foreign_session: a session that is not the user's, answered as unknown; duplicate_id: an id still in flight).",
        [
            ("foreign_session", stats.foreign_session_requests),
            ("duplicate_id", stats.duplicate_request_ids),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )?;
    s.counters(
        "tool_dispatch_mcp_elicitations",
        "Approvals asked of MCP clients, by event (asked, answered: decided the call, late: after it was decided elsewhere, withdrawn, input_required: results sent).",
        [
            ("asked", stats.elicitations_asked),
            ("answered", stats.elicitations_answered),
            ("late", stats.elicitations_late),
            ("withdrawn", stats.elicitations_withdrawn),
            ("input_required", stats.input_required_results),
        ]
        .map(|(event, n)| ([("event", event)], n)),
    )
}
