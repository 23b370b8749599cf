// Twin of fail/impl_into_tool.rs: implement `Tool`; `IntoTool` comes with it.
use tool_dispatch::IntoTool;
use tool_dispatch::{Registry, Tool, ToolContext, ToolError};

struct Real;

impl Tool for Real {
    const NAME: &'static str = "real";
    type Input = String;
    type Output = String;
    fn description(&self) -> &str {
        "A real tool."
    }
    async fn call(&self, input: String, _cx: ToolContext) -> Result<String, ToolError> {
        Ok(input)
    }
}

fn is_tool(_: &impl IntoTool) {}

fn main() {
    is_tool(&Real);
    let registry = Registry::builder().tool(Real).build().unwrap();
    assert_eq!(registry.len(), 1);
}
