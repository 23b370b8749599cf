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

// ------------------------------------------------------------ an input that panics in Drop

/// A tool input whose destructor panics: it is dropped by the pipeline whenever the
/// call ends before its body ran.
#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
struct Fragile {
    n: u64,
}

impl Drop for Fragile {
    fn drop(&mut self) {
        panic!("the input panicked while being dropped");
    }
}

/// Every way a call can end with its body unstarted (denied, rate limited, busy,
/// undeliverable, a cache hit, cancelled while it waits for a slot, shutting down),
/// in a batch with two healthy calls: the batch returns every result, the fragile
/// call costs only itself, and the process survives (in a child process, since a
/// panic that escaped into a destructor would abort it).
#[tokio::test]
async fn an_input_that_panics_in_drop_before_its_body_ran_costs_only_its_call() {
    if !in_child("an_input_that_panics_in_drop_before_its_body_ran_costs_only_its_call") {
        return;
    }
    let fragile = |name: &str, settings: ToolSettings| {
        tool_fn(
            name,
            "Takes a fragile input.",
            |i: Fragile, _cx| async move {
                let n = i.n;
                std::mem::forget(i); // a body that ran disposes of its input quietly
                Ok::<_, ToolError>(n)
            },
        )
        .settings(settings)
    };
    struct DenyDenied;
    impl Policy for DenyDenied {
        fn check<'a>(
            &'a self,
            req: PolicyRequest<'a>,
        ) -> BoxFuture<'a, Result<Decision, PolicyError>> {
            let d = match req.tool.name.as_str() {
                "denied" => Decision::Deny {
                    missing_scopes: vec![],
                    reason: Some("no".into()),
                },
                _ => Decision::Allow,
            };
            Box::pin(async move { Ok(d) })
        }
    }
    let reg = Registry::builder()
        .tool(fragile("denied", ToolSettings::new()))
        .tool(fragile("plain", ToolSettings::new()))
        .tool(fragile(
            "cached",
            ToolSettings::new().cache(Duration::from_secs(60)),
        ))
        .tool(echo())
        .tool(tool_fn(
            "hold",
            "Waits until cancelled.",
            |_: String, cx| async move {
                cx.cancelled().await;
                Ok::<_, ToolError>(0)
            },
        ))
        .build()
        .unwrap();
    let engine = Engine::builder(reg)
        .policy(DenyDenied)
        .limits(
            Limits::default()
                .per_user(no_rate(2))
                .max_wait(Duration::from_millis(1)),
        )
        .build();
    let batch = |tool: &str| {
        vec![
            ToolCall::new(tool, json!({"n": 7})),
            ToolCall::new("echo", json!(1)),
            ToolCall::new("echo", json!(2)),
        ]
    };
    let check = |what: &str, out: Vec<Result<ToolOutput, DispatchError>>, status: Status| {
        assert_eq!(out.len(), 3, "{what}");
        match &out[0] {
            Ok(o) => assert_eq!(status, Status::Success, "{what}: {:?}", o.value),
            Err(e) => assert_eq!(e.status(), status, "{what}: {e:?}"),
        }
        assert_eq!(out[1].as_ref().unwrap().value, json!(1), "{what}");
        assert_eq!(out[2].as_ref().unwrap().value, json!(2), "{what}");
    };
    let (d, _) = recorded(&engine, user("alice"));

    check(
        "denied",
        d.dispatch_all(batch("denied")).await,
        Status::Denied,
    );
    // A cache hit: the second call's body never runs.
    check(
        "cached",
        d.dispatch_all(batch("cached")).await,
        Status::Success,
    );
    check(
        "cache hit",
        d.dispatch_all(batch("cached")).await,
        Status::Success,
    );

    // Undeliverable: a sink that is closed.
    let closed = RecordingSink::new();
    closed.close();
    let gone = engine.dispatcher().sink(closed).user(user("carol"));
    let out = gone.dispatch(ToolCall::new("plain", json!({"n": 1}))).await;
    assert_eq!(out.unwrap_err().status(), Status::Undelivered);

    // Busy: bob's two slots are held; his fragile call waits a millisecond, then ends.
    let (bob, _) = recorded(&engine, user("bob"));
    let held = [
        spawn(&bob, ToolCall::new("hold", json!("a"))),
        spawn(&bob, ToolCall::new("hold", json!("b"))),
    ];
    settle().await;
    let out = bob.dispatch(ToolCall::new("plain", json!({"n": 1}))).await;
    assert_eq!(out.unwrap_err().status(), Status::Busy);
    // Cancelled while it waits for one of those slots; then the held calls too.
    let waiting = spawn(&bob, ToolCall::new("plain", json!({"n": 2})));
    settle().await;
    engine.cancel_user("bob");
    assert_eq!(
        waiting.await.unwrap().unwrap_err().status(),
        Status::Cancelled
    );
    for h in held {
        assert_eq!(h.await.unwrap().unwrap_err().status(), Status::Cancelled);
    }

    // Rate limited: a user with no calls left.
    let limited = Engine::builder(
        Registry::builder()
            .tool(fragile("plain", ToolSettings::new()))
            .tool(echo())
            .build()
            .unwrap(),
    )
    .limits(Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(Rate::per_minute(2)),
    }))
    .build();
    let (dave, _) = recorded(&limited, user("dave"));
    let used = dave
        .dispatch_all(vec![
            ToolCall::new("echo", json!(1)),
            ToolCall::new("echo", json!(2)),
        ])
        .await;
    assert!(used.iter().all(Result::is_ok));
    let out = dave.dispatch(ToolCall::new("plain", json!({"n": 1}))).await;
    assert_eq!(out.unwrap_err().status(), Status::RateLimited);

    // Shutting down: a typed call is refused before anything, its input dropped.
    let typed = tool_fn("typed", "Typed.", |i: Fragile, _cx| async move {
        let n = i.n;
        std::mem::forget(i);
        Ok::<_, ToolError>(n)
    });
    let closing = Engine::builder(Registry::builder().tool(typed).build().unwrap()).build();
    let _ = closing.shutdown(Duration::ZERO).await;
    let (erin, _) = recorded(&closing, user("erin"));
    let out = erin.dispatch(ToolCall::new("typed", json!({"n": 3}))).await;
    assert_eq!(out.unwrap_err().status(), Status::Unavailable);
}

/// An input type whose `Deserialize` panics: the call ends `panicked`, with its pair.
#[tokio::test]
async fn an_input_whose_deserialize_panics_ends_panicked_with_its_pair() {
    #[derive(serde::Serialize)]
    struct Explosive;
    impl<'de> serde::Deserialize<'de> for Explosive {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            panic!("deserialize exploded");
        }
    }
    impl schemars::JsonSchema for Explosive {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            "Explosive".into()
        }
        fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
            schemars::json_schema!({"type": "object"})
        }
    }
    let tool = tool_fn("explosive", "Explodes.", |_: Explosive, _cx| async move {
        Ok::<_, ToolError>(0)
    });
    let engine = Engine::builder(Registry::builder().tool(tool).build().unwrap()).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new("explosive", json!({})).with_id("x"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Panicked);
    assert_eq!(completed(&sink, "x").status, Status::Panicked);
    assert_eq!(engine.metrics().count(Status::Panicked), 1);
}
