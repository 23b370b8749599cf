//! One call in flight: its state ([`InFlight`]), every per-call type the steps pass
//! to each other, how it starts ([`InFlight::new`]) and the `Drop` that completes the
//! pair of a future dropped midway. The steps are methods on [`InFlight`], one file
//! each, called in order by [`pipeline`](super::pipeline).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use crate::approval::ApprovalWait;
use crate::call::{Arguments, ToolCall};
use crate::delivery::{Outbox, Pair, Role};
use crate::error::{CancelReason, DispatchError};
use crate::event::{ApprovalRecord, Event, Status, Timestamp};
use crate::json::cut;
use crate::redact::encoded_len;
use crate::registry::Entry;
use crate::sink::SinkError;
use crate::state::WithUser;
use crate::tool::CallScope;
use crate::user::UserContext;

/// How a call is admitted.
#[derive(Clone, Copy)]
pub(super) struct Admission {
    /// Whether the call counts in the metrics' totals.
    pub(super) counted: bool,
    /// Whether it may wait for a slot (up to the engine's `max_wait`) or for a
    /// person's approval.
    pub(super) may_wait: bool,
}

impl Admission {
    /// Every call made through a dispatcher.
    pub(super) const CALL: Admission = Admission {
        counted: true,
        may_wait: true,
    };
    /// The health probe: not counted, takes a slot now or reports busy.
    pub(super) const PROBE: Admission = Admission {
        counted: false,
        may_wait: false,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Phase {
    /// Nothing sent yet.
    Fresh,
    /// `tool_executing` delivered.
    Announced,
    /// `tool_executing` queued in the backlog, not confirmed.
    HandedOff,
    /// Counted; its completion sent or handed off.
    Done,
}

/// One call in flight. Whatever happens to the future that owns it, its `Drop`
/// completes the pair (as `cancelled`) if nothing else did.
pub(super) struct InFlight<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) outbox: &'a Arc<Outbox>,
    pub(super) user: &'a WithUser,
    /// A caller-chosen id already used by a call in flight of this user.
    pub(super) duplicate: Option<String>,
    pub(super) claimed: bool,
    pub(super) entry: Option<&'a Entry>,
    pub(super) admission: Admission,
    pub(super) start: Instant,
    pub(super) timeout: Duration,
    pub(super) deadline: Instant,
    pub(super) wall: Timestamp,
    pub(super) phase: Phase,
    /// The call waited somewhere (a slot, room in its sink, a policy that was not
    /// ready): its deadline may have passed before the body starts.
    pub(super) waited: bool,
    /// The ticket of a `tool_executing` that joined the outbox's backlog and is not
    /// confirmed yet: it will go out (or fail) even if this call's future is dropped,
    /// and the call's completion follows it (and is not sent if it failed).
    pub(super) opening: Option<Arc<Pair>>,
    /// What this call's events take besides their payload and texts, encoded (see
    /// [`header_bytes`]): computed once.
    pub(super) header: usize,
    /// The call's identity, cancellation and progress gate, shared with its tool.
    pub(super) scope: Arc<CallScope>,
    /// For a call that needed approval: how that went (boxed: most calls need none,
    /// and their future stays small).
    pub(super) approval: Option<Box<Approval>>,
    pub(super) span: tracing::Span,
}

/// A call that passed the synchronous checks: its tool, its arguments as the policy
/// and the events see them, and its body (not started).
pub(super) struct Prepared<'a, F> {
    pub(super) entry: &'a Entry,
    pub(super) args: Value,
    pub(super) body: F,
}

/// A call refused before it runs: the error, and the arguments its events show.
pub(super) struct Refusal {
    pub(super) error: DispatchError,
    pub(super) shown: Value,
}

/// Arguments after the depth check (a value too deep is already torn down).
pub(super) enum Args {
    Value(Value),
    Text(String),
    TooDeep,
}

/// What a call is started with.
pub(super) struct Start<'a> {
    pub(super) occurrence: Occurrence,
    pub(super) entry: Option<&'a Entry>,
    pub(super) tool: Arc<str>,
    pub(super) id: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) admission: Admission,
}

/// Whether a call's id appeared before in the same batch. A batch's calls run
/// concurrently, but one may end before the next starts; a repeated id is refused
/// whatever the timing, so the front end never sees two calls under one id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Occurrence {
    /// The id's first use.
    First,
    /// The id was used by an earlier call of the same batch.
    Repeat,
}

impl<'a> Start<'a> {
    /// How a call by name of `entry` starts (`None`: no tool has its name), and its
    /// arguments.
    pub(super) fn json(
        entry: Option<&'a Entry>,
        call: ToolCall,
        occurrence: Occurrence,
        admission: Admission,
    ) -> (Self, Arguments) {
        let ToolCall {
            id,
            name,
            arguments,
            timeout,
        } = call;
        let tool = match entry {
            Some(e) => Arc::clone(&e.name),
            None => Arc::from(name.chars().take(MAX_NAME_SHOWN).collect::<String>()),
        };
        let start = Start {
            occurrence,
            entry,
            tool,
            id,
            timeout,
            admission,
        };
        (start, arguments)
    }
}

/// Longest unknown tool name repeated in events and errors.
pub(super) const MAX_NAME_SHOWN: usize = 128;

/// Why `tool_executing` did not go out as confirmed.
pub(super) enum Unannounced {
    /// It is queued; the call stopped waiting (cancelled or out of time).
    HandedOff,
    /// The call was interrupted before it could even be queued.
    NotQueued,
    /// The sink refused it (counted).
    Failed(SinkError),
    /// The sink is full: it must wait in the backlog (boxed: this is the slow path,
    /// and the call's future stays small).
    Waiting(Box<Event>),
}

/// A `tool_completed` the sink could not take at once.
pub(super) struct Pending(pub(super) Event, pub(super) Role);

/// How a call ends, for its `tool_completed`.
pub(super) enum Ending<'e> {
    Success {
        result: Value,
        source: Source,
        /// Why `result` is `null` although the call succeeded.
        note: Option<String>,
    },
    Failure(&'e DispatchError),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Ran,
    Cache,
}

/// Why a call must wait for approval, and for how long.
pub(crate) struct Gate {
    pub(crate) reason: String,
    pub(crate) wait: Option<ApprovalWait>,
}

impl Gate {
    /// The tool's own requirement ([`ToolSettings::requires_approval`](crate::ToolSettings::requires_approval)).
    pub(super) fn of_tool(entry: &Entry) -> Option<Gate> {
        entry.settings.approval.as_ref().map(|reason| Gate {
            reason: reason.clone(),
            wait: None,
        })
    }
}

/// A call's approval so far.
pub(crate) struct Approval {
    /// What its `tool_completed` reports (`Withdrawn` until a decision).
    pub(crate) record: ApprovalRecord,
    /// When the call was let through: its slot wait counts from here.
    pub(crate) since: Instant,
}

impl<'a> InFlight<'a> {
    pub(super) fn new(
        inner: &'a Arc<Inner>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        start: Start<'a>,
    ) -> Self {
        inner.metrics.start();
        user.state.active.fetch_add(1, Relaxed);
        let (mut id, given) = inner.call_id(start.id);
        let (mut claimed, mut duplicate) = (false, None);
        if let Some(given) = given {
            if start.occurrence == Occurrence::First && user.state.claim_id(&given) {
                claimed = true;
            } else {
                duplicate = Some(cut(&given, 64));
                id = inner.generated_id();
            }
        }
        let timeout = start
            .timeout
            .or(start.entry.and_then(|e| e.settings.timeout))
            .unwrap_or(inner.config.default_timeout);
        let now = Instant::now();
        let span = if start.admission.counted {
            crate::trace::call_span(&start.tool, &id, &user.ctx.user_id)
        } else {
            tracing::Span::none()
        };
        let (cancel, user_cancel) = match &user.ctx.run_id {
            Some(run) => {
                let (run_token, user_token) = user.state.run_tokens(run);
                (run_token, Some(user_token))
            }
            None => (user.state.token(), None),
        };
        let header = header_bytes(&id, &start.tool, &user.ctx);
        let scope = Arc::new(CallScope {
            user: Arc::clone(&user.ctx),
            outbox: Arc::clone(outbox),
            blocking: Arc::clone(&inner.blocking),
            call_id: id,
            tool_name: start.tool,
            cancel,
            user_cancel,
            timeout,
            max_text: inner.max_text(),
            max_message_bytes: inner.redaction().room(header),
            max_depth: inner.config.max_depth,
            gate: Default::default(),
        });
        InFlight {
            inner,
            outbox,
            user,
            duplicate,
            claimed,
            entry: start.entry,
            admission: start.admission,
            start: now,
            timeout,
            deadline: crate::time::deadline(now, timeout),
            wall: Timestamp::now(),
            phase: Phase::Fresh,
            waited: false,
            opening: None,
            header,
            approval: None,
            scope,
            span,
        }
    }
}

impl Ending<'_> {
    pub(super) fn status(&self) -> Status {
        match self {
            Ending::Success { .. } => Status::Success,
            Ending::Failure(e) => e.status(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        // The caller dropped the future: complete the pair as cancelled, without
        // waiting (the outbox queues what the sink cannot take now). A call dropped
        // while it waited for approval leaves the shared store too.
        if self
            .approval
            .as_ref()
            .is_some_and(|a| a.record.decision == crate::event::ApprovalOutcome::Withdrawn)
        {
            self.forget_shared();
        }
        let err = DispatchError::Cancelled {
            reason: CancelReason::Dropped,
        };
        self.end_detached(&err);
    }
}

/// What an event of a call takes besides its payload and texts, encoded: the ids, the
/// field names, the timestamps, the status.
pub(super) fn header_bytes(call_id: &str, tool: &str, u: &UserContext) -> usize {
    /// Field names, type tag, timestamps, status, duration, flags, punctuation.
    const FIELDS: usize = 400;
    let ids = [
        Some(call_id),
        u.run_id.as_deref(),
        u.thread_id.as_deref(),
        Some(&*u.user_id),
        Some(tool),
    ];
    FIELDS + ids.into_iter().flatten().map(encoded_len).sum::<usize>()
}
