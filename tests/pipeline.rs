//! The one pipeline: timeouts, panics, dropped futures, sink failures, invalid input,
//! unknown tools, permissions (default and custom policies), typed calls, batches,
//! progress and agent events, and the checks on user contexts.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Barrier, Notify, mpsc};
use tool_dispatch::event::{AgentUpdate, Event, Status};
use tool_dispatch::event::{ToolCompleted, ToolProgress};
use tool_dispatch::{BoxFuture, PolicyError, PolicyRequest};
use tool_dispatch::{
    CancelReason, Decision, DispatchError, Dispatcher, Engine, EventSink, Limits, Policy,
    RecordingSink, Registry, SinkError, Tool, ToolCall, ToolContext, ToolError, ToolOutput,
    ToolSettings, UserContext, UserContextError, UserLimits, tool_fn,
};

// ---------------------------------------------------------------- helpers

fn user(id: &str) -> UserContext {
    UserContext::builder(id)
        .thread_id("t_1")
        .run_id(format!("run_{id}"))
        .build()
        .expect("valid user")
}

fn dispatcher(engine: &Engine, sink: impl EventSink, id: &str) -> Dispatcher {
    engine.dispatcher().sink(sink).user(user(id))
}

/// Asserts `events` is exactly one `tool_executing` then one `tool_completed` with
/// the same call id, and returns the completion.
#[track_caller]
fn pair(events: &[Event]) -> ToolCompleted {
    assert_eq!(events.len(), 2, "expected one pair: {events:?}");
    let (Event::ToolExecuting(ex), Event::ToolCompleted(done)) = (&events[0], &events[1]) else {
        panic!("expected tool_executing then tool_completed: {events:?}");
    };
    assert_eq!(ex.call_id, done.call_id);
    assert_eq!(ex.tool_name, done.tool_name);
    done.clone()
}

/// Sets a flag when dropped: proves a tool body's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

fn echo() -> impl tool_dispatch::IntoTool {
    tool_fn("echo", "Returns its input.", |v: Value, _cx| async move {
        Ok::<_, ToolError>(v)
    })
}

/// A tool that counts how many times its body ran.
fn counting(
    name: &str,
    runs: &Arc<AtomicUsize>,
    settings: ToolSettings,
) -> impl tool_dispatch::IntoTool {
    let runs = Arc::clone(runs);
    tool_fn(name, "Counts its runs.", move |v: Value, _cx| {
        runs.fetch_add(1, SeqCst);
        async move { Ok::<_, ToolError>(v) }
    })
    .settings(settings)
}

fn engine_with(registry: Registry) -> Engine {
    Engine::builder(registry).build()
}

// ---------------------------------------------------------------- basics

#[tokio::test]
async fn every_call_streams_one_pair_whatever_its_outcome() {
    let engine = engine_with(Registry::builder().tool(echo()).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let out = d
        .dispatch(ToolCall::new("echo", json!("hi")))
        .await
        .unwrap();
    assert_eq!(out.value, json!("hi"));
    let e = d
        .dispatch(ToolCall::new("nope", json!("hi")))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Status::UnknownTool);
    let e = d
        .dispatch(ToolCall::from_text("echo", "{bad"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidInput);

    let events = sink.take();
    let statuses: Vec<Status> = events.chunks(2).map(|p| pair(p).status).collect();
    assert_eq!(
        statuses,
        [Status::Success, Status::UnknownTool, Status::InvalidInput]
    );
    let m = engine.metrics();
    assert_eq!((m.total, m.active), (3, 0));
}

// ---------------------------------------------------------------- timeouts

#[tokio::test(start_paused = true)]
async fn a_tool_sleeping_past_its_timeout_times_out_and_the_engine_keeps_serving() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let sleepy = tool_fn("sleepy", "Sleeps `ms`.", move |ms: u64, _cx| {
        let guard = DropFlag(Arc::clone(&flag));
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, ToolError>(ms)
        }
    })
    .settings(ToolSettings::new().timeout(Duration::from_secs(1)));
    let engine = engine_with(Registry::builder().tool(sleepy).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let err = d
        .dispatch(ToolCall::new("sleepy", json!(60_000)).with_id("slow"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DispatchError::Timeout { tool, after } if tool == "sleepy" && *after == Duration::from_secs(1)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        dropped.load(SeqCst),
        "the tool future is dropped at the deadline"
    );
    let done = pair(&sink.take());
    assert_eq!(&*done.call_id, "slow");
    assert_eq!(done.status, Status::Timeout);
    assert_eq!(done.error.as_deref(), Some(err.to_string().as_str()));
    assert_eq!(done.result, Value::Null);
    assert!(done.duration_ms >= 1000.0, "{}", done.duration_ms);
    assert_eq!(engine.active(), 0);

    // The engine keeps serving: the next call succeeds.
    let ok = d
        .dispatch(ToolCall::new("sleepy", json!(10)))
        .await
        .unwrap();
    assert_eq!(ok.value, json!(10));
    assert_eq!(pair(&sink.take()).status, Status::Success);
    let m = engine.metrics();
    assert_eq!((m.count(Status::Timeout), m.count(Status::Success)), (1, 1));
    assert_eq!((m.total, m.active), (2, 0));
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct SleepIn {
    ms: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SleepOut {
    slept_ms: u64,
    call_id: String,
    user_id: String,
}

/// A typed tool with a 1 s timeout.
struct Sleep;

impl Tool for Sleep {
    const NAME: &'static str = "sleep";
    type Input = SleepIn;
    type Output = SleepOut;

    fn description(&self) -> &str {
        "Sleeps, then says who it ran for."
    }

    fn settings(&self) -> ToolSettings {
        ToolSettings::new().timeout(Duration::from_secs(1))
    }

    async fn call(&self, input: SleepIn, cx: ToolContext) -> Result<SleepOut, ToolError> {
        tokio::time::sleep(Duration::from_millis(input.ms)).await;
        Ok(SleepOut {
            slept_ms: input.ms,
            call_id: cx.call_id().to_owned(),
            user_id: cx.user().user_id().to_owned(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_per_call_timeout_replaces_the_tools_by_name_and_typed() {
    let engine = engine_with(Registry::builder().tool(Sleep).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    // Longer than the tool's 1 s: a 3 s body succeeds.
    let call = ToolCall::new("sleep", json!({"ms": 3000})).with_timeout(Duration::from_secs(5));
    assert_eq!(d.dispatch(call).await.unwrap().value["slept_ms"], 3000);
    let typed = d
        .call::<Sleep>(SleepIn { ms: 3000 })
        .with_timeout(Duration::from_secs(5));
    assert_eq!(typed.await.unwrap().value.slept_ms, 3000);

    // Shorter than the tool's 1 s: a 500 ms body times out after 100 ms.
    let short = Duration::from_millis(100);
    let call = ToolCall::new("sleep", json!({"ms": 500})).with_timeout(short);
    let err = d.dispatch(call).await.unwrap_err();
    assert!(
        matches!(err, DispatchError::Timeout { after, .. } if after == short),
        "{err:?}"
    );
    let err = d
        .call::<Sleep>(SleepIn { ms: 500 })
        .with_timeout(short)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Timeout { after, .. } if after == short),
        "{err:?}"
    );

    // Without an override the tool's own 1 s applies.
    let err = d.call::<Sleep>(SleepIn { ms: 3000 }).await.unwrap_err();
    let one = Duration::from_secs(1);
    assert!(
        matches!(err, DispatchError::Timeout { after, .. } if after == one),
        "{err:?}"
    );

    let statuses: Vec<Status> = sink
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) => Some(c.status),
            _ => None,
        })
        .collect();
    use Status::{Success, Timeout};
    assert_eq!(statuses, [Success, Success, Timeout, Timeout, Timeout]);
    assert_eq!(engine.active(), 0);
}

// ---------------------------------------------------------------- typed calls

#[tokio::test(start_paused = true)]
async fn a_typed_call_uses_its_id_and_returns_the_typed_output() {
    let engine = engine_with(
        Registry::builder()
            .tool(Sleep)
            .tool(echo())
            .build()
            .unwrap(),
    );
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let out = d
        .call::<Sleep>(SleepIn { ms: 10 })
        .with_id("x")
        .await
        .unwrap();
    assert_eq!(&*out.call_id, "x");
    assert!(!out.cached);
    assert_eq!(
        out.value,
        SleepOut {
            slept_ms: 10,
            call_id: "x".into(),
            user_id: "alice".into()
        }
    );
    let events = sink.take();
    let done = pair(&events);
    let Event::ToolExecuting(ex) = &events[0] else {
        unreachable!()
    };
    assert_eq!((&*ex.call_id, &*ex.tool_name), ("x", "sleep"));
    assert_eq!(ex.parameters, json!({"ms": 10}));
    assert_eq!(done.status, Status::Success);
    assert_eq!(
        done.result,
        json!({"slept_ms": 10, "call_id": "x", "user_id": "alice"})
    );

    // Without an id, a fresh one is made and shows in the events.
    let out = d.call::<Sleep>(SleepIn { ms: 1 }).await.unwrap();
    assert!(out.call_id.starts_with("call_"), "{}", out.call_id);
    assert_eq!(pair(&sink.take()).call_id, out.call_id);
}

// ---------------------------------------------------------------- panics

#[tokio::test]
async fn a_panicking_tool_reports_panicked_and_the_next_call_succeeds() {
    let boom = tool_fn(
        "boom",
        "Panics on request.",
        |explode: bool, _cx| async move {
            if explode {
                panic!("internal detail: db password is hunter2");
            }
            Ok::<_, ToolError>("fine")
        },
    );
    let engine = engine_with(Registry::builder().tool(boom).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let err = d
        .dispatch(ToolCall::new("boom", json!(true)))
        .await
        .unwrap_err();
    let DispatchError::Panicked { tool, detail } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(tool, "boom");
    assert!(detail.contains("hunter2"), "the payload is kept for logs");
    assert!(
        !err.to_string().contains("hunter2"),
        "but not shown to the model"
    );
    assert!(!err.is_retryable());
    let done = pair(&sink.take());
    assert_eq!(done.status, Status::Panicked);
    assert!(!done.error.unwrap().contains("hunter2"));

    let ok = d
        .dispatch(ToolCall::new("boom", json!(false)))
        .await
        .unwrap();
    assert_eq!(ok.value, json!("fine"));
    assert_eq!(pair(&sink.take()).status, Status::Success);
    let m = engine.metrics();
    assert_eq!(
        (m.count(Status::Panicked), m.count(Status::Success)),
        (1, 1)
    );
    assert_eq!(m.active, 0);
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
    let engine = engine_with(
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

/// Every event of a closed channel, in order.
async fn drain(mut rx: mpsc::Receiver<Event>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
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

// ---------------------------------------------------------------- sink failures

#[tokio::test]
async fn a_sink_closed_before_the_call_means_the_tool_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(
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
    let engine = engine_with(registry);

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

// ---------------------------------------------------------------- invalid input

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Forecast {
    city: String,
    days: u8,
    #[serde(default)]
    options: Option<Options>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Options {
    units: String,
}

#[tokio::test]
async fn invalid_arguments_are_an_invalid_input_error_naming_the_field_and_the_body_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let forecast = {
        let runs = Arc::clone(&runs);
        tool_fn("forecast", "Forecast.", move |f: Forecast, _cx| {
            runs.fetch_add(1, SeqCst);
            async move { Ok::<_, ToolError>(f.days) }
        })
    };
    let engine = engine_with(Registry::builder().tool(forecast).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let cases: Vec<(&str, ToolCall, &str)> = vec![
        (
            "wrong type",
            ToolCall::new("forecast", json!({"city": "Paris", "days": "three"})),
            "days",
        ),
        (
            "missing field",
            ToolCall::new("forecast", json!({"city": "Paris"})),
            "days",
        ),
        (
            "unknown field",
            ToolCall::new(
                "forecast",
                json!({"city": "Paris", "days": 2, "country": "FR"}),
            ),
            "country",
        ),
        (
            "nested wrong type",
            ToolCall::new(
                "forecast",
                json!({"city": "Paris", "days": 2, "options": {"units": 5}}),
            ),
            "options.units",
        ),
        (
            "out of range",
            ToolCall::new("forecast", json!({"city": "Paris", "days": 300})),
            "days",
        ),
        (
            "not JSON",
            ToolCall::from_text("forecast", r#"{"city": "Paris", "days": "#),
            "not valid JSON",
        ),
        (
            "not an object",
            ToolCall::from_text("forecast", "[1, 2]"),
            "",
        ),
    ];
    for (what, call, names) in cases {
        let err = d.dispatch(call.with_id(what)).await.unwrap_err();
        let DispatchError::InvalidInput {
            tool,
            path,
            message,
        } = &err
        else {
            panic!("{what}: {err:?}");
        };
        assert_eq!(tool, "forecast", "{what}");
        assert!(
            path.contains(names) || message.contains(names),
            "{what}: `{names}` not in path `{path}` or message `{message}`"
        );
        assert!(err.to_string().contains(path.as_str()), "{what}: {err}");
        assert!(!err.is_retryable());
        let done = pair(&sink.take());
        assert_eq!((&*done.call_id, done.status), (what, Status::InvalidInput));
        assert_eq!(done.error, Some(err.to_string()));
    }
    // Where the path points at a field, it is that field's path.
    let err = d
        .dispatch(ToolCall::new(
            "forecast",
            json!({"city": "Paris", "days": "three"}),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DispatchError::InvalidInput { path, .. } if path == "days"),
        "{err:?}"
    );
    let err = d
        .dispatch(ToolCall::new(
            "forecast",
            json!({"city": "P", "days": 1, "options": {"units": 5}}),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DispatchError::InvalidInput { path, .. } if path == "options.units"),
        "{err:?}"
    );

    assert_eq!(runs.load(SeqCst), 0, "the body never ran");
    let m = engine.metrics();
    assert_eq!((m.count(Status::InvalidInput), m.total), (9, 9));

    // And valid arguments do run it.
    let ok = d
        .dispatch(ToolCall::from_text(
            "forecast",
            r#"{"city": "Paris", "days": 3}"#,
        ))
        .await
        .unwrap();
    assert_eq!(ok.value, json!(3));
    assert_eq!(runs.load(SeqCst), 1);
}

// ---------------------------------------------------------------- unknown tools

#[tokio::test]
async fn an_unknown_tool_is_its_own_error_with_both_events() {
    let engine = engine_with(Registry::builder().tool(echo()).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let err = d
        .dispatch(ToolCall::new("get_wether", json!({"city": "Paris"})).with_id("u1"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        DispatchError::UnknownTool {
            name: "get_wether".into()
        }
    );
    assert_eq!(err.status(), Status::UnknownTool);
    let events = sink.take();
    let done = pair(&events);
    let Event::ToolExecuting(ex) = &events[0] else {
        unreachable!()
    };
    assert_eq!((&*ex.call_id, &*ex.tool_name), ("u1", "get_wether"));
    assert_eq!(ex.parameters, json!({"city": "Paris"}));
    assert_eq!(done.status, Status::UnknownTool);
    assert_eq!(done.error.as_deref(), Some("unknown tool `get_wether`"));

    // An absurd name is cut, never a panic.
    let long = "x".repeat(10_000);
    let err = d
        .dispatch(ToolCall::new(long, json!(null)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DispatchError::UnknownTool { name } if name.len() <= 128),
        "{err:?}"
    );
    assert_eq!(pair(&sink.take()).status, Status::UnknownTool);
    let m = engine.metrics();
    assert_eq!((m.count(Status::UnknownTool), m.total, m.active), (2, 2, 0));
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
    let engine = engine_with(Registry::builder().tool(write).build().unwrap());
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
    let d = eager.dispatcher().sink(sink.clone()).user(user("alice"));
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

// ---------------------------------------------------------------- batches

#[tokio::test(start_paused = true)]
async fn dispatch_all_runs_calls_concurrently_and_returns_them_in_call_order() {
    const N: u64 = 5;
    let barrier = Arc::new(Barrier::new(N as usize));
    let meet = tool_fn("meet", "Waits for the whole batch.", move |i: u64, _cx| {
        let barrier = Arc::clone(&barrier);
        async move {
            // Only calls running at the same time can all pass the barrier; run one
            // by one, the first would wait until its timeout.
            barrier.wait().await;
            // Later calls finish first.
            tokio::time::sleep(Duration::from_millis(100 * (N - i))).await;
            Ok::<_, ToolError>(i * 10)
        }
    })
    .settings(ToolSettings::new().timeout(Duration::from_secs(5)));
    let engine = engine_with(Registry::builder().tool(meet).tool(echo()).build().unwrap());
    let sink = RecordingSink::new();
    let d = dispatcher(&engine, sink.clone(), "alice");

    let mut calls: Vec<ToolCall> = (0..N)
        .map(|i| ToolCall::new("meet", json!(i)).with_id(format!("b{i}")))
        .collect();
    calls.insert(2, ToolCall::new("nope", json!(null)).with_id("bad"));
    let results = d.dispatch_all(calls).await;
    assert_eq!(results.len(), N as usize + 1);
    let ids: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(o) => o.call_id.to_string(),
            Err(e) => e.status().to_string(),
        })
        .collect();
    assert_eq!(ids, ["b0", "b1", "unknown_tool", "b2", "b3", "b4"]);
    let values: Vec<Value> = results.iter().flatten().map(|o| o.value.clone()).collect();
    assert_eq!(
        values,
        [json!(0), json!(10), json!(20), json!(30), json!(40)]
    );

    // The events show the calls overlapping and finishing in reverse.
    let events = sink.take();
    let meet_done: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) if c.tool_name.as_ref() == "meet" => Some(&*c.call_id),
            _ => None,
        })
        .collect();
    assert_eq!(meet_done, ["b4", "b3", "b2", "b1", "b0"]);
    let first_meet_done = events
        .iter()
        .position(|e| matches!(e, Event::ToolCompleted(c) if c.tool_name.as_ref() == "meet"))
        .unwrap();
    let executing_before = events[..first_meet_done]
        .iter()
        .filter(|e| matches!(e, Event::ToolExecuting(_)))
        .count();
    assert_eq!(executing_before, N as usize + 1);
    assert_eq!(engine.metrics().count(Status::Success), N);
}

// ---------------------------------------------------------------- progress

#[tokio::test]
async fn progress_reaches_only_this_users_sink_between_executing_and_completed() {
    let steps = tool_fn(
        "steps",
        "Reports progress.",
        |n: u32, cx: ToolContext| async move {
            assert!(cx.progress(0.25, "fetching"));
            tokio::task::yield_now().await;
            assert!(cx.progress(7.0, ""));
            assert!(cx.progress(f64::NAN, "odd"));
            Ok::<_, ToolError>(n)
        },
    );
    let engine = engine_with(
        Registry::builder()
            .tool(steps)
            .tool(echo())
            .build()
            .unwrap(),
    );
    let (alice_sink, bob_sink) = (RecordingSink::new(), RecordingSink::new());
    let alice = dispatcher(&engine, alice_sink.clone(), "alice");
    let bob = dispatcher(&engine, bob_sink.clone(), "bob");

    let (a, b, c) = tokio::join!(
        alice.dispatch(ToolCall::new("steps", json!(1)).with_id("a1")),
        bob.dispatch(ToolCall::new("echo", json!(2)).with_id("b1")),
        bob.dispatch(ToolCall::new("steps", json!(3)).with_id("b2")),
    );
    assert_eq!(
        (a.unwrap().value, b.unwrap().value, c.unwrap().value),
        (json!(1), json!(2), json!(3))
    );

    let events = alice_sink.take();
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    assert_eq!(
        kinds,
        [
            "tool_executing",
            "tool_progress",
            "tool_progress",
            "tool_progress",
            "tool_completed"
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.call_id() == Some("a1") && e.user_id() == "alice")
    );
    let progress: Vec<(f64, Option<String>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolProgress(ToolProgress {
                progress, message, ..
            }) => Some((*progress, message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        [
            (0.25, Some("fetching".into())),
            (1.0, None),
            (0.0, Some("odd".into()))
        ]
    );
    let Event::ToolProgress(p) = &events[1] else {
        unreachable!()
    };
    assert_eq!(
        (&*p.tool_name, p.run_id.as_deref()),
        ("steps", Some("run_alice"))
    );

    // Bob's sink has his own events only, each call's progress inside its own pair.
    let bob_events = bob_sink.take();
    assert!(bob_events.iter().all(|e| e.user_id() == "bob"));
    assert_eq!(bob_events.len(), 2 + 5);
    for id in ["b1", "b2"] {
        let mine: Vec<&str> = bob_events
            .iter()
            .filter(|e| e.call_id() == Some(id))
            .map(Event::kind)
            .collect();
        assert_eq!(mine.first(), Some(&"tool_executing"), "{id}");
        assert_eq!(mine.last(), Some(&"tool_completed"), "{id}");
    }
    assert_eq!(engine.metrics().progress_dropped, 0);
}

#[tokio::test]
async fn progress_into_a_full_sink_is_dropped_and_counted_without_blocking() {
    let reported = Arc::new(Notify::new());
    let chatty = {
        let reported = Arc::clone(&reported);
        tool_fn(
            "chatty",
            "Reports into a full sink.",
            move |_: Value, cx: ToolContext| {
                let reported = Arc::clone(&reported);
                async move {
                    // The queue holds tool_executing and nobody reads it yet: a
                    // blocking progress would hang here forever.
                    let delivered = cx.progress(0.5, "half");
                    reported.notify_one();
                    Ok::<_, ToolError>(delivered)
                }
            },
        )
    };
    let engine = engine_with(Registry::builder().tool(chatty).build().unwrap());
    let (tx, rx) = mpsc::channel::<Event>(1);
    let d = dispatcher(&engine, tx, "alice");

    let call = tokio::spawn(async move { d.dispatch(ToolCall::new("chatty", json!({}))).await });
    reported.notified().await;
    let events = drain(rx).await;
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    assert_eq!(kinds, ["tool_executing", "tool_completed"]);
    let out = call.await.unwrap().unwrap();
    assert_eq!(out.value, json!(false), "progress reported the drop");
    let m = engine.metrics();
    assert_eq!((m.progress_dropped, m.sink_failures), (1, 0));
}

// ---------------------------------------------------------------- agent events

#[tokio::test]
async fn agent_events_share_the_users_ordered_stream() {
    let engine = engine_with(Registry::builder().tool(echo()).build().unwrap());
    let (tx, rx) = mpsc::channel::<Event>(16);
    let d = dispatcher(&engine, tx, "alice");

    d.notify(AgentUpdate::Started(Some("on it".into())))
        .await
        .unwrap();
    d.notify(AgentUpdate::Thinking("looking up the weather".into()))
        .await
        .unwrap();
    d.dispatch(ToolCall::new("echo", json!(1)).with_id("c1"))
        .await
        .unwrap();
    d.notify(AgentUpdate::Error("upstream hiccup".into()))
        .await
        .unwrap();
    d.notify(AgentUpdate::Completed(json!({"answer": 42})))
        .await
        .unwrap();
    drop(d);

    let events = drain(rx).await;
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    assert_eq!(
        kinds,
        [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_error",
            "agent_completed"
        ]
    );
    for e in &events {
        assert_eq!(e.user_id(), "alice");
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(
            (&json["run_id"], &json["thread_id"]),
            (&json!("run_alice"), &json!("t_1"))
        );
    }
    let Event::AgentCompleted(done) = &events[5] else {
        unreachable!()
    };
    assert_eq!(done.result, Some(json!({"answer": 42})));
    let Event::AgentThinking(thinking) = &events[1] else {
        unreachable!()
    };
    assert_eq!(thinking.message.as_deref(), Some("looking up the weather"));
    assert_eq!(engine.metrics().total, 1, "agent events are not tool calls");
}

// ---------------------------------------------------------------- user contexts

#[test]
fn user_contexts_reject_empty_and_placeholder_ids_with_typed_errors() {
    let err = |id: &str| UserContext::builder(id).build().unwrap_err();
    assert_eq!(err(""), UserContextError::Empty { field: "user_id" });
    assert_eq!(err(" \t "), UserContextError::Empty { field: "user_id" });
    for p in [
        "default",
        "none",
        "null",
        "placeholder",
        "registry",
        "Default",
        "NULL",
        "undefined",
    ] {
        assert_eq!(
            err(p),
            UserContextError::Placeholder {
                field: "user_id",
                value: p.into()
            },
            "{p}"
        );
    }
    assert!(matches!(
        err(&"u".repeat(257)),
        UserContextError::TooLong { len: 257, .. }
    ));
    assert!(matches!(
        err("alice\0"),
        UserContextError::Malformed { field: "user_id" }
    ));

    // Every id field is checked, and named in the error.
    let b = || UserContext::builder("alice");
    assert_eq!(
        b().thread_id("").build().unwrap_err(),
        UserContextError::Empty { field: "thread_id" }
    );
    assert!(matches!(
        b().run_id("none").build().unwrap_err(),
        UserContextError::Placeholder {
            field: "run_id",
            ..
        }
    ));
    assert!(matches!(
        b().request_id("default").build().unwrap_err(),
        UserContextError::Placeholder {
            field: "request_id",
            ..
        }
    ));
    // Real ids that merely contain a placeholder word are fine.
    let ok = b()
        .thread_id("default-thread-7")
        .run_id("run_null_1")
        .build()
        .unwrap();
    assert_eq!(
        (ok.thread_id(), ok.run_id()),
        (Some("default-thread-7"), Some("run_null_1"))
    );
}
