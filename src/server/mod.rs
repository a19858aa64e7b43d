//! The client-facing HTTP server: accept loop, per-connection limits, graceful stop.
//!
//! HTTP/1.1 with keep-alive and HTTP/2 share one port, told apart in `connection.rs`:
//! over TLS (`[tls]`) by ALPN `h2` or `http/1.1`, or without it (h2c, prior knowledge)
//! by the first bytes. Idle HTTP/1 connections are parked there between requests, and
//! HTTP/1.1 event streams are served without hyper once their head is out (`detach.rs`).

mod accept;
mod admin;
mod answer;
mod auth;
mod body;
mod connection;
mod cors;
mod demo;
mod detach;
// Reached by lib.rs's `fuzzing` module too.
pub(crate) mod events;
mod fdlimit;
mod listener;
mod per_address;
mod prefixed;
mod refuse;
mod response;
mod rpc;
mod session_key;
mod stack;
mod tls;
mod trim;
mod watch;
mod workers;
mod ws;

pub use tls::ClientIdentity;
use tls::Tls;
use workers::Shared;
pub use workers::{Peers, WorkerId, Workers, worker_count};

use crate::access::Access;
use crate::budget::{Budget, Budgets};
use crate::config::{AdminListen, Affinity, Config, DiscoveryMode};
use crate::logging::AccessLog;
use crate::metrics::Metrics;
use crate::push::{Hub, HubConfig};
use crate::upstream::{Resolver, Sessions, SystemResolver, TargetError, Upstreams, discovery};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Failures starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The io error is in the message, not a `source`: anyhow would print it twice.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(
        "cannot listen on {addr}: {error} (set by admin_listen, --admin-listen or RPCGATE_ADMIN_LISTEN)"
    )]
    AdminBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("upstream: {0}")]
    Upstream(#[from] TargetError),
    #[error("{0}")]
    Access(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::FileError),
    #[error("starting a worker: {0}")]
    Runtime(String),
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
    /// Bytes held for all clients (`limits.memory`).
    pub budget: Arc<Budget>,
    /// Push sessions: what upstreams send on their own, on its way to clients.
    pub hub: Arc<Hub>,
    /// Cancelled when connections are asked to finish: event streams and WebSocket
    /// clients end then, instead of holding the drain open.
    pub closing: CancellationToken,
    /// `rpcgate demo`: serve the demo page at `/demo/`.
    pub demo_page: bool,
    /// Who may call what, and how often.
    pub access: Arc<Access>,
    /// The listeners' certificate, when `[tls]` is set.
    tls: Option<Arc<Tls>>,
    /// What this worker shares with the others (`runtime.workers`).
    shared: Arc<Shared>,
    /// Which worker this is.
    pub worker: WorkerId,
    /// All the workers, for handing a session's request to its owner.
    pub peers: Arc<Peers>,
}

impl AppState {
    /// A client connection's budgets: its own `limits.connection_bytes`, inside the
    /// gateway's.
    pub fn connection_budgets(&self) -> Budgets {
        Budgets::for_connection(&self.budget, self.config.limits.connection_bytes)
    }

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
        // Before any socket: what the configuration can use must fit the limit.
        fdlimit::ensure(&config);
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| StartError::Bind { addr, error })?;
        let admin = bind_admin_std(&config)?
            .map(TcpListener::from_std)
            .transpose()
            .map_err(|error| StartError::AdminBind {
                addr: config.listen,
                error,
            })?;
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
        let shared = Shared::new(&config)?;
        let metrics = shared.metrics.clone();
        let peers = Arc::new(Peers::default());
        let id = WorkerId::SOLE;
        Gateway::build(listener, config, shared, metrics, peers, id, resolver)
    }

    /// Worker `id` of a gateway of several (see [`Workers`]).
    fn worker(
        listener: TcpListener,
        config: Config,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        peers: Arc<Peers>,
        id: WorkerId,
    ) -> Result<Gateway, StartError> {
        let resolver = Arc::new(SystemResolver);
        Gateway::build(listener, config, shared, metrics, peers, id, resolver)
    }

    fn build(
        listener: TcpListener,
        config: Config,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        peers: Arc<Peers>,
        worker: WorkerId,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Gateway, StartError> {
        let background = CancellationToken::new();
        let upstreams = Upstreams::start(&config, metrics.clone())?;
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
        let budget = shared.budget.clone();
        let hub = Hub::start(
            HubConfig {
                push: config.push.clone(),
                rules: config.subscription_rules(),
                request_timeout: config.calls.request_timeout,
                reconnect_base: config.websocket.reconnect_base,
                reconnect_max: config.websocket.reconnect_max,
            },
            &upstreams,
            budget.clone(),
            metrics.clone(),
        );
        Ok(Gateway {
            listener,
            admin: None,
            state: Arc::new(AppState {
                config,
                upstreams,
                sessions,
                metrics,
                access_log: shared.access_log.clone(),
                stopping: AtomicBool::new(false),
                budget,
                hub,
                closing: CancellationToken::new(),
                demo_page: false,
                access: shared.access.clone(),
                tls: shared.tls.clone(),
                shared,
                worker,
                peers,
            }),
            background,
        })
    }

    /// Serves the demo page at `/demo/` too (`rpcgate demo`).
    pub fn with_demo_page(mut self) -> Gateway {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.demo_page = true;
        }
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.state.upstreams.clone()
    }

    /// What reloads the listeners' certificate on demand (SIGHUP), when `[tls]` is set.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.state.tls.clone().map(TlsReloader)
    }

    /// Serves until `shutdown` is cancelled. Then: readiness goes false at once; after
    /// `shutdown.delay` (so load balancers stop routing here) the listener closes and
    /// connections are asked to finish; open requests get `shutdown.drain_timeout`;
    /// then the upstream sockets close with 1001.
    pub async fn run(self, shutdown: CancellationToken) {
        self.state.peers.set_sole(&self.state);
        // Once per process, whichever the number of workers.
        if self.state.worker.index == 0 {
            tokio::spawn(trim::run(self.background.clone()));
            if let Some(tls) = &self.state.tls {
                tokio::spawn(tls.clone().watch(self.background.clone()));
            }
            if self.state.access.is_active() {
                tokio::spawn(self.state.access.clone().maintain(self.background.clone()));
            }
        }
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
                state.closing.cancel();
            });
        }
        let shutdown = closing;
        listener::serve(self.listener, self.state.clone(), shutdown).await;
        self.background.cancel();
        self.state.hub.close();
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

/// The admin listener's socket, bound now (before the workers start), if enabled.
fn bind_admin_std(config: &Config) -> Result<Option<std::net::TcpListener>, StartError> {
    let bind = |addr: SocketAddr| {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    };
    Ok(match config.admin_listen {
        AdminListen::Off => None,
        // Probes and scrapers are pointed at this address: no fallback, and the error
        // says which setting to fix.
        AdminListen::Explicit(addr) => {
            Some(bind(addr).map_err(|error| StartError::AdminBind { addr, error })?)
        }
        // Nobody asked for this port, so it must not keep rpcgate from starting (a
        // second instance on the host, say): any free port on the same loopback
        // address will do, and the caller prints the one bound.
        AdminListen::Default(addr) => Some(match bind(addr) {
            Ok(l) => l,
            Err(error) => {
                let any_port = SocketAddr::new(addr.ip(), 0);
                let fallback = bind(any_port).map_err(|error| StartError::Bind {
                    addr: any_port,
                    error,
                })?;
                tracing::warn!(
                    default = %addr,
                    %error,
                    actual = %fallback.local_addr().unwrap_or(any_port),
                    "admin listener: the default address is taken; serving on a free port \
                     instead (set admin_listen or --admin-listen to choose one)"
                );
                fallback
            }
        }),
    })
}

/// Reloads the listeners' certificate files, as a change of one of them would.
#[derive(Clone)]
pub struct TlsReloader(Arc<Tls>);

impl TlsReloader {
    /// Reads the files again, off the runtime's threads; the certificate in use is
    /// kept if they do not load (logged, and counted in `rpcgate_tls_reloads_total`).
    /// True if the new one is in use.
    pub async fn reload(&self) -> bool {
        let tls = self.0.clone();
        tokio::task::spawn_blocking(move || tls.reload())
            .await
            .unwrap_or(false)
    }
}
