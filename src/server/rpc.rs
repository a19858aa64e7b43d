//! One HTTP request in, exactly one HTTP answer out.
//!
//! Checks run cheapest first (path, method, content type, declared length) so a bad
//! request costs nothing upstream. Every failure leaves through [`error_response`],
//! the only place an [`Error`] becomes HTTP.

use super::AppState;
use crate::config::BatchMode;
use crate::error::Error;
use crate::jsonrpc::{self, Body, Call, Entry, Invalid};
use crate::upstream::Reply;
use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::value::RawValue;
use std::convert::Infallible;
use tokio::time::Instant;

type HttpResponse = Response<Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub async fn handle(req: Request<Incoming>, state: &AppState) -> Result<HttpResponse, Infallible> {
    let http = &state.config.http;
    if req.uri().path() != http.path {
        return Ok(error_response(None, &Error::NotFound(http.path.clone())));
    }
    if req.method() != Method::POST {
        let mut resp = error_response(None, &Error::MethodNotAllowed);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return Ok(resp);
    }
    if !is_json(req.headers().get(CONTENT_TYPE)) {
        return Ok(error_response(None, &Error::UnsupportedMediaType));
    }
    let limit = http.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Ok(error_response(None, &Error::PayloadTooLarge { limit }));
    }
    let collect = Limited::new(req.into_body(), limit).collect();
    let body = match tokio::time::timeout(http.body_read_timeout, collect).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(error_response(None, &Error::PayloadTooLarge { limit }));
        }
        Ok(Err(e)) => {
            // The client broke off mid-body; whatever we answer will likely not arrive.
            tracing::debug!(error = %e, "reading request body failed");
            return Ok(error_response(
                None,
                &Error::InvalidRequest("request body could not be read"),
            ));
        }
        Err(_) => {
            return Ok(error_response(
                None,
                &Error::BodyTimeout(http.body_read_timeout),
            ));
        }
    };
    // The deadline starts once the request is in: slow clients don't eat upstream time.
    let deadline = Instant::now() + state.config.calls.request_timeout;
    Ok(match jsonrpc::parse_body(&body, http.max_batch_size) {
        Err(e) => error_response(None, &e),
        Ok(Body::Single(entry)) => single(entry, state, deadline).await,
        Ok(Body::Batch(entries)) => batch(entries, state, deadline).await,
    })
}

/// `application/json`, with any parameters (`; charset=utf-8`), in any letter case.
fn is_json(value: Option<&HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

async fn single(entry: Entry<'_>, state: &AppState, deadline: Instant) -> HttpResponse {
    let call = match entry {
        Ok(call) => call,
        Err(Invalid { id, reason }) => return error_response(id, &Error::InvalidRequest(reason)),
    };
    match call.id {
        None => match state.upstreams.notify(&call, deadline).await {
            Ok(()) => no_content(),
            Err(e) => error_response(None, &e),
        },
        Some(id) => match state.upstreams.call(&call, deadline).await {
            Ok(reply) => json_response(StatusCode::OK, reply_bytes(id, &reply)),
            Err(e) => error_response(Some(id), &e),
        },
    }
}

/// One element's answer inside a batch response; `None` for notifications.
type Slot = Option<Vec<u8>>;

async fn batch(entries: Vec<Entry<'_>>, state: &AppState, deadline: Instant) -> HttpResponse {
    let slots: Vec<Slot> = match state.config.http.batch {
        BatchMode::Split => {
            join_all(entries.iter().map(|entry| element(entry, state, deadline))).await
        }
        BatchMode::Forward => forward(&entries, state, deadline).await,
    };
    let answered: Vec<Vec<u8>> = slots.into_iter().flatten().collect();
    if answered.is_empty() {
        return no_content();
    }
    let len = answered.iter().map(|a| a.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, item) in answered.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    json_response(StatusCode::OK, out)
}

/// One batch element sent as its own upstream call.
async fn element(entry: &Entry<'_>, state: &AppState, deadline: Instant) -> Slot {
    match entry {
        Err(Invalid { id, reason }) => Some(error_bytes(*id, &Error::InvalidRequest(reason))),
        Ok(call) => match call.id {
            // A notification's failure has nobody to be told to, by definition.
            None => {
                let _ = state.upstreams.notify(call, deadline).await;
                None
            }
            Some(id) => Some(match state.upstreams.call(call, deadline).await {
                Ok(reply) => reply_bytes(id, &reply),
                Err(e) => error_bytes(Some(id), &e),
            }),
        },
    }
}

/// The valid elements go upstream as one frame; invalid ones are answered here.
async fn forward(entries: &[Entry<'_>], state: &AppState, deadline: Instant) -> Vec<Slot> {
    let calls: Vec<Call<'_>> = entries
        .iter()
        .filter_map(|e| e.as_ref().ok().copied())
        .collect();
    let expecting = calls.iter().filter(|c| !c.is_notification()).count();
    let answers: Vec<Result<Reply, Error>> = if calls.is_empty() {
        Vec::new()
    } else {
        match state.upstreams.forward_batch(&calls, deadline).await {
            Ok(answers) => answers,
            // No connection took the batch: every call in it gets the same error.
            Err(e) => vec![Err(e); expecting],
        }
    };
    let mut answers = answers.into_iter();
    entries
        .iter()
        .map(|entry| match entry {
            Err(Invalid { id, reason }) => Some(error_bytes(*id, &Error::InvalidRequest(reason))),
            Ok(call) => {
                let id = call.id?;
                Some(match answers.next() {
                    Some(Ok(reply)) => reply_bytes(id, &reply),
                    Some(Err(e)) => error_bytes(Some(id), &e),
                    None => error_bytes(Some(id), &Error::Internal("batch reply missing")),
                })
            }
        })
        .collect()
}

fn reply_bytes(id: &RawValue, reply: &Reply) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.payload().len() + id.get().len() + 40);
    jsonrpc::write_reply(&mut out, id, reply.is_error(), reply.payload());
    out
}

fn error_bytes(id: Option<&RawValue>, error: &Error) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    jsonrpc::write_error(&mut out, id, error);
    out
}

/// The single place a gateway failure becomes an HTTP answer.
pub fn error_response(id: Option<&RawValue>, error: &Error) -> HttpResponse {
    if error.status().is_server_error() {
        tracing::debug!(kind = error.kind(), "call failed: {error}");
    }
    json_response(error.status(), error_bytes(id, error))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON);
    resp
}

fn no_content() -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}
