//! `Engine::health`: a real probe through the pipeline; healthy when idle, degraded
//! when the global limit is saturated, unhealthy after shutdown; serializable.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::user;
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tool_dispatch::*;

/// `wait` reports its start, then waits for the test's `Notify`.
fn engine(release: &Arc<Notify>, started: mpsc::UnboundedSender<()>, limits: Limits) -> Engine {
    let release = Arc::clone(release);
    let wait = tool_fn("wait", "Waits for the test.", move |_: (), _cx| {
        let (release, started) = (Arc::clone(&release), started.clone());
        async move {
            let notified = release.notified();
            let _ = started.send(());
            notified.await;
            Ok::<_, ToolError>(())
        }
    });
    let reg = Registry::builder().tool(wait).build().unwrap();
    Engine::builder(reg).limits(limits).build()
}

/// Starts `n` calls of `wait`, each for its own user, and waits until all run.
async fn fill(
    engine: &Engine,
    started: &mut mpsc::UnboundedReceiver<()>,
    n: usize,
) -> Vec<JoinHandle<Result<ToolOutput, DispatchError>>> {
    let mut calls = Vec::new();
    for i in 0..n {
        let d = engine
            .dispatcher()
            .sink(RecordingSink::new())
            .user(user(&format!("u{i}")));
        calls.push(tokio::spawn(async move {
            d.dispatch(ToolCall::new("wait", json!(null))).await
        }));
        started.recv().await.unwrap();
    }
    calls
}

#[tokio::test(start_paused = true)]
async fn an_idle_engine_is_healthy_and_the_probe_verifies_processing() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = engine(&Arc::new(Notify::new()), tx, Limits::default());
    let h = engine.health().await;
    assert_eq!(h.status, HealthStatus::Healthy, "{h:?}");
    assert!(h.processing_verified);
    assert!(h.issues.is_empty());
    assert_eq!(h.active_calls, 0);
    assert!(h.stuck_calls.is_empty());
    assert_eq!(h.global_saturation, 0.0);
    assert!(h.probe_latency_ms.is_some());

    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["processing_verified"], true);
    assert_eq!(json["issues"], json!([]));
    for key in [
        "active_calls",
        "stuck_calls",
        "global_saturation",
        "probe_latency_ms",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    // The probe left nothing in flight.
    assert_eq!(engine.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn frequent_probing_stays_healthy() {
    // More probes than any user's default rate (100 per minute) in no time at all.
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = engine(&Arc::new(Notify::new()), tx, Limits::default());
    for _ in 0..250 {
        let h = engine.health().await;
        assert_eq!(h.status, HealthStatus::Healthy, "{:?}", h.issues);
    }
}

#[tokio::test(start_paused = true)]
async fn a_saturated_global_limit_makes_the_engine_degraded() {
    let release = Arc::new(Notify::new());
    let (tx, mut started) = mpsc::unbounded_channel();
    let limits = Limits::default()
        .global(10)
        .max_wait(Duration::from_secs(5));
    let engine = engine(&release, tx, limits);

    // 9 of 10 slots: the probe still gets through, but the engine is nearly full.
    let mut calls = fill(&engine, &mut started, 9).await;
    let h = engine.health().await;
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert!(h.processing_verified);
    assert_eq!(h.active_calls, 9);
    assert!((h.global_saturation - 0.9).abs() < 1e-9);
    assert!(
        h.issues.iter().any(|i| i.contains("global")),
        "{:?}",
        h.issues
    );

    // All 10: the probe cannot get a slot (it does not queue behind real work).
    calls.extend(fill(&engine, &mut started, 1).await);
    let t0 = tokio::time::Instant::now();
    let h = engine.health().await;
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "the probe did not wait for a slot"
    );
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert!(!h.processing_verified);
    assert_eq!(h.global_saturation, 1.0);
    assert_eq!(h.active_calls, 10);
    assert!(h.probe_latency_ms.is_none());
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["status"], "degraded");

    // Released, healthy again.
    release.notify_waiters();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let h = engine.health().await;
    assert_eq!(h.status, HealthStatus::Healthy, "{h:?}");
    assert_eq!(h.active_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_has_shut_down_is_unhealthy() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = engine(&Arc::new(Notify::new()), tx, Limits::default());
    engine.shutdown(Duration::from_secs(1)).await;
    let h = engine.health().await;
    assert_eq!(h.status, HealthStatus::Unhealthy);
    assert!(!h.processing_verified);
    assert!(
        h.issues.iter().any(|i| i.contains("shutting down")),
        "{:?}",
        h.issues
    );
    assert_eq!(serde_json::to_value(&h).unwrap()["status"], "unhealthy");
}

#[tokio::test(start_paused = true)]
async fn probe_calls_do_not_count_as_user_calls() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = engine(&Arc::new(Notify::new()), tx, Limits::default());
    for _ in 0..3 {
        engine.health().await;
    }
    let m = engine.metrics();
    assert_eq!((m.total, m.active), (0, 0), "{:?}", m.by_status);
    assert!(m.tools.iter().all(|t| t.calls == 0));
}
