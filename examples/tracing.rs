//! Every tool call runs in one `execute_tool` span carrying the OpenTelemetry GenAI
//! names (`gen_ai.tool.name`, `gen_ai.tool.call.id`), the user, the final `status`
//! and `duration_ms`. This example prints each call's span as one JSON line when
//! the span closes.
//!
//! ```text
//! cargo run --example tracing
//! ```

use std::time::Duration;

use serde_json::json;
use tool_dispatch::{
    Engine, RecordingSink, Registry, ToolCall, ToolError, ToolSettings, UserContext, tool_fn,
};
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // JSON logs; a span is written when it closes, with every field recorded on it.
    tracing_subscriber::fmt()
        .json()
        .with_span_events(FmtSpan::CLOSE)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .init();

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
    let engine = Engine::builder(registry).build();

    let user = UserContext::builder("alice")
        .thread_id("t_1")
        .run_id("run_1")
        .build()?;
    let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);

    let ok = dispatcher
        .dispatch(ToolCall::new("get_weather", json!("Paris")).with_id("call_ok"))
        .await;
    let err = dispatcher
        .dispatch(ToolCall::new("send_email", json!("bob@example.com")).with_id("call_err"))
        .await;
    let timeout = dispatcher
        .dispatch(ToolCall::new("slow_report", json!(7)).with_id("call_timeout"))
        .await;
    assert!(ok.is_ok() && err.is_err() && timeout.is_err());
    Ok(())
}
