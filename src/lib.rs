//! rpcgate: plain HTTP JSON-RPC 2.0 in front of a service that speaks JSON-RPC only
//! over WebSocket.
//!
//! Clients `POST` calls, batches and notifications; rpcgate multiplexes them over a
//! few persistent upstream WebSocket connections, rewriting each request id to one
//! unique on its connection and restoring the client's id, byte for byte, in the reply.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, defaults, and validation that reports every problem.
//! - [`error`]: every failure a client can see, with its HTTP status and JSON-RPC code.
//! - [`jsonrpc`]: wire parsing and writing; params, results and ids stay raw bytes.
//!   **Ids are rewritten** by `Call::encode_prefix` + `finish_frame` and restored by
//!   `write_reply`.
//! - [`server`]: the HTTP listener (HTTP/1.1 + h2c), connection limits and timeouts;
//!   `server/rpc.rs` turns one HTTP request into exactly one answer.
//! - [`upstream`]: persistent WebSocket connections: the pending-id map
//!   (`upstream/pending.rs`), the socket task with on_connect and replay
//!   (`upstream/connection.rs`), connecting with TLS (`upstream/connect.rs`),
//!   reconnect backoff (`upstream/backoff.rs`), the upstream set, failover and
//!   picking a connection for a call (`upstream/pool.rs`), power of two choices and
//!   rendezvous hashing (`upstream/balance.rs`), per-session connections
//!   (`upstream/sessions.rs`) and DNS discovery (`upstream/discovery.rs`).
//! - [`logging`]: the tracing subscriber and the access log, both written to stderr
//!   by threads of their own so that no request waits for a log line.
//! - [`metrics`]: Prometheus metrics on a registry of our own; `server/admin.rs` serves
//!   them with `/healthz` and `/readyz`.
//! - [`echo`]: a small JSON-RPC-over-WebSocket backend for demos, tests and benchmarks.

pub mod config;
pub mod echo;
pub mod error;
pub mod jsonrpc;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod upstream;

pub use config::Config;
pub use error::Error;
pub use server::Gateway;
