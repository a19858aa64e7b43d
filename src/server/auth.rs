//! The authentication layer: a request's credential becomes its [`Principal`] once,
//! before a body byte is read; a request without a good one gets 401 here.
//!
//! Where a credential is read, first found wins: the configured header
//! (`Authorization: Bearer <token>`, or the token itself in a header like
//! `x-api-key`), then the query parameter (`?access_token=`, for browsers' EventSource
//! and WebSocket, which cannot set headers), then a verified TLS client certificate.

use super::AppState;
use super::response::{self, HttpResponse};
use super::session_key::{client_of, query_param};
use crate::access::{Credential, Principal};
use crate::error::{AuthFailure, Error};
use futures_util::future::{BoxFuture, Either};
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Who sent a request and from where: what each of its calls is admitted as.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub principal: Arc<Principal>,
    /// The client's address, for per-address rate limits (`sessions.client_ip_header`
    /// applies).
    pub address: IpAddr,
}

impl Admitted {
    /// A request's admission, or an anonymous one (requests that bypass the layer).
    pub fn of<B>(req: &Request<B>, state: &AppState, peer: std::net::SocketAddr) -> Admitted {
        req.extensions()
            .get::<Admitted>()
            .cloned()
            .unwrap_or_else(|| Admitted {
                principal: state.access.anonymous(),
                address: client_of(req, &state.config.sessions, peer),
            })
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    pub(super) inner: S,
    pub(super) state: Arc<AppState>,
    pub(super) conn: Arc<super::listener::ConnInfo>,
}

impl<S> Authenticate<S> {
    /// The request's admission, or why it has none (answered 401).
    fn admit<B>(&self, req: &Request<B>) -> Result<Admitted, (bool, AuthFailure)> {
        let access = &self.state.access;
        let config = access.config();
        let header = req
            .headers()
            .get(config.header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let from_header = match header {
            // RFC 6750: the scheme is case-insensitive.
            Some(v) if config.header == AUTHORIZATION.as_str() => v
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_string()),
            Some(v) => Some(v.to_string()),
            None => None,
        }
        .filter(|t| !t.is_empty());
        let token = from_header.or_else(|| {
            config
                .query_param
                .as_deref()
                .and_then(|name| query_param(req.uri().query(), name))
        });
        let subject = self.conn.identity.as_ref().map(|id| id.subject.clone());
        let credential = match (&token, &subject) {
            (Some(token), _) => Credential::Token(token),
            (None, Some(subject)) => Credential::Certificate(subject),
            (None, None) => Credential::None,
        };
        match access.authenticate(credential) {
            Ok(principal) => Ok(Admitted {
                principal,
                address: client_of(req, &self.state.config.sessions, self.conn.peer),
            }),
            Err(failure) => Err((token.is_some(), failure)),
        }
    }
}

/// 401 with the challenge RFC 6750 asks for: `invalid_token` when one was sent.
fn unauthorized(realm: &str, sent: bool, failure: AuthFailure) -> HttpResponse {
    let mut resp = response::error(None, &Error::Unauthorized(failure));
    let challenge = match sent {
        true => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
        false => format!("Bearer realm=\"{realm}\""),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    resp
}

impl<S, B> tower::Service<Request<B>> for Authenticate<S>
where
    S: tower::Service<Request<B>, Response = HttpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    /// Unchecked requests take the inner future as it is: with no `[auth]`, this
    /// layer costs a branch, not an allocation.
    type Future = Either<
        S::Future,
        Either<
            std::future::Ready<Result<HttpResponse, Infallible>>,
            BoxFuture<'static, Result<HttpResponse, Infallible>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The demo page is static and public; everything else is checked.
        if !self.state.access.is_active()
            || (self.state.demo_page && super::demo::owns(req.uri().path()))
        {
            return Either::Left(self.inner.call(req));
        }
        match self.admit(&req) {
            Err((sent, failure)) => {
                let resp = unauthorized(&self.state.access.config().realm, sent, failure);
                Either::Right(Either::Left(std::future::ready(Ok(resp))))
            }
            Ok(admitted) => {
                let name = admitted.principal.name.clone();
                req.extensions_mut().insert(admitted);
                let answer = self.inner.call(req);
                Either::Right(Either::Right(Box::pin(async move {
                    let Ok(mut resp) = answer.await;
                    resp.body_mut().notes.caller = Some(name);
                    Ok(resp)
                })))
            }
        }
    }
}
