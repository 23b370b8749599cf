//! Health: a real probe call through the whole pipeline, and the blocking jobs that
//! have outlived their timeout ("stuck").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::engine::Shared;
use crate::tool::ToolContext;

/// Overall state reported by [`Engine::health`](crate::Engine::health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// The probe ran and nothing is saturated or stuck.
    Healthy,
    /// The probe ran, but the global limit is (nearly) saturated or calls are stuck.
    Degraded,
    /// The probe did not complete, or the engine is shutting down.
    Unhealthy,
}

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

/// What [`Engine::health`](crate::Engine::health) found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// One sentence per problem found; empty when healthy.
    pub issues: Vec<String>,
    /// Calls in flight (the probe not counted).
    pub active_calls: usize,
    /// Blocking bodies running past twice their timeout.
    pub stuck_calls: Vec<StuckCall>,
    /// Share of the global concurrency limit in use, `0.0..=1.0`.
    pub global_saturation: f64,
    /// How long the probe call took end to end, ms (`None` if it did not complete).
    pub probe_latency_ms: Option<f64>,
    /// Whether the probe went through the whole pipeline: both events delivered, with
    /// one call id, and the probe tool's result returned.
    pub processing_verified: bool,
}

struct Job {
    call_id: Arc<str>,
    tool: Arc<str>,
    user: Arc<str>,
    started: Instant,
    timeout: Duration,
}

/// Blocking bodies currently running (they outlive their call's timeout).
#[derive(Default)]
pub(crate) struct BlockingJobs {
    jobs: Mutex<HashMap<u64, Job>>,
    next: AtomicU64,
}

/// Unregisters a blocking job when its body returns.
pub(crate) struct JobGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.shared.blocking.lock().remove(&self.id);
    }
}

impl BlockingJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn start(&self, cx: &ToolContext) -> JobGuard {
        let id = self.next.fetch_add(1, Relaxed);
        self.lock().insert(
            id,
            Job {
                call_id: cx.call_id.clone(),
                tool: cx.tool_name.clone(),
                user: cx.user.user_id.clone(),
                started: Instant::now(),
                timeout: cx.timeout,
            },
        );
        JobGuard {
            shared: Arc::clone(&cx.shared),
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
