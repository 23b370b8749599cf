//! In a plain `cargo test`, the tests behind a cargo feature are compiled out; these
//! show them as ignored, with the reason, instead of letting them vanish.

#[cfg(not(feature = "axum"))]
#[test]
#[ignore = "the session tests (tests/ws_*.rs, tests/chat_server.rs) need `--features axum` (the README's test command)"]
fn chat_server() {
    unreachable!("ignored: run `cargo test --all-features`");
}

#[cfg(not(feature = "redis"))]
#[test]
#[ignore = "the several-nodes tests (tests/redis.rs, tests/redis_admit.rs, tests/redis_runlog.rs, tests/redis_outage.rs) need `--features redis` (the README's test command)"]
fn redis() {
    unreachable!("ignored: run `cargo test --all-features`");
}

#[cfg(not(feature = "mcp"))]
#[test]
#[ignore = "the MCP tests (tests/mcp.rs) need `--features mcp` (the README's test command)"]
fn mcp() {
    unreachable!("ignored: run `cargo test --all-features`");
}

#[cfg(not(feature = "prometheus"))]
#[test]
#[ignore = "the Prometheus tests (tests/prometheus.rs) need `--features prometheus` (the README's test command)"]
fn prometheus() {
    unreachable!("ignored: run `cargo test --all-features`");
}

#[cfg(not(feature = "otel"))]
#[test]
#[ignore = "the OpenTelemetry tests (tests/otel.rs) need `--features otel` (the README's test command)"]
fn otel() {
    unreachable!("ignored: run `cargo test --all-features`");
}
