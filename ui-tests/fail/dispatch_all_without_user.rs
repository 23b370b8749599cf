// expected: this dispatcher has no user: call `.user(..)` before dispatching
// A batch of calls before `.user(..)`.
use serde_json::json;
use tool_dispatch::{Engine, RecordingSink, Registry, ToolCall, ToolError, tool_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap()).build();
    let d = engine.dispatcher().sink(RecordingSink::new());
    let calls = vec![
        ToolCall::new("echo", json!("a")),
        ToolCall::new("echo", json!("b")),
    ];
    let _ = d.dispatch_all(calls).await;
}
