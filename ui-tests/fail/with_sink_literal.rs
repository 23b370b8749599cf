// expected: cannot initialize a tuple struct which contains private fields
// Forging the `WithSink` state by hand.
use std::sync::Arc;
use tool_dispatch::{RecordingSink, WithSink};

fn main() {
    let _forged = WithSink(Arc::new(RecordingSink::new()));
}
