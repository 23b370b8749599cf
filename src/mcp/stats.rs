//! The MCP server's own counters: plain atomics, read by [`McpServer::stats`].
//!
//! [`McpServer::stats`]: super::McpServer::stats

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The methods counted one by one; anything else is `"other"`.
pub(super) const METHODS: [&str; 12] = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "notifications/cancelled",
    "other",
];

/// The JSON-RPC error codes counted one by one; anything else is counted under 0.
const CODES: [i32; 6] = [-32700, -32600, -32601, -32602, -32603, 0];

/// The counters one server (every session and request it serves) shares.
#[derive(Debug, Default)]
pub(super) struct Counters {
    requests: [AtomicU64; METHODS.len()],
    errors: [AtomicU64; CODES.len()],
    sessions_opened: AtomicU64,
    sessions_closed: AtomicU64,
    foreign_session: AtomicU64,
    duplicate_ids: AtomicU64,
    elicitations_asked: AtomicU64,
    elicitations_answered: AtomicU64,
    elicitations_late: AtomicU64,
    elicitations_withdrawn: AtomicU64,
    input_required: AtomicU64,
}

/// What [`Counters::elicitation`] records.
#[derive(Debug, Clone, Copy)]
pub(super) enum Elicitation {
    /// An approval was asked of the client.
    Asked,
    /// The client answered, and its answer decided the call.
    Answered,
    /// The client answered after the call was decided elsewhere.
    Late,
    /// The server took its question back (`notifications/cancelled`).
    Withdrawn,
    /// A 2026-07-28 client was sent an `input_required` result.
    InputRequired,
}

impl Counters {
    /// One request of `method`.
    pub(super) fn request(&self, method: &str) {
        let i = METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(METHODS.len() - 1);
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// One JSON-RPC error answered with `code`.
    pub(super) fn error(&self, code: i32) {
        let i = CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CODES.len() - 1);
        self.errors[i].fetch_add(1, Relaxed);
    }

    pub(super) fn session_opened(&self) {
        self.sessions_opened.fetch_add(1, Relaxed);
    }

    pub(super) fn session_closed(&self) {
        self.sessions_closed.fetch_add(1, Relaxed);
    }

    /// A request on a session that is not its user's (another user's, or none).
    pub(super) fn foreign_session(&self) {
        self.foreign_session.fetch_add(1, Relaxed);
    }

    /// A request refused because its id was in flight on its session.
    pub(super) fn duplicate_id(&self) {
        self.duplicate_ids.fetch_add(1, Relaxed);
    }

    pub(super) fn elicitation(&self, what: Elicitation) {
        let counter = match what {
            Elicitation::Asked => &self.elicitations_asked,
            Elicitation::Answered => &self.elicitations_answered,
            Elicitation::Late => &self.elicitations_late,
            Elicitation::Withdrawn => &self.elicitations_withdrawn,
            Elicitation::InputRequired => &self.input_required,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(super) fn snapshot(&self) -> McpStats {
        let opened = self.sessions_opened.load(Relaxed);
        let closed = self.sessions_closed.load(Relaxed);
        McpStats {
            requests: METHODS
                .iter()
                .zip(&self.requests)
                .map(|(m, n)| (*m, n.load(Relaxed)))
                .collect(),
            errors: CODES
                .iter()
                .zip(&self.errors)
                .map(|(c, n)| (*c, n.load(Relaxed)))
                .collect(),
            sessions_open: opened.saturating_sub(closed),
            sessions_opened: opened,
            foreign_session_requests: self.foreign_session.load(Relaxed),
            duplicate_request_ids: self.duplicate_ids.load(Relaxed),
            elicitations_asked: self.elicitations_asked.load(Relaxed),
            elicitations_answered: self.elicitations_answered.load(Relaxed),
            elicitations_late: self.elicitations_late.load(Relaxed),
            elicitations_withdrawn: self.elicitations_withdrawn.load(Relaxed),
            input_required_results: self.input_required.load(Relaxed),
        }
    }
}

/// A snapshot of an [`McpServer`](super::McpServer)'s counters, from
/// [`McpServer::stats`](super::McpServer::stats). Counts only grow, except
/// `sessions_open`.
///
/// ```
/// # fn f(server: &tool_dispatch::mcp::McpServer) {
/// let stats = server.stats();
/// let calls = stats.requests("tools/call");
/// let unknown_methods = stats.errors(-32601);
/// # let _ = (calls, unknown_methods); }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct McpStats {
    /// Requests answered, by method: the methods the server knows one by one
    /// (`initialize`, `ping`, `tools/list`, `tools/call`, the resource, prompt,
    /// completion methods it refuses, `notifications/cancelled`), every
    /// other method under `"other"`.
    pub requests: Vec<(&'static str, u64)>,
    /// JSON-RPC errors answered, by code: -32700, -32600, -32601, -32602, -32603,
    /// and every other code under 0.
    pub errors: Vec<(i32, u64)>,
    /// Sessions (protocol revisions with sessions, over HTTP) open now.
    pub sessions_open: u64,
    /// Sessions opened since the server started.
    pub sessions_opened: u64,
    /// Requests that named a session that is not their user's, answered as for an
    /// unknown session.
    pub foreign_session_requests: u64,
    /// Requests refused because their id was still in flight on their session.
    pub duplicate_request_ids: u64,
    /// Approvals asked of an MCP client (an `elicitation/create`, or an
    /// `input_required` result's question).
    pub elicitations_asked: u64,
    /// Client answers that decided their call.
    pub elicitations_answered: u64,
    /// Client answers that came after the call was decided elsewhere (the user's
    /// page, the approval window).
    pub elicitations_late: u64,
    /// Questions the server took back (`notifications/cancelled`) because the call
    /// was decided elsewhere.
    pub elicitations_withdrawn: u64,
    /// `input_required` results sent (revision 2026-07-28).
    pub input_required_results: u64,
}

impl McpStats {
    /// Requests answered for `method` (`"other"` for the rest).
    pub fn requests(&self, method: &str) -> u64 {
        self.requests
            .iter()
            .find(|(m, _)| *m == method)
            .map_or(0, |(_, n)| *n)
    }

    /// JSON-RPC errors answered with `code`.
    pub fn errors(&self, code: i32) -> u64 {
        self.errors
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}
