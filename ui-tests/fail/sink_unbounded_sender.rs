// expected: `UnboundedSender<tool_dispatch::event::Event>` is not an event sink
// An unbounded channel is not a sink: a slow consumer would grow memory without limit.
use tool_dispatch::{Engine, Registry};
use tool_dispatch::event::{Event};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let _d = engine.dispatcher().sink(tx);
}
