//! axum integration (feature `axum`): a WebSocket as a user's event sink.
