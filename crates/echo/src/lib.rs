//! A small JSON-RPC 2.0 over WebSocket backend for demos, smoke tests and benchmarks:
//! what `rpcgate demo` puts behind the gateway and `rpcgate echo-server` serves alone.
//!
//! Benchmarks use it as the upstream, so anything it costs shows up as gateway
//! overhead. That is why `params` and `id` stay `&RawValue` and are spliced into the
//! reply as they came, and why replies are built by appending to one `String` rather
//! than serializing a `Value`.
//!
//! It deliberately does not share the gateway's parser (`rpcgate::jsonrpc`), nor depend
//! on the rpcgate crate at all: an upstream that reads requests with the same code as
//! the gateway that writes them would hide the bugs the two have in common.
//!
//! Methods:
//!
//! - `echo`: `params` as sent (`null` if absent).
//! - `sum`: the sum of an array of numbers.
//! - `sleep` `[ms]`: replies `ms` after that long (at most 60000), without holding up
//!   other calls.
//! - `whoami`: the server name.
//! - `fail`: error -32000 `"requested failure"` with `params` as `data`.
//! - `notify`: pushes `{"jsonrpc":"2.0","method":"notification","params":<params>}`,
//!   then replies `true`.
//! - `notify_me` `[value]`: replies `true`, then pushes
//!   `{"jsonrpc":"2.0","method":"notice","params":[value]}` (params as sent).
//! - `ticks_subscribe` `[interval_ms]` (default 1000, clamped to 10..=60000): replies a
//!   subscription id unique on the connection (`"tick-1"`, `"tick-2"`, ...), then
//!   every interval, the first one interval after the reply, pushes
//!   `{"jsonrpc":"2.0","method":"ticks","params":{"subscription":"tick-1","result":N}}`
//!   with N = 1, 2, 3, ... At most 64 active per connection (error -32000 past that).
//!   As a notification it subscribes nothing.
//! - `ticks_unsubscribe` `[id]`: `true` if the subscription was active on this
//!   connection, and no tick of it follows the reply; else `false`.
//! - `ask` `[question]`: sends the client the request
//!   `{"jsonrpc":"2.0","id":"ask-1","method":"confirm","params":[question]}` (ids
//!   `ask-1`, `ask-2`, ... per connection) and replies once the client responds:
//!   `{"question":question,"answer":<its result>}`; error -32001
//!   `"client refused: <its message>"` with its error object as `data` if it answered
//!   with an error; error -32002 after 30 s without an answer. Other calls are served
//!   meanwhile. Not allowed in a batch (-32600), ignored as a notification; at most
//!   256 waiting per connection (-32000). Responses with an unknown id are ignored.
//!
//! Subscriptions and asks belong to their connection and end with it.
//!
//! # Layout
//!
//! - this file: [`serve`], the accept loop and shutdown.
//! - `connection.rs`: one WebSocket: handshake, read loop, delayed replies, starting
//!   tickers and `ask` waits, the writer that batches flushes, the Close on shutdown.
//! - `backend.rs`: one incoming message in, what to send back out: batches,
//!   notifications, the table of methods, and the `Session` a connection keeps
//!   between messages (its subscriptions and waiting `ask`s).
//! - `methods.rs`: the methods that take any work: `sum` and `sleep`.
//! - `ticks.rs`: a connection's subscriptions and the task ticking for each.
//! - `ask.rs`: a connection's requests to the client waiting for an answer, and the
//!   reply an answer becomes.
//! - `wire.rs`: reading a request object or a client's response, writing replies,
//!   pushed messages and error codes.
//! - `push_tests.rs`: the pushing methods against a real socket.

mod ask;
mod backend;
mod connection;
mod methods;
#[cfg(test)]
mod push_tests;
mod ticks;
mod wire;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::Backend;

/// Bounds of the pause after an accept error that is not about one connection
/// (typically running out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves JSON-RPC over WebSocket on `listener` until `shutdown` is cancelled.
///
/// On shutdown it stops accepting, sends every open connection a Close frame (1001,
/// going away) and returns once they are closed, waiting at most a few seconds for
/// peers that do not answer. Accept errors are logged and retried rather than
/// returned: a backend that stops at the first `EMFILE` would turn a load spike in a
/// benchmark into a dead upstream.
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_tracked(listener, name, shutdown, TaskTracker::new()).await
}

/// [`serve`], running every connection and every task a connection starts (tickers,
/// `ask`s waiting) on `tasks`, which is empty again once they have all ended.
pub(crate) async fn serve_tracked(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let backend = Arc::new(Backend::new(&name));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    info!(%local, %name, "echo backend listening");

    loop {
        // `accept` is cancel-safe: losing the race to shutdown drops no connection.
        // Biased so that a listener with a backlog cannot delay shutdown.
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                connections.spawn(connection::run(
                    stream,
                    peer,
                    backend.clone(),
                    connections.clone(),
                    shutdown.clone(),
                ));
            }
            Err(error) if is_connection_error(&error) => {
                debug!(%error, "echo backend: accept failed for one connection");
            }
            Err(error) => {
                warn!(%error, ?backoff, "echo backend: accept failed, retrying");
                // Sleeping is cancel-safe; shutdown must not wait for the backoff.
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }

    drop(listener);
    connections.close();
    connections.wait().await;
    info!(%local, "echo backend stopped");
    Ok(())
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
