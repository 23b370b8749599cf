//! Blocking bodies on tokio's blocking pool: they outlive their call's timeout (a
//! thread cannot be stopped), so the engine keeps a list of them and reports those
//! running past twice their timeout as stuck.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// A call whose blocking body is still running past twice its timeout.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StuckCall {
    /// The call.
    pub call_id: String,
    /// The tool.
    pub tool_name: String,
    /// The user.
    pub user_id: String,
    /// How long the body has been running, ms.
    pub running_ms: f64,
    /// The timeout that applied, ms.
    pub timeout_ms: f64,
}

struct Job {
    call_id: Arc<str>,
    tool: Arc<str>,
    user: Arc<str>,
    started: Instant,
    timeout: Duration,
}

/// Blocking bodies currently running.
#[derive(Default)]
pub(crate) struct BlockingJobs {
    jobs: Mutex<HashMap<u64, Job>>,
    next: AtomicU64,
}

/// Unregisters a blocking job when its body returns.
pub(crate) struct JobGuard {
    jobs: Arc<BlockingJobs>,
    id: u64,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.id);
    }
}

impl BlockingJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a body that starts now; it stays listed until the guard drops.
    pub(crate) fn start(
        self: &Arc<Self>,
        call_id: &Arc<str>,
        tool: &Arc<str>,
        user: &Arc<str>,
        timeout: Duration,
    ) -> JobGuard {
        let id = self.next.fetch_add(1, Relaxed);
        self.lock().insert(
            id,
            Job {
                call_id: Arc::clone(call_id),
                tool: Arc::clone(tool),
                user: Arc::clone(user),
                started: Instant::now(),
                timeout,
            },
        );
        JobGuard {
            jobs: Arc::clone(self),
            id,
        }
    }

    /// Jobs running past twice their timeout.
    pub(crate) fn stuck(&self, now: Instant) -> Vec<StuckCall> {
        let mut v: Vec<StuckCall> = self
            .lock()
            .values()
            .filter(|j| now.saturating_duration_since(j.started) > j.timeout.saturating_mul(2))
            .map(|j| StuckCall {
                call_id: j.call_id.to_string(),
                tool_name: j.tool.to_string(),
                user_id: j.user.to_string(),
                running_ms: now.saturating_duration_since(j.started).as_secs_f64() * 1e3,
                timeout_ms: j.timeout.as_secs_f64() * 1e3,
            })
            .collect();
        v.sort_by(|a, b| a.call_id.cmp(&b.call_id));
        v
    }
}
