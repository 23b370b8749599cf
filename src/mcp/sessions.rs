//! Sessions (the protocol revisions that have them, over HTTP), each its user's own.
//!
//! [`Sessions`] wraps rmcp's session manager. It records the user who initialized
//! each session, which [`router`](super::router) checks before any request on it
//! reaches rmcp (another user's request is answered as for an unknown session), and
//! the request ids in flight on each session, so that a request reusing one is
//! refused with a JSON-RPC error instead of taking over the first one's answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::{Stream, StreamExt, stream};
use rmcp::RoleServer;
use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ErrorCode, ErrorData, GetExtensions, RequestId,
    ServerJsonRpcMessage,
};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};

use super::stats::Counters;
use crate::user::UserContext;

/// Cancelled request ids a session keeps refusing: a cancelled handler may still be
/// finishing, and its late answer must not reach a new request with the same id.
const RETIRED_IDS: usize = 256;

/// Sessions one user may hold open at once; initializing one more closes their oldest
/// (its client gets 404 and, as the specification says, starts a new session).
pub const MAX_SESSIONS_PER_USER: usize = 32;

/// What is known of one session.
#[derive(Debug, Default)]
struct Session {
    /// The user who initialized it.
    owner: Option<Arc<str>>,
    /// When it was created, in creation order.
    opened: u64,
    /// Ids of its requests not answered yet.
    in_flight: HashSet<RequestId>,
    /// Ids of its cancelled requests, oldest first.
    retired: VecDeque<RequestId>,
}

type Table = Mutex<HashMap<SessionId, Session>>;

fn lock(table: &Table) -> MutexGuard<'_, HashMap<SessionId, Session>> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// rmcp's session manager, with each session's owner and in-flight request ids.
#[derive(Debug)]
pub(super) struct Sessions<M = LocalSessionManager> {
    inner: M,
    table: Arc<Table>,
    counters: Arc<Counters>,
    /// Sessions created so far (each session's `opened`).
    created: std::sync::atomic::AtomicU64,
}

impl<M> Sessions<M> {
    pub(super) fn new(inner: M, counters: Arc<Counters>) -> Self {
        Sessions {
            inner,
            table: Arc::default(),
            counters,
            created: Default::default(),
        }
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the session `id` exists and belongs to `user`.
    pub(super) fn belongs_to(&self, id: &str, user: &str) -> bool {
        lock(&self.table)
            .get(id)
            .and_then(|s| s.owner.as_deref())
            .is_some_and(|owner| owner == user)
    }

    /// Whether the session `id` is known and belongs to someone other than `user`.
    pub(super) fn is_foreign(&self, id: &str, user: &str) -> bool {
        lock(&self.table)
            .get(id)
            .and_then(|s| s.owner.as_deref())
            .is_some_and(|owner| owner != user)
    }

    /// Marks `request` in flight on session `id`; `false` if it already is (or was
    /// cancelled recently), in which case nothing changes.
    fn start(&self, id: &SessionId, request: &RequestId) -> bool {
        let mut table = lock(&self.table);
        let Some(session) = table.get_mut(id) else {
            return true; // unknown: rmcp answers for it
        };
        if session.retired.contains(request) {
            return false;
        }
        session.in_flight.insert(request.clone())
    }

    /// Binds session `id` to `user`; the id of the user's oldest other session when
    /// they now hold more than [`MAX_SESSIONS_PER_USER`].
    fn bind(&self, id: &SessionId, user: Arc<str>) -> Option<SessionId> {
        let mut table = lock(&self.table);
        let session = table.get_mut(id)?;
        session.owner = Some(Arc::clone(&user));
        let mut theirs = 0;
        let mut oldest: Option<(&SessionId, u64)> = None;
        for (other, s) in table.iter() {
            if s.owner.as_deref() != Some(&*user) {
                continue;
            }
            theirs += 1;
            if other != id && oldest.is_none_or(|(_, at)| s.opened < at) {
                oldest = Some((other, s.opened));
            }
        }
        let oldest = oldest.map(|(other, _)| Arc::clone(other));
        (theirs > MAX_SESSIONS_PER_USER).then_some(oldest).flatten()
    }

    /// Forgets session `id`, counting it closed once.
    fn forget(&self, id: &SessionId) {
        forget(&self.table, &self.counters, id);
    }

    /// A cancelled request: its id stays refused for a while.
    fn retire(&self, id: &SessionId, request: &RequestId) {
        if let Some(session) = lock(&self.table).get_mut(id)
            && session.in_flight.remove(request)
        {
            if session.retired.len() == RETIRED_IDS {
                session.retired.pop_front();
            }
            session.retired.push_back(request.clone());
        }
    }
}

/// Forgets session `id` in `table`, counting it closed once (it may end by a
/// `DELETE`, by eviction, or by rmcp closing it when idle: whichever comes first).
fn forget(table: &Table, counters: &Counters, id: &SessionId) {
    if lock(table).remove(id).is_some() {
        counters.session_closed();
    }
}

/// The user a message carries (put there by the bearer check, in the HTTP parts).
fn user_of(message: &ClientJsonRpcMessage) -> Option<Arc<str>> {
    let extensions = match message {
        ClientJsonRpcMessage::Request(r) => r.request.extensions(),
        ClientJsonRpcMessage::Notification(n) => n.notification.extensions(),
        _ => return None,
    };
    extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<UserContext>())
        .map(|u| Arc::from(u.user_id()))
}

/// The one-message stream answering a request refused on its session.
fn refusal(id: RequestId) -> impl Stream<Item = ServerSseMessage> + Send + Sync + 'static {
    let error = ErrorData::new(
        ErrorCode::INVALID_REQUEST,
        "a request with this id is already in flight on this session; use a new id",
        None,
    );
    stream::once(async move {
        ServerSseMessage::from_message(ServerJsonRpcMessage::error(error, Some(id)))
    })
}

impl<M: SessionManager> SessionManager for Sessions<M> {
    type Error = M::Error;
    type Transport = Tracked<M::Transport>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        let opened = self
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = Session {
            opened,
            ..Session::default()
        };
        lock(&self.table).insert(Arc::clone(&id), session);
        self.counters.session_opened();
        let tracked = Tracked {
            inner: transport,
            session: Arc::clone(&id),
            table: Arc::clone(&self.table),
            counters: Arc::clone(&self.counters),
        };
        Ok((id, tracked))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        // Claimed before the client can learn the id (it is in this request's answer).
        let evicted = user_of(&message).and_then(|user| self.bind(id, user));
        if let Some(oldest) = evicted {
            let _ = self.inner.close_session(&oldest).await;
            self.forget(&oldest);
        }
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let result = self.inner.close_session(id).await;
        self.forget(id);
        result
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        if let ClientJsonRpcMessage::Request(r) = &message
            && !self.start(id, &r.id)
        {
            self.counters.duplicate_id();
            return Ok(refusal(r.id.clone()).left_stream());
        }
        let request = match &message {
            ClientJsonRpcMessage::Request(r) => Some(r.id.clone()),
            _ => None,
        };
        match self.inner.create_stream(id, message).await {
            Ok(s) => Ok(s.right_stream()),
            Err(e) => {
                if let Some(r) = request
                    && let Some(session) = lock(&self.table).get_mut(id)
                {
                    session.in_flight.remove(&r);
                }
                Err(e)
            }
        }
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        if let ClientJsonRpcMessage::Notification(n) = &message
            && let ClientNotification::CancelledNotification(c) = &n.notification
            && let Some(request) = &c.params.request_id
        {
            self.counters.request("notifications/cancelled");
            self.retire(id, request);
        }
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.resume(id, last_event_id).await
    }

    /// A session is never brought back from an external store: its owner could not
    /// be proven, so a request naming it is answered as for an unknown session and
    /// the client starts a new one.
    async fn restore_session(
        &self,
        _id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        Ok(RestoreOutcome::NotSupported)
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

/// A session's transport, which sees each answer leave: its request id is no longer
/// in flight once the answer is on its way. Dropped when the session ends however it
/// ends (rmcp closes a session idle past its keep-alive without telling the manager),
/// it forgets the session.
#[derive(Debug)]
pub(super) struct Tracked<T> {
    inner: T,
    session: SessionId,
    table: Arc<Table>,
    counters: Arc<Counters>,
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        forget(&self.table, &self.counters, &self.session);
    }
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Tracked<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let answered = match &item {
            ServerJsonRpcMessage::Response(r) => Some(r.id.clone()),
            ServerJsonRpcMessage::Error(e) => e.id.clone(),
            _ => None,
        };
        let sent = self.inner.send(item);
        let (table, session) = (Arc::clone(&self.table), Arc::clone(&self.session));
        async move {
            let result = sent.await;
            // Released once the answer reached the session, so that a new request
            // with the same id cannot be routed the old answer.
            if let Some(id) = answered
                && let Some(s) = lock(&table).get_mut(&session)
            {
                s.in_flight.remove(&id);
            }
            result
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleServer>>> + Send {
        self.inner.receive()
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ended_by_its_transport_and_then_deleted_is_forgotten_and_counted_once() {
        let counters = Arc::new(Counters::default());
        let sessions = Sessions::new((), Arc::clone(&counters));
        let id: SessionId = Arc::from("s1");
        lock(&sessions.table).insert(Arc::clone(&id), Session::default());
        counters.session_opened();
        // rmcp ends an idle session by dropping its transport, without a word to
        // the manager: the table forgets it all the same.
        drop(Tracked {
            inner: (),
            session: Arc::clone(&id),
            table: Arc::clone(&sessions.table),
            counters: Arc::clone(&counters),
        });
        assert!(lock(&sessions.table).is_empty());
        sessions.forget(&id); // a late DELETE
        let stats = counters.snapshot();
        assert_eq!((stats.sessions_opened, stats.sessions_open), (1, 0));
    }

    #[test]
    fn past_the_cap_binding_names_the_users_oldest_other_session() {
        let sessions = Sessions::new((), Arc::new(Counters::default()));
        let ids: Vec<SessionId> = (0..=MAX_SESSIONS_PER_USER + 1)
            .map(|i| Arc::from(format!("s{i}")))
            .collect();
        for (opened, id) in ids.iter().enumerate() {
            let session = Session {
                opened: opened as u64,
                ..Session::default()
            };
            lock(&sessions.table).insert(Arc::clone(id), session);
        }
        let bob = Arc::clone(&ids[0]);
        assert_eq!(sessions.bind(&bob, Arc::from("bob")), None);
        for id in &ids[1..=MAX_SESSIONS_PER_USER] {
            assert_eq!(sessions.bind(id, Arc::from("alice")), None, "{id}");
        }
        let last = &ids[MAX_SESSIONS_PER_USER + 1];
        assert_eq!(
            sessions.bind(last, Arc::from("alice")),
            Some(Arc::clone(&ids[1]))
        );
    }
}
