//! The client-facing HTTP server: accept loop, per-connection limits, graceful stop.
//!
//! HTTP/1.1 with keep-alive and HTTP/2 without TLS (h2c, prior knowledge) share one
//! port through hyper-util's protocol detection.

mod rpc;
mod watch;

use crate::config::{Affinity, Config, DiscoveryMode};
use crate::upstream::{Resolver, Sessions, SystemResolver, TargetError, Upstreams, discovery};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::Arc;
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
}

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    state: Arc<AppState>,
    /// Stops discovery, after the HTTP side has drained.
    background: CancellationToken,
}

impl Gateway {
    /// Binds the listener and starts the upstream connections (in the background).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Gateway::from_listener(listener, config)
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
        let upstreams = Upstreams::start(&config)?;
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
        Ok(Gateway {
            listener,
            state: Arc::new(AppState {
                config,
                upstreams,
                sessions,
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

    /// Serves until `shutdown` is cancelled, then stops accepting, lets open
    /// requests finish (none outlives its `request_timeout`), and closes upstreams.
    pub async fn run(self, shutdown: CancellationToken) {
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
        let drain = self.state.config.calls.request_timeout + Duration::from_secs(1);
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
        service_fn(move |req| {
            let state = state.clone();
            let guard = activity.request_started();
            async move {
                let answer = rpc::handle(req, &state).await;
                drop(guard);
                answer
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
