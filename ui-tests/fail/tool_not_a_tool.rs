// expected: `u8` is not a tool
// Registering something that is not a tool.
use tool_dispatch::Registry;

fn main() {
    let _registry = Registry::builder().tool(42u8);
}
