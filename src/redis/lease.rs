//! Concurrency leases: held (renewed while held, given back when dropped), asked for
//! (given back if the answer never comes), and kept to give back once Redis answers
//! again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::Redis;
use crate::limits::{Held, Permit};

/// A held lease: renewed every third of its length while held; given back (without
/// waiting) when dropped. A process that dies stops renewing: its leases expire.
pub(super) struct Lease {
    redis: Redis,
    key: String,
    member: String,
    lease_ms: u64,
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub(super) fn hold(redis: Redis, key: String, member: String, lease_ms: u64) -> Lease {
        let (r, k, m) = (redis.clone(), key.clone(), member.clone());
        let renew = tokio::spawn(async move {
            let every = Duration::from_millis(lease_ms / 3);
            loop {
                tokio::time::sleep(every).await;
                let mut conn = r.conn();
                let mut invoke = r.link.scripts.renew.prepare_invoke();
                invoke.key(&k).arg(lease_ms).arg(&m);
                if !matches!(r.ask(invoke.invoke_async::<i64>(&mut conn)).await, Ok(1)) {
                    tracing::warn!(lease = %m, "a concurrency lease could not be renewed");
                }
            }
        });
        Lease {
            redis,
            key,
            member,
            lease_ms,
            renew,
        }
    }

    /// Removes `member` from the sorted set `key` without waiting. If Redis cannot
    /// answer, the lease waits among the [`Unreleased`] until Redis answers again,
    /// or until it would have expired by itself (`lease_ms`). Outside a runtime it is
    /// left to expire.
    pub(super) fn give_back(redis: &Redis, key: String, member: String, lease_ms: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let redis = redis.clone();
        rt.spawn(async move {
            let mut cmd = ::redis::cmd("ZREM");
            cmd.arg(&key).arg(&member);
            redis.link.counters.released();
            if !redis.run(cmd).await {
                let expires = Instant::now() + Duration::from_millis(lease_ms);
                redis.link.unreleased.keep(vec![(key, member, expires)]);
            }
        });
    }
}

/// Leases given back while Redis could not answer: kept (at most [`MAX_UNRELEASED`],
/// each until it would have expired by itself) and given back in one request as soon
/// as Redis answers again.
#[derive(Debug, Default)]
pub(super) struct Unreleased {
    leases: Mutex<Vec<(String, String, Instant)>>,
    /// How many are kept, read without the lock on every answer of Redis.
    count: AtomicUsize,
    /// A give-back of the kept leases is under way.
    flushing: AtomicBool,
}

/// The most leases kept to give back later (about 100 bytes each); past it a lease
/// is left to expire by itself.
const MAX_UNRELEASED: usize = 10_000;

impl Unreleased {
    fn keep(&self, mut more: Vec<(String, String, Instant)>) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        leases.retain(|(_, _, expires)| *expires > now);
        more.retain(|(_, _, expires)| *expires > now);
        let room = MAX_UNRELEASED.saturating_sub(leases.len());
        if more.len() > room {
            tracing::warn!(
                left = more.len() - room,
                "too many leases to give back; the rest expire by themselves"
            );
            more.truncate(room);
        }
        leases.append(&mut more);
        self.count.store(leases.len(), Relaxed);
    }

    /// Redis answered: give the kept leases back, on a task of their own (one at a
    /// time).
    pub(super) fn answered(&self, redis: &Redis) {
        if self.count.load(Relaxed) == 0 || self.flushing.swap(true, Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.flushing.store(false, Relaxed);
            return;
        };
        let redis = redis.clone();
        rt.spawn(async move {
            let kept = &redis.link.unreleased;
            let leases =
                std::mem::take(&mut *kept.leases.lock().unwrap_or_else(PoisonError::into_inner));
            kept.count.store(0, Relaxed);
            let mut pipe = ::redis::pipe();
            for (key, member, _) in &leases {
                pipe.cmd("ZREM").arg(key).arg(member).ignore();
            }
            redis.link.counters.released();
            let mut conn = redis.conn();
            if redis.ask(pipe.query_async::<()>(&mut conn)).await.is_err() {
                kept.keep(leases);
            }
            kept.flushing.store(false, Relaxed);
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (key, member) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        Lease::give_back(&self.redis, key, member, self.lease_ms);
    }
}

impl<'a> Held<'a> for Lease {}

/// A cluster's slot: one of the node's own engine-wide slots and the cluster's lease.
impl<'a> Held<'a> for (Permit<'a>, Lease) {}

/// One of a user's slots, and the cluster's slot its admission took with it (until
/// the call's global step takes it out, or gives it back).
pub(super) struct UserSlot<'a> {
    #[allow(dead_code)] // held until dropped
    pub(super) lease: Lease,
    pub(super) cluster: Option<Permit<'a>>,
}

impl<'a> Held<'a> for UserSlot<'a> {
    fn reserved(&mut self) -> Option<Permit<'a>> {
        self.cluster.take()
    }
}

/// A lease asked for whose answer has not come: if it never comes (a timeout, a lost
/// connection, the call dropped while it asked), Redis may have taken the lease all
/// the same, so it is given back ([`Lease::give_back`]). Defused once the answer
/// says what was taken.
pub(super) struct Asking<'r> {
    redis: &'r Redis,
    keys: [Option<&'r str>; 2],
    member: &'r str,
    lease_ms: u64,
    answered: bool,
}

impl<'r> Asking<'r> {
    /// `member` is being asked for in the sorted sets `keys`.
    pub(super) fn new(
        redis: &'r Redis,
        keys: [Option<&'r str>; 2],
        member: &'r str,
        lease_ms: u64,
    ) -> Self {
        Asking {
            redis,
            keys,
            member,
            lease_ms,
            answered: false,
        }
    }

    /// The answer came.
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        for key in self.keys.into_iter().flatten() {
            Lease::give_back(
                self.redis,
                key.to_owned(),
                self.member.to_owned(),
                self.lease_ms,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_leases_kept_to_give_back_are_bounded_and_forgotten_once_expired() {
        let kept = Unreleased::default();
        let lease = |i: usize, ms: u64| {
            let expires = Instant::now() + Duration::from_millis(ms);
            (format!("k{i}"), format!("m{i}"), expires)
        };
        kept.keep((0..MAX_UNRELEASED - 1).map(|i| lease(i, 1_000)).collect());
        kept.keep((0..5).map(|i| lease(i, 5_000)).collect());
        assert_eq!(kept.count.load(Relaxed), MAX_UNRELEASED);
        tokio::time::advance(Duration::from_secs(2)).await;
        kept.keep(vec![lease(7, 0)]); // expired already: not kept
        assert_eq!(kept.count.load(Relaxed), 1, "only the one left of the five");
    }
}
