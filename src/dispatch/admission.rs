//! Admission: a slot on a connection, or a bounded wait for one.
//!
//! With no connection open a message waits up to `connect_wait`, with every connection
//! at `max_in_flight` up to `queue_timeout`; both bounded by its deadline and by the
//! waiting room (`max_waiting`), so a short upstream blip delays calls instead of
//! failing them, and nothing queues without bound.

use super::select::{self, Pick};
use super::{Outbound, Route};
use crate::error::{Busy, Error, rounded};
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
    /// When the message first found nothing open, and until when it may wait.
    connect: Option<(Instant, Instant)>,
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
                let (since, until) = *waits.connect.get_or_insert_with(|| {
                    let now = Instant::now();
                    (now, (now + calls.connect_wait).min(deadline))
                });
                if Instant::now() >= until {
                    observe(waiting_since);
                    // What it really waited: the deadline may have cut connect_wait short.
                    return Err(Error::NoUpstream(rounded(since.elapsed())));
                }
                until
            }
            Pick::AllFull => {
                let until = *queue_until
                    .get_or_insert_with(|| (Instant::now() + calls.queue_timeout).min(deadline));
                if Instant::now() >= until {
                    observe(waiting_since);
                    return Err(Error::Overloaded(Busy::Slots));
                }
                until
            }
        };
        // Bounded waiting room: past it, answer at once rather than queue.
        let seat = Seat::take(&signals.waiters);
        if seat.others >= upstreams.balance.max_waiting {
            return Err(Error::Overloaded(Busy::WaitingRoom));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DiscoveryMode};
    use crate::dispatch::Prelude;
    use crate::metrics::Metrics;
    use crate::upstream::ConnState;
    use std::time::Duration;

    /// An upstream set with nothing in it (DNS discovery that found nothing yet) and
    /// one connection with `slots` slots and no socket.
    fn fixture(slots: usize, tune: impl FnOnce(&mut Config)) -> (Arc<Upstreams>, Arc<Conn>) {
        let mut config = Config::default();
        config.discovery.mode = DiscoveryMode::Dns;
        config.calls.connect_wait = Duration::from_secs(5);
        config.calls.queue_timeout = Duration::from_secs(1);
        tune(&mut config);
        let upstreams = Upstreams::start(&config, Arc::new(Metrics::new([]))).unwrap();
        let conn = Arc::new(Conn::new(
            &Arc::from("test"),
            0,
            slots,
            1 << 20,
            upstreams.signals.clone(),
        ));
        (upstreams, conn)
    }

    fn prelude() -> Outbound<'static> {
        Outbound::Prelude {
            kind: Prelude::OnConnect,
            prefix: r#"{"jsonrpc":"2.0","method":"login""#,
        }
    }

    fn health() -> Outbound<'static> {
        Outbound::Health {
            prefix: r#"{"jsonrpc":"2.0","method":"ping""#,
        }
    }

    async fn take(
        upstreams: &Upstreams,
        conn: &Arc<Conn>,
        msg: Outbound<'_>,
        budget: Duration,
    ) -> Result<Permit, Error> {
        let deadline = Instant::now() + budget;
        let mut waits = Waits::default();
        reserve(
            upstreams,
            &msg,
            Route::Own(conn),
            None,
            deadline,
            &mut waits,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_connection_makes_callers_wait_for_a_slot_and_hands_it_over() {
        let (upstreams, conn) = fixture(1, |_| {});
        conn.pretend(ConnState::Open);
        let held = take(&upstreams, &conn, health(), Duration::from_secs(30))
            .await
            .unwrap();
        let waiter = {
            let (upstreams, conn) = (upstreams.clone(), conn.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let permit = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
                (permit.map(|_| ()), started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let (got, waited) = waiter.await.unwrap();
        assert!(got.is_ok(), "{got:?}");
        assert_eq!(waited, Duration::from_millis(300));
        assert_eq!(conn.in_flight.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_finds_no_room_within_queue_timeout_is_told_overloaded() {
        let (upstreams, conn) = fixture(1, |_| {});
        conn.pretend(ConnState::Open);
        let _held = take(&upstreams, &conn, health(), Duration::from_secs(30))
            .await
            .unwrap();
        let started = Instant::now();
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        assert!(matches!(refused, Err(Error::Overloaded(Busy::Slots))));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_open_connection_a_caller_waits_connect_wait_then_gets_no_upstream() {
        let (upstreams, conn) = fixture(4, |_| {});
        let started = Instant::now();
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        assert_eq!(
            refused.err(),
            Some(Error::NoUpstream(Duration::from_secs(5)))
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // The deadline bounds the wait too.
        let started = Instant::now();
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(2)).await;
        assert!(matches!(refused, Err(Error::NoUpstream(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_opens_during_the_wait_takes_the_caller() {
        let (upstreams, conn) = fixture(4, |_| {});
        let opener = {
            let conn = conn.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                conn.pretend(ConnState::Open);
            })
        };
        let started = Instant::now();
        assert!(
            take(&upstreams, &conn, health(), Duration::from_secs(30))
                .await
                .is_ok()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        opener.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_waiting_room_refuses_at_once_and_a_caller_dropped_mid_wait_frees_its_seat() {
        let (upstreams, conn) = fixture(4, |c| c.balance.max_waiting = 1);
        // Not open: every caller waits.
        let first = {
            let (upstreams, conn) = (upstreams.clone(), conn.clone());
            tokio::spawn(async move {
                take(&upstreams, &conn, health(), Duration::from_secs(30))
                    .await
                    .map(|_| ())
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = Instant::now();
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        assert!(matches!(refused, Err(Error::Overloaded(Busy::WaitingRoom))));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The first caller's client goes away.
        first.abort();
        let _ = first.await;
        assert_eq!(upstreams.signals.waiters.load(Ordering::Acquire), 0);
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        assert_eq!(
            refused.err(),
            Some(Error::NoUpstream(Duration::from_secs(5)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_preparing_connection_admits_only_its_prelude() {
        let (upstreams, conn) = fixture(4, |c| c.calls.connect_wait = Duration::from_millis(100));
        conn.pretend(ConnState::Preparing);
        assert!(
            take(&upstreams, &conn, prelude(), Duration::from_secs(30))
                .await
                .is_ok()
        );
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        let waited = Duration::from_millis(100);
        assert_eq!(refused.err(), Some(Error::NoUpstream(waited)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_replay_failed_refuses_its_calls_but_not_the_next_replay() {
        let (upstreams, _) = fixture(4, |_| {});
        let conn = Arc::new(Conn::for_session(
            "s1",
            0,
            4,
            1 << 20,
            upstreams.signals.clone(),
            8,
        ));
        conn.pretend(ConnState::Open);
        conn.set_replay_failed(Some("login".into()));
        let refused = take(&upstreams, &conn, health(), Duration::from_secs(30)).await;
        assert_eq!(refused.err(), Some(Error::ReplayFailed("login".into())));
        assert!(
            take(&upstreams, &conn, prelude(), Duration::from_secs(30))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_one_slot_per_call() {
        let (upstreams, conn) = fixture(4, |_| {});
        conn.pretend(ConnState::Open);
        let text = r#"[{"jsonrpc":"2.0","method":"a","id":1},{"jsonrpc":"2.0","method":"b","id":2},{"jsonrpc":"2.0","method":"c"}]"#;
        let crate::jsonrpc::Body::Batch(entries) =
            crate::jsonrpc::parse_body(text.as_bytes(), 10).unwrap()
        else {
            panic!("a batch")
        };
        let calls: Vec<_> = entries.into_iter().map(|e| e.unwrap()).collect();
        let permit = take(
            &upstreams,
            &conn,
            Outbound::Batch(&calls),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(conn.in_flight.load(Ordering::Acquire), 3);
        drop(permit);
        assert_eq!(conn.in_flight.load(Ordering::Acquire), 0);
    }
}
