// Twin of fail/dispatch_all_without_user.rs: the user is set, so the batch compiles.
use serde_json::json;
use tool_dispatch::{Engine, RecordingSink, Registry, ToolCall, ToolError, UserContext, tool_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let engine = Engine::builder(Registry::builder().tool(echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let sink = RecordingSink::new();
    let d = engine.dispatcher().sink(sink.clone()).user(user);
    let calls = vec![
        ToolCall::new("echo", json!("a")),
        ToolCall::new("echo", json!("b")),
    ];
    let out = d.dispatch_all(calls).await;
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].as_ref().unwrap().value, json!("b"));
    assert_eq!(sink.len(), 4);
}
