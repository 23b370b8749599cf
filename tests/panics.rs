//! A tool is code we call: a panic in its body, or in the destructor of anything it
//! holds when the pipeline drops it (timeout, cancellation, a caller that goes away),
//! costs its own call, with its pair, and never unwinds into the caller or the process.

mod common;

use common::*;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tool_dispatch::event::Status;
use tool_dispatch::*;

/// Panics when dropped, after counting the drop.
struct Booby(Arc<AtomicUsize>);

impl Drop for Booby {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
        panic!("a guard in the tool body panicked while being dropped");
    }
}

fn trapped(drops: &Arc<AtomicUsize>) -> impl tool_dispatch::IntoTool {
    let drops = Arc::clone(drops);
    tool_fn(
        "trapped",
        "Holds a guard that panics when dropped.",
        move |_: u8, _cx| {
            let guard = Booby(Arc::clone(&drops));
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, ToolError>(0u8)
            }
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_secs(1)))
}

fn engine(drops: &Arc<AtomicUsize>) -> Engine {
    let reg = Registry::builder()
        .tool(trapped(drops))
        .tool(quick())
        .build()
        .unwrap();
    Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(10)))
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_body_that_panics_while_dropped_at_its_timeout_ends_timeout() {
    if !in_child("a_body_that_panics_while_dropped_at_its_timeout_ends_timeout") {
        return;
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let engine = engine(&drops);
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new("trapped", json!(0)).with_id("t1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    assert_eq!(drops.load(SeqCst), 1, "the body was dropped");
    assert_eq!(completed(&sink, "t1").status, Status::Timeout);
    assert_eq!(
        d.dispatch(ToolCall::new("quick", json!(7)))
            .await
            .unwrap()
            .value,
        json!(7)
    );
    assert_eq!(engine.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_panics_while_dropped_by_cancel_or_by_the_caller_is_contained() {
    if !in_child("a_body_that_panics_while_dropped_by_cancel_or_by_the_caller_is_contained") {
        return;
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let engine = engine(&drops);
    let (d, sink) = recorded(&engine, user("alice"));
    // cancel_user drops the body.
    let call = spawn(&d, ToolCall::new("trapped", json!(0)).with_id("c1"));
    settle().await;
    assert_eq!(engine.cancel_user("alice").here, 1);
    assert_eq!(call.await.unwrap().unwrap_err().status(), Status::Cancelled);
    // The caller drops the dispatch future while the body waits.
    let mut fut = Box::pin(d.dispatch(ToolCall::new("trapped", json!(0)).with_id("c2")));
    assert!(poll_once(&mut fut).await.is_pending());
    drop(fut); // must not unwind here
    // And an aborted task.
    let call = spawn(&d, ToolCall::new("trapped", json!(0)).with_id("c3"));
    settle().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(drops.load(SeqCst), 3);
    for id in ["c1", "c2", "c3"] {
        assert_eq!(completed(&sink, id).status, Status::Cancelled);
    }
    let m = engine.metrics();
    assert_eq!((m.count(Status::Cancelled), m.active), (3, 0));
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
    let engine = plain_engine(Registry::builder().tool(boom).build().unwrap());
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
