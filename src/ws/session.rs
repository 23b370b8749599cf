//! [`Session`]: one connection, as the app's message hook sees it.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::WsServer;
use super::socket::{Outbound, WsSink};
use crate::dispatcher::Dispatcher;
use crate::sink::SinkError;
use crate::user::UserContext;

/// What a [`Session`] asks of its connection's task.
pub(super) enum Command {
    /// Follow a run from now on; the answer says whether the connection could.
    Follow {
        run_id: String,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// One connection of one user, handed to the app's hook
/// ([`WsServer::on_message`]) with each message the session does not know. Cheap to
/// clone; it may outlive the connection (then what it sends goes nowhere, and says
/// so).
#[derive(Clone)]
pub struct Session {
    pub(super) server: WsServer,
    pub(super) user: UserContext,
    pub(super) run_id: String,
    pub(super) sink: WsSink,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) wait: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The connection's user.
    pub fn user(&self) -> &UserContext {
        &self.user
    }

    /// The connection's run (the one its `ready` frame named).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The server.
    pub fn server(&self) -> &WsServer {
        &self.server
    }

    /// Sends a frame to this connection only (it is not recorded in any run, so a
    /// resume does not replay it), waiting at most the result timeout for room.
    pub async fn send(&self, frame: Value) -> Result<(), SinkError> {
        self.sink
            .send_outbound(Outbound::Json(frame), self.wait)
            .await
    }

    /// Makes this connection follow the user's run `run_id` from now on, as a turn
    /// in that run would (the connection's bound on runs followed applies).
    pub async fn follow(&self, run_id: &str) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        let cmd = Command::Follow {
            run_id: run_id.to_owned(),
            done,
        };
        if self.commands.send(cmd).await.is_err() {
            return Err("the connection has ended".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the connection has ended".into()))
    }

    /// A dispatcher bound to this user's run `run_id` that this connection follows:
    /// a server-side agent loop's calls, live on this page and every other one
    /// following the run ([`WsServer::dispatcher`]).
    pub async fn dispatcher(&self, run_id: &str) -> Result<Dispatcher, String> {
        self.follow(run_id).await?;
        self.server
            .dispatcher(&self.user, run_id)
            .map_err(|e| format!("bad run_id: {e}"))
    }
}
