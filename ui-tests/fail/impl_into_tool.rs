// expected: `Forged` is not a tool
// Implementing the sealed `IntoTool` trait by hand instead of `Tool`.
use tool_dispatch::IntoTool;

struct Forged;

impl IntoTool for Forged {}

fn main() {}
