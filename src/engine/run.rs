//! Running: the body (or the cache) under the call's deadline and cancellation, with
//! panics contained; then the result as the caller and the events get it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Inner;
use super::codec::{Codec, Ran, store};
use super::in_flight::{Ending, InFlight, Pending, Source};
use crate::cache::{Key, Leader, Lookup};
use crate::call::ToolOutput;
use crate::contain::{Contained, panic_message};
use crate::error::DispatchError;
use crate::json::cut;
use crate::registry::Entry;
use crate::tool::ToolError;

impl<'a> InFlight<'a> {
    /// The body, or the cache: a hit, a follower of an identical running call, or
    /// the leader that will fill the entry.
    pub(super) async fn run_cached<C, F>(
        &mut self,
        entry: &Entry,
        (key, ttl): (Key, Duration),
        body: F,
    ) -> (
        Result<Ran<C::Out>, DispatchError>,
        Option<(Leader<'a>, Duration)>,
    )
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        let inner: &'a Arc<Inner> = self.inner;
        let cache = &inner.cache;
        let fresh = |body: F| async move { body.await.map(Ran::Fresh) };
        match cache.lookup(key, self.start) {
            Lookup::Hit(v) => match C::decode(&v) {
                Some(o) => (Ok(Ran::Cached(o, v)), None),
                None => (self.run(entry, fresh(body)).await, None),
            },
            Lookup::Lead(l) => (self.run(entry, fresh(body)).await, Some((l, ttl))),
            Lookup::Wait(rx, key) => {
                let (metrics, depth) = (&inner.metrics, inner.config.max_depth);
                let follow = async move {
                    match cache.follow(rx, key).await {
                        Ok(v) => match C::decode(&v) {
                            Some(o) => Ok(Ran::Cached(o, v)),
                            None => body.await.map(Ran::Fresh),
                        },
                        Err(leader) => {
                            let o = body.await?;
                            store::<C>(leader, ttl, C::json(&o, depth).ok(), metrics);
                            Ok(Ran::Fresh(o))
                        }
                    }
                };
                (self.run(entry, follow).await, None)
            }
        }
    }

    /// Runs the body under its timeout, with panic isolation and cancellation.
    pub(super) async fn run<O>(
        &self,
        entry: &Entry,
        body: impl Future<Output = Result<Ran<O>, ToolError>>,
    ) -> Result<Ran<O>, DispatchError> {
        // The timeout counts from dispatch: a call that spent it waiting must not
        // start its body at all.
        if self.scope.cancel.is_cancelled() || (self.waited && Instant::now() >= self.deadline) {
            return Err(self.interruption());
        }
        // The body's first poll needs neither a timer nor a cancellation waiter: most
        // tools finish in it. Only a body that does not gets them (boxed, so the
        // future of a call that waits for nothing stays small).
        let mut body = std::pin::pin!(Contained::new(body));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll(cx))).await;
        let r = match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => match Box::pin(self.wait_body(body.as_mut())).await {
                Some(r) => r,
                None => return Err(self.interruption()),
            },
        };
        let max = self.inner.max_text();
        match r {
            Err(panic) => {
                let detail = panic_message(&*panic);
                tracing::error!(call_id = %self.scope.call_id, tool = %entry.name, panic = %detail, "tool panicked");
                Err(DispatchError::Panicked {
                    tool: entry.name.to_string(),
                    detail,
                })
            }
            Ok(Err(e)) => Err(DispatchError::ToolFailed {
                tool: entry.name.to_string(),
                retryable: e.is_retryable(),
                message: cut(e.message(), max),
            }),
            Ok(Ok(ran)) => Ok(ran),
        }
    }

    /// The rest of a body that did not finish in its first poll: until it does, its
    /// deadline passes or the call is cancelled (`None`; the body is then dropped,
    /// still inside its containment).
    async fn wait_body<F: Future>(&self, body: std::pin::Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.scope.cancel.cancelled() => None,
            r = tokio::time::timeout_at(self.deadline, body) => r.ok(),
        }
    }

    /// Fills the cache, then sends `tool_completed` (or returns it, when the sink
    /// must be waited for); the caller gets its value whatever the event can show.
    pub(super) fn finish<C: Codec>(
        &mut self,
        entry: &Entry,
        ran: Result<Ran<C::Out>, DispatchError>,
        leader: Option<(Leader<'a>, Duration)>,
    ) -> (Result<ToolOutput<C::Out>, DispatchError>, Option<Pending>) {
        let metrics = &self.inner.metrics;
        let (value, source, json) = match ran {
            Err(e) => {
                let pending = self.complete_now(Ending::Failure(&e));
                return (Err(e), pending);
            }
            Ok(Ran::Fresh(o)) => {
                if entry.settings.cache_ttl.is_some() {
                    metrics.cache_miss();
                }
                let json = C::json(&o, self.inner.config.max_depth);
                if let Some((l, ttl)) = leader {
                    store::<C>(l, ttl, json.as_ref().ok().cloned(), metrics);
                }
                (o, Source::Ran, json)
            }
            Ok(Ran::Cached(o, v)) => {
                metrics.cache_hit();
                (o, Source::Cache, Ok(Value::clone(&v)))
            }
        };
        let (result, note) = match json {
            Ok(mut j) => {
                crate::content::elide_binary(&mut j);
                let others = self.header_bytes();
                self.inner
                    .redaction()
                    .apply_beside(&mut j, &entry.settings.sensitive, others);
                (j, None)
            }
            Err(e) => {
                metrics.unserializable_result();
                (
                    Value::Null,
                    Some(format!("the result cannot be shown: {}", e.0)),
                )
            }
        };
        let pending = self.complete_now(Ending::Success {
            result,
            source,
            note,
        });
        let out = ToolOutput {
            call_id: Arc::clone(&self.scope.call_id),
            value,
            cached: source == Source::Cache,
        };
        (Ok(out), pending)
    }
}
