//! A policy is code we call: one that never answers, answers late or panics must cost
//! only its own call, under the call's deadline, cancellation and shutdown.

mod common;

use common::*;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tool_dispatch::event::Status;
use tool_dispatch::*;
use tool_dispatch::{BoxFuture, PolicyError, PolicyRequest};

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
    assert_eq!(engine.cancel_user("alice").here, 1);
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

// ---------------------------------------------------------------- permissions

#[tokio::test]
async fn a_user_missing_a_scope_is_denied_naming_it_and_the_body_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let write = counting(
        "write_file",
        &runs,
        ToolSettings::new().scope("files:read").scope("files:write"),
    );
    let engine = plain_engine(Registry::builder().tool(write).build().unwrap());
    let sink = RecordingSink::new();
    let reader = UserContext::builder("alice")
        .scope("files:read")
        .build()
        .unwrap();
    let d = engine.dispatcher().sink(sink.clone()).user(reader);

    let err = d
        .dispatch(ToolCall::new("write_file", json!("x")))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        DispatchError::Denied {
            tool: "write_file".into(),
            missing_scopes: vec!["files:write".into()],
            reason: None,
        }
    );
    assert!(err.to_string().contains("files:write"), "{err}");
    assert!(!err.to_string().contains("files:read"), "{err}");
    let done = pair(&sink.take());
    assert_eq!(done.status, Status::Denied);
    assert_eq!(runs.load(SeqCst), 0);
    let m = engine.metrics();
    assert_eq!((m.by_status["denied"], m.total), (1, 1));

    // Holding both scopes, the same call runs.
    let writer = UserContext::builder("bob")
        .scopes(["files:read", "files:write"])
        .build()
        .unwrap();
    let d = engine.dispatcher().user(writer).sink(sink.clone());
    assert_eq!(
        d.dispatch(ToolCall::new("write_file", json!("x")))
            .await
            .unwrap()
            .value,
        "x"
    );
    assert_eq!(runs.load(SeqCst), 1);
}

/// Allows `pro` users, whatever scopes the tool asks for; awaits before deciding.
struct TierPolicy;

impl Policy for TierPolicy {
    fn check<'a>(&'a self, req: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            match req.user.metadata("tier") {
                Some("pro") => Ok(Decision::Allow),
                Some("broken") => Err(PolicyError("the plans database is down".into())),
                Some("explode") => panic!("policy bug"),
                _ => Ok(Decision::deny("a pro plan is required")),
            }
        })
    }
}

/// Panics before returning its future.
struct PanicsEagerly;

impl Policy for PanicsEagerly {
    fn check<'a>(
        &'a self,
        _req: PolicyRequest<'a>,
    ) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        panic!("policy bug, eagerly")
    }
}

#[tokio::test]
async fn a_custom_async_policy_replaces_the_default_and_fails_closed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let admin = || counting("admin", &runs, ToolSettings::new().scope("admin"));
    let engine = Engine::builder(Registry::builder().tool(admin()).build().unwrap())
        .policy(TierPolicy)
        .build();
    let with_tier = |id: &str, tier: &str, sink: &RecordingSink| {
        let ctx = UserContext::builder(id)
            .metadata("tier", tier)
            .scope("admin")
            .build()
            .unwrap();
        engine.dispatcher().sink(sink.clone()).user(ctx)
    };
    let sink = RecordingSink::new();

    // A pro user without the tool's scope is allowed: the default policy is replaced.
    let pro = engine.dispatcher().sink(sink.clone()).user(
        UserContext::builder("pro")
            .metadata("tier", "pro")
            .build()
            .unwrap(),
    );
    assert_eq!(
        pro.dispatch(ToolCall::new("admin", json!(1)))
            .await
            .unwrap()
            .value,
        1
    );
    assert_eq!(pair(&sink.take()).status, Status::Success);

    // A free user holding the scope is denied with the policy's reason.
    let err = with_tier("free", "free", &sink)
        .dispatch(ToolCall::new("admin", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        DispatchError::Denied {
            tool: "admin".into(),
            missing_scopes: vec![],
            reason: Some("a pro plan is required".into()),
        }
    );
    assert_eq!(pair(&sink.take()).status, Status::Denied);

    // A policy error and a panicking policy deny, without leaking their details.
    for tier in ["broken", "explode"] {
        let err = with_tier(tier, tier, &sink)
            .dispatch(ToolCall::new("admin", json!(1)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DispatchError::Denied { .. }),
            "{tier}: {err:?}"
        );
        assert!(!err.to_string().contains("database"), "{err}");
        assert_eq!(pair(&sink.take()).status, Status::Denied);
    }
    let eager = Engine::builder(Registry::builder().tool(admin()).build().unwrap())
        .policy(PanicsEagerly)
        .build();
    let d = eager
        .dispatcher()
        .sink(sink.clone())
        .user(user_in_run("alice"));
    let err = d
        .dispatch(ToolCall::new("admin", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::Denied { .. }), "{err:?}");
    assert_eq!(pair(&sink.take()).status, Status::Denied);

    assert_eq!(runs.load(SeqCst), 1, "only the pro call ran");
    assert_eq!(engine.metrics().count(Status::Denied), 3);
    assert_eq!(eager.metrics().count(Status::Denied), 1);
}
