// Twin of fail/impl_user_unset.rs: the marker is used as a bound, never implemented.
use tool_dispatch::UserUnset;
use tool_dispatch::{Dispatcher, Engine, Registry, UserContext, WithUser};

fn bind<S, U: UserUnset>(d: Dispatcher<S, U>, user: UserContext) -> Dispatcher<S, WithUser> {
    d.user(user)
}

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = bind(engine.dispatcher(), user);
    assert_eq!(d.user_context().user_id(), "alice");
}
