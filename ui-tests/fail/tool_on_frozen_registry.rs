// expected: no method named `tool` found for struct `tool_dispatch::Registry`
// Adding a tool after `.build()`: the registry is already shared by every request.
use tool_dispatch::{Registry, ToolError, tool_fn};

fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let registry = Registry::builder().build().unwrap();
    let _registry = registry.tool(echo);
}
