// expected: mismatched types
// A typed call whose input is not the tool's `Input` type.
#[path = "../common/echo.rs"]
mod echo;
use echo::Echo;
use tool_dispatch::{Engine, RecordingSink, Registry, UserContext};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(RecordingSink::new()).user(user);
    let _ = d.call::<Echo>(String::from("hi")).await;
}
