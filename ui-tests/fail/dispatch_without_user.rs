// expected: this dispatcher has no user: call `.user(..)` before dispatching
// Dispatching by name before `.user(..)`: nobody to act for.
use serde_json::json;
use tool_dispatch::{Engine, RecordingSink, Registry, ToolCall, ToolError, tool_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap()).build();
    let d = engine.dispatcher().sink(RecordingSink::new());
    let _ = d.dispatch(ToolCall::new("echo", json!("hi"))).await;
}
