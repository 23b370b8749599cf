// Twin of fail/impl_has_user.rs: the marker is used as a bound, never implemented;
// only the builder produces a state that satisfies it.
use tool_dispatch::{HasSink, HasUser};
use tool_dispatch::{Dispatcher, Engine, RecordingSink, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate};

async fn announce<S: HasSink, U: HasUser>(d: &Dispatcher<S, U>) {
    d.notify(AgentUpdate::Started(None)).await.unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let sink = RecordingSink::new();
    let user = UserContext::builder("alice").build().unwrap();
    announce(&engine.dispatcher().sink(sink.clone()).user(user)).await;
    assert_eq!(sink.events()[0].kind(), "agent_started");
}
