//! The limiter that shares each user's rate and slots (and, optionally, the
//! cluster's slots) through Redis, and follows the policy when Redis cannot answer.
//!
//! A call is admitted in one round trip: one script checks the user's rate, takes
//! one of the user's slots and, with a cluster-wide limit, one of the cluster's
//! ([`ADMIT`](super::scripts)). A call that waits for its user's approval asks for
//! its rate first and for its slot once approved (two round trips).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::lease::{Asking, Carried, Lease, UserSlot, lease_ms};
use super::{OnUnreachable, Redis};
use crate::limits::{
    Admit, Gcra, Limiter, LocalLimiter, NoSlot, NotAdmitted, Permit, RateCheck, RateRefusal, Scope,
    UserState,
};

/// What a call refused because Redis cannot answer is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The first pause of a call waiting for a slot before it asks again; each pause
/// doubles, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(50);

pub(super) struct RedisLimiter {
    local: LocalLimiter,
    redis: Redis,
}

/// What the admission script answered.
enum Answer {
    /// Admitted: the user's slot, and the cluster's when one was taken with it.
    Admitted { cluster: bool },
    /// Over the rate; nothing taken.
    Limited(Duration),
    /// None of the user's slots free; nothing taken, no rate spent.
    NoSlot,
}

impl RedisLimiter {
    pub(super) fn new(local: LocalLimiter, redis: Redis) -> RedisLimiter {
        RedisLimiter { local, redis }
    }

    /// Whether Redis is not asked now: with `UseLocalLimits`, for a while after a
    /// request failed (see `circuit.rs`).
    fn skips_redis(&self) -> bool {
        let s = &self.redis.link;
        s.config.on_unreachable == OnUnreachable::UseLocalLimits && !s.circuit.allows()
    }

    /// A new lease name.
    fn lease_name(&self) -> String {
        let s = &self.redis.link;
        format!("{}:{}", s.node, s.leases_named.fetch_add(1, Relaxed))
    }

    /// Admits one call of `user` through Redis: the rate, one of the user's slots
    /// and maybe one of the cluster's, in one script; asked again, with growing
    /// pauses, while none of the user's slots is free, until `until`.
    async fn admit_shared<'a>(
        &'a self,
        user: &'a UserState,
        now: Instant,
        until: Instant,
    ) -> Result<Permit<'a>, NotAdmitted> {
        let s = &self.redis.link;
        let prechecked = user.rate.is_some() && s.config.local_precheck;
        if prechecked && let Err(refusal) = self.local.rate_here(user, now) {
            // Over the quota on this node alone: over it everywhere.
            s.counters.shed.fetch_add(1, Relaxed);
            return Err(NotAdmitted::Rate(refusal));
        }
        if self.skips_redis() {
            return self.admit_here(user, until, prechecked, None).await;
        }
        let (member, lease_ms) = (self.lease_name(), lease_ms(&self.redis));
        let slots = s.keys.slots(&user.user_id);
        let rate = s.keys.rate(&user.user_id);
        let cluster_key = s.config.cluster_concurrency.map(|_| s.keys.global_slots());
        let (interval_us, tolerance_us) = user.rate.as_ref().map_or((0, 0), Gcra::micros);
        let mut pause = FIRST_PAUSE;
        loop {
            // With a cluster-wide limit, the cluster's slot comes with the user's
            // when one of this node's own engine-wide slots is free.
            let cluster = match (&cluster_key, s.config.cluster_concurrency) {
                (Some(key), Some(limit)) => self
                    .local
                    .try_slot(&Scope::Global)
                    .map(|here| (key.as_str(), limit, here)),
                _ => None,
            };
            // The leases given back just now (the user's, the cluster's when it
            // asks for one) go with this request.
            let also = cluster.as_ref().map(|(key, _, _)| *key);
            let carried = s.leases.take(&slots, also);
            let mut invoke = s.scripts.admit.prepare_invoke();
            invoke.key(&slots).key(&rate);
            if let Some((key, _, _)) = &cluster {
                invoke.key(*key);
            }
            invoke
                .arg(user.concurrency)
                .arg(lease_ms)
                .arg(&member)
                .arg(interval_us)
                .arg(tolerance_us)
                .arg(cluster.as_ref().map_or(0, |(_, limit, _)| *limit))
                .arg(carried.user.len())
                .arg(&carried.user)
                .arg(&carried.cluster);
            let asking = Asking::new(&self.redis, &slots, also, &member, &carried);
            let mut conn = self.redis.conn();
            let answer = self
                .redis
                .ask(invoke.invoke_async::<(i64, i64, i64)>(&mut conn))
                .await;
            let answer = match answer {
                Ok((1, _, taken)) => Answer::Admitted {
                    cluster: taken == 1,
                },
                Ok((0, retry_us, _)) => {
                    Answer::Limited(Duration::from_micros(u64::try_from(retry_us).unwrap_or(0)))
                }
                Ok(_) => Answer::NoSlot,
                Err(error) => {
                    drop(asking); // Redis may have run it: given back
                    drop(cluster);
                    return self.admit_here(user, until, prechecked, Some(error)).await;
                }
            };
            asking.answered();
            s.counters.answers.fetch_add(1, Relaxed);
            match answer {
                Answer::Admitted { cluster: taken } => {
                    let cluster = match (cluster, taken) {
                        (Some((key, _, here)), true) => {
                            let lease = Lease::hold(&self.redis, key.into(), member.clone());
                            Some(Permit::Shared(Box::new(Box::new((here, lease)))))
                        }
                        _ => None, // the node's own slot goes back with it
                    };
                    let lease = Lease::hold(&self.redis, slots, member);
                    let slot = UserSlot { lease, cluster };
                    return Ok(Permit::Shared(Box::new(Box::new(slot))));
                }
                Answer::Limited(retry) => {
                    return Err(NotAdmitted::Rate(RateRefusal::Limited(retry)));
                }
                Answer::NoSlot => drop(cluster), // not held while it waits
            }
            let now = Instant::now();
            if now >= until {
                return Err(NotAdmitted::Slot(NoSlot::InTime));
            }
            tokio::time::sleep_until((now + pause).min(until)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// The policy's answer when Redis cannot admit a call (`error`), or is not asked
    /// (`None`: it is known to be away). `prechecked`: this node's own bucket has
    /// counted the call already.
    async fn admit_here<'a>(
        &'a self,
        user: &'a UserState,
        until: Instant,
        prechecked: bool,
        error: Option<String>,
    ) -> Result<Permit<'a>, NotAdmitted> {
        let s = &self.redis.link;
        if let Some(error) = error {
            s.counters.failures.fetch_add(1, Relaxed);
            tracing::warn!(error = %error, "a call could not be admitted through Redis");
        }
        match s.config.on_unreachable {
            OnUnreachable::FailClosed => Err(NotAdmitted::Rate(RateRefusal::Unreachable {
                retry_after: RETRY_AFTER,
            })),
            OnUnreachable::UseLocalLimits => {
                s.counters.fallbacks.fetch_add(1, Relaxed);
                if prechecked {
                    let slot = self.local.slot(Scope::User(user), until).await;
                    return slot.map_err(NotAdmitted::Slot);
                }
                match self.local.admit(user, Instant::now(), until) {
                    Admit::Now(answer) => answer,
                    Admit::Later(answer) => answer.await,
                }
            }
        }
    }

    /// The rate alone (a call that waits for approval), with the pre-check.
    async fn rate_shared(&self, user: &UserState, now: Instant) -> Result<(), RateRefusal> {
        let Some(gcra) = &user.rate else {
            return Ok(());
        };
        let s = &self.redis.link;
        let prechecked = s.config.local_precheck;
        if prechecked && let Err(refusal) = self.local.rate_here(user, now) {
            s.counters.shed.fetch_add(1, Relaxed);
            return Err(refusal);
        }
        if self.skips_redis() {
            return self.rate_here(user, prechecked, None);
        }
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
        match answer {
            Ok((1, _)) => {
                s.counters.answers.fetch_add(1, Relaxed);
                Ok(())
            }
            Ok((_, retry_us)) => {
                s.counters.answers.fetch_add(1, Relaxed);
                let retry = Duration::from_micros(u64::try_from(retry_us).unwrap_or(0));
                Err(RateRefusal::Limited(retry))
            }
            Err(e) => self.rate_here(user, prechecked, Some(e)),
        }
    }

    /// The policy's answer when Redis cannot check the rate (`error`), or is not
    /// asked (`None`).
    fn rate_here(
        &self,
        user: &UserState,
        prechecked: bool,
        error: Option<String>,
    ) -> Result<(), RateRefusal> {
        let s = &self.redis.link;
        if let Some(error) = error {
            s.counters.failures.fetch_add(1, Relaxed);
            tracing::warn!(error = %error, "the shared rate limit could not be checked");
        }
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

    /// One of `user`'s slots once the call is approved: a lease in
    /// `{prefix}:u{<user>}:slots`, asked for until `until`.
    async fn user_slot<'a>(
        &'a self,
        user: &'a UserState,
        until: Instant,
    ) -> Result<Permit<'a>, NoSlot> {
        let key = self.redis.link.keys.slots(&user.user_id);
        match self.lease(key, user.concurrency, until).await {
            Ok(lease) => Ok(Permit::Shared(Box::new(Box::new(lease)))),
            Err(None) => Err(NoSlot::InTime),
            Err(Some(e)) => {
                self.slot_here(Some(e), self.local.slot(Scope::User(user), until))
                    .await
            }
        }
    }

    /// One of the cluster's slots (`{prefix}:global:slots`, `limit` of them), on top
    /// of one of this node's own engine-wide slots, when the call's admission did not
    /// take one.
    async fn cluster_slot<'a>(
        &'a self,
        limit: usize,
        until: Instant,
    ) -> Result<Permit<'a>, NoSlot> {
        let here = self.local.slot(Scope::Global, until).await?;
        if self.skips_redis() {
            return self.slot_here(None, async { Ok(here) }).await;
        }
        let key = self.redis.link.keys.global_slots();
        match self.lease(key, limit, until).await {
            Ok(lease) => Ok(Permit::Shared(Box::new(Box::new((here, lease))))),
            Err(None) => Err(NoSlot::InTime),
            Err(Some(e)) => self.slot_here(Some(e), async { Ok(here) }).await,
        }
    }

    /// The policy's answer when Redis cannot lease a slot (`error`), or is not asked
    /// (`None`); `here` is this node's own.
    async fn slot_here<'a>(
        &'a self,
        error: Option<String>,
        here: impl Future<Output = Result<Permit<'a>, NoSlot>>,
    ) -> Result<Permit<'a>, NoSlot> {
        let s = &self.redis.link;
        if let Some(error) = error {
            s.counters.failures.fetch_add(1, Relaxed);
            tracing::warn!(error = %error, "a shared concurrency slot could not be leased");
        }
        match s.config.on_unreachable {
            OnUnreachable::FailClosed => Err(NoSlot::Unreachable {
                retry_after: RETRY_AFTER,
            }),
            OnUnreachable::UseLocalLimits => {
                s.counters.fallbacks.fetch_add(1, Relaxed);
                here.await
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
        let (member, lease_ms) = (self.lease_name(), lease_ms(&self.redis));
        let mut pause = FIRST_PAUSE;
        loop {
            let mut conn = self.redis.conn();
            let mut invoke = s.scripts.acquire.prepare_invoke();
            invoke.key(&key).arg(limit).arg(lease_ms).arg(&member);
            let none = Carried::default();
            let asking = Asking::new(&self.redis, &key, None, &member, &none);
            let answer = self.redis.ask(invoke.invoke_async::<i64>(&mut conn)).await;
            match answer {
                Ok(taken) => {
                    asking.answered();
                    s.counters.answers.fetch_add(1, Relaxed);
                    if taken == 1 {
                        return Ok(Lease::hold(&self.redis, key, member));
                    }
                }
                Err(e) => {
                    drop(asking); // Redis may have taken it: given back
                    return Err(Some(e));
                }
            }
            let now = Instant::now();
            if now >= until {
                return Err(None);
            }
            tokio::time::sleep_until((now + pause).min(until)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

impl Limiter for RedisLimiter {
    fn admit<'a>(&'a self, user: &'a UserState, now: Instant, until: Instant) -> Admit<'a> {
        match user.local_only {
            true => self.local.admit(user, now, until),
            false => Admit::Later(Box::pin(self.admit_shared(user, now, until))),
        }
    }

    fn rate<'a>(&'a self, user: &'a UserState, now: Instant) -> RateCheck<'a> {
        if user.rate.is_none() || user.local_only {
            return self.local.rate(user, now);
        }
        RateCheck::Later(Box::pin(self.rate_shared(user, now)))
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
            Scope::User(user) if !user.local_only => Box::pin(async move {
                if self.skips_redis() {
                    return self
                        .slot_here(None, self.local.slot(Scope::User(user), until))
                        .await;
                }
                self.user_slot(user, until).await
            }),
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
