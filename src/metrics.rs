//! Counters and latency histograms; [`MetricsSnapshot`] is what callers read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::event::{ApprovalOutcome, Status};
use crate::limits::UserState;

const BUCKETS: usize = 40;

/// Log₂ histogram of microseconds: bucket `i` holds durations below 2^i µs.
struct Histogram([AtomicU64; BUCKETS]);

impl Histogram {
    fn new() -> Self {
        Histogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.0[i].fetch_add(1, Relaxed);
    }

    /// Upper bound, in ms, of the bucket holding quantile `q`.
    fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some((1u64 << i) as f64 / 1000.0);
            }
        }
        None
    }
}

pub(crate) struct ToolMetrics {
    calls: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// The engine's live counters.
pub(crate) struct Metrics {
    by_status: [AtomicU64; Status::ALL.len()],
    active: AtomicUsize,
    sink_failures: AtomicU64,
    progress_dropped: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_skipped: AtomicU64,
    unserializable_results: AtomicU64,
    approvals: [AtomicU64; 4],
    tools: Box<[ToolMetrics]>,
}

impl Metrics {
    pub(crate) fn new(tools: usize) -> Self {
        Metrics {
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            active: AtomicUsize::new(0),
            sink_failures: AtomicU64::new(0),
            progress_dropped: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_skipped: AtomicU64::new(0),
            unserializable_results: AtomicU64::new(0),
            approvals: std::array::from_fn(|_| AtomicU64::new(0)),
            tools: (0..tools)
                .map(|_| ToolMetrics {
                    calls: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    latency: Histogram::new(),
                })
                .collect(),
        }
    }

    pub(crate) fn start(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// Records one ended call; returns the active count after it.
    pub(crate) fn end(&self, status: Status, tool: Option<usize>, took: Duration) -> usize {
        self.by_status[status.index()].fetch_add(1, Relaxed);
        if let Some(t) = tool.and_then(|i| self.tools.get(i)) {
            t.calls.fetch_add(1, Relaxed);
            if status != Status::Success {
                t.errors.fetch_add(1, Relaxed);
            }
            t.latency.record(took);
        }
        self.active.fetch_sub(1, Relaxed) - 1
    }

    /// Ends a call that is in flight like any other but not counted as one (the
    /// health probe); returns the active count after it.
    pub(crate) fn end_uncounted(&self) -> usize {
        self.active.fetch_sub(1, Relaxed) - 1
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    pub(crate) fn count(&self, s: Status) -> u64 {
        self.by_status[s.index()].load(Relaxed)
    }

    pub(crate) fn sink_failure(&self) {
        self.sink_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn progress_dropped(&self) {
        self.progress_dropped.fetch_add(1, Relaxed);
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Relaxed);
    }

    pub(crate) fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Relaxed);
    }

    /// A result that was not cached because it does not survive a JSON round trip.
    pub(crate) fn cache_skipped(&self) {
        self.cache_skipped.fetch_add(1, Relaxed);
    }

    /// A result that could not be converted to JSON.
    pub(crate) fn unserializable_result(&self) {
        self.unserializable_results.fetch_add(1, Relaxed);
    }

    /// An approval request ended this way.
    pub(crate) fn approval(&self, outcome: ApprovalOutcome) {
        let i = match outcome {
            ApprovalOutcome::Approved => 0,
            ApprovalOutcome::Rejected => 1,
            ApprovalOutcome::Expired => 2,
            _ => 3,
        };
        self.approvals[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot<'a>(
        &self,
        tool_names: impl Iterator<Item = &'a str>,
        users: &[std::sync::Arc<UserState>],
        tracked_users: usize,
    ) -> MetricsSnapshot {
        let by_status: BTreeMap<&'static str, u64> = Status::ALL
            .iter()
            .map(|s| (s.as_str(), self.count(*s)))
            .collect();
        let tools = tool_names
            .zip(self.tools.iter())
            .map(|(name, t)| {
                let counts: Vec<u64> = t.latency.0.iter().map(|c| c.load(Relaxed)).collect();
                ToolStats {
                    name: name.to_owned(),
                    calls: t.calls.load(Relaxed),
                    errors: t.errors.load(Relaxed),
                    p50_ms: Histogram::quantile_ms(&counts, 0.5),
                    p90_ms: Histogram::quantile_ms(&counts, 0.9),
                    p99_ms: Histogram::quantile_ms(&counts, 0.99),
                }
            })
            .collect();
        let mut active_users: Vec<UserStats> = users
            .iter()
            .filter(|u| u.active.load(Relaxed) > 0)
            .map(|u| UserStats {
                user_id: u.user_id.to_string(),
                active: u.active.load(Relaxed),
                calls: u.finished.load(Relaxed),
                failed: u.failed.load(Relaxed),
            })
            .collect();
        active_users.sort_by(|a, b| b.active.cmp(&a.active).then(a.user_id.cmp(&b.user_id)));
        active_users.truncate(MAX_REPORTED_USERS);
        MetricsSnapshot {
            total: by_status.values().sum(),
            by_status,
            active: self.active(),
            sink_failures: self.sink_failures.load(Relaxed),
            progress_dropped: self.progress_dropped.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            cache_skipped: self.cache_skipped.load(Relaxed),
            unserializable_results: self.unserializable_results.load(Relaxed),
            awaiting_approval: 0,
            approvals: ApprovalStats {
                approved: self.approvals[0].load(Relaxed),
                rejected: self.approvals[1].load(Relaxed),
                expired: self.approvals[2].load(Relaxed),
                withdrawn: self.approvals[3].load(Relaxed),
            },
            cache_entries: 0,
            tools,
            active_users,
            tracked_users,
        }
    }
}

/// Approval requests that have ended, per outcome (see
/// [`ApprovalOutcome`](crate::event::ApprovalOutcome)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ApprovalStats {
    /// Approved: the call went on.
    pub approved: u64,
    /// Rejected by the user (status `rejected`).
    pub rejected: u64,
    /// Nobody answered in time (status `approval_timeout`).
    pub expired: u64,
    /// The call stopped waiting first (cancelled, shut down, dropped).
    pub withdrawn: u64,
}

/// At most this many users are listed in [`MetricsSnapshot::active_users`].
pub const MAX_REPORTED_USERS: usize = 1000;

/// A point-in-time copy of the engine's counters.
///
/// `total` is the sum of `by_status` by construction: every ended call is counted in
/// exactly one status. Calls still running are in `active`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Calls that have ended (the probe calls of [`Engine::health`](crate::Engine::health)
    /// are not counted).
    pub total: u64,
    /// Ended calls per status (`"success"`, `"timeout"`, …); every status is present.
    pub by_status: BTreeMap<&'static str, u64>,
    /// Calls in flight now.
    pub active: usize,
    /// Events that could not be delivered (`tool_executing`, `tool_completed`, agent
    /// events), including those of a sink that panicked.
    pub sink_failures: u64,
    /// Progress updates dropped because the sink was full or closed.
    pub progress_dropped: u64,
    /// Calls answered from the result cache.
    pub cache_hits: u64,
    /// Successful runs of cacheable tools: results computed rather than served from
    /// the cache (a failed run is neither a hit nor a miss).
    pub cache_misses: u64,
    /// Results of cacheable tools that were not cached because they do not survive
    /// a JSON round trip (a `NaN`, a map with non-string keys…).
    pub cache_skipped: u64,
    /// Results that could not be converted to JSON (nested too deep, a failing
    /// `Serialize`): a typed call still returns its value and its event says why the
    /// result is not shown; a call by name fails with `error`.
    pub unserializable_results: u64,
    /// Calls waiting for their user's approval now (also counted in `active`).
    pub awaiting_approval: usize,
    /// Approval requests that have ended, per outcome.
    pub approvals: ApprovalStats,
    /// Entries in the result cache (ready or being computed).
    pub cache_entries: usize,
    /// Per tool, in registration order.
    pub tools: Vec<ToolStats>,
    /// Users with calls in flight, busiest first (at most [`MAX_REPORTED_USERS`]).
    pub active_users: Vec<UserStats>,
    /// Users whose state the engine holds (limits, rate buckets).
    pub tracked_users: usize,
}

impl MetricsSnapshot {
    /// Ended calls with `status`.
    pub fn count(&self, status: Status) -> u64 {
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }
}

/// One tool's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ToolStats {
    /// The tool.
    pub name: String,
    /// Ended calls that resolved to this tool.
    pub calls: u64,
    /// Of those, the ones that did not succeed.
    pub errors: u64,
    /// Median duration (upper bound of its log₂ bucket), ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
}

/// One active user's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct UserStats {
    /// The user.
    pub user_id: String,
    /// Calls in flight.
    pub active: usize,
    /// Ended calls since the engine started tracking this user.
    pub calls: u64,
    /// Of those, the ones that did not succeed.
    pub failed: u64,
}
