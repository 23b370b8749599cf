//! Redis integration (feature `redis`): several nodes as one.
//!
//! Several replicas of a back end behind a load balancer each keep their own books:
//! a user with two tabs on two nodes gets twice the rate, and "stop" pressed on one
//! node never reaches the calls on another. [`EngineBuilder::redis`] makes every
//! engine that shares one Redis (and key prefix) behave as one:
//!
//! - **cancel everywhere**: `cancel_user` and `cancel_run` on any node reach the calls
//!   on every node (pub/sub, re-subscribed by itself after Redis comes back);
//!   [`CancelReport`](crate::CancelReport) says what was cancelled here and that the
//!   other nodes were told;
//! - **approvals answered anywhere**: a call waiting for approval is recorded with
//!   its node; `resolve_approval` on any node takes that record (one Lua `GET`+`DEL`,
//!   so exactly one answer wins) and the decision travels to the node that holds the
//!   call. A call out of time takes its own record back first, and waits a moment for
//!   an answer someone else already took;
//! - **one rate per user**: each user's rate is checked in Redis, with the same GCRA
//!   as the local limiter (burst, `retry_after` and refill alike), in one Lua script
//!   run with the Redis server's clock (`TIME`), so the nodes' clocks do not matter.
//!   The script is loaded once and called by its hash;
//! - **one concurrency limit per user**: each of a user's slots is a lease in a
//!   sorted set (member → expiry on the server's clock), taken by a Lua script only
//!   while fewer than the limit are unexpired, renewed every third of
//!   [`RedisConfig::lease`] while the call holds it, removed when it ends. A node
//!   that dies stops renewing: its slots are free again within one lease. Waiting
//!   for one is bounded by the same `max_wait`, then `busy`;
//! - **optionally, one concurrency limit for the cluster**
//!   ([`RedisConfig::cluster_concurrency`]): the same leases, each held with one of
//!   the node's own engine-wide slots;
//! - **run logs on Redis Streams**: [`RunLog::redis`](crate::RunLog::redis) keeps
//!   each run's frames in a stream, each `seq` assigned in Redis with its append, so a
//!   client resumes its run on any node; see [`RunLog::redis`](crate::RunLog::redis)
//!   for the bounds, the shared epoch and what happens while Redis is away.
//!
//! When Redis cannot be reached (down, restarting, partitioned), every call to it is
//! bounded by [`RedisConfig::timeout`] and the engine follows
//! [`RedisConfig::on_unreachable`]: fail closed (the call ends `unavailable` with its
//! paired events and a `retry_after`) or fall back to this node's own limiter. Either
//! way it is counted ([`RedisStats`]) and [`Engine::health`](crate::Engine::health)
//! says why; the connection is re-established by itself once Redis is back.
//!
//! Every key lives under [`RedisConfig::prefix`]; the user id is escaped into the
//! key's Redis Cluster hash tag, so one user's keys live on one slot. The keys and
//! what each holds are listed once, in the key table of `docs/several-nodes.md`.
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

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

mod circuit;
mod config;
mod keys;
mod lease;
mod limiter;
mod log;
mod peers;
mod scripts;
mod stats;

pub use config::{OnUnreachable, RedisConfig};
pub use stats::RedisStats;

use crate::engine::{Engine, EngineBuilder, Inner, Shared as Attach};
use crate::limits::Limiter;
use circuit::Circuit;
use keys::Keys;
use lease::Leases;
use limiter::RedisLimiter;
use scripts::Scripts;
use stats::Counters;

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

/// A connection to the Redis that several engines share. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    link: Arc<Link>,
}

/// One node's link to Redis, shared by its engines and run logs.
struct Link {
    conn: ConnectionManager,
    /// For the connections that block (the run logs' reader) or subscribe.
    client: ::redis::Client,
    /// This process's name among the nodes, to ignore its own signals.
    node: String,
    keys: Keys,
    scripts: Scripts,
    /// The engines built with this handle, told of the other nodes' signals.
    engines: Mutex<Vec<Weak<Inner>>>,
    /// Stops the listener and the run logs' tasks when the last handle goes.
    stop: CancellationToken,
    config: RedisConfig,
    /// Names this node's leases.
    leases_named: AtomicU64,
    counters: Counters,
    /// Whether the limiter asks Redis (with `UseLocalLimits`): opened by any failed
    /// request, closed by any answer.
    circuit: Circuit,
    /// The leases this node holds and gives back.
    leases: Leases,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("config", &self.link.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`) and subscribes to the other nodes'
    /// signals, within four times the config's timeout in all (a connection is tried
    /// up to three times). The connections are re-established by themselves if Redis
    /// goes away later.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Redis, RedisError> {
        let client = ::redis::Client::open(url).map_err(|e| RedisError::BadUrl(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + config.timeout.saturating_mul(4);
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connect = ConnectionManager::new_with_config(client.clone(), manager);
        let conn = match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(RedisError::Unreachable(e.to_string())),
            Err(_) => return Err(RedisError::Unreachable("timed out".into())),
        };
        let node = format!(
            "{:016x}",
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id())
        );
        let keys = Keys::new(&config.prefix);
        let signals = keys.signals();
        let subscribe = peers::subscribe(&client, &signals, config.timeout);
        let pubsub = match tokio::time::timeout_at(deadline, subscribe).await {
            Ok(subscribed) => subscribed.map_err(RedisError::Unreachable)?,
            Err(_) => return Err(RedisError::Unreachable("timed out".into())),
        };
        let redis = Redis {
            link: Arc::new(Link {
                conn,
                client,
                node,
                keys,
                scripts: Scripts::new(),
                engines: Mutex::default(),
                stop: CancellationToken::new(),
                config,
                leases_named: AtomicU64::new(0),
                counters: Counters::default(),
                circuit: Circuit::new(),
                leases: Leases::default(),
            }),
        };
        tokio::spawn(peers::listen(pubsub, Arc::downgrade(&redis.link)));
        Ok(redis)
    }

    /// What this handle has seen so far.
    pub fn stats(&self) -> RedisStats {
        self.link.counters.snapshot()
    }

    /// The answer to one request (a command, a script or a pipeline: one round trip
    /// on `conn`), within the timeout, counted; why there is none otherwise. Every
    /// request of every part goes through here (or [`ask_within`](Self::ask_within)).
    async fn ask<T>(
        &self,
        request: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, String> {
        self.ask_within(self.link.config.timeout, request).await
    }

    /// [`ask`](Self::ask) with a longer limit, for a read that blocks on purpose.
    async fn ask_within<T>(
        &self,
        limit: Duration,
        request: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, String> {
        let (counters, circuit) = (&self.link.counters, &self.link.circuit);
        counters.sent();
        match tokio::time::timeout(limit, request).await {
            Ok(Ok(answer)) => {
                counters.answered();
                circuit.close();
                lease::release(self); // what could not be given back before
                Ok(answer)
            }
            Ok(Err(e)) => {
                circuit.open();
                Err(counters.error(&e))
            }
            Err(_) => {
                circuit.open();
                Err(counters.timed_out(limit))
            }
        }
    }

    /// Runs `pipe`, whose requests all call `script`, loading the script first if
    /// Redis started afresh since it was loaded (nothing ran then).
    async fn scripted<T: ::redis::FromRedisValue>(
        &self,
        script: &::redis::Script,
        pipe: &::redis::Pipeline,
    ) -> ::redis::RedisResult<T> {
        let mut conn = self.conn();
        match pipe.query_async::<T>(&mut conn).await {
            Err(e)
                if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
            {
                script.load_async(&mut conn).await?;
                pipe.query_async::<T>(&mut conn).await
            }
            other => other,
        }
    }

    /// The shared connection (a handle: cheap to clone, multiplexed, re-established
    /// by itself after Redis comes back).
    fn conn(&self) -> ConnectionManager {
        self.link.conn.clone()
    }

    /// Runs `cmd` within the timeout, ignoring its answer (best effort).
    async fn run(&self, cmd: ::redis::Cmd) -> bool {
        let mut conn = self.conn();
        let sent = self.ask(cmd.query_async::<::redis::Value>(&mut conn));
        sent.await.is_ok()
    }

    /// Runs `cmd` on a task of its own, within the timeout (best effort: `failed` is
    /// logged if Redis cannot run it); `false` outside a runtime.
    fn run_later(&self, cmd: ::redis::Cmd, failed: &'static str) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let redis = self.clone();
        rt.spawn(async move {
            if !redis.run(cmd).await {
                tracing::warn!("{failed}");
            }
        });
        true
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.cancel();
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
                Box::new(RedisLimiter::new(local, for_limiter)) as Box<dyn Limiter>
            }),
            peers: Box::new(for_peers),
            on_build: Box::new(move |engine: &Engine| {
                let mut engines = for_build
                    .link
                    .engines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                engines.retain(|e| e.strong_count() > 0);
                engines.push(engine.downgrade());
            }),
        })
    }
}
