//! Redis integration (feature `redis`): several nodes as one.
//!
//! Several replicas of a back end behind a load balancer each keep their own books:
//! a user with two tabs on two nodes gets twice the rate, and "stop" pressed on one
//! node never reaches the calls on another. [`EngineBuilder::redis`] makes every
//! engine that shares one Redis (and key prefix) behave as one:
//!
//! - **cancel everywhere**: `cancel_user` and `cancel_run` on any node reach the calls
//!   on every node (pub/sub on `{prefix}:signals`, re-subscribed by itself after
//!   Redis comes back); [`CancelReport`](crate::CancelReport) says what was cancelled
//!   here and that the other nodes were told;
//! - **approvals answered anywhere**: a call waiting for approval is recorded as
//!   `{prefix}:u{<user>}:approval:<call>` → its node; `resolve_approval` on any node
//!   takes that key (one Lua `GET`+`DEL`, so exactly one answer wins) and the
//!   decision travels to the node that holds the call. A call out of time takes its
//!   own key back first, and waits a moment for an answer someone else already took;
//! - **one rate per user**: each user's rate is checked in Redis, with the same GCRA
//!   as the local limiter (burst, `retry_after` and refill alike), in one Lua script
//!   run with the Redis server's clock (`TIME`), so the nodes' clocks do not matter.
//!   The script is loaded once and called by its hash;
//! - **one concurrency limit per user**: each of a user's slots is a lease in the
//!   sorted set `{prefix}:u{<user>}:slots` (member → expiry on the server's clock),
//!   taken by a Lua script only while fewer than the limit are unexpired, renewed
//!   every third of [`RedisConfig::lease`] while the call holds it, removed when it
//!   ends. A node that dies stops renewing: its slots are free again within one lease.
//!   Waiting for one is bounded by the same `max_wait`, then `busy`;
//! - **optionally, one concurrency limit for the cluster**
//!   ([`RedisConfig::cluster_concurrency`]): the same leases in
//!   `{prefix}:global:slots`, each held with one of the node's own engine-wide slots;
//! - **run logs on Redis Streams**: [`RunLog::redis`](crate::RunLog::redis) keeps
//!   each run's frames in the stream `{prefix}:u{<user>}:run:<run>`, each `seq`
//!   assigned in Redis with its append, so a client resumes its run on any node; see
//!   [`RunLog::redis`](crate::RunLog::redis) for the bounds, the shared epoch and
//!   what happens while Redis is away.
//!
//! When Redis cannot be reached (down, restarting, partitioned), every call to it is
//! bounded by [`RedisConfig::timeout`] and the engine follows
//! [`RedisConfig::on_unreachable`]: fail closed (the call ends `unavailable` with its
//! paired events and a `retry_after`) or fall back to this node's own limiter. Either
//! way it is counted ([`RedisStats`]) and [`Engine::health`](crate::Engine::health)
//! says why; the connection is re-established by itself once Redis is back.
//!
//! Keys: `{prefix}:u{<user id>}:rate`, `…:slots`, `…:approval:<call id>`,
//! `…:run:<run id>` (a stream), `…:runs` (the user's runs by last append),
//! `…:seen:<run id>` (a node follows the run), `{prefix}:global:slots`,
//! `{prefix}:runlog:epoch`, `{prefix}:node:<node>:wake`, and the channel
//! `{prefix}:signals`. The user id is escaped so that its `{…}` is the key's Redis
//! Cluster hash tag: one user's keys live on one slot.
//!
//! With [`RedisConfig::local_precheck`] (on by default), a call this node's own
//! bucket refuses is refused without a round trip; a user who keeps retrying on one
//! node while over the shared quota may then wait a little longer than the shared
//! bucket alone would make them.
//!
//! Not shared: the per-tool slots stay each node's own. While Redis is unreachable,
//! an approval can be answered only on the node where the call waits.
//!
//! ```no_run
//! # async fn f(registry: tool_dispatch::Registry) -> Result<(), Box<dyn std::error::Error>> {
//! use tool_dispatch::Engine;
//! use tool_dispatch::redis::{OnUnreachable, Redis, RedisConfig};
//! let config = RedisConfig::default().on_unreachable(OnUnreachable::UseLocalLimits);
//! let redis = Redis::connect("redis://127.0.0.1:6379", config).await?;
//! let engine = Engine::builder(registry).redis(&redis).build();
//! # let _ = engine; Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use std::sync::Weak;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod log;

use crate::approval::Verdict;
use crate::engine::{Claim, Engine, EngineBuilder, Inner, Peers, Shared as Attach, Signal};
use crate::limits::{
    Limiter, LocalLimiter, NoSlot, Permit, RateCheck, RateRefusal, Scope, UserState,
};

/// GCRA with the server's clock, in microseconds (below 2^53, exact in Lua's doubles).
/// KEYS[1]: the user's bucket. ARGV: emission interval, burst tolerance (µs).
/// Returns `{1, 0}` when admitted, `{0, retry_after_us}` when not.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, 0}
";

/// Takes a pending approval: returns the node that holds the call and deletes the
/// key, so that exactly one claim ever gets it; `nil` when there is none.
const CLAIM: &str = r"
local owner = redis.call('GET', KEYS[1])
if not owner then return false end
redis.call('DEL', KEYS[1])
return owner
";

/// Takes one of a user's slots if fewer than ARGV[1] unexpired leases are held.
/// KEYS[1]: the user's sorted set of leases (member → expiry, server ms).
/// ARGV: the limit, the lease length (ms), the lease's name. Returns 1 or 0.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
";

/// Extends a held lease (ARGV: lease length in ms, the lease's name); 1 when it was
/// still held, 0 when it had expired meanwhile.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
";

/// What the engine does when Redis cannot answer in time.
///
/// ```
/// use tool_dispatch::redis::OnUnreachable;
/// assert_eq!(OnUnreachable::default(), OnUnreachable::FailClosed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnUnreachable {
    /// The call ends `unavailable` (`DispatchError::LimitsUnavailable`) with its
    /// paired events and a `retry_after`: nobody exceeds a limit, nobody is served.
    #[default]
    FailClosed,
    /// This node's own limiter decides meanwhile: everyone is served, a user may get
    /// up to one quota per node.
    UseLocalLimits,
}

/// How the engine uses Redis.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::redis::RedisConfig;
/// let c = RedisConfig::default().prefix("chat").timeout(Duration::from_millis(100));
/// # let _ = c;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    prefix: String,
    timeout: Duration,
    on_unreachable: OnUnreachable,
    local_precheck: bool,
    lease: Duration,
    cluster_concurrency: Option<usize>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: "tool-dispatch".into(),
            timeout: Duration::from_millis(250),
            on_unreachable: OnUnreachable::default(),
            local_precheck: true,
            lease: Duration::from_secs(10),
            cluster_concurrency: None,
        }
    }
}

impl RedisConfig {
    /// The first part of every key (default `tool-dispatch`), so several
    /// applications can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest any call to Redis may take, connecting included (default 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis cannot answer (default [`OnUnreachable::FailClosed`]).
    pub fn on_unreachable(mut self, policy: OnUnreachable) -> Self {
        self.on_unreachable = policy;
        self
    }

    /// How long a concurrency slot's lease lasts without renewal (default 10 s; at
    /// least 3 ms). A held slot is renewed every third of it; the slots of a node
    /// that dies are free again within this time.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Calls in flight across every node on this Redis and prefix (default: no such
    /// limit). Each slot is a lease like a user's; a call holds one of its node's own
    /// engine-wide slots ([`Limits::global`](crate::Limits::global)) too. Waiting
    /// for one is bounded by the same `max_wait`, then `busy` with the global scope.
    pub fn cluster_concurrency(mut self, limit: usize) -> Self {
        self.cluster_concurrency = Some(limit.max(1));
        self
    }

    /// Whether a call this node's own bucket already refuses is refused without
    /// asking Redis (default on): a user over the quota on one node is over it
    /// everywhere, so abuse is shed without a round trip.
    pub fn local_precheck(mut self, on: bool) -> Self {
        self.local_precheck = on;
        self
    }
}

/// Why [`Redis::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The URL is not a Redis URL.
    #[error("not a Redis URL: {0}")]
    BadUrl(String),
    /// Redis did not answer within the timeout, or refused the connection.
    #[error("cannot reach Redis: {0}")]
    Unreachable(String),
}

/// What the Redis limiter has seen.
///
/// ```no_run
/// # fn f(redis: &tool_dispatch::redis::Redis) {
/// let s = redis.stats();
/// println!("{} answers, {} failures, {} fallbacks", s.answers, s.failures, s.fallbacks);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisStats {
    /// Requests Redis answered (rate checks, slot leases).
    pub answers: u64,
    /// Requests Redis did not answer in time (or answered with an error).
    pub failures: u64,
    /// Of those, the ones this node's own limiter decided instead.
    pub fallbacks: u64,
    /// Calls refused by the local pre-check without asking Redis.
    pub shed_locally: u64,
    /// Frames a shared run log recorded in Redis.
    pub log_appends: u64,
    /// Frames a shared run log could not record (Redis unreachable): the calls went
    /// on and their callers had their results; the runs' readers were told to resync.
    pub log_failures: u64,
    /// The last failure, if the last rate check failed.
    pub last_error: Option<String>,
}

/// A connection to the Redis that several engines share. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    /// For the connections that block (the run logs' reader).
    client: ::redis::Client,
    /// This process's name among the nodes, to ignore its own signals.
    node: String,
    /// `{prefix}:signals`: cancellations told to every node.
    channel: String,
    /// The engines built with this handle, told of the other nodes' signals.
    engines: Mutex<Vec<Weak<Inner>>>,
    /// Stops the listener when the last handle goes.
    stop: CancellationToken,
    config: RedisConfig,
    script: ::redis::Script,
    claim: ::redis::Script,
    acquire: ::redis::Script,
    renew: ::redis::Script,
    /// Names this node's leases.
    leases: AtomicU64,
    answers: AtomicU64,
    failures: AtomicU64,
    fallbacks: AtomicU64,
    shed: AtomicU64,
    log_appends: AtomicU64,
    log_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`), within the config's timeout. The
    /// connection is re-established by itself if Redis goes away later.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Redis, RedisError> {
        let client = ::redis::Client::open(url).map_err(|e| RedisError::BadUrl(e.to_string()))?;
        let client_for_pubsub = client.clone();
        let client_for_logs = client.clone();
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connect = ConnectionManager::new_with_config(client, manager);
        let conn = match tokio::time::timeout(config.timeout.saturating_mul(4), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(RedisError::Unreachable(e.to_string())),
            Err(_) => return Err(RedisError::Unreachable("timed out".into())),
        };
        let node = format!(
            "{:016x}",
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id())
        );
        let channel = format!("{}:signals", config.prefix);
        let pubsub = listen(&client_for_pubsub, &channel, config.timeout)
            .await
            .map_err(RedisError::Unreachable)?;
        let redis = Redis {
            inner: Arc::new(Shared {
                conn,
                client: client_for_logs,
                node,
                channel,
                engines: Mutex::default(),
                stop: CancellationToken::new(),
                config,
                script: ::redis::Script::new(GCRA),
                claim: ::redis::Script::new(CLAIM),
                acquire: ::redis::Script::new(ACQUIRE),
                renew: ::redis::Script::new(RENEW),
                leases: AtomicU64::new(0),
                answers: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                shed: AtomicU64::new(0),
                log_appends: AtomicU64::new(0),
                log_failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        };
        tokio::spawn(follow(
            client_for_pubsub,
            pubsub,
            Arc::downgrade(&redis.inner),
        ));
        Ok(redis)
    }

    /// What this handle has seen so far.
    pub fn stats(&self) -> RedisStats {
        let s = &self.inner;
        RedisStats {
            answers: s.answers.load(Relaxed),
            failures: s.failures.load(Relaxed),
            fallbacks: s.fallbacks.load(Relaxed),
            shed_locally: s.shed.load(Relaxed),
            log_appends: s.log_appends.load(Relaxed),
            log_failures: s.log_failures.load(Relaxed),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

impl EngineBuilder {
    /// Checks each user's rate in `redis`, and shares `cancel_user` and `cancel_run`
    /// with every engine built on the same Redis and prefix, in this process or
    /// another; see [the module](crate::redis).
    pub fn redis(self, redis: &Redis) -> Self {
        let (for_limiter, for_peers, for_build) = (redis.clone(), redis.clone(), redis.clone());
        self.shared(Attach {
            limiter: Box::new(move |local| {
                Box::new(RedisLimiter {
                    local,
                    redis: for_limiter,
                }) as Box<dyn Limiter>
            }),
            peers: Box::new(for_peers),
            on_build: Box::new(move |engine: &Engine| {
                let mut engines = for_build
                    .inner
                    .engines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                engines.retain(|e| e.strong_count() > 0);
                engines.push(engine.downgrade());
            }),
        })
    }
}

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
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let Ok(payload) = serde_json::to_string(wire) else {
            return false;
        };
        let s = &self.inner;
        let (mut conn, channel, timeout) = (s.conn.clone(), s.channel.clone(), s.config.timeout);
        rt.spawn(async move {
            let mut cmd = ::redis::cmd("PUBLISH");
            cmd.arg(&channel).arg(&payload);
            let sent = tokio::time::timeout(timeout, cmd.query_async::<i64>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(_))) {
                tracing::warn!(signal = %payload, "the other nodes could not be told");
            }
        });
        true
    }

    /// Runs `cmd` within the timeout, ignoring its answer (best effort).
    async fn run(&self, cmd: ::redis::Cmd) -> bool {
        let mut conn = self.inner.conn.clone();
        let sent = tokio::time::timeout(
            self.inner.config.timeout,
            cmd.query_async::<::redis::Value>(&mut conn),
        );
        matches!(sent.await, Ok(Ok(_)))
    }
}

impl Peers for Redis {
    fn tell(&self, signal: Signal) -> bool {
        let (kind, user, run) = match signal {
            Signal::CancelUser(user) => ("cancel_user", user, None),
            Signal::CancelRun(user, run) => ("cancel_run", user, Some(run)),
        };
        self.publish(&Wire {
            node: self.inner.node.clone(),
            kind: kind.into(),
            user,
            run,
            ..Wire::default()
        })
    }

    fn pending<'a>(&'a self, user: &'a str, call: &'a str, ttl: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let s = &self.inner;
            let mut cmd = ::redis::cmd("SET");
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            cmd.arg(approval_key(&s.config.prefix, user, call))
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
            let s = &self.inner;
            let mut conn = s.conn.clone();
            let mut invoke = s.claim.prepare_invoke();
            invoke.key(approval_key(&s.config.prefix, user, call));
            let owner = tokio::time::timeout(
                s.config.timeout,
                invoke.invoke_async::<Option<String>>(&mut conn),
            );
            match owner.await {
                Ok(Ok(Some(node))) if node == s.node => Claim::Here,
                Ok(Ok(Some(node))) => Claim::Elsewhere(node),
                Ok(Ok(None)) => Claim::Nobody,
                _ => Claim::Unreachable,
            }
        })
    }

    fn deliver(&self, node: &str, user: &str, call: &str, verdict: Verdict) -> bool {
        let (approve, message) = match verdict {
            Verdict::Approve => (true, None),
            Verdict::Reject { message } => (false, message),
        };
        self.publish(&Wire {
            node: self.inner.node.clone(),
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
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let redis = self.clone();
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(approval_key(&self.inner.config.prefix, user, call));
        rt.spawn(async move {
            redis.run(cmd).await;
        });
    }
}

/// A subscription to `channel`, within `timeout`.
async fn listen(
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
async fn follow(client: ::redis::Client, first: ::redis::aio::PubSub, shared: Weak<Shared>) {
    let (stop, channel, timeout) = match shared.upgrade() {
        Some(s) => (s.stop.clone(), s.channel.clone(), s.config.timeout),
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
                match listen(&client, &channel, timeout).await {
                    Ok(p) => p,
                    Err(_) => {
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        backoff = Duration::from_millis(100);
        let mut messages = current.into_on_message();
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = messages.next() => m,
            };
            let Some(msg) = msg else { break }; // the connection dropped: re-subscribe
            let Some(s) = shared.upgrade() else { return };
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

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `{prefix}:u{<user>}:rate`.
fn rate_key(prefix: &str, user: &str) -> String {
    user_key(prefix, user, "rate")
}

/// `{prefix}:u{<user>}:approval:<call>`: where the call waits for approval.
fn approval_key(prefix: &str, user: &str, call: &str) -> String {
    user_key(prefix, user, &format!("approval:{call}"))
}

/// `{prefix}:u{<user>}:<what>`, with `%`, `{` and `}` escaped in the user id so that
/// the braces delimit the hash tag and two ids never share a key.
fn user_key(prefix: &str, user: &str, what: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + user.len() + what.len() + 6);
    key.push_str(prefix);
    key.push_str(":u{");
    for c in user.chars() {
        match c {
            '%' => key.push_str("%25"),
            '{' => key.push_str("%7B"),
            '}' => key.push_str("%7D"),
            c => key.push(c),
        }
    }
    key.push_str("}:");
    key.push_str(what);
    key
}

struct RedisLimiter {
    local: LocalLimiter,
    redis: Redis,
}

impl RedisLimiter {
    async fn ask(&self, user: &UserState, now: Instant) -> Result<(), RateRefusal> {
        let Some(gcra) = &user.rate else {
            return Ok(());
        };
        let s = &self.redis.inner;
        let prechecked = s.config.local_precheck;
        if prechecked && let Err(refusal) = self.local.rate_here(user, now) {
            // Over the quota on this node alone: over it everywhere.
            s.shed.fetch_add(1, Relaxed);
            return Err(refusal);
        }
        self.remote(user, gcra, prechecked).await
    }

    /// The shared bucket's answer, or the policy's when Redis cannot give one.
    /// `prechecked`: this node's own bucket has admitted the call already.
    async fn remote(
        &self,
        user: &UserState,
        gcra: &crate::limits::Gcra,
        prechecked: bool,
    ) -> Result<(), RateRefusal> {
        let s = &self.redis.inner;
        let (interval_us, tolerance_us) = gcra.micros();
        let mut conn = s.conn.clone();
        let key = rate_key(&s.config.prefix, &user.user_id);
        let mut call = s.script.prepare_invoke();
        call.key(key).arg(interval_us).arg(tolerance_us);
        let answer: Result<(i64, i64), String> =
            match tokio::time::timeout(s.config.timeout, call.invoke_async(&mut conn)).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", s.config.timeout)),
            };
        let mut last = s.last_error.lock().unwrap_or_else(PoisonError::into_inner);
        match answer {
            Ok((1, _)) => {
                s.answers.fetch_add(1, Relaxed);
                *last = None;
                Ok(())
            }
            Ok((_, retry_us)) => {
                s.answers.fetch_add(1, Relaxed);
                *last = None;
                let retry = Duration::from_micros(u64::try_from(retry_us).unwrap_or(0));
                Err(RateRefusal::Limited(retry))
            }
            Err(e) => {
                s.failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "the shared rate limit could not be checked");
                *last = Some(e);
                drop(last);
                match s.config.on_unreachable {
                    OnUnreachable::FailClosed => Err(RateRefusal::Unreachable {
                        retry_after: Duration::from_secs(1),
                    }),
                    OnUnreachable::UseLocalLimits => {
                        s.fallbacks.fetch_add(1, Relaxed);
                        match prechecked {
                            true => Ok(()), // counted in the pre-check already
                            false => self.local.rate_here(user, Instant::now()),
                        }
                    }
                }
            }
        }
    }

    /// One of `user`'s slots: a lease in `{prefix}:u{<user>}:slots`, asked for until
    /// `until`, renewed while held, released when dropped.
    async fn user_slot<'a>(
        &'a self,
        user: &'a UserState,
        until: Instant,
    ) -> Result<Permit<'a>, NoSlot> {
        let key = user_key(&self.redis.inner.config.prefix, &user.user_id, "slots");
        match self.lease(key, user.concurrency, until).await {
            Ok(lease) => Ok(Permit::Shared(Box::new(Box::new(lease)))),
            Err(None) => Err(NoSlot::InTime),
            Err(Some(e)) => self.slot_unreachable(user, until, e).await,
        }
    }

    /// One of the cluster's slots (`{prefix}:global:slots`, `limit` of them), on top
    /// of one of this node's own engine-wide slots.
    async fn cluster_slot<'a>(
        &'a self,
        limit: usize,
        until: Instant,
    ) -> Result<Permit<'a>, NoSlot> {
        let here = self.local.slot(Scope::Global, until).await?;
        let key = format!("{}:global:slots", self.redis.inner.config.prefix);
        match self.lease(key, limit, until).await {
            Ok(lease) => Ok(Permit::Shared(Box::new(Box::new((here, lease))))),
            Err(None) => Err(NoSlot::InTime),
            Err(Some(e)) => {
                let s = &self.redis.inner;
                s.failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "a cluster-wide slot could not be leased");
                *s.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                match s.config.on_unreachable {
                    OnUnreachable::FailClosed => Err(NoSlot::Unreachable {
                        retry_after: Duration::from_secs(1),
                    }),
                    OnUnreachable::UseLocalLimits => {
                        s.fallbacks.fetch_add(1, Relaxed);
                        Ok(here)
                    }
                }
            }
        }
    }

    /// A lease in the sorted set `key` while fewer than `limit` are held, asked for
    /// until `until`, renewed while held, released when dropped. `Err(None)`: none
    /// became free in time; `Err(Some(why))`: Redis could not be asked.
    async fn lease(
        &self,
        key: String,
        limit: usize,
        until: Instant,
    ) -> Result<Lease, Option<String>> {
        let s = &self.redis.inner;
        let member = format!("{}:{}", s.node, s.leases.fetch_add(1, Relaxed));
        let lease_ms = u64::try_from(s.config.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(3);
        let mut pause = Duration::from_millis(2);
        loop {
            let mut conn = s.conn.clone();
            let mut invoke = s.acquire.prepare_invoke();
            invoke.key(&key).arg(limit).arg(lease_ms).arg(&member);
            let got =
                tokio::time::timeout(s.config.timeout, invoke.invoke_async::<i64>(&mut conn)).await;
            match got {
                Ok(Ok(1)) => {
                    s.answers.fetch_add(1, Relaxed);
                    return Ok(Lease::hold(self.redis.clone(), key, member, lease_ms));
                }
                Ok(Ok(_)) => s.answers.fetch_add(1, Relaxed),
                Ok(Err(e)) => return Err(Some(e.to_string())),
                Err(_) => return Err(Some(format!("no answer within {:?}", s.config.timeout))),
            };
            let now = Instant::now();
            if now >= until {
                return Err(None);
            }
            tokio::time::sleep_until((now + pause).min(until)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The policy's answer when Redis cannot lease a slot.
    async fn slot_unreachable<'a>(
        &'a self,
        user: &'a UserState,
        until: Instant,
        error: String,
    ) -> Result<Permit<'a>, NoSlot> {
        let s = &self.redis.inner;
        s.failures.fetch_add(1, Relaxed);
        tracing::warn!(error = %error, "a shared concurrency slot could not be leased");
        *s.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        match s.config.on_unreachable {
            OnUnreachable::FailClosed => Err(NoSlot::Unreachable {
                retry_after: Duration::from_secs(1),
            }),
            OnUnreachable::UseLocalLimits => {
                s.fallbacks.fetch_add(1, Relaxed);
                self.local.slot(Scope::User(user), until).await
            }
        }
    }
}

/// A held lease: renewed every third of its length while held; released (without
/// waiting) when dropped. A process that dies stops renewing: its leases expire.
struct Lease {
    redis: Redis,
    key: String,
    member: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn hold(redis: Redis, key: String, member: String, lease_ms: u64) -> Lease {
        let (r, k, m) = (redis.clone(), key.clone(), member.clone());
        let renew = tokio::spawn(async move {
            let every = Duration::from_millis(lease_ms / 3);
            loop {
                tokio::time::sleep(every).await;
                let s = &r.inner;
                let mut conn = s.conn.clone();
                let mut invoke = s.renew.prepare_invoke();
                invoke.key(&k).arg(lease_ms).arg(&m);
                let renewed =
                    tokio::time::timeout(s.config.timeout, invoke.invoke_async::<i64>(&mut conn));
                if !matches!(renewed.await, Ok(Ok(1))) {
                    tracing::warn!(lease = %m, "a concurrency lease could not be renewed");
                }
            }
        });
        Lease {
            redis,
            key,
            member,
            renew,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // it expires
        };
        let redis = self.redis.clone();
        let mut cmd = ::redis::cmd("ZREM");
        cmd.arg(&self.key).arg(&self.member);
        rt.spawn(async move {
            redis.run(cmd).await;
        });
    }
}

impl Limiter for RedisLimiter {
    fn answers_now(&self) -> bool {
        false
    }

    fn rate<'a>(&'a self, user: &'a UserState, now: Instant) -> RateCheck<'a> {
        if user.rate.is_none() {
            return RateCheck::Now(Ok(()));
        }
        RateCheck::Later(Box::pin(self.ask(user, now)))
    }

    fn try_slot<'a>(&'a self, scope: &Scope<'a>) -> Option<Permit<'a>> {
        match scope {
            // A user's slots are leases in Redis: always asked for (and waited on);
            // so are the cluster's, when it has a limit.
            Scope::User(u) if !u.local_only => None,
            Scope::Global if self.redis.inner.config.cluster_concurrency.is_some() => None,
            _ => self.local.try_slot(scope),
        }
    }

    fn slot<'a>(
        &'a self,
        scope: Scope<'a>,
        until: Instant,
    ) -> BoxFuture<'a, Result<Permit<'a>, NoSlot>> {
        match scope {
            Scope::User(user) if !user.local_only => Box::pin(self.user_slot(user, until)),
            Scope::Global => match self.redis.inner.config.cluster_concurrency {
                Some(limit) => Box::pin(self.cluster_slot(limit, until)),
                None => self.local.slot(scope, until),
            },
            _ => self.local.slot(scope, until),
        }
    }

    fn saturation(&self) -> f64 {
        self.local.saturation()
    }

    fn probe(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let s = &self.redis.inner;
            let mut conn = s.conn.clone();
            let cmd = ::redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            let error = match tokio::time::timeout(s.config.timeout, ping).await {
                Ok(Ok(_)) => return None,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", s.config.timeout),
            };
            let policy = match s.config.on_unreachable {
                OnUnreachable::FailClosed => "calls that have a rate limit end `unavailable`",
                OnUnreachable::UseLocalLimits => "this node's own limits apply meanwhile",
            };
            Some(format!("Redis is unreachable ({error}); {policy}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_escaped_into_one_hash_tag_and_never_collide() {
        assert_eq!(rate_key("p", "alice"), "p:u{alice}:rate");
        assert_eq!(rate_key("p", "a}b{c%"), "p:u{a%7Db%7Bc%25}:rate");
        assert_ne!(rate_key("p", "%7D"), rate_key("p", "}"));
    }
}
