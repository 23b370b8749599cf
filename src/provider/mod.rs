//! LLM provider wire formats: tool definitions out, tool calls in, results back.
//!
//! One module per format: [`openai`] (Chat Completions), [`responses`] (OpenAI
//! Responses), [`anthropic`] (Messages) and [`mcp`] (`tools/list`, `tools/call`).

pub mod anthropic;
pub mod mcp;
pub mod openai;
pub mod responses;

use crate::error::DispatchError;

/// Why a provider payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A value has the wrong JSON type.
    #[error("{format}: expected {expected} at `{path}`, found {found}")]
    WrongType {
        /// The provider format (`"openai"`, `"responses"`, `"anthropic"`, `"mcp"`).
        format: &'static str,
        /// JSON path of the value.
        path: String,
        /// What was expected there.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A required field is missing.
    #[error("{format}: missing `{field}` at `{path}`")]
    MissingField {
        /// The provider format.
        format: &'static str,
        /// JSON path of the object missing the field.
        path: String,
        /// The field.
        field: &'static str,
    },
    /// A field has a value this format does not allow.
    #[error("{format}: unexpected value at `{path}`: expected {expected}, found {found}")]
    UnexpectedValue {
        /// The provider format.
        format: &'static str,
        /// JSON path of the value.
        path: String,
        /// What was expected.
        expected: &'static str,
        /// What was found (cut to 64 characters).
        found: String,
    },
}

/// The one model-facing text for a failed call (the [`DispatchError`]'s `Display`),
/// shared by all formats.
pub fn error_text(e: &DispatchError) -> String {
    e.to_string()
}
