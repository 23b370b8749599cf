//! The other nodes: cancellations and approval decisions over pub/sub, pending
//! approvals claimed once, and the listener that applies the other nodes' signals.

use std::sync::{PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::{Link, Redis};
use crate::approval::Verdict;
use crate::engine::{Claim, Engine, Peers, Signal};

/// A signal on the wire: `{"node":..,"kind":"cancel_user"|"cancel_run"|"decision",
/// "user":..,"run":..,"call":..,"to":..,"approve":..,"message":..}`.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Wire {
    node: String,
    kind: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<String>,
    /// For a decision: the call, the node that holds it, the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approve: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl Redis {
    /// Publishes `wire` without waiting; `false` outside a runtime.
    fn publish(&self, wire: &Wire) -> bool {
        let Ok(payload) = serde_json::to_string(wire) else {
            return false;
        };
        let mut cmd = ::redis::cmd("PUBLISH");
        cmd.arg(self.link.keys.signals()).arg(&payload);
        self.run_later(cmd, "the other nodes could not be told")
    }
}

impl Peers for Redis {
    fn tell(&self, signal: Signal) -> bool {
        let (kind, user, run) = match signal {
            Signal::CancelUser(user) => ("cancel_user", user, None),
            Signal::CancelRun(user, run) => ("cancel_run", user, Some(run)),
        };
        self.publish(&Wire {
            node: self.link.node.clone(),
            kind: kind.into(),
            user,
            run,
            ..Wire::default()
        })
    }

    fn pending<'a>(&'a self, user: &'a str, call: &'a str, ttl: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let s = &self.link;
            let mut cmd = ::redis::cmd("SET");
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            cmd.arg(s.keys.approval(user, call))
                .arg(&s.node)
                .arg("PX")
                .arg(ms)
                .arg("NX");
            if !self.run(cmd).await {
                tracing::warn!(
                    user,
                    call,
                    "a pending approval could not be shared; it can be answered on this node only"
                );
            }
        })
    }

    fn claim<'a>(&'a self, user: &'a str, call: &'a str) -> BoxFuture<'a, Claim> {
        Box::pin(async move {
            let s = &self.link;
            let mut conn = self.conn();
            let mut invoke = s.scripts.claim.prepare_invoke();
            invoke.key(s.keys.approval(user, call));
            let owner = self.ask(invoke.invoke_async::<Option<String>>(&mut conn));
            match owner.await {
                Ok(Some(node)) if node == s.node => Claim::Here,
                Ok(Some(node)) => Claim::Elsewhere(node),
                Ok(None) => Claim::Nobody,
                Err(_) => Claim::Unreachable,
            }
        })
    }

    fn deliver(&self, node: &str, user: &str, call: &str, verdict: Verdict) -> bool {
        let (approve, message) = match verdict {
            Verdict::Approve => (true, None),
            Verdict::Reject { message } => (false, message),
        };
        self.publish(&Wire {
            node: self.link.node.clone(),
            kind: "decision".into(),
            user: user.into(),
            call: Some(call.into()),
            to: Some(node.into()),
            approve: Some(approve),
            message,
            ..Wire::default()
        })
    }

    fn forget(&self, user: &str, call: &str) {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.link.keys.approval(user, call));
        self.run_later(cmd, "a withdrawn approval stays in Redis until it expires");
    }
}

/// How often the listener makes sure its connection still answers.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A subscription to `channel`, within `timeout`.
pub(super) async fn subscribe(
    client: &::redis::Client,
    channel: &str,
    timeout: Duration,
) -> Result<::redis::aio::PubSub, String> {
    let subscribe = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, ::redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout.saturating_mul(4), subscribe).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out subscribing".into()),
    }
}

/// Applies the other nodes' signals to this process's engines, re-subscribing after
/// Redis comes back, until the last [`Redis`] handle is dropped.
pub(super) async fn listen(first: ::redis::aio::PubSub, link: Weak<Link>) {
    let (client, stop, channel, timeout) = match link.upgrade() {
        Some(s) => (
            s.client.clone(),
            s.stop.clone(),
            s.keys.signals(),
            s.config.timeout,
        ),
        None => return,
    };
    let mut pubsub = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let current = match pubsub.take() {
            Some(p) => p,
            None => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                match subscribe(&client, &channel, timeout).await {
                    Ok(p) => {
                        let Some(s) = link.upgrade() else { return };
                        s.counters.reconnected();
                        p
                    }
                    Err(_) => {
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        backoff = Duration::from_millis(100);
        let (mut sink, mut messages) = current.split();
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.reset();
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = messages.next() => m,
                _ = beat.tick() => {
                    // A connection that died without closing (a partition, a frozen
                    // server) says nothing: ask it, and subscribe anew if it is mute.
                    let Some(s) = link.upgrade() else { return };
                    let redis = Redis { link: s };
                    match redis.ask(sink.ping::<::redis::Value>()).await {
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            };
            let Some(msg) = msg else { break }; // the connection dropped: re-subscribe
            let Some(s) = link.upgrade() else { return };
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(wire) = serde_json::from_str::<Wire>(&text) else {
                continue;
            };
            // Its own cancellations a node has applied already; decisions are
            // addressed (a node may send one to itself only through the store).
            if wire.node == s.node && wire.kind != "decision" {
                continue;
            }
            let engines: Vec<Engine> = s
                .engines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter_map(Engine::upgrade)
                .collect();
            for engine in engines {
                match (wire.kind.as_str(), &wire.run, &wire.call) {
                    ("cancel_user", _, _) => {
                        engine.cancel_user_here(&wire.user);
                    }
                    ("cancel_run", Some(run), _) => {
                        engine.cancel_run_here(&wire.user, run);
                    }
                    ("decision", _, Some(call)) if wire.to.as_deref() == Some(&*s.node) => {
                        let verdict = match wire.approve {
                            Some(true) => Verdict::Approve,
                            _ => Verdict::Reject {
                                message: wire.message.clone(),
                            },
                        };
                        if engine.resolve_here(&wire.user, call, verdict) {
                            break; // one engine holds the call
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
