//! Every failure a client can see, with its HTTP status and JSON-RPC code.
//!
//! This is the one place that maps failures to answers; the README's error table is
//! written from it, and `tests/answers.rs` checks each row end to end.

use http::StatusCode;
use std::time::Duration;

/// A failure answered to the client as a JSON-RPC error object.
///
/// Codes in -32000..=-32099 are the gateway's own; their numbers are part of the
/// public contract and never change meaning.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("parse error: the request body is not valid JSON ({0})")]
    Parse(String),
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("invalid request: batch of {size} calls exceeds max_batch_size {max}; split it")]
    BatchTooLarge { size: usize, max: usize },
    #[error("method not allowed: send JSON-RPC with POST")]
    MethodNotAllowed,
    #[error("unsupported media type: send Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("not found: JSON-RPC is served on {0}")]
    NotFound(String),
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error(
        "no upstream connection became available within {0:?}; the upstream may be down, retry later"
    )]
    NoUpstream(Duration),
    #[error(
        "upstream capacity exhausted: connections are at max_in_flight or too many calls are waiting; retry later"
    )]
    Overloaded,
    #[error("upstream connection lost before the reply arrived; the call may or may not have run")]
    UpstreamLost,
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the session's upstream connection was reopened but replaying {0:?} failed, so its state is gone; start a new session"
    )]
    ReplayFailed(String),
    #[error("too many sessions open (max_sessions {0}); retry later")]
    TooManySessions(usize),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// The JSON-RPC `error.code`.
    pub fn code(&self) -> i32 {
        match self {
            Error::Parse(_) => -32700,
            Error::InvalidRequest(_) | Error::BatchTooLarge { .. } => -32600,
            Error::NoUpstream(_) => -32001,
            Error::UpstreamLost => -32002,
            Error::Timeout(_) => -32003,
            Error::Overloaded => -32004,
            Error::ReplayFailed(_) => -32006,
            Error::TooManySessions(_) => -32007,
            Error::MethodNotAllowed => -32010,
            Error::UnsupportedMediaType => -32011,
            Error::PayloadTooLarge { .. } => -32012,
            Error::NotFound(_) => -32013,
            Error::BodyTimeout(_) => -32014,
            Error::Internal(_) => -32603,
        }
    }

    /// The HTTP status when this error is the whole answer (a single call).
    /// Inside a batch the answer is 200 and the error is that element's entry.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Parse(_) | Error::InvalidRequest(_) | Error::BatchTooLarge { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::NoUpstream(_) | Error::Overloaded | Error::TooManySessions(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::UpstreamLost | Error::ReplayFailed(_) => StatusCode::BAD_GATEWAY,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable label, for logs and (later) metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Parse(_) => "parse",
            Error::InvalidRequest(_) => "invalid_request",
            Error::BatchTooLarge { .. } => "batch_too_large",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::NotFound(_) => "not_found",
            Error::BodyTimeout(_) => "body_timeout",
            Error::NoUpstream(_) => "no_upstream",
            Error::Overloaded => "overloaded",
            Error::ReplayFailed(_) => "replay_failed",
            Error::TooManySessions(_) => "too_many_sessions",
            Error::UpstreamLost => "upstream_lost",
            Error::Timeout(_) => "timeout",
            Error::Internal(_) => "internal",
        }
    }
}
