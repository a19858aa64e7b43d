//! Every failure a client can see, with its HTTP status and JSON-RPC code.
//!
//! This is the one place that maps failures to answers; the error table in
//! `docs/errors.md` is written from it, and `tests/answers.rs` checks each row end to end.
//!
//! The gateway's own codes sit in -32070..=-32099, inside JSON-RPC's range for server
//! errors but away from the codes clients already give a meaning to: EIP-1474
//! (Ethereum: -32000..=-32006, which ethers and viem turn into typed errors such as
//! "resource not found" or "transaction rejected"), Solana's -32001..=-32016 and the
//! -32000 most services use for their own failures. Every error rpcgate makes carries
//! `"data": {"source": "rpcgate", "kind": ...}`; errors the upstream sent are passed
//! through as they are, so a client can always tell the two apart.

use http::StatusCode;
use std::time::Duration;

/// Which capacity ran out when a call is refused as overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every usable connection stayed at `max_in_flight` for `queue_timeout`.
    Slots,
    /// `max_waiting` calls were already waiting for a connection.
    WaitingRoom,
    /// The connection's send queue is full: the upstream stopped reading.
    UpstreamNotReading,
    /// The memory budget (`limits.memory` or `limits.connection_bytes`) is used up.
    Memory,
    /// The listener already serves `http.max_connections` client connections.
    Connections,
}

impl Busy {
    /// The `data.reason` of the error.
    pub fn as_str(self) -> &'static str {
        match self {
            Busy::Slots => "max_in_flight",
            Busy::WaitingRoom => "max_waiting",
            Busy::UpstreamNotReading => "upstream_not_reading",
            Busy::Memory => "memory",
            Busy::Connections => "max_connections",
        }
    }
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Busy::Slots => "every upstream connection is at max_in_flight",
            Busy::WaitingRoom => "too many calls are already waiting for a connection (max_waiting)",
            Busy::UpstreamNotReading => {
                "the upstream stopped reading and its connection's send queue is full"
            }
            Busy::Memory => {
                "the memory budget for requests and answers is used up (limits.memory, limits.connection_bytes)"
            }
            Busy::Connections => {
                "the gateway already serves its limit of client connections (http.max_connections); this connection is closed"
            }
        })
    }
}

/// Which per-client limit refused a new `connection` session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLimit {
    /// `sessions.max_per_client` sessions of this client address are open.
    Open(usize),
    /// `sessions.new_per_client_per_minute` sessions were opened recently.
    Rate(usize),
}

impl ClientLimit {
    /// The setting that refused: the `reason` label of `rpcgate_sessions_refused_total`.
    pub fn key(self) -> &'static str {
        match self {
            ClientLimit::Open(_) => "max_per_client",
            ClientLimit::Rate(_) => "new_per_client_per_minute",
        }
    }
}

impl std::fmt::Display for ClientLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientLimit::Open(n) => write!(
                f,
                "this client address has {n} sessions open (sessions.max_per_client); \
                 reuse an open session key, or retry once one has closed"
            ),
            ClientLimit::Rate(n) => write!(
                f,
                "this client address opened sessions faster than {n} a minute \
                 (sessions.new_per_client_per_minute); reuse session keys, or retry later"
            ),
        }
    }
}

/// Why a request's credential was not accepted (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// None was sent.
    Missing,
    /// A key or token that matches no configured key.
    UnknownKey,
    /// A JWT that does not verify, with the reason.
    BadToken(&'static str),
    /// A JWT past its `exp`.
    Expired,
    /// A TLS client certificate whose subject no `[[auth.certificates]]` entry names.
    UnknownCertificate,
}

impl AuthFailure {
    /// The `reason` label of `rpcgate_auth_failures_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadToken(_) => "bad_token",
            AuthFailure::Expired => "expired",
            AuthFailure::UnknownCertificate => "unknown_certificate",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthFailure::Missing => f.write_str(
                "no credential was sent: send an API key or token as `Authorization: Bearer <key>` \
                 (or in the header or query parameter this gateway is configured with)",
            ),
            AuthFailure::UnknownKey => f.write_str("the key is not one this gateway knows"),
            AuthFailure::BadToken(why) => write!(f, "the token is not accepted: {why}"),
            AuthFailure::Expired => f.write_str("the token has expired; get a new one"),
            AuthFailure::UnknownCertificate => {
                f.write_str("the TLS client certificate names no caller this gateway knows")
            }
        }
    }
}

/// A failure answered to the client as a JSON-RPC error object.
///
/// Codes are part of the public contract and never change meaning.
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
    #[error("overloaded: {0}; retry later")]
    Overloaded(Busy),
    #[error("upstream connection lost before the reply arrived; the call may or may not have run")]
    UpstreamLost,
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the upstream's reply is not valid JSON-RPC (neither a result nor a well-formed error object); the call may have run"
    )]
    InvalidUpstreamReply,
    #[error(
        "the session's upstream connection was reopened but replaying {0:?} failed, so its state is gone; start a new session"
    )]
    ReplayFailed(String),
    #[error("too many sessions open (max_sessions {0}); retry later")]
    TooManySessions(usize),
    #[error("too many sessions for one client: {0}")]
    TooManyClientSessions(ClientLimit),
    #[error(
        "{0} opens a subscription, but this request has nowhere to receive its notifications: \
         send a session key (the session header, cookie or ?session= query parameter) and read \
         GET {1} with it, or call over a WebSocket"
    )]
    NoPushTarget(String, String),
    #[error(
        "this session holds {0} subscriptions (push.max_subscriptions); unsubscribe some first"
    )]
    TooManySubscriptions(usize),
    #[error("too many push sessions open (push.max_sessions {0}); retry later")]
    TooManyPushSessions(usize),
    #[error(
        "this answers no request the upstream is waiting on for this session: the id is unknown, \
         already answered, or its time ran out"
    )]
    UnknownServerRequest,
    #[error(
        "WebSocket upgrades are turned off here (http.websocket = false); POST JSON-RPC instead"
    )]
    WebSocketOff,
    #[error(
        "WebSocket from this page's origin is not allowed: add it to cors.allowed_origins (or --cors-origin)"
    )]
    OriginNotAllowed,
    #[error("unauthorized: {0}")]
    Unauthorized(AuthFailure),
    #[error("forbidden: {caller} may not call {method}")]
    Forbidden { caller: String, method: String },
    #[error(
        "rate limited by {limit}: retry after {}s", retry_after.as_secs_f64().ceil()
    )]
    RateLimited {
        limit: String,
        retry_after: Duration,
    },
    #[error(
        "this client address already has {limit} connections open (http.max_connections_per_address); \
         reuse an open connection, or retry once one has closed; this connection is closed"
    )]
    TooManyConnectionsFromAddress { limit: usize },
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// The JSON-RPC `error.code`.
    pub fn code(&self) -> i32 {
        match self {
            Error::Parse(_) => -32700,
            Error::InvalidRequest(_) | Error::BatchTooLarge { .. } => -32600,
            Error::Internal(_) => -32603,
            // What happened upstream of us.
            Error::NoUpstream(_) => -32080,
            Error::UpstreamLost => -32081,
            Error::Timeout(_) => -32082,
            Error::Overloaded(_) => -32083,
            Error::InvalidUpstreamReply => -32084,
            Error::ReplayFailed(_) => -32085,
            Error::TooManySessions(_) => -32086,
            Error::TooManyClientSessions(_) => -32087,
            Error::NoPushTarget(..) => -32088,
            Error::TooManySubscriptions(_) => -32089,
            Error::TooManyPushSessions(_) => -32095,
            Error::UnknownServerRequest => -32096,
            Error::WebSocketOff => -32097,
            Error::OriginNotAllowed => -32099,
            Error::Unauthorized(_) => -32070,
            Error::Forbidden { .. } => -32071,
            Error::RateLimited { .. } => -32072,
            // Below the -32080 block, which is full.
            Error::TooManyConnectionsFromAddress { .. } => -32073,
            // What was wrong with the HTTP request.
            Error::MethodNotAllowed => -32090,
            Error::UnsupportedMediaType => -32091,
            Error::PayloadTooLarge { .. } => -32092,
            Error::NotFound(_) => -32093,
            Error::BodyTimeout(_) => -32094,
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
            Error::NoPushTarget(..) | Error::WebSocketOff => StatusCode::BAD_REQUEST,
            Error::TooManySubscriptions(_) | Error::TooManyConnectionsFromAddress { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::TooManyPushSessions(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UnknownServerRequest => StatusCode::NOT_FOUND,
            Error::OriginNotAllowed | Error::Forbidden { .. } => StatusCode::FORBIDDEN,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::NoUpstream(_)
            | Error::Overloaded(_)
            | Error::TooManySessions(_)
            | Error::TooManyClientSessions(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamLost | Error::ReplayFailed(_) | Error::InvalidUpstreamReply => {
                StatusCode::BAD_GATEWAY
            }
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before trying again (`Retry-After`), for the
    /// failures that pass: one second, except a session creation rate, which frees a
    /// slot only every `60 / n` seconds.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Error::TooManyClientSessions(ClientLimit::Rate(n)) => {
                60u64.div_ceil((*n).max(1) as u64).clamp(1, 60)
            }
            // Whole seconds, rounded up: a client that waits this long finds a token.
            Error::RateLimited { retry_after, .. } => {
                (retry_after.as_secs_f64().ceil() as u64).max(1)
            }
            _ => 1,
        }
    }

    /// A short stable label: the `kind` in the error's `data`, metric labels, logs.
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
            Error::Overloaded(_) => "overloaded",
            Error::InvalidUpstreamReply => "invalid_upstream_reply",
            Error::ReplayFailed(_) => "replay_failed",
            Error::TooManySessions(_) => "too_many_sessions",
            Error::TooManyClientSessions(_) => "too_many_client_sessions",
            Error::UpstreamLost => "upstream_lost",
            Error::Timeout(_) => "timeout",
            Error::NoPushTarget(..) => "no_push_target",
            Error::TooManySubscriptions(_) => "too_many_subscriptions",
            Error::TooManyPushSessions(_) => "too_many_push_sessions",
            Error::UnknownServerRequest => "unknown_server_request",
            Error::WebSocketOff => "websocket_off",
            Error::OriginNotAllowed => "origin_not_allowed",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::RateLimited { .. } => "rate_limited",
            Error::TooManyConnectionsFromAddress { .. } => "too_many_connections_from_address",
            Error::Internal(_) => "internal",
        }
    }

    /// Whether the call may have run upstream: a client retrying it must know the
    /// method is safe to run twice.
    pub fn may_have_run(&self) -> bool {
        matches!(
            self,
            Error::UpstreamLost | Error::Timeout(_) | Error::InvalidUpstreamReply
        )
    }

    /// Which capacity ran out, for an overloaded answer.
    pub fn busy(&self) -> Option<Busy> {
        match self {
            Error::Overloaded(busy) => Some(*busy),
            _ => None,
        }
    }

    /// How long the gateway waited, for failures that are about waiting.
    pub fn waited(&self) -> Option<Duration> {
        match self {
            Error::NoUpstream(d) | Error::Timeout(d) | Error::BodyTimeout(d) => Some(*d),
            _ => None,
        }
    }
}

/// A wait as a person reads it: to the nearest millisecond (`800ms`, `5s`, `1.25s`),
/// not the nanoseconds a measured `Instant` difference carries.
pub fn rounded(waited: Duration) -> Duration {
    Duration::from_millis(((waited.as_nanos() + 500_000) / 1_000_000) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every() -> Vec<Error> {
        vec![
            Error::Parse("x".into()),
            Error::InvalidRequest("x"),
            Error::BatchTooLarge { size: 2, max: 1 },
            Error::MethodNotAllowed,
            Error::UnsupportedMediaType,
            Error::PayloadTooLarge { limit: 1 },
            Error::NotFound("/".into()),
            Error::BodyTimeout(Duration::from_secs(1)),
            Error::NoUpstream(Duration::from_secs(1)),
            Error::Overloaded(Busy::Memory),
            Error::UpstreamLost,
            Error::Timeout(Duration::from_secs(1)),
            Error::InvalidUpstreamReply,
            Error::ReplayFailed("login".into()),
            Error::TooManySessions(1),
            Error::TooManyClientSessions(ClientLimit::Open(1)),
            Error::TooManyClientSessions(ClientLimit::Rate(1)),
            Error::NoPushTarget("eth_subscribe".into(), "/events".into()),
            Error::TooManySubscriptions(1),
            Error::TooManyPushSessions(1),
            Error::UnknownServerRequest,
            Error::Unauthorized(AuthFailure::Missing),
            Error::Forbidden {
                caller: "alice".into(),
                method: "admin_peers".into(),
            },
            Error::RateLimited {
                limit: "rate_limits[0]".into(),
                retry_after: Duration::from_millis(1500),
            },
            Error::WebSocketOff,
            Error::OriginNotAllowed,
            Error::TooManyConnectionsFromAddress { limit: 1 },
            Error::Internal("x"),
        ]
    }

    #[test]
    fn gateway_codes_stay_clear_of_the_codes_clients_already_interpret() {
        for e in every() {
            let code = e.code();
            let standard = matches!(code, -32700 | -32600 | -32603);
            assert!(
                standard || (-32099..=-32070).contains(&code),
                "{e:?} has {code}"
            );
            // EIP-1474 and Solana's server errors, and the -32000 services use.
            assert!(!(-32016..=-32000).contains(&code), "{e:?} has {code}");
        }
    }

    #[test]
    fn every_kind_has_its_own_code_or_is_a_standard_one() {
        let mut seen = std::collections::HashMap::new();
        for e in every() {
            if let Some(other) = seen.insert(e.code(), e.kind())
                && e.code() != -32600
                && other != e.kind()
            {
                panic!("{} and {other} share {}", e.kind(), e.code());
            }
        }
    }

    #[test]
    fn waits_are_shown_in_whole_milliseconds() {
        let waited = rounded(Duration::from_nanos(799_623_456));
        assert_eq!(
            Error::Timeout(waited).to_string(),
            "upstream did not answer within 800ms"
        );
    }
}
