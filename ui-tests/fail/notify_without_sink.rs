// expected: this dispatcher has no event sink: call `.sink(..)` before dispatching
// An agent lifecycle event before `.sink(..)`.
use tool_dispatch::{Engine, Registry, UserContext};
use tool_dispatch::event::{AgentUpdate};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().user(user);
    let _ = d.notify(AgentUpdate::Thinking("planning".into())).await;
}
