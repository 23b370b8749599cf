// expected: this dispatcher has no user: call `.user(..)` before dispatching
// An agent lifecycle event before `.user(..)`.
use tool_dispatch::{Engine, RecordingSink, Registry};
use tool_dispatch::event::{AgentUpdate};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let d = engine.dispatcher().sink(RecordingSink::new());
    let _ = d.notify(AgentUpdate::Thinking("planning".into())).await;
}
