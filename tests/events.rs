//! Wire events: golden JSON for every event kind (checked against DESIGN.md's wire
//! format), round trips, and what events show of arguments and results: sensitive
//! keys redacted, long strings truncated, the caller's value never altered.
//!
//! The golden files live in `tests/golden/events/`. After an intended change of the
//! wire format, rewrite them with `TOOL_DISPATCH_BLESS=1 cargo test --test events`
//! and review the diff: the DESIGN.md checks below still have to pass.

mod common;

use common::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tool_dispatch::event::{AgentUpdate, Event, Status, Timestamp, ToolProgress};
use tool_dispatch::{
    Dispatcher, Engine, RecordingSink, Redaction, Registry, Tool, ToolCall, ToolContext, ToolError,
    ToolSettings, UserContext, Verdict, tool_fn,
};

const GOLDEN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/events");

/// DESIGN.md's two complete example lines, verbatim.
const DESIGN_EXECUTING: &str = r#"{"type":"tool_executing","call_id":"call_abc","run_id":"run_1","thread_id":"t_1","user_id":"alice",
 "tool_name":"get_weather","parameters":{"city":"Paris","api_key":"[REDACTED]"},"timestamp":"2026-11-21T08:00:00.000Z"}"#;
const DESIGN_COMPLETED: &str = r#"{"type":"tool_completed","call_id":"call_abc","run_id":"run_1","thread_id":"t_1","user_id":"alice",
 "tool_name":"get_weather","status":"success","duration_ms":12.4,"result":{"temp_c":21},"error":null,
 "timestamp":"2026-11-21T08:00:00.012Z"}"#;
/// DESIGN.md's progress line, with its `"...":"..."` elision removed.
const DESIGN_PROGRESS: &str =
    r#"{"type":"tool_progress","call_id":"call_abc","progress":0.5,"message":"fetching"}"#;
/// DESIGN.md's statuses.
const DESIGN_STATUSES: [&str; 9] = [
    "success",
    "error",
    "invalid_input",
    "unknown_tool",
    "denied",
    "rate_limited",
    "timeout",
    "panicked",
    "cancelled",
];

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    city: String,
    api_key: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WeatherOut {
    temp_c: i64,
}

struct GetWeather;

impl Tool for GetWeather {
    const NAME: &'static str = "get_weather";
    type Input = WeatherIn;
    type Output = WeatherOut;

    fn description(&self) -> &str {
        "Current temperature in a city."
    }

    async fn call(&self, input: WeatherIn, cx: ToolContext) -> Result<WeatherOut, ToolError> {
        cx.progress(0.5, "fetching");
        match input.city.as_str() {
            "Paris" => Ok(WeatherOut { temp_c: 21 }),
            other => Err(ToolError::new(format!("no weather station in {other}"))),
        }
    }
}

fn alice() -> UserContext {
    UserContext::builder("alice")
        .thread_id("t_1")
        .run_id("run_1")
        .build()
        .unwrap()
}

fn at(ms: u64) -> Timestamp {
    let t0: Timestamp = "2026-11-21T08:00:00.000Z".parse().unwrap();
    t0.after(Duration::from_millis(ms))
}

/// Replaces the volatile fields (timestamps, durations, generated call ids) with the
/// golden files' fixed values.
fn normalize(event: &mut Event) {
    let fix_id = |id: &mut std::sync::Arc<str>| {
        if &**id != "call_abc" && &**id != "call_mail" {
            assert!(
                id.starts_with("call_"),
                "generated ids start with call_: {id}"
            );
            *id = "call_generated".into();
        }
    };
    match event {
        Event::ToolExecuting(e) => {
            fix_id(&mut e.call_id);
            e.timestamp = at(0);
        }
        Event::ToolProgress(e) => {
            fix_id(&mut e.call_id);
            e.timestamp = at(5);
        }
        Event::ToolCompleted(e) => {
            fix_id(&mut e.call_id);
            assert!(e.duration_ms >= 0.0);
            e.duration_ms = 12.4;
            e.timestamp = at(12);
            if let Some(a) = e.approval.as_mut() {
                a.at = at(9);
            }
        }
        Event::ToolApprovalRequired(e) => {
            fix_id(&mut e.call_id);
            e.timestamp = at(1);
            e.expires_at = Some(at(300_001));
        }
        Event::ToolApprovalResolved(e) => {
            fix_id(&mut e.call_id);
            e.timestamp = at(9);
        }
        Event::AgentStarted(e)
        | Event::AgentThinking(e)
        | Event::AgentCompleted(e)
        | Event::AgentError(e) => e.timestamp = at(0),
        other => panic!("an event kind this test does not know: {other:?}"),
    }
}

/// Every event kind, produced by a real engine, normalized, with its golden name.
async fn produce() -> Vec<(&'static str, Event)> {
    let mail = tool_fn("send_email", "Sends mail.", |_: Value, _cx| async {
        Ok::<_, ToolError>(())
    })
    .settings(
        ToolSettings::new()
            .requires_approval("sends an email in your name")
            .sensitive("api_key"),
    );
    let reg = Registry::builder()
        .tool(GetWeather)
        .tool(mail)
        .build()
        .unwrap();
    let engine = Engine::builder(reg).build();
    let sink = RecordingSink::new();
    let d = engine.dispatcher().sink(sink.clone()).user(alice());
    d.notify(AgentUpdate::Started(None)).await.unwrap();
    d.notify(AgentUpdate::Thinking(
        "Looking up the weather in Paris".into(),
    ))
    .await
    .unwrap();
    let args = json!({"city": "Paris", "api_key": "sk-live-123"});
    let out = d
        .dispatch(ToolCall::new("get_weather", args).with_id("call_abc"))
        .await
        .unwrap();
    assert_eq!(out.value, json!({"temp_c": 21}));
    let args = json!({"city": "Atlantis", "api_key": "sk-live-123"});
    let err = d
        .dispatch(ToolCall::new("get_weather", args))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed);
    let args = json!({"to": "ann@example.com", "api_key": "sk-live-123"});
    let mail = d.dispatch(ToolCall::new("send_email", args).with_id("call_mail"));
    let answer = async {
        while engine.metrics().awaiting_approval == 0 {
            tokio::task::yield_now().await;
        }
        let no = Verdict::Reject {
            message: Some("not to Ann".into()),
        };
        engine.resolve_approval("alice", "call_mail", no).await
    };
    let (mail, answered) = tokio::join!(mail, answer);
    assert_eq!(
        (mail.unwrap_err().status(), answered),
        (Status::Rejected, Ok(()))
    );
    d.notify(AgentUpdate::Error(
        "The weather service is unavailable".into(),
    ))
    .await
    .unwrap();
    d.notify(AgentUpdate::Completed(json!({"answer": "21 °C in Paris"})))
        .await
        .unwrap();

    let names = [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_progress",
        "tool_completed_success",
        "",
        "",
        "tool_completed_error",
        "",
        "tool_approval_required",
        "tool_approval_resolved",
        "tool_completed_rejected",
        "agent_error",
        "agent_completed",
    ];
    let events = sink.take();
    assert_eq!(events.len(), names.len(), "{events:?}");
    names
        .into_iter()
        .zip(events)
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, mut e)| {
            normalize(&mut e);
            (name, e)
        })
        .collect()
}

fn golden_path(name: &str) -> String {
    format!("{GOLDEN_DIR}/{name}.json")
}

fn read_golden(name: &str) -> String {
    let path = golden_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim_end().to_owned()
}

#[tokio::test]
async fn every_event_kind_matches_its_golden_json_and_round_trips() {
    let bless = std::env::var_os("TOOL_DISPATCH_BLESS").is_some();
    let produced = produce().await;
    let kinds: Vec<&str> = produced.iter().map(|(_, e)| e.kind()).collect();
    for kind in [
        "tool_executing",
        "tool_completed",
        "tool_progress",
        "tool_approval_required",
        "tool_approval_resolved",
        "agent_started",
        "agent_thinking",
        "agent_completed",
        "agent_error",
    ] {
        assert!(kinds.contains(&kind), "no golden file covers {kind}");
    }
    for (name, event) in &produced {
        let json = serde_json::to_string(event).unwrap();
        if bless {
            std::fs::write(golden_path(name), format!("{json}\n")).unwrap();
        }
        let golden = read_golden(name);
        assert_eq!(
            json, golden,
            "{name}: serialized event differs from its golden file"
        );
        // And back: the golden text is a valid event, equal to the one produced.
        let back: Event = serde_json::from_str(&golden).unwrap();
        assert_eq!(&back, event, "{name}");
        assert_eq!(serde_json::to_string(&back).unwrap(), golden, "{name}");
    }
    let files = std::fs::read_dir(GOLDEN_DIR).unwrap().count();
    assert_eq!(files, produced.len(), "a golden file no test reads");
}

/// The top-level keys of a JSON object text, in their order of appearance.
fn key_order(text: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(text).unwrap();
    let mut keys: Vec<(usize, String)> = v
        .as_object()
        .unwrap()
        .keys()
        .map(|k| {
            let pos = text.find(&format!("\"{k}\":")).unwrap();
            (pos, k.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

#[test]
fn the_golden_files_follow_design_md() {
    // tool_executing: exactly DESIGN.md's line, in its field order.
    let golden = read_golden("tool_executing");
    let design: Value = serde_json::from_str(DESIGN_EXECUTING).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&golden).unwrap(), design);
    assert_eq!(key_order(&golden), key_order(DESIGN_EXECUTING));

    // tool_completed: DESIGN.md's line, plus `cached` (false unless the result came
    // from the cache), in DESIGN.md's field order.
    let golden = read_golden("tool_completed_success");
    let mut ours: Value = serde_json::from_str(&golden).unwrap();
    let cached = ours.as_object_mut().unwrap().remove("cached");
    assert_eq!(cached, Some(json!(false)));
    assert_eq!(
        ours,
        serde_json::from_str::<Value>(DESIGN_COMPLETED).unwrap()
    );
    let mut order = key_order(&golden);
    order.retain(|k| k != "cached");
    assert_eq!(order, key_order(DESIGN_COMPLETED));

    // An error completion has the same fields; result null, error a string.
    let error: Value = serde_json::from_str(&read_golden("tool_completed_error")).unwrap();
    assert_eq!(
        key_order(&read_golden("tool_completed_error")),
        key_order(&golden)
    );
    assert_eq!(
        (&error["status"], &error["result"]),
        (&json!("error"), &Value::Null)
    );
    assert!(error["error"].is_string());

    // tool_progress: DESIGN.md's shown fields, plus the ids every tool event carries.
    let progress: Value = serde_json::from_str(&read_golden("tool_progress")).unwrap();
    let design: Value = serde_json::from_str(DESIGN_PROGRESS).unwrap();
    for (k, v) in design.as_object().unwrap() {
        assert_eq!(&progress[k], v, "tool_progress.{k}");
    }
    let mut keys: Vec<&str> = progress
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "call_id",
            "message",
            "progress",
            "run_id",
            "thread_id",
            "timestamp",
            "tool_name",
            "type",
            "user_id"
        ]
    );

    // Agent events: the `type` tag and the ids, with the same names as tool events.
    for name in [
        "agent_started",
        "agent_thinking",
        "agent_completed",
        "agent_error",
    ] {
        let v: Value = serde_json::from_str(&read_golden(name)).unwrap();
        assert_eq!(v["type"], json!(name));
        for k in ["run_id", "thread_id", "user_id", "timestamp"] {
            assert!(v.get(k).is_some(), "{name}.{k}");
        }
    }
}

#[test]
fn statuses_are_the_design_md_snake_case_names() {
    for s in DESIGN_STATUSES {
        let status: Status = serde_json::from_value(json!(s)).unwrap();
        assert_eq!(status.as_str(), s);
        assert_eq!(serde_json::to_value(status).unwrap(), json!(s));
    }
    for s in Status::ALL {
        let wire = serde_json::to_value(s).unwrap();
        let wire = wire.as_str().unwrap();
        assert!(
            wire.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{wire}"
        );
        assert_eq!(wire, s.to_string());
    }
}

// ---------------------------------------------------------------- redaction

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct LoginIn {
    user: String,
    pin: String,
    api_key: String,
    note: String,
}

fn login_engine(redaction: Redaction) -> Engine {
    // Echoes its input: the caller must get it back unaltered.
    let login = tool_fn("login", "Logs in.", |i: LoginIn, _cx| async move {
        Ok::<_, ToolError>(json!({"user": i.user, "pin": i.pin, "api_key": i.api_key,
            "note": i.note, "nested": {"Api-Key": "sk-result"}}))
    })
    .settings(ToolSettings::new().sensitive("pin"));
    Engine::builder(Registry::builder().tool(login).build().unwrap())
        .redaction(redaction)
        .build()
}

fn bind(engine: &Engine) -> (Dispatcher, RecordingSink) {
    let sink = RecordingSink::new();
    (engine.dispatcher().sink(sink.clone()).user(alice()), sink)
}

fn executing_and_completed(events: &[Event]) -> (Value, Value) {
    let [Event::ToolExecuting(ex), Event::ToolCompleted(done)] = events else {
        panic!("{events:?}");
    };
    (ex.parameters.clone(), done.result.clone())
}

#[tokio::test]
async fn sensitive_keys_are_redacted_in_events_but_never_in_the_callers_value() {
    let engine = login_engine(Redaction::default());
    let (d, sink) = bind(&engine);
    let args = json!({"user": "alice", "pin": "4321", "api_key": "sk-live-123", "note": "hi"});
    let out = d.dispatch(ToolCall::new("login", args)).await.unwrap();
    assert_eq!(
        out.value,
        json!({"user": "alice", "pin": "4321", "api_key": "sk-live-123", "note": "hi",
               "nested": {"Api-Key": "sk-result"}}),
        "the caller's value is untouched"
    );
    let (params, result) = executing_and_completed(&sink.take());
    assert_eq!(
        params,
        json!({"user": "alice", "pin": "[REDACTED]", "api_key": "[REDACTED]", "note": "hi"})
    );
    assert_eq!(
        result,
        json!({"user": "alice", "pin": "[REDACTED]", "api_key": "[REDACTED]", "note": "hi",
               "nested": {"Api-Key": "[REDACTED]"}})
    );
    for secret in ["4321", "sk-live-123", "sk-result"] {
        let wire = serde_json::to_string(&sink.events()).unwrap();
        assert!(!wire.contains(secret), "{secret} leaked: {wire}");
    }
}

#[tokio::test]
async fn calls_that_never_run_redact_their_arguments_too() {
    let engine = login_engine(Redaction::default());
    let (d, sink) = bind(&engine);
    let calls = [
        // Invalid input (a field is missing).
        ToolCall::new(
            "login",
            json!({"user": "alice", "pin": "4321", "api_key": "sk-live-123"}),
        ),
        // Unknown tool: only the default sensitive names apply.
        ToolCall::new("logon", json!({"user": "alice", "api_key": "sk-live-123"})),
        // The same two as JSON text, the way OpenAI sends arguments.
        ToolCall::from_text(
            "login",
            r#"{"user": "alice", "pin": "4321", "api_key": "sk-live-123"}"#,
        ),
        ToolCall::from_text("logon", r#"{"user": "alice", "api_key": "sk-live-123"}"#),
        // JSON text that does not parse.
        ToolCall::from_text(
            "login",
            r#"{"user": "alice", "api_key": "sk-live-123", "pin": "#,
        ),
    ];
    for call in calls {
        let what = format!("{call:?}");
        assert!(d.dispatch(call).await.is_err(), "{what}");
        let wire = serde_json::to_string(&sink.take()).unwrap();
        assert!(
            !wire.contains("sk-live-123"),
            "api_key leaked for {what}: {wire}"
        );
        if what.contains("\"login\"") {
            assert!(!wire.contains("4321"), "pin leaked for {what}: {wire}");
        }
    }
}

#[tokio::test]
async fn long_strings_are_truncated_in_events_but_never_in_the_callers_value() {
    let long = "é".repeat(5000);
    let input = || json!({"user": "alice", "pin": "1", "api_key": "k", "note": long});

    // Default limit: 1024 characters.
    let engine = login_engine(Redaction::default());
    let (d, sink) = bind(&engine);
    let out = d.dispatch(ToolCall::new("login", input())).await.unwrap();
    assert_eq!(
        out.value["note"].as_str().unwrap(),
        long,
        "the caller gets all of it"
    );
    let (params, result) = executing_and_completed(&sink.take());
    for shown in [&params["note"], &result["note"]] {
        let shown = shown.as_str().unwrap();
        assert!(shown.starts_with(&"é".repeat(1024)), "{shown}");
        assert!(
            !shown.starts_with(&"é".repeat(1025)),
            "cut at 1024 characters"
        );
        assert!(shown.ends_with("bytes]"), "and says so: {shown}");
    }

    // A configured limit.
    let engine = login_engine(Redaction::default().max_string_len(16));
    let (d, sink) = bind(&engine);
    let out = d.dispatch(ToolCall::new("login", input())).await.unwrap();
    assert_eq!(out.value["note"].as_str().unwrap().chars().count(), 5000);
    let (params, result) = executing_and_completed(&sink.take());
    let cut = format!("{}…[truncated {} bytes]", "é".repeat(16), 2 * (5000 - 16));
    assert_eq!(
        (&params["note"], &result["note"]),
        (&json!(cut), &json!(cut))
    );
    assert_eq!(params["user"], "alice", "short strings are left alone");

    // Typed calls are shown the same way.
    let engine = Engine::builder(Registry::builder().tool(GetWeather).build().unwrap())
        .redaction(Redaction::default().max_string_len(4))
        .build();
    let (d, sink) = bind(&engine);
    let input = WeatherIn {
        city: "Paris".into(),
        api_key: "sk-live-123".into(),
    };
    let out = d.call::<GetWeather>(input).await.unwrap();
    assert_eq!(out.value, WeatherOut { temp_c: 21 });
    let events = sink.take();
    let Event::ToolExecuting(ex) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        ex.parameters,
        json!({"city": "Pari…[truncated 1 bytes]", "api_key": "[REDACTED]"})
    );
}

/// A result whose `Serialize` fails (a map keyed by something JSON cannot key by).
#[derive(Debug, PartialEq, Deserialize)]
struct Unshowable(u8);

impl Serialize for Unshowable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this value refuses to be serialized",
        ))
    }
}

struct Opaque;

impl Tool for Opaque {
    const NAME: &'static str = "opaque";
    type Input = u8;
    type Output = Unshowable;
    fn description(&self) -> &str {
        "Returns a value that cannot be shown."
    }
    async fn call(&self, n: u8, _: ToolContext) -> Result<Unshowable, ToolError> {
        Ok(Unshowable(n))
    }
}

#[tokio::test]
async fn an_output_that_fails_to_serialize_is_said_so_never_a_silent_null() {
    let engine = Engine::builder(Registry::builder().tool(Opaque).build().unwrap()).build();
    let (d, sink) = bind(&engine);
    // Typed: the caller gets its value; the event and the metrics say why there is
    // no result to show.
    let out = d.call::<Opaque>(5).with_id("t1").await.unwrap();
    assert_eq!(out.value, Unshowable(5));
    // By name the JSON is the value: there is none, so the call fails, and says so.
    let err = d
        .dispatch(ToolCall::new("opaque", json!(5)).with_id("n1"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed);
    assert!(
        err.to_string().contains("could not be converted to JSON"),
        "{err}"
    );
    let events = sink.events();
    let done: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(
        (done[0].status, &done[0].result),
        (Status::Success, &Value::Null)
    );
    assert_eq!(
        done[0].error.as_deref(),
        Some("the result cannot be shown: this value refuses to be serialized")
    );
    assert_eq!(done[1].status, Status::ToolFailed);
    let m = engine.metrics();
    assert_eq!(m.unserializable_results, 2);
    assert_eq!(
        (m.count(Status::Success), m.count(Status::ToolFailed)),
        (1, 1)
    );
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
    let engine = plain_engine(
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
    let engine = plain_engine(Registry::builder().tool(chatty).build().unwrap());
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
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
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
