//! WebSocket clients of rpcgate: an upgrade on the JSON-RPC path, then every text (or
//! binary) frame is a body of calls answered exactly as over HTTP (`rpc::answer`),
//! and the session's pushed messages arrive on the same socket.
//!
//! Each socket is a push session: the one its client names (session header, cookie
//! or `?session=`), or one of its own. With `affinity = "connection"` the session has
//! its own upstream socket, so rpcgate is a WebSocket proxy that survives upstream
//! restarts; otherwise its calls share the pool's connections like HTTP calls do.

use super::AppState;
use super::auth::Admitted;
use super::listener::ConnInfo;
use super::response::{self, HttpResponse};
use super::rpc::{self, Caller};
use super::session_key::{SessionKey, new_session, query_param, session_of};
use crate::budget::{Budgets, Charge};
use crate::error::{Busy, Error};
use crate::push::{Event, Stopped};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

/// Calls one socket may have in flight; past it, its frames wait to be read.
const MAX_IN_FLIGHT: usize = 256;
/// Events per socket write at most.
const READ_MAX: usize = 256;
/// A client socket's read buffer, and the write buffer it coalesces frames in.
const CLIENT_READ_BUFFER: usize = 4 * 1024;
const CLIENT_WRITE_BUFFER: usize = 16 * 1024;

/// Whether `req` asks to become a WebSocket.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    has(UPGRADE, "websocket") && has(CONNECTION, "upgrade")
}

/// Answers the handshake (101) and serves the socket once hyper hands it over.
pub fn upgrade(mut req: Request<Incoming>, state: &Arc<AppState>, conn: &ConnInfo) -> HttpResponse {
    let key = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let version_ok = req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(accept), true) = (key, version_ok) else {
        return response::error(
            None,
            &Error::InvalidRequest(
                "not a WebSocket handshake: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 are required",
            ),
        );
    };
    let (session, named) = match session_of(&req, state, conn.peer) {
        Ok(Some(s)) => (s, true),
        Ok(None) => match new_session(&req, state, conn.peer) {
            Ok(s) => (s, false),
            Err(e) => return response::error(None, &e),
        },
        Err(e) => return response::error(None, &e),
    };
    let after = query_param(req.uri().query(), "after").and_then(|a| a.parse().ok());
    let admitted = Admitted::of(&req, state, conn.peer);
    let budgets = conn.budgets.clone();
    let session_header = HeaderValue::from_str(&session.shown).ok();
    // The socket keeps its connection's place among `http.max_connections`.
    let place = conn.place.take();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let socket_state = state.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let limit = socket_state.config.http.max_body_bytes;
                // Many clients, most of them idle: a small read buffer each (tungstenite's
                // default is 128 KiB, allocated up front), grown only by large frames.
                let config = WebSocketConfig::default()
                    .read_buffer_size(CLIENT_READ_BUFFER)
                    .write_buffer_size(CLIENT_WRITE_BUFFER)
                    .max_message_size(Some(limit))
                    .max_frame_size(Some(limit));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                serve(
                    ws,
                    socket_state,
                    Client {
                        session,
                        named,
                        after,
                        budgets,
                        admitted,
                    },
                )
                .await;
                drop(place);
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut resp = Response::new(response::Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    let name = http::HeaderName::from_bytes(state.config.sessions.header.as_bytes());
    if let (Some(key), Ok(name)) = (session_header, name) {
        // The client learns the key of its session (to read it over HTTP too).
        h.insert(name, key);
    }
    resp
}

struct Client {
    session: SessionKey,
    /// The client named its session: it outlives the socket for `push.idle_timeout`,
    /// so a reconnect resumes it. One of its own ends with the socket.
    named: bool,
    after: Option<u64>,
    budgets: Budgets,
    admitted: Admitted,
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn serve(ws: Socket, state: Arc<AppState>, client: Client) {
    let (mut sink, mut stream) = ws.split();
    let key = client.session.key.clone();
    let push = state.hub.session(&key);
    let own = match &state.sessions {
        Some(sessions) => sessions.connection(&key, client.session.client).map(Some),
        None => Ok(None),
    };
    let (push, own) = match (push, own) {
        (Ok(push), Ok(own)) => (push, own),
        (Err(e), _) | (_, Err(e)) => {
            let _ = sink.send(close(CloseCode::Again, &e.to_string())).await;
            return;
        }
    };
    let mut consumer = state.hub.attach(&push);
    let (tx, mut rx) =
        mpsc::channel::<(Vec<u8>, Charge)>(state.hub.config().max_socket_queue.max(1));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let ws = &state.config.websocket;
    // Milliseconds (from `epoch`, + 1) when our unanswered ping went out; 0: none.
    let epoch = Instant::now();
    let ping_sent = AtomicU64::new(0);
    let ms = || epoch.elapsed().as_millis() as u64 + 1;

    let reader = async {
        while let Some(message) = stream.next().await {
            let data = match message {
                Ok(Message::Text(text)) => Bytes::from(text),
                Ok(Message::Binary(data)) => data,
                Ok(Message::Pong(_)) => {
                    ping_sent.store(0, Ordering::Release);
                    continue;
                }
                Ok(Message::Ping(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => return,
            };
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let budgets = client.budgets.clone();
            let charge = budgets.charge(data.len());
            let (state, tx, key, own) = (state.clone(), tx.clone(), key.clone(), own.clone());
            let admitted = client.admitted.clone();
            tokio::spawn(async move {
                let text = match charge {
                    None => Some(response::error_bytes(
                        None,
                        &Error::Overloaded(Busy::Memory),
                    )),
                    Some(_) => {
                        let caller = Caller {
                            session: Some(&key),
                            own: own.as_ref(),
                            budgets: &budgets,
                            admitted: &admitted,
                        };
                        let deadline = Instant::now() + state.config.calls.request_timeout;
                        rpc::answer(&state, &data, &caller, deadline)
                            .await
                            .into_text()
                    }
                };
                drop(charge);
                if let Some(text) = text {
                    let held = budgets.force(text.len());
                    let _ = tx.send((text, held)).await;
                }
                drop(permit);
            });
        }
    };

    // A client that stops reading blocks our writes; past `http.write_timeout` it is
    // dropped, as an HTTP client would be, releasing what was queued for it.
    let stall = state.config.http.write_timeout;
    let writer = async {
        let mut cursor = client.after.or(Some(push.delivered()));
        let mut ping =
            tokio::time::interval_at(Instant::now() + ws.ping_interval, ws.ping_interval);
        loop {
            tokio::select! {
                answer = rx.recv() => {
                    let Some((text, _held)) = answer else { return };
                    let text = String::from_utf8(text).unwrap_or_default();
                    if failed(stall, sink.send(Message::text(text))).await {
                        return;
                    }
                }
                read = consumer.next(cursor, READ_MAX) => {
                    let read = match read {
                        Ok(read) => read,
                        Err(Stopped::Replaced) => {
                            failed(stall, sink.send(close(CloseCode::Policy, "another stream or socket took this session over"))).await;
                            return;
                        }
                        Err(Stopped::Closed) => return,
                    };
                    let mut n = 0;
                    if let Some(missed) = read.missed
                        && failed(stall, sink.feed(Message::text(gap_frame("buffer_overflow", Some(missed))))).await
                    {
                        return;
                    }
                    for item in &read.items {
                        let frame = match &item.event {
                            Event::Message(m) => {
                                n += 1;
                                Message::text(String::from_utf8_lossy(m).into_owned())
                            }
                            Event::Gap { reason, missed } => Message::text(gap_frame(reason, *missed)),
                        };
                        if failed(stall, sink.feed(frame)).await {
                            return;
                        }
                    }
                    if failed(stall, sink.flush()).await {
                        return;
                    }
                    if let Some(last) = read.items.last() {
                        cursor = Some(last.id);
                        consumer.delivered_to(n, last.id);
                    }
                }
                _ = ping.tick() => {
                    let sent = ping_sent.load(Ordering::Acquire);
                    if sent != 0 && ms().saturating_sub(sent) > ws.pong_timeout.as_millis() as u64 {
                        tracing::debug!("WebSocket client did not answer a ping within pong_timeout; closing");
                        return;
                    }
                    if sent == 0 {
                        ping_sent.store(ms(), Ordering::Release);
                        if failed(stall, sink.send(Message::Ping(Bytes::new()))).await {
                            return;
                        }
                    }
                    if let Some(sessions) = &state.sessions {
                        sessions.touch(&key);
                    }
                }
                _ = state.closing.cancelled() => {
                    failed(stall, sink.send(close(CloseCode::Away, "rpcgate shutting down"))).await;
                    return;
                }
            }
        }
    };

    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    drop(consumer);
    if !client.named {
        state.hub.end_now(&key);
    }
}

/// Whether a write failed or made no progress within `limit`.
async fn failed<E>(limit: std::time::Duration, write: impl Future<Output = Result<(), E>>) -> bool {
    !matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

fn close(code: CloseCode, reason: &str) -> Message {
    // A close reason is at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }))
}

/// A gap, as a JSON-RPC notification.
fn gap_frame(reason: &str, missed: Option<u64>) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"rpcgate.gap","params":{}}}"#,
        super::events::gap_json(reason, missed)
    )
}
