// Twin of fail/sink_not_send_sync.rs: `Arc<Mutex<..>>` makes the sink `Send + Sync`.
use std::sync::{Arc, Mutex};
use tool_dispatch::TrySendError;
use tool_dispatch::{Engine, EventSink, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate, Event};

#[derive(Clone)]
struct SharedSink(Arc<Mutex<Vec<Event>>>);

impl EventSink for SharedSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        self.0.lock().unwrap().push(event);
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let sink = SharedSink(Arc::new(Mutex::new(Vec::new())));
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(sink.clone()).user(user);
    d.notify(AgentUpdate::Started(None)).await.unwrap();
    assert_eq!(sink.0.lock().unwrap().len(), 1);
}
