//! The JSON-RPC listener: accepting connections within `max_connections`, serving
//! each with HTTP/1.1 or h2c through the tower stack, and draining on shutdown.

use super::AppState;
use super::stack;
use super::watch::{self, Activity, WatchedIo};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The TCP peer of the connection a request came on, for what is limited per client.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Accepts until `shutdown`, then gives open connections `shutdown.drain_timeout`.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let http = &state.config.http;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Head and idle timeouts are ours (see `watch`): hyper's would merge them.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http.http2_max_streams)
        .keep_alive_interval(Some(http.keep_alive_timeout / 2))
        .keep_alive_timeout(http.keep_alive_timeout / 2);
    let builder = Arc::new(builder);
    // One permit per open client connection: at the cap, accepting pauses and
    // the kernel's backlog absorbs the excess instead of our memory.
    let limit = Arc::new(Semaphore::new(http.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead
                // of spinning on an error that repeats at once.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, state, &builder, shutdown).await;
            drop(permit);
        });
        // Reap finished connection tasks so the set stays the size of what is open.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain = state.config.shutdown.drain_timeout;
    if tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "connections still open after drain; closing"
        );
        connections.abort_all();
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let http = &state.config.http;
    let (header_timeout, keep_alive) = (http.header_read_timeout, http.keep_alive_timeout);
    let service = {
        let activity = activity.clone();
        // Everything this connection's requests hold counts against one budget.
        let budgets = state.connection_budgets();
        let stack = stack::build(state, peer);
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(budgets.clone());
            req.extensions_mut().insert(ClientAddr(peer));
            // A request in progress holds off the idle timeout (see `watch`).
            let guard = activity.request_started();
            let mut stack = stack.clone();
            async move {
                let answer = tower::Service::call(&mut stack, req).await;
                drop(guard);
                answer
            }
        })
    };
    let io = TokioIo::new(WatchedIo::new(stream, activity.clone()));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            expiry = watch::expired(&activity, header_timeout, keep_alive), if !closing => {
                if expiry == watch::Expiry::Head {
                    // Half a head has nothing to answer, and hyper's graceful close
                    // waits for the head to finish: drop the socket.
                    tracing::debug!(%peer, "request head not finished within header_read_timeout");
                    return;
                }
                // Graceful: an idle HTTP/1 connection closes now, HTTP/2 gets a GOAWAY.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
