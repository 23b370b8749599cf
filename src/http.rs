//! Serving the library's routers over HTTP/1.1 with every wait bounded (feature
//! `axum`): [`serve`] is `axum::serve` plus a header-read timeout and an idle
//! timeout, so clients that open connections and never finish a request cannot hold
//! them (and the process's file descriptors) forever.
//!
//! `axum::serve` sets neither: hyper's header-read timeout needs a timer, which it
//! does not give, and hyper has no idle timeout at all. This module runs hyper-util's
//! HTTP/1.1 connection with tokio's timer and watches each connection for silence.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The timeouts [`serve_with`] applies to each connection.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::http::ServeConfig;
/// let config = ServeConfig::default()
///     .header_read_timeout(Duration::from_secs(5))
///     .idle_timeout(Some(Duration::from_secs(300)));
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    header_read_timeout: Duration,
    idle_timeout: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(120)),
        }
    }
}

impl ServeConfig {
    /// How long a connection may take to send a whole request head (request line and
    /// headers), counted from when the server starts waiting for it: on a new
    /// connection, and after each response on a kept-alive one (default 10 s). Past
    /// it, the connection is closed. So a client that connects and sends nothing,
    /// or stops halfway through its headers, or keeps an idle connection open between
    /// requests, is let go after this long.
    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.header_read_timeout = d;
        self
    }

    /// How long a connection may go without a byte read or written while it is
    /// plain HTTP (default 120 s; `None`: no limit). This lets go of a request whose
    /// body never arrives. A handler that computes longer than this before its first
    /// byte must stream something meanwhile (an SSE comment, say); a connection
    /// upgraded to a WebSocket is no longer watched (the WebSocket session has its
    /// own ping and idle timeouts).
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }
}

/// Serves `router` on `listener` over HTTP/1.1 (with WebSocket upgrades) with the
/// default [`ServeConfig`]: a drop-in for `axum::serve` whose waits are bounded.
/// Runs until the process ends; an error accepting a connection (out of file
/// descriptors, say) is logged and retried after a second, as `axum::serve` does.
///
/// ```no_run
/// # async fn f(app: axum::Router) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// tool_dispatch::http::serve(listener, app).await
/// # }
/// ```
pub async fn serve(listener: TcpListener, router: Router) -> io::Result<()> {
    serve_with(listener, router, ServeConfig::default()).await
}

/// [`serve`] with the given timeouts.
///
/// ```no_run
/// # async fn f(app: axum::Router) -> std::io::Result<()> {
/// use std::time::Duration;
/// use tool_dispatch::http::{ServeConfig, serve_with};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let config = ServeConfig::default().header_read_timeout(Duration::from_secs(5));
/// serve_with(listener, app, config).await
/// # }
/// ```
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
) -> io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, router.clone(), config));
    }
}

/// Errors that concern one connection only (as hyper and axum classify them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, is upgraded, or stays silent too long.
async fn connection(stream: TcpStream, router: Router, config: ServeConfig) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = Watched {
        inner: stream,
        started,
        activity: Arc::clone(&activity),
    };
    let service = TowerToHyperService::new(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let Some(idle) = config.idle_timeout else {
        let _ = conn.await;
        return;
    };
    tokio::select! {
        // Ends with the connection, or when it is handed over to a WebSocket.
        _ = conn => {}
        () = silence(started, &activity, idle) => {
            tracing::debug!(?idle, "an HTTP connection was silent too long; closed");
        }
    }
}

/// Completes once `idle` has passed since the last byte was read or written.
async fn silence(started: Instant, activity: &AtomicU64, idle: Duration) {
    loop {
        let last = started + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A socket that notes when it last moved a byte (milliseconds after `started`).
struct Watched {
    inner: TcpStream,
    started: Instant,
    activity: Arc<AtomicU64>,
}

impl Watched {
    fn moved(&self, n: usize) {
        if n > 0 {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.activity.store(ms, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.moved(buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.moved(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.moved(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
