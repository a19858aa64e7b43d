//! Admission: a slot on a connection, or a bounded wait for one.
//!
//! With no connection open a message waits up to `connect_wait`, with every connection
//! at `max_in_flight` up to `queue_timeout`; both bounded by its deadline and by the
//! waiting room (`max_waiting`), so a short upstream blip delays calls instead of
//! failing them, and nothing queues without bound.

use super::select::{self, Pick};
use super::{Outbound, Route};
use crate::error::Error;
use crate::upstream::{Conn, PoolSignals, Upstream, Upstreams};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::{Instant, timeout_at};

/// A slot (or `count` of them) on one connection, held for the whole message: it
/// bounds the queue and the pending map, and frees the slot however the message ends
/// (reply, timeout, client gone).
pub(crate) struct Permit {
    pub conn: Arc<Conn>,
    count: usize,
    signals: Arc<PoolSignals>,
    /// The upstream it belongs to (none for a session's own connection).
    pub upstream: Option<Arc<Upstream>>,
}

impl Permit {
    /// Wraps slots already taken on `conn`.
    pub(super) fn new(
        conn: &Arc<Conn>,
        count: usize,
        upstreams: &Upstreams,
        upstream: Option<&Arc<Upstream>>,
    ) -> Permit {
        Permit {
            conn: conn.clone(),
            count,
            signals: upstreams.signals.clone(),
            upstream: upstream.cloned(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(self.count, Ordering::AcqRel);
        if self.signals.waiters.load(Ordering::Acquire) > 0 {
            self.signals.changed.notify_waiters();
        }
    }
}

/// How long a message may wait for an open connection, fixed at its first wait and
/// kept across failovers, so a message bouncing between dying upstreams still gives
/// up after `connect_wait`.
#[derive(Default)]
pub(super) struct Waits {
    connect_until: Option<Instant>,
}

/// Takes slots for `msg` on a connection `route` allows, waiting as configured.
pub(super) async fn reserve(
    upstreams: &Upstreams,
    msg: &Outbound<'_>,
    route: Route<'_>,
    avoid: Option<&Arc<Upstream>>,
    deadline: Instant,
    waits: &mut Waits,
) -> Result<Permit, Error> {
    let signals = &upstreams.signals;
    let calls = &upstreams.calls;
    let mut queue_until = None;
    let mut waiting_since: Option<Instant> = None;
    let observe = |since: Option<Instant>| {
        if let Some(since) = since {
            let waited = since.elapsed().as_secs_f64();
            signals.metrics.queue_wait.observe(waited);
        }
    };
    loop {
        let notified = signals.changed.notified();
        tokio::pin!(notified);
        // Register for wakeups before looking, so a change between the look and the
        // wait is not missed.
        notified.as_mut().enable();
        if let Route::Own(conn) = route
            && !msg.is_prelude()
            && let Some(method) = conn.replay_failed()
        {
            return Err(Error::ReplayFailed(method));
        }
        let until = match select::pick(upstreams, route, msg.slots(), msg.is_prelude(), avoid) {
            Pick::Got(permit) => {
                observe(waiting_since);
                return Ok(permit);
            }
            Pick::NoneOpen => {
                let until = *waits
                    .connect_until
                    .get_or_insert_with(|| (Instant::now() + calls.connect_wait).min(deadline));
                if Instant::now() >= until {
                    observe(waiting_since);
                    return Err(Error::NoUpstream(calls.connect_wait));
                }
                until
            }
            Pick::AllFull => {
                let until = *queue_until
                    .get_or_insert_with(|| (Instant::now() + calls.queue_timeout).min(deadline));
                if Instant::now() >= until {
                    observe(waiting_since);
                    return Err(Error::Overloaded);
                }
                until
            }
        };
        // Bounded waiting room: past it, answer at once rather than queue.
        let seat = Seat::take(&signals.waiters);
        if seat.others >= upstreams.balance.max_waiting {
            return Err(Error::Overloaded);
        }
        waiting_since.get_or_insert_with(Instant::now);
        let _ = timeout_at(until, notified).await;
    }
}

/// A place in the waiting room, given back however the wait ends: a caller whose
/// client went away is dropped mid-wait, and must not keep its seat.
struct Seat<'a> {
    waiters: &'a AtomicUsize,
    /// Callers that were waiting before this one.
    others: usize,
}

impl<'a> Seat<'a> {
    fn take(waiters: &'a AtomicUsize) -> Seat<'a> {
        let others = waiters.fetch_add(1, Ordering::AcqRel);
        Seat { waiters, others }
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}
