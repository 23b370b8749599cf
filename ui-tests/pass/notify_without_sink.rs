// Twin of fail/notify_without_sink.rs: the sink is set, so notifying compiles.
use tool_dispatch::{Engine, RecordingSink, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let sink = RecordingSink::new();
    let d = engine.dispatcher().user(user).sink(sink.clone());
    d.notify(AgentUpdate::Thinking("planning".into()))
        .await
        .unwrap();
    assert_eq!(sink.events()[0].kind(), "agent_thinking");
}
