//! In a plain `cargo test`, the chat server tests (`tests/chat_server.rs`) are compiled
//! out; this shows them as ignored, with the reason, instead of letting them vanish.
#![cfg(not(feature = "axum"))]

#[test]
#[ignore = "the chat server tests need `--features axum` (the README's test command)"]
fn chat_server() {
    unreachable!("ignored: run `cargo test --all-features`");
}
