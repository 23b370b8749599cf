//! Admission: the policy (which may ask for the user's approval), the rate, and the
//! slots (the user's own, the tool's and the global one), each under the call's
//! deadline and cancellation; and why a waiting call stops.

use std::sync::Arc;

use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use super::in_flight::{Gate, InFlight};
use crate::contain::Contained;
use crate::error::{CancelReason, DispatchError, LimitScope};
use crate::json::cut;
use crate::limits::{NoSlot, Permit, RateCheck, RateRefusal, Scope};
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
        if self.inner.policy.is_some() || !self.inner.limiter.answers_now() {
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

    /// The admission that must wait: the custom policy (or the default one), then,
    /// with a limiter shared by several processes, its rate check; each under the
    /// call's deadline and cancellation.
    pub(super) async fn ask_policy(
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

    /// The rate check of a limiter that answers at once; a shared limiter's was
    /// awaited in [`ask_policy`](Self::ask_policy) already.
    pub(super) fn rate(&self) -> Result<(), DispatchError> {
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
    pub(super) fn shared_slots_now(
        &self,
        entry: &'a Entry,
    ) -> Result<(Option<Permit<'a>>, Permit<'a>), ()> {
        let tool = match &entry.limiter {
            Some(sem) => Some(self.slot_now(Scope::Tool(sem)).map_err(drop)?),
            None => None,
        };
        let global = self.slot_now(Scope::Global).map_err(drop)?;
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
