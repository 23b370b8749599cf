//! Traces to an OpenTelemetry collector over OTLP/HTTP (feature `otel`, on
//! [`opentelemetry-otlp`](opentelemetry_otlp) and
//! [`tracing-opentelemetry`](tracing_opentelemetry)), configured by the standard
//! `OTEL_*` environment variables; nothing at all when they name no endpoint.
//!
//! Every call's span then reaches the collector as a child of the caller's span:
//! named `execute_tool {tool}`, kind internal, with `gen_ai.operation.name`,
//! `gen_ai.tool.name`, `gen_ai.tool.call.id`, `gen_ai.tool.type`, the call's `status`,
//! and `error.type` with an error status on failure; its arguments and result only
//! with [`EngineBuilder::trace_content`]. Waits for an approval or for room in the
//! user's sink are `await_approval` and `await_delivery` child spans.
//!
//! ```no_run
//! use tool_dispatch::otel::OtlpTraces;
//! use tracing_subscriber::prelude::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // None unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.
//! let traces = OtlpTraces::from_env("my-agent")?;
//! tracing_subscriber::registry()
//!     .with(traces.as_ref().map(|t| t.layer()))
//!     .init();
//! // ... serve ...
//! if let Some(t) = traces {
//!     t.shutdown()?; // sends what is still buffered
//! }
//! # Ok(()) }
//! ```
//!
//! The variables read: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended (`http://` only: point
//! it at a collector nearby, which speaks TLS onwards); `OTEL_EXPORTER_OTLP_HEADERS`,
//! `..._TIMEOUT`, `..._COMPRESSION` and their `_TRACES_` forms; `OTEL_SERVICE_NAME`
//! and `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_TRACES_SAMPLER` and `..._ARG`;
//! `OTEL_BSP_SCHEDULE_DELAY`, `..._MAX_QUEUE_SIZE`, `..._MAX_EXPORT_BATCH_SIZE`;
//! `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn it off. The protocol
//! is `http/protobuf`; another `OTEL_EXPORTER_OTLP_PROTOCOL` is an error, not
//! silently ignored.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::registry::LookupSpan;

#[doc(no_inline)]
pub use opentelemetry;
#[doc(no_inline)]
pub use opentelemetry_sdk;
#[doc(no_inline)]
pub use tracing_opentelemetry;

#[cfg(doc)]
use crate::EngineBuilder;

/// Why traces cannot be exported as the environment asks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OtelError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (or its `_TRACES_` form) names a protocol other
    /// than `http/protobuf`.
    #[error("OTLP protocol `{0}` is not supported; this exporter speaks http/protobuf")]
    Protocol(String),
    /// The endpoint is not an `http://` URL.
    #[error(
        "the OTLP endpoint must be an http:// URL (TLS is not built in: export to a collector nearby)"
    )]
    Endpoint,
    /// `OTEL_TRACES_EXPORTER` names no exporter this library has.
    #[error("OTEL_TRACES_EXPORTER `{0}` is not supported; use `otlp` or `none`")]
    Exporter(String),
    /// The exporter could not be built or shut down.
    #[error("the OTLP exporter failed: {0}")]
    Failed(String),
}

/// Spans exported to an OpenTelemetry collector over OTLP/HTTP, batched on a
/// background thread. Dropping it (or [`shutdown`](Self::shutdown)) sends what is
/// still buffered.
#[derive(Debug)]
pub struct OtlpTraces {
    provider: SdkTracerProvider,
}

/// What the environment says about exporting traces.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// `OTEL_SERVICE_NAME` or a `service.name` in `OTEL_RESOURCE_ATTRIBUTES` is set.
    named: bool,
}

/// Reads the variables that decide whether to export, through `var` (`None`: unset
/// or empty).
fn plan(var: impl Fn(&str) -> Option<String>) -> Result<Option<Plan>, OtelError> {
    let var = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if let Some(exporters) = var("OTEL_TRACES_EXPORTER") {
        let mut names = exporters.split(',').map(str::trim);
        if names.clone().any(|n| n.eq_ignore_ascii_case("none")) {
            return Ok(None);
        }
        if let Some(other) = names.find(|n| !n.eq_ignore_ascii_case("otlp")) {
            return Err(OtelError::Exporter(shown(other)));
        }
    }
    let Some(endpoint) =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    if !endpoint
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    {
        return Err(OtelError::Endpoint);
    }
    let protocol =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
        return Err(OtelError::Protocol(shown(&p)));
    }
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    Ok(Some(Plan { named }))
}

/// A value from the environment, shortened for an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

impl OtlpTraces {
    /// The exporter the standard environment asks for, or `None` when it names no
    /// endpoint (or turns tracing off). `service` names this process unless
    /// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` does.
    pub fn from_env(service: &str) -> Result<Option<OtlpTraces>, OtelError> {
        let Some(plan) = plan(|name| std::env::var(name).ok())? else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .map_err(|e| OtelError::Failed(e.to_string()))?;
        let mut resource = Resource::builder();
        if !plan.named {
            resource = resource.with_service_name(service.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        Ok(Some(OtlpTraces { provider }))
    }

    /// The layer that hands the process's tracing spans (the calls' among them) to
    /// this exporter; add it to the `tracing_subscriber` registry.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        layer(self.provider.tracer(env!("CARGO_PKG_NAME")))
    }

    /// The tracer provider, for an application that adds its own OpenTelemetry
    /// instrumentation.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Sends what is still buffered and stops the exporter.
    pub fn shutdown(self) -> Result<(), OtelError> {
        self.provider
            .shutdown()
            .map_err(|e| OtelError::Failed(e.to_string()))
    }
}

/// The layer that hands the process's tracing spans to `tracer` (for an application
/// with its own tracer provider; [`OtlpTraces::layer`] is this over its own). Spans
/// carry their fields and the GenAI names, not what `tracing-opentelemetry` adds by
/// default to every span at a cost on each call: source locations, thread ids, busy
/// and idle times, the target.
pub fn layer<S, T>(tracer: T) -> tracing_opentelemetry::OpenTelemetryLayer<S, T>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn nothing_is_exported_unless_an_endpoint_is_named() {
        assert_eq!(plan(env(&[])), Ok(None));
        assert_eq!(plan(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])), Ok(None));
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")];
        assert_eq!(plan(env(&on)), Ok(Some(Plan { named: false })));
        let traces = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "HTTP://collector:4318/v1/traces",
        )];
        assert!(plan(env(&traces)).unwrap().is_some());
        for off in [
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(plan(env(&[on[0], off])), Ok(None), "{off:?}");
        }
        assert!(
            plan(env(&[on[0], ("OTEL_SDK_DISABLED", "false")]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_that_says_so() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(
            plan(env(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])),
            Err(OtelError::Protocol("grpc".into()))
        );
        assert!(plan(env(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])).is_ok());
        let secret = "https://user:hunter2@collector:4318";
        let e = plan(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", secret)])).unwrap_err();
        assert_eq!(e, OtelError::Endpoint);
        assert!(!e.to_string().contains("hunter2"));
        assert_eq!(
            plan(env(&[on, ("OTEL_TRACES_EXPORTER", "otlp,zipkin")])),
            Err(OtelError::Exporter("zipkin".into()))
        );
    }

    #[test]
    fn the_service_is_named_by_the_environment_when_it_names_one() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        let named = |v: &[(&str, &str)]| plan(env(v)).unwrap().unwrap().named;
        assert!(named(&[on, ("OTEL_SERVICE_NAME", "svc")]));
        assert!(named(&[
            on,
            ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=svc")
        ]));
        assert!(!named(&[on, ("OTEL_RESOURCE_ATTRIBUTES", "a=b")]));
    }
}
