//! A held concurrency lease: renewed while held, given back when dropped.

use std::time::Duration;

use super::Redis;

/// A held lease: renewed every third of its length while held; given back (without
/// waiting) when dropped. A process that dies stops renewing: its leases expire.
pub(super) struct Lease {
    redis: Redis,
    key: String,
    member: String,
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
            renew,
        }
    }

    /// Removes `member` from the sorted set `key`, without waiting (best effort:
    /// outside a runtime, or if Redis cannot answer, the lease expires by itself).
    pub(super) fn give_back(redis: &Redis, key: String, member: String) {
        let mut cmd = ::redis::cmd("ZREM");
        cmd.arg(key).arg(member);
        redis.run_later(cmd, "a lease could not be given back; it expires by itself");
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (key, member) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        Lease::give_back(&self.redis, key, member);
    }
}
