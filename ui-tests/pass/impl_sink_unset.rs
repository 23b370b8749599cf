// Twin of fail/impl_sink_unset.rs: the marker is used as a bound, never implemented.
use tool_dispatch::SinkUnset;
use tool_dispatch::{Dispatcher, Engine, RecordingSink, Registry, WithSink};

fn attach<S: SinkUnset, U>(d: Dispatcher<S, U>, sink: RecordingSink) -> Dispatcher<WithSink, U> {
    d.sink(sink)
}

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let d = attach(engine.dispatcher(), RecordingSink::new());
    assert!(format!("{d:?}").contains("WithSink"));
}
