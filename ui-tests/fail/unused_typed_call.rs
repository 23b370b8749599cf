// expected: a call does nothing until it is awaited
// Preparing a typed call and never awaiting it: the tool never runs.
#![deny(unused_must_use)]
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
    d.call::<Echo>(EchoIn { text: "hi".into() });
}
