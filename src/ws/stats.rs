//! The session's counters: plain atomics, read as a [`WsStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::protocol::ResyncReason;

/// What the session has done since the server was made
/// ([`WsServer::stats`](super::WsServer::stats)). Counters only grow, except
/// `sessions_open`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct WsStats {
    /// Connections being served now.
    pub sessions_open: u64,
    /// Connections served in all.
    pub sessions: u64,
    /// Client messages read (text and binary).
    pub messages_in: u64,
    /// `error` frames sent.
    pub error_frames: u64,
    /// `resume` requests answered with `resumed`.
    pub resumes: u64,
    /// `resync_required` frames sent, by reason (for a `resume`, or for a connection
    /// that fell behind a run).
    pub resyncs: ResyncCounts,
    /// Connections let go because they stopped reading (a frame waited for room in
    /// their queue past the result timeout).
    pub let_go_not_reading: u64,
    /// Connections closed for sending nothing within the idle timeout.
    pub closed_idle: u64,
    /// Connections closed for a WebSocket protocol violation (1002, 1007) or an
    /// oversized message (1009).
    pub closed_protocol: u64,
}

/// `resync_required` frames sent, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ResyncCounts {
    /// `truncated`.
    pub truncated: u64,
    /// `unknown_run`.
    pub unknown_run: u64,
    /// `epoch_changed`.
    pub epoch_changed: u64,
    /// `unavailable`.
    pub unavailable: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) sessions_open: AtomicU64,
    pub(super) sessions: AtomicU64,
    pub(super) messages_in: AtomicU64,
    pub(super) error_frames: AtomicU64,
    pub(super) resumes: AtomicU64,
    resyncs: [AtomicU64; 4],
    pub(super) let_go_not_reading: AtomicU64,
    pub(super) closed_idle: AtomicU64,
    pub(super) closed_protocol: AtomicU64,
}

/// One more.
pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Counters {
    pub(super) fn resync(&self, reason: ResyncReason) {
        let i = match reason {
            ResyncReason::Truncated => 0,
            ResyncReason::UnknownRun => 1,
            ResyncReason::EpochChanged => 2,
            _ => 3,
        };
        inc(&self.resyncs[i]);
    }

    pub(super) fn snapshot(&self) -> WsStats {
        let r = |i: usize| self.resyncs[i].load(Relaxed);
        WsStats {
            sessions_open: self.sessions_open.load(Relaxed),
            sessions: self.sessions.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            error_frames: self.error_frames.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            resyncs: ResyncCounts {
                truncated: r(0),
                unknown_run: r(1),
                epoch_changed: r(2),
                unavailable: r(3),
            },
            let_go_not_reading: self.let_go_not_reading.load(Relaxed),
            closed_idle: self.closed_idle.load(Relaxed),
            closed_protocol: self.closed_protocol.load(Relaxed),
        }
    }
}
