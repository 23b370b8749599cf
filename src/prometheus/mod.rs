//! Prometheus metrics (feature `prometheus`, on [`prometheus_client`]): the engine's
//! counters and those of its parts as series in a registry the application owns, read
//! when the registry is scraped. Nothing is added to the call path: every series is
//! derived from the atomics the engine keeps anyway.
//!
//! ```
//! use tool_dispatch::prometheus::{encode, prometheus_client};
//! use tool_dispatch::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let echo = tool_fn("echo", "Echoes.", |s: String, _cx| async move { Ok::<_, ToolError>(s) });
//! let engine = Engine::builder(Registry::builder().tool(echo).build()?).build();
//! let runs = RunLog::new(RunLogConfig::default());
//!
//! let mut registry = prometheus_client::registry::Registry::default();
//! engine.register_metrics(&mut registry);
//! runs.register_metrics(&mut registry);
//! // ... the application's own metrics in the same registry ...
//!
//! // GET /metrics: the format the scraper's `Accept` header asks for.
//! let scrape = encode(&registry, Some("application/openmetrics-text; version=1.0.0"))?;
//! assert!(scrape.body.contains("tool_dispatch_calls_total{tool=\"echo\",status=\"success\"} 0"));
//! # Ok(()) }
//! ```
//!
//! # The series
//!
//! | series | type | labels |
//! |---|---|---|
//! | `tool_dispatch_calls_total` | counter | `tool`, `status` (the wire status names) |
//! | `tool_dispatch_call_duration_seconds` | histogram | `tool`; `le` from 100 µs to 10 min |
//! | `tool_dispatch_calls_in_flight` | gauge | |
//! | `tool_dispatch_approvals_waiting` | gauge | |
//! | `tool_dispatch_approvals_total` | counter | `outcome` (`approved`, `rejected`, `expired`, `withdrawn`) |
//! | `tool_dispatch_events_delivered_total` | counter | |
//! | `tool_dispatch_events_undelivered_total` | counter | `reason` (`closed`, `timed_out`, `full`, `failed`, `panicked`) |
//! | `tool_dispatch_progress_dropped_total` | counter | |
//! | `tool_dispatch_cache_hits_total`, `tool_dispatch_cache_misses_total` | counter | |
//! | `tool_dispatch_cache_entries` | gauge | |
//! | `tool_dispatch_unserializable_results_total` | counter | |
//! | `tool_dispatch_users_tracked` | gauge | |
//!
//! `tool_dispatch_calls_total` summed over its labels is every call made, whatever
//! its ending: a call that names no tool is counted under `tool="(unknown)"` (a tool
//! name cannot contain parentheses), never under the name the caller sent. No series
//! carries a user id; an application that bounds a label of its users itself (a
//! tenant, a plan) can count calls by it too, with
//! [`Engine::register_metrics_by_user`](crate::Engine::register_metrics_by_user)
//! (`tool_dispatch_user_calls_total{<label>, tool, status}`).
//!
//! The parts register their own series the same way: [`RunLog::register_metrics`]
//! and, with feature `redis`, `Redis::register_metrics`.

mod engine;
mod parts;

pub use engine::{UNKNOWN_TOOL, UserLabelError};

use std::fmt;

use ::prometheus_client::collector::Collector;
use ::prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet, prometheus_text, text,
};
use ::prometheus_client::metrics::MetricType;
use ::prometheus_client::metrics::counter::ConstCounter;
use ::prometheus_client::metrics::gauge::ConstGauge;
use ::prometheus_client::registry::{Registry, Unit};

#[doc(no_inline)]
pub use ::prometheus_client;

#[cfg(doc)]
use crate::RunLog;

/// The `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry rendered for one scrape: the body and the `Content-Type` to serve it
/// with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exposition {
    /// [`OPENMETRICS_CONTENT_TYPE`], or the Prometheus text format's
    /// (`text/plain; version=0.0.4; charset=utf-8`).
    pub content_type: &'static str,
    /// The text.
    pub body: String,
}

/// Renders `registry` in the format a scraper's `Accept` header asks for: OpenMetrics
/// text when it accepts `application/openmetrics-text` (Prometheus does), else the
/// Prometheus text format 0.0.4 (what `curl` and `promtool check metrics` read).
///
/// Fails only if a collector the application registered fails.
pub fn encode(registry: &Registry, accept: Option<&str>) -> Result<Exposition, fmt::Error> {
    let mut body = String::new();
    if accept.is_some_and(accepts_openmetrics) {
        text::encode(&mut body, registry)?;
        Ok(Exposition {
            content_type: OPENMETRICS_CONTENT_TYPE,
            body,
        })
    } else {
        prometheus_text::encode(&mut body, registry)?;
        Ok(Exposition {
            content_type: prometheus_text::CONTENT_TYPE,
            body,
        })
    }
}

/// Whether an `Accept` header lists OpenMetrics text with a weight above zero.
fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// Writes the series of one scrape (the crate's collectors use nothing else, so every
/// part names and types its series the same way).
pub(crate) struct Series<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Series<'_> {
    /// A counter without labels; `name` without `_total` (the encoder adds it).
    pub(crate) fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let c = ConstCounter::new(value);
        c.encode(
            self.encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?,
        )
    }

    /// A gauge without labels.
    pub(crate) fn gauge(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        g.encode(
            self.encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?,
        )
    }

    /// A counter with one series per label set.
    pub(crate) fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in series {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A histogram in seconds with one series per label set: `(labels, sum in
    /// seconds, (upper bound, count in that bucket alone) with `+Inf` last)`.
    pub(crate) fn histograms<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, f64, Vec<(f64, u64)>)>,
    ) -> fmt::Result {
        let mut family = self.encoder.encode_descriptor(
            name,
            help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (labels, sum, buckets) in series {
            let count = buckets.iter().map(|(_, n)| n).sum();
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A collector that reads `source` at each scrape through `read`.
struct Reader<S> {
    source: S,
    read: fn(&S, &mut Series<'_>) -> fmt::Result,
    what: &'static str,
}

impl<S> fmt::Debug for Reader<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("what", &self.what).finish()
    }
}

impl<S: Send + Sync + 'static> Collector for Reader<S> {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.read)(&self.source, &mut Series { encoder })
    }
}

/// Registers a collector that reads `source` at each scrape: how every part of the
/// crate adds its series (a part with plain atomic stats needs a `read` of a few
/// lines and one call of this).
pub(crate) fn register<S: Send + Sync + 'static>(
    registry: &mut Registry,
    what: &'static str,
    source: S,
    read: fn(&S, &mut Series<'_>) -> fmt::Result,
) {
    registry.register_collector(Box::new(Reader { source, read, what }));
}

#[cfg(test)]
mod tests {
    use super::accepts_openmetrics;

    #[test]
    fn openmetrics_is_served_only_to_a_scraper_that_accepts_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics(prometheus));
        assert!(accepts_openmetrics("Application/OpenMetrics-Text"));
        assert!(!accepts_openmetrics("*/*"));
        assert!(!accepts_openmetrics("text/plain;version=0.0.4"));
        assert!(!accepts_openmetrics("application/openmetrics-text;q=0"));
        assert!(!accepts_openmetrics(""));
    }
}
