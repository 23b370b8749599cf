// expected: `Forged` is not a tool-dispatch state marker
// Implementing the sealed marker trait `HasUser` outside the crate, to forge a state.
use tool_dispatch::HasUser;

struct Forged;

impl HasUser for Forged {}

fn main() {}
