//! LLM provider wire formats: tool definitions out, tool calls in, results back.
