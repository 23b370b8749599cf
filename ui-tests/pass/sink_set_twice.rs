// Twin of fail/sink_set_twice.rs: a second connection gets a second dispatcher.
use tool_dispatch::{Engine, RecordingSink, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let first = engine.dispatcher().sink(RecordingSink::new());
    let second = engine.dispatcher().sink(RecordingSink::new());
    assert_eq!(format!("{first:?}"), format!("{second:?}"));
}
