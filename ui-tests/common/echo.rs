//! The typed tool the typed-call cases share (included with `#[path]`; not a case).
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tool_dispatch::{Tool, ToolContext, ToolError};

#[derive(Deserialize, Serialize, JsonSchema)]
pub struct EchoIn {
    pub text: String,
}

pub struct Echo;

impl Tool for Echo {
    const NAME: &'static str = "echo";
    type Input = EchoIn;
    type Output = String;
    fn description(&self) -> &str {
        "Echoes its input."
    }
    async fn call(&self, input: EchoIn, _cx: ToolContext) -> Result<String, ToolError> {
        Ok(input.text)
    }
}
