//! Where an MCP call's events go: the user's sink, the tool's progress to the client
//! as `notifications/progress`, and its approval phase to the server's question.

use std::sync::Arc;

use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::{Peer, RoleServer};
use tokio::sync::{mpsc, watch};

use super::approve::{self, Phase};
use crate::BoxFuture;
use crate::event::{Event, ToolProgress};
use crate::sink::{EventSink, SinkError, TrySendError};

/// Progress notifications a call may have waiting for the client.
pub(super) const PROGRESS_BUFFER: usize = 64;

/// A call's sink: the user's events go to the integrator's sink; the tool's
/// progress also to the MCP client, when it asked for it; its approval is followed
/// when the client can be asked.
pub(super) struct CallSink {
    pub(super) events: Arc<dyn EventSink>,
    pub(super) progress: Option<mpsc::Sender<ToolProgress>>,
    pub(super) phase: Option<watch::Sender<Phase>>,
}

impl CallSink {
    fn tee(&self, event: &Event) {
        if let (Some(tx), Event::ToolProgress(p)) = (&self.progress, event) {
            let _ = tx.try_send(p.clone()); // dropped when the client is behind
        }
        if let Some(phase) = &self.phase {
            approve::observe(phase, event);
        }
    }
}

impl EventSink for CallSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        self.tee(&event);
        self.events.try_send(event)
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        self.tee(&event);
        self.events.send(event)
    }
}

/// A call's progress on its way to the client: each value above the last.
pub(super) struct Forward {
    pub(super) peer: Peer<RoleServer>,
    pub(super) token: ProgressToken,
    pub(super) last: f64,
}

impl Forward {
    pub(super) async fn send(&mut self, p: ToolProgress) {
        if !p.progress.is_finite() || p.progress <= self.last {
            return;
        }
        self.last = p.progress;
        let mut note =
            ProgressNotificationParam::new(self.token.clone(), p.progress).with_total(1.0);
        if let Some(m) = p.message {
            note = note.with_message(m);
        }
        let _ = self.peer.notify_progress(note).await;
    }
}
