//! The library's HTTP serving (`tool_dispatch::http::serve`), attacked with half-open
//! requests over real sockets: a client that never finishes its request headers, one
//! that never sends its body, and an idle keep-alive connection are all let go after
//! the documented timeouts, while finished requests and upgraded WebSockets are
//! served. The clock is tokio's paused one: "after 10 s" is exact, and nobody sleeps.
#![cfg(feature = "axum")]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tool_dispatch::http::{ServeConfig, serve_with};

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/echo", post(|body: String| async move { body }))
        .route(
            "/ws",
            get(|upgrade: WebSocketUpgrade| async move {
                upgrade.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
}

async fn start(config: ServeConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_with(listener, app(), config));
    addr
}

/// When the server let the connection go (EOF or reset), or `None` if it still held
/// it after an hour.
async fn let_go(s: &mut TcpStream) -> Option<Instant> {
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), read_to_end)
        .await
        .ok()
}

/// One whole `GET /` on a fresh connection.
async fn get_ok(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test(start_paused = true)]
async fn requests_that_never_finish_their_headers_are_let_go_after_the_header_timeout() {
    let addr = start(ServeConfig::default()).await;
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        match i % 3 {
            0 => {}                                                            // says nothing at all
            1 => s.write_all(b"GET / HT").await.unwrap(), // stops in the request line
            _ => s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await.unwrap(), // no blank line
        }
        held.push(s);
    }
    // Served meanwhile.
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
    for (i, s) in held.iter_mut().enumerate() {
        let gone = let_go(s)
            .await
            .unwrap_or_else(|| panic!("connection {i} still held"));
        let after = gone - started;
        assert!(
            after >= Duration::from_secs(10) && after < Duration::from_secs(11),
            "connection {i} let go after {after:?}, not at the 10 s header timeout"
        );
    }
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_let_go_after_the_header_timeout() {
    let addr = start(ServeConfig::default().header_read_timeout(Duration::from_secs(5))).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let answered = Instant::now();
    let gone = let_go(&mut s).await.expect("the idle connection is let go");
    assert_eq!((gone - answered).as_secs(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_body_never_comes_is_let_go_after_the_idle_timeout() {
    let config = ServeConfig::default().idle_timeout(Some(Duration::from_secs(60)));
    let addr = start(config).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let sent = Instant::now();
    let gone = let_go(&mut s).await.expect("the stalled body is let go");
    assert_eq!((gone - sent).as_secs(), 60);
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(start_paused = true)]
async fn an_upgraded_websocket_is_not_cut_by_the_http_timeouts() {
    let config = ServeConfig::default()
        .header_read_timeout(Duration::from_secs(1))
        .idle_timeout(Some(Duration::from_secs(2)));
    let addr = start(config).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    ws.send(Message::text("still here")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo, Message::text("still here"));
}
