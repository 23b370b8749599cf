//! Blocking tools run on the blocking pool: one that ignores its timeout stalls no
//! other call (even on a current_thread runtime), its caller gets `Timeout`, and it is
//! reported stuck once past twice its timeout.

use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tool_dispatch::event::Status;
use tool_dispatch::*;

mod common;
use common::{completed, quick, recorded, spawn, user};

/// The blocking bodies wait on this std channel; the test releases them at the end.
struct Release(Arc<Mutex<std_mpsc::Receiver<()>>>);

fn engine(release: &Release, started: mpsc::UnboundedSender<String>) -> Engine {
    let rx = Arc::clone(&release.0);
    let s = started.clone();
    // Ignores its timeout and cancellation: it returns only when released.
    let stubborn = blocking_fn("stubborn", "Blocks.", move |tag: String, _cx| {
        let _ = s.send(tag.clone());
        let _ = rx.lock().map_err(|e| ToolError::new(e.to_string()))?.recv();
        Ok::<_, ToolError>(tag)
    })
    .settings(ToolSettings::new().timeout(Duration::from_secs(1)));
    let sum = blocking_fn("sum", "Adds up.", |xs: Vec<u64>, _cx| {
        Ok::<_, ToolError>(xs.iter().sum::<u64>())
    });
    let boom = blocking_fn("boom", "Panics.", |_: (), _cx| -> Result<(), ToolError> {
        panic!("blocking body blew up")
    });
    let reg = Registry::builder()
        .tool(stubborn)
        .tool(sum)
        .tool(boom)
        .tool(quick())
        .build()
        .unwrap();
    Engine::builder(reg).build()
}

/// An engine whose `stubborn` bodies block until released; also returns the release
/// (one `send` lets one body return) and the tags of the started `stubborn` bodies.
fn setup() -> (
    Engine,
    std_mpsc::Sender<()>,
    mpsc::UnboundedReceiver<String>,
) {
    let (release_tx, release_rx) = std_mpsc::channel::<()>();
    let release = Release(Arc::new(Mutex::new(release_rx)));
    let (tx, started) = mpsc::unbounded_channel();
    (engine(&release, tx), release_tx, started)
}

/// Waits (without sleeping) until the released blocking bodies have returned and
/// unregistered themselves.
async fn until_no_stuck(engine: &Engine) -> bool {
    for _ in 0..1_000_000 {
        if engine.health().await.stuck_calls.is_empty() {
            return true;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    false
}

#[tokio::test(start_paused = true)]
async fn a_blocking_tool_that_ignores_its_timeout_stalls_nothing_and_is_reported_stuck() {
    let (engine, release_tx, mut started) = setup();
    let (d, sink) = recorded(&engine, user("alice"));
    let (bob, _) = recorded(&engine, user("bob"));

    let stuck = spawn(&d, ToolCall::new("stubborn", json!("s1")).with_id("s1"));
    assert_eq!(started.recv().await.as_deref(), Some("s1"));

    // The runtime (current_thread) is free: async calls and other blocking calls of
    // this and other users complete while the body is blocked.
    for i in 0..50 {
        assert_eq!(
            d.dispatch(ToolCall::new("quick", json!(i)))
                .await
                .unwrap()
                .value,
            json!(i)
        );
    }
    let out = bob
        .dispatch(ToolCall::new("sum", json!([1, 2, 3])))
        .await
        .unwrap();
    assert_eq!(out.value, json!(6));
    assert!(!stuck.is_finished());

    // At its timeout the caller gets `Timeout`, though the body still runs.
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = stuck.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Timeout {
            tool: "stubborn".into(),
            after: Duration::from_secs(1)
        }
    );
    let done = completed(&sink, "s1");
    assert_eq!(done.status, Status::Timeout);
    assert!(done.duration_ms >= 1000.0);
    assert_eq!(engine.active(), 0, "the call is over for the engine");

    // Not stuck yet at exactly 2x its timeout.
    tokio::time::advance(Duration::from_secs(1)).await;
    let h = engine.health().await;
    assert!(h.stuck_calls.is_empty(), "{h:?}");
    assert_eq!(h.status, HealthStatus::Healthy);

    // Past 2x: reported stuck, and the engine is degraded (still processing).
    tokio::time::advance(Duration::from_millis(1)).await;
    let h = engine.health().await;
    assert_eq!(h.stuck_calls.len(), 1, "{h:?}");
    let s = &h.stuck_calls[0];
    assert_eq!(
        (s.call_id.as_str(), s.tool_name.as_str(), s.user_id.as_str()),
        ("s1", "stubborn", "alice")
    );
    assert_eq!(s.timeout_ms, 1000.0);
    assert!(s.running_ms > 2000.0);
    assert_eq!(h.status, HealthStatus::Degraded);
    assert!(h.processing_verified);
    assert!(
        h.issues.iter().any(|i| i.contains("twice their timeout")),
        "{:?}",
        h.issues
    );
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["stuck_calls"][0]["call_id"], "s1");
    assert_eq!(json["status"], "degraded");

    // Still nothing stalls.
    assert!(d.dispatch(ToolCall::new("quick", json!(1))).await.is_ok());

    // Released, the body returns and is no longer reported.
    release_tx.send(()).unwrap();
    assert!(until_no_stuck(&engine).await);
    assert_eq!(engine.health().await.status, HealthStatus::Healthy);
    let m = engine.metrics();
    assert_eq!(m.count(Status::Timeout), 1);
    assert_eq!(m.active, 0);
}

#[tokio::test(start_paused = true)]
async fn many_stuck_blocking_calls_leave_the_runtime_free() {
    let (engine, release_tx, mut started) = setup();
    let (d, _) = recorded(&engine, user("alice"));
    // One body holds the receiver's lock while waiting; the others wait for the lock:
    // all four are blocked on the blocking pool.
    let calls: Vec<_> = (0..4)
        .map(|i| spawn(&d, ToolCall::new("stubborn", json!(format!("s{i}")))))
        .collect();
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    assert_eq!(
        d.dispatch(ToolCall::new("sum", json!([40, 2])))
            .await
            .unwrap()
            .value,
        json!(42)
    );
    tokio::time::advance(Duration::from_millis(2_001)).await;
    for h in calls {
        assert!(matches!(
            h.await.unwrap(),
            Err(DispatchError::Timeout { .. })
        ));
    }
    assert_eq!(engine.health().await.stuck_calls.len(), 4);
    for _ in 0..4 {
        release_tx.send(()).unwrap();
    }
    assert!(until_no_stuck(&engine).await);
}

#[tokio::test(start_paused = true)]
async fn a_blocking_body_that_panics_is_contained() {
    let (engine, _release_tx, _started) = setup();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new("boom", json!(null)).with_id("b"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Panicked);
    assert!(
        !err.to_string().contains("blew up"),
        "panic text stays out of the model's view"
    );
    assert_eq!(completed(&sink, "b").status, Status::Panicked);
    // The engine goes on.
    assert_eq!(
        d.dispatch(ToolCall::new("sum", json!([1])))
            .await
            .unwrap()
            .value,
        json!(1)
    );
    assert!(engine.health().await.stuck_calls.is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_user_ends_their_blocking_call_for_the_caller() {
    let (engine, release_tx, mut started) = setup();
    let (d, sink) = recorded(&engine, user("alice"));
    let h = spawn(&d, ToolCall::new("stubborn", json!("c")).with_id("c"));
    started.recv().await.unwrap();
    assert_eq!(engine.cancel_user("alice").here, 1);
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::User
        }
    );
    assert_eq!(completed(&sink, "c").status, Status::Cancelled);
    release_tx.send(()).unwrap();
    assert!(until_no_stuck(&engine).await);
}

#[tokio::test(start_paused = true)]
async fn a_blocking_call_without_a_real_timeout_is_never_stuck_and_health_does_not_panic() {
    let (engine, release_tx, mut started) = setup();
    let (d, _) = recorded(&engine, user("alice"));
    let call = ToolCall::new("stubborn", json!("forever")).with_timeout(Duration::MAX);
    let h = spawn(&d, call);
    started.recv().await.unwrap();
    tokio::time::advance(Duration::from_secs(86_400)).await;
    let health = engine.health().await;
    assert!(health.stuck_calls.is_empty());
    assert_eq!(health.active_calls, 1);
    release_tx.send(()).unwrap();
    assert_eq!(h.await.unwrap().unwrap().value, json!("forever"));
}
