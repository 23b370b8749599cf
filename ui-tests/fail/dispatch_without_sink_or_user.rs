// expected: this dispatcher has no event sink: call `.sink(..)` before dispatching
// expected: this dispatcher has no user: call `.user(..)` before dispatching
// Dispatching straight from `engine.dispatcher()`: both parts are missing, and each
// gets its own error.
use serde_json::json;
use tool_dispatch::{Engine, Registry, ToolCall, ToolError, tool_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap()).build();
    let d = engine.dispatcher();
    let _ = d.dispatch(ToolCall::new("echo", json!("hi"))).await;
}
