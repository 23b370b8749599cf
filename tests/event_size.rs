//! Every event stays within its encoded size bound (`Redaction::max_event_bytes`),
//! whatever the shape of what it carries: wide objects, long arrays of long strings,
//! deep values with text at every level, strings that escape to six bytes a
//! character, long ids beside them. Arguments, results, errors, progress, approval
//! requests and agent results alike, and the run log's frames with them. The caller's
//! value is never cut, and a marker says what the event lost.

mod common;

use common::*;
use serde_json::{Value, json};
use tool_dispatch::event::{AgentUpdate, Event};
use tool_dispatch::*;

/// Shapes that pass every per-field cut (1 KiB strings, 100 items an array, 16
/// levels) and still add up to megabytes.
fn hostile_payloads() -> Vec<(&'static str, Value)> {
    let kib = "x".repeat(1024);
    let wide: serde_json::Map<String, Value> = (0..20_000)
        .map(|i| (format!("key_{i:05}"), Value::from(kib.clone())))
        .collect();
    let long = Value::from(
        (0..100)
            .map(|_| Value::from(vec![Value::from(kib.clone()); 200]))
            .collect::<Vec<_>>(),
    );
    let cube = Value::from(
        (0..100)
            .map(|_| Value::from(vec![Value::from(vec![Value::from(u64::MAX); 100]); 100]))
            .collect::<Vec<_>>(),
    );
    let mut deep = json!({"text": kib});
    let six = vec![kib.clone(); 6];
    for _ in 0..14 {
        deep = json!({"text": kib, "list": six, "next": deep});
    }
    let escapes = Value::from("\u{1}".repeat(1 << 20));
    vec![
        ("20,000 keys of 1 KiB", Value::Object(wide)),
        ("100 arrays of 200 strings of 1 KiB", long),
        ("a cube of 1,000,000 numbers", cube),
        ("text at each of 15 levels", deep),
        ("a megabyte that escapes 6 to 1", escapes),
    ]
}

fn len(e: &Event) -> usize {
    serde_json::to_string(e).expect("an event serializes").len()
}

fn user_with_long_ids() -> UserContext {
    let id = "i".repeat(MAX_ID_LEN);
    UserContext::builder(&id)
        .run_id(&id)
        .thread_id(&id)
        .build()
        .expect("ids of the longest accepted length")
}

#[tokio::test]
async fn every_tool_event_stays_within_the_bound_whatever_the_payload() {
    for bound in [64 * 1024, 4 * 1024] {
        let echo = tool_fn("echo", "Returns its input.", |v: Value, _cx| async move {
            Ok::<_, ToolError>(v)
        });
        let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap())
            .redaction(Redaction::default().max_event_bytes(bound))
            .build();
        for user in [user("alice"), user_with_long_ids()] {
            let (d, sink) = recorded(&engine, user);
            for (what, payload) in hostile_payloads() {
                let out = d
                    .dispatch(ToolCall::new("echo", payload.clone()))
                    .await
                    .unwrap();
                assert_eq!(out.value, payload, "{what}: the caller's value is whole");
                let events = sink.take();
                assert_eq!(events.len(), 2, "{what}");
                for e in &events {
                    assert!(
                        len(e) <= bound,
                        "{what}: a {} of {} bytes over a bound of {bound}",
                        e.kind(),
                        len(e)
                    );
                    assert!(
                        serde_json::to_string(e).unwrap().contains("TRUNCATED")
                            || serde_json::to_string(e).unwrap().contains("truncated"),
                        "{what}: a marker says what was cut"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn errors_progress_approval_requests_and_agent_results_stay_within_the_bound() {
    let bound = 4 * 1024;
    let huge = "\u{1}".repeat(1 << 20);
    let (h1, h2) = (huge.clone(), huge.clone());
    let failing = tool_fn("failing", "Fails loudly.", move |_: Value, _cx| {
        let m = h1.clone();
        async move { Err::<Value, _>(ToolError::new(m)) }
    });
    let chatty = tool_fn("chatty", "Reports a lot.", move |_: Value, cx| {
        let m = h2.clone();
        async move {
            cx.progress(0.5, m);
            Ok::<_, ToolError>(Value::Null)
        }
    });
    let gated = tool_fn("gated", "Asks first.", |v: Value, _cx| async move {
        Ok::<_, ToolError>(v)
    })
    .settings(ToolSettings::new().requires_approval(huge.clone()));
    let reg = Registry::builder()
        .tool(failing)
        .tool(chatty)
        .tool(gated)
        .build()
        .unwrap();
    let engine = Engine::builder(reg)
        .redaction(Redaction::default().max_event_bytes(bound))
        .build();
    let (d, sink) = recorded(&engine, user_with_long_ids());
    let payload = hostile_payloads().remove(0).1;
    let _ = d.dispatch(ToolCall::new("failing", payload.clone())).await;
    let _ = d.dispatch(ToolCall::new("chatty", payload.clone())).await;
    let call = d.dispatch(ToolCall::new("gated", payload.clone()).with_id("g"));
    let answer = async {
        while engine.metrics().awaiting_approval == 0 {
            tokio::task::yield_now().await;
        }
        let id = "i".repeat(MAX_ID_LEN);
        engine.resolve_approval(&id, "g", Verdict::Approve).await
    };
    let (out, answered) = tokio::join!(call, answer);
    assert_eq!(answered, Ok(()));
    assert_eq!(out.unwrap().value, payload);
    d.notify(AgentUpdate::Completed(payload)).await.unwrap();
    let events = sink.events();
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    for kind in [
        "tool_progress",
        "tool_approval_required",
        "agent_completed",
        "tool_completed",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    for e in &events {
        assert!(len(e) <= bound, "a {} of {} bytes", e.kind(), len(e));
    }
}

#[tokio::test]
async fn run_log_frames_stay_within_the_bound() {
    let bound = 8 * 1024;
    let engine = Engine::builder(Registry::builder().tool(echo()).build().unwrap())
        .redaction(Redaction::default().max_event_bytes(bound))
        .build();
    let log = RunLog::new(RunLogConfig::default());
    let writer = log.writer("alice", "run_1");
    let mut reader = writer.subscribe();
    let d = engine.dispatcher().sink(writer).user(
        UserContext::builder("alice")
            .run_id("run_1")
            .build()
            .unwrap(),
    );
    for (_, payload) in hostile_payloads() {
        d.dispatch(ToolCall::new("echo", payload)).await.unwrap();
    }
    let mut frames = 0;
    while let Some(Ok(frame)) = reader.try_next() {
        frames += 1;
        // The frame is the event plus its `"seq":N,`.
        assert!(frame.json.len() <= bound + 32, "{} bytes", frame.json.len());
    }
    assert_eq!(frames, 10);
}

mod shapes {
    use proptest::prelude::*;
    use serde_json::Value;
    use tool_dispatch::Redaction;

    /// Any JSON value: text with escapes, numbers of every kind, wide and deep.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[\\x00-\\x1f\"\\\\a-zé€😀]{0,300}".prop_map(Value::from),
        ];
        leaf.prop_recursive(8, 2_000, 60, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..60).prop_map(Value::from),
                prop::collection::btree_map("[a-z_\\x01\"]{0,24}", inner, 0..60)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the value and the bound, what `apply` leaves encodes within it.
        #[test]
        fn any_value_is_cut_to_the_bound(v in value(), bound in 1024usize..16_384) {
            let mut shown = v.clone();
            Redaction::default().max_string_len(200).max_event_bytes(bound).apply(&mut shown, &[]);
            let len = serde_json::to_string(&shown).unwrap().len();
            prop_assert!(len <= bound, "{len} > {bound}");
            if serde_json::to_string(&v).unwrap().len() <= bound / 4 && !has_long_text(&v) {
                prop_assert_eq!(shown, v, "a small value is left as it was");
            }
        }
    }

    fn has_long_text(v: &Value) -> bool {
        match v {
            Value::String(s) => s.chars().count() > 200,
            Value::Array(a) => a.len() > 100 || a.iter().any(has_long_text),
            Value::Object(o) => o.values().any(has_long_text),
            _ => false,
        }
    }
}
