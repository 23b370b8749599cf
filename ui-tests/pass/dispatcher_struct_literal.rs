// Twin of fail/dispatcher_struct_literal.rs: a dispatcher comes from the engine.
use tool_dispatch::{Dispatcher, Engine, NoSink, NoUser, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let d: Dispatcher<NoSink, NoUser> = engine.dispatcher();
    assert!(format!("{d:?}").contains("NoSink"));
}
