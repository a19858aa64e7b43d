//! The client-facing HTTP server: accept loop, per-connection limits, graceful stop.
//!
//! HTTP/1.1 with keep-alive and HTTP/2 without TLS (h2c, prior knowledge) share one
//! port through hyper-util's protocol detection.

mod admin;
mod rpc;
mod watch;

use crate::config::{Affinity, Config, DiscoveryMode};
use crate::logging::{AccessLog, AccessRecord};
use crate::metrics::Metrics;
use crate::upstream::{Resolver, Sessions, SystemResolver, TargetError, Upstreams, discovery};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use watch::{Activity, WatchedIo};

/// Failures starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream: {0}")]
    Upstream(#[from] TargetError),
}

/// State every request handler reads.
pub struct AppState {
    pub config: Config,
    pub upstreams: Arc<Upstreams>,
    /// Present with `affinity = "connection"`.
    pub sessions: Option<Arc<Sessions>>,
    pub metrics: Arc<Metrics>,
    /// One line per request, formatted and written off the event loop.
    pub access_log: AccessLog,
    /// Set when shutdown starts: `/readyz` answers 503 from then on.
    pub stopping: AtomicBool,
}

impl AppState {
    /// Ready: not shutting down, and some upstream can take a call.
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::Acquire) && self.upstreams.any_usable()
    }
}

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`, when enabled.
    admin: Option<TcpListener>,
    state: Arc<AppState>,
    /// Stops discovery, after the HTTP side has drained.
    background: CancellationToken,
}

impl Gateway {
    /// Binds the listeners and starts the upstream connections (in the background).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Gateway::from_listener(listener, config)?.with_admin(admin))
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `admin` too.
    pub fn with_admin(mut self, admin: Option<TcpListener>) -> Gateway {
        self.admin = admin;
        self
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves on an already bound listener (tests and `demo` bind port 0 themselves).
    pub fn from_listener(listener: TcpListener, config: Config) -> Result<Gateway, StartError> {
        Gateway::with_resolver(listener, config, Arc::new(SystemResolver))
    }

    /// Like [`Gateway::from_listener`], resolving upstream host names (DNS discovery)
    /// with `resolver`.
    pub fn with_resolver(
        listener: TcpListener,
        config: Config,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Gateway, StartError> {
        let background = CancellationToken::new();
        let methods = config
            .metric_methods
            .iter()
            .chain(&config.balance.retry_methods)
            .chain(&config.sessions.replay_methods)
            .chain(&config.balance.health_method)
            .cloned();
        let metrics = Arc::new(Metrics::new(methods));
        let upstreams = Upstreams::start(&config, Some(metrics.clone()))?;
        if config.discovery.mode == DiscoveryMode::Dns {
            tokio::spawn(discovery::run(
                upstreams.clone(),
                resolver,
                config.discovery.resolve_interval,
                background.clone(),
            ));
        }
        let sessions = (config.sessions.affinity == Affinity::Connection).then(|| {
            let max_in_flight = config.upstreams.first().map_or(1024, |u| u.max_in_flight);
            Sessions::start(config.sessions.clone(), upstreams.clone(), max_in_flight)
        });
        let access_log = if config.log.access_log {
            AccessLog::start(config.log.access_log_sample)
        } else {
            AccessLog::off()
        };
        Ok(Gateway {
            listener,
            admin: None,
            state: Arc::new(AppState {
                config,
                upstreams,
                sessions,
                metrics,
                access_log,
                stopping: AtomicBool::new(false),
            }),
            background,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.state.upstreams.clone()
    }

    /// Serves until `shutdown` is cancelled. Then: readiness goes false at once; after
    /// `shutdown.delay` (so load balancers stop routing here) the listener closes and
    /// connections are asked to finish; open requests get `shutdown.drain_timeout`;
    /// then the upstream sockets close with 1001.
    pub async fn run(self, shutdown: CancellationToken) {
        let admin_stop = CancellationToken::new();
        if let Some(admin) = self.admin {
            tokio::spawn(admin::serve(admin, self.state.clone(), admin_stop.clone()));
        }
        // `closing` is what the listener and connections obey: `shutdown` plus the delay.
        let closing = CancellationToken::new();
        {
            let (state, closing) = (self.state.clone(), closing.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                state.stopping.store(true, Ordering::Release);
                state.metrics.ready.set(0);
                tracing::info!(delay = ?state.config.shutdown.delay, "shutting down: not ready; draining after the delay");
                tokio::time::sleep(state.config.shutdown.delay).await;
                closing.cancel();
            });
        }
        let shutdown = closing;
        let http = &self.state.config.http;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Head and idle timeouts are ours (see `watch`): hyper's would merge them.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(http.http2_max_streams)
            .keep_alive_interval(Some(http.keep_alive_timeout / 2))
            .keep_alive_timeout(http.keep_alive_timeout / 2);
        let builder = Arc::new(builder);
        // One permit per open client connection: at the cap, accepting pauses and
        // the kernel's backlog absorbs the excess instead of our memory.
        let limit = Arc::new(Semaphore::new(http.max_connections));
        let mut connections = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead
                    // of spinning on an error that repeats at once.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = self.state.clone();
            let builder = builder.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                serve_connection(stream, peer, state, &builder, shutdown).await;
                drop(permit);
            });
            // Reap finished connection tasks so the set stays the size of what is open.
            while connections.try_join_next().is_some() {}
        }
        drop(self.listener);
        let drain = self.state.config.shutdown.drain_timeout;
        if tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                remaining = connections.len(),
                "connections still open after drain; closing"
            );
            connections.abort_all();
        }
        self.background.cancel();
        if let Some(sessions) = &self.state.sessions {
            sessions.close();
        }
        self.state.upstreams.close().await;
        admin_stop.cancel();
        // The last requests' lines, before the process exits.
        let access_log = self.state.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || access_log.flush()).await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let http = &state.config.http;
    let (header_timeout, keep_alive) = (http.header_read_timeout, http.keep_alive_timeout);
    let service = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let guard = activity.request_started();
            async move {
                let started = tokio::time::Instant::now();
                let method = req.method().clone();
                let Ok(resp) = rpc::handle(req, &state).await;
                drop(guard);
                let m = &state.metrics;
                m.http_requests
                    .with_label_values(&[resp.status().as_str()])
                    .inc();
                let sent = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                m.bytes_out.inc_by(sent);
                if state.access_log.enabled() {
                    state.access_log.record(AccessRecord {
                        peer,
                        method,
                        status: resp.status().as_u16(),
                        duration_us: started.elapsed().as_micros() as u64,
                        bytes: sent,
                        batch: resp.extensions().get::<rpc::BatchLen>().map(|b| b.0),
                        upstream: resp
                            .extensions()
                            .get::<rpc::AnsweredBy>()
                            .map(|u| u.0.clone()),
                    });
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(WatchedIo::new(stream, activity.clone()));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            expiry = watch::expired(&activity, header_timeout, keep_alive), if !closing => {
                if expiry == watch::Expiry::Head {
                    // Half a head has nothing to answer, and hyper's graceful close
                    // waits for the head to finish: drop the socket.
                    tracing::debug!(%peer, "request head not finished within header_read_timeout");
                    return;
                }
                // Graceful: an idle HTTP/1 connection closes now, HTTP/2 gets a GOAWAY.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
