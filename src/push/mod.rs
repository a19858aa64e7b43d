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

pub mod mailbox;
mod pointer;
mod subs;

pub use mailbox::{Event, Item, Read};

use crate::budget::{Budget, Budgets};
use crate::config::{PushConfig, SubscriptionRule, method_matches};
use crate::dispatch::{self, Outbound, Route, Sent};
use crate::error::Error;
use crate::jsonrpc::Call;
use crate::metrics::Metrics;
use crate::upstream::{Backoff, Conn, ConnState, PushSink, Reply, Upstreams};
use bytes::Bytes;
use mailbox::Mailbox;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use subs::{Sub, SubId};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The error rpcgate answers an upstream's request with when no client did in time.
pub const NO_ANSWER_CODE: i32 = -32098;
/// Requests to clients waiting for an answer, over all sessions, at most: an upstream
/// that floods them gets the rest answered at once, never a table without bound.
const MAX_ASKS: usize = 65_536;

/// What a call's method does to subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscribe(usize),
    Unsubscribe(usize),
}

/// One push session.
#[derive(Debug)]
pub struct Session {
    pub key: Arc<str>,
    mailbox: Mutex<Mailbox>,
    /// (last event id, consumer generation): a consumer wakes on either changing.
    signal: watch::Sender<(u64, u64)>,
    last_active_ms: AtomicU64,
    /// Consumers attached now (0 or 1; a new one replaces the old).
    attached: AtomicUsize,
    /// The last event id written to a WebSocket client: a socket that reconnects to
    /// the session gets what came after it, not again what it already had.
    delivered: AtomicU64,
}

impl Session {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }
}

/// A request from an upstream waiting for the client's answer.
#[derive(Debug)]
struct Ask {
    conn: Arc<Conn>,
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

    /// Checks a subscribe call may go ahead for `session` and holds its place in the
    /// session's allowance until it is answered.
    pub fn may_subscribe(
        self: &Arc<Self>,
        session: Option<&str>,
        method: &str,
    ) -> Result<Reservation, Error> {
        let Some(key) = session else {
            return Err(Error::NoPushTarget(
                method.to_string(),
                self.config.events_path.clone(),
            ));
        };
        let session = self.session(key)?.key.clone();
        let mut table = self.subs.lock();
        if table.of_session(&session) >= self.config.max_subscriptions {
            return Err(Error::TooManySubscriptions(self.config.max_subscriptions));
        }
        table.reserve(&session);
        Ok(Reservation {
            hub: self.clone(),
            session,
            released: false,
        })
    }

    /// A subscribe call was answered: remembers the subscription and returns the reply
    /// the client gets (its id rewritten only when the session already holds one the
    /// same, which subscriptions on different sockets can be). Notifications that came
    /// before this reply was read are delivered first, in order.
    pub fn subscribed(
        &self,
        mut reservation: Reservation,
        rule: usize,
        call: &Call<'_>,
        reply: Reply,
    ) -> Reply {
        let session = reservation.session.clone();
        let mut table = self.subs.lock();
        table.release(&session);
        reservation.released = true;
        let Some(conn) = reply.conn.clone() else {
            return reply;
        };
        if reply.is_error() {
            return reply;
        }
        let upstream_id = reply.payload().to_string();
        if self.existing(&session).is_none() {
            // Its session ended while the call was out (a WebSocket client that left):
            // nobody will ever read it, so it is closed upstream at once.
            drop(table);
            self.close_upstream(rule, &conn, &upstream_id, call.method_name().as_ref());
            return reply;
        }
        let mut prefix = String::with_capacity(call.frame_len_hint());
        call.encode_prefix(&mut prefix);
        let mut client_id = upstream_id.clone();
        let mut n = 1;
        while table.client_id_taken(&session, &client_id) {
            n += 1;
            client_id = serde_json::to_string(&format!("{}~{n}", unquoted(&upstream_id)))
                .unwrap_or_else(|_| upstream_id.clone());
        }
        let answer = match client_id == upstream_id {
            true => reply,
            false => reply.with_result(client_id.clone()),
        };
        let early = table.claim(conn.serial, &upstream_id);
        table.add(Sub {
            session: session.clone(),
            client_id: client_id.clone(),
            upstream_id,
            conn,
            rule,
            prefix,
            moving: false,
        });
        self.metrics.push_subscriptions.set(table.len() as i64);
        // Under the table's lock: the connection's reader cannot deliver a later
        // notification of this subscription before these.
        for text in early {
            let text = self.rewritten(rule, &text, &client_id);
            self.deliver(&session, Event::Message(Bytes::from(text)), false);
        }
        answer
    }

    /// `text` with the subscription id at `rule`'s pointer replaced by `client_id`.
    fn rewritten(&self, rule: usize, text: &str, client_id: &str) -> String {
        let pointer = self
            .rules
            .get(rule)
            .map_or("/params/subscription", |r| r.id_pointer.as_str());
        match pointer::find(text, pointer) {
            Some(at) if text[at.clone()] != *client_id => pointer::splice(text, at, client_id),
            _ => text.to_string(),
        }
    }

    /// What an unsubscribe call with these params is to rpcgate.
    pub fn unsubscribe_target(
        &self,
        session: Option<&str>,
        params: Option<&RawValue>,
    ) -> Unsubscribe {
        let (Some(session), Some(first)) = (session, pointer::first_param(params)) else {
            return Unsubscribe::NotHeld;
        };
        let session: Arc<str> = Arc::from(session);
        let mut table = self.subs.lock();
        let Some(id) = table.by_client(&session, first.get()) else {
            return Unsubscribe::NotHeld;
        };
        let Some(sub) = table.get(id) else {
            return Unsubscribe::NotHeld;
        };
        if sub.moving {
            // Its socket is gone and the new one is not open yet: nothing to tell the
            // upstream; a re-subscribe already sent closes what it opens (`moved`).
            table.cancel(id);
            self.metrics.push_subscriptions.set(table.len() as i64);
            return Unsubscribe::Moving;
        }
        let Some(params) = params.map(RawValue::get) else {
            return Unsubscribe::NotHeld;
        };
        let start = first.get().as_ptr() as usize - params.as_ptr() as usize;
        let rewritten = pointer::splice(params, start..start + first.get().len(), &sub.upstream_id);
        Unsubscribe::Held {
            id,
            conn: sub.conn.clone(),
            params: rewritten,
        }
    }

    /// The client unsubscribed (whatever the upstream said: it asked to stop).
    pub fn unsubscribed(&self, id: SubId) {
        let mut table = self.subs.lock();
        table.remove(id);
        self.metrics.push_subscriptions.set(table.len() as i64);
    }

    /// The client's answer (`text`, a JSON-RPC response with `id`) to a request the
    /// upstream sent session `key`: written to the socket that asked.
    pub async fn answer(&self, key: Option<&str>, id: &RawValue, text: &str) -> Result<(), Error> {
        let key: Arc<str> = Arc::from(key.ok_or(Error::UnknownServerRequest)?);
        let ask = self
            .asks
            .lock()
            .remove(&(key, id.get().to_string()))
            .ok_or(Error::UnknownServerRequest)?;
        self.metrics
            .server_requests
            .with_label_values(&["answered"])
            .inc();
        self.write_answer(&ask.conn, text).await
    }

    async fn write_answer(&self, conn: &Arc<Conn>, text: &str) -> Result<(), Error> {
        let upstreams = self
            .upstreams
            .upgrade()
            .ok_or(Error::Internal("shutting down"))?;
        let deadline = Instant::now() + self.request_timeout;
        dispatch::send(
            &upstreams,
            Outbound::Answer { text },
            Route::Own(conn),
            None,
            deadline,
        )
        .await
        .map(|_| ())
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

    /// The session a subscription notification is for, with the id the client holds;
    /// or kept for a while, when its id is not recorded yet.
    fn subscription_event(&self, conn: &Conn, method: &str, text: &str) -> Routed {
        for rule in &self.rules {
            if rule
                .notification
                .as_deref()
                .is_some_and(|n| !method_matches(n, method))
            {
                continue;
            }
            let Some(at) = pointer::find(text, &rule.id_pointer) else {
                continue;
            };
            let upstream_id = &text[at.clone()];
            let mut table = self.subs.lock();
            let Some(sub) = table.by_upstream(conn.serial, upstream_id) else {
                // The subscribe call's reply may still be on its way to its caller
                // (or its connection's replacement): keep it, under the same lock
                // `subscribed` and `moved` record subscriptions with.
                let expired = table.park(subs::Parked {
                    at: Instant::now(),
                    serial: conn.serial,
                    upstream_id: upstream_id.to_string(),
                    text: text.to_string(),
                    owner: conn.owner.clone(),
                });
                return Routed::Parked(expired);
            };
            let out = match sub.client_id == sub.upstream_id {
                true => text.to_string(),
                false => pointer::splice(text, at, &sub.client_id),
            };
            return Routed::To(sub.session.clone(), out);
        }
        Routed::No
    }

    /// Remembers a request to the client, answering it ourselves if nobody does in time.
    fn expect_answer(&self, session: Arc<str>, id: String, conn: Arc<Conn>) {
        let key = (session, id);
        let timeout = {
            let mut asks = self.asks.lock();
            let full = asks.len() >= MAX_ASKS;
            asks.insert(key.clone(), Ask { conn });
            if full {
                Duration::ZERO
            } else {
                self.request_timeout
            }
        };
        let hub = self.me.clone();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(timeout) => {
                    if let Some(hub) = hub.upgrade() {
                        hub.no_answer(key, timeout).await;
                    }
                }
            }
        });
    }

    async fn no_answer(&self, key: (Arc<str>, String), waited: Duration) {
        let Some(ask) = self.asks.lock().remove(&key) else {
            return;
        };
        self.metrics
            .server_requests
            .with_label_values(&["timed_out"])
            .inc();
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":{},"error":{{"code":{NO_ANSWER_CODE},"message":"no client answered within {}s","data":{{"source":"rpcgate","kind":"no_client_answer"}}}}}}"#,
            key.1,
            crate::error::rounded(waited).as_secs_f64(),
        );
        if let Err(e) = self.write_answer(&ask.conn, &text).await {
            tracing::debug!(error = %e, "could not tell the upstream nobody answered");
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

    /// Subscription `id` was opened again with `reply`; if the client unsubscribed
    /// meanwhile, what was opened is closed again.
    fn moved(&self, id: SubId, reply: &Reply) {
        let Some(conn) = reply.conn.clone() else {
            return;
        };
        let upstream_id = reply.payload().to_string();
        let mut table = self.subs.lock();
        if let Some((rule, prefix)) = table.take_cancelled(id) {
            drop(table);
            let subscribe = method_of(&prefix).and_then(|m| serde_json::from_str::<String>(m).ok());
            self.close_upstream(
                rule,
                &conn,
                &upstream_id,
                subscribe.as_deref().unwrap_or(""),
            );
            return;
        }
        if table.get(id).is_none() {
            return;
        }
        table.moved(id, conn.clone(), upstream_id.clone());
        let early = table.claim(conn.serial, &upstream_id);
        let Some(sub) = table.get(id) else { return };
        let (session, client_id, rule) = (sub.session.clone(), sub.client_id.clone(), sub.rule);
        self.metrics.resubscribed.with_label_values(&["ok"]).inc();
        if self.existing(&session).is_none() {
            return;
        }
        // A session's own socket announced its gap when it dropped (`lost`).
        if conn.owner.is_none() {
            self.deliver(&session, gap("upstream_reconnected"), false);
        }
        for text in early {
            let text = self.rewritten(rule, &text, &client_id);
            self.deliver(&session, Event::Message(Bytes::from(text)), false);
        }
    }

    /// Closes `upstream_id` on `conn` with `rule`'s unsubscribe method, in the
    /// background (`subscribe` names the method that opened it, for pattern rules).
    fn close_upstream(&self, rule: usize, conn: &Arc<Conn>, upstream_id: &str, subscribe: &str) {
        let Some(unsubscribe) = self.unsubscribe_method(rule, subscribe) else {
            return;
        };
        let prefix = crate::upstream::prefix_for(&unsubscribe, Some(&format!("[{upstream_id}]")));
        let (upstreams, conn, timeout) =
            (self.upstreams.clone(), conn.clone(), self.request_timeout);
        tokio::spawn(async move {
            let Some(upstreams) = upstreams.upgrade() else {
                return;
            };
            let deadline = Instant::now() + timeout;
            let msg = Outbound::Session { prefix: &prefix };
            if let Err(e) = dispatch::send(&upstreams, msg, Route::Own(&conn), None, deadline).await
            {
                tracing::debug!(error = %e, "closing a subscription nobody holds failed");
            }
        });
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

    /// The unsubscribe method of `rule`: a pattern's is derived from the subscribe
    /// method (`chain_subscribeNewHeads` → `chain_unsubscribeNewHeads`).
    fn unsubscribe_method(&self, rule: usize, subscribe: &str) -> Option<String> {
        let rule = self.rules.get(rule)?;
        match rule.unsubscribe.contains('*') {
            false => Some(rule.unsubscribe.clone()),
            true if subscribe.contains("subscribe") => {
                Some(subscribe.replacen("subscribe", "unsubscribe", 1))
            }
            true => None,
        }
    }
}

/// A subscribe call's place in its session's allowance, from before it is sent until
/// its answer is recorded (or it fails, or its caller goes away).
pub struct Reservation {
    hub: Arc<Hub>,
    session: Arc<str>,
    released: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.released {
            self.hub.subs.lock().release(&self.session);
        }
    }
}

/// What an unsubscribe call is, to rpcgate.
#[derive(Debug)]
pub enum Unsubscribe {
    /// A subscription of this session: send it to `conn` with these params.
    Held {
        id: SubId,
        conn: Arc<Conn>,
        params: String,
    },
    /// A subscription of this session whose socket died: closed once it is back.
    Moving,
    /// Not one this session holds.
    NotHeld,
}

/// Where a subscription notification goes.
enum Routed {
    To(Arc<str>, String),
    /// Kept until its subscription is recorded; these others expired meanwhile.
    Parked(Vec<subs::Parked>),
    No,
}

/// The gap event for `reason`.
fn gap(reason: &'static str) -> Event {
    Event::Gap {
        reason,
        missed: None,
    }
}

/// The raw `method` of a frame prefix made by `Call::encode_prefix`.
fn method_of(prefix: &str) -> Option<&str> {
    let start = prefix.find(r#""method":"#)? + r#""method":"#.len();
    let rest = &prefix[start..];
    let end = rest[1..].find('"')? + 2;
    Some(&rest[..end])
}

/// A JSON string's contents without its quotes (other values as they are).
fn unquoted(raw: &str) -> String {
    serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
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

/// Opens subscription `id` again, until it works or nobody needs it any more.
async fn resubscribe(hub: Weak<Hub>, id: SubId) {
    let mut backoff = None;
    for _ in 0..1000 {
        let Some(strong) = hub.upgrade() else { return };
        let found = {
            let mut table = strong.subs.lock();
            let found = table.get(id).map(|s| (s.prefix.clone(), s.conn.clone()));
            if found.is_none() {
                // Unsubscribed (or its session ended) while there was no socket:
                // nothing was opened, so nothing to close.
                table.take_cancelled(id);
            }
            found
        };
        let Some((prefix, conn)) = found else {
            return;
        };
        let Some(upstreams) = strong.upstreams.upgrade() else {
            return;
        };
        // A session's own socket reconnects by itself: the subscription goes back on
        // it. A shared one goes to any open connection.
        let route = match conn.owner.is_some() {
            true => Route::Own(&conn),
            false => Route::Any,
        };
        if conn.owner.is_some() && conn.state() == ConnState::Stopped {
            strong.unsubscribed(id);
            return;
        }
        let deadline = Instant::now() + strong.request_timeout;
        match dispatch::send(
            &upstreams,
            Outbound::Session { prefix: &prefix },
            route,
            None,
            deadline,
        )
        .await
        {
            Ok(Sent::Reply(reply)) if !reply.is_error() => {
                strong.moved(id, &reply);
                return;
            }
            Ok(Sent::Reply(reply)) => {
                tracing::warn!(
                    error = reply.payload(),
                    "re-subscribing was refused by the upstream"
                );
                strong
                    .metrics
                    .resubscribed
                    .with_label_values(&["failed"])
                    .inc();
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "re-subscribing failed; trying again"),
        }
        let (base, max) = strong.backoff;
        drop(strong);
        let delay = backoff
            .get_or_insert_with(|| Backoff::new(base, max))
            .next_delay();
        tokio::time::sleep(delay).await;
    }
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

impl Session {
    fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// The one reader of a session's events.
pub struct Consumer {
    pub session: Arc<Session>,
    generation: u64,
    rx: watch::Receiver<(u64, u64)>,
    hub: Weak<Hub>,
}

/// Why a consumer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Another stream or socket took the session over.
    Replaced,
    /// The gateway is shutting down.
    Closed,
}

impl Consumer {
    /// Events after `after`, waiting until there is at least one.
    pub async fn next(&mut self, after: Option<u64>, max: usize) -> Result<Read, Stopped> {
        loop {
            if self.rx.borrow_and_update().1 != self.generation {
                return Err(Stopped::Replaced);
            }
            let read = self.session.mailbox.lock().read(after, max);
            if !read.items.is_empty() || read.missed.is_some() {
                if let Some(hub) = self.hub.upgrade() {
                    self.session.touch(hub.now_ms());
                }
                return Ok(read);
            }
            if self.rx.changed().await.is_err() {
                return Err(Stopped::Closed);
            }
        }
    }

    /// Events after `after` right now, without waiting.
    pub fn now(&self, after: Option<u64>, max: usize) -> Read {
        self.session.mailbox.lock().read(after, max)
    }

    /// Counts `n` messages written to the client, up to event `last`.
    pub fn delivered_to(&self, n: usize, last: u64) {
        self.session.delivered.fetch_max(last, Ordering::AcqRel);
        self.delivered(n);
    }

    /// Counts `n` messages written to the client.
    pub fn delivered(&self, n: usize) {
        if let Some(hub) = self.hub.upgrade() {
            hub.metrics
                .pushed
                .with_label_values(&["delivered"])
                .inc_by(n as u64);
            self.session.touch(hub.now_ms());
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.session.attached.fetch_sub(1, Ordering::AcqRel);
        if let Some(hub) = self.hub.upgrade() {
            self.session.touch(hub.now_ms());
            hub.metrics.push_streams.dec();
        }
    }
}
