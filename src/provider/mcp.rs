//! MCP: `tools/list` and `tools/call`.

use serde_json::Value;

use crate::event::ToolProgress;
use crate::provider::ProviderError;
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

/// The result of `tools/list`.
pub fn list_tools(registry: &Registry) -> Value {
    let _ = registry;
    todo!()
}

/// Reads a JSON-RPC `tools/call` request.
pub fn parse_call(request: &Value) -> Result<(Value, ToolCall), ProviderError> {
    let _ = request;
    todo!()
}

/// The JSON-RPC response to a `tools/call`.
pub fn render_result(id: &Value, result: &Result<ToolOutput, DispatchError>) -> Value {
    let _ = (id, result);
    todo!()
}

/// A `notifications/progress` for a tool's progress event.
pub fn progress_notification(event: &ToolProgress, progress_token: &Value) -> Value {
    let _ = (event, progress_token);
    todo!()
}
