// Twin of fail/unused_dispatcher_builder.rs: the dispatcher is kept and used.
#![deny(unused_must_use)]
use tool_dispatch::{Engine, RecordingSink, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let sink = RecordingSink::new();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(sink.clone()).user(user);
    d.notify(AgentUpdate::Started(None)).await.unwrap();
    assert_eq!(sink.len(), 1);
}
