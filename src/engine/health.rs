//! [`Engine::health`]: a probe call through the whole pipeline, with a throwaway sink.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use super::in_flight::{Admission, Occurrence, Start};
use crate::call::ToolCall;
use crate::error::DispatchError;
use crate::health::{Health, HealthStatus};
use crate::sink::RecordingSink;

/// The probe tool's name.
pub(super) const PROBE: &str = "health_probe";

/// The probe's timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Runs a probe call through the whole pipeline (policy, limits, events, timeout)
    /// with a throwaway sink, and reports on the engine. The probe is not counted in
    /// the metrics' totals and has limits of its own.
    pub async fn health(&self) -> Health {
        let s = &self.inner;
        let now = Instant::now();
        let active_calls = s.metrics.active();
        let stuck_calls = s.blocking.stuck(now);
        let global_saturation = s.limiter.saturation();
        let mut issues = Vec::new();

        let recording = RecordingSink::with_capacity(4);
        let outbox = s.outbox(Arc::new(recording.clone()));
        let (mut processing_verified, mut probe_latency_ms) = (false, None);
        let mut probe_busy = false;
        if s.accepting.load(Relaxed) {
            let probe = &s.probe;
            let call =
                ToolCall::new(PROBE, serde_json::Value::from(7u64)).with_timeout(PROBE_TIMEOUT);
            let started = Instant::now();
            let (start, arguments) = Start::json(
                Some(&probe.entry),
                call,
                Occurrence::First,
                Admission::PROBE,
            );
            let r = s.run_json(&outbox, &probe.user, start, arguments).await;
            match r {
                Ok(out) => {
                    probe_latency_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                    let events = recording.events();
                    processing_verified = out.value == 7u64
                        && events.len() == 2
                        && events.iter().all(|e| e.call_id() == Some(&*out.call_id));
                    if !processing_verified {
                        issues.push("the probe's events were not delivered as a pair".into());
                    }
                }
                Err(e) => {
                    probe_busy = matches!(e, DispatchError::Busy { .. });
                    issues.push(format!("the probe call failed: {e}"));
                }
            }
        } else {
            issues.push("the engine is shutting down".into());
        }
        if global_saturation >= 0.9 {
            issues.push(format!(
                "the global concurrency limit is {:.0}% used",
                global_saturation * 100.0
            ));
        }
        if let Some(trouble) = s.limiter.probe().await {
            issues.push(trouble);
        }
        if !stuck_calls.is_empty() {
            issues.push(format!(
                "{} blocking call(s) running past twice their timeout",
                stuck_calls.len()
            ));
        }
        let status = if !processing_verified && !probe_busy {
            HealthStatus::Unhealthy
        } else if issues.is_empty() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Degraded
        };
        Health {
            status,
            issues,
            active_calls,
            stuck_calls,
            global_saturation,
            probe_latency_ms,
            processing_verified,
        }
    }
}
