//! `Engine::cancel_user`: ends every in-flight call of one user (running or waiting
//! for a slot), each with a `cancelled` event, and touches no other user.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tool_dispatch::event::Status;
use tool_dispatch::*;

mod common;
use common::{Handle, completed, hold, hold_engine, recorded, settle, user};

/// `hold` reports its start and waits for a permit of the gate (it ignores
/// cancellation on purpose); `quick` returns at once; `polite` ends itself when told.
fn engine(gate: &Arc<Semaphore>, started: mpsc::UnboundedSender<String>) -> Engine {
    let hold = hold(
        gate,
        started,
        ToolSettings::new().timeout(Duration::from_secs(3600)),
    );
    hold_engine(hold, 3)
}

/// Spawns a `hold` call with id and tag `id`.
fn spawn(d: &Dispatcher, id: &str) -> Handle {
    common::spawn(d, ToolCall::new("hold", json!(id)).with_id(id))
}

#[tokio::test(start_paused = true)]
async fn cancel_user_ends_only_that_users_calls_and_counts_them() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let engine = engine(&gate, tx);
    let (alice, alice_sink) = recorded(&engine, user("alice"));
    let (bob, bob_sink) = recorded(&engine, user("bob"));

    let mut alice_calls = Vec::new();
    for id in ["a1", "a2", "a3"] {
        alice_calls.push(spawn(&alice, id));
        assert_eq!(started.recv().await.as_deref(), Some(id));
    }
    // The fourth waits for one of alice's three slots.
    alice_calls.push(spawn(&alice, "a4"));
    let mut bob_calls = Vec::new();
    for id in ["b1", "b2"] {
        bob_calls.push(spawn(&bob, id));
        assert_eq!(started.recv().await.as_deref(), Some(id));
    }
    settle().await;
    assert_eq!(engine.active(), 6);

    assert_eq!(engine.cancel_user("alice"), 4);
    for (h, id) in alice_calls.into_iter().zip(["a1", "a2", "a3", "a4"]) {
        let err = h.await.unwrap().unwrap_err();
        assert_eq!(
            err,
            DispatchError::Cancelled {
                reason: CancelReason::User
            },
            "{id}"
        );
        let done = completed(&alice_sink, id);
        assert_eq!(done.status, Status::Cancelled);
        assert_eq!(done.status.as_str(), "cancelled");
        assert!(done.error.is_some());
    }
    assert_eq!(alice_sink.len(), 8, "exactly one pair per call");
    assert!(
        started.try_recv().is_err(),
        "the waiting call never started"
    );

    // Bob's calls are untouched: still running, and they finish normally.
    settle().await;
    assert_eq!(engine.active(), 2);
    assert!(bob_calls.iter().all(|h| !h.is_finished()));
    assert!(
        bob_sink
            .events()
            .iter()
            .all(|e| e.kind() == "tool_executing")
    );
    gate.add_permits(2);
    for h in bob_calls {
        h.await.unwrap().unwrap();
    }
    assert!(completed(&bob_sink, "b1").status == Status::Success);

    // Alice's later calls run normally (fresh cancellation token, slots released).
    assert_eq!(engine.cancel_user("alice"), 0);
    let out = alice
        .dispatch(ToolCall::new("quick", json!(5)))
        .await
        .unwrap();
    assert_eq!(out.value, json!(5));
    let later: Vec<Handle> = ["a5", "a6", "a7"]
        .iter()
        .map(|id| spawn(&alice, id))
        .collect();
    for _ in 0..3 {
        started.recv().await.unwrap();
    }
    gate.add_permits(3);
    for h in later {
        h.await.unwrap().unwrap();
    }

    let m = engine.metrics();
    assert_eq!(m.count(Status::Cancelled), 4);
    assert_eq!(m.count(Status::Success), 2 + 1 + 3);
    assert_eq!((m.total, m.active), (10, 0));
    assert_eq!(engine.cancel_user("nobody-here"), 0);
}

#[tokio::test(start_paused = true)]
async fn cancel_user_spans_all_of_that_users_dispatchers_and_tools_see_it() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let engine = engine(&gate, tx);
    // Two requests (two dispatchers, two sockets) of the same user.
    let s1 = RecordingSink::new();
    let s2 = RecordingSink::new();
    let tab1 = engine.dispatcher().sink(s1.clone()).user(user("alice"));
    let tab2 = engine.dispatcher().sink(s2.clone()).user(user("alice"));
    let h1 = spawn(&tab1, "t1");
    started.recv().await.unwrap();
    let h2 = spawn(&tab2, "t2");
    started.recv().await.unwrap();
    assert_eq!(engine.cancel_user("alice"), 2);
    assert!(matches!(
        h1.await.unwrap(),
        Err(DispatchError::Cancelled { .. })
    ));
    assert!(matches!(
        h2.await.unwrap(),
        Err(DispatchError::Cancelled { .. })
    ));
    assert_eq!(completed(&s1, "t1").status, Status::Cancelled);
    assert_eq!(completed(&s2, "t2").status, Status::Cancelled);
    assert_eq!(engine.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cooperative_tool_observes_the_cancellation() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<bool>();
    let (start_tx, mut start) = mpsc::unbounded_channel::<()>();
    let polite = tool_fn(
        "polite",
        "Stops when asked.",
        move |_: (), cx: ToolContext| {
            let (seen_tx, start_tx) = (seen_tx.clone(), start_tx.clone());
            async move {
                let _ = start_tx.send(());
                // Report from a guard: the pipeline drops this future once cancelled.
                struct Report(ToolContext, mpsc::UnboundedSender<bool>);
                impl Drop for Report {
                    fn drop(&mut self) {
                        let _ = self.1.send(self.0.is_cancelled());
                    }
                }
                let _report = Report(cx.clone(), seen_tx);
                cx.cancelled().await;
                Ok::<_, ToolError>(())
            }
        },
    );
    let reg = Registry::builder().tool(polite).build().unwrap();
    let engine = Engine::builder(reg).build();
    let d = engine
        .dispatcher()
        .sink(RecordingSink::new())
        .user(user("alice"));
    let d2 = d.clone();
    let h = tokio::spawn(async move { d2.dispatch(ToolCall::new("polite", json!(null))).await });
    start.recv().await.unwrap();
    assert_eq!(engine.cancel_user("alice"), 1);
    assert!(matches!(
        h.await.unwrap(),
        Err(DispatchError::Cancelled {
            reason: CancelReason::User
        })
    ));
    assert_eq!(seen.recv().await, Some(true));
}
