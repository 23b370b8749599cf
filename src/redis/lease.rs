//! A held concurrency lease: renewed while held, released when dropped.

use std::time::Duration;

use super::Redis;

/// A held lease: renewed every third of its length while held; released (without
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
                let s = &r.link;
                let mut conn = s.conn.clone();
                let mut invoke = s.scripts.renew.prepare_invoke();
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
