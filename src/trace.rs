//! The tracing span of each call, named and attributed by the OpenTelemetry GenAI
//! semantic conventions: `execute_tool`, with `gen_ai.operation.name`,
//! `gen_ai.tool.name` and `gen_ai.tool.call.id`, and the call's `status` and
//! `duration_ms` once it ends. It is a child of the caller's current span, so an
//! agent's trace shows its tool calls.
//!
//! With feature `otel` the span also carries what an OpenTelemetry layer reads: its
//! name `execute_tool {tool}`, kind `internal`, `gen_ai.tool.type`, `error.type` (the
//! status) and an error status on failure; the waits for an approval and for room in
//! the user's sink are child spans; and, when the engine is told to
//! ([`EngineBuilder::trace_content`](crate::EngineBuilder::trace_content)), the
//! arguments and the result as the events show them (redacted, cut). Without it,
//! nothing here does more than the span itself.

use std::time::Duration;

use tracing::Span;

use crate::event::Status;

/// Opens the span of one call.
#[inline]
pub(crate) fn call_span(tool: &str, call_id: &str, user_id: &str) -> Span {
    #[cfg(not(feature = "otel"))]
    let span = tracing::info_span!(
        "execute_tool",
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = tool,
        gen_ai.tool.call.id = call_id,
        user_id = user_id,
        status = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    #[cfg(feature = "otel")]
    let span = tracing::info_span!(
        "execute_tool",
        otel.name = %format_args!("execute_tool {tool}"),
        otel.kind = "internal",
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = tool,
        gen_ai.tool.call.id = call_id,
        gen_ai.tool.type = "function",
        user_id = user_id,
        status = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        gen_ai.tool.call.arguments = tracing::field::Empty,
        gen_ai.tool.call.result = tracing::field::Empty,
    );
    span
}

/// Records how the call ended.
#[inline]
pub(crate) fn ended(span: &Span, status: Status, took: Duration) {
    if span.is_disabled() {
        return;
    }
    span.record("status", status.as_str());
    span.record("duration_ms", took.as_secs_f64() * 1e3);
    #[cfg(feature = "otel")]
    if status != Status::Success {
        // The status names are few and fixed: the low-cardinality `error.type` the
        // conventions ask for.
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "error");
    }
}

/// What a call's content attribute holds.
#[cfg(feature = "otel")]
#[derive(Clone, Copy)]
pub(crate) enum Content {
    /// `gen_ai.tool.call.arguments`.
    Arguments,
    /// `gen_ai.tool.call.result`.
    Result,
}

/// Longest content attribute, in characters.
#[cfg(feature = "otel")]
const MAX_CONTENT: usize = 16 * 1024;

/// Puts `value` (already redacted as the events show it) on the span as JSON text.
#[cfg(feature = "otel")]
pub(crate) fn content(span: &Span, what: Content, value: &serde_json::Value) {
    if span.is_disabled() {
        return;
    }
    let text = serde_json::to_string(value).unwrap_or_default();
    let text = crate::json::cut(&text, MAX_CONTENT);
    let field = match what {
        Content::Arguments => "gen_ai.tool.call.arguments",
        Content::Result => "gen_ai.tool.call.result",
    };
    span.record(field, text.as_str());
}

/// What a call waits for in a child span.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "otel"), allow(dead_code))] // named in spans only
pub(crate) enum Wait {
    /// Its user's approval.
    Approval,
    /// Room in its user's sink for this event.
    Delivery(&'static str),
}

/// `wait`, in a child span of the current one (feature `otel`; without it, `wait`
/// itself).
#[cfg(feature = "otel")]
pub(crate) fn waiting<F: Future>(what: Wait, wait: F) -> tracing::instrument::Instrumented<F> {
    use tracing::Instrument;
    let span = match what {
        Wait::Approval => tracing::info_span!(
            "await_approval",
            otel.name = "await_approval",
            otel.kind = "internal",
        ),
        Wait::Delivery(event) => tracing::info_span!(
            "await_delivery",
            otel.name = "await_delivery",
            otel.kind = "internal",
            tool_dispatch.event = event,
        ),
    };
    wait.instrument(span)
}

/// `wait`, in a child span of the current one (feature `otel`; without it, `wait`
/// itself).
#[cfg(not(feature = "otel"))]
#[inline(always)]
pub(crate) fn waiting<F: Future>(_: Wait, wait: F) -> F {
    wait
}
