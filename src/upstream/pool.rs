//! The set of upstream connections and the way a call gets onto one of them.
//!
//! A call reserves a slot on the least-loaded open connection (a [`Permit`]), registers
//! and queues its frame there, and waits for the reply until its deadline. With no
//! connection open it waits up to `connect_wait`; with every connection at
//! `max_in_flight` it waits up to `queue_timeout`; both bounded by its deadline, so a
//! short upstream blip delays calls instead of failing them, and nothing queues
//! without bound.

use super::connect::{Target, TargetError};
use super::connection::{self, ConnState, Failure, PoolSignals, Refused, Reply, Shared};
use super::pending::CallId;
use crate::config::{CallConfig, Config};
use crate::error::Error;
use crate::jsonrpc::{Call, finish_frame};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

/// All upstream connections of the gateway.
pub struct Upstreams {
    conns: Vec<Arc<Shared>>,
    signals: Arc<PoolSignals>,
    calls: CallConfig,
    /// The connection tasks, so shutdown can wait for sockets to close.
    tasks: parking_lot::Mutex<JoinSet<()>>,
}

/// A slot on one connection, held for the whole call: it bounds the queue and the
/// pending map, and frees the slot however the call ends (reply, timeout, client gone).
pub struct Permit {
    conn: Arc<Shared>,
    count: usize,
    signals: Arc<PoolSignals>,
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

impl Upstreams {
    /// Builds every connection and starts its task; sockets open in the background,
    /// so the gateway serves (with 503s) even while upstreams are down.
    pub fn start(config: &Config, shutdown: &CancellationToken) -> Result<Arc<Self>, TargetError> {
        let signals = Arc::new(PoolSignals::default());
        let ws = Arc::new(config.websocket.clone());
        let mut conns = Vec::new();
        let mut tasks = JoinSet::new();
        for up in &config.upstreams {
            let target = Arc::new(Target::new(up)?);
            for c in 0..up.connections {
                let label = format!("{}#{c}", target.url);
                let shared = Arc::new(Shared::new(label, up.max_in_flight, signals.clone()));
                conns.push(shared.clone());
                tasks.spawn(connection::run(
                    shared,
                    target.clone(),
                    ws.clone(),
                    shutdown.child_token(),
                ));
            }
        }
        Ok(Arc::new(Upstreams {
            conns,
            signals,
            calls: config.calls.clone(),
            tasks: parking_lot::Mutex::new(tasks),
        }))
    }

    /// Connections open right now.
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

    /// Each connection's state, in configuration order.
    pub fn states(&self) -> Vec<ConnState> {
        self.conns.iter().map(|c| c.state()).collect()
    }

    /// Calls registered on any connection and waiting for a reply.
    pub fn pending_calls(&self) -> usize {
        self.conns.iter().map(|c| c.pending_len()).sum()
    }

    /// Upstream messages that matched no call, and frames that were not JSON-RPC.
    pub fn unmatched_counts(&self) -> (u64, u64) {
        (
            self.signals.unmatched.load(Ordering::Relaxed),
            self.signals.garbage.load(Ordering::Relaxed),
        )
    }

    /// Waits until every connection task has finished (after shutdown was requested).
    pub async fn join(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        while tasks.join_next().await.is_some() {}
    }

    /// Sends one call and waits for its reply.
    pub async fn call(&self, call: &Call<'_>, deadline: Instant) -> Result<Reply, Error> {
        let mut connect_deadline = None;
        loop {
            let permit = self.reserve(1, deadline, &mut connect_deadline).await?;
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
                        Ok(Ok(reply)) => return Ok(reply),
                        Ok(Err(Failure::NotSent)) => continue,
                        Ok(Err(Failure::Lost)) | Err(_) => return Err(Error::UpstreamLost),
                    }
                }
            }
        }
    }

    /// Queues a notification; returns once it is on an open connection's queue.
    pub async fn notify(&self, call: &Call<'_>, deadline: Instant) -> Result<(), Error> {
        let mut connect_deadline = None;
        loop {
            let permit = self.reserve(1, deadline, &mut connect_deadline).await?;
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
    ) -> Result<Vec<Result<Reply, Error>>, Error> {
        let expecting = calls.iter().filter(|c| !c.is_notification()).count();
        let mut connect_deadline = None;
        loop {
            let permit = self
                .reserve(calls.len().max(1), deadline, &mut connect_deadline)
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
                continue;
            }
            return Ok(answers);
        }
    }

    /// Takes `count` slots on the least-loaded open connection, waiting as configured.
    async fn reserve(
        &self,
        count: usize,
        deadline: Instant,
        connect_deadline: &mut Option<Instant>,
    ) -> Result<Permit, Error> {
        let mut queue_deadline = None;
        loop {
            let notified = self.signals.changed.notified();
            tokio::pin!(notified);
            // Register for wakeups before looking, so a change between the look and
            // the wait is not missed.
            notified.as_mut().enable();
            match self.pick(count) {
                Pick::Got(permit) => return Ok(permit),
                Pick::NoneOpen => {
                    let until = *connect_deadline.get_or_insert_with(|| {
                        (Instant::now() + self.calls.connect_wait).min(deadline)
                    });
                    if Instant::now() >= until {
                        return Err(Error::NoUpstream(self.calls.connect_wait));
                    }
                    let _ = timeout_at(until, notified).await;
                }
                Pick::AllFull => {
                    let until = *queue_deadline.get_or_insert_with(|| {
                        (Instant::now() + self.calls.queue_timeout).min(deadline)
                    });
                    if Instant::now() >= until {
                        return Err(Error::Overloaded);
                    }
                    self.signals.waiters.fetch_add(1, Ordering::AcqRel);
                    let _ = timeout_at(until, notified).await;
                    self.signals.waiters.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn pick(&self, count: usize) -> Pick {
        // Another caller may take the slot we saw between the look and the take; then
        // look again rather than report "full" while another connection has room.
        for _ in 0..=self.conns.len() {
            let mut best: Option<&Arc<Shared>> = None;
            let mut best_load = usize::MAX;
            let mut any_open = false;
            for conn in &self.conns {
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
            let before = conn.in_flight.fetch_add(count, Ordering::AcqRel);
            if fits(before, count, conn.max_in_flight) {
                return Pick::Got(Permit {
                    conn: conn.clone(),
                    count,
                    signals: self.signals.clone(),
                });
            }
            conn.in_flight.fetch_sub(count, Ordering::AcqRel);
        }
        Pick::AllFull
    }
}

/// Whether `count` more calls fit beside `load`. A forwarded batch larger than
/// `max_in_flight` still gets an empty connection, or it could never be sent.
fn fits(load: usize, count: usize, max: usize) -> bool {
    load + count <= max.max(count)
}
