//! Delivery under attack: sinks that panic, never complete, are not cancel-safe or stay
//! full; calls dropped by the thousand against a full sink; progress after the end.
//! Each guarantee: an event goes out at most once, a call's events are bracketed by its
//! pair, memory and tasks stay bounded, and code we call never costs the process.

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tool_dispatch::event::{AgentUpdate, Event, Status};
use tool_dispatch::*;

fn open_limits() -> Limits {
    Limits::default().per_user(no_rate(10))
}

fn engine() -> Engine {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    Engine::builder(reg).limits(open_limits()).build()
}

// ------------------------------------------------------------ a sink that panics

#[tokio::test]
async fn a_panicking_sink_costs_its_own_call_and_is_never_called_again() {
    if !in_child("a_panicking_sink_costs_its_own_call_and_is_never_called_again") {
        return;
    }
    let engine = engine();
    let sink = PanickingSink::default();
    let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));
    let err = d
        .dispatch(ToolCall::new("echo", json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Undelivered(SinkError::Panicked)),
        "{err:?}"
    );
    assert_eq!(err.status(), Status::Undelivered);
    assert_eq!(
        sink.calls.load(SeqCst),
        1,
        "called once, then treated as closed"
    );

    // Later calls, a dropped future and agent events never reach it again.
    let err = d
        .dispatch(ToolCall::new("echo", json!(2)))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Undelivered);
    drop(futures_util::FutureExt::now_or_never(
        d.dispatch(ToolCall::new("echo", json!(3))),
    ));
    assert!(d.notify(AgentUpdate::Thinking("hm".into())).await.is_err());
    assert_eq!(sink.calls.load(SeqCst), 1);

    // Another user is untouched.
    let (bob, bob_sink) = recorded(&engine, user("bob"));
    assert_eq!(
        bob.dispatch(ToolCall::new("echo", json!(4)))
            .await
            .unwrap()
            .value,
        json!(4)
    );
    assert_paired(&bob_sink.events());
    let m = engine.metrics();
    assert_eq!(
        (m.count(Status::Undelivered), m.count(Status::Success)),
        (3, 1)
    );
    assert_eq!(m.active, 0);
    assert!(m.sink_failures >= 3);
}

/// A sink that takes `tool_executing` and panics on everything after it: the panic
/// comes while the pipeline sends the completion, and again when a dropped call's
/// guard runs. Neither may unwind out, and the caller still gets its result.
#[derive(Clone, Default)]
struct PanicsAfterFirst {
    taken: Arc<std::sync::Mutex<Vec<Event>>>,
}

impl EventSink for PanicsAfterFirst {
    fn try_send(&self, e: Event) -> Result<(), tool_dispatch::TrySendError> {
        let mut t = self.taken.lock().unwrap();
        if t.is_empty() {
            t.push(e);
            return Ok(());
        }
        drop(t);
        panic!("sink gave up after one event");
    }
}

#[tokio::test]
async fn a_sink_panicking_on_the_completion_still_returns_the_result() {
    if !in_child("a_sink_panicking_on_the_completion_still_returns_the_result") {
        return;
    }
    let engine = engine();
    let sink = PanicsAfterFirst::default();
    let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));
    let out = d
        .dispatch(ToolCall::new("echo", json!("kept")))
        .await
        .unwrap();
    assert_eq!(out.value, json!("kept"), "no data lost");
    assert_eq!(sink.taken.lock().unwrap().len(), 1);
    let m = engine.metrics();
    assert_eq!(
        (m.count(Status::Success), m.sink_failures, m.active),
        (1, 1, 0)
    );

    // A second dispatcher on the same kind of sink, dropped mid-call while the
    // thread is already unwinding from an unrelated panic: no abort.
    let sink2 = PanicsAfterFirst::default();
    let d2 = engine.dispatcher().sink(sink2).user(user("carol"));
    let r = std::panic::AssertUnwindSafe(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let _unused = gate;
        let fut = d2.dispatch(ToolCall::new("echo", json!(1)));
        let mut fut = Box::pin(fut);
        let _ = poll_once(&mut fut.as_mut()).await;
        panic!("the caller's own panic; the call's future drops while unwinding");
    });
    let caught = futures_util::FutureExt::catch_unwind(r).await;
    assert!(caught.is_err());
    assert_eq!(engine.active(), 0);
}

// ------------------------------------------------------------ a stuck sink

#[tokio::test(start_paused = true)]
async fn cancel_user_reaches_calls_waiting_for_room_in_the_sink() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(open_limits())
        .delivery_timeout(Duration::from_secs(60))
        .build();
    let d = engine.dispatcher().sink(StuckSink).user(user("alice"));
    let calls: Vec<_> = (0..3)
        .map(|i| spawn(&d, ToolCall::new("echo", json!(i))))
        .collect();
    settle().await;
    assert_eq!(engine.active(), 3, "all three wait to announce");
    let before = tokio::time::Instant::now();
    assert_eq!(engine.cancel_user("alice").here, 3);
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::Cancelled {
                    reason: CancelReason::User
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(
        before.elapsed(),
        Duration::ZERO,
        "ended at once, not after the delivery timeout"
    );
    let m = engine.metrics();
    assert_eq!((m.count(Status::Cancelled), m.active), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn shutdown_reaches_calls_waiting_for_room_in_a_full_backlog() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(100)))
        .delivery_timeout(Duration::from_secs(600))
        .delivery_backlog(2)
        .build();
    let d = engine.dispatcher().sink(StuckSink).user(user("alice"));
    // Two fill the backlog; the rest wait for room in it, holding no shared slot.
    let calls: Vec<_> = (0..6)
        .map(|i| spawn(&d, ToolCall::new("echo", json!(i))))
        .collect();
    settle().await;
    assert_eq!(engine.active(), 6);
    let report = engine.shutdown(Duration::from_millis(10)).await;
    assert_eq!((report.cancelled, report.still_active), (6, 0));
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap_err().status(), Status::Cancelled);
    }
    assert_eq!(engine.active(), 0);
}

#[tokio::test]
async fn thousands_of_calls_dropped_against_a_full_sink_leave_bounded_tasks_and_events() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(open_limits())
        .delivery_backlog(64)
        .build();
    let (tx, mut rx) = mpsc::channel::<Event>(1);
    tx.try_send(Event::AgentStarted(tool_dispatch::event::AgentEvent {
        run_id: None,
        thread_id: None,
        user_id: "alice".into(),
        message: None,
        result: None,
        timestamp: tool_dispatch::event::Timestamp::now(),
    }))
    .unwrap(); // the queue is full from the start
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    for i in 0..50_000u64 {
        let fut = d.dispatch(ToolCall::new("echo", json!(i)));
        let mut fut = std::pin::pin!(fut);
        assert!(poll_once(&mut fut.as_mut()).await.is_pending());
    }
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks <= tasks_before + 1,
        "one drain task for the sink at most, not one per call: {tasks}"
    );
    assert_eq!(engine.active(), 0);
    let m = engine.metrics();
    assert_eq!(m.count(Status::Cancelled), 50_000);
    drop(d);
    // The sink's only sender now lives in its drain task: reading everything ends
    // when the backlog is delivered.
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    let tool_events: Vec<Event> = events.into_iter().skip(1).collect();
    // The backlog of 64, one completion per announced call, and the pairs of calls
    // dropped before they were announced, up to 64 times the backlog.
    assert!(
        tool_events.len() <= 64 + 64 + 64 * 64,
        "bounded by the backlog: {}",
        tool_events.len()
    );
    assert!(!tool_events.is_empty());
    assert_paired(&tool_events);
    let m = engine.metrics();
    assert_eq!(
        m.sink_failures as usize,
        2 * 50_000 - tool_events.len(),
        "every event not delivered is counted"
    );
}

// ------------------------------------------------------------ a send that is not cancel-safe

#[tokio::test]
async fn a_send_that_is_not_cancel_safe_never_duplicates_an_event() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(open_limits())
        .delivery_timeout(Duration::from_secs(60))
        .build();
    let sink = FlushingSink::new();
    let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));

    // 1: dropped while its tool_completed is being flushed.
    let call = spawn(&d, ToolCall::new("echo", json!(1)).with_id("c1"));
    until(|| sink.wire().len() == 1).await; // tool_executing on the wire, flushing
    sink.flush.add_permits(1);
    until(|| sink.wire().len() == 2).await; // tool_completed on the wire, flushing
    call.abort();
    let _ = call.await;
    sink.flush.add_permits(1); // the completion's flush ends
    until(|| sink.flush.available_permits() == 0).await;
    settle().await;
    assert_eq!(
        kinds_of(&sink.wire(), "c1"),
        ["tool_executing", "tool_completed"]
    );

    // 2: dropped while its tool_executing is being flushed: the completion follows
    // it once, as cancelled; the executing is not sent again.
    let call = spawn(&d, ToolCall::new("echo", json!(2)).with_id("c2"));
    until(|| sink.wire().len() == 3).await;
    call.abort();
    let _ = call.await;
    sink.flush.add_permits(100);
    until(|| sink.wire().len() == 4).await;
    settle().await;
    let wire = sink.wire();
    assert_eq!(kinds_of(&wire, "c2"), ["tool_executing", "tool_completed"]);
    let Event::ToolCompleted(done) = &wire[3] else {
        panic!("{wire:?}")
    };
    assert_eq!(done.status, Status::Cancelled);
    assert_eq!(engine.active(), 0);
}

/// Waits (yielding to the runtime) until `cond` holds.
async fn until(cond: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

// ------------------------------------------------------------ progress after the end

#[tokio::test]
async fn a_blocking_tool_reporting_progress_after_its_timeout_sends_nothing_after_the_pair() {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<bool>();
    let late = blocking_fn("late", "Reports after its timeout.", move |_: u8, cx| {
        let _ = go_rx.lock().unwrap().recv(); // until the test says go
        let _ = done_tx.send(cx.progress(0.9, "too late"));
        Ok::<_, ToolError>(1u8)
    })
    .settings(ToolSettings::new().timeout(Duration::from_millis(20)));
    let reg = Registry::builder().tool(late).build().unwrap();
    let engine = Engine::builder(reg).limits(open_limits()).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new("late", json!(0)).with_id("l1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    go_tx.send(()).unwrap();
    assert!(
        !done_rx.recv().await.unwrap(),
        "progress refused after the end"
    );
    assert_eq!(
        kinds_of(&sink.events(), "l1"),
        ["tool_executing", "tool_completed"]
    );
    assert_eq!(engine.metrics().progress_dropped, 1);
}

#[tokio::test]
async fn a_context_kept_by_a_spawned_task_reports_nothing_after_the_call_ended() {
    let (keep_tx, mut keep_rx) = mpsc::unbounded_channel::<ToolContext>();
    let keeper = tool_fn("keeper", "Leaks its context.", move |_: u8, cx| {
        let keep_tx = keep_tx.clone();
        async move {
            assert!(cx.progress(0.5, "half"));
            let _ = keep_tx.send(cx);
            Ok::<_, ToolError>(1u8)
        }
    });
    let reg = Registry::builder().tool(keeper).build().unwrap();
    let engine = Engine::builder(reg).limits(open_limits()).build();
    let (d, sink) = recorded(&engine, user("alice"));
    d.dispatch(ToolCall::new("keeper", json!(0)).with_id("k1"))
        .await
        .unwrap();
    let cx = keep_rx.recv().await.unwrap();
    assert!(!cx.progress(1.0, "after the end"));
    assert_eq!(
        kinds_of(&sink.events(), "k1"),
        ["tool_executing", "tool_progress", "tool_completed"]
    );
    let m = engine.metrics();
    assert_eq!(m.progress_dropped, 1);
    let _ = AtomicUsize::new(0);
}

#[tokio::test]
async fn calls_dropped_across_many_stuck_sinks_cost_one_task_per_sink_at_most() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(1000)))
        .delivery_timeout(Duration::from_secs(3600))
        .delivery_backlog(8)
        .build();
    let base = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let users: Vec<Dispatcher> = (0..10)
        .map(|u| {
            engine
                .dispatcher()
                .sink(StuckSink)
                .user(user(&format!("u{u}")))
        })
        .collect();
    for i in 0..5_000u64 {
        let d = &users[(i % 10) as usize];
        let mut fut = Box::pin(d.dispatch(ToolCall::new("echo", json!(i))));
        assert!(poll_once(&mut fut).await.is_pending());
    }
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(tasks <= base + 10, "{tasks} tasks for 10 sinks");
    let m = engine.metrics();
    assert_eq!((m.count(Status::Cancelled), m.active), (5_000, 0));
    // Each sink holds back at most its backlog, one completion per call that was
    // announced and the dropped calls' pairs up to 64 times its backlog; everything
    // else was counted as not delivered.
    assert!(
        m.sink_failures >= 2 * 5_000 - 10 * (8 + 8 + 64 * 8),
        "{}",
        m.sink_failures
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_sink_costs_its_user_one_delivery_timeout_not_one_per_call() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(open_limits())
        .delivery_timeout(Duration::from_secs(5))
        .build();
    let (tx, mut rx) = mpsc::channel::<Event>(1);
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    // The first call fills the queue with its tool_executing; its completion waits.
    let first = d.dispatch(ToolCall::new("echo", json!(0)));
    let t0 = tokio::time::Instant::now();
    assert!(first.await.is_ok(), "the result is not lost");
    assert_eq!(t0.elapsed(), Duration::from_secs(5), "one delivery timeout");
    // Now the sink is stalled: the next calls fail at once instead of waiting.
    let t1 = tokio::time::Instant::now();
    for i in 1..=3 {
        let err = d
            .dispatch(ToolCall::new("echo", json!(i)))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::Undelivered);
    }
    assert_eq!(t1.elapsed(), Duration::ZERO);
    // Once the consumer reads again, delivery resumes.
    assert!(rx.recv().await.is_some());
    assert_eq!(
        d.dispatch(ToolCall::new("echo", json!(9)))
            .await
            .unwrap()
            .value,
        json!(9)
    );
    let m = engine.metrics();
    assert_eq!(
        (m.count(Status::Success), m.count(Status::Undelivered)),
        (2, 3)
    );
}

// ---------------------------------------------------------------- sink failures

#[tokio::test]
async fn a_sink_closed_before_the_call_means_the_tool_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = plain_engine(
        Registry::builder()
            .tool(counting("count", &runs, ToolSettings::new()))
            .build()
            .unwrap(),
    );

    // A recording sink closed on purpose.
    let sink = RecordingSink::new();
    sink.close();
    let d = dispatcher(&engine, sink.clone(), "alice");
    let err = d
        .dispatch(ToolCall::new("count", json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Undelivered(SinkError::Closed)),
        "{err:?}"
    );
    assert!(sink.is_empty());

    // An mpsc sink whose receiver (the WebSocket writer) is gone.
    let (tx, rx) = mpsc::channel::<Event>(8);
    drop(rx);
    let d = dispatcher(&engine, tx, "bob");
    let err = d
        .dispatch(ToolCall::new("count", json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Undelivered(SinkError::Closed)),
        "{err:?}"
    );
    let typed_err = d
        .notify(AgentUpdate::Thinking("hm".into()))
        .await
        .unwrap_err();
    assert_eq!(typed_err, SinkError::Closed);

    assert_eq!(runs.load(SeqCst), 0, "the body never ran");
    let m = engine.metrics();
    assert_eq!(m.count(Status::Undelivered), 2);
    assert_eq!((m.total, m.active), (2, 0));
    assert_eq!(m.sink_failures, 3, "two tool_executing and one agent event");
}

#[tokio::test]
async fn a_sink_closed_after_tool_executing_still_returns_the_result_and_counts_the_failure() {
    let sink = RecordingSink::new();
    let closer = {
        let sink = sink.clone();
        tool_fn(
            "closer",
            "Closes the sink, then answers.",
            move |n: u32, _cx| {
                sink.close();
                async move { Ok::<_, ToolError>(n * 2) }
            },
        )
    };
    // The same with an mpsc sink: the writer task goes away mid-call.
    let receiver: Arc<Mutex<Option<mpsc::Receiver<Event>>>> = Arc::default();
    let hangup = {
        let receiver = Arc::clone(&receiver);
        tool_fn(
            "hangup",
            "Drops the receiver, then answers.",
            move |n: u32, _cx| {
                let rx = receiver.lock().unwrap().take();
                async move {
                    let mut rx = rx.ok_or_else(|| ToolError::new("no receiver"))?;
                    let first = rx.try_recv().map_err(|e| ToolError::new(e.to_string()))?;
                    drop(rx);
                    Ok::<_, ToolError>((first.kind(), n + 1))
                }
            },
        )
    };
    let registry = Registry::builder()
        .tool(closer)
        .tool(hangup)
        .build()
        .unwrap();
    let engine = plain_engine(registry);

    let d = dispatcher(&engine, sink.clone(), "alice");
    let out = d
        .dispatch(ToolCall::new("closer", json!(21)))
        .await
        .unwrap();
    assert_eq!(out.value, json!(42));
    let events = sink.events();
    assert_eq!(events.len(), 1);
    assert!(matches!(events[0], Event::ToolExecuting(_)));

    let (tx, rx) = mpsc::channel::<Event>(8);
    *receiver.lock().unwrap() = Some(rx);
    let d = dispatcher(&engine, tx, "bob");
    let out = d.dispatch(ToolCall::new("hangup", json!(1))).await.unwrap();
    assert_eq!(out.value, json!(["tool_executing", 2]));

    let m = engine.metrics();
    assert_eq!(m.count(Status::Success), 2);
    assert_eq!(
        m.sink_failures, 2,
        "both undelivered tool_completed are counted"
    );
    assert_eq!(m.active, 0);
}
