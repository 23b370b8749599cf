// expected: module `state` is private
// Reaching for the private supertrait that seals the state markers.
use tool_dispatch::state::sealed::Sealed;

struct Forged;

impl Sealed for Forged {}

fn main() {}
