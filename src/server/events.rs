//! `GET /events`: a session's pushed messages as an event stream
//! (`Accept: text/event-stream`), or as a long-poll answer (a JSON array).
//!
//! Both read the session's numbered buffer (`push/mailbox.rs`) from the point the
//! client names (`Last-Event-ID`, or `?after=`), so a client that lost its stream asks
//! again and gets what it missed, or an explicit gap when that is gone.

use super::AppState;
use super::detach::Detachable;
use super::listener::ConnInfo;
use super::response::{self, HttpResponse};
use super::session_key::{query_param, session_of};
use crate::error::Error;
use crate::push::{Consumer, Event, Read};
use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

/// Events per read: one write to the client carries at most this many.
const READ_MAX: usize = 256;
/// Long-poll wait when the client names none.
const DEFAULT_WAIT: Duration = Duration::from_secs(25);

/// Answers `GET` on the events path.
pub async fn handle<B>(req: Request<B>, state: &Arc<AppState>, conn: &ConnInfo) -> HttpResponse {
    if req.method() != Method::GET {
        let mut resp = response::error(None, &Error::MethodNotAllowed);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    let session = match session_of(&req, state, conn.peer) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return response::error(
                None,
                &Error::InvalidRequest(
                    "an event stream needs a session key: ?session=KEY, the session header or the session cookie",
                ),
            );
        }
        Err(e) => return response::error(None, &e),
    };
    let push = match state.hub.session(&session.key) {
        Ok(push) => push,
        Err(e) => return response::error(None, &e),
    };
    // A session with its own upstream socket: opening its stream opens the socket, so
    // what the service pushes on it has somewhere to go.
    if let Some(sessions) = &state.sessions
        && let Err(e) = sessions.connection(&session.key, session.client)
    {
        return response::error(None, &e);
    }
    let after = last_event_id(&req, push.delivered());
    let consumer = state.hub.attach(&push);
    if wants_stream(&req) {
        // HTTP/1.1's chunked framing is what `detach` continues; HTTP/2 streams stay
        // with hyper, and HTTP/1.0 has no chunks.
        let detach = (req.version() == Version::HTTP_11).then_some(&conn.detach);
        stream(
            state.clone(),
            consumer,
            after,
            session.key,
            session.shown,
            detach,
        )
    } else {
        let wait = query_param(req.uri().query(), "wait")
            .and_then(|w| w.parse::<f64>().ok())
            .filter(|w| w.is_finite() && *w >= 0.0)
            .map_or(DEFAULT_WAIT, Duration::from_secs_f64)
            .min(state.hub.config().max_poll_wait);
        poll(consumer, after, wait).await
    }
}

/// `Last-Event-ID` (what EventSource sends when it reconnects), or `?after=` /
/// `?last_event_id=` for clients that cannot set headers.
fn last_event_id<B>(req: &Request<B>, delivered: u64) -> Option<u64> {
    let header = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok());
    resume_after(header, req.uri().query(), delivered)
}

/// Where a reader resumes, from the `Last-Event-ID` header's value and the query
/// string: the header first, then `after`, then `last_event_id`. The value `delivered`
/// starts after the last message any reader of the session was given (`delivered`): a
/// client falling back from its WebSocket gets what the socket did not, not all again.
/// Apart from the request, so the fuzz targets reach it (`rpcgate::fuzzing`).
pub fn resume_after(header: Option<&str>, query: Option<&str>, delivered: u64) -> Option<u64> {
    let value = header
        .map(str::to_string)
        .or_else(|| query_param(query, "after"))
        .or_else(|| query_param(query, "last_event_id"))?;
    match value.trim() {
        "delivered" => Some(delivered),
        n => n.parse().ok(),
    }
}

fn wants_stream<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// The event stream: events as they come, a comment line every `push.heartbeat`.
fn stream(
    state: Arc<AppState>,
    mut consumer: Consumer,
    after: Option<u64>,
    key: String,
    shown: String,
    detach: Option<&Detachable>,
) -> HttpResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let heartbeat = state.hub.config().heartbeat;
    let client = key;
    tokio::spawn(async move {
        // At once: the headers go out, proxies see a live stream, and a client can tell
        // a stream that works from one a buffering proxy holds back (EventSource does
        // not show comments, so this is an event; it has no id, so it moves no
        // client's Last-Event-ID).
        let open = format!(
            ": rpcgate events\nevent: rpcgate.open\ndata: {{\"session\":{}}}\n\n",
            serde_json::to_string(&shown).unwrap_or_else(|_| "null".into())
        );
        if tx.send(Bytes::from(open)).await.is_err() {
            return;
        }
        let mut cursor = after;
        loop {
            tokio::select! {
                read = consumer.next(cursor, READ_MAX) => {
                    let Ok(read) = read else { return };
                    let (text, last, n) = as_events(&read);
                    if tx.send(Bytes::from(text)).await.is_err() {
                        return;
                    }
                    if let Some(last) = last {
                        consumer.delivered_to(n, last);
                    }
                    cursor = last.or(cursor);
                }
                _ = tokio::time::sleep(heartbeat) => {
                    if tx.send(Bytes::from_static(b": heartbeat\n\n")).await.is_err() {
                        return;
                    }
                    // Keeps a session's own socket from being closed as idle.
                    if let Some(sessions) = &state.sessions {
                        sessions.touch(&client);
                    }
                }
                _ = tx.closed() => return,
                _ = state.closing.cancelled() => return,
            }
        }
    });
    let body = match detach {
        Some(detach) => {
            let events = Arc::new(parking_lot::Mutex::new(Some(rx)));
            detach.offer(&events);
            response::Body::detachable(events)
        }
        None => response::Body::streaming(rx),
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// One long-poll: what there is after `after`, or what comes within `wait`.
async fn poll(mut consumer: Consumer, after: Option<u64>, wait: Duration) -> HttpResponse {
    let read = match tokio::time::timeout(wait, consumer.next(after, READ_MAX)).await {
        Ok(Ok(read)) => read,
        // Nothing came, or another reader took the session: nothing for this one.
        Ok(Err(_)) | Err(_) => Read::default(),
    };
    let mut out = String::from("[");
    let mut n = 0;
    if let (Some(missed), Some(first)) = (read.missed, read.items.first()) {
        let _ = write!(
            out,
            r#"{{"id":{},"gap":{}}}"#,
            first.id - 1,
            gap_json("buffer_overflow", Some(missed))
        );
    }
    for item in &read.items {
        if out.len() > 1 {
            out.push(',');
        }
        match &item.event {
            Event::Message(m) => {
                n += 1;
                let _ = write!(
                    out,
                    r#"{{"id":{},"message":{}}}"#,
                    item.id,
                    String::from_utf8_lossy(m)
                );
            }
            Event::Gap { reason, missed } => {
                let _ = write!(
                    out,
                    r#"{{"id":{},"gap":{}}}"#,
                    item.id,
                    gap_json(reason, *missed)
                );
            }
        }
    }
    out.push(']');
    if let Some(last) = read.items.last() {
        consumer.delivered_to(n, last.id);
    }
    response::json(StatusCode::OK, out.into_bytes())
}

/// `{"reason": …, "missed": …}`.
pub(super) fn gap_json(reason: &str, missed: Option<u64>) -> String {
    match missed {
        Some(n) => format!(r#"{{"reason":"{reason}","missed":{n}}}"#),
        None => format!(r#"{{"reason":"{reason}","missed":null}}"#),
    }
}

/// `read` as event-stream text, the last id in it, and how many messages it holds.
fn as_events(read: &Read) -> (String, Option<u64>, usize) {
    let mut out = String::new();
    let mut n = 0;
    if let (Some(missed), Some(first)) = (read.missed, read.items.first()) {
        let _ = write!(
            out,
            "id: {}\nevent: rpcgate.gap\ndata: {}\n\n",
            first.id - 1,
            gap_json("buffer_overflow", Some(missed))
        );
    }
    for item in &read.items {
        match &item.event {
            Event::Message(m) => {
                n += 1;
                let _ = write!(out, "id: {}\ndata: {}\n\n", item.id, one_line(m));
            }
            Event::Gap { reason, missed } => {
                let _ = write!(
                    out,
                    "id: {}\nevent: rpcgate.gap\ndata: {}\n\n",
                    item.id,
                    gap_json(reason, *missed)
                );
            }
        }
    }
    (out, read.items.last().map(|i| i.id), n)
}

/// A JSON message on one line: a line break in JSON text can only be whitespace
/// between tokens (inside strings it is escaped), so it becomes a space.
fn one_line(message: &[u8]) -> String {
    String::from_utf8_lossy(message).replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Item;

    #[test]
    fn events_are_numbered_on_one_line_and_gaps_are_named() {
        let read = Read {
            missed: Some(3),
            items: vec![
                Item {
                    id: 5,
                    event: Event::Message(Bytes::from_static(b"{\"a\":\n1}")),
                },
                Item {
                    id: 6,
                    event: Event::Gap {
                        reason: "upstream_reconnected",
                        missed: None,
                    },
                },
            ],
        };
        let (text, last, n) = as_events(&read);
        assert_eq!(
            text,
            "id: 4\nevent: rpcgate.gap\ndata: {\"reason\":\"buffer_overflow\",\"missed\":3}\n\n\
             id: 5\ndata: {\"a\": 1}\n\n\
             id: 6\nevent: rpcgate.gap\ndata: {\"reason\":\"upstream_reconnected\",\"missed\":null}\n\n"
        );
        assert_eq!((last, n), (Some(6), 1));
    }
}
