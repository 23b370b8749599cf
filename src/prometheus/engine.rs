//! The engine's series.

use std::fmt;
use std::sync::Weak;

use ::prometheus_client::registry::Registry;

use super::Series;
use crate::engine::{Engine, Inner};
use crate::event::Status;
use crate::metrics::{LATENCY_BOUNDS_S, MetricsSnapshot, RowCounts, UNDELIVERED_REASONS};
use crate::user::UserContext;

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
        "tool_dispatch_events_delivered",
        "Events their user's sink took (tool_executing, tool_completed, progress, approval requests, agent events).",
        m.delivered,
    )?;
    s.counters(
        "tool_dispatch_events_undelivered",
        "Events that could not be delivered to their user's sink, by reason (the sink closed, stayed full past the delivery timeout, was full when the event could not wait, failed, or panicked).",
        UNDELIVERED_REASONS
            .iter()
            .zip(m.undelivered)
            .map(|(r, n)| ([("reason", *r)], n)),
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

/// Why calls cannot be counted by a user label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UserLabelError {
    /// Not a label name Prometheus accepts.
    #[error(
        "`{0}` is not a Prometheus label name (letters, digits and `_`, not starting with a digit or `__`)"
    )]
    InvalidName(String),
    /// A label the series have already (`tool`, `status`).
    #[error("`{0}` is already a label of tool_dispatch_user_calls_total")]
    Reserved(String),
    /// This engine counts calls by a user label already (it takes one).
    #[error("this engine already counts its calls by a user label")]
    AlreadyCounted,
}

fn label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name.len() <= 64
}

impl Engine {
    /// Also counts calls by a label of their user's, which the application bounds
    /// itself: `tool_dispatch_user_calls_total{<label>, tool, status}`, with the
    /// label's value from `value` (a tenant, a plan, the ids of a few known users;
    /// `None` leaves a call out of this family). Opt-in because a user id is an
    /// unbounded label: even so, at most 1,000 values of at most 128 bytes are
    /// counted as themselves, the rest (and the calls of a hook that panics) under
    /// `_OTHER`. Costs each ended call one call of `value` (keep it a lookup: it runs
    /// on the call's path) and one map lookup under a read lock. Counting starts now;
    /// register before serving.
    ///
    /// ```
    /// # use tool_dispatch::*;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let engine = Engine::builder(Registry::builder().build()?).build();
    /// let mut registry = tool_dispatch::prometheus::prometheus_client::registry::Registry::default();
    /// engine.register_metrics(&mut registry);
    /// engine.register_metrics_by_user(&mut registry, "tenant", |user| user.metadata("tenant"))?;
    /// # Ok(()) }
    /// ```
    pub fn register_metrics_by_user<F>(
        &self,
        registry: &mut Registry,
        label: &str,
        value: F,
    ) -> Result<(), UserLabelError>
    where
        F: for<'a> Fn(&'a UserContext) -> Option<&'a str> + Send + Sync + 'static,
    {
        if !label_name(label) {
            return Err(UserLabelError::InvalidName(
                label.chars().take(64).collect(),
            ));
        }
        if ["tool", "status"].contains(&label) {
            return Err(UserLabelError::Reserved(label.to_owned()));
        }
        if !self
            .inner()
            .counters()
            .count_by_user(label.to_owned(), Box::new(value))
        {
            return Err(UserLabelError::AlreadyCounted);
        }
        super::register(
            registry,
            "tool-dispatch calls by user label",
            self.downgrade(),
            read_by_user,
        );
        Ok(())
    }
}

fn read_by_user(engine: &Weak<Inner>, s: &mut Series<'_>) -> fmt::Result {
    let Some(engine) = Engine::upgrade(engine) else {
        return Ok(());
    };
    let Some(labels) = engine.inner().counters().user_labels() else {
        return Ok(());
    };
    let name = labels.name.as_str();
    let tools: Vec<&str> = engine
        .registry()
        .names()
        .chain(std::iter::once(UNKNOWN_TOOL))
        .collect();
    let values = labels.read();
    let series = values.iter().flat_map(|(value, rows)| {
        tools.iter().zip(rows).flat_map(move |(tool, counts)| {
            Status::ALL
                .iter()
                .zip(counts.iter().copied())
                .filter(|(_, n)| *n > 0)
                .map(move |(st, n)| {
                    (
                        [
                            (name, value.as_str()),
                            ("tool", tool),
                            ("status", st.as_str()),
                        ],
                        n,
                    )
                })
        })
    });
    s.counters(
        "tool_dispatch_user_calls",
        "Tool calls that have ended, by the application's user label, tool and status (series appear with their first call).",
        series,
    )
}
