// expected: `Forged` is not a tool-dispatch state marker
// Implementing the sealed marker trait `HasSink` outside the crate, to forge a state.
use tool_dispatch::HasSink;

struct Forged;

impl HasSink for Forged {}

fn main() {}
