// Twin of fail/unused_registry_builder.rs: the builder is built and the tool is there.
#![deny(unused_must_use)]
use tool_dispatch::{Registry, ToolError, tool_fn};

fn main() {
    let echo = tool_fn("echo", "Says it back.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    let registry = Registry::builder().tool(echo).build().unwrap();
    assert_eq!(registry.names().collect::<Vec<_>>(), ["echo"]);
}
