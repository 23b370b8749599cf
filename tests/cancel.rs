//! `Engine::cancel_user`: ends every in-flight call of one user (running or waiting
//! for a slot), each with a `cancelled` event, and touches no other user.

mod common;

use common::*;
use serde_json::{Value, json};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};
use tool_dispatch::event::{Event, Status};
use tool_dispatch::*;

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

    assert_eq!(engine.cancel_user("alice").here, 4);
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
    assert_eq!(engine.cancel_user("alice").here, 0);
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
    assert_eq!(engine.cancel_user("nobody-here").here, 0);
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
    assert_eq!(engine.cancel_user("alice").here, 2);
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
    assert_eq!(engine.cancel_user("alice").here, 1);
    assert!(matches!(
        h.await.unwrap(),
        Err(DispatchError::Cancelled {
            reason: CancelReason::User
        })
    ));
    assert_eq!(seen.recv().await, Some(true));
}

// ---------------------------------------------------------------- dropped futures

/// A tool that says when its body starts, then never ends; `dropped` turns true when
/// its future is dropped.
fn hang(started: &Arc<Notify>, dropped: &Arc<AtomicBool>) -> impl tool_dispatch::IntoTool {
    let (started, dropped) = (Arc::clone(started), Arc::clone(dropped));
    tool_fn("hang", "Never ends.", move |_: Value, _cx| {
        let started = Arc::clone(&started);
        let guard = DropFlag(Arc::clone(&dropped));
        async move {
            let _guard = guard;
            started.notify_one();
            std::future::pending::<()>().await;
            Ok::<_, ToolError>(())
        }
    })
}

/// An engine with only [`hang`], and the flags it reports through.
fn hang_engine() -> (Engine, Arc<Notify>, Arc<AtomicBool>) {
    let (started, dropped) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
    let engine = plain_engine(
        Registry::builder()
            .tool(hang(&started, &dropped))
            .build()
            .unwrap(),
    );
    (engine, started, dropped)
}

/// Polls `call` until the tool body says it started; panics if the call ends first.
async fn until_started<F>(call: &mut F, started: &Notify)
where
    F: Future<Output = Result<ToolOutput, DispatchError>> + Unpin,
{
    tokio::select! {
        biased;
        r = call => panic!("hang ended: {r:?}"),
        () = started.notified() => {}
    }
}

#[tokio::test]
async fn aborting_the_task_running_a_dispatch_completes_the_pair_as_cancelled() {
    let (engine, started, dropped) = hang_engine();
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let task = {
        let d = d.clone();
        tokio::spawn(async move {
            d.dispatch(ToolCall::new("hang", json!({})).with_id("h1"))
                .await
        })
    };
    started.notified().await;
    assert_eq!(engine.active(), 1);
    assert_eq!(sink.len(), 1, "tool_executing is out while the body runs");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    assert!(
        dropped.load(SeqCst),
        "the tool body was dropped with the call"
    );
    assert_eq!(engine.active(), 0);
    let done = pair(&sink.take());
    assert_eq!(&*done.call_id, "h1");
    assert_eq!(done.status, Status::Cancelled);
    let expected = DispatchError::Cancelled {
        reason: CancelReason::Dropped,
    };
    assert_eq!(done.error.as_deref(), Some(expected.to_string().as_str()));
    let m = engine.metrics();
    assert_eq!((m.total, m.count(Status::Cancelled), m.active), (1, 1, 0));
}

#[tokio::test]
async fn a_dispatch_future_dropped_by_select_completes_the_pair_on_an_mpsc_sink() {
    let (engine, started, dropped) = hang_engine();
    let (tx, rx) = mpsc::channel::<Event>(8);
    let d = dispatcher(&engine, tx, "alice");

    let call = ToolCall::new("hang", json!({})).with_id("h2");
    until_started(&mut pin!(d.dispatch(call)), &started).await;
    // The dispatch future was dropped once its body started.
    assert!(dropped.load(SeqCst));
    assert_eq!(engine.active(), 0);
    drop(d);
    let events = drain(rx).await;
    let done = pair(&events);
    assert_eq!((&*done.call_id, done.status), ("h2", Status::Cancelled));
}

#[tokio::test]
async fn a_call_dropped_while_its_sink_is_full_still_gets_its_completion_later() {
    let (engine, started, _) = hang_engine();
    // Room for tool_executing only; nobody drains until after the drop.
    let (tx, rx) = mpsc::channel::<Event>(1);
    let d = dispatcher(&engine, tx, "alice");

    let call = ToolCall::new("hang", json!({})).with_id("h3");
    until_started(&mut pin!(d.dispatch(call)), &started).await;
    assert_eq!(engine.active(), 0);
    drop(d);
    let events = drain(rx).await;
    let done = pair(&events);
    assert_eq!((&*done.call_id, done.status), ("h3", Status::Cancelled));
    assert_eq!(engine.metrics().sink_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_for_a_slot_is_paired_as_cancelled() {
    let (started, dropped) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
    let runs = Arc::new(AtomicUsize::new(0));
    let limits = Limits::default().per_user(UserLimits {
        concurrency: 1,
        rate: None,
    });
    let registry = Registry::builder()
        .tool(hang(&started, &dropped))
        .tool(counting("count", &runs, ToolSettings::new()))
        .build()
        .unwrap();
    let engine = Engine::builder(registry).limits(limits).build();
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    // Boxed, so that `drop` really drops the futures.
    let mut first = Box::pin(d.dispatch(ToolCall::new("hang", json!({})).with_id("holder")));
    let mut second = Box::pin(d.dispatch(ToolCall::new("count", json!(1)).with_id("queued")));
    until_started(&mut first, &started).await;
    // `second` waits for alice's only slot; poll it once, then drop both.
    tokio::select! {
        biased;
        r = &mut second => panic!("got a slot: {r:?}"),
        () = std::future::ready(()) => {}
    }
    assert_eq!(engine.active(), 2);
    drop(second);
    drop(first);
    assert_eq!(engine.active(), 0);
    assert_eq!(runs.load(SeqCst), 0);

    let events = sink.take();
    let by_id = |id: &str| -> Vec<Event> {
        events
            .iter()
            .filter(|e| e.call_id() == Some(id))
            .cloned()
            .collect()
    };
    assert_eq!(pair(&by_id("holder")).status, Status::Cancelled);
    assert_eq!(pair(&by_id("queued")).status, Status::Cancelled);
    assert_eq!(events.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_timeout_passes_while_it_waits_for_a_slot_never_starts_its_body() {
    let (started, dropped) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
    let runs = Arc::new(AtomicUsize::new(0));
    let limits = Limits::default()
        .per_user(UserLimits {
            concurrency: 1,
            rate: None,
        })
        .max_wait(Duration::from_secs(60));
    let registry = Registry::builder()
        .tool(hang(&started, &dropped))
        .tool(counting(
            "count",
            &runs,
            ToolSettings::new().timeout(Duration::from_secs(3)),
        ))
        .build()
        .unwrap();
    let engine = Engine::builder(registry).limits(limits).build();
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let holder = ToolCall::new("hang", json!({})).with_timeout(Duration::from_secs(4));
    let mut first = Box::pin(d.dispatch(holder));
    until_started(&mut first, &started).await;
    // The queued call waits 4 s for alice's only slot; its own timeout is 3 s.
    let (first, second) = tokio::join!(first, d.dispatch(ToolCall::new("count", json!(1))));
    assert!(
        matches!(first, Err(DispatchError::Timeout { .. })),
        "{first:?}"
    );
    let err = second.expect_err("the queued call timed out while waiting");
    assert!(matches!(err, DispatchError::Timeout { after, .. } if after == Duration::from_secs(3)));
    assert_eq!(
        runs.load(SeqCst),
        0,
        "the body must not start after its deadline"
    );
    assert_eq!(engine.active(), 0);
}

#[tokio::test]
async fn a_dispatch_dropped_before_its_first_poll_is_a_cancelled_call_with_its_pair() {
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    let fut = d.dispatch(ToolCall::new("echo", serde_json::json!(1)).with_id("never-polled"));
    assert_eq!(
        engine.active(),
        1,
        "the call starts when dispatch is called"
    );
    drop(fut);
    assert_eq!(engine.active(), 0);
    let done = completed(&sink, "never-polled");
    assert_eq!(done.status, Status::Cancelled);
    assert_eq!(engine.metrics().count(Status::Cancelled), 1);
}

/// A policy that is not ready at its first poll.
struct YieldingPolicy;

impl Policy for YieldingPolicy {
    fn check<'a>(&'a self, _: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async {
            tokio::task::yield_now().await;
            Ok(Decision::Allow)
        })
    }
}

/// An engine whose calls await at every stage: the policy yields, a one-slot
/// per-user limit makes the second call wait, the sink (capacity 1, drained by a
/// task) is often full, and the tool yields three times.
fn every_stage_waits() -> Engine {
    let slow = tool_fn("slow", "Yields three times.", |n: u64, _cx| async move {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        Ok::<_, ToolError>(n)
    });
    let reg = Registry::builder().tool(slow).build().unwrap();
    Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(1)))
        .policy(YieldingPolicy)
        .build()
}

/// Checks that every call id on `events` has exactly one `tool_executing` then one
/// `tool_completed`, and returns the completions' statuses.
fn statuses(events: &[Event]) -> Vec<Status> {
    assert_paired(events);
    events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) => Some(c.status),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_dispatch_dropped_after_any_number_of_polls_still_completes_its_pair_once() {
    let engine = every_stage_waits();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1);
    let drainer = tokio::spawn(drain(rx));
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    // A call that keeps the user's only slot for a while, so later ones wait for it.
    let blocker = common::spawn(&d, ToolCall::new("slow", serde_json::json!(0)));
    for polls in 0..40usize {
        let mut fut = Box::pin(d.dispatch(ToolCall::new("slow", serde_json::json!(polls))));
        for _ in 0..polls {
            if poll_once(&mut fut).await.is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(fut);
    }
    blocker.await.unwrap().unwrap();
    drop(d);
    let events = drainer.await.unwrap();
    let st = statuses(&events);
    assert_eq!(st.len(), 41, "one pair per call, dropped or not");
    assert!(st.contains(&Status::Cancelled) && st.contains(&Status::Success));
    let m = engine.metrics();
    assert_eq!((m.total, m.active), (41, 0));
    assert_eq!(m.total, m.by_status.values().sum::<u64>());
}

#[tokio::test]
async fn cancel_user_and_shutdown_racing_every_stage_leave_every_pair_whole() {
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for stop_at in 0..30usize {
        for shutdown in [false, true] {
            let engine = every_stage_waits();
            let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1);
            let drainer = tokio::spawn(drain(rx));
            let d = engine.dispatcher().sink(tx).user(user("alice"));
            let calls: Vec<_> = (0..3)
                .map(|i| common::spawn(&d, ToolCall::new("slow", serde_json::json!(i))))
                .collect();
            for _ in 0..stop_at {
                tokio::task::yield_now().await;
            }
            if shutdown {
                let report = engine.shutdown(std::time::Duration::ZERO).await;
                assert_eq!(report.still_active, 0, "stop at {stop_at}");
            } else {
                engine.cancel_user("alice");
            }
            for c in calls {
                // Done before the stop, cancelled by it, or (shutdown) refused because
                // it arrived after it.
                let r = c.await.unwrap();
                let ok = match &r {
                    Ok(_) => true,
                    Err(e) => {
                        e.status() == Status::Cancelled
                            || shutdown && e.status() == Status::Unavailable
                    }
                };
                assert!(ok, "stop at {stop_at}: {r:?}");
            }
            drop(d);
            let st = statuses(&drainer.await.unwrap());
            assert_eq!(st.len(), 3, "stop at {stop_at}");
            for s in st {
                *seen.entry(s.as_str()).or_default() += 1;
            }
            assert_eq!(engine.active(), 0);
        }
    }
    // The stop landed at every kind of moment: before the calls, during them, after.
    for s in ["success", "cancelled", "unavailable"] {
        assert!(
            seen.get(s).copied().unwrap_or(0) > 0,
            "no call ended {s}: {seen:?}"
        );
    }
}

#[tokio::test]
async fn cancel_run_ends_only_that_runs_calls_wherever_they_wait() {
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let engine = hold_engine(
        hold(
            &gate,
            started_tx,
            ToolSettings::new().timeout(Duration::from_secs(3600)),
        ),
        3,
    );
    let in_run = |run: &str| UserContext::builder("alice").run_id(run).build().unwrap();
    let (run_a, sink_a) = recorded(&engine, in_run("run_a"));
    let (run_b, sink_b) = recorded(&engine, in_run("run_b"));
    // Two of run_a's calls run; the third waits for alice's last slot behind run_b's.
    let a1 = common::spawn(&run_a, ToolCall::new("hold", json!("a1")).with_id("a1"));
    let a2 = common::spawn(&run_a, ToolCall::new("hold", json!("a2")).with_id("a2"));
    let b1 = common::spawn(&run_b, ToolCall::new("hold", json!("b1")).with_id("b1"));
    for _ in 0..3 {
        started.recv().await.unwrap();
    }
    let a3 = common::spawn(&run_a, ToolCall::new("hold", json!("a3")).with_id("a3"));
    settle().await;
    assert_eq!(engine.cancel_run("bob", "run_a").here, 0, "not bob's");
    assert_eq!(engine.cancel_run("alice", "run_a").here, 3);
    for (call, id) in [(a1, "a1"), (a2, "a2"), (a3, "a3")] {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(
            err,
            DispatchError::Cancelled {
                reason: CancelReason::Run
            },
            "{id}"
        );
        assert_eq!(
            completed(&sink_a, id).error.as_deref(),
            Some("call cancelled: the run was cancelled")
        );
    }
    assert!(!b1.is_finished(), "the other run goes on");
    // The run's later calls run as usual; cancel_user still reaches the other run.
    let later = run_a.dispatch(ToolCall::new("quick", json!(1))).await;
    assert!(later.is_ok());
    assert_eq!(engine.cancel_user("alice").here, 1);
    let err = b1.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::User
        }
    );
    assert_eq!(completed(&sink_b, "b1").status, Status::Cancelled);
    assert_eq!(engine.active(), 0);
}
