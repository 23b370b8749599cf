// expected: a registry builder does nothing until `.build()` is called
// Adding a tool to a registry builder and dropping the builder.
#![deny(unused_must_use)]
use tool_dispatch::{Registry, ToolError, tool_fn};

fn main() {
    let echo = tool_fn("echo", "Says it back.", |s: String, _cx| async move {
        Ok::<_, ToolError>(s)
    });
    Registry::builder().tool(echo);
}
