//! The call core. Every call, by name, typed, in a batch or the health probe, goes
//! through [`InFlight::execute`] in this order:
//!
//! 1. **prepare** (synchronous): shutting down? known tool? unique id? arguments
//!    within size and depth, and of the tool's input type?
//! 2. **admit**: policy, rate, one of the user's own slots;
//! 3. **announce**: `tool_executing` reaches the user's sink (or the tool never runs);
//! 4. the **shared slots** (per tool, global), then the **cache**;
//! 5. **run**: the body under the call's deadline and cancellation, panics contained;
//! 6. **finish**: the shared slots are released, the cache is filled, then
//!    `tool_completed` is delivered.
//!
//! A refused call ends in one place ([`InFlight::refuse`]). Every wait (policy, slot,
//! sink, cache follower, body) watches the call's deadline and cancellation. No shared
//! slot is held while a call waits on its user's sink: one user's stuck socket can only
//! hold that user's own slots. Whatever happens to the future, `Drop` completes the pair.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use super::approve::{Approval, Gate};
use super::codec::{Codec, Ran, store};
use super::ending::{Ending, Pending, Source, Unannounced};
use super::prepare::{Prepared, Refusal};
use crate::cache::{Key, Leader, Lookup};
use crate::call::ToolOutput;
use crate::contain::{Contained, panic_message};
use crate::delivery::Outbox;
use crate::error::{CancelReason, DispatchError, LimitScope};
use crate::event::{Status, Timestamp};
use crate::json::cut;
use crate::limits::{NoSlot, Permit, RateCheck, RateRefusal, Scope};
use crate::policy::{Decision, PolicyError, PolicyRequest, ScopePolicy};
use crate::registry::Entry;
use crate::state::WithUser;
use crate::tool::{CallScope, ToolError};

/// The error a refused rate check ends the call with.
fn refused(r: RateRefusal) -> DispatchError {
    match r {
        RateRefusal::Limited(retry_after) => DispatchError::RateLimited { retry_after },
        RateRefusal::Unreachable { retry_after } => {
            DispatchError::LimitsUnavailable { retry_after }
        }
    }
}

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
    /// `tool_executing` joined the outbox's backlog (so it will go out even if this
    /// call's future is dropped before the outbox answers).
    pub(super) opening_queued: bool,
    /// The call's identity, cancellation and progress gate, shared with its tool.
    pub(super) scope: Arc<CallScope>,
    /// For a call that needed approval: how that went (boxed: most calls need none,
    /// and their future stays small).
    pub(super) approval: Option<Box<Approval>>,
    pub(super) span: tracing::Span,
}

impl<'a> InFlight<'a> {
    pub(super) async fn execute<C, F>(
        &mut self,
        p: Prepared<'a, F>,
    ) -> Result<ToolOutput<C::Out>, DispatchError>
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        // Each step answers at once when nothing has to wait (the common case) and
        // awaits only when something does; those waits are boxed, so the future of a
        // call that waits for nothing stays small.
        // Blocks keep each step's temporaries out of the later steps' state.
        let Prepared { entry, args, body } = p;
        let user: &'a WithUser = self.user;
        let gate = {
            let decided = match self.policy_now(entry, &args) {
                Some(d) => d,
                None => Box::pin(self.ask_policy(entry, &args)).await,
            };
            let gate = decided.and_then(|gate| self.rate().map(|()| gate));
            // Nobody can approve the health probe: a policy that asks is a denial.
            let gate = match gate {
                Ok(Some(_)) if !self.admission.may_wait => Err(DispatchError::Denied {
                    tool: entry.name.to_string(),
                    missing_scopes: Vec::new(),
                    reason: Some("the policy asks for an approval nobody can give".into()),
                }),
                other => other,
            };
            match gate {
                Ok(gate) => gate.or_else(|| Gate::of_tool(entry).map(Box::new)),
                Err(error) => {
                    return Err(Box::pin(self.refuse(Refusal { error, shown: args })).await);
                }
            }
        };
        let key = entry.settings.cache_ttl.and_then(|ttl| {
            let user =
                (!entry.settings.user_independent).then(|| Arc::clone(&self.user.ctx.user_id));
            Key::new(user, entry.index, &args).map(|k| (k, ttl))
        });
        let own_slot = match gate {
            // Approval first, holding no slot; `tool_executing` goes out before the
            // request, so every outcome of the wait has its pair.
            Some(gate) => Box::pin(self.approved(entry, *gate, args)).await?,
            None => {
                let slot = match self.slot_now(Scope::User(&user.state)) {
                    Ok(p) => Ok(p),
                    Err(scope) => Box::pin(self.wait_slot(scope, LimitScope::User)).await,
                };
                let own_slot = match slot {
                    Ok(p) => p,
                    Err(error) => {
                        return Err(Box::pin(self.refuse(Refusal { error, shown: args })).await);
                    }
                };
                let announced = match self.announce_now(args) {
                    Ok(()) => Ok(()),
                    Err(Unannounced::Waiting(ev)) => Box::pin(self.announce(*ev)).await,
                    Err(u) => Err(u),
                };
                if let Err(u) = announced {
                    return Err(Box::pin(self.unannounced(u)).await);
                }
                own_slot
            }
        };
        let shared = {
            let shared = match self.shared_slots_now(entry) {
                Ok(s) => Ok(s),
                Err(()) => Box::pin(self.shared_slots(entry)).await,
            };
            match shared {
                Ok(s) => s,
                Err(e) => return Err(Box::pin(self.end_with(e, Ok(()))).await),
            }
        };
        let (ran, leader) = match key {
            None => (
                self.run(entry, async move { body.await.map(Ran::Fresh) })
                    .await,
                None,
            ),
            Some(key) => Box::pin(self.run_cached::<C, F>(entry, key, body)).await,
        };
        drop(shared); // released before the completion waits on the user's sink
        let (out, pending) = self.finish::<C>(entry, ran, leader);
        if let Some(p) = pending {
            Box::pin(self.complete_later(p)).await;
        }
        drop(own_slot);
        out
    }

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

    /// The decision when it needs no waiting: the default [`ScopePolicy`]. `None`
    /// when a custom policy must be asked.
    fn policy_now(
        &self,
        entry: &Entry,
        args: &Value,
    ) -> Option<Result<Option<Box<Gate>>, DispatchError>> {
        if self.inner.policy.is_some() || !self.inner.limiter.answers_now() {
            return None;
        }
        Some(self.scope_policy(entry, args))
    }

    fn scope_policy(
        &self,
        entry: &Entry,
        args: &Value,
    ) -> Result<Option<Box<Gate>>, DispatchError> {
        let req = PolicyRequest {
            user: &self.user.ctx,
            tool: &entry.def,
            settings: &entry.settings,
            arguments: args,
        };
        self.decided(entry, Ok(ScopePolicy::decide(&req)))
    }

    /// The admission that must wait: the custom policy (or the default one), then,
    /// with a limiter shared by several processes, its rate check; each under the
    /// call's deadline and cancellation.
    async fn ask_policy(
        &mut self,
        entry: &Entry,
        args: &Value,
    ) -> Result<Option<Box<Gate>>, DispatchError> {
        let gate = match self.inner.policy.is_some() {
            true => self.ask_custom_policy(entry, args).await?,
            false => self.scope_policy(entry, args)?,
        };
        let inner: &'a Arc<Inner> = self.inner;
        let user: &'a WithUser = self.user;
        if inner.limiter.answers_now() {
            return Ok(gate); // the rate is checked after this, with the sync path's
        }
        let answer = match inner.limiter.rate(&user.state, self.start) {
            RateCheck::Now(r) => return r.map(|()| gate).map_err(refused),
            RateCheck::Later(answer) => answer,
        };
        self.waited = true;
        tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => Err(self.interruption()),
            () = tokio::time::sleep_until(self.deadline) => Err(self.interruption()),
            r = answer => r.map(|()| gate).map_err(refused),
        }
    }

    /// Asks the custom policy, under the call's deadline and cancellation; a policy
    /// that errs or panics denies (fails closed).
    async fn ask_custom_policy(
        &mut self,
        entry: &Entry,
        args: &Value,
    ) -> Result<Option<Box<Gate>>, DispatchError> {
        let Some(policy) = &self.inner.policy else {
            return Ok(None);
        };
        let req = PolicyRequest {
            user: &self.user.ctx,
            tool: &entry.def,
            settings: &entry.settings,
            arguments: args,
        };
        let panicked = || Err(PolicyError("the policy panicked".into()));
        let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| policy.check(req)));
        let Ok(fut) = check else {
            return Err(self.denied(entry, panicked()));
        };
        self.waited = true;
        let answer = tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => None,
            () = tokio::time::sleep_until(self.deadline) => None,
            r = Contained::new(fut) => Some(r),
        };
        match answer {
            None => Err(self.interruption()),
            Some(Ok(d)) => self.decided(entry, d),
            Some(Err(_)) => self.decided(entry, panicked()),
        }
    }

    /// What a policy's answer means for the call: go on, go on once approved, or
    /// refuse.
    fn decided(
        &self,
        entry: &Entry,
        decision: Result<Decision, PolicyError>,
    ) -> Result<Option<Box<Gate>>, DispatchError> {
        match decision {
            Ok(Decision::Allow) => Ok(None),
            Ok(Decision::RequireApproval { reason, wait }) => {
                Ok(Some(Box::new(Gate { reason, wait })))
            }
            d => Err(self.denied(entry, d)),
        }
    }

    /// The rate check of a limiter that answers at once; a shared limiter's was
    /// awaited in [`ask_policy`](Self::ask_policy) already.
    fn rate(&self) -> Result<(), DispatchError> {
        if !self.inner.limiter.answers_now() {
            return Ok(());
        }
        match self.inner.limiter.rate(&self.user.state, self.start) {
            RateCheck::Now(r) => r.map_err(refused),
            RateCheck::Later(_) => Ok(()), // not from a limiter that answers now
        }
    }

    pub(super) fn denied(
        &self,
        entry: &Entry,
        decision: Result<Decision, PolicyError>,
    ) -> DispatchError {
        let max = self.inner.max_text();
        let (missing_scopes, reason) = match decision {
            Ok(Decision::Deny {
                missing_scopes,
                reason,
            }) => (missing_scopes, reason.map(|r| cut(&r, max))),
            Ok(_) => (Vec::new(), None),
            Err(e) => {
                tracing::warn!(call_id = %self.scope.call_id, error = %e, "policy error; call denied");
                (Vec::new(), Some("permission check failed".to_owned()))
            }
        };
        DispatchError::Denied {
            tool: entry.name.to_string(),
            missing_scopes,
            reason,
        }
    }

    /// A slot of `scope` if one is free now; the scope back when it must be waited for.
    pub(super) fn slot_now(&self, scope: Scope<'a>) -> Result<Permit<'a>, Scope<'a>> {
        let inner: &'a Arc<Inner> = self.inner;
        inner.limiter.try_slot(&scope).ok_or(scope)
    }

    /// Waits for a slot up to the engine's `max_wait` (the probe does not wait), the
    /// call's deadline and its cancellation.
    pub(super) async fn wait_slot(
        &mut self,
        scope: Scope<'a>,
        which: LimitScope,
    ) -> Result<Permit<'a>, DispatchError> {
        let inner: &'a Arc<Inner> = self.inner;
        let limiter = &*inner.limiter;
        self.waited = true;
        let until = if self.admission.may_wait {
            let since = self.approval.as_ref().map_or(self.start, |a| a.since);
            let bound = crate::time::deadline(since, self.inner.config.limits.max_wait);
            bound.min(self.deadline)
        } else {
            Instant::now()
        };
        let got = tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => return Err(self.interruption()),
            p = limiter.slot(scope, until) => p,
        };
        match got {
            Ok(p) => Ok(p),
            Err(NoSlot::Unreachable { retry_after }) => {
                Err(DispatchError::LimitsUnavailable { retry_after })
            }
            Err(NoSlot::InTime) if self.admission.may_wait && Instant::now() >= self.deadline => {
                Err(self.interruption())
            }
            Err(NoSlot::InTime) => Err(DispatchError::Busy {
                scope: which,
                waited: self.start.elapsed(),
            }),
        }
    }

    /// The tool's and the global slot, if both are free now.
    fn shared_slots_now(&self, entry: &'a Entry) -> Result<(Option<Permit<'a>>, Permit<'a>), ()> {
        let tool = match &entry.limiter {
            Some(sem) => Some(self.slot_now(Scope::Tool(sem)).map_err(drop)?),
            None => None,
        };
        let global = self.slot_now(Scope::Global).map_err(drop)?;
        Ok((tool, global))
    }

    /// The tool's and the global slot, waiting for them.
    async fn shared_slots(
        &mut self,
        entry: &'a Entry,
    ) -> Result<(Option<Permit<'a>>, Permit<'a>), DispatchError> {
        let tool = match &entry.limiter {
            Some(sem) => Some(match self.slot_now(Scope::Tool(sem)) {
                Ok(p) => p,
                Err(scope) => self.wait_slot(scope, LimitScope::Tool).await?,
            }),
            None => None,
        };
        let global = match self.slot_now(Scope::Global) {
            Ok(p) => p,
            Err(scope) => self.wait_slot(scope, LimitScope::Global).await?,
        };
        Ok((tool, global))
    }

    /// Why a call that was waiting stops: cancelled, or out of time.
    pub(super) fn interruption(&self) -> DispatchError {
        if self.scope.cancel.is_cancelled() {
            let by_run = self.scope.user_cancel.as_ref();
            let reason = if self.inner.root.is_cancelled() {
                CancelReason::Shutdown
            } else if by_run.is_some_and(|user| !user.is_cancelled()) {
                CancelReason::Run
            } else {
                CancelReason::User
            };
            DispatchError::Cancelled { reason }
        } else {
            DispatchError::Timeout {
                tool: self.scope.tool_name.to_string(),
                after: self.timeout,
            }
        }
    }

    /// The body, or the cache: a hit, a follower of an identical running call, or
    /// the leader that will fill the entry.
    pub(super) async fn run_cached<C, F>(
        &mut self,
        entry: &Entry,
        (key, ttl): (Key, Duration),
        body: F,
    ) -> (
        Result<Ran<C::Out>, DispatchError>,
        Option<(Leader<'a>, Duration)>,
    )
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        let inner: &'a Arc<Inner> = self.inner;
        let cache = &inner.cache;
        let fresh = |body: F| async move { body.await.map(Ran::Fresh) };
        match cache.lookup(key, self.start) {
            Lookup::Hit(v) => match C::decode(&v) {
                Some(o) => (Ok(Ran::Cached(o, v)), None),
                None => (self.run(entry, fresh(body)).await, None),
            },
            Lookup::Lead(l) => (self.run(entry, fresh(body)).await, Some((l, ttl))),
            Lookup::Wait(rx, key) => {
                let (metrics, depth) = (&inner.metrics, inner.config.max_depth);
                let follow = async move {
                    match cache.follow(rx, key).await {
                        Ok(v) => match C::decode(&v) {
                            Some(o) => Ok(Ran::Cached(o, v)),
                            None => body.await.map(Ran::Fresh),
                        },
                        Err(leader) => {
                            let o = body.await?;
                            store::<C>(leader, ttl, C::json(&o, depth).ok(), metrics);
                            Ok(Ran::Fresh(o))
                        }
                    }
                };
                (self.run(entry, follow).await, None)
            }
        }
    }

    /// Runs the body under its timeout, with panic isolation and cancellation.
    pub(super) async fn run<O>(
        &self,
        entry: &Entry,
        body: impl Future<Output = Result<Ran<O>, ToolError>>,
    ) -> Result<Ran<O>, DispatchError> {
        // The timeout counts from dispatch: a call that spent it waiting must not
        // start its body at all.
        if self.scope.cancel.is_cancelled() || (self.waited && Instant::now() >= self.deadline) {
            return Err(self.interruption());
        }
        // The body's first poll needs neither a timer nor a cancellation waiter: most
        // tools finish in it. Only a body that does not gets them (boxed, so the
        // future of a call that waits for nothing stays small).
        let mut body = std::pin::pin!(Contained::new(body));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll(cx))).await;
        let r = match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => match Box::pin(self.wait_body(body.as_mut())).await {
                Some(r) => r,
                None => return Err(self.interruption()),
            },
        };
        let max = self.inner.max_text();
        match r {
            Err(panic) => {
                let detail = panic_message(&*panic);
                tracing::error!(call_id = %self.scope.call_id, tool = %entry.name, panic = %detail, "tool panicked");
                Err(DispatchError::Panicked {
                    tool: entry.name.to_string(),
                    detail,
                })
            }
            Ok(Err(e)) => Err(DispatchError::ToolFailed {
                tool: entry.name.to_string(),
                retryable: e.is_retryable(),
                message: cut(e.message(), max),
            }),
            Ok(Ok(ran)) => Ok(ran),
        }
    }

    /// The rest of a body that did not finish in its first poll: until it does, its
    /// deadline passes or the call is cancelled (`None`; the body is then dropped,
    /// still inside its containment).
    async fn wait_body<F: Future>(&self, body: std::pin::Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => None,
            r = tokio::time::timeout_at(self.deadline, body) => r.ok(),
        }
    }

    /// Fills the cache, then sends `tool_completed` (or returns it, when the sink
    /// must be waited for); the caller gets its value whatever the event can show.
    pub(super) fn finish<C: Codec>(
        &mut self,
        entry: &Entry,
        ran: Result<Ran<C::Out>, DispatchError>,
        leader: Option<(Leader<'a>, Duration)>,
    ) -> (Result<ToolOutput<C::Out>, DispatchError>, Option<Pending>) {
        let metrics = &self.inner.metrics;
        let (value, source, json) = match ran {
            Err(e) => {
                let pending = self.complete_now(Ending::Failure(&e));
                return (Err(e), pending);
            }
            Ok(Ran::Fresh(o)) => {
                if entry.settings.cache_ttl.is_some() {
                    metrics.cache_miss();
                }
                let json = C::json(&o, self.inner.config.max_depth);
                if let Some((l, ttl)) = leader {
                    store::<C>(l, ttl, json.as_ref().ok().cloned(), metrics);
                }
                (o, Source::Ran, json)
            }
            Ok(Ran::Cached(o, v)) => {
                metrics.cache_hit();
                (o, Source::Cache, Ok(Value::clone(&v)))
            }
        };
        let (result, note) = match json {
            Ok(mut j) => {
                self.inner
                    .redaction()
                    .apply(&mut j, &entry.settings.sensitive);
                (j, None)
            }
            Err(e) => {
                metrics.unserializable_result();
                (
                    Value::Null,
                    Some(format!("the result cannot be shown: {}", e.0)),
                )
            }
        };
        let pending = self.complete_now(Ending::Success {
            result,
            source,
            note,
        });
        let out = ToolOutput {
            call_id: Arc::clone(&self.scope.call_id),
            value,
            cached: source == Source::Cache,
        };
        (Ok(out), pending)
    }
}
