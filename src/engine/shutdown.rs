//! Stopping calls: [`Engine::cancel_user`] for one user, [`Engine::shutdown`] for all.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Engine;
use super::Signal;

/// How long `shutdown` waits, after cancelling, for the cancelled calls to end. Every
/// wait of a call watches its cancellation, so a call that is being polled ends at
/// once; only one whose future nobody polls can outlast this.
const AFTER_CANCEL: Duration = Duration::from_secs(1);

/// What [`Engine::shutdown`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Calls in flight when shutdown began.
    pub in_flight: usize,
    /// Of those, calls that ended by themselves within the grace period.
    pub completed: u64,
    /// Calls that ended cancelled.
    pub cancelled: u64,
    /// Calls still in flight when `shutdown` returned (their futures were not polled).
    pub still_active: usize,
    /// Users who had calls in flight.
    pub affected_users: Vec<String>,
    /// Per affected user.
    pub per_user: BTreeMap<String, UserShutdown>,
}

/// One user's part of a [`ShutdownReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct UserShutdown {
    /// Calls that ended by themselves.
    pub completed: u64,
    /// Calls that were cancelled.
    pub cancelled: u64,
}

/// What a cancellation reached.
///
/// ```
/// # use tool_dispatch::{Engine, Registry};
/// # let engine = Engine::builder(Registry::builder().build()?).build();
/// let report = engine.cancel_user("alice");
/// assert_eq!((report.here, report.peers_told), (0, false)); // no call, no other node
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CancelReport {
    /// Calls cancelled in this process.
    pub here: usize,
    /// Whether the other nodes sharing this engine's users (through Redis) were told
    /// to cancel theirs; `false` when there are none or they could not be reached.
    pub peers_told: bool,
}

impl Engine {
    /// Cancels every in-flight call of `user_id`, wherever it waits (policy,
    /// approval, slot, sink, body); their events say `cancelled`. Other users are
    /// untouched; later calls of this user run normally. With Redis, the other nodes
    /// cancel theirs too.
    pub fn cancel_user(&self, user_id: &str) -> CancelReport {
        let here = self.cancel_user_here(user_id);
        let peers_told = self
            .inner
            .peers
            .as_ref()
            .is_some_and(|p| p.tell(Signal::CancelUser(user_id.into())));
        CancelReport { here, peers_told }
    }

    /// Cancels the in-flight calls of `user_id`'s run `run_id` only (the calls made
    /// by dispatchers whose `UserContext` has that `run_id`), wherever they wait; their
    /// events say `cancelled` ("the run was cancelled"). The user's other runs and
    /// later calls of this run are untouched. With Redis, the other nodes cancel the
    /// run's calls too.
    pub fn cancel_run(&self, user_id: &str, run_id: &str) -> CancelReport {
        let here = self.cancel_run_here(user_id, run_id);
        let peers_told = self
            .inner
            .peers
            .as_ref()
            .is_some_and(|p| p.tell(Signal::CancelRun(user_id.into(), run_id.into())));
        CancelReport { here, peers_told }
    }

    /// [`cancel_user`](Self::cancel_user) in this process only.
    pub(crate) fn cancel_user_here(&self, user_id: &str) -> usize {
        let Some(state) = self.inner.users.get(user_id) else {
            return 0;
        };
        let n = state.active.load(Relaxed);
        state.cancel(self.inner.root.child_token());
        n
    }

    /// [`cancel_run`](Self::cancel_run) in this process only.
    pub(crate) fn cancel_run_here(&self, user_id: &str, run_id: &str) -> usize {
        match self.inner.users.get(user_id) {
            Some(state) => state.cancel_run(run_id),
            None => 0,
        }
    }

    /// Stops accepting calls (new ones end with [`DispatchError::Unavailable`], with
    /// their paired events), waits up to `grace` for calls in flight, cancels the rest,
    /// and reports what happened.
    ///
    /// [`DispatchError::Unavailable`]: crate::DispatchError::Unavailable
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let s = &self.inner;
        s.accepting.store(false, Relaxed);
        let in_flight = s.metrics.active();
        let users: Vec<_> = s
            .users
            .all()
            .into_iter()
            .filter(|u| u.active.load(Relaxed) > 0)
            .map(|u| {
                let before = (u.finished.load(Relaxed), u.cancelled.load(Relaxed));
                (u, before)
            })
            .collect();
        let deadline = crate::time::deadline(Instant::now(), grace);
        if !self.wait_idle(deadline).await {
            s.root.cancel();
            self.wait_idle(Instant::now() + AFTER_CANCEL).await;
        }
        let mut report = ShutdownReport {
            in_flight,
            completed: 0,
            cancelled: 0,
            still_active: s.metrics.active(),
            affected_users: Vec::new(),
            per_user: BTreeMap::new(),
        };
        for (u, (finished, cancelled)) in users {
            let c = u.cancelled.load(Relaxed) - cancelled;
            let done = u.finished.load(Relaxed) - finished - c;
            report.completed += done;
            report.cancelled += c;
            report.affected_users.push(u.user_id.to_string());
            report.per_user.insert(
                u.user_id.to_string(),
                UserShutdown {
                    completed: done,
                    cancelled: c,
                },
            );
        }
        report.affected_users.sort();
        report
    }

    /// Waits until no call is in flight; `false` if `deadline` came first.
    async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.metrics.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inner.metrics.active() == 0;
            }
        }
    }
}
