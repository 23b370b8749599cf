// expected: this dispatcher has no event sink: call `.sink(..)` before dispatching
// Dispatching by name before `.sink(..)`: the events would have nowhere to go.
use serde_json::json;
use tool_dispatch::{Engine, Registry, ToolCall, ToolError, UserContext, tool_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().user(user);
    let _ = d.dispatch(ToolCall::new("echo", json!("hi"))).await;
}
