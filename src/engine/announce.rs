//! Announcing and ending: a call's `tool_executing` and `tool_completed` (and the
//! events they are built from), counted once, whatever happens to it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;

use super::in_flight::{Ending, InFlight, Pending, Phase, Refusal, Source, Unannounced};
use crate::delivery::{Delivered, NotSent, Now, Role, Watch};
use crate::error::DispatchError;
use crate::event::{Event, Status, ToolCompleted, ToolExecuting};
#[cfg(feature = "otel")]
use crate::trace::Content;
use crate::trace::{Wait, waiting};

impl InFlight<'_> {
    /// Ends a call whose `tool_executing` did not go out as confirmed: undeliverable
    /// (the tool does not run), or interrupted while it waited for room.
    pub(super) async fn unannounced(&mut self, u: Unannounced) -> DispatchError {
        let error = match u {
            Unannounced::Failed(e) => {
                self.record(Status::Undelivered, self.start.elapsed());
                return DispatchError::Undelivered(e);
            }
            _ => self.interruption(),
        };
        self.end_with(error, Err(u)).await
    }

    /// Sends `tool_executing` if the sink takes it now; otherwise hands it back as
    /// [`Unannounced::Waiting`] for [`announce`](Self::announce). If it cannot be
    /// delivered the tool must not run.
    #[inline]
    pub(super) fn announce_now(&mut self, parameters: Value) -> Result<(), Unannounced> {
        match self
            .outbox
            .send_now(self.executing(parameters), &Role::Opens)
        {
            Now::Sent => {
                self.phase = Phase::Announced;
                Ok(())
            }
            Now::Failed(e) => Err(Unannounced::Failed(e)),
            Now::Wait(ev) => Err(Unannounced::Waiting(Box::new(ev))),
        }
    }

    /// Sends `tool_executing` through the backlog, waiting under the call's deadline
    /// and cancellation.
    pub(super) async fn announce(&mut self, ev: Event) -> Result<(), Unannounced> {
        self.waited = true;
        let watch = Watch {
            cancel: Some(&self.scope.cancel),
            deadline: Some(self.deadline),
        };
        let outbox = self.outbox;
        let deliver = outbox.deliver(ev, &Role::Opens, watch, &mut self.opening);
        match waiting(Wait::Delivery("tool_executing"), deliver).await {
            Ok(Delivered::Sent) => {
                self.phase = Phase::Announced;
                self.opening = None; // confirmed: its completion need not follow a ticket
                Ok(())
            }
            Ok(Delivered::HandedOff) => {
                self.phase = Phase::HandedOff;
                Err(Unannounced::HandedOff)
            }
            Err(NotSent::Interrupted) => Err(Unannounced::NotQueued),
            Err(NotSent::Sink(e)) => Err(Unannounced::Failed(e)),
        }
    }

    /// The one place a call is refused: its pair with the error's status.
    pub(super) async fn refuse(&mut self, r: Refusal) -> DispatchError {
        let announced = match self.announce_now(r.shown) {
            Err(Unannounced::Waiting(ev)) => self.announce(*ev).await,
            other => other,
        };
        self.end_with(r.error, announced).await
    }

    /// Ends the call with `err`, however far its `tool_executing` got. A refusal whose
    /// `tool_executing` could not be delivered keeps its own status.
    pub(super) async fn end_with(
        &mut self,
        err: DispatchError,
        announced: Result<(), Unannounced>,
    ) -> DispatchError {
        match announced {
            Ok(()) | Err(Unannounced::HandedOff) => self.complete(Ending::Failure(&err)).await,
            Err(Unannounced::NotQueued) => self.end_detached(&err),
            Err(Unannounced::Failed(_) | Unannounced::Waiting(_)) => {
                self.record(err.status(), self.start.elapsed())
            }
        }
        err
    }

    /// Sends `tool_completed` (counting first, so a slow sink cannot skew metrics).
    /// A call that stops waiting (cancelled) leaves it queued: it still goes out.
    pub(super) async fn complete(&mut self, ending: Ending<'_>) {
        if let Some(pending) = self.complete_now(ending) {
            self.complete_later(pending).await;
        }
    }

    /// Counts the call and sends its `tool_completed` if the sink takes it now;
    /// otherwise returns it for [`complete_later`](Self::complete_later).
    #[inline]
    pub(super) fn complete_now(&mut self, ending: Ending<'_>) -> Option<Pending> {
        let took = self.start.elapsed();
        let status = ending.status();
        let ev = self.completed(ending, took);
        self.record(status, took);
        let role = Role::Closes {
            opening: self.opening.clone(),
        };
        match self.outbox.send_now(ev, &role) {
            Now::Wait(ev) => Some(Pending(ev, role)),
            Now::Sent | Now::Failed(_) => None, // a refusal is counted
        }
    }

    /// Delivers a `tool_completed` the sink could not take at once. A call that stops
    /// waiting (cancelled) leaves it queued: it still goes out.
    pub(super) async fn complete_later(&mut self, Pending(ev, role): Pending) {
        let watch = Watch {
            cancel: Some(&self.scope.cancel),
            deadline: None,
        };
        let mut no_ticket = None;
        let deliver = self.outbox.deliver(ev, &role, watch, &mut no_ticket);
        let _ = waiting(Wait::Delivery("tool_completed"), deliver).await; // failures are counted there
    }

    /// Ends the call without waiting: its completion (and its `tool_executing`, if
    /// that never went out) handed to the outbox.
    pub(super) fn end_detached(&mut self, err: &DispatchError) {
        let never_sent = self.phase == Phase::Fresh && self.opening.is_none();
        let took = self.start.elapsed();
        let closing = self.completed(Ending::Failure(err), took);
        self.record(err.status(), took);
        let opening = never_sent.then(|| self.executing(Value::Null));
        let role = Role::Closes {
            opening: self.opening.clone(),
        };
        self.outbox.hand_off(opening, closing, role);
    }

    /// Counts the ended call once, and closes it to progress.
    pub(super) fn record(&mut self, status: Status, took: Duration) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        self.scope.end();
        let s = &self.user.state;
        if self.claimed {
            s.release_id(&self.scope.call_id);
        }
        if status != Status::Unavailable {
            s.finished.fetch_add(1, Relaxed);
        }
        if status != Status::Success {
            s.failed.fetch_add(1, Relaxed);
        }
        if status == Status::Cancelled {
            s.cancelled.fetch_add(1, Relaxed);
        }
        if let Some(a) = &self.approval {
            self.inner.metrics.approval(a.record.decision);
        }
        s.active.fetch_sub(1, Relaxed);
        let metrics = &self.inner.metrics;
        let left = if self.admission.counted {
            #[cfg(feature = "prometheus")]
            metrics.label(&self.user.ctx, status, self.entry.map(|e| e.index));
            metrics.end(status, self.entry.map(|e| e.index), took)
        } else {
            metrics.end_uncounted()
        };
        if left == 0 && !self.inner.accepting.load(Relaxed) {
            self.inner.idle.notify_waiters();
        }
        crate::trace::ended(&self.span, status, took);
    }

    /// The arguments as events show them: sensitive keys redacted, long values cut,
    /// the event within its size bound beside `text` more bytes of its own.
    #[inline]
    pub(super) fn shown(&self, mut parameters: Value, text: usize) -> Value {
        let sensitive = self.entry.map_or(&[][..], |e| &e.settings.sensitive);
        let others = self.header_bytes() + text;
        self.inner
            .redaction()
            .apply_beside(&mut parameters, sensitive, others);
        parameters
    }

    /// What an event of this call takes besides its payload and texts, encoded: the
    /// ids, the field names, the timestamps, the status.
    #[inline]
    pub(super) fn header_bytes(&self) -> usize {
        self.header
    }

    #[inline]
    pub(super) fn executing(&self, parameters: Value) -> Event {
        let parameters = self.shown(parameters, 0);
        #[cfg(feature = "otel")]
        if self.inner.config.trace_content {
            crate::trace::content(&self.span, Content::Arguments, &parameters);
        }
        let u = &self.user.ctx;
        Event::ToolExecuting(ToolExecuting {
            call_id: Arc::clone(&self.scope.call_id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.scope.tool_name),
            parameters,
            timestamp: self.wall,
        })
    }

    #[inline]
    pub(super) fn completed(&self, ending: Ending<'_>, took: Duration) -> Event {
        let u = &self.user.ctx;
        let status = ending.status();
        let (result, error, cached) = match ending {
            Ending::Success {
                result,
                source,
                note,
            } => (result, note, source == Source::Cache),
            Ending::Failure(e) => (Value::Null, Some(e.to_string()), false),
        };
        // The payload was fitted beside the header; a text (with a `null` result)
        // gets the same room.
        let r = self.inner.redaction();
        let error = error.map(|e| r.fit(&e, self.header_bytes()));
        #[cfg(feature = "otel")]
        if self.inner.config.trace_content && status == Status::Success {
            crate::trace::content(&self.span, Content::Result, &result);
        }
        Event::ToolCompleted(ToolCompleted {
            call_id: Arc::clone(&self.scope.call_id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.scope.tool_name),
            status,
            duration_ms: took.as_secs_f64() * 1e3,
            result,
            error,
            cached,
            approval: self.approval.as_ref().map(|a| Box::new(a.record)),
            timestamp: self.wall.after(took),
        })
    }
}
