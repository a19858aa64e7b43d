//! Requests an upstream sent a client: remembered until the client answers (over HTTP
//! or its socket), or answered by rpcgate with an error when nobody does in time.

use super::Hub;
use crate::dispatch::{self, Outbound, Route};
use crate::error::Error;
use crate::upstream::Conn;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Requests to clients waiting for an answer, over all sessions, at most: an upstream
/// that floods them gets the rest answered at once, never a table without bound.
pub(super) const MAX_ASKS: usize = 65_536;

/// The error rpcgate answers an upstream's request with when no client did in time.
pub const NO_ANSWER_CODE: i32 = -32098;

/// A request from an upstream waiting for the client's answer.
#[derive(Debug)]
pub(super) struct Ask {
    pub(super) conn: Arc<Conn>,
}

impl Hub {
    /// The client's answer (`text`, a JSON-RPC response with `id`) to a request the
    /// upstream sent session `key`: written to the socket that asked.
    pub async fn answer(&self, key: Option<&str>, id: &RawValue, text: &str) -> Result<(), Error> {
        let key: Arc<str> = Arc::from(key.ok_or(Error::UnknownServerRequest)?);
        let ask = self
            .asks
            .lock()
            .remove(&(key, id.get().to_string()))
            .ok_or(Error::UnknownServerRequest)?;
        self.metrics
            .server_requests
            .with_label_values(&["answered"])
            .inc();
        self.write_answer(&ask.conn, text).await
    }

    pub(super) async fn write_answer(&self, conn: &Arc<Conn>, text: &str) -> Result<(), Error> {
        let upstreams = self
            .upstreams
            .upgrade()
            .ok_or(Error::Internal("shutting down"))?;
        let deadline = Instant::now() + self.request_timeout;
        dispatch::send(
            &upstreams,
            Outbound::Answer { text },
            Route::Own(conn),
            None,
            deadline,
        )
        .await
        .map(|_| ())
    }

    /// Remembers a request to the client, answering it ourselves if nobody does in time.
    pub(super) fn expect_answer(&self, session: Arc<str>, id: String, conn: Arc<Conn>) {
        let key = (session, id);
        let timeout = {
            let mut asks = self.asks.lock();
            let full = asks.len() >= MAX_ASKS;
            asks.insert(key.clone(), Ask { conn });
            if full {
                Duration::ZERO
            } else {
                self.request_timeout
            }
        };
        let hub = self.me.clone();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(timeout) => {
                    if let Some(hub) = hub.upgrade() {
                        hub.no_answer(key, timeout).await;
                    }
                }
            }
        });
    }

    pub(super) async fn no_answer(&self, key: (Arc<str>, String), waited: Duration) {
        let Some(ask) = self.asks.lock().remove(&key) else {
            return;
        };
        self.metrics
            .server_requests
            .with_label_values(&["timed_out"])
            .inc();
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":{},"error":{{"code":{NO_ANSWER_CODE},"message":"no client answered within {}s","data":{{"source":"rpcgate","kind":"no_client_answer"}}}}}}"#,
            key.1,
            crate::error::rounded(waited).as_secs_f64(),
        );
        if let Err(e) = self.write_answer(&ask.conn, &text).await {
            tracing::debug!(error = %e, "could not tell the upstream nobody answered");
        }
    }
}
