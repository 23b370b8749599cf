//! Smoke test of the `chat_server` example: its routes start and answer (the page,
//! `/metrics.json`, `/metrics`, the session with a good token, 401 with a bad one),
//! and its command line. The session's protocol is tested on the library, in
//! `tests/ws_*.rs`.
#![cfg(feature = "axum")]

#[allow(dead_code)] // its `main` is not called here
#[path = "../examples/chat_server/main.rs"]
mod chat_server;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tool_dispatch::ws::WsServer;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_its_page_metrics_and_the_session_to_known_tokens_only() {
    let options = chat_server::options_from(["--node=smoke".to_owned()], None, None).unwrap();
    let (engine, runs) = chat_server::engine_for(&options).await.unwrap();
    let server = WsServer::new(engine).run_log(runs).node("smoke");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tool_dispatch::http::serve(
        listener,
        chat_server::app(server),
    ));

    let page = http_get(addr, "/").await;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<html"),
        "{page}"
    );
    let metrics = http_get(addr, "/metrics.json").await;
    let body: Value =
        serde_json::from_str(&metrics[metrics.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(
        (body["total"].as_u64(), body["session"]["sessions"].as_u64()),
        (Some(0), Some(0))
    );
    let scraped = http_get(addr, "/metrics").await;
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    #[cfg(feature = "prometheus")]
    for series in [
        "tool_dispatch_run_log_runs",
        "tool_dispatch_ws_sessions_open",
        "tool_dispatch_calls_total",
    ] {
        assert!(scraped.contains(series), "{series}: {scraped}");
    }
    #[cfg(all(feature = "prometheus", feature = "mcp"))]
    assert!(
        scraped.contains("tool_dispatch_mcp_sessions_open"),
        "{scraped}"
    );

    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token=mallory-token")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token=alice-token"))
        .await
        .unwrap();
    let Some(Ok(tungstenite::Message::Text(ready))) = ws.next().await else {
        panic!("no ready frame")
    };
    let ready: Value = serde_json::from_str(ready.as_str()).unwrap();
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["user_id"].as_str(),
            ready["node"].as_str()
        ),
        (Some("ready"), Some("alice"), Some("smoke"))
    );
    assert!(
        ready["tools"]
            .as_array()
            .unwrap()
            .contains(&"send_email".into())
    );
}

#[test]
fn options_come_from_the_flags_then_the_environment_then_the_defaults() {
    use chat_server::options_from;
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let port = |a: &[&str], env: Option<&str>| {
        options_from(args(a), env.map(str::to_owned), None).map(|o| o.port)
    };
    assert_eq!(port(&["--port", "0"], Some("9")), Ok(0));
    assert_eq!(port(&["--port=4001"], None), Ok(4001));
    assert_eq!(port(&[], Some("8080")), Ok(8080));
    assert_eq!(port(&[], None), Ok(3000));
    let o = options_from(
        args(&["--grace-secs=0", "--node", "a", "--rate-per-minute", "5"]),
        None,
        Some("redis://y".into()),
    )
    .unwrap();
    assert_eq!(
        (
            o.grace,
            o.node.as_deref(),
            o.redis.as_deref(),
            o.rate_per_minute
        ),
        (Duration::ZERO, Some("a"), Some("redis://y"), Some(5))
    );
    let flag_wins = options_from(
        args(&["--redis", "redis://x:1"]),
        None,
        Some("redis://y:2".into()),
    );
    assert_eq!(flag_wins.unwrap().redis.as_deref(), Some("redis://x:1"));
    for bad in [
        &["--port"][..],
        &["--verbose"],
        &["--grace-secs", "-1"],
        &["--grace-secs", "soon"],
        &["--grace-secs", "99999999999999999999999"],
        &["--rate-per-minute", "0"],
        &["--rate-per-minute", "-5"],
        &["--redis"],
        &["--node"],
    ] {
        assert!(options_from(args(bad), None, None).is_err(), "{bad:?}");
    }
    assert!(options_from(args(&[]), Some("http".into()), None).is_err());
}
