//! What [`Engine::health`](crate::Engine::health) reports; the probe itself runs in
//! the engine, through the same pipeline as every call.

use serde::Serialize;

use crate::blocking::StuckCall;

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
