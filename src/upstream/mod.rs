//! Upstream WebSocket connections: opening, multiplexing, reconnecting.
//!
//! - `pending`: the id map of one connection (pure data).
//! - `connection`: the task that owns one socket; id rewriting and reply matching.
//! - `connect`: TCP, TLS and the WebSocket handshake.
//! - `backoff`: reconnect delays.
//! - `pool`: choosing a connection for a call and waiting for room.

mod backoff;
mod connect;
mod connection;
mod pending;
mod pool;

pub use backoff::Backoff;
pub use connect::TargetError;
pub use connection::{ConnState, Reply};
pub use pending::{CallId, PendingMap};
pub use pool::Upstreams;
