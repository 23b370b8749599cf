//! Deadlines that never overflow: a huge timeout or wait means "no limit", never a
//! panic.

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: what "no limit" becomes when `start + d` does not fit.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `start + d`, or a point about 30 years later when that would overflow.
pub(crate) fn deadline(start: Instant, d: Duration) -> Instant {
    start
        .checked_add(d)
        .or_else(|| start.checked_add(FAR))
        .unwrap_or(start)
}
