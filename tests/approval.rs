//! Human approval: a call that needs its user's yes waits for it, holding no slot, and
//! every way the wait can end keeps the pair, the accounting and its own status.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use serde_json::json;
use tool_dispatch::event::{ApprovalOutcome, Event, Status, ToolApprovalRequired, ToolCompleted};
use tool_dispatch::*;

const NOPE: Result<(), ApprovalError> = Err(ApprovalError::NoSuchPendingApproval);

/// `send` (needs approval; counts its runs; sleeps `ms` milliseconds given as input,
/// with a 1 s timeout), `quick`, and `hold`-free tools only.
fn engine_with(
    runs: &Arc<AtomicUsize>,
    builder: impl FnOnce(EngineBuilder) -> EngineBuilder,
) -> Engine {
    let runs = Arc::clone(runs);
    let send = tool_fn("send", "Sends mail.", move |ms: u64, _cx| {
        let runs = Arc::clone(&runs);
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, ToolError>("sent")
        }
    })
    .settings(
        ToolSettings::new()
            .requires_approval("sends an email in your name")
            .timeout(Duration::from_secs(1)),
    );
    let reg = Registry::builder()
        .tool(send)
        .tool(quick())
        .build()
        .unwrap();
    builder(Engine::builder(reg).limits(Limits::default().per_user(no_rate(10)))).build()
}

fn call(id: &str) -> ToolCall {
    ToolCall::new("send", json!(0)).with_id(id)
}

/// Waits (yielding, so spawned calls run) for the approval request of `call_id`.
async fn requested(sink: &RecordingSink, call_id: &str) -> ToolApprovalRequired {
    for _ in 0..100_000 {
        let found = sink.events().into_iter().find_map(|e| match e {
            Event::ToolApprovalRequired(r) if &*r.call_id == call_id => Some(r),
            _ => None,
        });
        if let Some(r) = found {
            return r;
        }
        tokio::task::yield_now().await;
    }
    panic!("no approval request for {call_id}: {:?}", sink.events());
}

/// The events of `call_id`: `tool_executing`, `tool_approval_required` (when it got
/// that far), then `tool_completed`, nothing else; returns the completion.
#[track_caller]
fn gated_pair(sink: &RecordingSink, call_id: &str, asked: bool) -> ToolCompleted {
    let events: Vec<Event> = sink
        .events()
        .into_iter()
        .filter(|e| e.call_id() == Some(call_id))
        .collect();
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    let Some(Event::ToolCompleted(done)) = events.last() else {
        panic!("{call_id}: no completion last: {kinds:?}");
    };
    // A decision (approved, rejected, expired) is told to every view at once; a call
    // that stopped waiting for another reason says so in its completion only.
    let decided = done
        .approval
        .as_ref()
        .is_some_and(|a| a.decision != ApprovalOutcome::Withdrawn);
    let want: &[&str] = match (asked, decided) {
        (false, _) => &["tool_executing", "tool_completed"],
        (true, false) => &["tool_executing", "tool_approval_required", "tool_completed"],
        (true, true) => &[
            "tool_executing",
            "tool_approval_required",
            "tool_approval_resolved",
            "tool_completed",
        ],
    };
    assert_eq!(kinds, want, "{call_id}");
    if let Some(Event::ToolApprovalResolved(r)) = events.get(2) {
        assert_eq!(
            Some(r.decision),
            done.approval.as_ref().map(|a| a.decision),
            "{call_id}"
        );
    }
    done.clone()
}

#[track_caller]
fn accounted(engine: &Engine) -> MetricsSnapshot {
    let m = engine.metrics();
    assert_eq!(m.total, m.by_status.values().sum::<u64>(), "{m:?}");
    m
}

#[tokio::test]
async fn approved_the_call_runs_once_and_its_completion_says_so() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (d, sink) = recorded(&engine, user_in_run("alice"));
    let pending = spawn(&d, call("c1"));
    let req = requested(&sink, "c1").await;
    assert_eq!(req.reason, "sends an email in your name");
    assert_eq!(req.run_id.as_deref(), Some("run_alice"));
    let (asked, expires) = (
        req.timestamp.as_system_time(),
        req.expires_at.unwrap().as_system_time(),
    );
    let window = expires.duration_since(asked).unwrap();
    assert!(
        window.abs_diff(Duration::from_secs(300)) < Duration::from_millis(2),
        "the engine's default window: {window:?}"
    );
    assert_eq!(engine.metrics().awaiting_approval, 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "nothing runs before the decision"
    );

    assert_eq!(
        engine
            .resolve_approval("alice", "c1", Verdict::Approve)
            .await,
        Ok(())
    );
    assert_eq!(
        engine
            .resolve_approval("alice", "c1", Verdict::Approve)
            .await,
        NOPE,
        "taken once"
    );
    let out = pending.await.unwrap().unwrap();
    assert_eq!(out.value, json!("sent"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let done = gated_pair(&sink, "c1", true);
    assert_eq!(done.status, Status::Success);
    assert_eq!(done.approval.unwrap().decision, ApprovalOutcome::Approved);
    let m = accounted(&engine);
    assert_eq!(
        (m.awaiting_approval, m.approvals.approved, m.active),
        (0, 1, 0)
    );
}

#[tokio::test]
async fn rejected_the_model_gets_the_users_words_and_the_tool_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (d, sink) = recorded(&engine, user("alice"));
    let pending = spawn(&d, call("c1"));
    requested(&sink, "c1").await;
    let no = Verdict::Reject {
        message: Some("not to my boss".into()),
    };
    assert_eq!(engine.resolve_approval("alice", "c1", no).await, Ok(()));
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.status(), Status::Rejected);
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("rejected") && text.contains("not to my boss"),
        "{text}"
    );
    let done = gated_pair(&sink, "c1", true);
    assert_eq!(
        (done.status, done.error.as_deref()),
        (Status::Rejected, Some(&*text))
    );
    assert_eq!(done.approval.unwrap().decision, ApprovalOutcome::Rejected);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let calls = vec![call("c1")];
    let rendered = provider::openai::render_results(&calls, &[Err(err)]);
    assert!(
        rendered[0]["content"]
            .as_str()
            .unwrap()
            .contains("not to my boss")
    );
    assert_eq!(accounted(&engine).approvals.rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn nobody_answering_ends_approval_timeout_which_says_it_was_not_the_user() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| {
        b.approval_wait(ApprovalWait::Within(Duration::from_secs(60)))
    });
    let (d, sink) = recorded(&engine, user("alice"));
    let t0 = tokio::time::Instant::now();
    let err = d.dispatch(call("c1")).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(60));
    assert_eq!(err.status(), Status::ApprovalTimeout);
    assert!(err.to_string().contains("was not run"), "{err}");
    assert!(err.to_string().contains("not the user's decision"), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let done = gated_pair(&sink, "c1", true);
    assert_eq!(done.approval.unwrap().decision, ApprovalOutcome::Expired);
    assert_eq!(
        engine
            .resolve_approval("alice", "c1", Verdict::Approve)
            .await,
        NOPE,
        "too late"
    );
    let m = accounted(&engine);
    assert_eq!(
        (m.by_status["approval_timeout"], m.approvals.expired),
        (1, 1)
    );
}

/// The window: a policy's decision over the tool's setting over the engine's default;
/// zero ends at once, `MAX` and `Forever` never on their own.
#[tokio::test(start_paused = true)]
async fn the_window_comes_from_the_decision_then_the_tool_then_the_engine() {
    struct Quick;
    impl Policy for Quick {
        fn check<'a>(
            &'a self,
            req: PolicyRequest<'a>,
        ) -> BoxFuture<'a, Result<Decision, PolicyError>> {
            let wait = match req.arguments.as_u64() {
                Some(1) => Some(ApprovalWait::Within(Duration::from_secs(5))),
                Some(2) => Some(ApprovalWait::Within(Duration::ZERO)),
                Some(3) => Some(ApprovalWait::Within(Duration::MAX)),
                Some(4) => Some(ApprovalWait::Forever),
                _ => None,
            };
            Box::pin(async move {
                Ok(Decision::RequireApproval {
                    reason: "policy".into(),
                    wait,
                })
            })
        }
    }
    let tool = tool_fn("t", "T.", |_: u64, _cx| async { Ok::<_, ToolError>(()) })
        .settings(ToolSettings::new().approval_wait(ApprovalWait::Within(Duration::from_secs(30))));
    let reg = Registry::builder().tool(tool).build().unwrap();
    let engine = Engine::builder(reg).policy(Quick).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let started = tokio::time::Instant::now();
    for (n, window) in [(0, 30), (1, 5), (2, 0)] {
        let t0 = tokio::time::Instant::now();
        let id = format!("w{n}");
        let err = d
            .dispatch(ToolCall::new("t", json!(n)).with_id(&id))
            .await
            .unwrap_err();
        assert_eq!(
            (err.status(), t0.elapsed()),
            (Status::ApprovalTimeout, Duration::from_secs(window))
        );
        assert_eq!(requested(&sink, &id).await.reason, "policy");
    }
    // MAX and Forever: still waiting a year later, then cancelled.
    let a = spawn(&d, ToolCall::new("t", json!(3)).with_id("w3"));
    let b = spawn(&d, ToolCall::new("t", json!(4)).with_id("w4"));
    assert!(requested(&sink, "w4").await.expires_at.is_none());
    requested(&sink, "w3").await;
    tokio::time::sleep(Duration::from_secs(365 * 86_400)).await;
    assert_eq!(engine.metrics().awaiting_approval, 2);
    assert_eq!(engine.cancel_user("alice").here, 2);
    for h in [a, b] {
        assert_eq!(h.await.unwrap().unwrap_err().status(), Status::Cancelled);
    }
    assert!(started.elapsed() >= Duration::from_secs(365 * 86_400));
    assert_eq!(accounted(&engine).approvals.withdrawn, 2);
}

#[tokio::test]
async fn cancel_user_cancel_run_shutdown_and_a_dropped_future_end_the_wait() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (alice, sink) = recorded(&engine, user_in_run("alice"));

    let h = spawn(&alice, call("by_user"));
    requested(&sink, "by_user").await;
    assert_eq!(engine.cancel_user("alice").here, 1);
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::User
        }
    );

    let h = spawn(&alice, call("by_run"));
    requested(&sink, "by_run").await;
    assert_eq!(engine.cancel_run("alice", "run_alice").here, 1);
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::Run
        }
    );

    let mut dropped = alice.dispatch(call("dropped"));
    assert!(poll_once(&mut dropped).await.is_pending());
    requested(&sink, "dropped").await;
    drop(dropped);

    let h = spawn(&alice, call("by_shutdown"));
    requested(&sink, "by_shutdown").await;
    let report = engine.shutdown(Duration::ZERO).await;
    assert_eq!(report.in_flight, 1, "{report:?}");
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::Shutdown
        }
    );

    for id in ["by_user", "by_run", "dropped", "by_shutdown"] {
        let done = gated_pair(&sink, id, true);
        assert_eq!(done.status, Status::Cancelled, "{id}");
        assert_eq!(
            done.approval.unwrap().decision,
            ApprovalOutcome::Withdrawn,
            "{id}"
        );
        assert_eq!(
            engine.resolve_approval("alice", id, Verdict::Approve).await,
            NOPE,
            "{id}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let m = accounted(&engine);
    assert_eq!(
        (m.awaiting_approval, m.approvals.withdrawn, m.active),
        (0, 4, 0)
    );
}

/// A sink that takes everything but approval requests.
#[derive(Clone, Default)]
struct NoRequests(RecordingSink);

impl EventSink for NoRequests {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        match event {
            Event::ToolApprovalRequired(_) => Err(TrySendError::Closed(event)),
            e => self.0.try_send(e),
        }
    }
}

#[tokio::test]
async fn an_undeliverable_request_ends_undelivered_and_the_tool_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let sink = NoRequests::default();
    let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));
    let err = d.dispatch(call("c1")).await.unwrap_err();
    assert!(
        matches!(err, DispatchError::Undelivered(SinkError::Closed)),
        "{err:?}"
    );
    let done = gated_pair(&sink.0, "c1", false);
    assert_eq!(done.status, Status::Undelivered);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        engine
            .resolve_approval("alice", "c1", Verdict::Approve)
            .await,
        NOPE
    );
    let m = accounted(&engine);
    assert_eq!(
        (
            m.by_status["undelivered"],
            m.sink_failures,
            m.awaiting_approval
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn past_the_cap_a_call_that_needs_approval_is_busy() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b.max_pending_approvals(2));
    let (alice, sink) = recorded(&engine, user("alice"));
    let (bob, bob_sink) = recorded(&engine, user("bob"));
    let waiting = [spawn(&alice, call("a1")), spawn(&alice, call("a2"))];
    requested(&sink, "a1").await;
    requested(&sink, "a2").await;
    let err = alice.dispatch(call("a3")).await.unwrap_err();
    assert!(
        matches!(
            err,
            DispatchError::Busy {
                scope: LimitScope::Approvals,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(gated_pair(&sink, "a3", false).status, Status::Busy);
    // The cap is per user: bob may still ask.
    let b = spawn(&bob, call("b1"));
    requested(&bob_sink, "b1").await;
    for (user, id) in [("alice", "a1"), ("alice", "a2"), ("bob", "b1")] {
        engine
            .resolve_approval(user, id, Verdict::Approve)
            .await
            .unwrap();
    }
    for h in waiting.into_iter().chain([b]) {
        assert!(h.await.unwrap().is_ok());
    }
    // Freed: alice may ask again.
    let again = spawn(&alice, call("a4"));
    requested(&sink, "a4").await;
    engine
        .resolve_approval("alice", "a4", Verdict::Approve)
        .await
        .unwrap();
    assert!(again.await.unwrap().is_ok());
    assert_eq!(accounted(&engine).by_status["busy"], 1);
}

#[tokio::test]
async fn a_call_waiting_for_approval_holds_no_slot() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| {
        b.limits(
            Limits::default()
                .per_user(no_rate(1))
                .global(1)
                .max_wait(Duration::ZERO),
        )
    });
    let (alice, sink) = recorded(&engine, user("alice"));
    let waiting = spawn(&alice, call("gated"));
    requested(&sink, "gated").await;
    // Per-user and global limits of 1, no waiting for a slot: the next ungated call
    // of the same user would be `busy` if the waiting call held one.
    let out = alice
        .dispatch(ToolCall::new("quick", json!(7)))
        .await
        .unwrap();
    assert_eq!(out.value, json!(7));
    let (bob, _) = recorded(&engine, user("bob"));
    assert!(bob.dispatch(ToolCall::new("quick", json!(8))).await.is_ok());
    engine
        .resolve_approval("alice", "gated", Verdict::Approve)
        .await
        .unwrap();
    assert!(waiting.await.unwrap().is_ok());
}

#[tokio::test]
async fn bob_cannot_answer_for_alice_and_learns_nothing_from_trying() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (alice, sink) = recorded(&engine, user("alice"));
    let pending = spawn(&alice, call("c1"));
    requested(&sink, "c1").await;
    let foreign = engine.resolve_approval("bob", "c1", Verdict::Approve).await;
    let unknown = engine
        .resolve_approval("bob", "c_never", Verdict::Approve)
        .await;
    assert_eq!(
        foreign, unknown,
        "the same answer for a foreign call and no call"
    );
    assert_eq!(foreign.unwrap_err().to_string(), "no such pending approval");
    for absurd in ["", "x".repeat(1 << 20).as_str(), "c1\0", "../alice/c1"] {
        assert_eq!(
            engine
                .resolve_approval("alice", absurd, Verdict::Approve)
                .await,
            NOPE
        );
        assert_eq!(
            engine
                .resolve_approval(absurd, "c1", Verdict::Approve)
                .await,
            NOPE
        );
    }
    assert_eq!(
        engine.metrics().awaiting_approval,
        1,
        "still waiting for alice"
    );
    let huge = Verdict::Reject {
        message: Some("no ".repeat(1 << 20)),
    };
    engine.resolve_approval("alice", "c1", huge).await.unwrap();
    let err = pending.await.unwrap().unwrap_err();
    assert!(
        err.to_string().len() < 20_000,
        "the message is cut like every event text"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_tools_timeout_counts_from_the_approval() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (alice, sink) = recorded(&engine, user("alice"));
    // The tool's timeout is 1 s; the decision comes after 10 s; the body takes 0.8 s.
    let in_time = spawn(&alice, ToolCall::new("send", json!(800)).with_id("in_time"));
    let too_slow = spawn(
        &alice,
        ToolCall::new("send", json!(1500)).with_id("too_slow"),
    );
    requested(&sink, "in_time").await;
    requested(&sink, "too_slow").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    engine
        .resolve_approval("alice", "in_time", Verdict::Approve)
        .await
        .unwrap();
    engine
        .resolve_approval("alice", "too_slow", Verdict::Approve)
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    assert_eq!(in_time.await.unwrap().unwrap().value, json!("sent"));
    let err = too_slow.await.unwrap().unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(1),
        "one timeout after the approval"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn in_a_batch_each_call_is_decided_on_its_own_and_results_keep_call_order() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (alice, sink) = recorded(&engine, user("alice"));
    let batch = vec![
        call("a"),
        ToolCall::new("quick", json!(1)).with_id("q"),
        call("b"),
    ];
    let all = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.dispatch_all(batch).await })
    };
    requested(&sink, "b").await;
    requested(&sink, "a").await;
    // b first, then a: the order of decisions does not change the order of results.
    let no = Verdict::Reject { message: None };
    engine.resolve_approval("alice", "b", no).await.unwrap();
    engine
        .resolve_approval("alice", "a", Verdict::Approve)
        .await
        .unwrap();
    let results = all.await.unwrap();
    assert_eq!(results[0].as_ref().unwrap().value, json!("sent"));
    assert_eq!(results[1].as_ref().unwrap().value, json!(1));
    assert_eq!(results[2].as_ref().unwrap_err().status(), Status::Rejected);
    assert_paired(&sink.events());
}

/// What happens to one call of the random mix.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Ungated,
    Approve,
    Reject,
    Expire,
    CancelRun,
    Drop,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        Just(Fate::Ungated),
        Just(Fate::Approve),
        Just(Fate::Reject),
        Just(Fate::Expire),
        Just(Fate::CancelRun),
        Just(Fate::Drop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Calls that need approval, mixed at random with others and ended every way:
    /// each has its pair (with its request when it got that far), ends with its own
    /// status, and the accounting is exact.
    #[test]
    fn a_random_mix_of_outcomes_keeps_pairing_and_accounting(fates in proptest::collection::vec(fate(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let runs = Arc::new(AtomicUsize::new(0));
            let engine = engine_with(&runs, |b| b.max_pending_approvals(64).approval_wait(ApprovalWait::Within(Duration::from_secs(60))));
            let sink = RecordingSink::with_capacity(usize::MAX);
            let mut handles = Vec::new();
            for (i, f) in fates.iter().enumerate() {
                // Runs by fate, so cancel_run reaches exactly those calls.
                let run = format!("run_{f:?}");
                let ctx = UserContext::builder("alice").run_id(run).build().unwrap();
                let d = engine.dispatcher().sink(sink.clone()).user(ctx);
                let c = match f {
                    Fate::Ungated => ToolCall::new("quick", json!(i)).with_id(format!("c{i}")),
                    _ => call(&format!("c{i}")),
                };
                handles.push((i, *f, tokio::spawn(async move { d.dispatch(c).await })));
            }
            for (i, f, _) in &handles {
                if !matches!(f, Fate::Ungated) {
                    requested(&sink, &format!("c{i}")).await;
                }
            }
            engine.cancel_run("alice", "run_CancelRun");
            for (i, f, h) in &handles {
                let id = format!("c{i}");
                match f {
                    Fate::Approve => engine.resolve_approval("alice", &id, Verdict::Approve).await.unwrap(),
                    Fate::Reject => engine.resolve_approval("alice", &id, Verdict::Reject { message: None }).await.unwrap(),
                    Fate::Drop => h.abort(),
                    _ => {}
                }
            }
            let mut want = std::collections::BTreeMap::<&str, u64>::new();
            for (i, f, h) in handles {
                let r = h.await;
                let status = match f {
                    Fate::Ungated | Fate::Approve => Status::Success,
                    Fate::Reject => Status::Rejected,
                    Fate::Expire => Status::ApprovalTimeout,
                    Fate::CancelRun | Fate::Drop => Status::Cancelled,
                };
                if !matches!(f, Fate::Drop) {
                    let got = r.unwrap().map_or_else(|e| e.status(), |_| Status::Success);
                    assert_eq!(got, status, "c{i} {f:?}");
                }
                let done = gated_pair(&sink, &format!("c{i}"), !matches!(f, Fate::Ungated));
                assert_eq!(done.status, status, "c{i} {f:?}");
                *want.entry(status.as_str()).or_default() += 1;
            }
            let m = accounted(&engine);
            for (s, n) in want {
                assert_eq!(m.by_status[s], n, "{s}");
            }
            let gated = fates.iter().filter(|f| !matches!(f, Fate::Ungated)).count() as u64;
            let a = m.approvals;
            assert_eq!(a.approved + a.rejected + a.expired + a.withdrawn, gated);
            assert_eq!((m.active, m.awaiting_approval), (0, 0));
            let approved = fates.iter().filter(|f| matches!(f, Fate::Approve)).count();
            assert_eq!(runs.load(Ordering::SeqCst), approved);
        });
    }
}

/// A policy that asks a person about every call, the health probe included.
struct AskAlways;

impl Policy for AskAlways {
    fn check<'a>(&'a self, _: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async { Ok(Decision::require_approval("every call")) })
    }
}

#[tokio::test(start_paused = true)]
async fn the_health_probe_is_never_left_waiting_for_a_person() {
    let reg = Registry::builder().tool(quick()).build().unwrap();
    let engine = Engine::builder(reg).policy(AskAlways).build();
    let t0 = tokio::time::Instant::now();
    let health = engine.health().await;
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "answered at once, not after the window"
    );
    assert_eq!(health.status, HealthStatus::Unhealthy);
    assert!(
        health
            .issues
            .iter()
            .any(|i| i.contains("approval nobody can give")),
        "{:?}",
        health.issues
    );
    assert_eq!(engine.metrics().awaiting_approval, 0);
}

/// Passes every event through, except the approval request: `panic` panics on it,
/// otherwise the sink is "full" for it and its `send` never completes.
#[derive(Clone, Default)]
struct HostileToRequests {
    events: RecordingSink,
    panic: bool,
}

impl EventSink for HostileToRequests {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        match event {
            Event::ToolApprovalRequired(_) if self.panic => panic!("the sink exploded"),
            Event::ToolApprovalRequired(_) => Err(TrySendError::Full(event)),
            e => self.events.try_send(e),
        }
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        match event {
            Event::ToolApprovalRequired(_) if self.panic => panic!("the sink exploded"),
            Event::ToolApprovalRequired(_) => Box::pin(std::future::pending()),
            e => Box::pin(async move { self.events.try_send(e).map_err(|_| SinkError::Full) }),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_panics_on_or_never_takes_the_request_ends_the_call_and_the_tool_never_runs() {
    for panic in [true, false] {
        let runs = Arc::new(AtomicUsize::new(0));
        let engine = engine_with(&runs, |b| b.delivery_timeout(Duration::from_secs(2)));
        let sink = HostileToRequests {
            panic,
            ..Default::default()
        };
        let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));
        let t0 = tokio::time::Instant::now();
        let err = d.dispatch(call("c1")).await.unwrap_err();
        assert_eq!(err.status(), Status::Undelivered, "panic: {panic}: {err:?}");
        if !panic {
            assert_eq!(
                t0.elapsed(),
                Duration::from_secs(2),
                "bounded by the delivery timeout"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0, "the tool never ran");
        let m = accounted(&engine);
        assert_eq!(
            (m.by_status["undelivered"], m.awaiting_approval, m.active),
            (1, 0, 0)
        );
        assert_eq!(
            engine
                .resolve_approval("alice", "c1", Verdict::Approve)
                .await,
            NOPE
        );
        // The next call of the same engine and user is served (a panicking sink is
        // never called again; a stalled one fails at once).
        let (other, _) = recorded(&engine, user("alice"));
        assert!(
            other
                .dispatch(ToolCall::new("quick", json!(1)))
                .await
                .is_ok()
        );
    }
}

/// A policy whose reason is megabytes long.
struct Verbose;

impl Policy for Verbose {
    fn check<'a>(&'a self, _: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async { Ok(Decision::require_approval("why ".repeat(1 << 20))) })
    }
}

#[tokio::test]
async fn a_reason_of_megabytes_and_arguments_of_megabytes_are_cut_in_the_request() {
    let tool = tool_fn("t", "T.", |_: String, _cx| async { Ok::<_, ToolError>(()) });
    let reg = Registry::builder().tool(tool).build().unwrap();
    let engine = Engine::builder(reg).policy(Verbose).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let h = spawn(
        &d,
        ToolCall::new("t", json!("x".repeat(800_000))).with_id("c1"),
    );
    let req = requested(&sink, "c1").await;
    assert!(
        req.reason.len() < 20_000,
        "reason of {} bytes",
        req.reason.len()
    );
    assert!(
        req.parameters.to_string().len() < 20_000,
        "parameters not cut"
    );
    engine
        .resolve_approval("alice", "c1", Verdict::Approve)
        .await
        .unwrap();
    assert!(h.await.unwrap().is_ok());
}

#[tokio::test]
async fn arguments_nested_100000_deep_are_refused_before_anyone_is_asked() {
    if !in_child("arguments_nested_100000_deep_are_refused_before_anyone_is_asked") {
        return;
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(&runs, |b| b);
    let (d, sink) = recorded(&engine, user("alice"));
    let mut deep = serde_json::Value::Null;
    for _ in 0..100_000 {
        deep = serde_json::Value::Array(vec![deep]);
    }
    let err = d
        .dispatch(ToolCall::new("send", deep).with_id("c1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::InvalidInput);
    assert_eq!(gated_pair(&sink, "c1", false).status, Status::InvalidInput);
    assert_eq!(engine.metrics().approvals, ApprovalStats::default());
}
