//! OpenTelemetry spans (feature `otel`), exported through `tracing-opentelemetry` to
//! an in-memory exporter: one `execute_tool {tool}` span per call with the GenAI
//! attributes, a child of the caller's span, an error status and `error.type` on
//! failure, child spans for the waits; arguments and results only when the engine is
//! told to, and then redacted as the events are.
#![cfg(feature = "otel")]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::MutexGuard;
use tool_dispatch::event::Event;
use tool_dispatch::otel::opentelemetry::trace::{SpanId, SpanKind, Status, TracerProvider as _};
use tool_dispatch::otel::opentelemetry_sdk::error::OTelSdkResult;
use tool_dispatch::otel::opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tool_dispatch::otel::tracing_opentelemetry;
use tool_dispatch::*;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// One test at a time: tracing caches per call site whether anyone listens, and a
/// call site first reached while another test installs its subscriber can miss it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keeps every exported span.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Recorder {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

/// Spans exported while it lives (each one as it ends).
struct Traced {
    spans: Recorder,
    _guard: tracing::subscriber::DefaultGuard,
    _serial: MutexGuard<'static, ()>,
}

impl Traced {
    async fn start() -> Traced {
        let serial = SERIAL.lock().await;
        let spans = Recorder::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        tracing::callsite::rebuild_interest_cache();
        Traced {
            spans,
            _guard: guard,
            _serial: serial,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.spans.0.lock().unwrap().clone()
    }

    /// The `execute_tool` spans, by call id.
    fn calls(&self) -> HashMap<String, SpanData> {
        self.spans()
            .into_iter()
            .filter(|s| s.name.starts_with("execute_tool"))
            .map(|s| (attr(&s, "gen_ai.tool.call.id").expect("a call id"), s))
            .collect()
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn engine(builder: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Engine {
    let ok = tool_fn(
        "lookup",
        "Returns a secret-bearing record.",
        |q: serde_json::Value, _cx| async move {
            Ok::<_, ToolError>(json!({ "query": q, "api_key": "sk-result-secret", "rows": 2 }))
        },
    )
    .settings(ToolSettings::new().sensitive("api_key"));
    let fail = tool_fn("fail", "Fails.", |_: u64, _cx| async move {
        Err::<u64, _>(ToolError::new("nope"))
    });
    let slow = tool_fn(
        "slow",
        "Sleeps past its timeout.",
        |_: u64, _cx| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, ToolError>(0u64)
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_millis(10)));
    let send = tool_fn("send", "Needs approval.", |_: u64, _cx| async move {
        Ok::<_, ToolError>("sent")
    })
    .settings(ToolSettings::new().requires_approval("sends mail"));
    let registry = Registry::builder()
        .tool(ok)
        .tool(fail)
        .tool(slow)
        .tool(send)
        .build()
        .unwrap();
    builder(Engine::builder(registry)).build()
}

#[tokio::test(start_paused = true)]
async fn each_call_is_one_execute_tool_span_with_the_genai_attributes() {
    let traced = Traced::start().await;
    let engine = engine(|b| b);
    let (d, _) = recorded(&engine, user("alice"));
    d.dispatch(ToolCall::new("lookup", json!({"q": 1})).with_id("c_ok"))
        .await
        .unwrap();
    d.dispatch(ToolCall::new("fail", json!(1)).with_id("c_err"))
        .await
        .unwrap_err();
    d.dispatch(ToolCall::new("slow", json!(1)).with_id("c_slow"))
        .await
        .unwrap_err();
    d.dispatch(ToolCall::new("nope", json!(1)).with_id("c_unknown"))
        .await
        .unwrap_err();
    engine.health().await; // the probe is no call of anybody's: no span

    let calls = traced.calls();
    assert_eq!(calls.len(), 4, "one span per call: {:?}", calls.keys());
    for (id, tool, status) in [
        ("c_ok", "lookup", "success"),
        ("c_err", "fail", "error"),
        ("c_slow", "slow", "timeout"),
        ("c_unknown", "nope", "unknown_tool"),
    ] {
        let s = &calls[id];
        assert_eq!(s.name, format!("execute_tool {tool}"));
        assert_eq!(s.span_kind, SpanKind::Internal);
        assert_eq!(
            attr(s, "gen_ai.operation.name").as_deref(),
            Some("execute_tool")
        );
        assert_eq!(attr(s, "gen_ai.tool.name").as_deref(), Some(tool));
        assert_eq!(attr(s, "gen_ai.tool.type").as_deref(), Some("function"));
        assert_eq!(attr(s, "status").as_deref(), Some(status));
        if status == "success" {
            assert_eq!(attr(s, "error.type"), None);
            assert_eq!(s.status, Status::Unset);
        } else {
            assert_eq!(attr(s, "error.type").as_deref(), Some(status), "{id}");
            assert!(
                matches!(s.status, Status::Error { .. }),
                "{id}: {:?}",
                s.status
            );
        }
        // Nothing of the call's content by default.
        assert_eq!(attr(s, "gen_ai.tool.call.arguments"), None);
        assert_eq!(attr(s, "gen_ai.tool.call.result"), None);
        // A root span: the caller had none.
        assert_eq!(s.parent_span_id, SpanId::INVALID);
    }
    // The timeout's duration is the call's 10 ms (of the paused clock).
    let ms: f64 = attr(&calls["c_slow"], "duration_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms >= 10.0, "{ms}");
}

#[tokio::test]
async fn a_call_is_a_child_of_the_span_its_caller_is_in() {
    let traced = Traced::start().await;
    let engine = engine(|b| b);
    let (d, _) = recorded(&engine, user("alice"));
    let agent = tracing::info_span!("invoke_agent", gen_ai.operation.name = "invoke_agent");
    async {
        d.dispatch_all(vec![
            ToolCall::new("lookup", json!(1)).with_id("a1"),
            ToolCall::new("fail", json!(1)).with_id("a2"),
        ])
        .await;
    }
    .instrument(agent.clone())
    .await;
    // A call starts when it is dispatched: dispatched in the agent's span, awaited
    // outside it, it is still the agent's.
    let later = agent.in_scope(|| d.dispatch(ToolCall::new("lookup", json!(2)).with_id("a3")));
    drop(agent);
    later.await.unwrap();
    // Outside the agent's span: a root.
    d.dispatch(ToolCall::new("lookup", json!(3)).with_id("b1"))
        .await
        .unwrap();

    let spans = traced.spans();
    let agent = spans
        .iter()
        .find(|s| s.name == "invoke_agent")
        .expect("the agent's span");
    let calls = traced.calls();
    for id in ["a1", "a2", "a3"] {
        let s = &calls[id];
        assert_eq!(s.parent_span_id, agent.span_context.span_id(), "{id}");
        assert_eq!(
            s.span_context.trace_id(),
            agent.span_context.trace_id(),
            "{id}"
        );
    }
    assert_eq!(calls["b1"].parent_span_id, SpanId::INVALID);
    assert_ne!(
        calls["b1"].span_context.trace_id(),
        agent.span_context.trace_id()
    );
}

#[tokio::test]
async fn arguments_and_results_are_in_spans_only_when_asked_and_then_redacted() {
    let args = json!({ "q": "weather", "password": "hunter2", "note": "x".repeat(5000) });
    for opted_in in [false, true] {
        let traced = Traced::start().await;
        let engine = engine(|b| {
            b.trace_content(opted_in)
                .redaction(Redaction::default().max_string_len(100))
        });
        let (d, sink) = recorded(&engine, user("alice"));
        d.dispatch(ToolCall::new("lookup", args.clone()).with_id("c1"))
            .await
            .unwrap();
        d.dispatch(ToolCall::new("fail", json!(1)).with_id("c2"))
            .await
            .unwrap_err();
        let calls = traced.calls();
        let (a, r) = (
            attr(&calls["c1"], "gen_ai.tool.call.arguments"),
            attr(&calls["c1"], "gen_ai.tool.call.result"),
        );
        if !opted_in {
            assert_eq!((a, r), (None, None));
            continue;
        }
        // Exactly what the events show: the same redaction, the same cuts.
        let shown = sink
            .events()
            .into_iter()
            .find_map(|e| match e {
                Event::ToolExecuting(x) if &*x.call_id == "c1" => Some(x.parameters),
                _ => None,
            })
            .unwrap();
        let a: serde_json::Value = serde_json::from_str(&a.expect("arguments")).unwrap();
        assert_eq!(a, shown);
        assert_eq!(a["password"], json!(REDACTED));
        assert!(
            a["note"].as_str().unwrap().len() < 200,
            "cut like the event"
        );
        let r: serde_json::Value = serde_json::from_str(&r.expect("result")).unwrap();
        assert_eq!(r["api_key"], json!(REDACTED));
        assert_eq!(r["rows"], json!(2));
        // A failed call has arguments but no result.
        assert!(attr(&calls["c2"], "gen_ai.tool.call.arguments").is_some());
        assert_eq!(attr(&calls["c2"], "gen_ai.tool.call.result"), None);
        let text = format!("{:?}", traced.spans());
        assert!(!text.contains("hunter2") && !text.contains("sk-result-secret"));
    }
}

#[tokio::test]
async fn waiting_for_approval_and_for_room_in_the_sink_are_child_spans() {
    let traced = Traced::start().await;
    let engine = engine(|b| b);
    let sink = RecordingSink::new();
    let d = engine.dispatcher().sink(sink.clone()).user(user("alice"));
    let call = d.dispatch(ToolCall::new("send", json!(1)).with_id("s1"));
    let answer = async {
        while !sink
            .events()
            .iter()
            .any(|e| matches!(e, Event::ToolApprovalRequired(_)))
        {
            tokio::task::yield_now().await;
        }
        engine
            .resolve_approval("alice", "s1", Verdict::Approve)
            .await
            .unwrap();
    };
    let (out, ()) = tokio::join!(call, answer);
    out.unwrap();

    // A sink that is full until the test lets one event through at a time.
    let flushing = FlushingSink::new();
    let d = engine.dispatcher().sink(flushing.clone()).user(user("bob"));
    let call = d.dispatch(ToolCall::new("lookup", json!(1)).with_id("q1"));
    let release = async {
        for _ in 0..2 {
            flushing.flush.add_permits(1);
            tokio::task::yield_now().await;
        }
    };
    let (out, ()) = tokio::join!(call, release);
    out.unwrap();

    let spans = traced.spans();
    let calls = traced.calls();
    let children = |id: &str, name: &str| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.name == name && s.parent_span_id == calls[id].span_context.span_id())
            .collect()
    };
    assert_eq!(children("s1", "await_approval").len(), 1);
    let waits = children("q1", "await_delivery");
    let events: Vec<String> = waits
        .iter()
        .filter_map(|s| attr(s, "tool_dispatch.event"))
        .collect();
    assert_eq!(events, ["tool_executing", "tool_completed"], "{waits:?}");
    assert!(
        children("s1", "await_delivery").is_empty(),
        "nothing waited for room"
    );
}
