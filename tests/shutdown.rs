//! `Engine::shutdown(grace)`: stop accepting, wait up to `grace`, cancel the rest,
//! and report exactly what happened.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tool_dispatch::event::Status;
use tool_dispatch::*;

mod common;
use common::{Handle, completed, hold_engine, recorded, report_then_wait, settle, user};

/// `hold` waits for a permit of the gate named in its argument; `quick` returns at once.
fn engine(
    gates: [Arc<Semaphore>; 2],
    started: mpsc::UnboundedSender<String>,
    per_user: usize,
) -> Engine {
    let hold = tool_fn(
        "hold",
        "Waits for the test.",
        move |(tag, gate): (String, usize), _cx| {
            report_then_wait(started.clone(), Arc::clone(&gates[gate]), tag)
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    hold_engine(hold, per_user)
}

/// Spawns a `hold` call with id and tag `id`, waiting on gate `gate`.
fn spawn(d: &Dispatcher, id: &str, gate: usize) -> Handle {
    common::spawn(d, ToolCall::new("hold", json!([id, gate])).with_id(id))
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_the_grace_period_cancels_the_rest_and_reports_it() {
    let released = Arc::new(Semaphore::new(0)); // gate 0: opened during the grace period
    let never = Arc::new(Semaphore::new(0)); // gate 1: never opened
    let (tx, mut started) = mpsc::unbounded_channel();
    let engine = engine([Arc::clone(&released), never], tx, 2);
    let (alice, alice_sink) = recorded(&engine, user("alice"));
    let (bob, bob_sink) = recorded(&engine, user("bob"));
    let (carol, carol_sink) = recorded(&engine, user("carol"));
    // Carol has been here, but has nothing in flight at shutdown.
    carol
        .dispatch(ToolCall::new("quick", json!(1)))
        .await
        .unwrap();

    let a1 = spawn(&alice, "a1", 0);
    assert_eq!(started.recv().await.as_deref(), Some("a1"));
    let a2 = spawn(&alice, "a2", 1);
    assert_eq!(started.recv().await.as_deref(), Some("a2"));
    let a3 = spawn(&alice, "a3", 1); // waits for one of alice's 2 slots
    let b1 = spawn(&bob, "b1", 1);
    assert_eq!(started.recv().await.as_deref(), Some("b1"));
    settle().await;
    assert_eq!(engine.active(), 4);

    let grace = Duration::from_secs(10);
    let t0 = Instant::now();
    let e2 = engine.clone();
    let shutdown = tokio::spawn(async move { e2.shutdown(grace).await });
    settle().await;
    assert!(!shutdown.is_finished());

    // New calls are refused, with their pair of events, for every user.
    let err = carol
        .dispatch(ToolCall::new("quick", json!(2)).with_id("late"))
        .await
        .unwrap_err();
    assert_eq!(err, DispatchError::Unavailable);
    let done = completed(&carol_sink, "late");
    assert_eq!(done.status, Status::Unavailable);
    assert_eq!(done.status.as_str(), "unavailable");
    let err = alice
        .dispatch(ToolCall::new("quick", json!(3)).with_id("a-late"))
        .await
        .unwrap_err();
    assert_eq!(err, DispatchError::Unavailable);
    assert_eq!(completed(&alice_sink, "a-late").status, Status::Unavailable);

    // a1 finishes within the grace period; a3 then takes its slot and hangs.
    tokio::time::advance(Duration::from_secs(3)).await;
    released.add_permits(1);
    assert_eq!(a1.await.unwrap().unwrap().value, json!("a1"));
    assert_eq!(started.recv().await.as_deref(), Some("a3"));

    // At the end of the grace period the rest is cancelled.
    let report = shutdown.await.unwrap();
    assert_eq!(t0.elapsed(), grace);
    for (h, sink, id) in [
        (a2, &alice_sink, "a2"),
        (a3, &alice_sink, "a3"),
        (b1, &bob_sink, "b1"),
    ] {
        let err = h.await.unwrap().unwrap_err();
        assert_eq!(
            err,
            DispatchError::Cancelled {
                reason: CancelReason::Shutdown
            },
            "{id}"
        );
        assert_eq!(completed(sink, id).status, Status::Cancelled);
    }
    assert_eq!(completed(&alice_sink, "a1").status, Status::Success);

    assert_eq!(report.in_flight, 4);
    assert_eq!(report.completed, 1);
    assert_eq!(report.cancelled, 3);
    assert_eq!(report.affected_users, ["alice", "bob"]);
    let alice_r = report.per_user["alice"];
    assert_eq!((alice_r.completed, alice_r.cancelled), (1, 2));
    let bob_r = report.per_user["bob"];
    assert_eq!((bob_r.completed, bob_r.cancelled), (0, 1));
    assert!(!report.per_user.contains_key("carol"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["per_user"]["alice"]["cancelled"], 2);

    // After shutdown: nothing in flight, every new call refused with its events.
    assert_eq!(engine.active(), 0);
    let (dave, dave_sink) = recorded(&engine, user("dave"));
    let err = dave
        .dispatch(ToolCall::new("hold", json!(["d1", 0])).with_id("d1"))
        .await
        .unwrap_err();
    assert_eq!(err, DispatchError::Unavailable);
    assert!(!err.is_retryable());
    assert_eq!(completed(&dave_sink, "d1").status, Status::Unavailable);
    assert!(
        started.try_recv().is_err(),
        "no tool body ran after shutdown"
    );

    let m = engine.metrics();
    assert_eq!(m.count(Status::Unavailable), 3);
    assert_eq!(m.count(Status::Cancelled), 3);
    assert_eq!(m.count(Status::Success), 2);
    assert_eq!((m.total, m.active), (8, 0));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_as_soon_as_the_last_call_ends() {
    let released = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let engine = engine([Arc::clone(&released), Arc::clone(&released)], tx, 10);
    let alice = engine
        .dispatcher()
        .sink(RecordingSink::new())
        .user(user("alice"));
    let calls: Vec<Handle> = (0..3).map(|i| spawn(&alice, &format!("c{i}"), 0)).collect();
    for _ in 0..3 {
        started.recv().await.unwrap();
    }
    let t0 = Instant::now();
    let e2 = engine.clone();
    let shutdown = tokio::spawn(async move { e2.shutdown(Duration::from_secs(30)).await });
    settle().await;
    tokio::time::advance(Duration::from_secs(2)).await;
    released.add_permits(3);
    let report = shutdown.await.unwrap();
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(2),
        "did not wait out the grace period"
    );
    for h in calls {
        h.await.unwrap().unwrap();
    }
    assert_eq!(
        (report.in_flight, report.completed, report.cancelled),
        (3, 3, 0)
    );
    assert_eq!(report.affected_users, ["alice"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_of_an_idle_engine_reports_nothing_and_is_immediate() {
    let (tx, _started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let engine = engine([Arc::clone(&gate), gate], tx, 10);
    let t0 = Instant::now();
    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(
        (report.in_flight, report.completed, report.cancelled),
        (0, 0, 0)
    );
    assert!(report.affected_users.is_empty() && report.per_user.is_empty());
    // A second shutdown is harmless.
    let again = engine.shutdown(Duration::ZERO).await;
    assert_eq!(again.in_flight, 0);
}
