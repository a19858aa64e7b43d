//! `affinity = "connection"`: each session gets its own upstream WebSocket.
//!
//! A session is exactly what a client holding its own WebSocket would have: one
//! socket, so per-connection state on the service (a login) works.
//! The socket follows the session key's rendezvous order, so it reconnects to the
//! same address while that address is present; cookies its handshakes set are sent
//! again; successful calls to `replay_methods` are recorded by the dispatch pipeline
//! and replayed, in order, before the session's next call goes through.
//!
//! Every session counts against the client address that opened it: at most
//! `max_per_client` open at once and `new_per_client_per_minute` new ones, so that one
//! client cannot take the upstream sockets `max_sessions` allows the whole gateway.

use super::conn::Conn;
use super::set::Upstreams;
use crate::access::rate::TokioClock;
use crate::config::{SessionConfig, WhenFull};
use crate::error::{ClientLimit, Error};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest session key accepted; longer keys are refused rather than stored.
pub const MAX_KEY_LEN: usize = 256;

/// The open sessions.
pub struct Sessions {
    config: SessionConfig,
    upstreams: Arc<Upstreams>,
    /// Calls in flight per session connection at most.
    max_in_flight: usize,
    /// Sessions and their per-client counts under one lock, so the counts cannot
    /// drift from the sessions they count.
    table: Mutex<Table>,
    /// Session creations per client address (`new_per_client_per_minute`).
    rate: CreationRate,
    /// When the table started: `last_used` counts milliseconds from here.
    epoch: Instant,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Session>,
    per_client: PerClient,
}

impl Table {
    /// Removes session `key`, and its count from its client's.
    fn remove(&mut self, key: &str) -> Option<Session> {
        let session = self.sessions.remove(key)?;
        self.per_client.remove(session.client);
        Some(session)
    }
}

struct Session {
    conn: Arc<Conn>,
    token: CancellationToken,
    last_used_ms: AtomicU64,
    /// Whose `max_per_client` this session counts against.
    client: ClientId,
}

impl Sessions {
    /// Creates the table and its idle sweeper.
    pub fn start(
        config: SessionConfig,
        upstreams: Arc<Upstreams>,
        max_in_flight: usize,
    ) -> Arc<Self> {
        let sessions = Arc::new(Sessions {
            rate: CreationRate::new(config.new_per_client_per_minute),
            config,
            upstreams,
            max_in_flight,
            table: Mutex::new(Table::default()),
            epoch: Instant::now(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(sweep(
            Arc::downgrade(&sessions),
            sessions.shutdown.clone(),
            sessions.config.idle_timeout,
        ));
        sessions
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.table.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Client addresses with at least one session open.
    pub fn clients(&self) -> usize {
        self.table.lock().per_client.len()
    }

    /// Sessions open for the client at `client`.
    pub fn open_for(&self, client: IpAddr) -> usize {
        self.table.lock().per_client.open(ClientId::of(client))
    }

    /// The connection of session `key`, opening one for `client` if needed.
    pub(crate) fn connection(&self, key: &str, client: IpAddr) -> Result<Arc<Conn>, Error> {
        let now = self.now_ms();
        let client = ClientId::of(client);
        let mut table = self.table.lock();
        if let Some(session) = table.sessions.get(key) {
            session.last_used_ms.store(now, Ordering::Relaxed);
            return Ok(session.conn.clone());
        }
        let full = table.sessions.len() >= self.config.max_sessions;
        if full && self.config.when_full == WhenFull::Reject {
            return Err(Error::TooManySessions(self.config.max_sessions));
        }
        let max_per_client = self.config.max_per_client;
        if table.per_client.open(client) >= max_per_client {
            return Err(Error::TooManyClientSessions(ClientLimit::Open(
                max_per_client,
            )));
        }
        // Last of the checks: a refusal above spends none of the client's rate.
        if !self.rate.allow(client) {
            return Err(Error::TooManyClientSessions(ClientLimit::Rate(
                self.config.new_per_client_per_minute,
            )));
        }
        if full {
            // O(sessions), but only when a new session meets a full table.
            let oldest = table
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used_ms.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            if let Some(old) = oldest.and_then(|k| table.remove(&k)) {
                tracing::debug!("session table full; closing the least recently used");
                old.token.cancel();
            }
        }
        let token = self.shutdown.child_token();
        let conn = self.upstreams.session_connection(
            key.as_bytes(),
            table.sessions.len(),
            self.max_in_flight,
            self.config.max_replay,
            token.clone(),
        );
        table.per_client.add(client);
        table.sessions.insert(
            key.to_string(),
            Session {
                conn: conn.clone(),
                token,
                last_used_ms: AtomicU64::new(now),
                client,
            },
        );
        Ok(conn)
    }

    /// Marks session `key` as in use (a stream or socket is reading it), so it is not
    /// closed as idle.
    pub fn touch(&self, key: &str) {
        let now = self.now_ms();
        if let Some(session) = self.table.lock().sessions.get(key) {
            session.last_used_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Closes every session's connection.
    pub fn close(&self) {
        self.shutdown.cancel();
        let mut table = self.table.lock();
        table.sessions.clear();
        table.per_client.clear();
    }

    fn sweep_idle(&self) {
        let limit = self.config.idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        let mut table = self.table.lock();
        let Table {
            sessions,
            per_client,
        } = &mut *table;
        sessions.retain(|_, s| {
            let idle = now.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) >= limit
                && s.conn.in_flight.load(Ordering::Acquire) == 0;
            if idle {
                s.token.cancel();
                per_client.remove(s.client);
            }
            !idle
        });
        drop(table);
        self.rate.forget_idle();
    }
}

/// Who a session counts against: the client's address, an IPv6 client by its /64,
/// since one host is routinely given a whole /64 and could otherwise use a fresh
/// address for every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(IpAddr);

impl ClientId {
    pub fn of(ip: IpAddr) -> ClientId {
        match ip {
            IpAddr::V4(_) => ClientId(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
                Some(v4) => ClientId(IpAddr::V4(v4)),
                None => ClientId(IpAddr::V6(Ipv6Addr::from(
                    u128::from(v6) & !u128::from(u64::MAX),
                ))),
            },
        }
    }
}

/// Open sessions per client: an entry exists only while its client has one, so the
/// map is never larger than the session table.
#[derive(Debug, Default)]
struct PerClient {
    open: HashMap<ClientId, usize>,
}

impl PerClient {
    fn open(&self, client: ClientId) -> usize {
        self.open.get(&client).copied().unwrap_or(0)
    }

    fn add(&mut self, client: ClientId) {
        *self.open.entry(client).or_insert(0) += 1;
    }

    fn remove(&mut self, client: ClientId) {
        if let Some(n) = self.open.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&client);
            }
        }
    }

    /// Clients with a session open.
    fn len(&self) -> usize {
        self.open.len()
    }

    fn clear(&mut self) {
        self.open.clear();
    }
}

/// `new_per_client_per_minute`, with a burst of the same size, per client address.
///
/// The limiter keeps one state per address it has seen; `forget_idle` (run by the
/// idle sweeper, at least once a minute) drops every address whose allowance is full
/// again, so the map holds only the clients that opened a session in about the last
/// minute.
struct CreationRate {
    limiter:
        RateLimiter<ClientId, HashMapStateStore<ClientId>, TokioClock, NoOpMiddleware<Duration>>,
}

impl CreationRate {
    fn new(per_minute: usize) -> CreationRate {
        // `check` keeps the value in 1..=u32::MAX; clamped again rather than trusted.
        let n = u32::try_from(per_minute)
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MAX);
        CreationRate {
            limiter: RateLimiter::hashmap_with_clock(
                Quota::per_minute(n),
                TokioClock(Instant::now()),
            ),
        }
    }

    /// Takes one creation from `client`'s allowance, if there is one left.
    fn allow(&self, client: ClientId) -> bool {
        self.limiter.check_key(&client).is_ok()
    }

    fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Client addresses the limiter holds state for.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// Closes sessions idle for `idle_timeout`, checking a few times per timeout, and at
/// least once a minute: the creation rate's idle clients are forgotten here too.
async fn sweep(sessions: std::sync::Weak<Sessions>, token: CancellationToken, idle: Duration) {
    let step = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = token.cancelled() => return,
        }
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        sessions.sweep_idle();
    }
}

/// A new session key: 128 random bits from the operating system's CSPRNG, hex
/// encoded, so no key can be guessed from another.
pub fn new_key() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("no randomness for a session key"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests;
