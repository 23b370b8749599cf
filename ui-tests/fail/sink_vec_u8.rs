// expected: `Vec<u8>` is not an event sink
// A byte buffer is not a sink: nothing would carry the events to the user.
use tool_dispatch::{Engine, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let _d = engine.dispatcher().sink(Vec::<u8>::new());
}
