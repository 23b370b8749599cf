// expected: this dispatcher has no event sink: call `.sink(..)` before dispatching
// A typed call before `.sink(..)`.
#[path = "../common/echo.rs"]
mod echo;
use echo::{Echo, EchoIn};
use tool_dispatch::{Engine, Registry, UserContext};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().user(user);
    let _ = d.call::<Echo>(EchoIn { text: "hi".into() }).await;
}
