//! Wire events: what a user's WebSocket receives, as `type`-tagged JSON.
//!
//! Field names follow the system this library replaces (`tool_name`, `parameters`,
//! `run_id`, `thread_id`, `user_id`, `duration_ms`) so existing front ends keep working.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// One event on a user's stream.
///
/// ```
/// # use tool_dispatch::event::{Event, Status};
/// let json = r#"{"type":"tool_completed","call_id":"c1","run_id":null,"thread_id":null,
///   "user_id":"alice","tool_name":"echo","status":"success","duration_ms":1.5,
///   "result":{"ok":true},"error":null,"cached":false,"timestamp":"2026-11-21T08:00:00.012Z"}"#;
/// let Event::ToolCompleted(done) = serde_json::from_str(json)? else { unreachable!() };
/// assert_eq!(done.status, Status::Success);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A tool call is about to run (or was answered without running; see its completion).
    ToolExecuting(ToolExecuting),
    /// A tool call ended; `status` says how.
    ToolCompleted(ToolCompleted),
    /// A running tool reported progress.
    ToolProgress(ToolProgress),
    /// A call waits for its user's approval (after its `tool_executing`, before it
    /// runs); answer with [`Engine::resolve_approval`](crate::Engine::resolve_approval).
    ToolApprovalRequired(ToolApprovalRequired),
    /// A call's wait for approval ended (approved, rejected, expired or withdrawn),
    /// whoever answered and wherever: every view of the run learns the decision at
    /// once, before the call runs or ends.
    ToolApprovalResolved(ToolApprovalResolved),
    /// The agent started working on the user's request.
    AgentStarted(AgentEvent),
    /// The agent is thinking (a message for the user's screen).
    AgentThinking(AgentEvent),
    /// The agent finished the request.
    AgentCompleted(AgentEvent),
    /// The agent failed.
    AgentError(AgentEvent),
}

impl Event {
    /// The `call_id` of a tool event, `None` for agent events.
    pub fn call_id(&self) -> Option<&str> {
        match self {
            Event::ToolExecuting(e) => Some(&e.call_id),
            Event::ToolCompleted(e) => Some(&e.call_id),
            Event::ToolProgress(e) => Some(&e.call_id),
            Event::ToolApprovalRequired(e) => Some(&e.call_id),
            Event::ToolApprovalResolved(e) => Some(&e.call_id),
            _ => None,
        }
    }

    /// The user the event belongs to.
    pub fn user_id(&self) -> &str {
        match self {
            Event::ToolExecuting(e) => &e.user_id,
            Event::ToolCompleted(e) => &e.user_id,
            Event::ToolProgress(e) => &e.user_id,
            Event::ToolApprovalRequired(e) => &e.user_id,
            Event::ToolApprovalResolved(e) => &e.user_id,
            Event::AgentStarted(e)
            | Event::AgentThinking(e)
            | Event::AgentCompleted(e)
            | Event::AgentError(e) => &e.user_id,
        }
    }

    /// The wire name of the event (`"tool_executing"`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ToolExecuting(_) => "tool_executing",
            Event::ToolCompleted(_) => "tool_completed",
            Event::ToolProgress(_) => "tool_progress",
            Event::ToolApprovalRequired(_) => "tool_approval_required",
            Event::ToolApprovalResolved(_) => "tool_approval_resolved",
            Event::AgentStarted(_) => "agent_started",
            Event::AgentThinking(_) => "agent_thinking",
            Event::AgentCompleted(_) => "agent_completed",
            Event::AgentError(_) => "agent_error",
        }
    }
}

/// `tool_executing`: sent once per call, before the tool body runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolExecuting {
    /// Unique id of this call (the LLM's tool-call id when it gave one).
    pub call_id: Arc<str>,
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user.
    pub user_id: Arc<str>,
    /// The tool's name, as the model asked for it.
    pub tool_name: Arc<str>,
    /// The arguments, with sensitive keys redacted and long values truncated.
    pub parameters: Value,
    /// When the call started.
    pub timestamp: Timestamp,
}

/// `tool_completed`: sent exactly once per call, after its `tool_executing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCompleted {
    /// Same `call_id` as the call's `tool_executing`.
    pub call_id: Arc<str>,
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user.
    pub user_id: Arc<str>,
    /// The tool's name.
    pub tool_name: Arc<str>,
    /// How the call ended.
    pub status: Status,
    /// Wall time from dispatch to completion, in milliseconds.
    pub duration_ms: f64,
    /// The tool's result (truncated for the event), `null` unless `status` is success.
    pub result: Value,
    /// The model-safe error message, `null` on success.
    pub error: Option<String>,
    /// Whether the result came from the result cache without running the tool.
    #[serde(default)]
    pub cached: bool,
    /// For a call that needed approval: what was decided, and when. Absent otherwise.
    /// (Boxed: most calls need no approval, and every event stays small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Box<ApprovalRecord>>,
    /// When the call ended.
    pub timestamp: Timestamp,
}

/// `tool_approval_required`: a call waits for its user to approve it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolApprovalRequired {
    /// The call's id: what the decision names.
    pub call_id: Arc<str>,
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user who must decide.
    pub user_id: Arc<str>,
    /// The tool.
    pub tool_name: Arc<str>,
    /// The arguments, redacted and cut like `tool_executing`'s.
    pub parameters: Value,
    /// Why a person must decide (from the policy or the tool's settings).
    pub reason: String,
    /// When the call stops waiting and ends `approval_timeout`; `null` when it waits
    /// until a decision.
    pub expires_at: Option<Timestamp>,
    /// When the approval was requested.
    pub timestamp: Timestamp,
}

/// `tool_approval_resolved`: a call's wait for approval ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolApprovalResolved {
    /// The call's id.
    pub call_id: Arc<str>,
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user who was asked.
    pub user_id: Arc<str>,
    /// The tool.
    pub tool_name: Arc<str>,
    /// How the wait ended: `approved` (the call goes on), `rejected`, `expired` or
    /// `withdrawn` (it ends; its `tool_completed` follows).
    pub decision: ApprovalOutcome,
    /// The user's message with a rejection, cut like every event text.
    pub message: Option<String>,
    /// When the wait ended.
    pub timestamp: Timestamp,
}

/// What became of a call's approval request, in its `tool_completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalRecord {
    /// The decision.
    pub decision: ApprovalOutcome,
    /// When it was taken (or the wait ended).
    pub at: Timestamp,
}

/// How an approval request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApprovalOutcome {
    /// The user approved; the call went on.
    Approved,
    /// The user rejected it.
    Rejected,
    /// Nobody answered in time.
    Expired,
    /// The call stopped waiting first (cancelled, shut down, dropped).
    Withdrawn,
}

impl ApprovalOutcome {
    /// The wire name (`approved`, `rejected`, `expired`, `withdrawn`).
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalOutcome::Approved => "approved",
            ApprovalOutcome::Rejected => "rejected",
            ApprovalOutcome::Expired => "expired",
            ApprovalOutcome::Withdrawn => "withdrawn",
        }
    }
}

/// `tool_progress`: a running tool's own report, delivered without blocking it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolProgress {
    /// The call reporting progress.
    pub call_id: Arc<str>,
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user.
    pub user_id: Arc<str>,
    /// The tool's name.
    pub tool_name: Arc<str>,
    /// Fraction done, clamped to `0.0..=1.0`.
    pub progress: f64,
    /// A short message for the user's screen.
    pub message: Option<String>,
    /// When the progress was reported.
    pub timestamp: Timestamp,
}

/// Payload of the agent lifecycle events (`agent_started`, `agent_thinking`,
/// `agent_completed`, `agent_error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEvent {
    /// The agent run.
    pub run_id: Option<Arc<str>>,
    /// The conversation thread.
    pub thread_id: Option<Arc<str>>,
    /// The user.
    pub user_id: Arc<str>,
    /// A message for the user's screen (thinking text, error message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The agent's result, for `agent_completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// When it happened.
    pub timestamp: Timestamp,
}

/// An agent lifecycle update pushed by agent code with
/// [`Dispatcher::notify`](crate::Dispatcher::notify); the dispatcher adds the ids.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentUpdate {
    /// `agent_started`, with an optional message.
    Started(Option<String>),
    /// `agent_thinking`, with what to show.
    Thinking(String),
    /// `agent_completed`, with the agent's result.
    Completed(Value),
    /// `agent_error`, with a message for the user.
    Error(String),
}

/// How a tool call ended; the `status` field of `tool_completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The tool returned a result.
    Success,
    /// The tool returned an error (wire name `error`).
    #[serde(rename = "error")]
    ToolFailed,
    /// The arguments did not fit the tool's input type.
    InvalidInput,
    /// No tool has that name.
    UnknownTool,
    /// The permission policy refused the call.
    Denied,
    /// A person refused the call when asked to approve it.
    Rejected,
    /// Nobody approved the call within its approval window; it was not run.
    ApprovalTimeout,
    /// The user is over their rate limit.
    RateLimited,
    /// No concurrency slot became free within the wait bound.
    Busy,
    /// The tool ran past its timeout and was stopped.
    Timeout,
    /// The tool panicked; the panic was contained.
    Panicked,
    /// The call was cancelled (caller dropped it, `cancel_user`, or shutdown).
    Cancelled,
    /// The engine is shutting down and accepts no new calls.
    Unavailable,
    /// `tool_executing` could not be delivered, so the tool was not run.
    Undelivered,
}

impl Status {
    /// Every status, in the order metrics report them.
    pub const ALL: [Status; 14] = [
        Status::Success,
        Status::ToolFailed,
        Status::InvalidInput,
        Status::UnknownTool,
        Status::Denied,
        Status::Rejected,
        Status::ApprovalTimeout,
        Status::RateLimited,
        Status::Busy,
        Status::Timeout,
        Status::Panicked,
        Status::Cancelled,
        Status::Unavailable,
        Status::Undelivered,
    ];

    /// The wire name (`"success"`, `"rate_limited"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::ToolFailed => "error",
            Status::InvalidInput => "invalid_input",
            Status::UnknownTool => "unknown_tool",
            Status::Denied => "denied",
            Status::Rejected => "rejected",
            Status::ApprovalTimeout => "approval_timeout",
            Status::RateLimited => "rate_limited",
            Status::Busy => "busy",
            Status::Timeout => "timeout",
            Status::Panicked => "panicked",
            Status::Cancelled => "cancelled",
            Status::Unavailable => "unavailable",
            Status::Undelivered => "undelivered",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A UTC instant, serialized as RFC 3339 with milliseconds (`2026-11-21T08:00:00.012Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }

    /// This instant moved forward by `d`; a `d` too large to represent gives the
    /// latest instant this platform can (never a panic).
    pub fn after(self, d: Duration) -> Self {
        if let Some(t) = self.0.checked_add(d) {
            return Timestamp(t);
        }
        // Binary search for the largest addable duration.
        let (mut lo, mut hi) = (Duration::ZERO, d);
        while hi.saturating_sub(lo) > Duration::from_secs(1) {
            let mid = lo + (hi - lo) / 2;
            if self.0.checked_add(mid).is_some() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Timestamp(self.0 + lo)
    }

    /// The underlying system time.
    pub fn as_system_time(self) -> SystemTime {
        self.0
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t)
    }
}

// Civil-from-days and days-from-civil, after Howard Hinnant's algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let millis: i64 = match self.0.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        let secs = millis.div_euclid(1000);
        let ms = millis.rem_euclid(1000);
        let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        )
    }
}

/// A timestamp string that is not `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp `{0}` is not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.fff]Z)")]
pub struct TimestampError(String);

impl std::str::FromStr for Timestamp {
    type Err = TimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TimestampError(s.chars().take(64).collect());
        let b = s.as_bytes();
        if b.len() < 20 || !s.is_ascii() || !s.ends_with('Z') {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().map_err(|_| bad());
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return Err(bad());
        }
        let frac = &s[19..s.len() - 1];
        let nanos = match frac.strip_prefix('.') {
            None if frac.is_empty() => 0,
            Some(digits) if (1..=9).contains(&digits.len()) => {
                let n: u32 = digits.parse().map_err(|_| bad())?;
                n * 10u32.pow(9 - digits.len() as u32)
            }
            _ => return Err(bad()),
        };
        let days = days_from_civil(i64::from(y), mo, d);
        let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
        let secs = u64::try_from(secs).map_err(|_| bad())?;
        Ok(Timestamp(UNIX_EPOCH + Duration::new(secs, nanos)))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// On the wire: a string in RFC 3339 form (`date-time`).
impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips() {
        for s in [
            "2026-11-21T08:00:00.012Z",
            "1970-01-01T00:00:00.000Z",
            "2000-02-29T23:59:59.999Z",
        ] {
            let t: Timestamp = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        let t: Timestamp = "2026-11-21T08:00:00Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-21T08:00:00.000Z");
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-21 08:00:00Z",
            "yesterday at noon!!",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn status_names_match_serde() {
        for s in Status::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), Value::from(s.as_str()));
            assert_eq!(Status::ALL[s.index()], s);
        }
    }
}
