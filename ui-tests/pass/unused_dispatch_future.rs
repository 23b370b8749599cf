// Twin of fail/unused_dispatch_future.rs: the dispatch future is awaited.
#![deny(unused_must_use)]
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
    let out = d
        .dispatch(ToolCall::new("echo", json!("hi")))
        .await
        .unwrap();
    assert_eq!(out.value, json!("hi"));
    assert_eq!(sink.len(), 2);
}
