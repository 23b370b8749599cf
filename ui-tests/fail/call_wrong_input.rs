// expected: mismatched types
// A typed call whose input is not the tool's `Input` type.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tool_dispatch::{Engine, RecordingSink, Registry, Tool, ToolContext, ToolError, UserContext};

#[derive(Deserialize, Serialize, JsonSchema)]
struct EchoIn {
    text: String,
}

struct Echo;

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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::builder(Registry::builder().tool(Echo).build().unwrap()).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(RecordingSink::new()).user(user);
    let _ = d.call::<Echo>(String::from("hi")).await;
}
