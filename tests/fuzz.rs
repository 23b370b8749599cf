//! Fuzzed bad input (proptest): arbitrary JSON as arguments to typed tools by name,
//! arbitrary text as `ToolCall::from_text` arguments, arbitrary tool names, arbitrary
//! user ids, arbitrary bytes and JSON fed to every provider parser. Never a panic;
//! always a success or a typed error, and the event pair still holds.
//!
//! `PROPTEST_CASES=2000 cargo test --release --test fuzz` for a longer run.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tool_dispatch::event::{Event, Status};
use tool_dispatch::provider::{anthropic, mcp, openai, responses};
use tool_dispatch::{
    DispatchError, Engine, Limits, RecordingSink, Registry, ToolCall, ToolError, ToolOutput,
    UserContext, UserLimits, tool_fn,
};

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Deep {
    name: String,
    count: u32,
    tags: Option<Vec<i64>>,
    nested: Option<Box<Deep>>,
    mode: Mode,
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Fast,
    Slow { factor: f64 },
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
struct Loose {
    #[serde(default)]
    text: String,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

const NAMES: [&str; 5] = ["deep", "loose", "small", "tuple", "any"];

/// One engine per test thread, so that `active() == 0` is checked on an engine no
/// other test is using at the same time.
fn engine() -> Engine {
    thread_local!(static E: Engine = new_engine());
    E.with(Engine::clone)
}

fn new_engine() -> Engine {
    {
        let reg = Registry::builder()
            .tool(tool_fn(
                "deep",
                "Nested struct input.",
                |d: Deep, _cx| async move { Ok::<_, ToolError>(d.count) },
            ))
            .tool(tool_fn(
                "loose",
                "Open object input.",
                |l: Loose, _cx| async move { Ok::<_, ToolError>(l.text.len() + l.rest.len()) },
            ))
            .tool(tool_fn("small", "A u8.", |n: u8, _cx| async move {
                Ok::<_, ToolError>(n)
            }))
            .tool(tool_fn(
                "tuple",
                "A pair.",
                |(a, b): (String, Option<bool>), _cx| async move { Ok::<_, ToolError>((b, a)) },
            ))
            .tool(tool_fn(
                "any",
                "Any JSON, echoed.",
                |v: Value, _cx| async move { Ok::<_, ToolError>(v) },
            ))
            .build()
            .expect("registry");
        // No rate limit: every case runs as the same user.
        let limits = Limits::default().per_user(UserLimits {
            concurrency: 10,
            rate: None,
        });
        Engine::builder(reg)
            .limits(limits)
            .max_argument_bytes(64 << 10)
            .build()
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        ".{0,40}".prop_map(Value::from),
        prop_oneof![Just("fast"), Just("slow"), Just("name"), Just("count")].prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        let key = prop_oneof![
            Just("name".to_owned()),
            Just("count".to_owned()),
            Just("tags".to_owned()),
            Just("nested".to_owned()),
            Just("mode".to_owned()),
            Just("slow".to_owned()),
            Just("factor".to_owned()),
            Just("text".to_owned()),
            Just("api_key".to_owned()),
            ".{0,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `calls` for `user` into a fresh sink and checks, per call: the result is a
/// success or a typed error, and the sink holds exactly `tool_executing` then
/// `tool_completed` with the call's id, the completed status matching the result.
fn run_and_check(user: UserContext, calls: Vec<ToolCall>) -> Result<(), TestCaseError> {
    let sink = RecordingSink::new();
    let engine = engine();
    let d = engine.dispatcher().sink(sink.clone()).user(user);
    let results: Vec<Result<ToolOutput, DispatchError>> = runtime().block_on(async {
        let mut out = Vec::new();
        for c in calls {
            out.push(d.dispatch(c).await);
        }
        out
    });
    let events = sink.take();
    prop_assert_eq!(events.len(), results.len() * 2, "two events per call");
    for (pair, r) in events.chunks(2).zip(&results) {
        let (Event::ToolExecuting(e), Event::ToolCompleted(c)) = (&pair[0], &pair[1]) else {
            return Err(TestCaseError::fail(format!("not a pair: {pair:?}")));
        };
        prop_assert_eq!(&e.call_id, &c.call_id);
        prop_assert_eq!(&*e.user_id, d.user_context().user_id());
        let status = match r {
            Ok(o) => {
                prop_assert_eq!(&o.call_id, &c.call_id);
                Status::Success
            }
            Err(err) => {
                prop_assert!(!err.to_string().is_empty());
                err.status()
            }
        };
        prop_assert_eq!(c.status, status);
        // Only these can come out of bad input on an idle engine.
        prop_assert!(
            matches!(
                status,
                Status::Success | Status::InvalidInput | Status::UnknownTool
            ),
            "unexpected status {status}"
        );
    }
    prop_assert_eq!(engine.active(), 0);
    Ok(())
}

fn alice() -> UserContext {
    UserContext::builder("fuzz-alice")
        .build()
        .expect("valid user")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_json_arguments(name in prop::sample::select(&NAMES[..]), args in arb_json()) {
        run_and_check(alice(), vec![ToolCall::new(name, args)])?;
    }

    #[test]
    fn arbitrary_json_text_arguments(name in prop::sample::select(&NAMES[..]), args in arb_json()) {
        let text = serde_json::to_string(&args).expect("serializable");
        run_and_check(alice(), vec![ToolCall::from_text(name, text)])?;
    }

    #[test]
    fn arbitrary_text_arguments(name in prop::sample::select(&NAMES[..]), text in any::<String>()) {
        run_and_check(alice(), vec![ToolCall::from_text(name, text)])?;
    }

    #[test]
    fn arbitrary_tool_names_and_ids(name in any::<String>(), id in proptest::option::of(any::<String>())) {
        let mut call = ToolCall::new(name, json!({}));
        if let Some(id) = id {
            call = call.with_id(id);
        }
        run_and_check(alice(), vec![call])?;
    }

    #[test]
    fn arbitrary_user_ids(raw in prop::collection::vec(any::<u8>(), 0..300), s in any::<String>()) {
        for id in [String::from_utf8_lossy(&raw).into_owned(), s] {
            match UserContext::builder(id.clone()).thread_id(id.clone()).build() {
                Ok(user) => {
                    prop_assert_eq!(user.user_id(), id.as_str());
                    run_and_check(user, vec![ToolCall::new("small", json!(7))])?;
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn provider_parsers_take_arbitrary_json(v in arb_json()) {
        let _ = openai::parse_calls(&v);
        let _ = responses::parse_calls(&v);
        let _ = anthropic::parse_calls(&v);
        let _ = mcp::parse_call(&v);
    }

    #[test]
    fn provider_parsers_take_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(v) = serde_json::from_slice::<Value>(&raw) {
            let _ = openai::parse_calls(&v);
            let _ = responses::parse_calls(&v);
            let _ = anthropic::parse_calls(&v);
            let _ = mcp::parse_call(&v);
        }
    }

    /// Well-formed envelopes with arbitrary ids, names and arguments: whatever parses
    /// is dispatched, and the pairing holds for each call.
    #[test]
    fn provider_calls_dispatch_cleanly(
        id in ".{0,20}",
        name in prop_oneof![prop::sample::select(&NAMES[..]).prop_map(str::to_owned), ".{0,20}"],
        args in arb_json(),
        text in any::<String>(),
    ) {
        let args_text = serde_json::to_string(&args).expect("serializable");
        let mut calls = Vec::new();
        let oa = json!({"choices": [{"message": {"role": "assistant", "tool_calls": [
            {"id": id, "type": "function", "function": {"name": name, "arguments": args_text}},
            {"id": format!("{id}2"), "type": "function", "function": {"name": name, "arguments": text}},
        ]}}]});
        calls.extend(openai::parse_calls(&oa).unwrap_or_default());
        let rs = json!({"output": [{"type": "function_call", "call_id": id, "name": name, "arguments": args_text}]});
        calls.extend(responses::parse_calls(&rs).unwrap_or_default());
        let an = json!({"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": name, "input": args}]});
        calls.extend(anthropic::parse_calls(&an).unwrap_or_default());
        let mc = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": args}});
        if let Ok((_, call)) = mcp::parse_call(&mc) {
            calls.push(call);
        }
        run_and_check(alice(), calls)?;
    }
}
