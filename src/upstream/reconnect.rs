//! The connection task: connect, prepare, serve, and reconnect with backoff until
//! shutdown, as an explicit state machine rather than flags over a loop.
//!
//! ```text
//! Connecting ──ok──▶ Serving (Preparing → Open) ──socket ends──▶ Backoff ──▶ Connecting
//!      └──fail──────────────────────────────────────────────────▶ Backoff
//! any state ──shutdown──▶ Stopped
//! ```
//!
//! A fresh socket runs its `on_connect` calls and a session's replay first. They are
//! ordinary messages through the one dispatch pipeline (`Outbound::Prelude` on
//! `Route::Own`), with ordinary ids, while the socket is already being served, so
//! their replies are matched by the same `deliver` as every other reply.

use super::backoff::Backoff;
use super::conn::{Conn, ConnState, PreludeCall};
use super::connect::{ConnectError, Target, WsStream};
use super::set::Upstreams;
use super::socket;
use super::wamp;
use crate::config::WebSocketConfig;
use crate::dispatch::{self, Outbound, Prelude, Route, Sent};
use crate::error::Error;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

/// Where a connection task dials on each attempt: fixed for pooled connections; for a
/// session, the first upstream of its rendezvous order among those present now.
pub type TargetFn = Arc<dyn Fn() -> Option<Arc<Target>> + Send + Sync>;

/// What the task does next.
enum State {
    Connecting,
    /// A socket is up; it prepares, then serves until it ends. (Boxed: a socket with
    /// its TLS state is large, and the state lives across every await of the task.)
    Serving(Box<WsStream>, Arc<Target>),
    Backoff,
    Stopped,
}

/// Why a fresh socket was not put to use.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error("on_connect call {0:?} failed")]
    OnConnect(String),
    #[error("replaying {0:?} failed")]
    Replay(String),
    #[error("on_connect/replay call {method:?} got no answer: {error}")]
    NoAnswer { method: String, error: Error },
    #[error("the gateway is stopping")]
    Gone,
}

/// Why a connect attempt gave no usable socket.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("{0}")]
    Connect(ConnectError),
    #[error("{0}")]
    Join(wamp::JoinError),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
}

impl Failed {
    /// The `reason` label of `rpcgate_upstream_connect_failures_total`.
    fn kind(&self) -> &'static str {
        match self {
            Failed::Connect(_) => "connect",
            Failed::Join(e) => e.kind(),
            Failed::Timeout(_) => "timeout",
        }
    }
}

/// Everything a connection task needs besides its handle.
pub(super) struct Task {
    pub conn: Arc<Conn>,
    pub target: TargetFn,
    pub upstreams: Weak<Upstreams>,
    pub ws: Arc<WebSocketConfig>,
    pub on_connect: Arc<Vec<PreludeCall>>,
    pub shutdown: CancellationToken,
}

impl Task {
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.ws.reconnect_base, self.ws.reconnect_max);
        let mut state = State::Connecting;
        loop {
            state = match state {
                State::Connecting => self.connect().await,
                State::Serving(socket, target) => {
                    let opened_at = Instant::now();
                    let next = self.serve(*socket, &target).await;
                    // A connection that stayed up a while earns a fast reconnect; one
                    // that dies right after its handshake keeps backing off, so a
                    // server that accepts and drops at once is not hammered.
                    let settled = self.ws.reconnect_max.min(Duration::from_secs(5));
                    if opened_at.elapsed() >= settled {
                        backoff.reset();
                    }
                    next
                }
                State::Backoff => {
                    self.conn.set_state(ConnState::Backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => State::Connecting,
                        _ = self.shutdown.cancelled() => State::Stopped,
                    }
                }
                State::Stopped => break,
            };
        }
        self.conn.set_state(ConnState::Stopped);
    }

    async fn connect(&self) -> State {
        let conn = &self.conn;
        conn.set_state(ConnState::Connecting);
        // None: a session whose upstreams have all left waits for discovery to add one.
        let Some(target) = (self.target)() else {
            return State::Backoff;
        };
        {
            let mut current = conn.upstream.lock();
            if current.as_deref() != Some(target.authority()) {
                // Another upstream's cookies (its load balancer's affinity) mean nothing here.
                conn.clear_cookies();
                *current = Some(target.authority().to_string());
            }
        }
        let cookies = conn.cookie_header();
        let open = async {
            let (mut socket, set_cookies) = target
                .connect(&self.ws, cookies.as_deref())
                .await
                .map_err(Failed::Connect)?;
            // A WAMP upstream's socket is of use only once its session has joined.
            let mut joined = None;
            if let Some(link) = &target.wamp {
                let welcome = wamp::join(&mut socket, link).await.map_err(Failed::Join)?;
                tracing::debug!(conn = %conn.label, session = welcome.session, realm = %link.realm, call_canceling = welcome.call_canceling, "WAMP session joined");
                joined = Some((link, welcome));
            }
            Ok::<_, Failed>((socket, set_cookies, joined))
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(self.ws.handshake_timeout, open) => r,
            _ = self.shutdown.cancelled() => return State::Stopped,
        };
        let failed = match attempt {
            Ok(Ok((socket, set_cookies, joined))) => {
                conn.keep_cookies(set_cookies);
                conn.begin_socket(joined);
                return State::Serving(Box::new(socket), target);
            }
            Ok(Err(e)) => e,
            Err(_) => Failed::Timeout(self.ws.handshake_timeout),
        };
        tracing::warn!(conn = %conn.label, upstream = %target.authority(), error = %failed, "upstream connect failed");
        conn.signals
            .metrics
            .connect_failures
            .with_label_values(&[conn.metric_label(), failed.kind()])
            .inc();
        conn.set_last_error(Some(failed.to_string()));
        State::Backoff
    }

    /// Prepares the socket while already serving it, then serves it until it ends.
    async fn serve(&self, socket: WsStream, target: &Target) -> State {
        let conn = &self.conn;
        conn.preparing();
        // Stops this socket alone: a failed prelude closes it without stopping the task.
        let stop = self.shutdown.child_token();
        let mut unsent = Vec::new();
        // `None`: the prelude failed and the socket was closed on purpose.
        let end = {
            let serving = socket::serve(
                socket,
                conn,
                &mut unsent,
                &self.ws,
                &stop,
                target.wamp.is_some(),
            );
            tokio::pin!(serving);
            let deadline = Instant::now() + self.ws.handshake_timeout;
            let prepared = tokio::select! {
                end = &mut serving => Err(end),
                ready = self.prepare(deadline) => Ok(ready),
            };
            match prepared {
                Err(end) => Some(end),
                Ok(Ok(())) => {
                    conn.opened();
                    tracing::info!(conn = %conn.label, upstream = %target.authority(), "upstream connected");
                    Some(serving.await)
                }
                Ok(Err(e)) => {
                    tracing::warn!(conn = %conn.label, upstream = %target.authority(), error = %e, "upstream connect failed");
                    conn.set_last_error(Some(e.to_string()));
                    stop.cancel();
                    serving.await;
                    None
                }
            }
        };
        let closed = conn.closed(unsent);
        if self.shutdown.is_cancelled() {
            return State::Stopped;
        }
        let Some(end) = end else {
            return State::Backoff;
        };
        tracing::warn!(conn = %conn.label, reason = %end, in_flight_lost = closed.lost, requeued = closed.not_sent, "upstream connection lost");
        self.conn
            .signals
            .metrics
            .reconnects
            .with_label_values(&[conn.metric_label()])
            .inc();
        State::Backoff
    }

    /// Runs the `on_connect` calls, then the session's replay, in order.
    async fn prepare(&self, deadline: Instant) -> Result<(), PrepareError> {
        let upstreams = self.upstreams.upgrade().ok_or(PrepareError::Gone)?;
        for call in self.on_connect.iter() {
            if !self
                .prelude(&upstreams, call, Prelude::OnConnect, deadline)
                .await?
            {
                return Err(PrepareError::OnConnect(call.method.clone()));
            }
        }
        let replay = self.conn.replay_calls();
        let replays = &self.conn.signals.metrics.replays;
        for call in &replay {
            if !self
                .prelude(&upstreams, call, Prelude::Replay, deadline)
                .await?
            {
                self.conn.set_replay_failed(Some(call.method.clone()));
                replays.with_label_values(&["failed"]).inc();
                return Err(PrepareError::Replay(call.method.clone()));
            }
        }
        if !replay.is_empty() {
            replays.with_label_values(&["ok"]).inc();
        }
        self.conn.set_replay_failed(None);
        Ok(())
    }

    /// Sends one prelude call; `Ok(false)` if the upstream answered with an error.
    async fn prelude(
        &self,
        upstreams: &Upstreams,
        call: &PreludeCall,
        kind: Prelude,
        deadline: Instant,
    ) -> Result<bool, PrepareError> {
        let msg = Outbound::Prelude {
            kind,
            prefix: &call.prefix,
        };
        let sent = timeout_at(
            deadline,
            dispatch::send(upstreams, msg, Route::Own(&self.conn), None, deadline),
        )
        .await
        .unwrap_or(Err(Error::Timeout(self.ws.handshake_timeout)));
        match sent {
            Ok(Sent::Reply(reply)) => Ok(!reply.is_error()),
            Ok(_) => Ok(false),
            Err(error) => Err(PrepareError::NoAnswer {
                method: call.method.clone(),
                error,
            }),
        }
    }
}
