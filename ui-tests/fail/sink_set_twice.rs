// expected: this dispatcher already has an event sink: it is bound to one sink for life
// Re-targeting a dispatcher at a second sink.
use tool_dispatch::{Engine, RecordingSink, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let d = engine.dispatcher().sink(RecordingSink::new());
    let _d = d.sink(RecordingSink::new());
}
