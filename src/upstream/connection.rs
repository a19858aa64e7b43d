//! One persistent upstream WebSocket: a task that owns the socket, reconnects it, and
//! matches replies to callers.
//!
//! Callers never touch the socket. They register in the connection's [`PendingMap`]
//! and queue a frame in the same critical section ([`Shared::submit`]), so a call is
//! either queued on an open socket or refused; there is no window where it is neither.
//! When the socket dies, frames still queued were never written and go back to their
//! callers as [`Failure::NotSent`] (safe to send elsewhere); calls already written get
//! [`Failure::Lost`] at once, without waiting for their timeouts.

use super::backoff::Backoff;
use super::connect::{Target, WsStream};
use super::pending::{CallId, PendingMap};
use crate::config::WebSocketConfig;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// A reply to one call, pointing into the frame it arrived in.
///
/// Holding the frame (a refcounted `Bytes`) and a range avoids copying the payload:
/// the HTTP handler splices it straight into the client's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    frame: Bytes,
    range: Range<usize>,
    is_error: bool,
    /// The upstream that answered (none for a session's own connection), for the
    /// access log.
    pub upstream: Option<Arc<str>>,
}

impl Reply {
    /// The raw text of `result` (or `error` when [`Reply::is_error`]).
    pub fn payload(&self) -> &str {
        // The frame was valid UTF-8 when parsed and the range lies on a JSON value's bounds.
        std::str::from_utf8(&self.frame[self.range.clone()]).unwrap_or("null")
    }

    pub fn is_error(&self) -> bool {
        self.is_error
    }
}

/// Why a call got no reply from this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The frame never reached the socket: the call can safely go elsewhere.
    NotSent,
    /// The socket died after the frame was written: the call may have run.
    Lost,
}

pub type ReplySender = oneshot::Sender<Result<Reply, Failure>>;

/// Why a connection did not take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The socket closed since the pick: another connection may take it.
    Closed,
    /// The socket's queue is full: its writer is stuck behind an upstream that does not
    /// read. Retrying would spin; the caller answers "overloaded".
    Full,
}

/// A frame queued for the socket, with the calls it carries.
#[derive(Debug)]
pub struct Outgoing {
    pub text: String,
    pub ids: FrameIds,
}

#[derive(Debug)]
pub enum FrameIds {
    /// A notification: nobody waits.
    None,
    One(CallId),
    /// A forwarded batch.
    Many(Vec<CallId>),
}

/// Where a connection is in its life; readable by the pool without locking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Open,
    /// Waiting out a backoff delay after a failure.
    Backoff,
    Stopped,
}

/// Signals shared by all connections of a pool.
#[derive(Debug, Default)]
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
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The part of a connection callers see.
#[derive(Debug)]
pub struct Shared {
    /// `upstream#connection`, for logs.
    pub label: String,
    /// Read on every pick; written only by the connection task.
    open: AtomicBool,
    state: Mutex<ConnState>,
    /// Calls holding a slot on this connection (see `Permit` in the pool).
    pub in_flight: AtomicUsize,
    pub max_in_flight: usize,
    slot: Mutex<Slot>,
    signals: Arc<PoolSignals>,
    /// `name=value` cookies the upstream's handshakes set (a load balancer's affinity
    /// cookie), sent again on every reconnect.
    cookies: Mutex<Vec<(String, String)>>,
    /// Sessions only: calls to replay on reconnect, and the method whose replay failed.
    replay: Option<Mutex<ReplayLog>>,
    /// The address the current (or last) socket went to.
    pub upstream: Mutex<Option<String>>,
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
    calls: std::collections::VecDeque<PreludeCall>,
    max: usize,
    failed: Option<String>,
}

/// Where a connection task dials on each attempt: fixed for pooled connections; for a
/// session, the first upstream of its rendezvous order among those present now.
pub type TargetFn = Arc<dyn Fn() -> Option<Arc<Target>> + Send + Sync>;

#[derive(Debug, Default)]
struct Slot {
    pending: PendingMap<ReplySender>,
    /// The current socket's queue; replaced on every reconnect so a frame meant for a
    /// dead socket can never reach a new one.
    out: Option<mpsc::Sender<Outgoing>>,
}

impl Shared {
    pub fn new(label: String, max_in_flight: usize, signals: Arc<PoolSignals>) -> Self {
        Shared {
            label,
            open: AtomicBool::new(false),
            state: Mutex::new(ConnState::Connecting),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            slot: Mutex::new(Slot::default()),
            signals,
            cookies: Mutex::new(Vec::new()),
            replay: None,
            upstream: Mutex::new(None),
        }
    }

    /// A session's connection, keeping up to `max_replay` calls to replay.
    pub fn for_session(
        label: String,
        max_in_flight: usize,
        signals: Arc<PoolSignals>,
        max_replay: usize,
    ) -> Self {
        Shared {
            replay: Some(Mutex::new(ReplayLog {
                calls: std::collections::VecDeque::new(),
                max: max_replay,
                failed: None,
            })),
            ..Shared::new(label, max_in_flight, signals)
        }
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

    /// The method whose replay failed on the last connect, if it did.
    pub fn replay_failed(&self) -> Option<String> {
        self.replay
            .as_ref()
            .and_then(|log| log.lock().failed.clone())
    }

    fn replay_calls(&self) -> Vec<PreludeCall> {
        self.replay
            .as_ref()
            .map(|log| log.lock().calls.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn set_replay_failed(&self, method: Option<String>) {
        if let Some(log) = &self.replay {
            let failed = method.is_some();
            log.lock().failed = method;
            if failed {
                self.signals.changed.notify_waiters();
            }
        }
    }

    fn cookie_header(&self) -> Option<String> {
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

    fn keep_cookies(&self, set_cookies: Vec<String>) {
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

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The `upstream` metric label: the upstream's id, or `session` for a session's
    /// own connection (one label for all of them keeps the label set bounded).
    pub fn metric_label(&self) -> &str {
        self.label
            .rsplit_once('#')
            .map_or(self.label.as_str(), |(id, _)| id)
    }

    pub fn state(&self) -> ConnState {
        *self.state.lock()
    }

    /// Registers a call (its reply channel, if it expects one) and queues its frame,
    /// finishing the frame with the new id.
    pub fn submit(
        &self,
        mut text: String,
        reply: Option<ReplySender>,
    ) -> Result<Option<CallId>, Refused> {
        let mut slot = self.slot.lock();
        let Slot { pending, out } = &mut *slot;
        let Some(out) = out.as_ref().filter(|_| pending.is_open()) else {
            return Err(Refused::Closed);
        };
        let id = match reply {
            Some(tx) => match pending.insert(tx) {
                Ok(id) => Some(id),
                Err(_) => return Err(Refused::Closed),
            },
            None => None,
        };
        crate::jsonrpc::finish_frame(&mut text, id);
        let ids = id.map_or(FrameIds::None, FrameIds::One);
        match out.try_send(Outgoing { text, ids }) {
            Ok(()) => Ok(id),
            Err(e) => {
                if let Some(id) = id {
                    pending.remove(id);
                }
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => Refused::Full,
                    mpsc::error::TrySendError::Closed(_) => Refused::Closed,
                })
            }
        }
    }

    /// Queues a forwarded batch as one frame. `build` gets the ids of the calls (in
    /// order) and writes the whole frame.
    pub fn submit_batch(
        &self,
        replies: Vec<ReplySender>,
        build: impl FnOnce(&[CallId]) -> String,
    ) -> Result<Vec<CallId>, Refused> {
        let mut slot = self.slot.lock();
        let Slot { pending, out } = &mut *slot;
        let Some(out) = out.as_ref().filter(|_| pending.is_open()) else {
            return Err(Refused::Closed);
        };
        let mut ids = Vec::with_capacity(replies.len());
        for tx in replies {
            // Cannot fail: the map is open and we hold its lock.
            if let Ok(id) = pending.insert(tx) {
                ids.push(id);
            }
        }
        let text = build(&ids);
        match out.try_send(Outgoing {
            text,
            ids: FrameIds::Many(ids.clone()),
        }) {
            Ok(()) => Ok(ids),
            Err(e) => {
                for id in ids {
                    pending.remove(id);
                }
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => Refused::Full,
                    mpsc::error::TrySendError::Closed(_) => Refused::Closed,
                })
            }
        }
    }

    /// A caller gave up (timeout, client gone): forget its call.
    pub fn forget(&self, id: CallId) {
        self.slot.lock().pending.remove(id);
    }

    /// Calls waiting for a reply on this connection right now.
    pub fn pending_len(&self) -> usize {
        self.slot.lock().pending.len()
    }

    fn set_state(&self, state: ConnState) {
        *self.state.lock() = state;
    }

    /// The socket is up: accept calls through `out`.
    fn opened(&self, out: mpsc::Sender<Outgoing>) {
        {
            let mut slot = self.slot.lock();
            slot.pending.open();
            slot.out = Some(out);
        }
        self.open.store(true, Ordering::Release);
        self.set_state(ConnState::Open);
        self.signals.open_connections.fetch_add(1, Ordering::AcqRel);
        self.signals.changed.notify_waiters();
    }

    /// The socket is gone: answer every caller now. Frames still in `queue` were never
    /// written, so their callers may retry elsewhere; the rest may have run.
    fn closed(
        &self,
        queue: &mut mpsc::Receiver<Outgoing>,
        unsent: Vec<Outgoing>,
    ) -> (usize, usize) {
        self.open.store(false, Ordering::Release);
        let drained = {
            let mut slot = self.slot.lock();
            slot.out = None;
            slot.pending.close()
        };
        self.signals.open_connections.fetch_sub(1, Ordering::AcqRel);
        let mut waiting: std::collections::HashMap<CallId, ReplySender> =
            drained.into_iter().collect();
        queue.close();
        let mut not_sent = 0;
        let mut frames = unsent;
        while let Ok(frame) = queue.try_recv() {
            frames.push(frame);
        }
        for frame in frames {
            let ids = match frame.ids {
                FrameIds::None => Vec::new(),
                FrameIds::One(id) => vec![id],
                FrameIds::Many(ids) => ids,
            };
            for id in ids {
                if let Some(tx) = waiting.remove(&id) {
                    not_sent += 1;
                    let _ = tx.send(Err(Failure::NotSent));
                }
            }
        }
        let lost = waiting.len();
        for (_, tx) in waiting {
            let _ = tx.send(Err(Failure::Lost));
        }
        (not_sent, lost)
    }

    /// Matches one upstream frame's replies to their callers.
    fn deliver(&self, frame: Bytes) {
        let Ok(text) = std::str::from_utf8(&frame) else {
            self.signals.garbage.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &self.signals.metrics {
                m.unmatched.with_label_values(&["garbage"]).inc();
            }
            tracing::debug!(conn = %self.label, "binary frame is not UTF-8 text; ignored");
            return;
        };
        let base = text.as_ptr() as usize;
        let mut unmatched = 0u64;
        let seen = {
            let mut slot = self.slot.lock();
            crate::jsonrpc::read_upstream(text, |id, outcome| {
                let payload = outcome.payload().get();
                let start = payload.as_ptr() as usize - base;
                match slot.pending.remove(id) {
                    Some(tx) => {
                        let _ = tx.send(Ok(Reply {
                            frame: frame.clone(),
                            range: start..start + payload.len(),
                            is_error: outcome.is_error(),
                            upstream: None,
                        }));
                    }
                    None => unmatched += 1,
                }
            })
        };
        let unmatched = unmatched + seen.unsolicited as u64;
        if unmatched > 0 {
            self.signals
                .unmatched
                .fetch_add(unmatched, Ordering::Relaxed);
            if let Some(m) = &self.signals.metrics {
                m.unmatched
                    .with_label_values(&["unsolicited"])
                    .inc_by(unmatched);
            }
            tracing::debug!(conn = %self.label, count = unmatched, "upstream message matched no pending call");
        }
        if seen.garbage > 0 {
            self.signals
                .garbage
                .fetch_add(seen.garbage as u64, Ordering::Relaxed);
            if let Some(m) = &self.signals.metrics {
                m.unmatched
                    .with_label_values(&["garbage"])
                    .inc_by(seen.garbage as u64);
            }
            tracing::debug!(conn = %self.label, "upstream sent a frame that is not JSON-RPC; ignored");
        }
    }
}

/// Frames written per flush at most.
const WRITE_BATCH: usize = 256;

/// Why a socket session ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("shutting down")]
    Shutdown,
    #[error("closed by upstream ({})", .0.as_ref().map_or_else(|| "no close frame".to_string(), |f| format!("{} {}", f.code, f.reason)))]
    ClosedByPeer(Option<CloseFrame>),
    #[error("socket closed without a close frame")]
    Eof,
    #[error("no pong within pong_timeout")]
    PongTimeout,
    #[error("upstream stopped reading: a write blocked past ping_interval + pong_timeout")]
    WriteStalled,
    #[error("{0}")]
    Error(tokio_tungstenite::tungstenite::Error),
}

/// The connection task: connect, serve, and reconnect with backoff until shutdown.
///
/// An explicit loop over states rather than flags: `Connecting` → `Open` (serving a
/// session) → `Backoff` → `Connecting` …, and `Stopped` once shutdown is requested.
pub async fn run(
    shared: Arc<Shared>,
    target: TargetFn,
    ws: Arc<WebSocketConfig>,
    on_connect: Arc<Vec<PreludeCall>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(ws.reconnect_base, ws.reconnect_max);
    loop {
        shared.set_state(ConnState::Connecting);
        let Some(target) = target() else {
            // A session whose upstreams have all left: wait for discovery to add one.
            shared.set_state(ConnState::Backoff);
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => continue,
                _ = shutdown.cancelled() => break,
            }
        };
        {
            let mut current = shared.upstream.lock();
            if current.as_deref() != Some(target.authority()) {
                // Another upstream's cookies (its load balancer's affinity) mean nothing here.
                shared.cookies.lock().clear();
                *current = Some(target.authority().to_string());
            }
        }
        let cookies = shared.cookie_header();
        let attempt = tokio::select! {
            r = timeout(ws.handshake_timeout, connect_and_prepare(&shared, &target, &ws, &on_connect, cookies.as_deref())) => r,
            _ = shutdown.cancelled() => break,
        };
        match attempt {
            Ok(Ok(socket)) => {
                tracing::info!(conn = %shared.label, upstream = %target.authority(), "upstream connected");
                let opened_at = Instant::now();
                // Queue depth never exceeds the calls holding slots, plus notifications.
                let (tx, mut rx) = mpsc::channel(shared.max_in_flight + 64);
                shared.opened(tx);
                let mut unsent = Vec::new();
                let end = session(socket, &mut rx, &mut unsent, &shared, &ws, &shutdown).await;
                let (not_sent, lost) = shared.closed(&mut rx, unsent);
                if matches!(end, End::Shutdown) {
                    break;
                }
                tracing::warn!(conn = %shared.label, reason = %end, in_flight_lost = lost, requeued = not_sent, "upstream connection lost");
                if let Some(m) = &shared.signals.metrics {
                    m.reconnects
                        .with_label_values(&[shared.metric_label()])
                        .inc();
                }
                // A connection that stayed up a while earns a fast reconnect; one that
                // dies right after its handshake keeps backing off, so a server that
                // accepts and drops at once is not hammered.
                if opened_at.elapsed() >= ws.reconnect_max.min(std::time::Duration::from_secs(5)) {
                    backoff.reset();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(conn = %shared.label, upstream = %target.authority(), error = %e, "upstream connect failed");
            }
            Err(_) => {
                tracing::warn!(conn = %shared.label, upstream = %target.authority(), timeout = ?ws.handshake_timeout, "upstream handshake timed out");
            }
        }
        shared.set_state(ConnState::Backoff);
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    shared.set_state(ConnState::Stopped);
}

/// Why a fresh socket was not put to use.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error(transparent)]
    Connect(#[from] super::connect::ConnectError),
    #[error("on_connect call {0:?} failed")]
    OnConnect(String),
    #[error("replaying {0:?} failed")]
    Replay(String),
    #[error("socket failed during on_connect/replay: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Connects, then runs the `on_connect` calls and the session's replay, in order,
/// before the socket carries any call.
async fn connect_and_prepare(
    shared: &Shared,
    target: &Target,
    ws: &WebSocketConfig,
    on_connect: &[PreludeCall],
    cookies: Option<&str>,
) -> Result<WsStream, PrepareError> {
    let (mut socket, set_cookies) = target.connect(ws, cookies).await?;
    shared.keep_cookies(set_cookies);
    for call in on_connect {
        if !prelude_call(&mut socket, call, shared).await? {
            return Err(PrepareError::OnConnect(call.method.clone()));
        }
    }
    let replay = shared.replay_calls();
    let replaying = !replay.is_empty();
    for call in replay {
        if !prelude_call(&mut socket, &call, shared).await? {
            shared.set_replay_failed(Some(call.method.clone()));
            if let Some(m) = &shared.signals.metrics {
                m.replays.with_label_values(&["failed"]).inc();
            }
            return Err(PrepareError::Replay(call.method));
        }
    }
    if replaying && let Some(m) = &shared.signals.metrics {
        m.replays.with_label_values(&["ok"]).inc();
    }
    shared.set_replay_failed(None);
    Ok(socket)
}

/// Sends one prelude call and waits for its reply; `Ok(false)` if it was an error.
/// Its id comes from the top of the id range, far from the pending map's counter.
async fn prelude_call(
    socket: &mut WsStream,
    call: &PreludeCall,
    shared: &Shared,
) -> Result<bool, PrepareError> {
    const PRELUDE_ID: u64 = u64::MAX - 1;
    let mut frame = call.prefix.clone();
    crate::jsonrpc::finish_frame(&mut frame, Some(PRELUDE_ID));
    socket.send(Message::text(frame)).await?;
    while let Some(message) = socket.next().await {
        let bytes = match message? {
            Message::Text(t) => Bytes::from(t),
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let mut answer = None;
        let seen = crate::jsonrpc::read_upstream(text, |id, outcome| {
            if id == PRELUDE_ID {
                answer = Some(!outcome.is_error());
            }
        });
        if let Some(ok) = answer {
            return Ok(ok);
        }
        shared
            .signals
            .unmatched
            .fetch_add((seen.replies + seen.unsolicited) as u64, Ordering::Relaxed);
    }
    Err(PrepareError::Socket(
        tokio_tungstenite::tungstenite::Error::ConnectionClosed,
    ))
}

/// Serves one open socket until it ends.
///
/// The reader and the writer are two futures in this one task, polled together:
/// the writer may wait on a full socket while the reader keeps draining replies, so a
/// slow upstream cannot deadlock us with both directions blocked.
async fn session(
    socket: WsStream,
    queue: &mut mpsc::Receiver<Outgoing>,
    batch: &mut Vec<Outgoing>,
    shared: &Shared,
    ws: &WebSocketConfig,
    shutdown: &CancellationToken,
) -> End {
    let (mut sink, mut stream) = socket.split();
    let epoch = Instant::now();
    let ms = |at: Instant| at.duration_since(epoch).as_millis() as u64 + 1;
    // Milliseconds since `epoch` + 1 (0: none) when the unanswered ping went out, and
    // when the write in progress began. The liveness check reads them from a future of
    // its own, because a writer blocked on a full socket cannot check anything itself.
    let ping_sent = AtomicU64::new(0);
    let write_began = AtomicU64::new(0);

    let writer = async {
        // Whether the last flush carried several frames: the connection is under load.
        let mut busy = false;
        let start = Instant::now() + ws.ping_interval;
        let mut ping = tokio::time::interval_at(start, ws.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Frames first: under load, pings can wait a moment but calls should not.
                biased;
                n = queue.recv_many(batch, WRITE_BATCH) => {
                    if n == 0 {
                        return End::Eof;
                    }
                    write_began.store(ms(Instant::now()), Ordering::Release);
                    // Many frames, one flush: under load this turns hundreds of small
                    // writes into a few syscalls. Under load, one yield first lets the
                    // callers already running on this worker queue theirs too; on
                    // loopback a send costs far more than a scheduler round. A lone
                    // caller (the last flush carried one frame) skips it: nobody else
                    // is coming, and the round would only add latency.
                    if n < WRITE_BATCH && (n > 1 || busy) {
                        tokio::task::yield_now().await;
                        while batch.len() < WRITE_BATCH {
                            match queue.try_recv() {
                                Ok(frame) => batch.push(frame),
                                Err(_) => break,
                            }
                        }
                    }
                    let batch_len = batch.len();
                    batch.reverse();
                    while let Some(frame) = batch.pop() {
                        if let Err(e) = sink.feed(Message::text(frame.text)).await {
                            return End::Error(e);
                        }
                    }
                    busy = batch_len > 1;
                    if let Err(e) = sink.flush().await {
                        return End::Error(e);
                    }
                    write_began.store(0, Ordering::Release);
                }
                _ = ping.tick() => {
                    if ping_sent.load(Ordering::Acquire) != 0 {
                        continue;
                    }
                    ping_sent.store(ms(Instant::now()), Ordering::Release);
                    if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                        return End::Error(e);
                    }
                }
                _ = shutdown.cancelled() => {
                    let close = CloseFrame { code: CloseCode::Away, reason: "rpcgate shutting down".into() };
                    let _ = timeout(ws.handshake_timeout, sink.send(Message::Close(Some(close)))).await;
                    return End::Shutdown;
                }
            }
        }
    };

    // Dead if a ping goes unanswered for pong_timeout, or if one write stays blocked for
    // ping_interval + pong_timeout: an upstream that stopped reading is as dead as one
    // that stopped answering.
    let liveness = async {
        let stalled_write = ws.ping_interval + ws.pong_timeout;
        let step = (ws.pong_timeout / 4).max(std::time::Duration::from_millis(5));
        loop {
            tokio::time::sleep(step).await;
            let now = ms(Instant::now());
            let older_than = |mark: u64, limit: std::time::Duration| {
                mark != 0 && now.saturating_sub(mark) > limit.as_millis() as u64
            };
            if older_than(ping_sent.load(Ordering::Acquire), ws.pong_timeout) {
                return End::PongTimeout;
            }
            if older_than(write_began.load(Ordering::Acquire), stalled_write) {
                return End::WriteStalled;
            }
        }
    };

    let reader = async {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) => shared.deliver(Bytes::from(text)),
                Ok(Message::Binary(data)) => shared.deliver(data),
                Ok(Message::Pong(_)) => ping_sent.store(0, Ordering::Release),
                Ok(Message::Close(frame)) => return End::ClosedByPeer(frame),
                Ok(Message::Ping(_) | Message::Frame(_)) => {}
                Err(e) => return End::Error(e),
            }
        }
        End::Eof
    };

    tokio::select! {
        end = writer => end,
        end = reader => end,
        end = liveness => end,
    }
}
