//! [`DispatchError`]: every way a dispatch can end without a result.

use std::time::Duration;

use crate::event::Status;
use crate::sink::SinkError;

/// Which concurrency limit had no free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitScope {
    /// The user's own concurrent-call limit.
    User,
    /// The engine-wide concurrent-call limit.
    Global,
    /// The tool's own concurrent-call limit.
    Tool,
    /// The user's limit of calls waiting for approval at once.
    Approvals,
}

impl std::fmt::Display for LimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitScope::User => "per-user",
            LimitScope::Global => "global",
            LimitScope::Tool => "per-tool",
            LimitScope::Approvals => "pending-approval",
        })
    }
}

/// Why a call was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// [`Engine::cancel_user`](crate::Engine::cancel_user) was called for this user.
    User,
    /// [`Engine::cancel_run`](crate::Engine::cancel_run) was called for the call's run.
    Run,
    /// The engine is shutting down and the grace period ran out.
    Shutdown,
    /// The caller dropped the dispatch future.
    Dropped,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CancelReason::User => "the user's calls were cancelled",
            CancelReason::Run => "the run was cancelled",
            CancelReason::Shutdown => "the service is shutting down",
            CancelReason::Dropped => "the caller went away",
        })
    }
}

/// Every way a dispatch can end without a result.
///
/// Each variant maps to one `tool_completed` [`Status`]; its `Display` is a short
/// sentence that is safe to give back to a language model (no internals, no panic
/// payloads), and [`is_retryable`](Self::is_retryable) says whether trying again can help.
///
/// ```
/// use tool_dispatch::{DispatchError};
/// use tool_dispatch::event::{Status};
/// let e = DispatchError::UnknownTool { name: "get_wether".into() };
/// assert_eq!(e.status(), Status::UnknownTool);
/// assert!(!e.is_retryable());
/// assert_eq!(e.to_string(), "unknown tool `get_wether`");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// No tool has this name.
    #[error("unknown tool `{name}`")]
    UnknownTool {
        /// The name that was asked for (cut to 128 characters).
        name: String,
    },
    /// The arguments do not fit the tool's input type.
    #[error("invalid arguments for `{tool}` at `{path}`: {message}")]
    InvalidInput {
        /// The tool.
        tool: String,
        /// JSON path of the offending value (`.` for the whole input).
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// The permission policy refused the call.
    #[error(
        "permission denied for `{tool}`{}",
        missing_text(missing_scopes, reason)
    )]
    Denied {
        /// The tool.
        tool: String,
        /// Scopes the user lacks (empty when a custom policy denied).
        missing_scopes: Vec<String>,
        /// The policy's reason, if it gave one.
        reason: Option<String>,
    },
    /// The user rejected the call when asked to approve it; it was not run.
    #[error(
        "the user rejected this call of `{tool}`; it was not run{}",
        message.as_deref().map(|m| format!(". Their message: {m}")).unwrap_or_default()
    )]
    Rejected {
        /// The tool.
        tool: String,
        /// What the user said, if anything.
        message: Option<String>,
    },
    /// Nobody approved the call within its window; it was not run.
    #[error(
        "`{tool}` was not run: nobody approved it within {:.0}s. This was not the user's decision",
        after.as_secs_f64()
    )]
    ApprovalTimeout {
        /// The tool.
        tool: String,
        /// The approval window that ran out.
        after: Duration,
    },
    /// The user is over their rate limit.
    #[error("rate limit reached; retry after {:.1}s", retry_after.as_secs_f64())]
    RateLimited {
        /// When a call would be admitted again.
        retry_after: Duration,
    },
    /// No concurrency slot became free within the wait bound.
    #[error("too many concurrent calls ({scope} limit); retry shortly")]
    Busy {
        /// Which limit was full.
        scope: LimitScope,
        /// How long the call waited.
        waited: Duration,
    },
    /// The tool ran past its timeout and was stopped.
    #[error("`{tool}` timed out after {:.1}s", after.as_secs_f64())]
    Timeout {
        /// The tool.
        tool: String,
        /// The timeout that applied.
        after: Duration,
    },
    /// The tool returned an error.
    #[error("`{tool}` failed: {message}")]
    ToolFailed {
        /// The tool.
        tool: String,
        /// The tool's own message.
        message: String,
        /// Whether the tool said a retry can help.
        retryable: bool,
    },
    /// The tool panicked; the panic was contained.
    #[error("`{tool}` failed unexpectedly")]
    Panicked {
        /// The tool.
        tool: String,
        /// The panic payload, for logs (not part of the model-facing message).
        detail: String,
    },
    /// The call was cancelled.
    #[error("call cancelled: {reason}")]
    Cancelled {
        /// Why.
        reason: CancelReason,
    },
    /// The engine is shutting down and accepts no new calls.
    #[error("the service is shutting down; no new calls are accepted")]
    Unavailable,
    /// The limits shared with other processes could not be checked and their policy
    /// is to fail closed; the tool was not run.
    #[error("the service cannot check its limits right now; retry after {:.1}s", retry_after.as_secs_f64())]
    LimitsUnavailable {
        /// When trying again makes sense.
        retry_after: Duration,
    },
    /// `tool_executing` could not be delivered, so the tool was not run.
    #[error("the user's event stream is unavailable; the tool was not run")]
    Undelivered(#[source] SinkError),
}

fn missing_text(missing: &[String], reason: &Option<String>) -> String {
    match (missing.is_empty(), reason) {
        (false, _) => format!(": missing scope {}", missing.join(", ")),
        (true, Some(r)) => format!(": {r}"),
        (true, None) => String::new(),
    }
}

impl DispatchError {
    /// The `tool_completed` status this error is reported with.
    pub fn status(&self) -> Status {
        match self {
            DispatchError::UnknownTool { .. } => Status::UnknownTool,
            DispatchError::InvalidInput { .. } => Status::InvalidInput,
            DispatchError::Denied { .. } => Status::Denied,
            DispatchError::Rejected { .. } => Status::Rejected,
            DispatchError::ApprovalTimeout { .. } => Status::ApprovalTimeout,
            DispatchError::RateLimited { .. } => Status::RateLimited,
            DispatchError::Busy { .. } => Status::Busy,
            DispatchError::Timeout { .. } => Status::Timeout,
            DispatchError::ToolFailed { .. } => Status::ToolFailed,
            DispatchError::Panicked { .. } => Status::Panicked,
            DispatchError::Cancelled { .. } => Status::Cancelled,
            DispatchError::Unavailable | DispatchError::LimitsUnavailable { .. } => {
                Status::Unavailable
            }
            DispatchError::Undelivered(_) => Status::Undelivered,
        }
    }

    /// Whether the same call, unchanged, may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            DispatchError::RateLimited { .. }
            | DispatchError::LimitsUnavailable { .. }
            | DispatchError::Busy { .. }
            | DispatchError::Timeout { .. } => true,
            DispatchError::ToolFailed { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// When a retry may be admitted, for rate limits.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DispatchError::RateLimited { retry_after }
            | DispatchError::LimitsUnavailable { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}
