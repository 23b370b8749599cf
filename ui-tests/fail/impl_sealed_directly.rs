// expected: module `sealed` is private
// Reaching for the private supertrait that seals the state markers.
use tool_dispatch::sealed::Sealed;

struct Forged;

impl Sealed for Forged {}

fn main() {}
