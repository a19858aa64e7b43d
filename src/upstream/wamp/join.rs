//! Joining a realm on a fresh socket: HELLO, then WELCOME, or CHALLENGE and
//! AUTHENTICATE first, or ABORT. Part of connecting: a connection whose session did
//! not join never takes a call, and the router's reason is what the log, `/readyz` and
//! the failure counter show.

use super::bridge::Link;
use super::{self as codec, CraChallenge, HelloAuth, Message};
use crate::config::WampAuthMethod;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Why a session did not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The router refused: no such realm, authentication failed, not authorized.
    #[error("WAMP router refused to join realm {realm:?}: {reason}")]
    Abort { realm: String, reason: String },
    /// Our own side cannot authenticate (secret missing, a challenge we cannot sign).
    #[error("WAMP authentication: {0}")]
    Auth(String),
    /// The router sent something a joining session cannot take.
    #[error("WAMP join: {0}")]
    Protocol(String),
    #[error("WAMP join: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
}

impl JoinError {
    /// The `reason` label of the connect-failure counter.
    pub fn kind(&self) -> &'static str {
        match self {
            JoinError::Abort { .. } => "wamp_abort",
            JoinError::Auth(_) => "wamp_auth",
            JoinError::Protocol(_) | JoinError::Socket(_) => "wamp_protocol",
        }
    }
}

/// What WELCOME told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub session: u64,
    /// The router announced `call_canceling`: CANCEL may be sent.
    pub call_canceling: bool,
}

/// Joins `link.realm` on `socket`.
pub async fn join<S>(socket: &mut S, link: &Link) -> Result<Joined, JoinError>
where
    S: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<WsMessage, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin,
{
    // Read before HELLO: a missing secret is our problem, not the router's.
    let secret = match &link.auth {
        Some(auth) => Some(auth.secret(&link.auth_at).map_err(JoinError::Auth)?),
        None => None,
    };
    let methods: Vec<&str> = link.auth.iter().map(|a| a.method.as_str()).collect();
    let mut hello = String::with_capacity(256);
    codec::write_hello(
        &mut hello,
        &link.realm,
        HelloAuth {
            methods: &methods,
            authid: link.auth.as_ref().map(|a| a.authid.as_str()),
        },
    );
    socket.send(WsMessage::text(hello)).await?;
    let mut challenged = false;
    loop {
        let text = match socket.next().await {
            Some(Ok(WsMessage::Text(text))) => text,
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(JoinError::Protocol(format!(
                    "the router closed the socket before WELCOME ({})",
                    frame.map_or_else(
                        || "no close frame".into(),
                        |f| format!("{} {}", f.code, f.reason)
                    )
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(JoinError::Protocol(
                    "the router closed the socket before WELCOME".into(),
                ));
            }
        };
        match codec::parse(&text) {
            Ok(Message::Welcome { session, details }) => {
                return Ok(Joined {
                    session,
                    call_canceling: dealer_cancels(details),
                });
            }
            Ok(Message::Abort { reason, details }) => {
                let reason = match codec::details_message(details) {
                    Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                    _ => reason.into_owned(),
                };
                return Err(JoinError::Abort {
                    realm: link.realm.clone(),
                    reason,
                });
            }
            Ok(Message::Challenge { authmethod, extra }) => {
                let (Some(auth), Some(secret)) = (&link.auth, &secret) else {
                    return Err(JoinError::Auth(format!(
                        "the router asks for {authmethod:?} but {} is not configured",
                        link.auth_at
                    )));
                };
                if challenged || authmethod != auth.method.as_str() {
                    return Err(JoinError::Protocol(format!(
                        "unexpected CHALLENGE for {authmethod:?}"
                    )));
                }
                challenged = true;
                let signature = match auth.method {
                    WampAuthMethod::Ticket => String::from_utf8(secret.clone())
                        .map_err(|_| JoinError::Auth("a ticket must be UTF-8 text".into()))?,
                    WampAuthMethod::WampCra => CraChallenge::from_extra(extra)
                        .map_err(|e| JoinError::Protocol(format!("WAMP-CRA challenge: {e}")))?
                        .sign(secret)
                        .map_err(|e| JoinError::Auth(e.to_string()))?,
                };
                let mut text = String::with_capacity(signature.len() + 16);
                codec::write_authenticate(&mut text, &signature);
                socket.send(WsMessage::text(text)).await?;
            }
            Ok(_) => {
                return Err(JoinError::Protocol(
                    "the router sent another message before WELCOME".into(),
                ));
            }
            Err(e) => return Err(JoinError::Protocol(e.to_string())),
        }
    }
}

/// Whether WELCOME's details announce `roles.dealer.features.call_canceling`.
fn dealer_cancels(details: &serde_json::value::RawValue) -> bool {
    serde_json::from_str::<serde_json::Value>(details.get())
        .ok()
        .and_then(|d| d.pointer("/roles/dealer/features/call_canceling").cloned())
        == Some(serde_json::Value::Bool(true))
}
