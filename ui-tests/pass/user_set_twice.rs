// Twin of fail/user_set_twice.rs: a second user gets a second dispatcher.
use tool_dispatch::{Engine, Registry, UserContext};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let alice = UserContext::builder("alice").build().unwrap();
    let bob = UserContext::builder("bob").build().unwrap();
    let for_alice = engine.dispatcher().user(alice);
    let for_bob = engine.dispatcher().user(bob);
    assert_eq!(for_alice.user_context().user_id(), "alice");
    assert_eq!(for_bob.user_context().user_id(), "bob");
}
