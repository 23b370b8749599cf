//! Every tool call runs in one `execute_tool` span carrying the OpenTelemetry GenAI
//! names (`gen_ai.operation.name`, `gen_ai.tool.name`, `gen_ai.tool.call.id`), the
//! user, the final `status` and `duration_ms`, as a child of the caller's span: here
//! an agent turn's `invoke_agent` span.
//!
//! ```text
//! cargo run --example tracing                       # each span as a JSON line when it closes
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 \
//!     cargo run --example tracing --features otel   # the spans to that collector (OTLP/HTTP)
//! ```
//!
//! With the `otel` feature and an endpoint, the spans go to the collector instead
//! (named `execute_tool {tool}`, with `error.type` and an error status on failure,
//! and the call's arguments and result, redacted, since this example opts in).

use std::time::Duration;

use serde_json::json;
use tool_dispatch::{
    Engine, RecordingSink, Registry, ToolCall, ToolError, ToolSettings, UserContext, tool_fn,
};
use tracing::Instrument;
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "otel")]
    let traces = tool_dispatch::otel::OtlpTraces::from_env("tracing-example")?;
    #[cfg(feature = "otel")]
    let exporting = traces.is_some();
    #[cfg(not(feature = "otel"))]
    let exporting = false;
    if exporting {
        #[cfg(feature = "otel")]
        {
            use tracing_subscriber::prelude::*;
            let layer = traces.as_ref().map(|t| t.layer());
            tracing_subscriber::registry().with(layer).init();
        }
    } else {
        // JSON logs; a span is written when it closes, with every field recorded on it.
        tracing_subscriber::fmt()
            .json()
            .with_span_events(FmtSpan::CLOSE)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(false)
            .init();
    }

    let weather = tool_fn(
        "get_weather",
        "Temperature in a city.",
        |city: String, _cx| async move { Ok::<_, ToolError>(json!({ "city": city, "temp_c": 21 })) },
    );
    let failing = tool_fn(
        "send_email",
        "Always fails here.",
        |_: String, _cx| async move { Err::<(), _>(ToolError::retryable("SMTP server unavailable")) },
    );
    let slow = tool_fn("slow_report", "Takes too long.", |_: u32, _cx| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, ToolError>(())
    })
    .settings(ToolSettings::new().timeout(Duration::from_millis(50)));
    let registry = Registry::builder()
        .tool(weather)
        .tool(failing)
        .tool(slow)
        .build()?;
    let builder = Engine::builder(registry);
    #[cfg(feature = "otel")]
    let builder = builder.trace_content(true);
    let engine = builder.build();

    let user = UserContext::builder("alice")
        .thread_id("t_1")
        .run_id("run_1")
        .build()?;
    let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);

    // One agent turn: the model asked for three tools.
    let turn = tracing::info_span!(
        "invoke_agent",
        otel.name = "invoke_agent demo",
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = "demo",
    );
    let (ok, err, timeout) = async {
        let ok = dispatcher
            .dispatch(ToolCall::new("get_weather", json!("Paris")).with_id("call_ok"))
            .await;
        let err = dispatcher
            .dispatch(ToolCall::new("send_email", json!("bob@example.com")).with_id("call_err"))
            .await;
        let timeout = dispatcher
            .dispatch(ToolCall::new("slow_report", json!(7)).with_id("call_timeout"))
            .await;
        (ok, err, timeout)
    }
    .instrument(turn)
    .await;
    assert!(ok.is_ok() && err.is_err() && timeout.is_err());

    #[cfg(feature = "otel")]
    if let Some(t) = traces {
        t.shutdown()?; // what is still buffered
        println!("spans sent to the OTLP endpoint");
    }
    Ok(())
}
