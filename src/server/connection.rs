//! Serving one accepted client connection: telling HTTP/1.1 from HTTP/2, driving
//! hyper's connection under our timeouts (see `watch`), and parking idle HTTP/1
//! connections.
//!
//! Parking: hyper keeps, per HTTP/1 connection, an 8 KiB read buffer, an 8 KiB write
//! buffer and its dispatcher for as long as the connection is open, idle keep-alive
//! time included, and no option of hyper's shrinks them. Most of a gateway's
//! connections are idle most of the time, so between requests we take hyper's
//! connection apart (`into_parts`: the socket, any bytes read ahead, the service),
//! keep only the socket and the service, wait until the socket is readable, and build
//! a fresh hyper connection over the same two. hyper's buffers are then allocated
//! only while a request is on its way. HTTP/2 is not parked: its state is shared by
//! its streams, and hyper has no way to take it apart.

use super::AppState;
use super::detach::{self, Detachable};
use super::listener::{ClientIo, ConnInfo, Place};
use super::prefixed::{self, Prefixed, Protocol};
use super::stack;
use super::tls::ClientIdentity;
use super::watch::{self, Activity, Expiry, Limits, WatchedIo};
use crate::metrics::Metrics;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// How long an HTTP/1 connection stays idle before it is parked. A busy client
/// sends its next request within a round trip of its answer (tens of microseconds
/// on a LAN): parking every such gap would drop and rebuild hyper's buffers once per
/// request. Short, all the same: during a burst of clients that then go quiet, every
/// connection answered within the last `PARK_AFTER` still holds its buffers, and
/// glibc keeps the peak those make (100 ms measured 108-113 MB for the 10,000 idle
/// clients of the bench, against 92 MB parking at once).
const PARK_AFTER: Duration = Duration::from_millis(10);

/// The largest HTTP/2 flow-control window (RFC 9113, section 6.9.1).
const H2_MAX_WINDOW: usize = (1 << 31) - 1;

/// A client connection's stream as hyper sees it: bytes read to detect the protocol
/// (or read ahead by a parked connection) first, and every read and write watched.
pub type Io = Prefixed<WatchedIo<ClientIo>>;

/// hyper's settings for the listener's connections, built once.
pub struct Builders {
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub fn new(state: &AppState) -> Builders {
        let http = &state.config.http;
        // hyper panics below 8 KiB; the config check refuses smaller values, and this
        // keeps a hand-built `Config` from panicking.
        let head = http.max_header_bytes.max(8192);
        let mut h1 = http1::Builder::new();
        // Head and idle timeouts are ours (see `watch`): hyper's would merge them.
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            // The read buffer's ceiling, so the largest head (hyper answers 431 past
            // it), and the ceiling of what hyper queues for writing.
            .max_buf_size(head);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(http.http2_max_streams)
            .keep_alive_interval(Some(http.keep_alive_timeout / 2))
            .keep_alive_timeout(http.keep_alive_timeout / 2)
            .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX))
            .max_send_buf_size(http.http2_send_buffer_bytes.clamp(1, u32::MAX as usize))
            .initial_stream_window_size(window(http.http2_stream_window_bytes))
            .initial_connection_window_size(window(http.http2_connection_window_bytes));
        Builders { h1, h2 }
    }
}

fn window(bytes: usize) -> u32 {
    bytes.clamp(65_535, H2_MAX_WINDOW) as u32
}

/// Whether the TLS handshake settled on HTTP/2. Without ALPN (or over plain TCP)
/// the first bytes tell, as they did when hyper-util detected the protocol.
pub fn negotiated_h2(io: &ClientIo) -> bool {
    match io {
        Either::Left(_) => false,
        Either::Right(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
    }
}

/// Who is on the other end of a connection.
pub struct Conn {
    pub peer: SocketAddr,
    /// The verified client certificate's subject (mTLS).
    pub identity: Option<ClientIdentity>,
}

/// What the driving loop watches, for one connection.
#[derive(Clone, Copy)]
struct Watch<'a> {
    activity: &'a Activity,
    limits: Limits,
    peer: SocketAddr,
    /// HTTP/1.1: where an event stream offers itself to be served without hyper.
    detach: Option<&'a Detachable>,
}

/// What serving HTTP/1 needs besides the connection's watch.
struct H1<'a> {
    builder: &'a http1::Builder,
    activity: &'a Arc<Activity>,
    metrics: &'a Metrics,
    /// Bytes a client may send ahead while its event stream is served without hyper.
    max_ahead: usize,
}

pub async fn serve_connection(
    io: ClientIo,
    conn: Conn,
    state: Arc<AppState>,
    builders: &Builders,
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
    let h2 = negotiated_h2(&io);
    let metrics = state.metrics.clone();
    let max_ahead = state.config.http.max_header_bytes;
    let info = Arc::new(ConnInfo {
        budgets: state.connection_budgets(),
        peer,
        identity,
        place,
        detach: Detachable::default(),
    });
    let service = {
        let activity = activity.clone();
        // Carried by the stack's services, not put in each request's extensions:
        // that would be three allocations per request.
        let stack = stack::build(state, info.clone());
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
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
    let watch = Watch {
        activity: &activity,
        limits,
        peer,
        detach: None,
    };
    let mut io = WatchedIo::new(io, activity.clone());
    let (protocol, read) = if h2 {
        (Protocol::Http2, Bytes::new())
    } else {
        // Through the watched stream: the keep-alive limit covers a client that never
        // sends a byte, the head limit one that stops inside the first line.
        tokio::select! {
            detected = prefixed::detect(&mut io) => match detected {
                Ok(detected) => detected,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "client connection failed before its first request");
                    return;
                }
            },
            expiry = watch::expired(&activity, limits, false) => {
                tracing::debug!(%peer, ?expiry, "client connection closed before its first request");
                return;
            }
            _ = shutdown.cancelled() => return,
        }
    };
    let io = Prefixed::new(read, io);
    match protocol {
        Protocol::Http2 => {
            activity.serving_h2();
            // Boxed: hyper's connection state is large, and inline it would size this
            // task's allocation, which lives until the task is joined.
            let mut conn = Box::pin(builders.h2.serve_connection(TokioIo::new(io), service));
            drive(
                conn.as_mut(),
                |c| c.graceful_shutdown(),
                false,
                watch,
                &shutdown,
            )
            .await;
        }
        Protocol::Http1 => {
            let watch = Watch {
                detach: Some(&info.detach),
                ..watch
            };
            let h1 = H1 {
                builder: &builders.h1,
                activity: &activity,
                metrics: &metrics,
                max_ahead,
            };
            serve_h1(io, service, h1, watch, &shutdown).await;
        }
    }
}

/// Serves HTTP/1 requests until the connection ends, parking it whenever it is idle.
async fn serve_h1<S, B>(
    mut io: Io,
    mut service: S,
    h1: H1<'_>,
    watch: Watch<'_>,
    shutdown: &CancellationToken,
) where
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    loop {
        // With upgrades: a WebSocket client's 101 hands the socket to `ws`, through
        // `hyper::upgrade::on`. Boxed, so that a parked connection's task is small.
        let mut conn = Box::new(
            h1.builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let driven = drive(
            Pin::new(&mut *conn),
            |c| c.graceful_shutdown(),
            true,
            watch,
            shutdown,
        )
        .await;
        if let Driven::Ended = driven {
            return;
        }
        // Taken while hyper's connection still holds the stream's body.
        let detached_events = match driven {
            Driven::Detach => watch.detach.and_then(Detachable::take),
            _ => None,
        };
        let detaching = matches!(driven, Driven::Detach);
        // `None` only once upgraded, which ends the connection instead.
        let Some(parts) = conn.into_parts() else {
            return;
        };
        let http1::Parts {
            io: parked,
            read_buf,
            service: kept,
            ..
        } = parts;
        io = parked.into_inner();
        service = kept;
        if detaching {
            let Some(events) = detached_events else {
                io = io.with_prefix(read_buf);
                continue;
            };
            let ahead = read_buf.to_vec();
            drop(read_buf);
            let detached = Counted::new(&h1.metrics.event_streams_detached);
            let limits = watch.limits;
            let ended = detach::serve(
                &mut io,
                events,
                ahead,
                h1.max_ahead,
                limits.write_timeout,
                h1.activity,
                shutdown,
            )
            .await;
            drop(detached);
            match ended {
                detach::Ended::KeepAlive(ahead) => {
                    if !ahead.is_empty() {
                        watch.activity.head_bytes_buffered();
                        io = io.with_prefix(ahead);
                    }
                    continue;
                }
                detach::Ended::Close => {
                    let _ = tokio::time::timeout(limits.write_timeout, io.shutdown()).await;
                    return;
                }
                detach::Ended::Drop => return,
            }
        }
        if !read_buf.is_empty() {
            // The start of a pipelined request, read with the last one: a new hyper
            // connection reads it first. Not parked again until that request starts.
            watch.activity.head_bytes_buffered();
            io = io.with_prefix(read_buf);
            continue;
        }
        // Dropped before waiting: even empty, it would hold hyper's 8 KiB read buffer.
        drop(read_buf);
        if let Either::Right(tls) = io.get_ref().get_ref()
            && !tls.get_ref().1.wants_read()
        {
            // rustls holds plaintext (or the client's close_notify) that no TCP byte
            // will announce. `parkable` rules this out (hyper's last read found
            // rustls empty); should it happen, hyper reads it at once.
            continue;
        }
        super::trim::connection_parked();
        let counted = Counted::new(&h1.metrics.http_connections_parked);
        let parked = park(&io, watch, shutdown).await;
        drop(counted);
        match parked {
            Parked::Readable => {}
            Parked::Close => {
                // As hyper closes an idle connection: TLS's close_notify, then FIN.
                let close = io.shutdown();
                if tokio::time::timeout(watch.limits.write_timeout, close)
                    .await
                    .is_err()
                {
                    tracing::debug!(peer = %watch.peer, "parked connection did not close within write_timeout; dropped");
                }
                return;
            }
            Parked::Drop => return,
        }
    }
}

/// Counts a connection in a gauge while it lives: however the wait ends, the
/// connection's task aborted at the end of a drain included.
struct Counted<'a>(&'a IntGauge);

impl<'a> Counted<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a parked connection's wait ended.
enum Parked {
    /// Bytes (or the end of the stream) arrived: time for a hyper connection again.
    Readable,
    /// Idle for `keep_alive_timeout`, or the server is shutting down.
    Close,
    Drop,
}

/// Waits, holding no hyper state, until the client sends something or the connection
/// is to close.
async fn park(io: &Io, watch: Watch<'_>, shutdown: &CancellationToken) -> Parked {
    let stream = io.get_ref().get_ref();
    let readable = async {
        match stream {
            Either::Left(tcp) => tcp.readable().await,
            // Waiting on the TCP socket is waiting for the next plaintext byte: when
            // hyper's last read of the TLS stream returned Pending (a condition of
            // parking), tokio-rustls had found no plaintext in rustls and had read TCP
            // until it would block. A partial record rustls holds needs more TCP bytes.
            Either::Right(tls) => tls.get_ref().0.readable().await,
        }
    };
    tokio::select! {
        // Closing wins over a request arriving at the same moment, as it does for
        // hyper's idle connections.
        biased;
        _ = shutdown.cancelled() => Parked::Close,
        expiry = watch::expired(watch.activity, watch.limits, false) => match expiry {
            Expiry::Idle => {
                tracing::debug!(peer = %watch.peer, "idle for keep_alive_timeout; parked connection closed");
                Parked::Close
            }
            // Neither can start while parked: nothing is read or written.
            Expiry::Head | Expiry::WriteStalled => Parked::Drop,
        },
        readable = readable => match readable {
            Ok(()) => Parked::Readable,
            Err(e) => {
                tracing::debug!(peer = %watch.peer, error = %e, "parked connection failed");
                Parked::Drop
            }
        },
    }
}

/// How driving a hyper connection ended.
enum Driven {
    Ended,
    /// Idle (see [`Activity::parkable`]): its parts may be taken.
    Idle,
    /// An event stream's head and all it was given so far went out, and the stream
    /// offered itself to be served without hyper (`detach.rs`).
    Detach,
}

/// Drives `conn` under the connection's timeouts until it ends, or, with `park`,
/// until it is idle. `close` starts hyper's graceful close.
async fn drive<C>(
    mut conn: Pin<&mut C>,
    close: impl Fn(Pin<&mut C>),
    park: bool,
    watch: Watch<'_>,
    shutdown: &CancellationToken,
) -> Driven
where
    C: Future<Output = hyper::Result<()>>,
{
    let Watch {
        activity,
        limits,
        peer,
        detach,
    } = watch;
    // Set when the graceful close starts: it is bounded too (see `watch::closed_by`).
    let mut closing: Option<Instant> = None;
    // Whether the connection has been parkable since `linger` was set to park it.
    let mut lingering = false;
    // Boxed, and only once idle: inline, it would size every connection's task,
    // parked ones included.
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let close_bound = async {
            match closing {
                Some(since) => watch::closed_by(activity, since, limits.write_timeout).await,
                None => std::future::pending().await,
            }
        };
        // A closing connection is not parked: hyper finishes it.
        let may_park = park && closing.is_none();
        let served = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Ok(result));
            }
            // hyper waits for the stream's next chunk with nothing left to write.
            if may_park && activity.output_flushed() && detach.is_some_and(Detachable::is_offered) {
                return Poll::Ready(Err(Driven::Detach));
            }
            // Checked right after hyper's poll, when it has done all it can until the
            // client sends or reads more.
            if !(may_park && activity.parkable()) {
                lingering = false;
                return Poll::Pending;
            }
            let deadline = Instant::now() + PARK_AFTER;
            let timer = linger.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if !lingering {
                lingering = true;
                timer.as_mut().reset(deadline);
            }
            // Parkable at every poll since the timer was set: a request in between
            // would have reset it.
            timer.as_mut().poll(cx).map(|()| Err(Driven::Idle))
        });
        tokio::select! {
            served = served => match served {
                Ok(result) => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    }
                    return Driven::Ended;
                }
                // Idle, or detaching: the caller takes the connection apart.
                Err(step) => return step,
            },
            expiry = watch::expired(activity, limits, closing.is_some()) => match expiry {
                // Half a head has nothing to answer, and hyper's graceful close
                // waits for the head to finish: drop the socket.
                Expiry::Head => {
                    tracing::debug!(%peer, "request head not finished within header_read_timeout");
                    return Driven::Ended;
                }
                // A graceful close would wait on the very writes that are stuck;
                // dropping releases the answers held for this client.
                Expiry::WriteStalled => {
                    tracing::debug!(%peer, "client read nothing for write_timeout; connection dropped");
                    return Driven::Ended;
                }
                // Graceful: an idle HTTP/1 connection closes now, HTTP/2 gets a GOAWAY.
                Expiry::Idle => {
                    closing = Some(Instant::now());
                    close(conn.as_mut());
                }
            },
            _ = close_bound => {
                tracing::debug!(%peer, "graceful close not finished within write_timeout; connection dropped");
                return Driven::Ended;
            }
            _ = shutdown.cancelled(), if closing.is_none() => {
                closing = Some(Instant::now());
                close(conn.as_mut());
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
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
