//! The demo tools and users shared by the `chat_server` and `mcp_server` examples.
//!
//! Included by each with `#[path = "../common/demo.rs"] mod demo;`; each example uses
//! a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tool_dispatch::{
    Engine, EngineBuilder, Limits, Rate, Registry, ToolContext, ToolError, ToolSettings,
    UserContext, UserLimits, tool_fn,
};

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    /// City name.
    city: String,
    /// Upstream API key (redacted in events).
    #[serde(default)]
    api_key: Option<String>,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SlowIn {
    /// Number of steps (1 to 1,000,000).
    steps: u32,
    /// Milliseconds per step (at most 60,000).
    #[serde(default = "default_step_ms")]
    step_ms: u64,
}

fn default_step_ms() -> u64 {
    200
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FirehoseIn {
    /// Progress updates to emit (at most 100,000).
    events: u32,
    /// Bytes of text per update (at most 16,384).
    #[serde(default)]
    bytes: u32,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoInput {}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct EmailIn {
    /// Recipient address.
    to: String,
    /// Subject line.
    subject: String,
    /// Message text.
    body: String,
}

/// The demo tools: `get_weather` (sensitive `api_key`, scope `weather:read`),
/// `slow_task` (progress, long timeout), `list_users` (scope `admin`), `firehose`
/// (many progress updates, to show a slow client's bounded queue) and `send_email`
/// (every call waits for its user's approval).
pub fn demo_registry() -> Registry {
    let weather = tool_fn(
        "get_weather",
        "Current weather in a city.",
        |i: WeatherIn, cx: ToolContext| async move {
            cx.progress(0.5, format!("looking up {}", i.city));
            let temp_c = match i.city.as_str() {
                "Paris" => 21.0,
                "Tokyo" => 26.5,
                "London" => 14.0,
                _ => 18.0,
            };
            Ok::<_, ToolError>(json!({"city": i.city, "temp_c": temp_c, "conditions": "clear"}))
        },
    )
    .settings(
        ToolSettings::new()
            .scope("weather:read")
            .sensitive("api_key")
            .read_only(true)
            // Published to MCP clients, which check `structuredContent` against it.
            .output_schema(json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "temp_c": {"type": "number"},
                    "conditions": {"type": "string"}
                },
                "required": ["city", "temp_c", "conditions"]
            })),
    );
    let slow = tool_fn(
        "slow_task",
        "A long job that reports progress at every step.",
        |i: SlowIn, cx: ToolContext| async move {
            let steps = i.steps.clamp(1, 1_000_000);
            let step = Duration::from_millis(i.step_ms.min(60_000));
            for n in 1..=steps {
                tokio::select! {
                    _ = cx.cancelled() => return Err(ToolError::new("cancelled")),
                    _ = tokio::time::sleep(step) => {}
                }
                cx.progress(f64::from(n) / f64::from(steps), format!("step {n}/{steps}"));
            }
            Ok::<_, ToolError>(json!({"steps": steps}))
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    let users = tool_fn(
        "list_users",
        "The demo users (administrators only).",
        |_: NoInput, _cx: ToolContext| async move { Ok::<_, ToolError>(json!(["alice", "bob"])) },
    )
    .settings(ToolSettings::new().scope("admin"));
    let firehose = tool_fn(
        "firehose",
        "Emits many progress updates as fast as the server allows.",
        |i: FirehoseIn, cx: ToolContext| async move {
            let events = i.events.min(100_000);
            let text = "x".repeat(i.bytes.min(16_384) as usize);
            let mut delivered = 0u32;
            for n in 0..events {
                if cx.progress(f64::from(n + 1) / f64::from(events), text.clone()) {
                    delivered += 1;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, ToolError>(json!({"events": events, "delivered": delivered}))
        },
    );
    let email = tool_fn(
        "send_email",
        "Sends an email in the user's name (each call needs the user's approval).",
        |i: EmailIn, _cx: ToolContext| async move {
            Ok::<_, ToolError>(json!({"sent": true, "to": i.to, "subject": i.subject,
                                      "bytes": i.body.len()}))
        },
    )
    .settings(
        ToolSettings::new()
            .requires_approval("sends an email in your name")
            .destructive(false),
    );
    let built = Registry::builder()
        .tool(weather)
        .tool(email)
        .tool(slow)
        .tool(users)
        .tool(firehose)
        .build();
    match built {
        Ok(r) => r,
        Err(e) => panic!("the demo tools are valid: {e}"),
    }
}

/// The fixed demo token table: token → user.
pub fn demo_users() -> HashMap<String, UserContext> {
    let user = |id: &str, scopes: &[&str]| {
        UserContext::builder(id)
            .thread_id(format!("thread_{id}"))
            .scopes(scopes.iter().copied())
            .build()
    };
    let mut m = HashMap::new();
    for (token, id, scopes) in [
        ("alice-token", "alice", &["weather:read", "admin"][..]),
        ("bob-token", "bob", &["weather:read"][..]),
    ] {
        match user(id, scopes) {
            Ok(u) => m.insert(token.to_owned(), u),
            Err(e) => panic!("the demo users are valid: {e}"),
        };
    }
    m
}

/// The demo engine: the demo tools, default limits, a 2 s delivery timeout.
pub fn demo_engine() -> Engine {
    demo_engine_builder(None).build()
}

/// The demo engine's builder, with every user's rate set to `per_minute` (burst the
/// same) when given.
pub fn demo_engine_builder(per_minute: Option<u32>) -> EngineBuilder {
    let builder = Engine::builder(demo_registry()).delivery_timeout(Duration::from_secs(2));
    match per_minute {
        Some(n) => builder.limits(Limits::default().per_user(UserLimits {
            concurrency: 10,
            rate: Some(Rate::per_minute(n)),
        })),
        None => builder,
    }
}
