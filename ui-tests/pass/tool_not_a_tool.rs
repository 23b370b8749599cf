// Twin of fail/tool_not_a_tool.rs: a closure wrapped with `tool_fn` is a tool.
use tool_dispatch::{Registry, ToolError, tool_fn};

fn main() {
    let answer = tool_fn("answer", "The answer.", |_: (), _cx| async move {
        Ok::<_, ToolError>(42u8)
    });
    let registry = Registry::builder().tool(answer).build().unwrap();
    assert_eq!(registry.len(), 1);
}
