//! Messages upstreams send on their own, carried to the client they belong to.
//!
//! A **push session** is named by the client's session key. It owns a bounded,
//! numbered buffer ([`Mailbox`]) that one consumer at a time reads: an event stream
//! or long-poll (`server/events.rs`), or the client's WebSocket (`server/ws.rs`).
//!
//! What reaches a session ([`Hub`] as the pool's [`PushSink`]):
//! - every message on a session's **own** upstream socket (`affinity = "connection"`)
//!   that answers no call of ours: notifications and requests to the client;
//! - on shared sockets, **subscription notifications** (`[[subscriptions]]`), found by
//!   the id at the rule's `id_pointer` and rewritten to the id the client holds.
//!
//! Subscriptions outlive their socket: when it dies, each is opened again (same call)
//! on another connection, or on the session's own once it reconnects, and mapped to
//! the id the client already has; the session is told of the gap. A session that
//! ends unsubscribes upstream. Requests from the upstream wait for the client's
//! answer until `calls.request_timeout`, then rpcgate answers for it with an error.
//!
//! Files: `mod.rs` (the hub: sessions, routing, socket loss, idle sweep),
//! `session.rs` (a session and its one reader), `mailbox.rs` (its numbered buffer),
//! `subscribe.rs` and `subs.rs` (subscriptions and their table), `asks.rs` (requests
//! to clients), `pointer.rs` (ids inside messages).

mod asks;
pub mod mailbox;
mod pointer;
mod session;
mod subs;
mod subscribe;

use asks::Ask;
use subscribe::{Routed, method_of, resubscribe};

pub use asks::NO_ANSWER_CODE;
pub use mailbox::{Event, Item, Read};
pub use session::{Consumer, Session, Stopped};
pub use subscribe::{Reservation, Unsubscribe};

use crate::budget::{Budget, Budgets};
use crate::config::{PushConfig, SubscriptionRule, method_matches};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::upstream::{Conn, PushSink, Upstreams};
use bytes::Bytes;
use mailbox::Mailbox;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a call's method does to subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscribe(usize),
    Unsubscribe(usize),
}

/// The push sessions of a gateway, and what routes messages to them.
#[derive(Debug)]
pub struct Hub {
    config: PushConfig,
    rules: Vec<SubscriptionRule>,
    request_timeout: Duration,
    backoff: (Duration, Duration),
    gateway_budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    upstreams: Weak<Upstreams>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    subs: Mutex<subs::Table>,
    asks: Mutex<HashMap<(Arc<str>, String), Ask>>,
    epoch: Instant,
    shutdown: CancellationToken,
    /// Handle to ourselves for the tasks we spawn.
    me: Weak<Hub>,
}

/// Settings the hub takes from the gateway's config.
pub struct HubConfig {
    pub push: PushConfig,
    pub rules: Vec<SubscriptionRule>,
    pub request_timeout: Duration,
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
}

impl Hub {
    /// Creates the hub, makes it the sink of `upstreams`' pushes and starts its sweeper.
    pub fn start(
        config: HubConfig,
        upstreams: &Arc<Upstreams>,
        gateway_budget: Arc<Budget>,
        metrics: Arc<Metrics>,
    ) -> Arc<Hub> {
        let hub = Arc::new_cyclic(|me| Hub {
            config: config.push,
            rules: config.rules,
            request_timeout: config.request_timeout,
            backoff: (config.reconnect_base, config.reconnect_max),
            gateway_budget,
            metrics,
            upstreams: Arc::downgrade(upstreams),
            sessions: Mutex::new(HashMap::new()),
            subs: Mutex::new(subs::Table::default()),
            asks: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            shutdown: CancellationToken::new(),
            me: me.clone(),
        });
        let sink: Arc<dyn PushSink> = hub.clone();
        let _ = upstreams.signals.push.set(sink);
        tokio::spawn(sweep(Arc::downgrade(&hub), hub.shutdown.clone()));
        hub
    }

    pub fn config(&self) -> &PushConfig {
        &self.config
    }

    /// Stops the sweeper and the re-subscribing tasks.
    pub fn close(&self) {
        self.shutdown.cancel();
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Push sessions open now.
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscriptions held now, on every upstream socket.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().len()
    }

    /// Session `key`, opened if needed.
    pub fn session(&self, key: &str) -> Result<Arc<Session>, Error> {
        let mut sessions = self.sessions.lock();
        if let Some(s) = sessions.get(key) {
            s.touch(self.now_ms());
            return Ok(s.clone());
        }
        if sessions.len() >= self.config.max_sessions {
            return Err(Error::TooManyPushSessions(self.config.max_sessions));
        }
        let budgets = Budgets::for_connection(&self.gateway_budget, self.config.buffer_bytes);
        let key: Arc<str> = Arc::from(key);
        let session = Arc::new(Session {
            key: key.clone(),
            mailbox: Mutex::new(Mailbox::new(self.config.buffer, &budgets)),
            signal: watch::Sender::new((0, 0)),
            last_active_ms: AtomicU64::new(self.now_ms()),
            attached: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
        });
        sessions.insert(key, session.clone());
        self.metrics.push_sessions.set(sessions.len() as i64);
        Ok(session)
    }

    fn existing(&self, key: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(key).cloned()
    }

    /// Makes a consumer of `session`'s events; the one before it (if any) ends.
    pub fn attach(&self, session: &Arc<Session>) -> Consumer {
        session.attached.fetch_add(1, Ordering::AcqRel);
        let mut generation = 0;
        session.signal.send_modify(|(_, g)| {
            *g += 1;
            generation = *g;
        });
        self.metrics.push_streams.inc();
        Consumer {
            session: session.clone(),
            generation,
            rx: session.signal.subscribe(),
            hub: self.me.clone(),
        }
    }

    /// Puts `event` in session `key`'s buffer, opening the session if `open`.
    fn deliver(&self, key: &str, event: Event, open: bool) {
        let session = match open {
            true => self.session(key).ok(),
            false => self.existing(key),
        };
        let Some(session) = session else {
            self.metrics.pushed.with_label_values(&["dropped"]).inc();
            return;
        };
        let (evicted, refused) = session.mailbox.lock().push(event);
        let m = &self.metrics.pushed;
        m.with_label_values(&["dropped"])
            .inc_by(evicted as u64 + refused as u64);
        if !refused {
            m.with_label_values(&["buffered"]).inc();
        }
        let last = session.mailbox.lock().last_id();
        session.signal.send_modify(|(l, _)| *l = last);
    }

    /// What `method` does to subscriptions, per the configured rules.
    pub fn kind_of(&self, method: &str) -> Option<Kind> {
        let rule = |f: fn(&SubscriptionRule) -> &str| {
            self.rules.iter().position(|r| method_matches(f(r), method))
        };
        // Unsubscribe first: `*_subscribe*` would not match `x_unsubscribe`, but an
        // operator's own pattern might.
        rule(|r| &r.unsubscribe)
            .map(Kind::Unsubscribe)
            .or_else(|| rule(|r| &r.subscribe).map(Kind::Subscribe))
    }

    /// A notification or request that arrived on `conn`: whose is it?
    fn route(&self, conn: &Arc<Conn>, message: Bytes) {
        let Ok(text) = std::str::from_utf8(&message) else {
            return;
        };
        let Ok(head) = serde_json::from_str::<Head<'_>>(text) else {
            return;
        };
        let method: String = serde_json::from_str(head.method.get()).unwrap_or_default();
        if head.id.is_none() && !self.rules.is_empty() {
            match self.subscription_event(conn, &method, text) {
                Routed::To(session, text) => {
                    self.deliver(&session, Event::Message(Bytes::from(text)), false);
                    return;
                }
                Routed::Parked(expired) => {
                    self.expired(expired);
                    return;
                }
                Routed::No => {}
            }
        }
        let Some(owner) = &conn.owner else {
            self.unrouted(conn, &method);
            return;
        };
        if let Some(id) = head.id {
            self.expect_answer(owner.clone(), id.get().to_string(), conn.clone());
        }
        self.deliver(owner, Event::Message(message), true);
    }

    fn unrouted(&self, conn: &Conn, method: &str) {
        conn.count_unrouted();
        tracing::debug!(conn = %conn.label, method, "upstream message belongs to no session");
    }

    /// Parked notifications whose subscription never showed up: a session's own
    /// socket's go to the session as they are; the rest belong to nobody.
    fn expired(&self, expired: Vec<subs::Parked>) {
        for parked in expired {
            match &parked.owner {
                Some(owner) => self.deliver(owner, Event::Message(Bytes::from(parked.text)), true),
                None => {
                    self.metrics
                        .unmatched
                        .with_label_values(&["unsolicited"])
                        .inc();
                    tracing::debug!(
                        id = parked.upstream_id,
                        "subscription notification for an id nobody holds"
                    );
                }
            }
        }
    }

    /// `conn` died: its subscriptions move, and its session hears of the gap.
    fn lost(&self, conn: &Arc<Conn>) {
        let lost = self.subs.lock().lost_connection(conn.serial);
        if let Some(owner) = &conn.owner
            && self.existing(owner).is_some()
        {
            self.deliver(owner, gap("upstream_reconnected"), false);
        }
        for id in lost {
            let hub = self.me.clone();
            let stop = self.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = resubscribe(hub, id) => {}
                }
            });
        }
    }

    /// Ends sessions nobody has read or used for `idle_timeout`.
    fn sweep(&self) {
        let expired = self.subs.lock().expire(Instant::now());
        self.expired(expired);
        let limit = self.config.idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        let ended: Vec<Arc<str>> = {
            let mut sessions = self.sessions.lock();
            let asks = self.asks.lock();
            let waiting: std::collections::HashSet<&Arc<str>> =
                asks.keys().map(|(s, _)| s).collect();
            let mut ended = Vec::new();
            sessions.retain(|key, s| {
                let idle = s.attached.load(Ordering::Acquire) == 0
                    && now.saturating_sub(s.last_active_ms.load(Ordering::Relaxed)) >= limit
                    && !waiting.contains(key);
                if idle {
                    ended.push(key.clone());
                }
                !idle
            });
            self.metrics.push_sessions.set(sessions.len() as i64);
            ended
        };
        for key in ended {
            self.end(&key);
        }
    }

    /// Ends session `key` now (a WebSocket client's own session, with its socket).
    pub fn end_now(&self, key: &str) {
        let removed = {
            let mut sessions = self.sessions.lock();
            let removed = sessions.remove(key);
            self.metrics.push_sessions.set(sessions.len() as i64);
            removed
        };
        if removed.is_some() {
            self.asks.lock().retain(|(s, _), _| &**s != key);
            self.end(key);
        }
    }

    /// Session `key` is gone: unsubscribe its subscriptions upstream.
    fn end(&self, key: &str) {
        let subs = {
            let mut table = self.subs.lock();
            let subs = table.end_session(key);
            self.metrics.push_subscriptions.set(table.len() as i64);
            subs
        };
        for sub in subs {
            // One that is moving has no socket now: `end_session` left a note for the
            // re-subscribe on its way to close what it opens.
            if !sub.moving {
                let subscribe =
                    method_of(&sub.prefix).and_then(|m| serde_json::from_str::<String>(m).ok());
                self.close_upstream(
                    sub.rule,
                    &sub.conn,
                    &sub.upstream_id,
                    subscribe.as_deref().unwrap_or(""),
                );
            }
        }
    }
}

/// The gap event for `reason`.
fn gap(reason: &'static str) -> Event {
    Event::Gap {
        reason,
        missed: None,
    }
}

impl PushSink for Hub {
    fn pushed(&self, conn: &Arc<Conn>, message: Bytes) {
        self.route(conn, message);
    }

    fn closed(&self, conn: &Arc<Conn>) {
        self.lost(conn);
    }
}

/// The members of a pushed message we route by.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, alias = "notification")]
    method: &'a RawValue,
    #[serde(borrow, default, deserialize_with = "crate::jsonrpc::present")]
    id: Option<&'a RawValue>,
}

/// Ends idle sessions every so often, until the hub goes.
async fn sweep(hub: Weak<Hub>, stop: CancellationToken) {
    loop {
        let every = match hub.upgrade() {
            Some(hub) => (hub.config.idle_timeout / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(5)),
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match hub.upgrade() {
            Some(hub) => hub.sweep(),
            None => return,
        }
    }
}
