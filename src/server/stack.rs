//! The HTTP side as a tower stack: every request passes the same layers, outermost
//! first, before `rpc.rs` turns it into calls.
//!
//! 1. [`AccessLog`]: one line per request, with the answer's status, size, batch
//!    length and the upstream that answered. Outermost, so its duration covers every
//!    layer and it logs the answer the client really got.
//! 2. [`HttpMetrics`]: requests by status and bytes sent, for every answer, including
//!    the ones the layers below produce themselves.
//! 3. [`CatchPanic`]: a bug that panics answers that one request with a JSON-RPC
//!    internal error instead of dropping the connection and its other requests.
//!    Below the observers, so such an answer is logged and counted.
//! 4. tower-http's `Cors` (with `[cors]`): preflights answered, and the CORS headers
//!    on every answer, including the checks' refusals.
//! 5. [`Checks`]: the cheap request checks (path, method, content type, declared
//!    length) before a body byte is read.
//! 6. `auth::Authenticate` (with `[auth]`): the credential named, or 401; the caller
//!    travels with the request to where each call is admitted (`rpc.rs`), and its
//!    name to the access log.
//! 7. `rpc::handle`: body, parsing, dispatch; or `ws::upgrade` for a WebSocket
//!    client on the same path, or `events::handle` on the events path.

use super::AppState;
use super::listener::ConnInfo;
use super::response::{self, HttpResponse};
use crate::error::Error;
use crate::logging::AccessRecord;
use futures_util::future::BoxFuture;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::layer::layer_fn;
use tower::{Layer, Service, ServiceBuilder};

/// What the stack answers with: the handlers' own body type, never boxed, so the
/// observers read the notes it carries (see [`response::Notes`]).
pub type Body = response::Body;

/// The whole stack for one client connection.
pub fn build(
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    let checks = state.clone();
    let authenticate = (state.clone(), conn.clone());
    ServiceBuilder::new()
        .layer(observe(AccessLog {
            state: state.clone(),
            conn: conn.clone(),
        }))
        .layer(observe(HttpMetrics {
            state: state.clone(),
        }))
        .layer(layer_fn(|inner| CatchPanic { inner }))
        .option_layer(super::cors::layer(&state))
        .layer(layer_fn(move |inner| Checks {
            inner,
            state: checks.clone(),
        }))
        .layer(layer_fn(move |inner| super::auth::Authenticate {
            inner,
            state: authenticate.0.clone(),
            conn: authenticate.1.clone(),
        }))
        .service(Rpc { state, conn })
}

/// The innermost service: `rpc::handle`.
#[derive(Clone)]
pub struct Rpc {
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
}

impl Service<Request<Incoming>> for Rpc {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        let conn = self.conn.clone();
        if state.worker.count > 1
            && let Some(owner) = other_owner(&req, &state)
        {
            return Box::pin(hand_over(req, owner, state, conn));
        }
        Box::pin(async move { Ok(route(req, &state, &conn).await) })
    }
}

/// What the path asks for, served by this worker.
async fn route(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    conn: &Arc<ConnInfo>,
) -> HttpResponse {
    if state.demo_page && super::demo::owns(req.uri().path()) {
        super::demo::handle(&req)
    } else if req.uri().path() == state.config.push.events_path {
        super::events::handle(req, state, conn).await
    } else if super::ws::is_upgrade(&req) {
        super::ws::upgrade(req, state, conn)
    } else {
        super::rpc::handle(req, state, conn).await
    }
}

/// The worker owning the session the request names, when that is another one.
fn other_owner(req: &Request<Incoming>, state: &AppState) -> Option<usize> {
    let key = super::session_key::shown_key(req, &state.config.sessions)?;
    let owner = super::Peers::owner(&key, state.worker.count);
    (owner != state.worker.index).then_some(owner)
}

/// Serves `req` on worker `owner`, where its session lives: the request moves there
/// as it is (the body still streams from this connection) and the answer comes back
/// here. The layers above (log, metrics, CORS, checks, credentials) ran here once.
async fn hand_over(
    req: Request<Incoming>,
    owner: usize,
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
) -> Result<HttpResponse, Infallible> {
    let Some((runtime, owner_state)) = state.peers.get(owner) else {
        // Only while the workers are stopping: this one serves it.
        return Ok(route(req, &state, &conn).await);
    };
    state.metrics.worker_handovers.inc();
    let served = runtime.spawn(async move { route(req, &owner_state, &conn).await });
    Ok(match served.await {
        Ok(answer) => answer,
        // The owner's runtime is gone (shutting down) or the handler panicked there.
        Err(e) => response::error(
            None,
            &Error::Internal(if e.is_panic() {
                "the request's handler panicked"
            } else {
                "the worker owning this session stopped"
            }),
        ),
    })
}

/// See the module doc, item 3: a panic while a request is handled (in the inner
/// services' `call` or while their future runs) answers that request with a JSON-RPC
/// internal error. Ours rather than tower-http's, whose boxing of every response body
/// cost an allocation per request and hid the body's notes from the observers.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = HttpResponse, Error = Infallible>,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Caught<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = &mut self.inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.call(req))) {
            Ok(future) => Caught::Running { future },
            Err(panic) => Caught::Panicked {
                answer: Some(panic_response(panic)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer, or the internal error its panic gets.
    #[project = CaughtProj]
    pub enum Caught<F> {
        Running { #[pin] future: F },
        Panicked { answer: Option<HttpResponse> },
    }
}

impl<F> Future for Caught<F>
where
    F: Future<Output = Result<HttpResponse, Infallible>>,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            // Polled no more once it panicked: the answer below is its last.
            CaughtProj::Running { future } => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(poll) => poll,
                    Err(panic) => Poll::Ready(Ok(panic_response(panic))),
                }
            }
            CaughtProj::Panicked { answer } => Poll::Ready(Ok(answer
                .take()
                .unwrap_or_else(|| panic_response(Box::new("polled after its panic"))))),
        }
    }
}

/// A panic's answer: the request gets a JSON-RPC internal error, the log the reason.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> HttpResponse {
    let reason = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown");
    tracing::error!(reason, "request handler panicked; answered 500");
    response::error(
        None,
        &Error::Internal("the gateway hit a bug handling this request"),
    )
}

/// See the module doc, item 4.
#[derive(Clone)]
pub struct Checks<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> Checks<S> {
    /// The answer to a request that fails a check, cheapest check first.
    fn refuse<B>(&self, req: &Request<B>) -> Option<HttpResponse> {
        let http = &self.state.config.http;
        if req.uri().path() == self.state.config.push.events_path
            || (self.state.demo_page && super::demo::owns(req.uri().path()))
        {
            return None; // `events.rs` and `demo.rs` check their own requests.
        }
        if req.uri().path() != http.path {
            return Some(response::error(None, &Error::NotFound(http.path.clone())));
        }
        if super::ws::is_upgrade(req) {
            if !http.websocket {
                return Some(response::error(None, &Error::WebSocketOff));
            }
            if !super::cors::origin_allowed(req, &self.state.config.cors) {
                return Some(response::error(None, &Error::OriginNotAllowed));
            }
            return None;
        }
        if req.method() != Method::POST {
            let mut resp = response::error(None, &Error::MethodNotAllowed);
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return Some(resp);
        }
        if !is_json(req.headers().get(CONTENT_TYPE)) {
            return Some(response::error(None, &Error::UnsupportedMediaType));
        }
        let limit = http.max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Some(response::error(None, &Error::PayloadTooLarge { limit }));
        }
        None
    }
}

impl<S, B> Service<Request<B>> for Checks<S>
where
    S: Service<Request<B>, Response = HttpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<HttpResponse, Infallible>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        match self.refuse(&req) {
            Some(resp) => Either::Left(std::future::ready(Ok(resp))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}

/// `application/json`, with any parameters (`; charset=utf-8`), in any letter case.
fn is_json(value: Option<&HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// A layer that looks at each request on the way in and at its answer on the way
/// out, without changing either: the shape both observers share.
pub trait Observer: Clone + Send + Sync + 'static {
    /// What is kept from the request until the answer (a start time, the method).
    type Mark: Send + 'static;
    fn request<B>(&self, req: &Request<B>) -> Self::Mark;
    fn answer(&self, mark: Self::Mark, resp: &HttpResponse);
}

#[derive(Clone)]
pub struct Observe<S, O> {
    inner: S,
    observer: O,
}

impl<S, O, B> Service<Request<B>> for Observe<S, O>
where
    S: Service<Request<B>, Response = HttpResponse, Error = Infallible>,
    O: Observer,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Observed<S::Future, O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mark = self.observer.request(&req);
        Observed {
            answer: self.inner.call(req),
            observer: self.observer.clone(),
            mark: Some(mark),
        }
    }
}

pin_project_lite::pin_project! {
    /// An observed request's answer on its way out: a named future, not a boxed
    /// one, so observing costs no allocation per request.
    pub struct Observed<F, O: Observer> {
        #[pin]
        answer: F,
        observer: O,
        mark: Option<O::Mark>,
    }
}

impl<F, O> Future for Observed<F, O>
where
    F: Future<Output = Result<HttpResponse, Infallible>>,
    O: Observer,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(resp) = std::task::ready!(this.answer.poll(cx));
        if let Some(mark) = this.mark.take() {
            this.observer.answer(mark, &resp);
        }
        Poll::Ready(Ok(resp))
    }
}

fn observe<S, O: Observer>(observer: O) -> impl Layer<S, Service = Observe<S, O>> + Clone {
    layer_fn(move |inner| Observe {
        inner,
        observer: observer.clone(),
    })
}

/// See the module doc, item 2.
#[derive(Clone)]
pub struct HttpMetrics {
    state: Arc<AppState>,
}

impl Observer for HttpMetrics {
    type Mark = ();

    fn request<B>(&self, _: &Request<B>) {}

    fn answer(&self, _: (), resp: &HttpResponse) {
        let m = &self.state.metrics;
        m.http_requests
            .with_label_values(&[resp.status().as_str()])
            .inc();
        m.bytes_out
            .inc_by(resp.body().size_hint().exact().unwrap_or(0));
    }
}

/// See the module doc, item 1.
#[derive(Clone)]
pub struct AccessLog {
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
}

impl Observer for AccessLog {
    type Mark = (Instant, Method, Option<Arc<str>>);

    fn request<B>(&self, req: &Request<B>) -> Self::Mark {
        let client_cert = self.conn.identity.as_ref().map(|id| id.subject.clone());
        (Instant::now(), req.method().clone(), client_cert)
    }

    fn answer(&self, (started, method, client_cert): Self::Mark, resp: &HttpResponse) {
        // Sampling and the level filter are the log's; formatting and writing happen
        // on its own thread (`logging/access.rs`).
        let log = &self.state.access_log;
        if !log.enabled() {
            return;
        }
        log.record(AccessRecord {
            peer: self.conn.peer,
            method,
            status: resp.status().as_u16(),
            duration_us: started.elapsed().as_micros() as u64,
            bytes: resp.body().size_hint().exact().unwrap_or(0),
            batch: resp.body().notes.batch,
            upstream: resp.body().notes.upstream.clone(),
            caller: resp.body().notes.caller.clone(),
            client_cert,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that panics in `call` (`early`) or while its future runs.
    #[derive(Clone)]
    struct Panics {
        early: bool,
    }

    impl Service<Request<()>> for Panics {
        type Response = HttpResponse;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            assert!(!self.early, "a bug in call");
            Box::pin(async { panic!("a bug in the future") })
        }
    }

    #[tokio::test]
    async fn a_panic_answers_its_request_with_an_internal_error() {
        for early in [true, false] {
            let mut service = CatchPanic {
                inner: Panics { early },
            };
            let Ok(resp) = service.call(Request::new(())).await;
            assert_eq!(resp.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
            assert_eq!(v["error"]["code"], -32603, "{v}");
        }
    }
}
