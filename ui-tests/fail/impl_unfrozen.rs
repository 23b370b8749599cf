// expected: `Forged` is not a tool-dispatch state marker
// Implementing the sealed marker trait `Unfrozen` outside the crate, to forge a state.
use tool_dispatch::state::Unfrozen;

struct Forged;

impl Unfrozen for Forged {}

fn main() {}
