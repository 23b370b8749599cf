// expected: `Forged` is not a tool-dispatch state marker
// Implementing the sealed marker trait `SinkUnset` outside the crate, to forge a state.
use tool_dispatch::SinkUnset;

struct Forged;

impl SinkUnset for Forged {}

fn main() {}
