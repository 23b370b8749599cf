//! The WebSocket close handshake, attacked with hand-made frames over a raw TCP
//! socket (RFC 6455): a client's close 1000/1001 is answered with a close frame; a
//! close code a client may not send, invalid UTF-8, an unmasked frame, reserved
//! bits, unknown opcodes, a fragmented control frame and a stray continuation each
//! get a close frame with 1002 or 1007 and a reason, and the server goes on serving.
#![cfg(feature = "axum")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::ws::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection after the opening handshake and the `ready` frame.
async fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?token=alice-token HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (op, ready) = read_frame(&mut s).await.expect("the ready frame");
    assert_eq!(op, 1);
    assert!(String::from_utf8_lossy(&ready).contains("\"ready\""));
    s
}

/// A frame as a client would write it (`mask`: masked with a fixed key).
fn frame(fin: bool, rsv: u8, opcode: u8, mask: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if mask {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// The next frame from the server (opcode, payload); `None` at the end of the stream.
async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0f, payload))
}

/// The server's close frame (code, reason), skipping anything before it; `None` when
/// the connection ended without one.
async fn close_frame(s: &mut TcpStream) -> Option<(u16, String)> {
    let read = async {
        while let Some((op, payload)) = read_frame(s).await {
            if op == 8 {
                let Some((code, reason)) = payload.split_first_chunk::<2>() else {
                    return Some((1005, String::new())); // a close with no code
                };
                let reason = String::from_utf8_lossy(reason).into_owned();
                return Some((u16::from_be_bytes(*code), reason));
            }
        }
        None
    };
    // A bound on a stuck test: the server answers at once or not at all.
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server neither closed nor answered")
}

#[tokio::test]
async fn a_clients_close_is_answered_with_its_own_code() {
    let (addr, server) = start().await;
    let mut events = server.subscribe();
    for code in [1000u16, 1001, 3000, 4999] {
        let mut s = open(addr).await;
        s.write_all(&frame(true, 0, 8, true, &close_payload(code, "bye")))
            .await
            .unwrap();
        assert_eq!(close_frame(&mut s).await.map(|c| c.0), Some(code), "{code}");
    }
    // An empty close is answered too.
    let mut s = open(addr).await;
    s.write_all(&frame(true, 0, 8, true, &[])).await.unwrap();
    assert!(close_frame(&mut s).await.is_some());
    for _ in 0..5 {
        wait_event(&mut events, |e| gone(e, "alice")).await;
    }
    let stats = server.stats();
    assert_eq!(
        (stats.sessions, stats.sessions_open, stats.closed_protocol),
        (5, 0, 0)
    );
}

#[tokio::test]
async fn protocol_violations_get_a_close_frame_with_1002_or_1007_and_a_reason() {
    let (addr, server) = start().await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "close code 999",
            frame(true, 0, 8, true, &close_payload(999, "")),
            1002,
        ),
        (
            "close code 1005",
            frame(true, 0, 8, true, &close_payload(1005, "")),
            1002,
        ),
        (
            "invalid UTF-8 in a text frame",
            frame(true, 0, 1, true, &[b'{', 0xff, 0xfe, b'}']),
            1007,
        ),
        ("an unmasked frame", frame(true, 0, 1, false, b"{}"), 1002),
        ("reserved bits", frame(true, 0b100, 1, true, b"{}"), 1002),
        (
            "an unknown data opcode",
            frame(true, 0, 3, true, b"{}"),
            1002,
        ),
        (
            "an unknown control opcode",
            frame(true, 0, 0xb, true, b""),
            1002,
        ),
        ("a fragmented ping", frame(false, 0, 9, true, b"hi"), 1002),
        ("a stray continuation", frame(true, 0, 0, true, b"{}"), 1002),
        (
            "a control frame over 125 bytes",
            frame(true, 0, 9, true, &[0u8; 200]),
            1002,
        ),
    ];
    for (what, bytes, code) in &cases {
        let mut s = open(addr).await;
        s.write_all(bytes).await.unwrap();
        let close = close_frame(&mut s).await;
        let Some((got, reason)) = close else {
            panic!("{what}: the connection was dropped without a close frame")
        };
        assert_eq!(got, *code, "{what}: {reason}");
        assert!(
            !reason.is_empty() && reason.len() <= 123,
            "{what}: reason {reason:?}"
        );
    }
    // The server goes on: another client is served.
    let mut ws = connect(addr, "bob-token").await;
    send(
        &mut ws,
        openai(&[("c1", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    assert_eq!(
        completed(&until_results(&mut ws).await, "c1")["status"],
        "success"
    );
    // Close 999 and 1005 are answered as the client's close (with 1002); the others
    // are counted as violations.
    assert_eq!(server.stats().closed_protocol, cases.len() as u64 - 2);
}
