// expected: this dispatcher already has a user: it is bound to one user for life
// Re-targeting a dispatcher at a second user.
use tool_dispatch::{Engine, Registry, UserContext};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let alice = UserContext::builder("alice").build().unwrap();
    let bob = UserContext::builder("bob").build().unwrap();
    let d = engine.dispatcher().user(alice);
    let _d = d.user(bob);
}
