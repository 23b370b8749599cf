//! Human approval: calls that run only after their user says yes.
//!
//! A policy answers [`Decision::RequireApproval`](crate::Decision::RequireApproval), or
//! a tool is set with [`ToolSettings::requires_approval`](crate::ToolSettings::requires_approval);
//! the call then sends `tool_approval_required` to its user's sink and waits, holding
//! no concurrency slot, until [`Engine::resolve_approval`](crate::Engine::resolve_approval)
//! is called for that user and call, the approval window ends, or the call is
//! cancelled. The pending table here is what connects the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long a call may wait for its user's decision.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::ApprovalWait;
/// let short = ApprovalWait::Within(Duration::from_secs(60));
/// assert_eq!(ApprovalWait::default(), ApprovalWait::Within(Duration::from_secs(300)));
/// # let _ = (short, ApprovalWait::Forever);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApprovalWait {
    /// At most this long; then the call ends `approval_timeout` without running.
    Within(Duration),
    /// Until a decision, however long: an explicit opt-in. Cancellation
    /// (`cancel_user`, `cancel_run`, a dropped future) and shutdown still end the wait.
    Forever,
}

impl Default for ApprovalWait {
    /// Five minutes.
    fn default() -> Self {
        ApprovalWait::Within(Duration::from_secs(300))
    }
}

/// A person's answer to a pending approval.
///
/// ```
/// use tool_dispatch::Verdict;
/// let no = Verdict::Reject { message: Some("not to that address".into()) };
/// # let _ = (Verdict::Approve, no);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Run the call.
    Approve,
    /// Do not run it; the message (if any) is passed to the model.
    Reject {
        /// The user's words, cut like every event text.
        message: Option<String>,
    },
}

/// Why [`Engine::resolve_approval`](crate::Engine::resolve_approval) changed nothing.
///
/// One answer for an unknown call id, a call already decided, a call that stopped
/// waiting and **another user's call**, so nobody learns whether someone else's call
/// exists.
///
/// ```
/// use tool_dispatch::ApprovalError;
/// assert_eq!(ApprovalError::NoSuchPendingApproval.to_string(), "no such pending approval");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// Nothing of this user with this call id is waiting for a decision.
    #[error("no such pending approval")]
    NoSuchPendingApproval,
}

type Key = (Arc<str>, Arc<str>);

/// The calls waiting for a decision, by (user, call id); at most `cap` per user.
#[derive(Debug, Default)]
pub(crate) struct Approvals {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    waiting: HashMap<Key, oneshot::Sender<Verdict>>,
    per_user: HashMap<Arc<str>, usize>,
}

/// A call's place in the pending table; leaving it (dropped, or [`withdraw`]) frees
/// the user's share of the cap.
///
/// [`withdraw`]: Waiting::withdraw
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    approvals: &'a Approvals,
    key: Option<Key>,
    rx: oneshot::Receiver<Verdict>,
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Table {
    /// Takes a call out of the table, freeing its user's share of the cap.
    fn take(&mut self, key: &Key) -> Option<oneshot::Sender<Verdict>> {
        let tx = self.waiting.remove(key)?;
        if let Some(n) = self.per_user.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&key.0);
            }
        }
        Some(tx)
    }
}

impl Approvals {
    /// Enters a call in the table; `None` when its user already has `cap` calls
    /// waiting (or, which the pipeline rules out, the same call id waits already).
    pub(crate) fn wait(&self, user: &Arc<str>, call: &Arc<str>, cap: usize) -> Option<Waiting<'_>> {
        let mut t = lock(&self.table);
        let key: Key = (Arc::clone(user), Arc::clone(call));
        let n = t.per_user.get(user).copied().unwrap_or(0);
        if n >= cap || t.waiting.contains_key(&key) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        t.waiting.insert(key.clone(), tx);
        *t.per_user.entry(Arc::clone(user)).or_insert(0) += 1;
        Some(Waiting {
            approvals: self,
            key: Some(key),
            rx,
        })
    }

    /// Delivers a decision to the call waiting for it, once.
    pub(crate) fn resolve(
        &self,
        user: &str,
        call: &str,
        verdict: Verdict,
    ) -> Result<(), ApprovalError> {
        let key: Key = (Arc::from(user), Arc::from(call));
        let tx = lock(&self.table).take(&key);
        tx.ok_or(ApprovalError::NoSuchPendingApproval)?
            .send(verdict)
            .map_err(|_| ApprovalError::NoSuchPendingApproval)
    }

    /// Calls waiting now, for the metrics.
    pub(crate) fn len(&self) -> usize {
        lock(&self.table).waiting.len()
    }
}

impl Waiting<'_> {
    /// The decision, when one arrives.
    pub(crate) async fn decision(&mut self) -> Verdict {
        match (&mut self.rx).await {
            Ok(v) => v,
            // Only a decision takes the sender out of the table; without one, wait
            // for the window or the cancellation.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops waiting. A decision that was taken meanwhile (the table no longer held
    /// the call) is returned: it was accepted, so it must count.
    pub(crate) fn withdraw(&mut self) -> Option<Verdict> {
        let key = self.key.take()?;
        let taken = lock(&self.approvals.table).take(&key); // dropped after the lock
        if taken.is_some() {
            return None;
        }
        self.rx.try_recv().ok()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let taken = lock(&self.approvals.table).take(&key);
            drop(taken); // after the lock: a sender's drop wakes its receiver
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_taken_once_and_only_by_its_user() {
        let a = Approvals::default();
        let (alice, call): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("c1"));
        let mut w = a.wait(&alice, &call, 8).unwrap();
        let nope = Err(ApprovalError::NoSuchPendingApproval);
        assert_eq!(a.resolve("bob", "c1", Verdict::Approve), nope);
        assert_eq!(a.resolve("alice", "c2", Verdict::Approve), nope);
        assert_eq!(a.resolve("alice", "c1", Verdict::Approve), Ok(()));
        assert_eq!(a.resolve("alice", "c1", Verdict::Approve), nope);
        assert_eq!(
            w.withdraw(),
            Some(Verdict::Approve),
            "the taken decision counts"
        );
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn the_cap_is_per_user_and_freed_by_leaving() {
        let a = Approvals::default();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        let w1 = a.wait(&alice, &Arc::from("1"), 2).unwrap();
        let _w2 = a.wait(&alice, &Arc::from("2"), 2).unwrap();
        assert!(a.wait(&alice, &Arc::from("3"), 2).is_none());
        assert!(a.wait(&bob, &Arc::from("1"), 2).is_some());
        drop(w1);
        assert!(a.wait(&alice, &Arc::from("3"), 2).is_some());
        let nope = Err(ApprovalError::NoSuchPendingApproval);
        assert_eq!(a.resolve("alice", "1", Verdict::Approve), nope, "it left");
    }
}
