//! Connections accepted over a limit (`http.max_connections`,
//! `http.max_connections_per_address`): every request on one gets the limit's error
//! and the connection closes, fast and bounded.

use super::listener::ClientIo;
use super::response;
use crate::error::Error;
use http::HeaderValue;
use http::header::{CONNECTION, RETRY_AFTER};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a refused connection may take to send its request and read the answer,
/// twice over (once until the answer, once for the close), and its TLS handshake at
/// most: a client over the cap gets an answer, not a seat.
pub const REFUSE_WITHIN: Duration = Duration::from_secs(1);

/// Answers every request on `io` with `why` and closes it: through hyper, so HTTP/1
/// and HTTP/2 clients alike read a JSON-RPC error instead of a reset they cannot
/// tell from a crash.
pub async fn refuse_connection(
    io: ClientIo,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    why: Error,
) {
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
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // Until the first answer (HTTP/1 closes after it, `Connection: close`), or the
    // bound; then a graceful close (HTTP/2: GOAWAY), bounded again.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = answered.notified() => {}
        _ = tokio::time::sleep(REFUSE_WITHIN) => {}
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(REFUSE_WITHIN, conn).await.is_err() {
        tracing::debug!(%peer, "refused connection did not close in time; dropped");
    }
}
