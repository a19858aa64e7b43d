//! HTTP answers: the one place a gateway failure becomes HTTP, and the notes a
//! response carries for the access log.

use crate::error::Error;
use crate::jsonrpc;
use crate::upstream::Reply;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::value::RawValue;
use std::sync::Arc;

pub type HttpResponse = Response<Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The upstream that answered a single call, noted on the response for the access log.
#[derive(Debug, Clone)]
pub struct AnsweredBy(pub Arc<str>);

/// Elements in the request's batch, noted on the response for the access log.
#[derive(Debug, Clone, Copy)]
pub struct BatchLen(pub usize);

/// A reply object with the client's own id.
pub fn reply_bytes(id: &RawValue, reply: &Reply) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.payload().len() + id.get().len() + 40);
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
    if error.status().is_server_error() {
        tracing::debug!(kind = error.kind(), "call failed: {error}");
    }
    let mut resp = json(error.status(), error_bytes(id, error));
    if error.status() == StatusCode::SERVICE_UNAVAILABLE {
        // Unavailable for now, not for good: tell well-behaved clients when to retry.
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

pub fn json(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON);
    resp
}

pub fn no_content() -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}
