// expected: a call does nothing until it is awaited
// Preparing a typed call and never awaiting it: the tool never runs.
#![deny(unused_must_use)]
#[path = "../common/echo.rs"]
mod echo;
use echo::{Echo, EchoIn};
use tool_dispatch::{Engine, RecordingSink, Registry, UserContext};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(RecordingSink::new()).user(user);
    d.call::<Echo>(EchoIn { text: "hi".into() });
}
