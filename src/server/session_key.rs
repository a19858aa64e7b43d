//! A request's session key, and the client it counts against: from the session header,
//! the session cookie, or a key made up for it; the client from the TCP peer or a
//! trusted proxy's header.

use super::auth::Admitted;
use super::{AppState, Peers, WorkerId};
use crate::config::{Affinity, SessionConfig};
use crate::error::Error;
use crate::upstream::sessions::{self, MAX_KEY_LEN};
use http::Request;
use http::header::COOKIE;
use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A request's session key.
pub(super) struct SessionKey {
    /// The key sessions are found by: the client's own, tied to its caller when
    /// `[auth]` named one, so that no caller reads or answers for another's session
    /// by guessing or stealing its key.
    pub key: String,
    /// The key as the client knows it (for the cookie and the session header).
    pub shown: String,
    /// Set when rpcgate made the key up for this request: then it answers with a
    /// cookie, marked `Secure` when the client reached us over TLS (per the proxy).
    pub issued: Option<bool>,
    /// Who a new session for this key counts against (`sessions.max_per_client`).
    pub client: IpAddr,
}

/// The session key from the configured header, cookie or `session` query parameter
/// (a browser's EventSource cannot set headers); a new one when `issue_cookie` is on
/// and stickiness is too. A key is read whatever the affinity: push sessions need it.
pub(super) fn session_of<B>(
    req: &Request<B>,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Option<SessionKey>, Error> {
    let cfg = &state.config.sessions;
    let client = client_of(req, cfg, peer);
    match shown_key(req, cfg).map(Cow::into_owned) {
        Some(key) if key.len() > MAX_KEY_LEN => {
            Err(Error::InvalidRequest("session key longer than 256 bytes"))
        }
        Some(key) => Ok(Some(SessionKey::new(req, key, None, client))),
        None if cfg.issue_cookie && cfg.affinity != Affinity::None => Ok(Some(SessionKey::new(
            req,
            new_key(state)?,
            Some(behind_tls(req.headers())),
            client,
        ))),
        None => Ok(None),
    }
}

/// The session key the client sent, as it sent it: the session header, else the
/// session cookie, else the `session` query parameter.
pub(super) fn shown_key<'a, B>(req: &'a Request<B>, cfg: &SessionConfig) -> Option<Cow<'a, str>> {
    let headers = req.headers();
    let from_header = headers
        .get(cfg.header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let from_cookie = || {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, value)| *name == cfg.cookie && !value.is_empty())
            .map(|(_, value)| value)
    };
    from_header
        .or_else(from_cookie)
        .map(Cow::Borrowed)
        .or_else(|| query_param(req.uri().query(), "session").map(Cow::Owned))
}

/// A new random session key, one that hashes to this worker (see `workers.rs`), so
/// the session it names lives where it was made.
fn new_key(state: &AppState) -> Result<String, Error> {
    key_owned_by(state.worker, sessions::new_key)
}

/// A key from `draw` that worker `worker` owns.
fn key_owned_by(
    worker: WorkerId,
    mut draw: impl FnMut() -> Result<String, Error>,
) -> Result<String, Error> {
    // Each draw lands here with chance 1/count: after 64·count draws, missing every
    // time has a chance below e^-64. The last draw is kept anyway, still a valid
    // key, whose requests are then handed over.
    let mut key = draw()?;
    for _ in 0..64 * worker.count {
        if Peers::owner(&key, worker.count) == worker.index {
            break;
        }
        key = draw()?;
    }
    Ok(key)
}

impl SessionKey {
    fn new<B>(req: &Request<B>, shown: String, issued: Option<bool>, client: IpAddr) -> Self {
        let key = match req.extensions().get::<Admitted>() {
            // A separator no header, cookie or query value can hold.
            Some(a) if a.principal.authenticated => format!("{shown}\n{}", a.principal.name),
            _ => shown.clone(),
        };
        SessionKey {
            key,
            shown,
            issued,
            client,
        }
    }
}

/// A key made up for a client that brought none (a WebSocket client's own session).
pub(super) fn new_session<B>(
    req: &Request<B>,
    state: &AppState,
    peer: SocketAddr,
) -> Result<SessionKey, Error> {
    Ok(SessionKey::new(
        req,
        new_key(state)?,
        None,
        client_of(req, &state.config.sessions, peer),
    ))
}

/// The percent-decoded value of `name` in a query string.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let decode = |text: &str| {
        let text = text.replace('+', " ");
        percent_encoding::percent_decode_str(&text)
            .decode_utf8()
            .ok()
            .map(|v| v.into_owned())
    };
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| decode(k).as_deref() == Some(name))
        .and_then(|(_, v)| decode(v))
        .filter(|v| !v.is_empty())
}

/// The client's address: with `client_ip_header`, the right-most address in it (the
/// one the proxy in front of us appended; those left of it are the client's own
/// claims); else, or when that header is missing or garbled, the TCP peer, so a
/// request without it counts against the proxy rather than against nobody.
pub(super) fn client_of<B>(req: &Request<B>, cfg: &SessionConfig, peer: SocketAddr) -> IpAddr {
    let peer = Some(peer.ip());
    let forwarded = cfg.client_ip_header.as_deref().and_then(|name| {
        let last = req.headers().get_all(name).iter().next_back()?;
        parse_ip(last.to_str().ok()?.rsplit(',').next()?)
    });
    // Every request comes through `serve_connection`, which sets the peer; should one
    // not, all such requests share one address and so stay limited.
    forwarded
        .or(peer)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, with a port
/// (`1.2.3.4:5`, `[2001:db8::1]:5`) or in brackets.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            text.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })
}

/// Whether the client reached the proxy in front of us over TLS.
fn behind_tls(headers: &http::HeaderMap) -> bool {
    let proto = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    proto("x-forwarded-proto").eq_ignore_ascii_case("https")
        || proto("forwarded")
            .to_ascii_lowercase()
            .contains("proto=https")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_made_by_a_worker_is_owned_by_that_worker() {
        for count in [1, 2, 3, 8] {
            for index in 0..count {
                let worker = WorkerId { index, count };
                let key = key_owned_by(worker, sessions::new_key).unwrap();
                assert_eq!(Peers::owner(&key, count), index, "{worker:?}");
            }
        }
    }
}
