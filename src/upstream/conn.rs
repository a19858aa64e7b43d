//! The handle of one persistent upstream connection: what callers and the pool see.
//!
//! Callers never touch the socket. They reserve a slot (`in_flight`), then
//! [`Conn::submit`] registers and queues their frame in the [`Mux`]; the socket task
//! (`socket.rs`) takes frames out and delivers replies in. The lifecycle is one
//! [`ConnState`], written only by the connection task (`reconnect.rs`).

use super::mux::{Closed, Delivery, Frame, FrameIds, Mux, Phase, Refused, ReplySenders};
use super::pending::CallId;
use super::wamp::{Bridge, Joined, Link};
use crate::budget::Budgets;
use crate::metrics::Metrics;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// Where a connection is in its life; readable without locking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    /// Connected, running `on_connect` and replay calls before taking traffic.
    Preparing,
    Open,
    /// Waiting out a backoff delay after a failure.
    Backoff,
    Stopped,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            1 => ConnState::Preparing,
            2 => ConnState::Open,
            3 => ConnState::Backoff,
            4 => ConnState::Stopped,
            _ => ConnState::Connecting,
        }
    }
}

/// Signals shared by all connections of a gateway.
#[derive(Debug)]
pub struct PoolSignals {
    /// Woken when a connection opens or a slot frees up, for calls that wait.
    pub changed: Notify,
    /// Calls waiting on `changed`; slots freed with nobody waiting skip the wakeup.
    pub waiters: AtomicUsize,
    pub open_connections: AtomicUsize,
    /// Upstream messages that matched no pending call (notifications, late replies).
    pub unmatched: AtomicU64,
    /// Upstream frames that were not JSON-RPC at all.
    pub garbage: AtomicU64,
    pub metrics: Arc<Metrics>,
    /// Where notifications and server requests go (`push/`); set once at startup.
    pub push: OnceLock<Arc<dyn PushSink>>,
}

/// Takes what upstreams send on their own: notifications, subscription events,
/// requests to the client.
pub trait PushSink: Send + Sync + std::fmt::Debug {
    /// `message` (one JSON-RPC message, as the upstream wrote it) came on `conn` and
    /// answers no call of ours.
    fn pushed(&self, conn: &Arc<Conn>, message: Bytes);
    /// `conn`'s socket closed: what it carried for sessions must go elsewhere.
    fn closed(&self, conn: &Arc<Conn>);
}

impl PoolSignals {
    pub fn new(metrics: Arc<Metrics>) -> PoolSignals {
        PoolSignals {
            changed: Notify::new(),
            waiters: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            unmatched: AtomicU64::new(0),
            garbage: AtomicU64::new(0),
            metrics,
            push: OnceLock::new(),
        }
    }
}

/// A call sent on a fresh socket before it carries traffic: `on_connect` calls and a
/// session's replayed calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreludeCall {
    pub method: String,
    /// The frame without its id (see `Call::encode_prefix`).
    pub prefix: String,
}

/// A session's recorded calls, oldest first, bounded.
#[derive(Debug)]
struct ReplayLog {
    calls: VecDeque<PreludeCall>,
    max: usize,
    failed: Option<String>,
}

/// The part of a connection callers see.
#[derive(Debug)]
pub struct Conn {
    /// Unique in the process: what subscriptions remember their connection by.
    pub serial: u64,
    /// `upstream#connection`, for logs.
    pub label: String,
    /// The session whose own connection this is (`affinity = "connection"`): every
    /// message it pushes is that session's.
    pub owner: Option<Arc<str>>,
    /// The `upstream` metric label: the upstream's id, or `session` for a session's own
    /// connection (one label for all of them keeps the label set bounded).
    metric: Arc<str>,
    state: AtomicU8,
    /// Calls holding a slot on this connection (see `Permit` in `dispatch`).
    pub in_flight: AtomicUsize,
    pub max_in_flight: usize,
    mux: Mutex<Mux>,
    /// Wakes the writer when a frame is queued on an empty queue.
    pub(super) wake: Notify,
    pub(super) signals: Arc<PoolSignals>,
    /// `name=value` cookies the upstream's handshakes set (a load balancer's affinity
    /// cookie), sent again on every reconnect.
    cookies: Mutex<Vec<(String, String)>>,
    /// Sessions only: calls to replay on reconnect, and the method whose replay failed.
    replay: Option<Mutex<ReplayLog>>,
    /// The address the current (or last) socket went to.
    pub upstream: Mutex<Option<String>>,
    /// A WAMP upstream's session state; `None` for JSON-RPC.
    pub(super) bridge: Mutex<Option<Bridge>>,
    /// Why the last connect attempt failed, until a socket opens: what `/readyz` says.
    last_error: Mutex<Option<String>>,
}

impl Conn {
    /// Connection number `index` of `upstream`'s pool.
    pub fn new(
        upstream: &Arc<str>,
        index: usize,
        max_in_flight: usize,
        max_queue_bytes: usize,
        signals: Arc<PoolSignals>,
    ) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        Conn {
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            label: format!("{upstream}#{index}"),
            owner: None,
            metric: upstream.clone(),
            state: AtomicU8::new(ConnState::Connecting as u8),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            // Queue depth never exceeds the calls holding slots, plus notifications.
            mux: Mutex::new(Mux::new(max_in_flight + 64, max_queue_bytes)),
            wake: Notify::new(),
            signals,
            cookies: Mutex::new(Vec::new()),
            replay: None,
            upstream: Mutex::new(None),
            bridge: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// Session `owner`'s own connection (number `index`), keeping up to `max_replay`
    /// calls to replay.
    pub fn for_session(
        owner: &str,
        index: usize,
        max_in_flight: usize,
        max_queue_bytes: usize,
        signals: Arc<PoolSignals>,
        max_replay: usize,
    ) -> Self {
        Conn {
            owner: Some(Arc::from(owner)),
            replay: Some(Mutex::new(ReplayLog {
                calls: VecDeque::new(),
                max: max_replay,
                failed: None,
            })),
            ..Conn::new(
                &Arc::from("session"),
                index,
                max_in_flight,
                max_queue_bytes,
                signals,
            )
        }
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(super) fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        self.state() == ConnState::Open
    }

    pub fn metric_label(&self) -> &str {
        &self.metric
    }

    /// Registers the frame's waiters and queues it (see [`Mux::submit`]).
    pub fn submit(
        &self,
        prelude: bool,
        payer: Option<&Budgets>,
        replies: ReplySenders,
        build: impl FnOnce(&[CallId]) -> String,
    ) -> Result<FrameIds, Refused> {
        let (ids, was_empty) = {
            let mut mux = self.mux.lock();
            let was_empty = mux.queued() == 0;
            (mux.submit(prelude, payer, replies, build)?, was_empty)
        };
        // The writer drains the whole queue each round: it needs waking only when
        // it may have found the queue empty.
        if was_empty {
            self.wake.notify_one();
        }
        Ok(ids)
    }

    /// A caller gave up (timeout, client gone): forget its calls. A WAMP router is
    /// told to CANCEL them, so the callee stops working for nobody.
    pub fn forget(&self, ids: &[CallId]) {
        {
            let mut mux = self.mux.lock();
            for &id in ids {
                mux.forget(id);
            }
        }
        let mut bridge = self.bridge.lock();
        if let Some(bridge) = bridge.as_mut() {
            for &id in ids {
                bridge.forget(id);
            }
            if bridge.has_outbox() {
                self.wake.notify_one();
            }
        }
    }

    /// A fresh socket to an upstream that speaks WAMP (`link`, with what its router's
    /// WELCOME said) or JSON-RPC (`None`). Local subscription ids keep growing across
    /// sockets, like call ids.
    pub(super) fn begin_socket(&self, link: Option<(&Arc<Link>, Joined)>) {
        let mut bridge = self.bridge.lock();
        let next = bridge.as_ref().map(Bridge::next_local);
        *bridge = link
            .map(|(l, joined)| Bridge::new(l.clone(), next.unwrap_or(1), joined.call_canceling));
    }

    /// Why the last connect attempt failed (`None`: it did not).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub(super) fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock() = error;
    }

    /// Calls waiting for a reply on this connection right now.
    pub fn pending_len(&self) -> usize {
        self.mux.lock().pending_len()
    }

    pub(super) fn take(&self, out: &mut Vec<Frame>, max: usize, max_bytes: usize) -> usize {
        self.mux.lock().take(out, max, max_bytes)
    }

    /// A socket is up: take prelude frames only, until [`Conn::opened`].
    pub(super) fn preparing(&self) {
        self.mux.lock().set_phase(Phase::Preparing);
        self.set_state(ConnState::Preparing);
    }

    /// The socket is ready for every call.
    pub(super) fn opened(&self) {
        self.set_last_error(None);
        self.mux.lock().set_phase(Phase::Open);
        self.set_state(ConnState::Open);
        self.signals.open_connections.fetch_add(1, Ordering::AcqRel);
        self.signals.changed.notify_waiters();
    }

    /// Puts a connection with no socket in `state`, for tests of what sits above the
    /// socket (admission, picking).
    #[cfg(test)]
    pub(crate) fn pretend(self: &Arc<Self>, state: ConnState) {
        match state {
            ConnState::Open => self.opened(),
            ConnState::Preparing => self.preparing(),
            _ => {
                let _ = self.closed(Vec::new());
                self.set_state(state);
            }
        }
    }

    /// The socket is gone: answer every caller now (see [`Mux::close`]).
    pub(super) fn closed(self: &Arc<Self>, unsent: Vec<Frame>) -> Closed {
        let was_open = self.is_open();
        let closed = self.mux.lock().close(unsent);
        if was_open {
            self.signals.open_connections.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(push) = self.signals.push.get() {
            push.closed(self);
        }
        closed
    }

    /// Matches one upstream frame's replies to their callers, counting the rest.
    pub(super) fn deliver(self: &Arc<Self>, frame: Bytes) {
        let seen: Delivery = self.mux.lock().deliver(&frame);
        let m = &self.signals.metrics;
        if !seen.pushed.is_empty() {
            match self.signals.push.get() {
                Some(push) => {
                    for range in seen.pushed {
                        push.pushed(self, frame.slice(range));
                    }
                }
                None => {
                    let n = seen.pushed.len() as u64;
                    self.signals.unmatched.fetch_add(n, Ordering::Relaxed);
                    m.unmatched.with_label_values(&["unsolicited"]).inc_by(n);
                }
            }
        }
        if seen.unsolicited > 0 {
            let n = seen.unsolicited as u64;
            self.signals.unmatched.fetch_add(n, Ordering::Relaxed);
            m.unmatched.with_label_values(&["unsolicited"]).inc_by(n);
            tracing::debug!(conn = %self.label, count = n, "upstream message matched no pending call");
        }
        if seen.garbage > 0 {
            self.count_garbage(seen.garbage as u64);
            tracing::debug!(conn = %self.label, "upstream sent a frame that is not JSON-RPC; ignored");
        }
    }

    /// Counts frames from the upstream that are no message it should send.
    pub(super) fn count_garbage(&self, n: u64) {
        self.signals.garbage.fetch_add(n, Ordering::Relaxed);
        self.signals
            .metrics
            .unmatched
            .with_label_values(&["garbage"])
            .inc_by(n);
    }

    /// Counts a pushed message that belongs to nobody.
    pub fn count_unrouted(&self) {
        self.signals.unmatched.fetch_add(1, Ordering::Relaxed);
        self.signals
            .metrics
            .unmatched
            .with_label_values(&["unsolicited"])
            .inc();
    }

    /// Records a successful call to replay after a reconnect.
    pub fn record_replay(&self, call: PreludeCall) {
        if let Some(log) = &self.replay {
            let mut log = log.lock();
            // Replaying the same call twice would change nothing but the wait.
            log.calls.retain(|c| c != &call);
            if log.max == 0 {
                return;
            }
            while log.calls.len() >= log.max {
                log.calls.pop_front();
            }
            log.calls.push_back(call);
        }
    }

    /// Whether this connection records calls to replay (a session's own).
    pub fn records_replay(&self) -> bool {
        self.replay.is_some()
    }

    /// The method whose replay failed on the last connect, if it did.
    pub fn replay_failed(&self) -> Option<String> {
        self.replay
            .as_ref()
            .and_then(|log| log.lock().failed.clone())
    }

    pub(super) fn replay_calls(&self) -> Vec<PreludeCall> {
        self.replay
            .as_ref()
            .map(|log| log.lock().calls.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn set_replay_failed(&self, method: Option<String>) {
        if let Some(log) = &self.replay {
            let failed = method.is_some();
            log.lock().failed = method;
            if failed {
                self.signals.changed.notify_waiters();
            }
        }
    }

    pub(super) fn cookie_header(&self) -> Option<String> {
        let jar = self.cookies.lock();
        if jar.is_empty() {
            return None;
        }
        Some(
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    pub(super) fn clear_cookies(&self) {
        self.cookies.lock().clear();
    }

    pub(super) fn keep_cookies(&self, set_cookies: Vec<String>) {
        if set_cookies.is_empty() {
            return;
        }
        let mut jar = self.cookies.lock();
        for line in set_cookies {
            let pair = line.split(';').next().unwrap_or("").trim();
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            jar.retain(|(n, _)| n != &name);
            // Bounded: a misbehaving upstream cannot grow the jar without limit.
            if jar.len() < 32 {
                jar.push((name, value));
            }
        }
    }
}
