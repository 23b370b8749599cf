//! The limiter's circuit: once a request to Redis has failed, a limiter that falls
//! back on this node's own limits ([`OnUnreachable::UseLocalLimits`]) stops asking
//! Redis for a while, so that a call pays the timeout at most once during an outage
//! instead of once per call.
//!
//! After a failure, Redis is skipped for [`WINDOW`]; then the next call asks it (one
//! call: the others keep skipping it while that one waits for its answer, for another
//! window at the most). Any answer from Redis, to any part, closes the circuit; any
//! failure opens it again.
//!
//! [`OnUnreachable::UseLocalLimits`]: super::OnUnreachable::UseLocalLimits

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// How long Redis is skipped after a failure before one call asks it again.
pub(super) const WINDOW: Duration = Duration::from_secs(1);

/// Whether the limiter asks Redis: one atomic word, read once per call while Redis
/// answers.
#[derive(Debug)]
pub(super) struct Circuit {
    epoch: Instant,
    /// Nanoseconds since `epoch` from which one call may ask Redis again; 0 while
    /// Redis answers.
    retry_at: AtomicU64,
}

impl Circuit {
    pub(super) fn new() -> Circuit {
        Circuit {
            epoch: Instant::now(),
            retry_at: AtomicU64::new(0),
        }
    }

    /// A request failed: skip Redis for a window from now.
    pub(super) fn open(&self) {
        self.retry_at
            .store(self.after_window(Instant::now()), Relaxed);
    }

    /// Redis answered.
    pub(super) fn close(&self) {
        if self.retry_at.load(Relaxed) != 0 {
            self.retry_at.store(0, Relaxed);
        }
    }

    /// Whether to ask Redis now: yes while it answers; after a failure, no until a
    /// window has passed, then yes for one call (the probe), and no again for the
    /// others until its answer closes or opens the circuit (or another window ends).
    pub(super) fn allows(&self) -> bool {
        let at = self.retry_at.load(Relaxed);
        if at == 0 {
            return true;
        }
        let now = Instant::now();
        self.nanos(now) >= at
            && self
                .retry_at
                .compare_exchange(at, self.after_window(now), Relaxed, Relaxed)
                .is_ok()
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// A point a window after `now`, never 0.
    fn after_window(&self, now: Instant) -> u64 {
        let window = u64::try_from(WINDOW.as_nanos()).unwrap_or(u64::MAX);
        self.nanos(now).saturating_add(window).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failure_skips_redis_for_a_window_then_lets_one_call_probe() {
        let c = Circuit::new();
        assert!(c.allows() && c.allows(), "closed: every call asks");
        c.open();
        assert!(!c.allows(), "open: skipped");
        tokio::time::advance(WINDOW - Duration::from_millis(1)).await;
        assert!(!c.allows(), "still within the window");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(c.allows(), "the window is over: one call probes");
        assert!(!c.allows() && !c.allows(), "the others skip while it asks");
        // Its answer never came (the call was dropped): another probe a window later.
        tokio::time::advance(WINDOW).await;
        assert!(c.allows());
        assert!(!c.allows());
        c.open(); // the probe failed
        tokio::time::advance(WINDOW / 2).await;
        assert!(!c.allows());
        c.close(); // anything answered
        assert!(c.allows() && c.allows());
    }
}
