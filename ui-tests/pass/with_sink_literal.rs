// Twin of fail/with_sink_literal.rs: `.sink(..)` is the one way to reach `WithSink`.
use tool_dispatch::{Dispatcher, Engine, NoUser, RecordingSink, Registry, WithSink};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let d: Dispatcher<WithSink, NoUser> = engine.dispatcher().sink(RecordingSink::new());
    assert!(format!("{d:?}").contains("WithSink"));
}
