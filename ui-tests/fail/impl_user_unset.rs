// expected: `Forged` is not a tool-dispatch state marker
// Implementing the sealed marker trait `UserUnset` outside the crate, to forge a state.
use tool_dispatch::UserUnset;

struct Forged;

impl UserUnset for Forged {}

fn main() {}
