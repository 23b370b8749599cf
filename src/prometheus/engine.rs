//! The engine's series.

use std::fmt;
use std::sync::Weak;

use ::prometheus_client::registry::Registry;

use super::Series;
use crate::engine::{Engine, Inner};
use crate::event::Status;
use crate::metrics::{LATENCY_BOUNDS_S, MetricsSnapshot, RowCounts};

/// The `tool` label of calls that named no tool (a tool name cannot contain
/// parentheses, so no tool is ever counted under it).
pub const UNKNOWN_TOOL: &str = "(unknown)";

impl Engine {
    /// Adds the engine's series to `registry` (see [`prometheus`](crate::prometheus)
    /// for the list). They are read from the engine's own counters at each scrape:
    /// nothing is added to the call path, and the registry does not keep the engine
    /// alive (once it is dropped, its series are gone).
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(registry, "tool-dispatch engine", self.downgrade(), read);
    }
}

fn read(engine: &Weak<Inner>, s: &mut Series<'_>) -> fmt::Result {
    let Some(engine) = Engine::upgrade(engine) else {
        return Ok(());
    };
    let m = engine.metrics();
    write(&m, s)
}

/// The rows of the snapshot: each tool's, then the calls of no tool.
fn rows(m: &MetricsSnapshot) -> impl Iterator<Item = (&str, &RowCounts)> + '_ {
    let tools = m.tools.iter().map(|t| (t.name.as_str(), &t.row));
    tools.chain(std::iter::once((UNKNOWN_TOOL, &m.unresolved)))
}

fn write(m: &MetricsSnapshot, s: &mut Series<'_>) -> fmt::Result {
    s.counters(
        "tool_dispatch_calls",
        "Tool calls that have ended, by tool and status (the status of their tool_completed event).",
        rows(m).flat_map(|(tool, row)| {
            Status::ALL
                .iter()
                .zip(row.by_status)
                .map(move |(st, n)| ([("tool", tool), ("status", st.as_str())], n))
        }),
    )?;
    s.histograms(
        "tool_dispatch_call_duration",
        "Duration of tool calls that have ended, from dispatch to tool_completed, by tool.",
        rows(m).map(|(tool, row)| {
            let l = &row.latency;
            let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_S
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(l.buckets.iter().copied())
                .collect();
            buckets.shrink_to_fit();
            ([("tool", tool)], l.sum_us as f64 / 1e6, buckets)
        }),
    )?;
    s.gauge(
        "tool_dispatch_calls_in_flight",
        "Tool calls in flight now (including those waiting for approval).",
        m.active as u64,
    )?;
    s.gauge(
        "tool_dispatch_approvals_waiting",
        "Tool calls waiting for their user's approval now.",
        m.awaiting_approval as u64,
    )?;
    let a = &m.approvals;
    s.counters(
        "tool_dispatch_approvals",
        "Approval requests that have ended, by outcome.",
        [
            ("approved", a.approved),
            ("rejected", a.rejected),
            ("expired", a.expired),
            ("withdrawn", a.withdrawn),
        ]
        .map(|(o, n)| ([("outcome", o)], n)),
    )?;
    s.counter(
        "tool_dispatch_events_undelivered",
        "Events that could not be delivered to their user's sink (closed, full past the delivery timeout, failed or panicked).",
        m.sink_failures,
    )?;
    s.counter(
        "tool_dispatch_progress_dropped",
        "Progress events dropped because the sink had no room (progress never waits).",
        m.progress_dropped,
    )?;
    s.counter(
        "tool_dispatch_cache_hits",
        "Tool calls answered from the result cache.",
        m.cache_hits,
    )?;
    s.counter(
        "tool_dispatch_cache_misses",
        "Successful runs of cacheable tools whose result was computed, not cached.",
        m.cache_misses,
    )?;
    s.gauge(
        "tool_dispatch_cache_entries",
        "Entries in the result cache now.",
        m.cache_entries as u64,
    )?;
    s.counter(
        "tool_dispatch_unserializable_results",
        "Tool results that could not be converted to JSON.",
        m.unserializable_results,
    )?;
    s.gauge(
        "tool_dispatch_users_tracked",
        "Users whose limits the engine holds now.",
        m.tracked_users as u64,
    )
}
