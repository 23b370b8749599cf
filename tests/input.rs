//! Hostile input: values nested 100,000 deep, megabytes of text in every text field,
//! secrets in the wrong type, reused call ids, absurd durations. Each is a typed error
//! or a bounded event, never a panic, an abort or a leak of what redaction hides.

mod common;

use common::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tool_dispatch::PolicyError;
use tool_dispatch::event::{AgentUpdate, Event, Status};
use tool_dispatch::*;

const DEEP: usize = 100_000;

/// `[[[…]]]`, `depth` levels, built without recursion.
fn nested(depth: usize) -> Value {
    let mut v = Value::Null;
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// `{"a":{"a":…}}`, `depth` levels.
fn nested_objects(depth: usize) -> Value {
    let mut v = Value::Null;
    for _ in 0..depth {
        let mut m = serde_json::Map::new();
        m.insert("a".into(), v);
        v = Value::Object(m);
    }
    v
}

/// Drops a deep value without recursion (the test's own; serde_json's drop recurses).
fn drop_flat(v: Value) {
    let mut stack = vec![v];
    while let Some(mut v) = stack.pop() {
        match &mut v {
            Value::Array(a) => stack.append(a),
            Value::Object(m) => stack.extend(std::mem::take(m).into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

fn engine_with(reg: Registry) -> Engine {
    Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(10)))
        .build()
}

// ------------------------------------------------------------ nesting depth

#[tokio::test]
async fn arguments_nested_100000_deep_are_invalid_input_at_every_entry_point() {
    if !in_child("arguments_nested_100000_deep_are_invalid_input_at_every_entry_point") {
        return;
    }
    let engine = engine_with(Registry::builder().tool(echo()).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    for (tool, deep) in [
        ("echo", nested(DEEP)),
        ("echo", nested_objects(DEEP)),
        ("no_such_tool", nested(DEEP)),
        ("echo", nested(129)),
    ] {
        let err = d.dispatch(ToolCall::new(tool, deep)).await.unwrap_err();
        match (tool, &err) {
            ("echo", DispatchError::InvalidInput { message, .. }) => {
                assert_eq!(message, "arguments are nested more than 128 levels deep")
            }
            ("no_such_tool", DispatchError::UnknownTool { .. }) => {}
            _ => panic!("{tool}: {err:?}"),
        }
    }
    // 128 levels are fine.
    let ok = d
        .dispatch(ToolCall::new("echo", nested(128)))
        .await
        .unwrap();
    drop_flat(ok.value);
    assert_paired(&sink.events());
    for e in sink.events() {
        if let Event::ToolExecuting(ex) = e
            && ex.parameters.is_string()
        {
            assert_eq!(ex.parameters, "[arguments nested too deep]");
        }
    }

    // Typed: a `Value` input, and a result nested too deep.
    struct Deep;
    impl Tool for Deep {
        const NAME: &'static str = "deep";
        type Input = Value;
        type Output = Value;
        fn description(&self) -> &str {
            "Returns a value nested 100,000 deep."
        }
        async fn call(&self, _: Value, _: ToolContext) -> Result<Value, ToolError> {
            Ok(nested(DEEP))
        }
    }
    let engine = engine_with(Registry::builder().tool(Deep).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d.call::<Deep>(nested(DEEP)).await.unwrap_err();
    assert_eq!(err.status(), Status::InvalidInput);
    // The typed caller gets its value; the event says why it is not shown.
    let out = d.call::<Deep>(json!(1)).with_id("t2").await.unwrap();
    drop_flat(out.value);
    let done = completed(&sink, "t2");
    assert_eq!(done.status, Status::Success);
    assert_eq!(done.result, Value::Null);
    assert!(done.error.unwrap().contains("cannot be shown"));
    // By name there is no value without JSON: the call fails, counted.
    let err = d
        .dispatch(ToolCall::new("deep", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed);
    assert_eq!(engine.metrics().unserializable_results, 2);

    // Agent events and provider payloads.
    let r = d.notify(AgentUpdate::Completed(nested(DEEP))).await;
    assert!(r.is_ok());
    // Built by hand: `json!` would serialize the deep value recursively.
    let mut function = json!({"name": "echo"});
    function["arguments"] = nested(DEEP);
    let mut call = json!({"id": "c", "type": "function"});
    call["function"] = function;
    let payload = json!({ "tool_calls": [] });
    let mut payload = payload;
    payload["tool_calls"] = Value::Array(vec![call]);
    let err = tool_dispatch::provider::openai::parse_calls(&payload).unwrap_err();
    assert!(
        err.to_string().contains("nested more than 128 levels"),
        "{err}"
    );
    let (deep, deep_objects) = (nested(DEEP), nested_objects(DEEP));
    let err = tool_dispatch::provider::anthropic::parse_calls(&deep).unwrap_err();
    assert!(err.to_string().contains("nested more than 128"), "{err}");
    let err = tool_dispatch::provider::responses::parse_calls(&deep).unwrap_err();
    assert!(err.to_string().contains("nested more than 128"), "{err}");
    let err = tool_dispatch::provider::mcp::parse_call(&deep_objects).unwrap_err();
    assert!(err.to_string().contains("nested more than 128"), "{err}");
    for v in [payload, deep, deep_objects] {
        drop_flat(v);
    }
    assert_eq!(engine.active(), 0);
}

#[tokio::test]
async fn a_lower_depth_limit_applies_to_text_arguments_too() {
    let reg = Registry::builder().tool(echo()).build().unwrap();
    let engine = Engine::builder(reg).max_depth(3).build();
    let (d, _) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::from_text("echo", "[[[[1]]]]"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid arguments for `echo` at `.`: arguments are nested more than 3 levels deep"
    );
    let ok = d.dispatch(ToolCall::from_text("echo", "[[[1]]]")).await;
    assert_eq!(ok.unwrap().value, json!([[[1]]]));
}

// ------------------------------------------------------------ secrets in error text

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
struct LoginIn {
    user: String,
    pin: u32,
    password: u64,
    nested: Option<Inner>,
    mode: Option<Mode>,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
struct Inner {
    api_key: bool,
    credentials: Vec<u8>,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Fast,
    Slow,
}

#[tokio::test]
async fn invalid_input_never_repeats_a_value_that_redaction_hides() {
    let login = tool_fn("login", "Logs in.", |_: LoginIn, _cx| async move {
        Ok::<_, ToolError>(true)
    })
    .settings(ToolSettings::new().sensitive("pin"));
    let engine = engine_with(Registry::builder().tool(login).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    let secret = "SECRET-PIN-7391";
    let base = json!({"user": "a", "pin": 1, "password": 2, "nested": null, "mode": null});
    let mut cases = Vec::new();
    for (path, bad) in [
        ("/pin", json!(secret)),
        (
            "/pin",
            json!(format!("{secret}\", expected u32, invalid type: string \"")),
        ),
        ("/password", json!(secret)),
        ("/password", json!(-7391.5)),
        ("/nested", json!({"api_key": secret, "credentials": []})),
        ("/nested", json!({"api_key": true, "credentials": [secret]})),
        ("/nested", json!({"api_key": true, "credentials": secret})),
        ("/mode", json!("TURBO")),
    ] {
        let mut args = base.clone();
        *args.pointer_mut(path).unwrap() = bad;
        cases.push(args);
    }
    for args in cases {
        let err = d
            .dispatch(ToolCall::new("login", args.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::InvalidInput, "{args}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        assert!(!err.to_string().contains("7391"), "{err}");
        // The same call as JSON text, as OpenAI sends it.
        let err = d
            .dispatch(ToolCall::from_text("login", args.to_string()))
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }
    let wire = serde_json::to_string(&sink.events()).unwrap();
    assert!(
        !wire.contains("SECRET") && !wire.contains("7391"),
        "a secret reached the wire"
    );
    // What stays: where, and what was expected.
    let mut args = base.clone();
    args["pin"] = json!(secret);
    let err = d.dispatch(ToolCall::new("login", args)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid arguments for `login` at `pin`: invalid type: string, expected u32"
    );
}

/// A `Deserialize` that quotes what it was given in its error, as custom ones do.
#[derive(Debug)]
struct Echoing;

impl<'de> Deserialize<'de> for Echoing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Err(serde::de::Error::custom(format!(
            "`{s}` is not a valid token"
        )))
    }
}

impl Serialize for Echoing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("")
    }
}

impl JsonSchema for Echoing {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Echoing".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string"})
    }
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
struct TokenIn {
    session_token: Echoing,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
struct NoteIn {
    note: Echoing,
}

#[tokio::test]
async fn a_custom_deserializer_quoting_a_sensitive_value_is_not_passed_on() {
    let auth = tool_fn("auth", "Checks a token.", |_: TokenIn, _cx| async move {
        Ok::<_, ToolError>(true)
    });
    let note = tool_fn("note", "Takes a note.", |_: NoteIn, _cx| async move {
        Ok::<_, ToolError>(true)
    });
    let engine = engine_with(Registry::builder().tool(auth).tool(note).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    let err = d
        .dispatch(ToolCall::new(
            "auth",
            json!({"session_token": "tok-SECRET-1"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid arguments for `auth` at `session_token`: invalid value"
    );
    // Under a key that is not sensitive the tool's own message stays, cut to a bound.
    let long = "n".repeat(100_000);
    let err = d
        .dispatch(ToolCall::new("note", json!({ "note": long })))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid arguments for `note` at `note`: `nnn")
    );
    assert!(err.to_string().len() < 1024);
    let wire = serde_json::to_string(&sink.events()).unwrap();
    assert!(!wire.contains("SECRET"));
    assert!(wire.len() < 16 * 1024);
}

// ------------------------------------------------------------ megabytes of text

#[tokio::test]
async fn every_text_field_of_every_event_is_cut_and_the_callers_value_stays_whole() {
    const BIG: usize = 8 << 20;
    let big = || "E".repeat(BIG);
    let loud = tool_fn(
        "loud",
        "Fails loudly.",
        move |kind: String, cx| async move {
            match kind.as_str() {
                "error" => Err(ToolError::new("E".repeat(BIG))),
                "progress" => {
                    cx.progress(0.5, "P".repeat(BIG));
                    Ok("P".to_owned())
                }
                _ => Ok("R".repeat(BIG)),
            }
        },
    );
    let count = tool_fn("count", "Takes a number.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    struct Picky;
    impl Policy for Picky {
        fn check<'a>(
            &'a self,
            req: tool_dispatch::PolicyRequest<'a>,
        ) -> tool_dispatch::BoxFuture<'a, Result<Decision, PolicyError>> {
            let deny = req.arguments == &json!("deny");
            Box::pin(async move {
                Ok(if deny {
                    Decision::deny("D".repeat(8 << 20))
                } else {
                    Decision::Allow
                })
            })
        }
    }
    let reg = Registry::builder().tool(loud).tool(count).build().unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(10)))
        .policy(Picky)
        .build();
    let (d, sink) = recorded(&engine, user("alice"));
    let e = d
        .dispatch(ToolCall::new("loud", json!("error")))
        .await
        .unwrap_err();
    assert!(e.to_string().len() < 2048, "the model's text is cut too");
    d.dispatch(ToolCall::new("loud", json!("progress")))
        .await
        .unwrap();
    let out = d
        .dispatch(ToolCall::new("loud", json!("result")))
        .await
        .unwrap();
    assert_eq!(
        out.value.as_str().unwrap().len(),
        BIG,
        "the caller's value is whole"
    );
    let e = d
        .dispatch(ToolCall::new("count", json!(big())))
        .await
        .unwrap_err();
    assert!(e.to_string().len() < 2048);
    let e = d
        .dispatch(ToolCall::new("loud", json!("deny")))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Status::Denied);
    assert!(e.to_string().len() < 2048);
    let e = d
        .dispatch(ToolCall::new(big(), json!(big())))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Status::UnknownTool);
    d.notify(AgentUpdate::Thinking(big())).await.unwrap();
    d.notify(AgentUpdate::Error(big())).await.unwrap();
    d.notify(AgentUpdate::Completed(json!({ "answer": big() })))
        .await
        .unwrap();
    let events = sink.events();
    assert_eq!(events.len(), 6 * 2 + 1 + 3);
    for e in &events {
        let text = serde_json::to_string(e).unwrap();
        assert!(text.len() < 8 * 1024, "{}: {} bytes", e.kind(), text.len());
    }
}

// ------------------------------------------------------------ call ids

#[tokio::test]
async fn a_call_id_in_flight_is_not_reused_in_a_batch_or_across_calls() {
    let (gate, started) = (
        std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
        tokio::sync::mpsc::unbounded_channel(),
    );
    let (started_tx, mut started_rx) = started;
    let engine = hold_engine(hold(&gate, started_tx, ToolSettings::new()), 10);
    let (d, sink) = recorded(&engine, user("alice"));
    // The first call is released only once it runs: whatever the timing, the
    // repeats are refused because the batch repeats the id.
    let release = {
        let gate = std::sync::Arc::clone(&gate);
        tokio::spawn(async move {
            started_rx.recv().await;
            gate.add_permits(1);
            started_rx
        })
    };
    let results = d
        .dispatch_all((0..3).map(|i| ToolCall::new("hold", json!(format!("t{i}"))).with_id("dup")))
        .await;
    assert_eq!(results[0].as_ref().unwrap().value, json!("t0"));
    assert_eq!(&*results[0].as_ref().unwrap().call_id, "dup");
    for r in &results[1..] {
        let e = r.as_ref().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid arguments for `hold` at `.`: call id `dup` is already used by a call in flight; ids must be unique"
        );
    }
    let mut started_rx = release.await.unwrap();
    // Three distinguishable pairs on the wire: `dup` and two fresh ids.
    let events = sink.take();
    assert_paired(&events);
    let mut ids: Vec<&str> = events.iter().filter_map(Event::call_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids.iter().filter(|i| **i == "dup").count(), 1);

    // Across calls: while `x` runs, a second `x` is refused; after it ends, reuse is fine.
    let (d2, _) = recorded(&engine, user("alice"));
    let first = spawn(&d, ToolCall::new("hold", json!("first")).with_id("x"));
    assert_eq!(started_rx.recv().await.unwrap(), "first");
    let err = d2
        .dispatch(ToolCall::new("quick", json!(1)).with_id("x"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::InvalidInput);
    // Another user may use the same id.
    let (bob, _) = recorded(&engine, user("bob"));
    assert!(
        bob.dispatch(ToolCall::new("quick", json!(1)).with_id("x"))
            .await
            .is_ok()
    );
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().value, json!("first"));
    assert!(
        d2.dispatch(ToolCall::new("quick", json!(1)).with_id("x"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn absurd_call_ids_are_replaced_by_fresh_ones() {
    let engine = engine_with(Registry::builder().tool(echo()).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    for id in [
        "".to_owned(),
        "   ".to_owned(),
        "x".repeat(10_000),
        "\u{0}".repeat(300),
    ] {
        let out = d
            .dispatch(ToolCall::new("echo", json!(1)).with_id(id.clone()))
            .await
            .unwrap();
        assert!(
            out.call_id.starts_with("call_"),
            "{id:?} -> {}",
            out.call_id
        );
    }
    assert_paired(&sink.events());
}

// ------------------------------------------------------------ durations

#[tokio::test(start_paused = true)]
async fn durations_of_zero_and_max_are_accepted_everywhere_without_a_panic() {
    let t = tool_dispatch::event::Timestamp::now();
    assert!(t.after(Duration::MAX) >= t);
    assert!(t.after(Duration::ZERO) == t);
    let _ = Rate::new(u32::MAX, Duration::MAX).interval();
    let _ = Rate::new(0, Duration::ZERO).burst(0).interval();
    for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        let reg = Registry::builder()
            .tool(echo())
            .tool(quick())
            .build()
            .unwrap();
        let limits = Limits::default().max_wait(d).per_user(UserLimits {
            concurrency: 1,
            rate: Some(Rate::new(1, d)),
        });
        let engine = Engine::builder(reg)
            .limits(limits)
            .default_timeout(d)
            .delivery_timeout(d)
            .cache(CacheConfig::default())
            .build();
        let (dsp, sink) = recorded(&engine, user("alice"));
        let r = dsp
            .dispatch(ToolCall::new("echo", json!(1)).with_timeout(d))
            .await;
        // A ready tool finishes even under a zero timeout (it is polled before the clock).
        assert!(
            r.is_ok() || r.as_ref().unwrap_err().status() == Status::Timeout,
            "{r:?}"
        );
        let _ = dsp.dispatch(ToolCall::new("quick", json!(2))).await;
        assert_paired(&sink.events());
        let report = engine.shutdown(d.min(Duration::from_secs(1))).await;
        assert_eq!(report.still_active, 0);
        assert_eq!(engine.active(), 0);
    }
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
    let engine = plain_engine(Registry::builder().tool(forecast).build().unwrap());
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
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
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

// ------------------------------------------------------------ a secret under an enum variant

/// A password type whose `Deserialize` refuses weak passwords by quoting them.
#[derive(Serialize, JsonSchema)]
struct Pw(String);

impl<'de> Deserialize<'de> for Pw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Err(serde::de::Error::custom(format!(
            "password {s:?} is too weak"
        )))
    }
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
enum Credential {
    Password(Pw),
    Pin { pin: Pw },
    Plain(Pw),
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[allow(dead_code)]
struct SignInIn {
    auth: Credential,
}

/// A value refused under an enum variant whose name is sensitive (`Password`), under
/// a tool's own sensitive name (`pin`) inside a variant, and under a sensitive key
/// with a variant below it: no error text, event or model message repeats it.
#[tokio::test]
async fn a_secret_refused_under_an_enum_variant_is_never_repeated() {
    let login = tool_fn("login", "Logs in.", |_: SignInIn, _cx| async move {
        Ok::<_, ToolError>(true)
    })
    .settings(ToolSettings::new().sensitive("pin"));
    let engine = engine_with(Registry::builder().tool(login).build().unwrap());
    let (d, sink) = recorded(&engine, user("alice"));
    let inputs = [
        json!({"auth": {"Password": "SEC-PW-9"}}),
        json!({"auth": {"Pin": {"pin": "SEC-PW-9"}}}),
        json!({"token": {"auth": {"Plain": "SEC-PW-9"}}}),
    ];
    for (i, args) in inputs.into_iter().enumerate() {
        let calls = vec![ToolCall::new("login", args).with_id(format!("c{i}"))];
        let results = d.dispatch_all(calls.clone()).await;
        let err = results[0].as_ref().unwrap_err();
        assert_eq!(err.status(), tool_dispatch::event::Status::InvalidInput);
        assert!(!err.to_string().contains("SEC-PW"), "{err}");
        let to_model = tool_dispatch::provider::openai::render_results(&calls, &results);
        assert!(!to_model.to_string().contains("SEC-PW"), "{to_model}");
    }
    let wire = serde_json::to_string(&sink.events()).unwrap();
    assert!(!wire.contains("SEC-PW"), "{wire}");
    // The same refusal under a plain variant and key keeps the tool's own message.
    let err = d
        .dispatch(ToolCall::new(
            "login",
            json!({"auth": {"Plain": "weak-but-public"}}),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too weak"), "{err}");
}
