//! The series of the engine's parts: each registers a reader of its plain stats.
//! A part with atomic stats joins with one `register_metrics` of a few lines here.

use std::fmt;

use ::prometheus_client::registry::Registry;

use super::Series;
use crate::runlog::RunLog;

impl RunLog {
    /// Adds the run log's series to `registry`: `tool_dispatch_run_log_runs` (runs
    /// kept) and `tool_dispatch_run_log_bytes` (bytes of events kept in this process),
    /// read at each scrape.
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(
            registry,
            "tool-dispatch run log",
            self.clone(),
            read_run_log,
        );
    }
}

fn read_run_log(log: &RunLog, s: &mut Series<'_>) -> fmt::Result {
    let stats = log.stats();
    s.gauge(
        "tool_dispatch_run_log_runs",
        "Runs whose events the run log keeps (with a shared log: the runs this process follows).",
        stats.runs as u64,
    )?;
    s.gauge(
        "tool_dispatch_run_log_bytes",
        "Bytes of serialized events the run log keeps in this process.",
        stats.bytes as u64,
    )
}

#[cfg(feature = "redis")]
impl crate::redis::Redis {
    /// Adds the Redis connection's series to `registry`, read at each scrape:
    /// `tool_dispatch_redis_requests_total{result}` (rate checks and slot leases
    /// Redis `answered`, or that `failed`: no answer in time, or an error),
    /// `tool_dispatch_redis_fallbacks_total` (failed ones this node decided with its
    /// own limits), `tool_dispatch_redis_shed_locally_total` (calls refused by the
    /// local pre-check without a round trip) and
    /// `tool_dispatch_redis_log_frames_total{result}` (run log frames `recorded` in
    /// Redis, or that `failed`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        super::register(registry, "tool-dispatch redis", self.clone(), read_redis);
    }
}

#[cfg(feature = "redis")]
fn read_redis(redis: &crate::redis::Redis, s: &mut Series<'_>) -> fmt::Result {
    let stats = redis.stats();
    s.counters(
        "tool_dispatch_redis_requests",
        "Rate checks and slot leases sent to Redis, by result (answered, or failed: no answer in time or an error).",
        [("answered", stats.answers), ("failed", stats.failures)].map(|(r, n)| ([("result", r)], n)),
    )?;
    s.counter(
        "tool_dispatch_redis_fallbacks",
        "Failed Redis requests that this node decided with its own limits instead.",
        stats.fallbacks,
    )?;
    s.counter(
        "tool_dispatch_redis_shed_locally",
        "Calls refused by the local pre-check without a Redis round trip.",
        stats.shed_locally,
    )?;
    s.counters(
        "tool_dispatch_redis_log_frames",
        "Run log frames sent to Redis Streams, by result (recorded, or failed: Redis unreachable).",
        [
            ("recorded", stats.log_appends),
            ("failed", stats.log_failures),
        ]
        .map(|(r, n)| ([("result", r)], n)),
    )
}
