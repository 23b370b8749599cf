//! Dispatch: one pair per call whatever its outcome, timeouts, typed calls and
//! batches of parallel calls.

mod common;

use common::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tokio::sync::Barrier;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::*;

// ---------------------------------------------------------------- basics

#[tokio::test]
async fn every_call_streams_one_pair_whatever_its_outcome() {
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
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
    let engine = plain_engine(Registry::builder().tool(sleepy).build().unwrap());
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
    let engine = plain_engine(Registry::builder().tool(Sleep).build().unwrap());
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
    let engine = plain_engine(
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
    let engine = plain_engine(Registry::builder().tool(meet).tool(echo()).build().unwrap());
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
