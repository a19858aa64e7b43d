//! Upstream WebSocket connections: opening, multiplexing, reconnecting.
//!
//! - `pending`: the id map of one connection (pure data).
//! - `connection`: the task that owns one socket; id rewriting and reply matching.
//! - `connect`: TCP, TLS and the WebSocket handshake.
//! - `backoff`: reconnect delays.
//! - `pool`: the upstreams and their pools; choosing a connection for a call,
//!   waiting for room, failover.
//! - `balance`: power of two choices and rendezvous hashing (pure).
//! - `sessions`: `affinity = "connection"`, a connection per session, with replay.
//! - `discovery`: DNS discovery behind a `Resolver` trait.

mod backoff;
pub mod balance;
mod connect;
mod connection;
pub mod discovery;
mod pending;
mod pool;
pub mod sessions;

pub use backoff::Backoff;
pub use connect::TargetError;
pub use connection::{ConnState, Reply, Shared};
pub use discovery::{Resolver, SystemResolver};
pub use pending::{CallId, PendingMap};
pub use pool::{Route, Upstream, Upstreams};
pub use sessions::Sessions;
