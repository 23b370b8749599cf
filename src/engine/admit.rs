//! Admission: the policy (which may ask for the user's approval), the rate, and the
//! slots (the user's own, the tool's and the global one), each under the call's
//! deadline and cancellation; and why a waiting call stops. The rate and the user's
//! own slot are one question to the limiter ([`Limiter::admit`]), except for a call
//! that waits for its user's approval: its rate first, its slot once approved.
//!
//! [`Limiter::admit`]: crate::limits::Limiter::admit

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use super::in_flight::{Gate, InFlight};
use crate::contain::Contained;
use crate::error::{CancelReason, DispatchError, LimitScope};
use crate::json::cut;
use crate::limits::{Admit, NoSlot, NotAdmitted, Permit, RateCheck, RateRefusal, Scope};
use crate::policy::{Decision, PolicyError, PolicyRequest, ScopePolicy};
use crate::registry::Entry;
use crate::state::WithUser;

/// The error a refused rate check ends the call with.
fn refused(r: RateRefusal) -> DispatchError {
    match r {
        RateRefusal::Limited(retry_after) => DispatchError::RateLimited { retry_after },
        RateRefusal::Unreachable { retry_after } => {
            DispatchError::LimitsUnavailable { retry_after }
        }
    }
}

impl<'a> InFlight<'a> {
    /// The decision when it needs no waiting: the default [`ScopePolicy`]. `None`
    /// when a custom policy must be asked.
    pub(super) fn policy_now(
        &self,
        entry: &Entry,
        args: &Value,
    ) -> Option<Result<Option<Box<Gate>>, DispatchError>> {
        if self.inner.policy.is_some() {
            return None;
        }
        Some(self.scope_policy(entry, args))
    }

    pub(super) fn scope_policy(
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

    /// The policy's decision when it must be awaited (a custom policy), under the
    /// call's deadline and cancellation.
    pub(super) async fn ask_policy(
        &mut self,
        entry: &Entry,
        args: &Value,
    ) -> Result<Option<Box<Gate>>, DispatchError> {
        match self.inner.policy.is_some() {
            true => self.ask_custom_policy(entry, args).await,
            false => self.scope_policy(entry, args),
        }
    }

    /// Asks the custom policy, under the call's deadline and cancellation; a policy
    /// that errs or panics denies (fails closed).
    pub(super) async fn ask_custom_policy(
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
    pub(super) fn decided(
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

    /// The rate alone, for a call that waits for its user's approval before it
    /// takes its slot; under the call's deadline and cancellation.
    pub(super) async fn rate(&mut self) -> Result<(), DispatchError> {
        let inner: &'a Arc<Inner> = self.inner;
        let user: &'a WithUser = self.user;
        let answer = match inner.limiter.rate(&user.state, self.start) {
            RateCheck::Now(r) => return r.map_err(refused),
            RateCheck::Later(answer) => answer,
        };
        self.waited = true;
        tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => Err(self.interruption()),
            () = tokio::time::sleep_until(self.deadline) => Err(self.interruption()),
            r = answer => r.map_err(refused),
        }
    }

    /// The rate and the user's own slot, in one question to the limiter: its answer
    /// if it has one at once (`Now`), else what to await with
    /// [`admitted`](Self::admitted).
    pub(super) fn admit_now(&self) -> Admit<'a> {
        let inner: &'a Arc<Inner> = self.inner;
        let user: &'a WithUser = self.user;
        inner
            .limiter
            .admit(&user.state, self.start, self.slot_until())
    }

    /// Awaits the limiter's answer to [`admit_now`](Self::admit_now), under the
    /// call's deadline and cancellation.
    pub(super) async fn admitted(
        &mut self,
        answer: BoxFuture<'a, Result<Permit<'a>, NotAdmitted>>,
    ) -> Result<Permit<'a>, DispatchError> {
        self.waited = true;
        let got = tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => return Err(self.interruption()),
            () = tokio::time::sleep_until(self.deadline) => return Err(self.interruption()),
            r = answer => r,
        };
        got.map_err(|n| self.not_admitted(n))
    }

    /// The error a call [`admit_now`](Self::admit_now) refused ends with.
    pub(super) fn not_admitted(&self, n: NotAdmitted) -> DispatchError {
        match n {
            NotAdmitted::Rate(r) => refused(r),
            NotAdmitted::Slot(s) => self.no_slot(s, LimitScope::User),
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
        let until = self.slot_until();
        let got = tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => return Err(self.interruption()),
            p = limiter.slot(scope, until) => p,
        };
        got.map_err(|n| self.no_slot(n, which))
    }

    /// Until when a call may wait for a slot: the engine's `max_wait` from its start
    /// (or its approval) and its deadline; the probe does not wait.
    fn slot_until(&self) -> Instant {
        if !self.admission.may_wait {
            return Instant::now();
        }
        let since = self.approval.as_ref().map_or(self.start, |a| a.since);
        crate::time::deadline(since, self.inner.config.limits.max_wait).min(self.deadline)
    }

    /// The error a call that got no slot of `which` ends with.
    fn no_slot(&self, n: NoSlot, which: LimitScope) -> DispatchError {
        match n {
            NoSlot::Unreachable { retry_after } => DispatchError::LimitsUnavailable { retry_after },
            NoSlot::InTime if self.admission.may_wait && Instant::now() >= self.deadline => {
                self.interruption()
            }
            NoSlot::InTime => DispatchError::Busy {
                scope: which,
                waited: self.start.elapsed(),
            },
        }
    }

    /// The tool's and the global slot, if both are free now; the global one may be
    /// `reserved` already (taken with the user's slot): if the tool's is not free,
    /// it is given back before the call waits.
    pub(super) fn shared_slots_now(
        &self,
        entry: &'a Entry,
        reserved: Option<Permit<'a>>,
    ) -> Result<(Option<Permit<'a>>, Permit<'a>), ()> {
        let tool = match &entry.limiter {
            Some(sem) => Some(self.slot_now(Scope::Tool(sem)).map_err(drop)?),
            None => None,
        };
        let global = match reserved {
            Some(p) => p,
            None => self.slot_now(Scope::Global).map_err(drop)?,
        };
        Ok((tool, global))
    }

    /// The tool's and the global slot, waiting for them.
    pub(super) async fn shared_slots(
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
}
