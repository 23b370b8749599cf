//! The limiter that shares each user's rate and slots (and, optionally, the
//! cluster's slots) through Redis, and follows the policy when Redis cannot answer.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::lease::Lease;
use super::{OnUnreachable, Redis};
use crate::limits::{
    Gcra, Limiter, LocalLimiter, NoSlot, Permit, RateCheck, RateRefusal, Scope, UserState,
};

/// What a call refused because Redis cannot answer is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(super) struct RedisLimiter {
    local: LocalLimiter,
    redis: Redis,
}

impl RedisLimiter {
    pub(super) fn new(local: LocalLimiter, redis: Redis) -> RedisLimiter {
        RedisLimiter { local, redis }
    }

    async fn ask(&self, user: &UserState, now: Instant) -> Result<(), RateRefusal> {
        let Some(gcra) = &user.rate else {
            return Ok(());
        };
        let s = &self.redis.link;
        let prechecked = s.config.local_precheck;
        if prechecked && let Err(refusal) = self.local.rate_here(user, now) {
            // Over the quota on this node alone: over it everywhere.
            s.counters.shed.fetch_add(1, Relaxed);
            return Err(refusal);
        }
        self.remote(user, gcra, prechecked).await
    }

    /// The shared bucket's answer, or the policy's when Redis cannot give one.
    /// `prechecked`: this node's own bucket has admitted the call already.
    async fn remote(
        &self,
        user: &UserState,
        gcra: &Gcra,
        prechecked: bool,
    ) -> Result<(), RateRefusal> {
        let s = &self.redis.link;
        let (interval_us, tolerance_us) = gcra.micros();
        let mut conn = self.redis.conn();
        let mut call = s.scripts.gcra.prepare_invoke();
        call.key(s.keys.rate(&user.user_id))
            .arg(interval_us)
            .arg(tolerance_us);
        let answer = self
            .redis
            .ask(call.invoke_async::<(i64, i64)>(&mut conn))
            .await;
        let error = match answer {
            Ok((1, _)) => {
                s.counters.answers.fetch_add(1, Relaxed);
                return Ok(());
            }
            Ok((_, retry_us)) => {
                s.counters.answers.fetch_add(1, Relaxed);
                let retry = Duration::from_micros(u64::try_from(retry_us).unwrap_or(0));
                return Err(RateRefusal::Limited(retry));
            }
            Err(e) => e,
        };
        s.counters.failures.fetch_add(1, Relaxed);
        tracing::warn!(error = %error, "the shared rate limit could not be checked");
        match s.config.on_unreachable {
            OnUnreachable::FailClosed => Err(RateRefusal::Unreachable {
                retry_after: RETRY_AFTER,
            }),
            OnUnreachable::UseLocalLimits => {
                s.counters.fallbacks.fetch_add(1, Relaxed);
                match prechecked {
                    true => Ok(()), // counted in the pre-check already
                    false => self.local.rate_here(user, Instant::now()),
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
        let key = self.redis.link.keys.slots(&user.user_id);
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
        let key = self.redis.link.keys.global_slots();
        match self.lease(key, limit, until).await {
            Ok(lease) => Ok(Permit::Shared(Box::new(Box::new((here, lease))))),
            Err(None) => Err(NoSlot::InTime),
            Err(Some(e)) => {
                let s = &self.redis.link;
                s.counters.failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "a cluster-wide slot could not be leased");
                match s.config.on_unreachable {
                    OnUnreachable::FailClosed => Err(NoSlot::Unreachable {
                        retry_after: RETRY_AFTER,
                    }),
                    OnUnreachable::UseLocalLimits => {
                        s.counters.fallbacks.fetch_add(1, Relaxed);
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
        let s = &self.redis.link;
        let member = format!("{}:{}", s.node, s.leases.fetch_add(1, Relaxed));
        let lease_ms = u64::try_from(s.config.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(3);
        let mut pause = Duration::from_millis(2);
        loop {
            let mut conn = self.redis.conn();
            let mut invoke = s.scripts.acquire.prepare_invoke();
            invoke.key(&key).arg(limit).arg(lease_ms).arg(&member);
            match self.redis.ask(invoke.invoke_async::<i64>(&mut conn)).await {
                Ok(1) => {
                    s.counters.answers.fetch_add(1, Relaxed);
                    return Ok(Lease::hold(self.redis.clone(), key, member, lease_ms));
                }
                Ok(_) => s.counters.answers.fetch_add(1, Relaxed),
                Err(e) => {
                    // Redis may still take the lease once it answers again: give it
                    // back then, rather than hold a slot nobody renews for a lease.
                    Lease::give_back(&self.redis, key, member);
                    return Err(Some(e));
                }
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
        let s = &self.redis.link;
        s.counters.failures.fetch_add(1, Relaxed);
        tracing::warn!(error = %error, "a shared concurrency slot could not be leased");
        match s.config.on_unreachable {
            OnUnreachable::FailClosed => Err(NoSlot::Unreachable {
                retry_after: RETRY_AFTER,
            }),
            OnUnreachable::UseLocalLimits => {
                s.counters.fallbacks.fetch_add(1, Relaxed);
                self.local.slot(Scope::User(user), until).await
            }
        }
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
            Scope::Global if self.redis.link.config.cluster_concurrency.is_some() => None,
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
            Scope::Global => match self.redis.link.config.cluster_concurrency {
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
            let mut conn = self.redis.conn();
            let ping = ::redis::cmd("PING");
            let error = match self.redis.ask(ping.query_async::<String>(&mut conn)).await {
                Ok(_) => return None,
                Err(e) => e,
            };
            let policy = match self.redis.link.config.on_unreachable {
                OnUnreachable::FailClosed => "calls that have a rate limit end `unavailable`",
                OnUnreachable::UseLocalLimits => "this node's own limits apply meanwhile",
            };
            Some(format!("Redis is unreachable ({error}); {policy}"))
        })
    }
}
