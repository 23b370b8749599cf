// expected: futures do nothing unless you `.await` or poll them
// Calling `dispatch` without awaiting it: the tool never runs.
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
    let d = engine.dispatcher().sink(RecordingSink::new()).user(user);
    d.dispatch(ToolCall::new("echo", json!("hi")));
}
