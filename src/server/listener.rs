//! The JSON-RPC listener: accepting connections, the TLS handshake (in each
//! connection's task, never in the accept loop), serving each with HTTP/1.1 or HTTP/2
//! through the tower stack, answering the ones over `max_connections` (503) or
//! `max_connections_per_address` (429) at once, and draining on shutdown.

use super::AppState;
use super::accept::{self, AcceptErrors};
use super::per_address::AddressPlace;
use super::refuse::{REFUSE_WITHIN, refuse_connection};
use super::stack;
use super::tls::{ClientIdentity, Listener};
use super::watch::{self, Activity, Expiry, Limits, WatchedIo};
use crate::budget::Budgets;
use crate::error::{Busy, Error};
use crate::metrics::Metrics;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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

/// The largest HTTP/2 flow-control window (RFC 9113, section 6.9.1).
const H2_MAX_WINDOW: usize = (1 << 31) - 1;

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

fn builder(state: &AppState) -> auto::Builder<TokioExecutor> {
    let http = &state.config.http;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper panics below 8 KiB; the config check refuses smaller values, and this
    // keeps a hand-built `Config` from panicking.
    let head = http.max_header_bytes.max(8192);
    // Head and idle timeouts are ours (see `watch`): hyper's would merge them.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        // The read buffer's ceiling, so the largest head (hyper answers 431 past it),
        // and the ceiling of what hyper queues for writing.
        .max_buf_size(head);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http.http2_max_streams)
        .keep_alive_interval(Some(http.keep_alive_timeout / 2))
        .keep_alive_timeout(http.keep_alive_timeout / 2)
        .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX))
        .max_send_buf_size(http.http2_send_buffer_bytes.clamp(1, u32::MAX as usize))
        .initial_stream_window_size(window(http.http2_stream_window_bytes))
        .initial_connection_window_size(window(http.http2_connection_window_bytes));
    builder
}

fn window(bytes: usize) -> u32 {
    bytes.clamp(65_535, H2_MAX_WINDOW) as u32
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
    let builder = Arc::new(builder(&state));
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
        let builder = builder.clone();
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
                    serve_connection(io, conn, state, &builder, shutdown, place.clone()).await;
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
                        refuse_connection(io, peer, &builder, why).await;
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

/// Who is on the other end of a connection.
struct Conn {
    peer: SocketAddr,
    /// The verified client certificate's subject (mTLS).
    identity: Option<ClientIdentity>,
}

async fn serve_connection(
    io: ClientIo,
    conn: Conn,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    place: Place,
) {
    let Conn { peer, identity } = conn;
    let activity = Activity::new();
    let http = &state.config.http;
    let limits = Limits {
        header_timeout: http.header_read_timeout,
        keep_alive: http.keep_alive_timeout,
        write_timeout: http.write_timeout,
    };
    let service = {
        let activity = activity.clone();
        let info = Arc::new(ConnInfo {
            budgets: state.connection_budgets(),
            peer,
            identity,
            place,
        });
        // Carried by the stack's services, not put in each request's extensions:
        // that would be three allocations per request.
        let stack = stack::build(state, info);
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            // A request in progress holds off the idle timeout (see `watch`).
            let guard = activity.request_started();
            let mut stack = stack.clone();
            async move {
                let answer = tower::Service::call(&mut stack, req).await;
                // Held until the body is sent: an event stream is a request in
                // progress for as long as it runs.
                answer.map(|resp| {
                    resp.map(|body| Guarded {
                        body,
                        _guard: guard,
                    })
                })
            }
        })
    };
    let io = TokioIo::new(WatchedIo::new(io, activity.clone()));
    // Boxed: hyper's connection state is large, and inline it would size this task's
    // allocation, which lives until the task is joined.
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(io, service));
    // Set when the graceful close starts: it is bounded too (see `watch::closed_by`).
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        let close_bound = async {
            match closing {
                Some(since) => watch::closed_by(&activity, since, limits.write_timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            expiry = watch::expired(&activity, limits, closing.is_some()) => match expiry {
                // Half a head has nothing to answer, and hyper's graceful close
                // waits for the head to finish: drop the socket.
                Expiry::Head => {
                    tracing::debug!(%peer, "request head not finished within header_read_timeout");
                    return;
                }
                // A graceful close would wait on the very writes that are stuck;
                // dropping releases the answers held for this client.
                Expiry::WriteStalled => {
                    tracing::debug!(%peer, "client read nothing for write_timeout; connection dropped");
                    return;
                }
                // Graceful: an idle HTTP/1 connection closes now, HTTP/2 gets a GOAWAY.
                Expiry::Idle => {
                    closing = Some(tokio::time::Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
            },
            _ = close_bound => {
                tracing::debug!(%peer, "graceful close not finished within write_timeout; connection dropped");
                return;
            }
            _ = shutdown.cancelled(), if closing.is_none() => {
                closing = Some(tokio::time::Instant::now());
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A response body that holds something until hyper has sent all of it.
struct Guarded<B, G> {
    body: B,
    _guard: G,
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
