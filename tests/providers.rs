//! Provider formats against recorded JSON (golden files under
//! `tests/golden/providers/<format>/`): definitions out, calls in, results out,
//! errors in-band, and full round trips through a real engine.
//!
//! Inputs named `*_in.json` / `response_*.json` / `calls_in.json` are payloads as the
//! providers document them. Every other file is an expected output; regenerate them
//! with `UPDATE_GOLDEN=1 cargo test --test providers` and review the diff.

use std::path::PathBuf;

use proptest::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tool_dispatch::event::{Event, Status};
use tool_dispatch::provider::{self, ProviderError, anthropic, mcp, openai, responses};
use tool_dispatch::{
    Arguments, DispatchError, Dispatcher, Engine, RecordingSink, Registry, ToolCall, ToolError,
    ToolOutput, UserContext, tool_fn,
};

// ---------------------------------------------------------------- the tools

/// Temperature unit.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Unit {
    Celsius,
    Fahrenheit,
}

/// Where to get the weather for.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    /// City name, e.g. "Paris".
    city: String,
    /// Unit of the temperature (default celsius).
    unit: Option<Unit>,
}

#[derive(Debug, Deserialize, Serialize)]
struct WeatherOut {
    city: String,
    temperature: f64,
    unit: Unit,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
struct AddIn {
    a: i64,
    b: i64,
}

/// Restricts a search.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
struct Filter {
    /// Only documents updated after this date (YYYY-MM-DD).
    after: Option<String>,
    /// Only documents with all of these tags.
    tags: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
struct SearchIn {
    /// What to look for.
    query: String,
    filter: Option<Filter>,
    /// At most this many results.
    limit: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
struct FetchIn {
    url: String,
}

fn registry() -> Registry {
    let weather = tool_fn(
        "get_weather",
        "Current temperature in a city.",
        |i: WeatherIn, _cx| async move {
            let unit = i.unit.unwrap_or(Unit::Celsius);
            let c = if i.city == "Paris" { 21.5 } else { 15.0 };
            let temperature = match unit {
                Unit::Celsius => c,
                Unit::Fahrenheit => c * 9.0 / 5.0 + 32.0,
            };
            Ok::<_, ToolError>(WeatherOut {
                city: i.city,
                temperature,
                unit,
            })
        },
    );
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let search = tool_fn(
        "search_docs",
        "Searches the help centre.",
        |i: SearchIn, _cx| async move {
            Ok::<_, ToolError>(format!("3 documents match \"{}\"", i.query))
        },
    );
    let fetch = tool_fn(
        "fetch_url",
        "Fetches a status page.",
        |_i: FetchIn, _cx| async move {
            Err::<String, _>(ToolError::retryable("upstream returned 503"))
        },
    );
    Registry::builder()
        .tool(weather)
        .tool(add)
        .tool(search)
        .tool(fetch)
        .build()
        .expect("valid registry")
}

fn dispatcher(sink: &RecordingSink) -> (Engine, Dispatcher) {
    let engine = Engine::builder(registry()).build();
    let user = UserContext::builder("alice")
        .run_id("run-1")
        .thread_id("thread-1")
        .build()
        .expect("valid user");
    let d = engine.dispatcher().sink(sink.clone()).user(user);
    (engine, d)
}

// ---------------------------------------------------------------- golden files

fn golden_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/providers")
        .join(rel)
}

fn load(rel: &str) -> Value {
    let path = golden_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Compares `actual` with the recorded file; `UPDATE_GOLDEN=1` rewrites it instead.
fn golden(rel: &str, actual: &Value) {
    let path = golden_path(rel);
    let text = serde_json::to_string_pretty(actual).expect("serializable") + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write golden file");
        return;
    }
    let expected = load(rel);
    assert_eq!(
        actual,
        &expected,
        "{} differs from the recorded output; actual:\n{text}",
        path.display()
    );
}

fn calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            let arguments = match &c.arguments {
                Arguments::Value(v) => json!({ "value": v }),
                Arguments::Text(t) => json!({ "text": t }),
            };
            json!({ "id": c.id, "name": c.name, "arguments": arguments })
        })
        .collect()
}

/// The events of each call, in call order, without the parts that change from run
/// to run (timestamps, durations, and engine-made ids when `generated_ids`).
fn events_json(events: &[Event], call_ids: &[String], generated_ids: bool) -> Value {
    call_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mine: Vec<Value> = events
                .iter()
                .filter(|e| e.call_id() == Some(id.as_str()))
                .map(|e| {
                    let mut v = serde_json::to_value(e).expect("serializable");
                    let o = v.as_object_mut().expect("events are objects");
                    o.remove("timestamp");
                    if let Some(d) = o.remove("duration_ms") {
                        assert!(d.as_f64().is_some_and(|d| d >= 0.0), "duration {d}");
                    }
                    if generated_ids {
                        o.insert("call_id".into(), json!(format!("<generated #{i}>")));
                    }
                    v
                })
                .collect();
            let kinds: Vec<&str> = mine.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(
                kinds,
                ["tool_executing", "tool_completed"],
                "events of {id}"
            );
            Value::Array(mine)
        })
        .collect()
}

fn statuses(results: &[Result<ToolOutput, DispatchError>]) -> Vec<Status> {
    results
        .iter()
        .map(|r| {
            r.as_ref()
                .map_or_else(DispatchError::status, |_| Status::Success)
        })
        .collect()
}

/// Every malformed payload is a typed error (never a panic, never a call).
fn malformed(
    format: &str,
    parse: impl Fn(&Value) -> Result<Vec<ToolCall>, ProviderError>,
) -> Value {
    let cases = load(&format!("{format}/malformed_in.json"));
    let cases = cases.as_array().expect("an array of payloads");
    assert!(!cases.is_empty());
    cases
        .iter()
        .map(|payload| match parse(payload) {
            Ok(calls) => panic!("{format}: {payload} was accepted as {calls:?}"),
            Err(e) => json!({ "payload": payload, "error": e.to_string() }),
        })
        .collect()
}

const EXPECTED_STATUSES: [Status; 6] = [
    Status::Success,
    Status::Success,
    Status::InvalidInput,
    Status::UnknownTool,
    Status::ToolFailed,
    Status::InvalidInput,
];

// ---------------------------------------------------------------- definitions

#[test]
fn definitions_match_recorded_shapes() {
    let r = registry();
    provider::check_schemas(&r).expect("every test tool has an object schema");
    golden("openai/definitions.json", &json!(openai::definitions(&r)));
    golden(
        "openai/definitions_strict.json",
        &json!(openai::definitions_strict(&r)),
    );
    golden(
        "responses/definitions.json",
        &json!(responses::definitions(&r)),
    );
    golden(
        "anthropic/definitions.json",
        &json!(anthropic::definitions(&r)),
    );
    golden("mcp/tools_list.json", &mcp::list_tools(&r));
}

fn walk<'a>(v: &'a Value, out: &mut Vec<&'a serde_json::Map<String, Value>>) {
    match v {
        Value::Object(o) => {
            out.push(o);
            o.values().for_each(|c| walk(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
        _ => {}
    }
}

#[test]
fn schemas_are_provider_ready() {
    let r = registry();
    for (format, defs, key) in [
        ("openai", openai::definitions(&r), "/function/parameters"),
        ("responses", responses::definitions(&r), "/parameters"),
        ("anthropic", anthropic::definitions(&r), "/input_schema"),
    ] {
        for d in &defs {
            let schema = d.pointer(key).unwrap_or_else(|| panic!("{format}: {d}"));
            assert_eq!(schema["type"], "object", "{format}: {schema}");
            assert!(schema.get("$schema").is_none(), "{format}: {schema}");
            assert!(schema.get("title").is_none(), "{format}: {schema}");
            for k in ["oneOf", "anyOf", "allOf"] {
                assert!(schema.get(k).is_none(), "{format}: root {k}");
            }
            // Every `$ref` points into the root's `$defs`.
            let mut objects = Vec::new();
            walk(schema, &mut objects);
            for o in objects {
                if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                    let name = r.strip_prefix("#/$defs/").expect("local $defs ref");
                    assert!(
                        schema["$defs"].get(name).is_some(),
                        "{format}: dangling {r}"
                    );
                }
            }
        }
    }
    let search = r.definition("search_docs").expect("registered");
    let s = provider::input_schema(search);
    assert!(
        s["$defs"]["Filter"].is_object(),
        "nested types stay in $defs: {s}"
    );
}

#[test]
fn strict_schemas_follow_openai_rules() {
    let r = registry();
    for d in openai::definitions_strict(&r) {
        assert_eq!(d["function"]["strict"], true);
        let schema = &d["function"]["parameters"];
        let mut objects = Vec::new();
        walk(schema, &mut objects);
        for o in objects {
            assert!(
                !o.contains_key("oneOf") && !o.contains_key("default"),
                "{o:?}"
            );
            if o.get("$ref").is_some() {
                assert_eq!(o.len(), 1, "$ref with siblings: {o:?}");
            }
            let Some(Value::Object(props)) = o.get("properties") else {
                continue;
            };
            assert_eq!(o["additionalProperties"], false, "{o:?}");
            let required: Vec<&str> = o["required"]
                .as_array()
                .expect("required")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
            names.sort_unstable();
            let mut sorted = required.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, names, "every property is required in strict mode");
        }
    }
    // An optional field became nullable, a required one did not.
    let weather = &openai::definitions_strict(&r)[0]["function"]["parameters"];
    assert_eq!(weather["properties"]["city"]["type"], "string");
    let unit = weather["properties"]["unit"]["anyOf"]
        .as_array()
        .expect("anyOf");
    assert!(unit.contains(&json!({"type": "null"})), "{unit:?}");
    let search = &openai::definitions_strict(&r)[2]["function"]["parameters"];
    assert_eq!(
        search["properties"]["limit"]["type"],
        json!(["integer", "null"])
    );
    assert!(search["properties"]["limit"].get("format").is_none());
    assert_eq!(search["$defs"]["Filter"]["additionalProperties"], false);
}

#[test]
fn non_object_inputs_are_reported() {
    let r = Registry::builder()
        .tool(tool_fn("echo", "Echoes.", |s: String, _cx| async move {
            Ok::<_, ToolError>(s)
        }))
        .build()
        .expect("valid");
    let err = provider::check_schemas(&r).expect_err("a bare string is not an object schema");
    assert!(matches!(&err, ProviderError::UnsupportedSchema { tool, .. } if tool == "echo"));
    assert_eq!(
        err.to_string(),
        "tool `echo` cannot be offered to a provider: its input schema's root is not `\"type\": \"object\"`"
    );
}

// ---------------------------------------------------------------- calls in

#[test]
fn calls_in_match_recorded() {
    let payload = load("openai/response_parallel.json");
    let calls = openai::parse_calls(&payload).expect("a documented response");
    golden("openai/calls_parsed.json", &calls_json(&calls));
    // The message alone and the bare array read the same.
    let message = &payload["choices"][0]["message"];
    assert_eq!(openai::parse_calls(message).expect("message"), calls);
    assert_eq!(
        openai::parse_calls(&message["tool_calls"]).expect("array"),
        calls
    );

    let payload = load("responses/response_parallel.json");
    let calls = responses::parse_calls(&payload).expect("a documented response");
    golden("responses/calls_parsed.json", &calls_json(&calls));
    assert_eq!(
        responses::parse_calls(&payload["output"]).expect("output"),
        calls
    );

    let payload = load("anthropic/response_parallel.json");
    let calls = anthropic::parse_calls(&payload).expect("a documented response");
    golden("anthropic/calls_parsed.json", &calls_json(&calls));
    assert_eq!(
        anthropic::parse_calls(&payload["content"]).expect("content"),
        calls
    );

    let requests = load("mcp/calls_in.json");
    let parsed: Vec<Value> = requests
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| {
            let (id, call) = mcp::parse_call(r).expect("a documented request");
            json!({ "id": id, "call": calls_json(&[call])[0] })
        })
        .collect();
    golden("mcp/calls_parsed.json", &json!(parsed));
}

#[test]
fn messages_without_calls_are_empty_batches() {
    let text_only = json!({"role": "assistant", "content": "Paris is sunny."});
    assert_eq!(openai::parse_calls(&text_only).expect("ok"), []);
    let null_calls = json!({"role": "assistant", "content": "hi", "tool_calls": null});
    assert_eq!(openai::parse_calls(&null_calls).expect("ok"), []);
    assert_eq!(anthropic::parse_calls(&text_only).expect("ok"), []);
    let message = json!({"type": "message", "role": "assistant", "content": []});
    assert_eq!(anthropic::parse_calls(&message).expect("ok"), []);
    let output = json!([{"type": "message", "role": "assistant", "content": []}]);
    assert_eq!(responses::parse_calls(&output).expect("ok"), []);
}

#[test]
fn malformed_payloads_are_typed_errors() {
    golden(
        "openai/malformed_errors.json",
        &json!(malformed("openai", openai::parse_calls)),
    );
    golden(
        "responses/malformed_errors.json",
        &json!(malformed("responses", responses::parse_calls)),
    );
    golden(
        "anthropic/malformed_errors.json",
        &json!(malformed("anthropic", anthropic::parse_calls)),
    );
    let mcp_errors = malformed("mcp", |r| mcp::parse_call(r).map(|(_, c)| vec![c]));
    golden("mcp/malformed_errors.json", &json!(mcp_errors));
    // Each refused MCP request has a JSON-RPC error response with the right code.
    let cases = load("mcp/malformed_in.json");
    let codes: Vec<i64> = cases
        .as_array()
        .expect("cases")
        .iter()
        .map(|r| {
            let e = mcp::parse_call(r).expect_err("malformed");
            let id = r.get("id").cloned().unwrap_or(Value::Null);
            let resp = mcp::error_response(&id, &e);
            assert_eq!(resp["jsonrpc"], "2.0");
            assert_eq!(resp["error"]["message"], e.to_string());
            resp["error"]["code"].as_i64().expect("code")
        })
        .collect();
    assert_eq!(
        codes,
        [
            -32600, -32600, -32600, -32600, -32600, -32601, -32602, -32602, -32602
        ]
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "tool_use",
            "function",
            "function_call",
            "tools/call",
            "2.0",
            "assistant",
            "id",
            "{",
            "{}",
            "add",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop::sample::select(vec![
            "type",
            "id",
            "call_id",
            "name",
            "input",
            "arguments",
            "function",
            "tool_calls",
            "content",
            "output",
            "choices",
            "message",
            "role",
            "jsonrpc",
            "method",
            "params",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(keys.prop_map(str::to_owned), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Arbitrary JSON never panics a parser, and whatever is accepted has an id and
    /// a name for every call (so every call can get its one result back).
    #[test]
    fn garbage_never_panics(payload in arb_json()) {
        let accepted = [
            openai::parse_calls(&payload),
            responses::parse_calls(&payload),
            anthropic::parse_calls(&payload),
        ];
        for c in accepted.into_iter().flatten().flatten() {
            prop_assert!(c.id.as_deref().is_some_and(|id| !id.is_empty()));
            prop_assert!(!c.name.is_empty());
        }
        if let Ok((id, call)) = mcp::parse_call(&payload) {
            prop_assert!(id.is_string() || id.is_number());
            prop_assert!(!call.name.is_empty());
        }
    }
}

// ---------------------------------------------------------------- round trips

#[tokio::test]
async fn openai_round_trip() {
    let sink = RecordingSink::new();
    let (engine, d) = dispatcher(&sink);
    let calls = openai::parse_calls(&load("openai/response_parallel.json")).expect("parse");
    let results = d.dispatch_all(calls.clone()).await;
    assert_eq!(statuses(&results), EXPECTED_STATUSES);
    let out = openai::render_results(&calls, &results);
    golden("openai/results_out.json", &out);
    let out = out.as_array().expect("messages");
    assert_eq!(out.len(), calls.len(), "one tool message per call");
    for (m, c) in out.iter().zip(&calls) {
        assert_eq!(
            m["tool_call_id"].as_str(),
            c.id.as_deref(),
            "call order kept"
        );
    }
    assert!(
        out[3]["content"]
            .as_str()
            .expect("text")
            .starts_with(openai::ERROR_PREFIX)
    );
    let ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    golden(
        "openai/events.json",
        &events_json(&sink.events(), &ids, false),
    );
    assert_eq!(engine.metrics().total, 6);
}

#[tokio::test]
async fn responses_round_trip() {
    let sink = RecordingSink::new();
    let (_engine, d) = dispatcher(&sink);
    let calls = responses::parse_calls(&load("responses/response_parallel.json")).expect("parse");
    let results = d.dispatch_all(calls.clone()).await;
    assert_eq!(statuses(&results), EXPECTED_STATUSES[..5]);
    let out = responses::render_results(&calls, &results);
    golden("responses/results_out.json", &out);
    let ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    let got: Vec<&str> = out
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["call_id"].as_str())
        .collect();
    assert_eq!(got, ids, "one output per call, in call order");
    golden(
        "responses/events.json",
        &events_json(&sink.events(), &ids, false),
    );
}

#[tokio::test]
async fn anthropic_round_trip() {
    let sink = RecordingSink::new();
    let (_engine, d) = dispatcher(&sink);
    let calls = anthropic::parse_calls(&load("anthropic/response_parallel.json")).expect("parse");
    let results = d.dispatch_all(calls.clone()).await;
    assert_eq!(statuses(&results), EXPECTED_STATUSES);
    let out = anthropic::render_results(&calls, &results);
    golden("anthropic/results_out.json", &out);
    assert_eq!(out["role"], "user");
    let blocks = out["content"].as_array().expect("blocks");
    assert_eq!(
        blocks.len(),
        calls.len(),
        "exactly one tool_result per tool_use"
    );
    for ((b, c), s) in blocks.iter().zip(&calls).zip(EXPECTED_STATUSES) {
        assert_eq!(b["type"], "tool_result");
        assert_eq!(b["tool_use_id"].as_str(), c.id.as_deref());
        assert_eq!(
            b.get("is_error") == Some(&json!(true)),
            s != Status::Success,
            "{b}"
        );
    }
    let ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    golden(
        "anthropic/events.json",
        &events_json(&sink.events(), &ids, false),
    );
}

#[tokio::test]
async fn mcp_round_trip() {
    let sink = RecordingSink::new();
    let (_engine, d) = dispatcher(&sink);
    let requests = load("mcp/calls_in.json");
    let mut responses_out = Vec::new();
    let mut call_ids = Vec::new();
    let mut got = Vec::new();
    for r in requests.as_array().expect("requests") {
        let (id, call) = mcp::parse_call(r).expect("parse");
        let result = d.dispatch(call).await;
        match &result {
            Ok(out) => call_ids.push(out.call_id.to_string()),
            Err(_) => {
                let last = sink
                    .events()
                    .last()
                    .and_then(|e| e.call_id().map(str::to_owned));
                call_ids.push(last.expect("a completed event"));
            }
        }
        got.push(
            result
                .as_ref()
                .map_or_else(DispatchError::status, |_| Status::Success),
        );
        responses_out.push(mcp::render_result(&id, &result));
    }
    assert_eq!(got, EXPECTED_STATUSES);
    golden("mcp/results_out.json", &json!(responses_out));
    // Object results are also structured content; errors are in-band except an
    // unknown tool, which is a JSON-RPC error.
    assert_eq!(
        responses_out[0]["result"]["structuredContent"]["city"],
        "Paris"
    );
    assert!(
        responses_out[1]["result"]
            .get("structuredContent")
            .is_none()
    );
    assert_eq!(responses_out[3]["error"]["code"], mcp::INVALID_PARAMS);
    assert_eq!(responses_out[4]["result"]["isError"], true);
    assert_eq!(responses_out[5]["result"]["isError"], true);
    golden(
        "mcp/events.json",
        &events_json(&sink.events(), &call_ids, true),
    );
}

// ---------------------------------------------------------------- rendering rules

#[test]
fn every_call_gets_one_result_even_without_one() {
    let calls = vec![
        ToolCall::new("add", json!({"a": 1, "b": 2})).with_id("c1"),
        ToolCall::new("add", json!({"a": 1, "b": 2})).with_id("c2"),
    ];
    let results = vec![Ok(ToolOutput {
        call_id: "c1".into(),
        value: json!(3),
        cached: false,
    })];
    let a = anthropic::render_results(&calls, &results);
    assert_eq!(a["content"].as_array().map(Vec::len), Some(2));
    assert_eq!(a["content"][1]["is_error"], true);
    assert_eq!(a["content"][1]["tool_use_id"], "c2");
    let o = openai::render_results(&calls, &results);
    assert_eq!(
        o[1]["content"],
        "Error: no result was produced for this call"
    );
    let r = responses::render_results(&calls, &results);
    assert_eq!(r.as_array().map(Vec::len), Some(2));
}

#[test]
fn results_are_text_and_errors_use_the_shared_message() {
    let call = [ToolCall::new("t", json!({})).with_id("c")];
    let ok = |v: Value| {
        [Ok(ToolOutput {
            call_id: "c".into(),
            value: v,
            cached: false,
        })]
    };
    let text = |out: Value| out["content"][0]["content"].clone();
    assert_eq!(
        text(anthropic::render_results(&call, &ok(json!("plain")))),
        "plain"
    );
    assert_eq!(
        text(anthropic::render_results(&call, &ok(json!([1, 2])))),
        "[1,2]"
    );
    assert_eq!(
        text(anthropic::render_results(&call, &ok(json!(null)))),
        "null"
    );
    let e = DispatchError::RateLimited {
        retry_after: std::time::Duration::from_millis(1500),
    };
    let msg = e.to_string();
    assert_eq!(msg, "rate limit reached; retry after 1.5s");
    let err = [Err(e.clone())];
    assert_eq!(text(anthropic::render_results(&call, &err)), msg.as_str());
    assert_eq!(
        openai::render_results(&call, &err)[0]["content"],
        format!("Error: {msg}")
    );
    assert_eq!(
        responses::render_results(&call, &err)[0]["output"],
        format!("Error: {msg}")
    );
    let m = mcp::render_result(&json!(1), &Err(e));
    assert_eq!(m["result"]["content"][0]["text"], msg.as_str());
    assert_eq!(m["result"]["isError"], true);
}

#[test]
fn mcp_progress_notification() {
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "add", "arguments": {}, "_meta": {"progressToken": "tok-9"}}});
    let token = mcp::progress_token(&request).expect("token").clone();
    assert_eq!(mcp::progress_token(&json!({"params": {}})), None);
    let event: tool_dispatch::event::ToolProgress = serde_json::from_value(json!({
        "call_id": "c1", "run_id": null, "thread_id": null, "user_id": "alice",
        "tool_name": "add", "progress": 0.25, "message": "adding",
        "timestamp": "2026-11-21T08:00:00.012Z"
    }))
    .expect("a progress event");
    golden(
        "mcp/progress_notification.json",
        &mcp::progress_notification(&event, &token),
    );
}

#[test]
fn strict_rewrite_of_refs_enums_and_maps() {
    let schema = json!({
        "type": "object",
        "properties": {
            "home": {"$ref": "#/$defs/Loc", "description": "Where you live."},
            "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
            "op": {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer", "format": "int64"}}, "required": ["a"]}]},
            "when": {"type": "string", "format": "date-time"},
            "extra": {"type": "object", "additionalProperties": {"type": "integer"}}
        },
        "required": ["home"],
        "$defs": {"Loc": {"type": "object", "properties": {"lat": {"type": "number"}}}}
    });
    let s = openai::strict_schema(&schema);
    assert_eq!(
        s["properties"]["home"],
        json!({"anyOf": [{"$ref": "#/$defs/Loc"}], "description": "Where you live."})
    );
    assert_eq!(
        s["properties"]["mode"],
        json!({"anyOf": [{"type": "string", "enum": ["fast", "slow"]}, {"type": "null"}]})
    );
    let op = &s["properties"]["op"]["anyOf"];
    assert_eq!(
        op[0]["properties"]["a"],
        json!({"type": "integer"}),
        "number formats dropped"
    );
    assert_eq!(op[0]["additionalProperties"], false);
    assert_eq!(op[1], json!({"type": "null"}), "optional became nullable");
    assert_eq!(
        s["properties"]["when"]["format"], "date-time",
        "supported formats kept"
    );
    assert_eq!(s["properties"]["extra"]["additionalProperties"], false);
    assert_eq!(s["$defs"]["Loc"]["required"], json!(["lat"]));
    assert_eq!(
        s["required"],
        json!(["extra", "home", "mode", "op", "when"])
    );
}

#[tokio::test]
async fn strict_nulls_for_optional_fields_dispatch() {
    // In strict mode the model sends `null` for an `Option` it leaves out.
    let sink = RecordingSink::new();
    let (_engine, d) = dispatcher(&sink);
    let message = json!({"role": "assistant", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "search_docs", "arguments": "{\"query\":\"refunds\",\"filter\":null,\"limit\":null}"}
    }]});
    let calls = openai::parse_calls(&message).expect("parse");
    let results = d.dispatch_all(calls.clone()).await;
    let out = openai::render_results(&calls, &results);
    assert_eq!(out[0]["content"], "3 documents match \"refunds\"");
}

// ---------------------------------------------------------------- content blocks

/// A PNG of one transparent pixel.
const PIXEL: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
struct ReportIn {
    quarter: String,
}

/// `report`: a chart (PNG), a link to the data, the PDF, a note as an embedded text
/// resource, a voice memo (WAV) and a TIFF, which no model API takes.
fn content_registry() -> Registry {
    use tool_dispatch::content::{Content, ResourceLink};
    let report = tool_fn(
        "report",
        "The quarterly report.",
        |i: ReportIn, _cx| async move {
            Ok::<_, ToolError>(
                Content::new()
                    .text(format!("Report for {}.", i.quarter))
                    .image(PIXEL, "image/png")
                    .link(
                        ResourceLink::new("https://example.com/q3.csv", "q3.csv")
                            .mime_type("text/csv")
                            .description("The raw numbers"),
                    )
                    .resource_bytes("file:///reports/q3.pdf", "application/pdf", b"%PDF-1.4")
                    .resource_text("file:///reports/notes.txt", "text/plain", "Up 4%.")
                    .audio(&[0u8; 44], "audio/wav")
                    .image(&[0u8; 10], "image/tiff"),
            )
        },
    );
    Registry::builder().tool(report).build().expect("valid")
}

/// The same `report` call answered through each format: OpenAI Chat, Responses,
/// Anthropic, MCP.
async fn content_results() -> (Value, Value, Value, Value, Vec<Event>, ToolOutput) {
    let engine = Engine::builder(content_registry()).build();
    let sink = RecordingSink::new();
    let d = engine
        .dispatcher()
        .sink(sink.clone())
        .user(UserContext::builder("alice").build().expect("user"));
    let args = json!({"quarter": "Q3"});
    let chat = openai::parse_calls(&json!({"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "report", "arguments": args.to_string()}}]}))
    .expect("chat");
    let chat_out = openai::render_results(&chat, &d.dispatch_all(chat.clone()).await);
    let resp = responses::parse_calls(&json!([{"type": "function_call", "call_id": "call_2",
        "name": "report", "arguments": args.to_string()}]))
    .expect("responses");
    let resp_out = responses::render_results(&resp, &d.dispatch_all(resp.clone()).await);
    let anth = anthropic::parse_calls(&json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_3", "name": "report", "input": args}]}))
    .expect("anthropic");
    let anth_out = anthropic::render_results(&anth, &d.dispatch_all(anth.clone()).await);
    let request = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "report", "arguments": args}});
    let (id, call) = mcp::parse_call(&request).expect("mcp");
    let result = d.dispatch(call).await;
    let mcp_out = mcp::render_result(&id, &result);
    (
        chat_out,
        resp_out,
        anth_out,
        mcp_out,
        sink.events(),
        result.expect("a report"),
    )
}

#[tokio::test]
async fn content_blocks_reach_each_format_in_its_nearest_form() {
    let (chat, resp, anth, mcp_out, events, out) = content_results().await;
    golden("openai/content_results.json", &chat);
    golden("responses/content_results.json", &resp);
    golden("anthropic/content_results.json", &anth);
    golden("mcp/content_results.json", &mcp_out);

    // MCP: the blocks as they are, the image whole.
    let blocks = &mcp_out["result"]["content"];
    let kinds: Vec<&str> = blocks
        .as_array()
        .expect("blocks")
        .iter()
        .filter_map(|b| b["type"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "text",
            "image",
            "resource_link",
            "resource",
            "resource",
            "audio",
            "image"
        ]
    );
    assert_eq!(
        blocks[1]["data"],
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGMAAQAABQABDQottAAAAABJRU5ErkJggg=="
    );
    assert!(mcp_out["result"].get("structuredContent").is_none());
    // Anthropic: an image block, a PDF document, text for the rest.
    let a = &anth["content"][0]["content"];
    assert_eq!(a[1]["source"]["media_type"], "image/png");
    assert_eq!(a[3]["type"], "document");
    assert_eq!(a[6]["type"], "text", "TIFF is described");
    // Responses: an image data URL, the PDF as a file.
    assert!(
        resp[0]["output"][1]["image_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("data:image/png;base64,iVBOR"))
    );
    assert_eq!(resp[0]["output"][3]["type"], "input_file");
    // Chat: text only, each block described, the link as a link.
    let text = chat[0]["content"].as_str().expect("text");
    assert!(text.contains("[image/png, 67 bytes]"), "{text}");
    assert!(
        text.contains("[q3.csv](https://example.com/q3.csv)"),
        "{text}"
    );
    assert!(!text.contains("iVBOR"), "no base64 in a text-only reply");

    // The event carries markers, not bytes; the caller's value is whole.
    for e in &events {
        if let Event::ToolCompleted(c) = e {
            let shown = c.result.to_string();
            assert!(shown.contains("[image/png, 67 bytes]"), "{shown}");
            assert!(shown.contains("[application/pdf, 8 bytes]"), "{shown}");
            assert!(!shown.contains("iVBOR"), "{shown}");
        }
    }
    assert_eq!(out.value["$content"][1]["data"], blocks[1]["data"]);
}

/// The Python with `openai` and `anthropic` (`.ci/run` installs them into
/// `target/e2e/venv`); `None` outside CI when missing.
fn python_with_sdks() -> Option<PathBuf> {
    let path = std::env::var_os("TOOL_DISPATCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e/venv/bin/python")
        });
    let ok = std::process::Command::new(&path)
        .args(["-c", "import openai, anthropic, pydantic"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} lacks the openai and anthropic SDKs; .ci/run installs them",
            path.display()
        );
        eprintln!("skipped: target/e2e/venv/bin/pip install openai anthropic");
        return None;
    }
    Some(path)
}

#[tokio::test]
async fn content_results_fit_the_official_python_sdk_types() {
    let Some(python) = python_with_sdks() else {
        return;
    };
    let (chat, resp, anth, _, _, _) = content_results().await;
    let all = json!({"openai": chat, "responses": resp, "anthropic": anth});
    let dir = std::env::temp_dir().join(format!("tool-dispatch-sdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("results.json");
    std::fs::write(&file, all.to_string()).expect("write");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mcp_content_types.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&file)
        .output()
        .expect("python runs");
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("valid: openai 1, responses 1, anthropic 1"),
        "{said}"
    );
}
