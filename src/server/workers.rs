//! Shared-nothing workers: `runtime.workers = N` runs N gateways in one process, each
//! on its own thread with tokio's current-thread scheduler, its own listener socket on
//! the same port (`SO_REUSEPORT`: the kernel spreads connections over them), its own
//! upstream connections, pending maps, sessions and push hub. A call is served start
//! to end on the thread that accepted it, with no lock or wakeup shared with another
//! worker; what must be one per process (metrics, access rules and rate limits, the
//! access log, the memory budget, connection limits, the certificate) is [`Shared`].
//!
//! A session (a sticky key, a push session, a session's own upstream socket) lives on
//! the worker its key hashes to ([`Peers::owner`]). A request carrying a key that
//! another worker owns is handed to that worker once, as it is (its body is read from
//! the connection as it arrives, never copied), and the answer comes back to the
//! accepting worker's connection. Keys rpcgate makes up are drawn until they hash to
//! the worker making them, so a new session never needs the hand-over.

use super::{AppState, Gateway, StartError};
use crate::access::Access;
use crate::budget::Budget;
use crate::config::Config;
use crate::logging::AccessLog;
use crate::metrics::Metrics;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::listener::MAX_REFUSING;
use super::per_address::PerAddress;
use super::tls::Tls;

/// What every worker of one gateway uses together: one of each per process.
pub(crate) struct Shared {
    /// Worker 0's metrics, which also count what is per process (the access rules,
    /// TLS handshakes, the process itself); the other workers count in shards of
    /// their own, added up at scrape time.
    pub metrics: Arc<Metrics>,
    pub access: Arc<Access>,
    pub access_log: AccessLog,
    /// `limits.memory`: one budget for all clients, whichever worker serves them.
    pub budget: Arc<Budget>,
    pub tls: Option<Arc<Tls>>,
    /// `http.max_connections` places, taken by every worker's accept loop.
    pub served: Arc<Semaphore>,
    /// Sockets over `max_connections` being answered at once.
    pub refusing: Arc<Semaphore>,
    /// `http.max_connections_per_address`, counted over all workers.
    pub per_address: Option<Arc<PerAddress>>,
}

/// The method names worth a metric label value of their own.
pub(crate) fn metric_methods(config: &Config) -> impl Iterator<Item = String> + '_ {
    config
        .metric_methods
        .iter()
        .chain(&config.balance.retry_methods)
        .chain(&config.sessions.replay_methods)
        .chain(&config.balance.health_method)
        .cloned()
}

impl Shared {
    pub fn new(config: &Config) -> Result<Arc<Shared>, StartError> {
        let metrics = Arc::new(Metrics::new(metric_methods(config)));
        let tls = match &config.tls {
            Some(files) => Some(Tls::load(files, metrics.clone())?),
            None => None,
        };
        let access = Arc::new(
            Access::new(&config.auth, &config.rate_limits, metrics.clone())
                .map_err(StartError::Access)?,
        );
        let access_log = if config.log.access_log {
            AccessLog::start(config.log.access_log_sample)
        } else {
            AccessLog::off()
        };
        let http = &config.http;
        Ok(Arc::new(Shared {
            metrics,
            access,
            access_log,
            budget: Budget::new(config.limits.memory_bytes()),
            tls,
            served: Arc::new(Semaphore::new(http.max_connections)),
            refusing: Arc::new(Semaphore::new(http.max_connections.min(MAX_REFUSING))),
            per_address: PerAddress::new(http.max_connections_per_address),
        }))
    }
}

/// Which worker this is, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerId {
    pub index: usize,
    pub count: usize,
}

impl WorkerId {
    pub const SOLE: WorkerId = WorkerId { index: 0, count: 1 };
}

/// One worker, as the others reach it.
struct Peer {
    /// Its runtime: a handed-over request runs there.
    runtime: Handle,
    /// Weak: each worker's state holds the peers, which must not keep it alive.
    state: Weak<AppState>,
}

/// Every worker of the gateway, known to each of them once all have started.
#[derive(Default)]
pub struct Peers {
    workers: OnceLock<Vec<Peer>>,
}

impl Peers {
    /// The worker that owns session key `shown` (as the client sends it): the same for
    /// every worker, so all of a session's requests meet there.
    pub fn owner(shown: &str, count: usize) -> usize {
        if count <= 1 {
            return 0;
        }
        // SipHash with fixed keys: stable within the process, which is all that matters.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        shown.hash(&mut h);
        (h.finish() % count as u64) as usize
    }

    fn set(&self, workers: Vec<Peer>) {
        let _ = self.workers.set(workers);
    }

    /// Registers a gateway running alone, unless its workers were registered already.
    pub(super) fn set_sole(&self, state: &Arc<AppState>) {
        if self.workers.get().is_none() {
            self.set(vec![Peer {
                runtime: Handle::current(),
                state: Arc::downgrade(state),
            }]);
        }
    }

    /// Every worker's state (for the admin listener's totals); the caller's alone
    /// before they are all registered.
    pub fn states(&self) -> Vec<Arc<AppState>> {
        self.workers
            .get()
            .map(|w| w.iter().filter_map(|p| p.state.upgrade()).collect())
            .unwrap_or_default()
    }

    /// Worker `index`'s runtime and state, if it is running.
    pub(super) fn get(&self, index: usize) -> Option<(Handle, Arc<AppState>)> {
        let peer = self.workers.get()?.get(index)?;
        Some((peer.runtime.clone(), peer.state.upgrade()?))
    }
}

/// The worker count `runtime.workers` asks for: 0 is one per CPU this process may
/// use, which counts the affinity mask and a cgroup's CPU quota.
pub fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Worker `id`'s share of what the configuration gives the whole gateway: the upstream
/// connections and session limits are split, so that N workers open (about) the
/// connections one would, rather than N times as many.
fn share(config: &Config, id: WorkerId) -> Config {
    let mut config = config.clone();
    let part = |total: usize| {
        // Worker i gets total / n, and one more for i < total % n; at least 1.
        (total / id.count + usize::from(id.index < total % id.count)).max(1)
    };
    for up in &mut config.upstreams {
        up.connections = part(up.connections);
    }
    config.sessions.max_sessions = config.sessions.max_sessions.div_ceil(id.count);
    config.push.max_sessions = config.push.max_sessions.div_ceil(id.count);
    config
}

/// A listener socket that other workers' sockets may share (`SO_REUSEPORT`).
fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The kernel clamps it to net.core.somaxconn.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A running multi-worker gateway.
pub struct Workers {
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tls: Option<Arc<Tls>>,
}

impl Workers {
    /// Binds `count` listeners on `config.listen` (and the admin listener, served by
    /// worker 0), and starts a thread per worker; each serves until `shutdown`.
    pub fn start(
        config: Config,
        count: usize,
        shutdown: CancellationToken,
    ) -> Result<Workers, StartError> {
        let count = count.max(1);
        super::fdlimit::ensure(&config);
        let bind_error = |addr, error| StartError::Bind { addr, error };
        let first = reuse_port_listener(config.listen).map_err(|e| bind_error(config.listen, e))?;
        // Port 0 picked a port: the other workers join that one.
        let addr = first
            .local_addr()
            .map_err(|e| bind_error(config.listen, e))?;
        let mut listeners = vec![first];
        for _ in 1..count {
            listeners.push(reuse_port_listener(addr).map_err(|e| bind_error(addr, e))?);
        }
        let admin = super::bind_admin_std(&config)?;
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let shared = Shared::new(&config)?;
        let peers = Arc::new(Peers::default());
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let start = Arc::new(std::sync::Barrier::new(count + 1));
        let mut admin = admin;
        let mut threads = Vec::with_capacity(count);
        for (index, listener) in listeners.into_iter().enumerate() {
            let id = WorkerId { index, count };
            let config = share(&config, id);
            let metrics = match index {
                0 => shared.metrics.clone(),
                _ => Arc::new(Metrics::shard(metric_methods(&config))),
            };
            let (shared, peers, built, start) = (
                shared.clone(),
                peers.clone(),
                built_tx.clone(),
                start.clone(),
            );
            let shutdown = shutdown.clone();
            let admin = admin.take();
            let thread = std::thread::Builder::new()
                .name(format!("rpcgate-w{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = built.send(Err(StartError::Runtime(e.to_string())));
                            start.wait();
                            return;
                        }
                    };
                    let gateway = runtime.block_on(async {
                        let listener = TcpListener::from_std(listener)
                            .map_err(|error| StartError::Bind { addr, error })?;
                        let admin =
                            admin
                                .map(TcpListener::from_std)
                                .transpose()
                                .map_err(|error| StartError::AdminBind {
                                    addr: admin_addr.unwrap_or(addr),
                                    error,
                                })?;
                        Gateway::worker(listener, config, shared, metrics, peers, id)
                            .map(|g| g.with_admin(admin))
                    });
                    let gateway = match gateway {
                        Ok(g) => {
                            let _ = built.send(Ok((index, runtime.handle().clone(), g.state())));
                            g
                        }
                        Err(e) => {
                            let _ = built.send(Err(e));
                            start.wait();
                            return;
                        }
                    };
                    // Serve only once every worker is known to every other.
                    start.wait();
                    runtime.block_on(gateway.run(shutdown));
                })
                .map_err(|e| StartError::Runtime(e.to_string()))?;
            threads.push(thread);
        }
        drop(built_tx);
        let mut states = Vec::with_capacity(count);
        let mut failed = None;
        for _ in 0..count {
            match built_rx.recv() {
                Ok(Ok(worker)) => states.push(worker),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some(StartError::Runtime("a worker exited".into()))),
            }
        }
        if let Some(e) = failed {
            shutdown.cancel();
            start.wait();
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        states.sort_by_key(|(i, _, _)| *i);
        peers.set(
            states
                .into_iter()
                .map(|(_, runtime, state)| Peer {
                    runtime,
                    state: Arc::downgrade(&state),
                })
                .collect(),
        );
        start.wait();
        Ok(Workers {
            addr,
            admin: admin_addr,
            threads,
            tls: shared.tls.clone(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// What reloads the listeners' certificate (SIGHUP), when `[tls]` is set.
    pub fn tls_reloader(&self) -> Option<super::TlsReloader> {
        self.tls.clone().map(super::TlsReloader)
    }

    /// Waits (blocking this thread) until every worker has stopped.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_owner_and_keys_spread_over_workers() {
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            let key = format!("{i:032x}");
            let owner = Peers::owner(&key, 4);
            assert_eq!(owner, Peers::owner(&key, 4));
            seen[owner] += 1;
        }
        // Uniform would be 1000 each.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(Peers::owner("anything", 1), 0);
    }

    #[test]
    fn the_shares_add_up_to_what_was_configured() {
        let mut config = Config::default();
        config.upstreams = vec![crate::config::UpstreamConfig::new("ws://127.0.0.1:1")];
        config.upstreams[0].connections = 5;
        let parts: Vec<usize> = (0..3)
            .map(|index| share(&config, WorkerId { index, count: 3 }).upstreams[0].connections)
            .collect();
        assert_eq!(parts, [2, 2, 1]);
        // Never none: each worker needs a connection to serve its calls.
        config.upstreams[0].connections = 1;
        let two = share(&config, WorkerId { index: 1, count: 2 });
        assert_eq!(two.upstreams[0].connections, 1);
    }
}
