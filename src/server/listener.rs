//! The JSON-RPC listener: accepting connections, the TLS handshake (in each
//! connection's task, never in the accept loop), serving each with HTTP/1.1 or HTTP/2
//! through the tower stack, answering the ones over `max_connections` (503) or
//! `max_connections_per_address` (429) at once, and draining on shutdown.

use super::AppState;
use super::accept::{self, AcceptErrors};
use super::connection::{Builders, Conn, serve_connection};
use super::per_address::AddressPlace;
use super::refuse::{REFUSE_WITHIN, refuse_connection};
use super::tls::{ClientIdentity, Listener};
use crate::budget::Budgets;
use crate::error::{Busy, Error};
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// A client connection's bytes: plain TCP, or TLS over it. Boxed, as a rustls
/// connection's state is kilobytes that plain connections need not carry.
pub type ClientIo = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Sockets over `max_connections` being answered 503 at once, at most (or
/// `max_connections` itself, if smaller). Past it accepting pauses and the kernel's
/// backlog holds the rest: refusing costs a socket and a task each, so it is bounded too.
pub const MAX_REFUSING: usize = 1024;

/// What every request on a connection carries, as one request extension: each
/// extension is a heap allocation of its own, per request.
pub struct ConnInfo {
    /// Everything this connection's requests hold counts against these.
    pub budgets: Budgets,
    /// The TCP peer, for what is limited per client.
    pub peer: SocketAddr,
    /// The verified TLS client certificate, if the client sent one.
    pub identity: Option<ClientIdentity>,
    /// The connection's place among `max_connections`.
    pub place: Place,
    /// An HTTP/1.1 event stream's chunks, which the connection may serve without hyper.
    pub detach: super::detach::Detachable,
}

/// A connection's place among `max_connections`, which a WebSocket client takes over
/// when its connection is upgraded: hyper is then done with it, but the socket stays.
#[derive(Clone)]
pub struct Place(Arc<parking_lot::Mutex<Option<Open>>>);

impl Place {
    /// Takes the place, to be held for as long as the upgraded socket lives.
    pub fn take(&self) -> Option<impl Send + 'static> {
        self.0.lock().take()
    }
}

/// Holds one of the `max_connections` places, and one of its address's, while its
/// connection is served.
struct Open {
    _permit: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
    metrics: Arc<Metrics>,
}

impl Open {
    fn new(
        permit: OwnedSemaphorePermit,
        address: Option<AddressPlace>,
        metrics: Arc<Metrics>,
    ) -> Open {
        metrics.http_connections_open.inc();
        Open {
            _permit: permit,
            _address: address,
            metrics,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // `/readyz` reads this gauge against max_connections.
        self.metrics.http_connections_open.dec();
        super::trim::connection_closed();
    }
}

/// Whether the listener serves `max_connections` connections now: `/readyz` says not
/// ready then, so a load balancer sends new clients elsewhere.
pub fn at_capacity(state: &AppState) -> bool {
    // The places every worker takes from, rather than this worker's gauge.
    state.shared.served.available_permits() == 0
}

/// What an accepted socket gets.
enum Seat {
    Served(Open),
    /// Answered with this error and closed.
    Refused(OwnedSemaphorePermit, Error),
}

/// Accepts until `shutdown`, then gives open connections `shutdown.drain_timeout`.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let builders = Arc::new(Builders::new(&state));
    // One permit per served connection, and a smaller pool for the ones refused:
    // both full, accepting pauses and the kernel's backlog absorbs the excess
    // instead of our memory. Shared by every worker's accept loop (`runtime.workers`).
    let limit = state.shared.served.clone();
    let refusing = state.shared.refusing.clone();
    let per_address = state.shared.per_address.clone();
    let mut errors = AcceptErrors::default();
    let mut connections = JoinSet::new();
    loop {
        // Only accept loops take permits, so a place seen free here is still free
        // after the accept, unless another worker's loop took it meanwhile: that
        // connection is refused as if it had come a moment later.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // A finished task keeps its allocation until joined: reap while waiting,
            // or a burst of closed connections stays resident until the next accept.
            Some(_) = connections.join_next() => continue,
            p = limit.acquire() => if p.is_err() { break },
            p = refusing.acquire() => if p.is_err() { break },
        }
        let accepted = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break None,
                Some(_) = connections.join_next() => {}
                a = listener.accept() => break Some(a),
            }
        };
        let Some(accepted) = accepted else { break };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                errors.note("http", &e);
                tokio::time::sleep(accept::BACKOFF).await;
                continue;
            }
        };
        let refuse = |why: Error| {
            let permit = refusing.clone().try_acquire_owned().ok()?;
            Some(Seat::Refused(permit, why))
        };
        let seat = match limit.clone().try_acquire_owned() {
            Ok(p) => match per_address
                .as_ref()
                .map(|t| (t.enter(peer.ip()), t.limit()))
            {
                None => Some(Seat::Served(Open::new(p, None, state.metrics.clone()))),
                Some((Some(place), _)) => Some(Seat::Served(Open::new(
                    p,
                    Some(place),
                    state.metrics.clone(),
                ))),
                Some((None, limit)) => refuse(Error::TooManyConnectionsFromAddress { limit }),
            },
            Err(_) => refuse(Error::Overloaded(Busy::Connections)),
        };
        // No place to refuse from: only when a place among max_connections was free
        // but the client's address is at its limit (the wait above is for either
        // pool). Closing unanswered is the bounded answer then.
        let Some(seat) = seat else { continue };
        let state = state.clone();
        let builders = builders.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let head = state.config.http.header_read_timeout;
            match seat {
                Seat::Served(open) => {
                    let Some((io, identity)) = secure(&state, stream, peer, head).await else {
                        return;
                    };
                    let place = Place(Arc::new(parking_lot::Mutex::new(Some(open))));
                    let conn = Conn { peer, identity };
                    serve_connection(io, conn, state, &builders, shutdown, place.clone()).await;
                    drop(place);
                }
                Seat::Refused(permit, why) => {
                    let reason = match why {
                        Error::TooManyConnectionsFromAddress { .. } => {
                            "max_connections_per_address"
                        }
                        _ => "max_connections",
                    };
                    let refused = &state.metrics.http_connections_refused;
                    refused.with_label_values(&[reason]).inc();
                    let within = head.min(REFUSE_WITHIN);
                    if let Some((io, _)) = secure(&state, stream, peer, within).await {
                        refuse_connection(io, peer, &builders, why).await;
                    }
                    drop(permit);
                }
            }
        });
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

/// The connection's bytes, after the TLS handshake if the listener has TLS.
async fn secure(
    state: &AppState,
    stream: TcpStream,
    peer: SocketAddr,
    within: Duration,
) -> Option<(ClientIo, Option<ClientIdentity>)> {
    let _ = stream.set_nodelay(true);
    match &state.tls {
        None => Some((Either::Left(stream), None)),
        Some(tls) => {
            let (stream, identity) = tls.accept(stream, peer, within, Listener::Rpc).await?;
            Some((Either::Right(Box::new(stream)), identity))
        }
    }
}
