//! Upstream WebSocket connections: opening, multiplexing, reconnecting.
//!
//! - `pending`: the id map of one connection (pure data).
//! - `mux`: a connection's multiplexer state: pending calls, the send queue, matching
//!   replies (pure data; **ids are allocated and replies matched here**).
//! - `conn`: the handle callers see: lifecycle state, slots, cookies, replay log.
//! - `socket`: serving one open socket (writer, reader, liveness).
//! - `reconnect`: the connection task's state machine: connect, prepare, serve, back off.
//! - `connect`: TCP, TLS and the WebSocket handshake.
//! - `backoff`: reconnect delays.
//! - `set`: the upstreams and their pools; adding and draining them.
//! - `health`: health checks.
//! - `balance`: power of two choices and rendezvous hashing (pure).
//! - `sessions`: `affinity = "connection"`, a connection per session, with replay.
//! - `discovery`: DNS discovery behind a `Resolver` trait.
//! - `wamp`: WAMP upstreams: the codec, joining a realm, and the JSON-RPC bridge.

mod backoff;
pub mod balance;
mod conn;
mod connect;
pub mod discovery;
mod health;
mod mux;
mod pending;
mod reconnect;
pub mod sessions;
mod set;
mod socket;
pub mod wamp;

pub use backoff::Backoff;
pub(crate) use conn::{Conn, ConnState, PoolSignals, PreludeCall, PushSink};
pub use connect::TargetError;
pub use discovery::{Resolver, SystemResolver};
pub use mux::{Failure, Reply};
pub(crate) use mux::{FrameIds, Refused, ReplySenders};
pub(crate) use pending::CallId;
pub use sessions::Sessions;
pub use set::{Upstream, Upstreams, prefix_for};

/// The pending map, for `benches/micro.rs` only: not part of the API.
#[doc(hidden)]
pub use pending::PendingMap;
/// The WAMP bridge's per-call work, for `benches/micro.rs` only: not part of the API.
#[doc(hidden)]
pub use wamp::BenchBridge as WampBridge;
