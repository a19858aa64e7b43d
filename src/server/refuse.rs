//! Connections accepted over a limit (`http.max_connections`,
//! `http.max_connections_per_address`): every request on one gets the limit's error
//! and the connection closes, fast and bounded.

use super::connection::{Builders, negotiated_h2};
use super::listener::ClientIo;
use super::prefixed::{self, Prefixed, Protocol};
use super::response;
use crate::error::Error;
use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONNECTION, RETRY_AFTER};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a refused connection may take to send its request and read the answer,
/// twice over (once until the answer, once for the close), and its TLS handshake at
/// most: a client over the cap gets an answer, not a seat.
pub const REFUSE_WITHIN: Duration = Duration::from_secs(1);

/// Answers every request on `io` with `why` and closes it: through hyper, so HTTP/1
/// and HTTP/2 clients alike read a JSON-RPC error instead of a reset they cannot
/// tell from a crash.
pub async fn refuse_connection(
    mut io: ClientIo,
    peer: SocketAddr,
    builders: &Builders,
    why: Error,
) {
    let until = Instant::now() + REFUSE_WITHIN;
    let (protocol, read) = if negotiated_h2(&io) {
        (Protocol::Http2, Bytes::new())
    } else {
        match tokio::time::timeout_at(until, prefixed::detect(&mut io)).await {
            Ok(Ok(detected)) => detected,
            // Nothing to answer yet, and the bound is spent (or the client left).
            _ => return,
        }
    };
    let io = TokioIo::new(Prefixed::new(read, io));
    let answered = Arc::new(Notify::new());
    let service = {
        let answered = answered.clone();
        hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            let mut resp = response::error(None, &why);
            let headers = resp.headers_mut();
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
            // A 429 too: the place frees when one of the client's connections closes.
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            answered.notify_one();
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    match protocol {
        Protocol::Http1 => {
            let conn = builders.h1.serve_connection(io, service);
            refuse_on(
                Box::pin(conn),
                |c| c.graceful_shutdown(),
                &answered,
                until,
                peer,
            )
            .await
        }
        Protocol::Http2 => {
            let conn = builders.h2.serve_connection(io, service);
            refuse_on(
                Box::pin(conn),
                |c| c.graceful_shutdown(),
                &answered,
                until,
                peer,
            )
            .await
        }
    }
}

/// Until the first answer (HTTP/1 closes after it, `Connection: close`), or `until`;
/// then a graceful close (HTTP/2: GOAWAY), bounded again.
async fn refuse_on<C: Future>(
    mut conn: Pin<Box<C>>,
    close: impl Fn(Pin<&mut C>),
    answered: &Notify,
    until: Instant,
    peer: SocketAddr,
) {
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = answered.notified() => {}
        _ = tokio::time::sleep_until(until) => {}
    }
    close(conn.as_mut());
    if tokio::time::timeout(REFUSE_WITHIN, conn).await.is_err() {
        tracing::debug!(%peer, "refused connection did not close in time; dropped");
    }
}
