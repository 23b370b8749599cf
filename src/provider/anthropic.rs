//! anthropic format.

use serde_json::Value;

use crate::provider::ProviderError;
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

/// Tool definitions in this provider's shape.
pub fn definitions(registry: &Registry) -> Vec<Value> {
    let _ = registry;
    todo!()
}

/// Reads the tool calls of a payload.
pub fn parse_calls(payload: &Value) -> Result<Vec<ToolCall>, ProviderError> {
    let _ = payload;
    todo!()
}

/// Renders results back, one per call, in call order.
pub fn render_results(calls: &[ToolCall], results: &[Result<ToolOutput, DispatchError>]) -> Value {
    let _ = (calls, results);
    todo!()
}
