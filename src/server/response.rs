//! HTTP answers: the one place a gateway failure becomes HTTP, and the notes a
//! response carries for the access log.

use crate::budget::Charge;
use crate::error::Error;
use crate::jsonrpc;
use crate::upstream::Reply;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body::Frame;
use serde_json::value::RawValue;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub type HttpResponse = Response<Body>;

/// Bytes handed to hyper at a time.
const CHUNK: usize = 64 * 1024;

/// A whole answer in one buffer, holding its memory budget charge until hyper has
/// taken all of it (or the client went away): a client that does not read keeps its
/// answers charged, and so gets no new work started for it.
///
/// It is handed over in chunks: hyper asks for the next one only when its own write
/// buffer (HTTP/1) or the stream's send buffer (HTTP/2) has room, so what hyper holds
/// beyond this charge stays within those buffers' limits.
///
/// Or a stream (an event stream's events), handed over as its producer sends them.
#[derive(Debug, Default)]
pub struct Body {
    data: Option<Bytes>,
    charge: Option<Charge>,
    stream: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    /// A stream whose receiver the connection may take over (`detach.rs`).
    shared: Option<super::detach::Events>,
    /// What the access log says of this answer: carried in the body, not in the
    /// response's extensions, which would cost a map and a box per request.
    pub notes: Notes,
}

/// What the access log writes about an answer besides its status and size.
#[derive(Debug, Default, Clone)]
pub struct Notes {
    /// The upstream that answered a single call.
    pub upstream: Option<Arc<str>>,
    /// Elements in the request's batch.
    pub batch: Option<usize>,
    /// Who called, when `[auth]` named them.
    pub caller: Option<Arc<str>>,
}

impl Body {
    pub fn new(data: Bytes) -> Body {
        Body {
            data: (!data.is_empty()).then_some(data),
            ..Body::default()
        }
    }

    /// A body that ends when `rx`'s senders are gone; dropping it (the client went
    /// away) tells the producer.
    pub fn streaming(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
        Body {
            stream: Some(rx),
            ..Body::default()
        }
    }

    /// A stream, read through `events` until the connection takes it over and serves
    /// the rest itself (`detach.rs`); this body then ends.
    pub fn detachable(events: super::detach::Events) -> Body {
        Body {
            shared: Some(events),
            ..Body::default()
        }
    }

    /// Bytes in the answer.
    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len)
    }

    /// Holds `charge` until the answer is sent.
    pub fn hold(&mut self, charge: Charge) {
        self.charge = Some(charge);
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(rx) = self.stream.as_mut() {
            return rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))));
        }
        if let Some(events) = self.shared.as_ref() {
            return match events.lock().as_mut() {
                Some(rx) => rx
                    .poll_recv(cx)
                    .map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
                // Taken over: the connection writes the rest, this body is dropped.
                None => Poll::Ready(None),
            };
        }
        let chunk = match self.data.as_mut() {
            None => return Poll::Ready(None),
            Some(data) if data.len() > CHUNK => data.split_to(CHUNK),
            Some(_) => {
                // The last chunk: the allocation is hyper's to free once written,
                // within its buffer limits.
                self.charge = None;
                self.data.take().unwrap_or_default()
            }
        };
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.stream.is_none() && self.shared.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.stream, &self.shared) {
            (None, None) => http_body::SizeHint::with_exact(self.len() as u64),
            _ => http_body::SizeHint::default(),
        }
    }
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A reply object with the client's own id.
pub fn reply_bytes(id: &RawValue, reply: &Reply) -> Vec<u8> {
    // Exactly sized: the answer becomes `Bytes` without another allocation.
    let mut out = Vec::with_capacity(jsonrpc::reply_len(id, reply.is_error(), reply.payload()));
    jsonrpc::write_reply(&mut out, id, reply.is_error(), reply.payload());
    out
}

/// An error object for a gateway failure.
pub fn error_bytes(id: Option<&RawValue>, error: &Error) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    jsonrpc::write_error(&mut out, id, error);
    out
}

/// The single place a gateway failure becomes an HTTP answer.
pub fn error(id: Option<&RawValue>, error: &Error) -> HttpResponse {
    error_with(error_bytes(id, error), error)
}

/// [`error`] with the error object already written.
pub fn error_with(bytes: Vec<u8>, error: &Error) -> HttpResponse {
    if error.status().is_server_error() {
        tracing::debug!(kind = error.kind(), "call failed: {error}");
    }
    let mut resp = json(error.status(), bytes);
    if error.status() == StatusCode::SERVICE_UNAVAILABLE
        || matches!(error, Error::RateLimited { .. })
    {
        // Unavailable for now, not for good: tell well-behaved clients when to retry.
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(error.retry_after_secs()));
    }
    resp
}

pub fn json(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Body::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON);
    resp
}

/// A client's answer to the upstream was passed on.
pub fn accepted() -> HttpResponse {
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

pub fn no_content() -> HttpResponse {
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}
