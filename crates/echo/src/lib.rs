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
//! Methods: `echo`, `sum`, `sleep`, `whoami`, `fail`, `notify`.
//!
//! # Layout
//!
//! - this file: [`serve`], the accept loop and shutdown.
//! - `connection.rs`: one WebSocket: handshake, read loop, delayed replies, the writer
//!   that batches flushes, the Close on shutdown.
//! - `backend.rs`: one incoming message in, what to send back out: batches,
//!   notifications, and the table of methods.
//! - `methods.rs`: the methods that take any work: `sum` and `sleep`.
//! - `wire.rs`: reading a request object, writing replies and error codes.

mod backend;
mod connection;
mod methods;
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
    let local = listener.local_addr()?;
    let backend = Arc::new(Backend::new(&name));
    let connections = TaskTracker::new();
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
