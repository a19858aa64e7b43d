//! What a body of calls got, whichever way it came: turned into an HTTP answer
//! (`rpc::handle`) or a WebSocket frame (`ws.rs`).

use super::response::{self, HttpResponse};
use crate::error::Error;
use http::StatusCode;
use serde_json::value::RawValue;
use std::sync::Arc;

/// What a body of calls got, before it is put in an HTTP answer or a WebSocket frame.
pub(super) enum Answer {
    /// Only notifications: nothing to say (HTTP 204).
    Nothing,
    /// A client's answer to a request from the upstream, passed on (HTTP 202).
    Accepted,
    /// One call's reply with the client's id.
    Reply {
        bytes: Vec<u8>,
        upstream: Option<Arc<str>>,
    },
    /// A whole request failed: the error object, and the error for the HTTP status.
    Failed(Vec<u8>, Error),
    /// A batch's answers, in order; `limited` when every one of them is a rate
    /// limit's refusal (the answer is then 429, with `Retry-After`).
    Batch {
        bytes: Vec<u8>,
        len: usize,
        limited: Option<Error>,
    },
}

impl Answer {
    pub(super) fn failed(id: Option<&RawValue>, e: Error) -> Answer {
        Answer::Failed(response::error_bytes(id, &e), e)
    }

    /// The JSON text to send back, if any (a WebSocket client's frame).
    pub fn into_text(self) -> Option<Vec<u8>> {
        match self {
            Answer::Nothing | Answer::Accepted => None,
            Answer::Reply { bytes, .. }
            | Answer::Failed(bytes, _)
            | Answer::Batch { bytes, .. } => Some(bytes),
        }
    }

    pub(super) fn into_http(self) -> HttpResponse {
        match self {
            Answer::Nothing => response::no_content(),
            Answer::Accepted => response::accepted(),
            Answer::Reply { bytes, upstream } => {
                let mut resp = response::json(StatusCode::OK, bytes);
                if let Some(upstream) = upstream {
                    resp.body_mut().notes.upstream = Some(upstream);
                }
                resp
            }
            Answer::Failed(bytes, e) => response::error_with(bytes, &e),
            Answer::Batch {
                bytes,
                len,
                limited,
            } => {
                let mut resp = match (bytes.is_empty(), limited) {
                    (true, _) => response::no_content(),
                    (false, Some(e)) => response::error_with(bytes, &e),
                    (false, None) => response::json(StatusCode::OK, bytes),
                };
                resp.body_mut().notes.batch = Some(len);
                resp
            }
        }
    }
}
