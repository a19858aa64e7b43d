//! The upstreams, their connection pools, and how a call gets onto one of them.
//!
//! A call reserves a slot (a [`Permit`]) on a connection: for a plain call, on the
//! least-loaded connection of the upstream that power-of-two-choices picks; for a
//! sticky session, of the first usable upstream in the key's rendezvous order; for a
//! session with its own connection, on that one. It then registers and queues its
//! frame there and waits for the reply until its deadline. With no connection open it
//! waits up to `connect_wait`, with every connection full up to `queue_timeout`; both
//! bounded by its deadline and by `max_waiting`, so a short upstream blip delays calls
//! instead of failing them, and nothing queues without bound.
//!
//! Failover: a call that never reached a socket goes to another upstream; one that
//! was written when its connection died is sent again only if its method is listed in
//! `retry_methods`, so a non-idempotent call is never executed twice.

use super::balance::{self, Candidate};
use super::connect::{Target, TargetError};
use super::connection::{
    self, ConnState, Failure, PoolSignals, PreludeCall, Refused, Reply, Shared, TargetFn,
};
use super::pending::CallId;
use crate::config::{
    BalanceConfig, CallConfig, Config, DiscoveryMode, UpstreamConfig, WebSocketConfig,
};
use crate::error::Error;
use crate::jsonrpc::{Call, finish_frame};
use parking_lot::{Mutex, RwLock};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

/// Where a call may go.
#[derive(Clone, Copy)]
pub enum Route<'a> {
    /// Balanced call by call.
    Any,
    /// `affinity = "upstream"`: the session key's rendezvous order.
    Sticky(&'a [u8]),
    /// `affinity = "connection"`: the session's own connection, nowhere else.
    Own(&'a Arc<Shared>),
}

/// One upstream address and its pool of persistent connections.
pub struct Upstream {
    /// Its identity for rendezvous hashing, the same on every rpcgate replica: the
    /// address it dials (`ip:port`) with DNS discovery, else its configured URL.
    pub id: String,
    /// `id` again, shared: handed to every reply for the access log without copying.
    pub label: Arc<str>,
    /// The configured URL it came from.
    pub url: String,
    pub weight: u32,
    pub target: Arc<Target>,
    /// Which `[[upstreams]]` entry it came from.
    pub source: usize,
    conns: Vec<Arc<Shared>>,
    /// False while its health call fails.
    healthy: AtomicBool,
    /// Left the address set: takes no new calls, closes once its calls finish.
    draining: AtomicBool,
    /// Stops its connections (and its health loop).
    token: CancellationToken,
}

impl Upstream {
    fn has_open(&self) -> bool {
        self.conns.iter().any(|c| c.is_open())
    }

    /// Present and serving: not draining, healthy, with an open connection.
    pub fn usable(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.healthy.load(Ordering::Acquire)
            && self.has_open()
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

/// All upstreams of the gateway.
pub struct Upstreams {
    /// The current address set. Replaced as a whole (copy on write) when discovery
    /// changes it, so a call reads a consistent snapshot with one lock-free clone.
    set: RwLock<Arc<Vec<Arc<Upstream>>>>,
    signals: Arc<PoolSignals>,
    calls: CallConfig,
    balance: BalanceConfig,
    retry_methods: HashSet<String>,
    ws: Arc<WebSocketConfig>,
    on_connect: Arc<Vec<PreludeCall>>,
    /// The configured upstreams, to build more instances from (DNS discovery).
    sources: Vec<(UpstreamConfig, Arc<Target>)>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: CancellationToken,
}

/// A slot on one connection, held for the whole call: it bounds the queue and the
/// pending map, and frees the slot however the call ends (reply, timeout, client gone).
pub struct Permit {
    conn: Arc<Shared>,
    count: usize,
    signals: Arc<PoolSignals>,
    /// The upstream it belongs to (none for a session's own connection).
    upstream: Option<Arc<Upstream>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(self.count, Ordering::AcqRel);
        if self.signals.waiters.load(Ordering::Acquire) > 0 {
            self.signals.changed.notify_waiters();
        }
    }
}

/// Removes a call from its connection's pending map if the caller stops waiting
/// before the reply (timeout, or the HTTP client went away and dropped us).
struct Registered<'a> {
    conn: &'a Shared,
    ids: Vec<CallId>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.conn.forget(id);
        }
    }
}

enum Pick {
    Got(Permit),
    NoneOpen,
    AllFull,
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
    pub fn start(
        config: &Config,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<Self>, TargetError> {
        let mut sources = Vec::new();
        for up in &config.upstreams {
            sources.push((up.clone(), Arc::new(Target::new(up)?)));
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
            signals: Arc::new(PoolSignals {
                metrics,
                ..PoolSignals::default()
            }),
            calls: config.calls.clone(),
            balance: config.balance.clone(),
            retry_methods: config.balance.retry_methods.iter().cloned().collect(),
            ws: Arc::new(config.websocket.clone()),
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
        let conns: Vec<Arc<Shared>> = (0..cfg.connections)
            .map(|c| {
                Arc::new(Shared::new(
                    format!("{id}#{c}"),
                    cfg.max_in_flight,
                    self.signals.clone(),
                ))
            })
            .collect();
        let upstream = Arc::new(Upstream {
            label: Arc::from(id.as_str()),
            id,
            url: cfg.url.clone(),
            weight: cfg.weight.max(1),
            target: target.clone(),
            source,
            conns,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            token: token.clone(),
        });
        let mut tasks = self.tasks.lock();
        for conn in &upstream.conns {
            let fixed = target.clone();
            let target_fn: TargetFn = Arc::new(move || Some(fixed.clone()));
            tasks.spawn(connection::run(
                conn.clone(),
                target_fn,
                self.ws.clone(),
                self.on_connect.clone(),
                token.clone(),
            ));
        }
        if let Some(method) = &self.balance.health_method {
            let prefix = prefix_for(method, self.balance.health_params.as_deref());
            tasks.spawn(health_loop(
                self.clone(),
                upstream.clone(),
                prefix,
                token.clone(),
            ));
        }
        drop(tasks);
        tracing::info!(upstream = %upstream.id, url = %upstream.url, "upstream added");
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
        tracing::info!(upstream = %removed.id, in_flight = removed.load(), "upstream draining");
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

    /// Sets the per-upstream gauges from the current set (at scrape time).
    pub fn refresh_metrics(&self, m: &crate::metrics::Metrics) {
        m.upstream_connections.reset();
        m.upstream_healthy.reset();
        for u in self.snapshot().iter() {
            let mut counts = [0i64; 3];
            for c in &u.conns {
                match c.state() {
                    ConnState::Open => counts[0] += 1,
                    ConnState::Connecting => counts[1] += 1,
                    ConnState::Backoff | ConnState::Stopped => counts[2] += 1,
                }
            }
            for (state, n) in ["open", "connecting", "backoff"].iter().zip(counts) {
                m.upstream_connections
                    .with_label_values(&[u.id.as_str(), state])
                    .set(n);
            }
            m.upstream_healthy
                .with_label_values(&[u.id.as_str()])
                .set(i64::from(u.is_healthy()));
        }
    }

    /// Each pooled connection's state, upstream by upstream.
    pub fn states(&self) -> Vec<ConnState> {
        self.snapshot()
            .iter()
            .flat_map(|u| u.conns.iter().map(|c| c.state()))
            .collect()
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

    /// A connection of its own for a session keyed `key`, following the key's
    /// rendezvous order over the address set on every (re)connect.
    pub fn session_connection(
        self: &Arc<Self>,
        key: &[u8],
        label: String,
        max_in_flight: usize,
        max_replay: usize,
        token: CancellationToken,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared::for_session(
            label,
            max_in_flight,
            self.signals.clone(),
            max_replay,
        ));
        let weak = Arc::downgrade(self);
        let key = key.to_vec();
        let target_fn: TargetFn = Arc::new(move || {
            let upstreams = weak.upgrade()?;
            let set = upstreams.snapshot();
            let present: Vec<&Arc<Upstream>> = set.iter().filter(|u| u.is_healthy()).collect();
            let candidates: Vec<Candidate<'_>> = present
                .iter()
                .map(|u| Candidate {
                    id: &u.id,
                    weight: u.weight,
                    load: 0,
                })
                .collect();
            let first = balance::rendezvous_first(&key, &candidates)?;
            Some(present[first].target.clone())
        });
        self.tasks.lock().spawn(connection::run(
            shared.clone(),
            target_fn,
            self.ws.clone(),
            self.on_connect.clone(),
            token,
        ));
        shared
    }

    fn retryable(&self, call: &Call<'_>) -> bool {
        !self.retry_methods.is_empty() && self.retry_methods.contains(call.method_name().as_ref())
    }

    /// Sends one call and waits for its reply.
    pub async fn call(
        &self,
        call: &Call<'_>,
        deadline: Instant,
        route: Route<'_>,
    ) -> Result<Reply, Error> {
        let mut connect_deadline = None;
        let mut avoid: Option<Arc<Upstream>> = None;
        loop {
            let permit = self
                .reserve(1, deadline, route, avoid.as_ref(), &mut connect_deadline)
                .await?;
            let (tx, rx) = oneshot::channel();
            let mut frame = String::with_capacity(call.frame_len_hint());
            call.encode_prefix(&mut frame);
            let id = match permit.conn.submit(frame, Some(tx)) {
                Ok(Some(id)) => id,
                Ok(None) => return Err(Error::Internal("call registered without an id")),
                // Closed between the pick and the submit: pick again.
                Err(Refused::Closed) => continue,
                Err(Refused::Full) => return Err(Error::Overloaded),
            };
            let mut registered = Registered {
                conn: &permit.conn,
                ids: vec![id],
            };
            match timeout_at(deadline, rx).await {
                Err(_) => return Err(Error::Timeout(self.calls.request_timeout)),
                Ok(answer) => {
                    // The connection already removed the entry when it answered.
                    registered.ids.clear();
                    match answer {
                        Ok(Ok(mut reply)) => {
                            reply.upstream = permit.upstream.as_ref().map(|u| u.label.clone());
                            return Ok(reply);
                        }
                        Ok(Err(Failure::NotSent)) => avoid = permit.upstream.clone(),
                        Ok(Err(Failure::Lost)) if self.retryable(call) => {
                            avoid = permit.upstream.clone();
                        }
                        Ok(Err(Failure::Lost)) | Err(_) => return Err(Error::UpstreamLost),
                    }
                }
            }
        }
    }

    /// Queues a notification; returns once it is on an open connection's queue.
    pub async fn notify(
        &self,
        call: &Call<'_>,
        deadline: Instant,
        route: Route<'_>,
    ) -> Result<(), Error> {
        let mut connect_deadline = None;
        loop {
            let permit = self
                .reserve(1, deadline, route, None, &mut connect_deadline)
                .await?;
            let mut frame = String::with_capacity(call.frame_len_hint());
            call.encode_prefix(&mut frame);
            match permit.conn.submit(frame, None) {
                Ok(_) => return Ok(()),
                Err(Refused::Closed) => continue,
                Err(Refused::Full) => return Err(Error::Overloaded),
            }
        }
    }

    /// Sends `calls` as one batch frame on one connection (`batch = "forward"`).
    /// Returns one answer per call that expects one, in order.
    pub async fn forward_batch(
        &self,
        calls: &[Call<'_>],
        deadline: Instant,
        route: Route<'_>,
    ) -> Result<Vec<Result<Reply, Error>>, Error> {
        let expecting = calls.iter().filter(|c| !c.is_notification()).count();
        let mut connect_deadline = None;
        let mut avoid: Option<Arc<Upstream>> = None;
        loop {
            let permit = self
                .reserve(
                    calls.len().max(1),
                    deadline,
                    route,
                    avoid.as_ref(),
                    &mut connect_deadline,
                )
                .await?;
            let mut senders = Vec::with_capacity(expecting);
            let mut receivers = Vec::with_capacity(expecting);
            for _ in 0..expecting {
                let (tx, rx) = oneshot::channel();
                senders.push(tx);
                receivers.push(rx);
            }
            let submitted = permit.conn.submit_batch(senders, |ids| {
                let hint: usize = calls.iter().map(Call::frame_len_hint).sum();
                let mut text = String::with_capacity(hint + 2);
                text.push('[');
                let mut ids = ids.iter();
                for (i, call) in calls.iter().enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    call.encode_prefix(&mut text);
                    let id = if call.is_notification() {
                        None
                    } else {
                        ids.next().copied()
                    };
                    finish_frame(&mut text, id);
                }
                text.push(']');
                text
            });
            let ids = match submitted {
                Ok(ids) => ids,
                Err(Refused::Closed) => continue,
                Err(Refused::Full) => return Err(Error::Overloaded),
            };
            // Forgets, at the end, whichever calls are still pending (timed out).
            let _registered = Registered {
                conn: &permit.conn,
                ids,
            };
            let mut answers = Vec::with_capacity(expecting);
            let mut requeue = false;
            for rx in receivers {
                answers.push(match timeout_at(deadline, rx).await {
                    Err(_) => Err(Error::Timeout(self.calls.request_timeout)),
                    Ok(Ok(Ok(reply))) => Ok(reply),
                    Ok(Ok(Err(Failure::NotSent))) => {
                        requeue = true;
                        Err(Error::UpstreamLost)
                    }
                    Ok(Ok(Err(Failure::Lost)) | Err(_)) => Err(Error::UpstreamLost),
                });
            }
            // The frame either reached the socket as a whole or not at all.
            if requeue {
                avoid = permit.upstream.clone();
                continue;
            }
            return Ok(answers);
        }
    }

    /// Takes `count` slots on a connection `route` allows, waiting as configured.
    async fn reserve(
        &self,
        count: usize,
        deadline: Instant,
        route: Route<'_>,
        avoid: Option<&Arc<Upstream>>,
        connect_deadline: &mut Option<Instant>,
    ) -> Result<Permit, Error> {
        let mut queue_deadline = None;
        let mut waiting_since: Option<Instant> = None;
        let observe = |since: Option<Instant>| {
            if let (Some(since), Some(m)) = (since, &self.signals.metrics) {
                m.queue_wait.observe(since.elapsed().as_secs_f64());
            }
        };
        loop {
            let notified = self.signals.changed.notified();
            tokio::pin!(notified);
            // Register for wakeups before looking, so a change between the look and
            // the wait is not missed.
            notified.as_mut().enable();
            if let Route::Own(conn) = route
                && let Some(method) = conn.replay_failed()
            {
                return Err(Error::ReplayFailed(method));
            }
            let pick = match route {
                Route::Own(conn) => self.pick_on(conn, count, None),
                _ => self.pick(count, route, avoid),
            };
            let until = match pick {
                Pick::Got(permit) => {
                    observe(waiting_since);
                    return Ok(permit);
                }
                Pick::NoneOpen => {
                    let until = *connect_deadline.get_or_insert_with(|| {
                        (Instant::now() + self.calls.connect_wait).min(deadline)
                    });
                    if Instant::now() >= until {
                        observe(waiting_since);
                        return Err(Error::NoUpstream(self.calls.connect_wait));
                    }
                    until
                }
                Pick::AllFull => {
                    let until = *queue_deadline.get_or_insert_with(|| {
                        (Instant::now() + self.calls.queue_timeout).min(deadline)
                    });
                    if Instant::now() >= until {
                        observe(waiting_since);
                        return Err(Error::Overloaded);
                    }
                    until
                }
            };
            // Bounded waiting room: past it, answer at once rather than queue.
            let waiting = self.signals.waiters.fetch_add(1, Ordering::AcqRel);
            if waiting >= self.balance.max_waiting {
                self.signals.waiters.fetch_sub(1, Ordering::AcqRel);
                return Err(Error::Overloaded);
            }
            waiting_since.get_or_insert_with(Instant::now);
            let _ = timeout_at(until, notified).await;
            self.signals.waiters.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Picks an upstream for `route`, then its least-loaded connection.
    fn pick(&self, count: usize, route: Route<'_>, avoid: Option<&Arc<Upstream>>) -> Pick {
        let set = self.snapshot();
        let mut usable: Vec<&Arc<Upstream>> = set.iter().filter(|u| u.usable()).collect();
        // After a failure, prefer any other upstream; fall back to the same one.
        if let Some(avoid) = avoid
            && usable.len() > 1
        {
            usable.retain(|u| !Arc::ptr_eq(u, avoid));
        }
        if usable.is_empty() {
            return Pick::NoneOpen;
        }
        if usable.len() == 1 {
            return self.pick_in(usable[0], count);
        }
        let candidates: Vec<Candidate<'_>> = usable
            .iter()
            .map(|u| Candidate {
                id: &u.id,
                weight: u.weight,
                load: u.load(),
            })
            .collect();
        if let Route::Sticky(key) = route {
            // A session stays on its upstream while that one is usable, even when it is
            // busy (the call waits for a slot there); only a down upstream moves it on.
            let first = balance::rendezvous_first(key, &candidates).unwrap_or(0);
            return self.pick_in(usable[first], count);
        }
        let first = balance::p2c_choice(&candidates, |n| fastrand::u64(..n)).unwrap_or(0);
        if let Pick::Got(permit) = self.pick_in(usable[first], count) {
            return Pick::Got(permit);
        }
        // Only a full pick pays for ordering the rest.
        for i in balance::by_load_except(&candidates, first) {
            if let Pick::Got(permit) = self.pick_in(usable[i], count) {
                return Pick::Got(permit);
            }
        }
        Pick::AllFull
    }

    fn pick_in(&self, upstream: &Arc<Upstream>, count: usize) -> Pick {
        // Another caller may take the slot we saw between the look and the take; then
        // look again rather than report "full" while another connection has room.
        for _ in 0..=upstream.conns.len() {
            let mut best: Option<&Arc<Shared>> = None;
            let mut best_load = usize::MAX;
            let mut any_open = false;
            for conn in &upstream.conns {
                if !conn.is_open() {
                    continue;
                }
                any_open = true;
                let load = conn.in_flight.load(Ordering::Acquire);
                if fits(load, count, conn.max_in_flight) && load < best_load {
                    best = Some(conn);
                    best_load = load;
                }
            }
            let Some(conn) = best else {
                return if any_open {
                    Pick::AllFull
                } else {
                    Pick::NoneOpen
                };
            };
            if let Pick::Got(permit) = self.pick_on(conn, count, Some(upstream)) {
                return Pick::Got(permit);
            }
        }
        Pick::AllFull
    }

    fn pick_on(&self, conn: &Arc<Shared>, count: usize, upstream: Option<&Arc<Upstream>>) -> Pick {
        if !conn.is_open() {
            return Pick::NoneOpen;
        }
        let before = conn.in_flight.fetch_add(count, Ordering::AcqRel);
        if !fits(before, count, conn.max_in_flight) {
            // Undone without a Permit: its drop would wake every waiter for nothing.
            conn.in_flight.fetch_sub(count, Ordering::AcqRel);
            return Pick::AllFull;
        }
        Pick::Got(Permit {
            conn: conn.clone(),
            count,
            signals: self.signals.clone(),
            upstream: upstream.cloned(),
        })
    }
}

/// Whether `count` more calls fit beside `load`. A forwarded batch larger than
/// `max_in_flight` still gets an empty connection, or it could never be sent.
fn fits(load: usize, count: usize, max: usize) -> bool {
    load + count <= max.max(count)
}

/// Calls `health_method` on the upstream every `health_interval`; a failure (no
/// answer in `health_timeout`, a JSON-RPC error, a lost connection) takes it out of
/// balancing until a call passes again.
async fn health_loop(
    upstreams: Arc<Upstreams>,
    upstream: Arc<Upstream>,
    prefix: String,
    token: CancellationToken,
) {
    let interval = upstreams.balance.health_interval;
    let limit = upstreams.balance.health_timeout;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = token.cancelled() => return,
        }
        if !upstream.has_open() {
            continue;
        }
        let deadline = Instant::now() + limit;
        let passed = match upstreams.pick_in(&upstream, 1) {
            Pick::Got(permit) => {
                let (tx, rx) = oneshot::channel();
                match permit.conn.submit(prefix.clone(), Some(tx)) {
                    Ok(Some(id)) => {
                        let _registered = Registered {
                            conn: &permit.conn,
                            ids: vec![id],
                        };
                        matches!(timeout_at(deadline, rx).await, Ok(Ok(Ok(reply))) if !reply.is_error())
                    }
                    _ => false,
                }
            }
            // Busy to the brim is not unhealthy.
            Pick::AllFull => continue,
            Pick::NoneOpen => false,
        };
        let was = upstream.healthy.swap(passed, Ordering::AcqRel);
        if was != passed {
            if passed {
                tracing::info!(upstream = %upstream.id, "health check passes again; back in rotation");
            } else {
                tracing::warn!(upstream = %upstream.id, "health check failed; out of rotation");
            }
            upstreams.signals.changed.notify_waiters();
        }
    }
}
