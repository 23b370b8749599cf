// expected: a dispatcher does nothing until it dispatches
// Building a dispatcher and dropping it on the floor.
#![deny(unused_must_use)]
use tool_dispatch::{Engine, RecordingSink, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    engine.dispatcher().sink(RecordingSink::new());
}
