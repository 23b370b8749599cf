//! Two users dispatch concurrently on one engine. Every event each user's WebSocket
//! would receive is printed as a JSON line; one call is denied, one times out, one
//! has invalid arguments.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tool_dispatch::event::Event;
use tool_dispatch::{
    Engine, Registry, Tool, ToolCall, ToolContext, ToolError, ToolSettings, UserContext, tool_fn,
};

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    city: String,
    api_key: String,
}

#[derive(Deserialize, Serialize)]
struct WeatherOut {
    city: String,
    temp_c: f64,
}

struct GetWeather;

impl Tool for GetWeather {
    const NAME: &'static str = "get_weather";
    type Input = WeatherIn;
    type Output = WeatherOut;

    fn description(&self) -> &str {
        "Current temperature in a city."
    }

    fn settings(&self) -> ToolSettings {
        ToolSettings::new()
            .scope("weather:read")
            .sensitive("api_key")
    }

    async fn call(&self, input: WeatherIn, cx: ToolContext) -> Result<WeatherOut, ToolError> {
        cx.progress(0.5, "asking the weather service");
        let temp_c = 12.0 + input.city.len() as f64;
        Ok(WeatherOut {
            city: input.city,
            temp_c,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let slow = tool_fn(
        "slow_report",
        "Takes its time.",
        |secs: u64, _cx| async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok::<_, ToolError>("done")
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_millis(200)));
    let registry = Registry::builder().tool(GetWeather).tool(slow).build()?;
    let engine = Engine::builder(registry).build();

    let users = [
        UserContext::builder("alice")
            .thread_id("t_alice")
            .run_id("run_1")
            .scope("weather:read")
            .build()?,
        // bob lacks the `weather:read` scope: his weather call is denied.
        UserContext::builder("bob")
            .thread_id("t_bob")
            .run_id("run_2")
            .build()?,
    ];

    let mut sessions = Vec::new();
    for user in users {
        // The WebSocket writer-task pattern: a bounded channel drained by one task.
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        let writer = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                // A real writer sends this text frame on the user's WebSocket.
                println!("{}", serde_json::to_string(&event).unwrap_or_default());
            }
        });
        let dispatcher = engine.dispatcher().sink(tx).user(user);
        sessions.push(tokio::spawn(async move {
            let calls = [
                ToolCall::new(
                    "get_weather",
                    json!({"city": "Paris", "api_key": "sk-live-123"}),
                )
                .with_id(format!(
                    "call_weather_{}",
                    dispatcher.user_context().user_id()
                )),
                ToolCall::new("get_weather", json!({"city": 42})),
                ToolCall::new("slow_report", json!(5)),
            ];
            let user = dispatcher.user_context().user_id().to_owned();
            let results = dispatcher.dispatch_all(calls).await;
            drop(dispatcher); // closes the channel: the writer ends
            let _ = writer.await;
            results
                .iter()
                .map(|r| match r {
                    Ok(out) => format!("# {user}: {} -> {}", out.call_id, out.value),
                    Err(e) => format!("# {user}: {} -> {e}", e.status()),
                })
                .collect::<Vec<_>>()
        }));
    }
    for session in sessions {
        for line in session.await? {
            println!("{line}");
        }
    }
    let m = engine.metrics();
    println!(
        "# total={} success={} denied={} invalid_input={} timeout={} active={}",
        m.total,
        m.count(tool_dispatch::event::Status::Success),
        m.count(tool_dispatch::event::Status::Denied),
        m.count(tool_dispatch::event::Status::InvalidInput),
        m.count(tool_dispatch::event::Status::Timeout),
        m.active
    );
    Ok(())
}
