// Twin of fail/tool_on_frozen_registry.rs: every tool is added before `.build()`.
use tool_dispatch::{Registry, ToolError, tool_fn};

fn main() {
    let echo = tool_fn("echo", "Echoes its input.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let registry = Registry::builder().tool(echo).build().unwrap();
    assert_eq!(registry.names().collect::<Vec<_>>(), ["echo"]);
}
