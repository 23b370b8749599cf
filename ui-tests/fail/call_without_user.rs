// expected: this dispatcher has no user: call `.user(..)` before dispatching
// A typed call before `.user(..)`.
#[path = "../common/echo.rs"]
mod echo;
use echo::{Echo, EchoIn};
use tool_dispatch::{Engine, RecordingSink, Registry};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let d = engine.dispatcher().sink(RecordingSink::new());
    let _ = d.call::<Echo>(EchoIn { text: "hi".into() }).await;
}
