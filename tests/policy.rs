//! A policy is code we call: one that never answers, answers late or panics must cost
//! only its own call, under the call's deadline, cancellation and shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use serde_json::json;
use tool_dispatch::event::Status;
use tool_dispatch::*;
use tool_dispatch::{BoxFuture, PolicyRequest};

/// Never answers.
struct Silent {
    asked: Arc<AtomicUsize>,
}

impl Policy for Silent {
    fn check<'a>(&'a self, _: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        self.asked.fetch_add(1, SeqCst);
        Box::pin(std::future::pending())
    }
}

fn silent_engine() -> (Engine, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let reg = Registry::builder().tool(quick()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(10)))
        .policy(Silent {
            asked: Arc::clone(&asked),
        })
        .build();
    (engine, asked)
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_never_answers_ends_the_call_at_its_timeout() {
    let (engine, asked) = silent_engine();
    let (d, sink) = recorded(&engine, user("alice"));
    let t0 = tokio::time::Instant::now();
    let err = d
        .dispatch(
            ToolCall::new("quick", json!(1))
                .with_id("p1")
                .with_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::Timeout { .. }), "{err:?}");
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(asked.load(SeqCst), 1);
    assert_eq!(completed(&sink, "p1").status, Status::Timeout);
    let m = engine.metrics();
    assert_eq!((m.count(Status::Timeout), m.active), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn cancel_user_reaches_a_call_waiting_on_the_policy() {
    let (engine, _) = silent_engine();
    let (d, sink) = recorded(&engine, user("alice"));
    let call = spawn(&d, ToolCall::new("quick", json!(1)).with_id("p1"));
    settle().await;
    assert_eq!(engine.cancel_user("alice"), 1);
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            DispatchError::Cancelled {
                reason: CancelReason::User
            }
        ),
        "{err:?}"
    );
    assert_eq!(completed(&sink, "p1").status, Status::Cancelled);
    assert_eq!(engine.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_calls_waiting_on_the_policy_and_reports_them() {
    let (engine, _) = silent_engine();
    let (alice, alice_sink) = recorded(&engine, user("alice"));
    let (bob, _) = recorded(&engine, user("bob"));
    let calls = vec![
        spawn(&alice, ToolCall::new("quick", json!(1)).with_id("a1")),
        spawn(&alice, ToolCall::new("quick", json!(2)).with_id("a2")),
        spawn(&bob, ToolCall::new("quick", json!(3)).with_id("b1")),
    ];
    settle().await;
    let report = engine.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.in_flight, 3);
    assert_eq!((report.cancelled, report.completed), (3, 0));
    assert_eq!(report.still_active, 0);
    assert_eq!(report.affected_users, ["alice", "bob"]);
    assert_eq!(engine.active(), 0);
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::Cancelled {
                    reason: CancelReason::Shutdown
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(completed(&alice_sink, "a2").status, Status::Cancelled);
}

/// Answers only after a long wait, then panics: the pending wait is bounded by the
/// call's timeout, and a panic inside the policy's future denies (fails closed).
struct LateThenPanics;

impl Policy for LateThenPanics {
    fn check<'a>(&'a self, req: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async move {
            if req.arguments == &json!("slow") {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            panic!("policy bug");
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_panics_late_or_answers_after_the_deadline_costs_only_its_call() {
    let any = tool_fn(
        "quick",
        "Any input.",
        |v: serde_json::Value, _| async move { Ok::<_, ToolError>(v) },
    );
    let reg = Registry::builder().tool(any).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(10)))
        .policy(LateThenPanics)
        .build();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new("quick", json!(1)).with_id("now"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Denied);
    assert_eq!(
        err.to_string(),
        "permission denied for `quick`: permission check failed"
    );
    let t0 = tokio::time::Instant::now();
    let err = d
        .dispatch(
            ToolCall::new("quick", json!("slow"))
                .with_id("slow")
                .with_timeout(Duration::from_millis(250)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    assert_eq!(t0.elapsed(), Duration::from_millis(250));
    // A future dropped while the policy waits is paired as cancelled.
    let mut fut = Box::pin(d.dispatch(ToolCall::new("quick", json!("slow")).with_id("drop")));
    assert!(poll_once(&mut fut).await.is_pending());
    drop(fut);
    assert_eq!(completed(&sink, "now").status, Status::Denied);
    assert_eq!(completed(&sink, "slow").status, Status::Timeout);
    assert_eq!(completed(&sink, "drop").status, Status::Cancelled);
    assert_eq!(engine.active(), 0);
}
