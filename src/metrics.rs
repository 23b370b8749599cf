//! Counters and latency histograms; [`MetricsSnapshot`] is what callers read.
//!
//! Every ended call costs a few relaxed atomic additions on its tool's row: one for
//! its status, one for its latency bucket, one for the latency sum. Everything else
//! (totals, per-tool calls and errors, quantiles, the Prometheus series) is derived
//! from those rows when someone reads them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

#[cfg(feature = "prometheus")]
pub(crate) mod labels;

use crate::event::{ApprovalOutcome, Status};
use crate::limits::UserState;
use crate::sink::SinkError;
#[cfg(feature = "prometheus")]
use crate::user::UserContext;

/// Upper bounds, in seconds, of the latency buckets: from 100 µs (in-process tools)
/// to 10 minutes (long jobs). A last bucket, `+Inf`, holds the rest. These are the
/// exported `le` bounds, so a Prometheus quantile and the snapshot's agree.
pub(crate) const LATENCY_BOUNDS_S: [f64; 21] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// [`LATENCY_BOUNDS_S`] in nanoseconds, the unit a duration is compared in.
const LATENCY_BOUNDS_NS: [u64; 21] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
    300_000_000_000,
    600_000_000_000,
];

/// Latency buckets, `+Inf` last.
pub(crate) const BUCKETS: usize = LATENCY_BOUNDS_S.len() + 1;

const STATUSES: usize = Status::ALL.len();

/// Why an event was not delivered, as counted (the [`SinkError`] kinds).
pub(crate) const UNDELIVERED_REASONS: [&str; 5] =
    ["closed", "timed_out", "full", "failed", "panicked"];

fn reason_index(e: &SinkError) -> usize {
    match e {
        SinkError::Closed => 0,
        SinkError::TimedOut(_) => 1,
        SinkError::Full => 2,
        SinkError::Failed(_) => 3,
        SinkError::Panicked => 4,
    }
}

/// One tool's live counters (or, last, those of calls that resolved to no tool).
struct Row {
    by_status: [AtomicU64; STATUSES],
    /// Calls per latency bucket (not cumulative).
    latency: [AtomicU64; BUCKETS],
    /// Sum of the latencies, µs (a u64 of µs lasts 584,000 years of summed time).
    sum_us: AtomicU64,
}

impl Row {
    fn new() -> Self {
        Row {
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }

    #[inline]
    fn record(&self, status: Status, took: Duration) {
        self.by_status[status.index()].fetch_add(1, Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NS.partition_point(|b| *b < ns);
        self.latency[bucket].fetch_add(1, Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn read(&self) -> RowCounts {
        RowCounts {
            by_status: std::array::from_fn(|i| self.by_status[i].load(Relaxed)),
            latency: Latency {
                buckets: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
                sum_us: self.sum_us.load(Relaxed),
            },
        }
    }
}

/// A copy of one [`Row`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct RowCounts {
    /// Ended calls per status, in [`Status::ALL`]'s order.
    pub(crate) by_status: [u64; STATUSES],
    pub(crate) latency: Latency,
}

impl RowCounts {
    fn calls(&self) -> u64 {
        self.by_status.iter().sum()
    }
}

/// A copy of one latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Latency {
    /// Calls per bucket (not cumulative), `+Inf` last.
    pub(crate) buckets: [u64; BUCKETS],
    /// Sum of the latencies, µs.
    pub(crate) sum_us: u64,
}

impl Latency {
    /// Upper bound, in ms, of the bucket holding quantile `q` (the last finite bound
    /// for the `+Inf` bucket, as Prometheus's `histogram_quantile` does).
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let bound = LATENCY_BOUNDS_S[i.min(LATENCY_BOUNDS_S.len() - 1)];
                return Some(bound * 1e3);
            }
        }
        None
    }
}

/// The engine's live counters.
pub(crate) struct Metrics {
    /// One row per tool, in registration order, then one for calls that resolved to
    /// no tool (an unknown name).
    rows: Box<[Row]>,
    active: AtomicUsize,
    /// Events not delivered, per [`UNDELIVERED_REASONS`].
    undelivered: [AtomicU64; UNDELIVERED_REASONS.len()],
    /// Events a sink took (feature `prometheus`: one more addition per event).
    #[cfg(feature = "prometheus")]
    delivered: AtomicU64,
    progress_dropped: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_skipped: AtomicU64,
    unserializable_results: AtomicU64,
    approvals: [AtomicU64; 4],
    /// The application's user label, once it asks for one.
    #[cfg(feature = "prometheus")]
    labels: std::sync::OnceLock<labels::UserLabels>,
}

impl Metrics {
    pub(crate) fn new(tools: usize) -> Self {
        Metrics {
            rows: (0..=tools).map(|_| Row::new()).collect(),
            active: AtomicUsize::new(0),
            undelivered: std::array::from_fn(|_| AtomicU64::new(0)),
            #[cfg(feature = "prometheus")]
            delivered: AtomicU64::new(0),
            progress_dropped: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_skipped: AtomicU64::new(0),
            unserializable_results: AtomicU64::new(0),
            approvals: std::array::from_fn(|_| AtomicU64::new(0)),
            #[cfg(feature = "prometheus")]
            labels: std::sync::OnceLock::new(),
        }
    }

    /// The row of the tool at `index` (the last row when there is none).
    #[inline]
    fn row(&self, tool: Option<usize>) -> usize {
        let unresolved = self.rows.len() - 1;
        tool.filter(|i| *i < unresolved).unwrap_or(unresolved)
    }

    /// Counts calls per value of `hook` from now on; `false` if a hook was set
    /// before.
    #[cfg(feature = "prometheus")]
    pub(crate) fn count_by_user(&self, name: String, hook: Box<labels::Hook>) -> bool {
        let l = labels::UserLabels::new(name, hook, self.rows.len());
        self.labels.set(l).is_ok()
    }

    /// The application's user label and its counts, once set.
    #[cfg(feature = "prometheus")]
    pub(crate) fn user_labels(&self) -> Option<&labels::UserLabels> {
        self.labels.get()
    }

    /// Counts an ended call of `user` under its label value, once the application
    /// asked for that.
    #[cfg(feature = "prometheus")]
    #[inline]
    pub(crate) fn label(&self, user: &UserContext, status: Status, tool: Option<usize>) {
        if let Some(l) = self.labels.get() {
            l.record(user, status, self.row(tool));
        }
    }

    pub(crate) fn start(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// Records one ended call; returns the active count after it.
    pub(crate) fn end(&self, status: Status, tool: Option<usize>, took: Duration) -> usize {
        self.rows[self.row(tool)].record(status, took);
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

    /// An event that was not delivered.
    pub(crate) fn sink_failure(&self, e: &SinkError) {
        self.undelivered[reason_index(e)].fetch_add(1, Relaxed);
    }

    /// An event a sink took (counted with feature `prometheus` only).
    #[inline(always)]
    pub(crate) fn delivered(&self) {
        #[cfg(feature = "prometheus")]
        self.delivered.fetch_add(1, Relaxed);
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
        // Every figure below comes from this one read of the rows, so the totals and
        // the per-tool figures agree whatever ends meanwhile.
        let rows: Vec<RowCounts> = self.rows.iter().map(Row::read).collect();
        let mut by_status: BTreeMap<&'static str, u64> =
            Status::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for r in &rows {
            for (s, n) in Status::ALL.iter().zip(r.by_status) {
                *by_status.entry(s.as_str()).or_default() += n;
            }
        }
        let tools = tool_names
            .zip(&rows)
            .map(|(name, r)| {
                let calls = r.calls();
                ToolStats {
                    name: name.to_owned(),
                    calls,
                    errors: calls - r.by_status[Status::Success.index()],
                    by_status: Status::ALL
                        .iter()
                        .map(|s| (s.as_str(), r.by_status[s.index()]))
                        .collect(),
                    p50_ms: r.latency.quantile_ms(0.5),
                    p90_ms: r.latency.quantile_ms(0.9),
                    p99_ms: r.latency.quantile_ms(0.99),
                    row: *r,
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
        let undelivered: [u64; UNDELIVERED_REASONS.len()] =
            std::array::from_fn(|i| self.undelivered[i].load(Relaxed));
        MetricsSnapshot {
            total: by_status.values().sum(),
            by_status,
            active: self.active(),
            sink_failures: undelivered.iter().sum(),
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
            unresolved: rows.last().copied().unwrap_or_default(),
            undelivered,
            #[cfg(feature = "prometheus")]
            delivered: self.delivered.load(Relaxed),
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
    /// Calls that resolved to no tool (an unknown name): in `total`, in no tool's row.
    #[serde(skip)]
    pub(crate) unresolved: RowCounts,
    /// `sink_failures` per [`UNDELIVERED_REASONS`].
    #[serde(skip)]
    pub(crate) undelivered: [u64; UNDELIVERED_REASONS.len()],
    /// Events a sink took.
    #[cfg(feature = "prometheus")]
    #[serde(skip)]
    pub(crate) delivered: u64,
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
    /// Those calls per status; every status is present.
    pub by_status: BTreeMap<&'static str, u64>,
    /// Median duration, ms: the upper bound of the latency bucket that holds it (the
    /// buckets are the `le` bounds of the Prometheus histogram, 0.1 ms to 10 min).
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// The row these figures come from.
    #[serde(skip)]
    pub(crate) row: RowCounts,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let m = Metrics::new(1);
        let cases = [
            (Duration::ZERO, 0),
            (Duration::from_micros(100), 0),
            (Duration::from_nanos(100_001), 1),
            (Duration::from_millis(1), 3),
            (Duration::from_secs(600), LATENCY_BOUNDS_S.len() - 1),
            (
                Duration::from_nanos(600_000_000_001),
                LATENCY_BOUNDS_S.len(),
            ),
            (Duration::MAX, LATENCY_BOUNDS_S.len()),
        ];
        for (d, bucket) in cases {
            m.start();
            m.end(Status::Success, Some(0), d);
            let r = m.rows[0].read();
            assert_eq!(r.latency.buckets[bucket], 1, "{d:?}");
            m.rows[0].latency[bucket].store(0, Relaxed);
        }
        for (s, ns) in LATENCY_BOUNDS_S.iter().zip(LATENCY_BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn calls_of_no_tool_and_of_an_index_out_of_range_go_to_the_last_row() {
        let m = Metrics::new(2);
        for tool in [None, Some(2), Some(usize::MAX), Some(1)] {
            m.start();
            m.end(Status::UnknownTool, tool, Duration::ZERO);
        }
        let s = m.snapshot(["a", "b"].into_iter(), &[], 0);
        assert_eq!(s.total, 4);
        assert_eq!(s.unresolved.calls(), 3);
        assert_eq!((s.tools[0].calls, s.tools[1].calls), (0, 1));
        assert_eq!(s.tools[1].errors, 1);
        assert_eq!(s.tools[1].by_status["unknown_tool"], 1);
    }

    #[test]
    fn quantiles_are_bucket_bounds_and_the_overflow_bucket_reports_the_last_bound() {
        let mut l = Latency::default();
        assert_eq!(l.quantile_ms(0.5), None);
        l.buckets[3] = 99; // ≤ 1 ms
        l.buckets[BUCKETS - 1] = 1; // > 10 min
        assert_eq!(l.quantile_ms(0.5), Some(1.0));
        assert_eq!(l.quantile_ms(0.99), Some(1.0));
        assert_eq!(l.quantile_ms(1.0), Some(600_000.0));
    }
}
