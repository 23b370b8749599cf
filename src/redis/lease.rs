//! Concurrency leases: held (renewed while held, given back when dropped), and asked
//! for (given back if the answer never comes).

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

    /// Removes `member` from the sorted set `key` without waiting, asking again while
    /// Redis cannot answer, until the lease (`lease_ms`) would have expired by itself.
    /// Outside a runtime it is left to expire.
    pub(super) fn give_back(redis: &Redis, key: String, member: String, lease_ms: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let redis = redis.clone();
        rt.spawn(async move {
            let expired = Instant::now() + Duration::from_millis(lease_ms);
            let mut pause = Duration::from_millis(50);
            loop {
                let mut cmd = ::redis::cmd("ZREM");
                cmd.arg(&key).arg(&member);
                redis.link.counters.released();
                if redis.run(cmd).await {
                    return;
                }
                if Instant::now() + pause >= expired {
                    tracing::warn!(lease = %member, "a lease could not be given back; it expires by itself");
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
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
