// Twin of fail/call_without_sink.rs: the sink is set, so the typed call compiles.
#[path = "../common/echo.rs"]
mod echo;
use echo::{Echo, EchoIn};
use tool_dispatch::{Engine, RecordingSink, Registry, UserContext};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let sink = RecordingSink::new();
    let d = engine.dispatcher().user(user).sink(sink.clone());
    let out = d.call::<Echo>(EchoIn { text: "hi".into() }).await.unwrap();
    assert_eq!(out.value, "hi");
    assert_eq!(sink.len(), 2);
}
