//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive) and
//! `/readyz` (ready: an upstream can take calls, the listener is below
//! `http.max_connections`, and shutdown has not started).
//!
//! A listener of its own so probes and scrapes never queue behind client traffic,
//! and so the admin port can stay inside the cluster while the JSON-RPC port is exposed.

use super::AppState;
use super::accept::{self, AcceptErrors};
use super::listener;
use super::tls::Listener;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let mut errors = AcceptErrors::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    errors.note("admin", &e);
                    tokio::time::sleep(accept::BACKOFF).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let tls = state
                .tls
                .clone()
                .filter(|_| state.config.tls.as_ref().is_some_and(|t| t.admin));
            let io = match tls {
                None => Either::Left(stream),
                Some(tls) => {
                    let within = state.config.http.header_read_timeout;
                    match tls.accept(stream, peer, within, Listener::Admin).await {
                        Some((stream, _)) => Either::Right(Box::new(stream)),
                        None => return,
                    }
                }
            };
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service);
            // Probes are short; a stuck one must not hold a task forever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

fn route(req: &Request<Incoming>, state: &Arc<AppState>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let workers = workers(state);
            // Each worker's gauges in its own shard, added up below.
            for w in &workers {
                Upstreams::refresh_metrics([&*w.upstreams], &w.metrics);
                w.metrics
                    .sessions_active
                    .set(w.sessions.as_ref().map_or(0, |s| s.len()) as i64);
            }
            // What is per process, in worker 0's (this one's) alone.
            let m = &state.metrics;
            m.ready.set(i64::from(
                workers.iter().all(|w| w.is_ready()) && !listener::at_capacity(state),
            ));
            // Process-wide totals, caught up at scrape time.
            let dropped = crate::logging::dropped_lines();
            m.log_lines_dropped
                .inc_by(dropped.saturating_sub(m.log_lines_dropped.get()));
            m.memory_budget_used.set(state.budget.used() as i64);
            m.memory_budget_limit.set(state.budget.limit() as i64);
            let text = Metrics::render_all(workers.iter().map(|w| &*w.metrics));
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let workers = workers(state);
            if workers
                .iter()
                .any(|w| w.stopping.load(std::sync::atomic::Ordering::Acquire))
            {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                )
            } else if let Some(w) = workers.iter().find(|w| !w.upstreams.any_usable()) {
                // With several workers, one without a usable upstream would fail
                // the calls the kernel gives it. Why the upstreams are down (a WAMP
                // router refusing our realm or credentials) saves a trip to the logs.
                let mut body = String::from("not ready: no usable upstream\n");
                for error in w.upstreams.connect_errors().iter().take(16) {
                    body.push_str(error);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            } else if listener::at_capacity(state) {
                // New clients would only be refused here: send them elsewhere.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: at max_connections\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin paths: /metrics /healthz /readyz\n",
        ),
    }
}

/// Every worker's state (`runtime.workers`); this one's alone before they are known.
fn workers(state: &Arc<AppState>) -> Vec<Arc<AppState>> {
    let all = state.peers.states();
    if all.is_empty() {
        vec![state.clone()]
    } else {
        all
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
