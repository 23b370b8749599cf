// Twin of fail/sink_unbounded_sender.rs: a bounded channel, drained by the writer task.
use tool_dispatch::{Engine, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate, Event};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(16);
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(tx).user(user);
    d.notify(AgentUpdate::Started(None)).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().kind(), "agent_started");
}
