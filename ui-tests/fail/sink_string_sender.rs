// expected: `tokio::sync::mpsc::Sender<std::string::String>` is not an event sink
// A channel of strings is not a channel of events.
use tool_dispatch::{Engine, Registry};

fn main() {
    let engine = Engine::builder(Registry::builder().build().unwrap()).build();
    let (tx, _rx) = tokio::sync::mpsc::channel::<String>(16);
    let _d = engine.dispatcher().sink(tx);
}
