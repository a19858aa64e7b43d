//! rpcgate: plain HTTP JSON-RPC 2.0 in front of a service that speaks JSON-RPC only
//! over WebSocket.
//!
//! Clients `POST` calls, batches and notifications; rpcgate multiplexes them over a
//! few persistent upstream WebSocket connections, rewriting each request id to one
//! unique on its connection and restoring the client's id, byte for byte, in the reply.
//!
//! # Where a call goes, step by step
//!
//! | step | file |
//! |---|---|
//! | accepted (by one of the shared-nothing workers), TLS handshake, connection limits and timeouts | `server/workers.rs`, `server/listener.rs`, `server/tls.rs`, `server/per_address.rs`, `server/watch.rs` |
//! | HTTP/1 or HTTP/2, idle connections parked between requests, event streams served without hyper | `server/connection.rs`, `server/prefixed.rs`, `server/detach.rs` |
//! | access log, HTTP metrics, panics, path/method/type/length checks | `server/stack.rs` (tower layers) |
//! | body read, parsed into borrowed calls | `server/rpc.rs`, `jsonrpc/request.rs` |
//! | route decided once (any / sticky / the session's own socket) | `server/rpc.rs`, `dispatch/route.rs` |
//! | one [`dispatch::Outbound`] message per call, notification or batch | `dispatch/outbound.rs` |
//! | admission: a slot, or a bounded wait for one | `dispatch/admission.rs` |
//! | pick: ordered candidate upstreams, least-loaded connection | `dispatch/select.rs`, `upstream/balance.rs` |
//! | **ids allocated** and the frame queued, one critical section | `upstream/mux.rs` (`Mux::submit`), `upstream/pending.rs` |
//! | **ids rewritten**: the frame finished with our id, appended last | `jsonrpc/upstream.rs` (`finish_frame`) |
//! | written to the socket, coalesced per flush | `upstream/socket.rs` |
//! | **replies matched** to their callers by our id | `upstream/mux.rs` (`Mux::deliver`), `jsonrpc/upstream.rs` (`read_upstream`) |
//! | failover, retries, call metrics | `dispatch/mod.rs` (`send`) |
//! | **ids restored**: the client's id bytes around the upstream's payload | `jsonrpc/reply.rs` (`write_reply`), `server/response.rs` |
//!
//! And the other way: a notification or request the upstream sends on its own is found
//! in its frame (`jsonrpc/upstream.rs`, `Message::Pushed`), routed to a push session
//! (`push/mod.rs`: a session's own socket, or a subscription by its id), kept in the
//! session's numbered buffer (`push/mailbox.rs`), and read by its event stream,
//! long-poll (`server/events.rs`) or WebSocket (`server/ws.rs`).
//!
//! # Modules
//!
//! - [`budget`]: the memory budget: bytes held for clients, refused past the limit.
//! - [`config`]: the TOML file, defaults, and validation that reports every problem.
//! - [`dispatch`]: the one way into an upstream socket, for every kind of message.
//! - [`error`]: every failure a client can see, with its HTTP status and JSON-RPC code.
//! - [`jsonrpc`]: wire parsing and writing; params, results and ids stay raw bytes.
//! - [`server`]: the HTTP listener (HTTP/1.1 + HTTP/2, over TLS or h2c), its tower stack, and the admin
//!   listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`tls`]: rustls configurations from PEM files, for the listener (and its client
//!   certificates) and for upstreams that ask for a client certificate.
//! - [`upstream`]: persistent WebSocket connections: the multiplexer state, the socket
//!   task and its reconnect state machine, TLS, the upstream set, health checks,
//!   sessions with their own socket, DNS discovery.
//! - [`logging`]: the tracing subscriber and the access log, both written to stderr
//!   by threads of their own so that no request waits for a log line.
//! - [`metrics`]: Prometheus metrics on a registry of our own, always present.
//! - [`push`]: push sessions, their buffers, subscriptions that survive reconnects, and
//!   requests from upstreams waiting for their client's answer.
//!
//! The demo backend behind `rpcgate demo` and `rpcgate echo-server` is a crate of its
//! own (`crates/echo`), not part of the gateway.

pub mod access;
pub mod budget;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod jsonrpc;
pub mod logging;
pub mod metrics;
pub mod push;
pub mod server;
pub mod tls;
pub mod upstream;

/// Pure parsers that are otherwise private, reachable for the fuzz targets in `fuzz/`
/// (docs/testing.md, "Fuzzing"); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::server::events::resume_after;
}

pub use config::Config;
pub use error::Error;
pub use server::Gateway;
