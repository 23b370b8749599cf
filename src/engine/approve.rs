//! The approval step: for a call that needs its user's yes, between the rate check and
//! the slots. `tool_executing` goes out, then `tool_approval_required`; the call waits
//! (holding no slot) for the decision, the end of its window, or its cancellation.
//! Approved, it takes its own slot and its timeout starts; otherwise it ends with its
//! own status. Every ending keeps the pair and counts once.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Claim;
use super::in_flight::{Approval, Gate, InFlight, Refusal, Unannounced};
use crate::approval::{ApprovalWait, Verdict};
use crate::delivery::{Delivered, NotSent, Now, Role, Watch};
use crate::error::{DispatchError, LimitScope};
use crate::event::{
    ApprovalOutcome, ApprovalRecord, Event, Timestamp, ToolApprovalRequired, ToolApprovalResolved,
};
use crate::limits::{Permit, Scope};
use crate::redact::encoded_len;
use crate::registry::Entry;
use crate::trace::{self, Wait};

/// How long a call out of time waits for an answer another node already took.
const IN_FLIGHT_ANSWER: Duration = Duration::from_secs(2);

impl<'a> InFlight<'a> {
    /// Announces the call, asks its user, waits, and takes the user's own slot once
    /// approved. On any other ending the call is ended here (pair sent, counted) and
    /// its error returned.
    pub(super) async fn approved(
        &mut self,
        entry: &'a Entry,
        gate: Gate,
        args: Value,
    ) -> Result<Permit<'a>, DispatchError> {
        let inner = self.inner;
        let cap = inner.config.max_pending_approvals;
        let Some(mut waiting) =
            inner
                .approvals
                .wait(&self.user.ctx.user_id, &self.scope.call_id, cap)
        else {
            let error = DispatchError::Busy {
                scope: LimitScope::Approvals,
                waited: self.start.elapsed(),
            };
            return Err(self.refuse(Refusal { error, shown: args }).await);
        };
        let announced = match self.announce_now(args.clone()) {
            Ok(()) => Ok(()),
            Err(Unannounced::Waiting(ev)) => self.announce(*ev).await,
            Err(u) => Err(u),
        };
        if let Err(u) = announced {
            return Err(self.unannounced(u).await);
        }

        let window = gate
            .wait
            .or(entry.settings.approval_wait)
            .unwrap_or(inner.config.approval_wait);
        let now = Instant::now();
        let expires = match window {
            ApprovalWait::Within(d) => Some(crate::time::deadline(now, d)),
            ApprovalWait::Forever => None,
        };
        let wall = self.wall.after(now.saturating_duration_since(self.start));
        self.approval = Some(Box::new(Approval {
            record: ApprovalRecord {
                decision: ApprovalOutcome::Withdrawn,
                at: wall,
            },
            since: now,
        }));
        // The reason takes at most half of what the request has beside its header;
        // the arguments get the rest.
        let r = inner.redaction();
        let header = self.header_bytes();
        let reason = r.fit(&gate.reason, header + r.room(header) / 2);
        let expires_at = expires.map(|e| wall.after(e.saturating_duration_since(now)));
        let request = self.approval_request(args, reason, expires_at, wall);
        let (user, call) = (
            Arc::clone(&self.user.ctx.user_id),
            Arc::clone(&self.scope.call_id),
        );
        // With other nodes, the shared store learns where the call waits before the
        // request goes out, so an answer given anywhere finds it.
        if let Some(peers) = &inner.peers {
            let ttl = match window {
                ApprovalWait::Within(d) => d.saturating_add(Duration::from_secs(60)),
                ApprovalWait::Forever => Duration::from_secs(86_400),
            };
            tokio::select! {
                biased;
                () = self.scope.cancel.cancelled() => {}
                () = peers.pending(&user, &call, ttl) => {}
            }
        }
        if self.scope.cancel.is_cancelled() {
            waiting.withdraw();
            self.forget_shared();
            return Err(self.end_with(self.interruption(), Ok(())).await);
        }
        if let Err(error) = self.request(request).await {
            self.forget_shared();
            return Err(self.end_with(error, Ok(())).await);
        }

        self.waited = true;
        let verdict = tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => {
                waiting.withdraw();
                self.forget_shared();
                return Err(self.end_with(self.interruption(), Ok(())).await);
            }
            v = trace::waiting(Wait::Approval, waiting.decision()) => Some(v),
            () = sleep_until(expires) => match &inner.peers {
                None => waiting.withdraw(),
                // Out of time: take the call back from the shared store first. If
                // someone else took it, their answer is on its way: wait for it a
                // moment, so that an answer that was accepted is never lost.
                Some(peers) => match peers.claim(&user, &call).await {
                    Claim::Here | Claim::Unreachable => waiting.withdraw(),
                    Claim::Nobody | Claim::Elsewhere(_) => {
                        match tokio::time::timeout(IN_FLIGHT_ANSWER, waiting.decision()).await {
                            Ok(v) => Some(v),
                            Err(_) => waiting.withdraw(),
                        }
                    }
                },
            },
        };
        drop(waiting);
        let tool = entry.name.to_string();
        let said = match &verdict {
            Some(Verdict::Reject { message }) => message.clone(),
            _ => None,
        };
        let (outcome, ending) = match verdict {
            Some(Verdict::Approve) => (ApprovalOutcome::Approved, None),
            Some(Verdict::Reject { message }) => (
                ApprovalOutcome::Rejected,
                Some(DispatchError::Rejected { tool, message }),
            ),
            None => {
                let after = match window {
                    ApprovalWait::Within(d) => d,
                    ApprovalWait::Forever => Duration::MAX,
                };
                let error = DispatchError::ApprovalTimeout { tool, after };
                (ApprovalOutcome::Expired, Some(error))
            }
        };
        let now = Instant::now();
        if let Some(a) = self.approval.as_mut() {
            a.record = ApprovalRecord {
                decision: outcome,
                at: self.wall.after(now.saturating_duration_since(self.start)),
            };
            a.since = now;
        }
        self.resolved(outcome, said).await;
        if let Some(error) = ending {
            return Err(self.end_with(error, Ok(())).await);
        }
        // The tool's own time starts now.
        self.deadline = crate::time::deadline(now, self.timeout);
        let slot = match self.slot_now(Scope::User(&self.user.state)) {
            Ok(p) => Ok(p),
            Err(scope) => self.wait_slot(scope, LimitScope::User).await,
        };
        match slot {
            Ok(p) => Ok(p),
            Err(error) => Err(self.end_with(error, Ok(())).await),
        }
    }

    /// Removes this call from the shared store (without waiting), when it stops
    /// waiting for any other reason than an answer (its future dropped included).
    pub(super) fn forget_shared(&self) {
        if let Some(peers) = &self.inner.peers {
            peers.forget(&self.user.ctx.user_id, &self.scope.call_id);
        }
    }

    /// Tells the user's views how the wait ended (`tool_approval_resolved`), in order
    /// before anything else of the call. It is news, not a question: a failure is
    /// counted by the outbox and the call goes on; a cancelled call stops waiting
    /// for room and leaves it queued.
    async fn resolved(&mut self, decision: ApprovalOutcome, message: Option<String>) {
        let u = &self.user.ctx;
        let message = message.map(|m| self.inner.redaction().fit(&m, self.header_bytes()));
        let at = Instant::now().saturating_duration_since(self.start);
        let ev = Event::ToolApprovalResolved(ToolApprovalResolved {
            call_id: Arc::clone(&self.scope.call_id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.scope.tool_name),
            decision,
            message,
            timestamp: self.wall.after(at),
        });
        let ev = match self.outbox.send_now(ev, &Role::Other) {
            Now::Sent | Now::Failed(_) => return,
            Now::Wait(ev) => ev,
        };
        let watch = Watch {
            cancel: Some(&self.scope.cancel),
            deadline: None,
        };
        let _ = self
            .outbox
            .deliver(ev, &Role::Other, watch, &mut None)
            .await;
    }

    /// Delivers `tool_approval_required`: if it cannot reach the user, nobody can
    /// decide, so the call ends `undelivered`.
    async fn request(&mut self, ev: Event) -> Result<(), DispatchError> {
        let ev = match self.outbox.send_now(ev, &Role::Other) {
            Now::Sent => return Ok(()),
            Now::Failed(e) => return Err(DispatchError::Undelivered(e)),
            Now::Wait(ev) => ev,
        };
        let watch = Watch {
            cancel: Some(&self.scope.cancel),
            deadline: None,
        };
        let mut no_ticket = None;
        let deliver = self.outbox.deliver(ev, &Role::Other, watch, &mut no_ticket);
        match trace::waiting(Wait::Delivery("tool_approval_required"), deliver).await {
            Ok(Delivered::Sent) => Ok(()),
            Err(NotSent::Sink(e)) => Err(DispatchError::Undelivered(e)),
            // Cancelled while it waited for room (it may still go out, before the
            // completion): the call ends as cancelled.
            Ok(Delivered::HandedOff) | Err(NotSent::Interrupted) => Err(self.interruption()),
        }
    }

    fn approval_request(
        &self,
        parameters: Value,
        reason: String,
        expires_at: Option<Timestamp>,
        timestamp: Timestamp,
    ) -> Event {
        let parameters = self.shown(parameters, encoded_len(&reason) + 64);
        let u = &self.user.ctx;
        Event::ToolApprovalRequired(ToolApprovalRequired {
            call_id: Arc::clone(&self.scope.call_id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.scope.tool_name),
            parameters,
            reason,
            expires_at,
            timestamp,
        })
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
