//! The upstreams of a gateway and their pools of persistent connections.
//!
//! The set is replaced as a whole (copy on write) when discovery changes it, so a call
//! reads a consistent snapshot with one lock-free clone. How a message gets onto one of
//! these connections is `dispatch`'s job.

use super::conn::{Conn, ConnState, PoolSignals, PreludeCall};
use super::connect::{Target, TargetError};
use super::reconnect::{TargetFn, Task};
use super::{balance, health};
use crate::config::{
    BalanceConfig, CallConfig, Config, DiscoveryMode, UpstreamConfig, WebSocketConfig,
};
use crate::metrics::Metrics;
use parking_lot::{Mutex, RwLock};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One upstream address and its pool of persistent connections.
pub struct Upstream {
    /// Its identity for rendezvous hashing, the same on every rpcgate replica: the
    /// address it dials (`ip:port`) with DNS discovery, else its configured URL. Never
    /// shown: the URL may carry credentials.
    pub id: String,
    /// What logs, the access log and metric labels call it: `ip:port` with DNS
    /// discovery, else its `name` (by default the URL without credentials). Shared, so
    /// every reply carries it without copying.
    pub label: Arc<str>,
    /// The configured URL it came from, without credentials.
    pub url: String,
    pub weight: u32,
    pub target: Arc<Target>,
    /// Which `[[upstreams]]` entry it came from.
    pub source: usize,
    pub(crate) conns: Vec<Arc<Conn>>,
    /// False while its health call fails.
    pub(crate) healthy: AtomicBool,
    /// Left the address set: takes no new calls, closes once its calls finish.
    draining: AtomicBool,
    /// Stops its connections (and its health loop).
    token: CancellationToken,
}

impl Upstream {
    pub(crate) fn has_open(&self) -> bool {
        self.conns.iter().any(|c| c.is_open())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Present and serving: not draining, healthy, with an open connection.
    pub fn usable(&self) -> bool {
        !self.is_draining() && self.is_healthy() && self.has_open()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Calls in flight on all its connections.
    pub fn load(&self) -> usize {
        self.conns
            .iter()
            .map(|c| c.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    pub fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_open()).count()
    }
}

/// All upstreams of the gateway, and what every message sent to them shares.
pub struct Upstreams {
    set: RwLock<Arc<Vec<Arc<Upstream>>>>,
    pub(crate) signals: Arc<PoolSignals>,
    pub(crate) calls: CallConfig,
    pub(crate) balance: BalanceConfig,
    pub(crate) retry_methods: HashSet<String>,
    /// `affinity = "connection"`: successful calls to these are replayed on reconnect.
    pub(crate) replay_methods: HashSet<String>,
    ws: Arc<WebSocketConfig>,
    /// `limits.upstream_queue_bytes`, for every connection.
    queue_bytes: usize,
    on_connect: Arc<Vec<PreludeCall>>,
    /// The configured upstreams, to build more instances from (DNS discovery).
    sources: Vec<(UpstreamConfig, Arc<Target>)>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: CancellationToken,
}

/// The frame prefix of a call given by name and raw params (health and on_connect calls).
pub fn prefix_for(method: &str, params: Option<&str>) -> String {
    let mut out = String::from(r#"{"jsonrpc":"2.0","method":"#);
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(method).unwrap_or_default());
    if let Some(params) = params {
        out.push_str(r#","params":"#);
        out.push_str(params);
    }
    out
}

impl Upstreams {
    /// Builds the upstreams and starts their connections; sockets open in the
    /// background, so the gateway serves (with 503s) even while upstreams are down.
    /// With DNS discovery the set starts empty and `discovery` fills it.
    pub fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, TargetError> {
        let mut sources = Vec::new();
        for up in &config.upstreams {
            sources.push((
                up.clone(),
                Arc::new(Target::new(up)?.with_wamp_methods(&config.wamp)),
            ));
        }
        let on_connect = config
            .on_connect
            .iter()
            .map(|c| PreludeCall {
                method: c.method.clone(),
                prefix: prefix_for(&c.method, c.params.as_deref()),
            })
            .collect();
        let upstreams = Arc::new(Upstreams {
            set: RwLock::new(Arc::new(Vec::new())),
            signals: Arc::new(PoolSignals::new(metrics)),
            calls: config.calls.clone(),
            balance: config.balance.clone(),
            retry_methods: config.balance.retry_methods.iter().cloned().collect(),
            replay_methods: config.sessions.replay_methods.iter().cloned().collect(),
            ws: Arc::new(config.websocket.clone()),
            queue_bytes: config.limits.upstream_queue_bytes,
            on_connect: Arc::new(on_connect),
            sources,
            tasks: Mutex::new(JoinSet::new()),
            shutdown: CancellationToken::new(),
        });
        if config.discovery.mode == DiscoveryMode::Static {
            for source in 0..upstreams.sources.len() {
                upstreams.add(source, None);
            }
        }
        Ok(upstreams)
    }

    /// The configured upstreams' host names and ports, for DNS discovery.
    pub fn sources(&self) -> Vec<(String, u16)> {
        self.sources.iter().map(|(_, t)| t.host_port()).collect()
    }

    /// The current address set.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.set.read().clone()
    }

    fn spawn_connection(
        self: &Arc<Self>,
        conn: Arc<Conn>,
        target: TargetFn,
        token: CancellationToken,
    ) {
        let task = Task {
            conn,
            target,
            upstreams: Arc::downgrade(self),
            ws: self.ws.clone(),
            on_connect: self.on_connect.clone(),
            shutdown: token,
        };
        self.tasks.lock().spawn(task.run());
    }

    /// Adds an upstream for configured entry `source`, dialled at `addr` (or by its
    /// host name), and starts its connections. Returns false if it is already present.
    pub fn add(self: &Arc<Self>, source: usize, addr: Option<SocketAddr>) -> bool {
        let Some((cfg, target)) = self.sources.get(source) else {
            return false;
        };
        let target = Arc::new(match addr {
            Some(addr) => target.at_address(addr),
            None => (**target).clone(),
        });
        let id = match addr {
            Some(addr) => addr.to_string(),
            None => cfg.url.clone(),
        };
        if self.snapshot().iter().any(|u| u.id == id) {
            return false;
        }
        let token = self.shutdown.child_token();
        // Shown in logs and labels; `id` may hold the URL's credentials.
        let label: Arc<str> = match addr {
            Some(addr) => Arc::from(addr.to_string()),
            None => Arc::from(cfg.shown_name()),
        };
        let conns: Vec<Arc<Conn>> = (0..cfg.connections)
            .map(|c| {
                Arc::new(Conn::new(
                    &label,
                    c,
                    cfg.max_in_flight,
                    self.queue_bytes,
                    self.signals.clone(),
                ))
            })
            .collect();
        let upstream = Arc::new(Upstream {
            label,
            id,
            url: cfg.shown_name(),
            weight: cfg.weight.max(1),
            target: target.clone(),
            source,
            conns,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            token: token.clone(),
        });
        for conn in &upstream.conns {
            let fixed = target.clone();
            let target_fn: TargetFn = Arc::new(move || Some(fixed.clone()));
            self.spawn_connection(conn.clone(), target_fn, token.clone());
        }
        if let Some(method) = &self.balance.health_method {
            let prefix = prefix_for(method, self.balance.health_params.as_deref());
            let check = health::run(self.clone(), upstream.clone(), prefix, token.clone());
            self.tasks.lock().spawn(check);
        }
        tracing::info!(upstream = %upstream.label, url = %upstream.url, "upstream added");
        let mut set = self.set.write();
        let mut next = (**set).clone();
        next.push(upstream);
        *set = Arc::new(next);
        drop(set);
        self.signals.changed.notify_waiters();
        true
    }

    /// Takes upstream `id` out of the set: it gets no new calls, and its connections
    /// close (1001) once the calls in flight on it have finished or timed out.
    pub fn drain(&self, id: &str) -> bool {
        let removed = {
            let mut set = self.set.write();
            let Some(pos) = set.iter().position(|u| u.id == id) else {
                return false;
            };
            let mut next = (**set).clone();
            let removed = next.remove(pos);
            *set = Arc::new(next);
            removed
        };
        removed.draining.store(true, Ordering::Release);
        tracing::info!(upstream = %removed.label, in_flight = removed.load(), "upstream draining");
        let limit = self.calls.request_timeout;
        self.tasks.lock().spawn(async move {
            let deadline = Instant::now() + limit;
            // Calls in flight end by their deadline at the latest; polling the count
            // at a coarse step keeps this off every call's path.
            while removed.load() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            removed.token.cancel();
        });
        true
    }

    /// A connection of its own for a session keyed `key`, following the key's
    /// rendezvous order over the address set on every (re)connect.
    pub(crate) fn session_connection(
        self: &Arc<Self>,
        key: &[u8],
        index: usize,
        max_in_flight: usize,
        max_replay: usize,
        token: CancellationToken,
    ) -> Arc<Conn> {
        let conn = Arc::new(Conn::for_session(
            &String::from_utf8_lossy(key),
            index,
            max_in_flight,
            self.queue_bytes,
            self.signals.clone(),
            max_replay,
        ));
        let weak = Arc::downgrade(self);
        let key = key.to_vec();
        let target_fn: TargetFn = Arc::new(move || {
            let upstreams = weak.upgrade()?;
            let set = upstreams.snapshot();
            let present: Vec<&Arc<Upstream>> = set.iter().filter(|u| u.is_healthy()).collect();
            let candidates: Vec<balance::Candidate<'_>> = present
                .iter()
                .map(|u| balance::Candidate {
                    id: &u.id,
                    weight: u.weight,
                    load: 0,
                })
                .collect();
            let first = balance::rendezvous_first(&key, &candidates)?;
            Some(present[first].target.clone())
        });
        self.spawn_connection(conn.clone(), target_fn, token);
        conn
    }

    /// Connections open right now, over all upstreams.
    pub fn open_connections(&self) -> usize {
        self.signals.open_connections.load(Ordering::Acquire)
    }

    /// Resolves once at least `n` connections are open.
    pub async fn wait_for_open(&self, n: usize) {
        loop {
            let notified = self.signals.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_connections() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Whether any upstream can take a call now (readiness).
    pub fn any_usable(&self) -> bool {
        self.snapshot().iter().any(|u| u.usable())
    }

    /// `upstream: why` for each upstream whose last connect attempt failed, for
    /// `/readyz` (a refused WAMP join names the router's reason there).
    pub fn connect_errors(&self) -> Vec<String> {
        self.snapshot()
            .iter()
            .filter(|u| !u.usable())
            .filter_map(|u| {
                let error = u.conns.iter().find_map(|c| c.last_error())?;
                Some(format!("{}: {error}", u.label))
            })
            .collect()
    }

    /// Sets the per-upstream gauges from the current sets (at scrape time): one per
    /// worker, whose connections add up; an upstream is healthy when it is healthy
    /// for every worker.
    pub fn refresh_metrics<'a>(sets: impl IntoIterator<Item = &'a Upstreams>, m: &Metrics) {
        m.upstream_connections.reset();
        m.upstream_healthy.reset();
        let mut by_label: Vec<(Arc<str>, [i64; 3], bool)> = Vec::new();
        for set in sets {
            for u in set.snapshot().iter() {
                let i = match by_label.iter().position(|(l, _, _)| *l == u.label) {
                    Some(i) => i,
                    None => {
                        by_label.push((u.label.clone(), [0; 3], true));
                        by_label.len() - 1
                    }
                };
                let entry = &mut by_label[i];
                for c in &u.conns {
                    match c.state() {
                        ConnState::Open => entry.1[0] += 1,
                        ConnState::Connecting | ConnState::Preparing => entry.1[1] += 1,
                        ConnState::Backoff | ConnState::Stopped => entry.1[2] += 1,
                    }
                }
                entry.2 &= u.is_healthy();
            }
        }
        for (label, counts, healthy) in by_label {
            for (state, n) in ["open", "connecting", "backoff"].iter().zip(counts) {
                m.upstream_connections
                    .with_label_values(&[&*label, state])
                    .set(n);
            }
            m.upstream_healthy
                .with_label_values(&[&*label])
                .set(i64::from(healthy));
        }
    }

    /// Calls registered on any pooled connection and waiting for a reply.
    pub fn pending_calls(&self) -> usize {
        self.snapshot()
            .iter()
            .flat_map(|u| u.conns.iter())
            .map(|c| c.pending_len())
            .sum()
    }

    /// Upstream messages that matched no call, and frames that were not JSON-RPC.
    pub fn unmatched_counts(&self) -> (u64, u64) {
        (
            self.signals.unmatched.load(Ordering::Relaxed),
            self.signals.garbage.load(Ordering::Relaxed),
        )
    }

    /// Stops every connection (1001) and waits for the tasks to end.
    pub async fn close(&self) {
        self.shutdown.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        while tasks.join_next().await.is_some() {}
    }
}
