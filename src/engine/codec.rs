//! How results travel through a call: by name as JSON ([`Json`]), or typed
//! ([`Typed`]); and how a fresh result fills the cache.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;

use crate::cache::Leader;
use crate::json::{self, NotJson};
use crate::metrics::Metrics;

/// How results travel: by name as JSON ([`Json`]), or typed ([`Typed`]).
pub(super) trait Codec {
    type Out: Send + 'static;
    /// The result as JSON, for its event and the cache.
    fn json(out: &Self::Out, max_depth: usize) -> Result<Value, NotJson>;
    /// Whether `json` comes back as the same kind of result (else it is not cached).
    fn round_trips(json: &Value) -> bool;
    /// A cached result in this codec's type; `None` when it does not fit.
    fn decode(cached: &Value) -> Option<Self::Out>;
}

pub(super) struct Json;

impl Codec for Json {
    type Out = Value;
    fn json(out: &Value, _: usize) -> Result<Value, NotJson> {
        Ok(out.clone()) // already bounded: made by `json::to_value`
    }
    fn round_trips(_: &Value) -> bool {
        true
    }
    fn decode(cached: &Value) -> Option<Value> {
        Some(cached.clone())
    }
}

pub(super) struct Typed<O>(PhantomData<fn() -> O>);

impl<O: Serialize + DeserializeOwned + Send + 'static> Codec for Typed<O> {
    type Out = O;
    fn json(out: &O, max_depth: usize) -> Result<Value, NotJson> {
        json::to_value(out, max_depth)
    }
    fn round_trips(json: &Value) -> bool {
        O::deserialize(json).is_ok()
    }
    fn decode(cached: &Value) -> Option<O> {
        O::deserialize(cached).ok()
    }
}

/// How a body produced its result.
pub(super) enum Ran<O> {
    Fresh(O),
    Cached(O, Arc<Value>),
}

/// Stores a fresh result for the followers and later calls, if it survives a JSON
/// round trip; otherwise the followers run the tool themselves, and it is counted.
pub(super) fn store<C: Codec>(
    leader: Leader<'_>,
    ttl: Duration,
    json: Option<Value>,
    metrics: &Metrics,
) {
    match json {
        Some(j) if C::round_trips(&j) => leader.complete(j, ttl, Instant::now()),
        _ => metrics.cache_skipped(), // dropping the leader lets a follower run
    }
}
