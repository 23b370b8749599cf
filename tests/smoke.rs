use serde_json::json;
use tool_dispatch::*;

#[tokio::test]
async fn smoke() {
    let echo = tool_fn("echo", "echo", |s: String, _cx| async move { Ok::<_, ToolError>(s) });
    let reg = Registry::builder().tool(echo).build().unwrap();
    let engine = Engine::builder(reg).build();
    let sink = RecordingSink::new();
    let d = engine.dispatcher().sink(sink.clone()).user(UserContext::builder("alice").build().unwrap());
    let out = d.dispatch(ToolCall::new("echo", json!("hi"))).await.unwrap();
    assert_eq!(out.value, json!("hi"));
    let e = d.dispatch(ToolCall::new("nope", json!("hi"))).await.unwrap_err();
    assert_eq!(e.status(), Status::UnknownTool);
    let e = d.dispatch(ToolCall::from_text("echo", "{bad")).await.unwrap_err();
    assert_eq!(e.status(), Status::InvalidInput);
    let ev = sink.events();
    for e in &ev { println!("{}", serde_json::to_string(e).unwrap()); }
    assert_eq!(ev.len(), 6);
    let m = engine.metrics();
    assert_eq!(m.total, 3);
    assert_eq!(m.active, 0);
    println!("{}", serde_json::to_string(&engine.health().await).unwrap());
}
