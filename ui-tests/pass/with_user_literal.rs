// Twin of fail/with_user_literal.rs: `.user(..)` is the one way to reach `WithUser`.
use tool_dispatch::{Dispatcher, Engine, NoSink, Registry, UserContext, WithUser};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d: Dispatcher<NoSink, WithUser> = engine.dispatcher().user(user);
    assert_eq!(d.user_context().user_id(), "alice");
}
