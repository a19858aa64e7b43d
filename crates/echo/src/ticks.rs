//! `ticks_subscribe` / `ticks_unsubscribe`: one connection's subscriptions, and the
//! task that ticks for each of them.
//!
//! The table is plain data owned by the connection's reader, so subscribing and
//! unsubscribing need no lock against other connections; the only lock is the one
//! that makes "no tick after `ticks_unsubscribe`'s `true`" hold on a multi-threaded
//! runtime (see [`Stop`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::wire::tick;

/// Active subscriptions per connection; each is a timer and a task, so a client must
/// not be able to make them without bound.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 64;
pub(crate) const DEFAULT_INTERVAL_MS: u64 = 1000;
/// Below 10 ms a subscription is a flood, above a minute a test that waits for it hangs.
pub(crate) const MIN_INTERVAL_MS: u64 = 10;
pub(crate) const MAX_INTERVAL_MS: u64 = 60_000;

/// `[interval_ms]`, `[]` or no params; `None` if they are something else.
pub(crate) fn interval(params: Option<&str>) -> Option<Duration> {
    let ms = match params {
        None => DEFAULT_INTERVAL_MS,
        Some(params) => match serde_json::from_str::<(u64,)>(params) {
            Ok((ms,)) => ms,
            Err(_) => {
                serde_json::from_str::<()>(params)
                    .or_else(|_| serde_json::from_str::<[(); 0]>(params).map(drop))
                    .ok()?;
                DEFAULT_INTERVAL_MS
            }
        },
    };
    Some(Duration::from_millis(
        ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS),
    ))
}

/// One connection's active subscriptions.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    /// Cancelled when the connection ends; every ticker's token is a child of it, so
    /// no ticker outlives its socket.
    ending: CancellationToken,
    /// The number in the next id: ids are never reused on a connection, so a late
    /// `ticks_unsubscribe` cannot stop a newer subscription.
    next: u64,
    /// By id as its JSON string literal (`"tick-1"` with the quotes): the form it is
    /// written in.
    active: HashMap<Box<str>, Arc<Stop>>,
}

/// Why a subscription was not made.
#[derive(Debug, PartialEq)]
pub(crate) struct TooMany;

impl Subscriptions {
    pub(crate) fn new(ending: CancellationToken) -> Self {
        Subscriptions {
            ending,
            next: 1,
            active: HashMap::new(),
        }
    }

    /// Records a new subscription; the caller starts its [`Ticker`] once the reply
    /// carrying [`Ticker::id`] is queued.
    pub(crate) fn subscribe(&mut self, interval: Duration) -> Result<Ticker, TooMany> {
        if self.active.len() >= MAX_SUBSCRIPTIONS {
            return Err(TooMany);
        }
        let mut id = String::with_capacity(16);
        id.push_str("\"tick-");
        id.push_str(itoa::Buffer::new().format(self.next));
        id.push('"');
        self.next += 1;
        let id: Arc<str> = id.into();
        let stop = Arc::new(Stop {
            token: self.ending.child_token(),
            sending: Mutex::new(()),
        });
        self.active.insert(Box::from(&*id), stop.clone());
        Ok(Ticker { id, interval, stop })
    }

    /// Stops the subscription `id` (without quotes). True if it was active here.
    /// Once this returns no tick of it can be queued, so none follows a reply queued
    /// after it.
    pub(crate) fn unsubscribe(&mut self, id: &str) -> bool {
        let key = format!("\"{id}\"");
        match self.active.remove(key.as_str()) {
            Some(stop) => {
                stop.stop();
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.active.len()
    }
}

/// A subscription's way of being stopped.
#[derive(Debug)]
struct Stop {
    token: CancellationToken,
    /// Held by the ticker while it queues a tick and by `unsubscribe` while it
    /// cancels. Without it a ticker that saw the token uncancelled could queue its
    /// tick after the reader had cancelled it and queued the `true` reply.
    sending: Mutex<()>,
}

impl Stop {
    fn stop(&self) {
        // Poisoning needs a panic while holding `()`, which nothing here can do.
        let _sending = self.sending.lock().unwrap_or_else(PoisonError::into_inner);
        self.token.cancel();
    }
}

/// A subscription to start ticking.
#[derive(Debug)]
pub(crate) struct Ticker {
    /// The id as a JSON string literal, shared by every tick it writes.
    id: Arc<str>,
    interval: Duration,
    stop: Arc<Stop>,
}

impl PartialEq for Ticker {
    /// The stop handle is not data: two tickers are the same subscription by id.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.interval == other.interval
    }
}

impl Ticker {
    /// The subscription id as a JSON string literal, the `ticks_subscribe` result.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Ticks 1, 2, 3, ... every interval, the first one interval from now, until the
    /// subscription is stopped, the connection ends or its writer is gone.
    pub(crate) async fn run(self, tx: mpsc::Sender<Message>) {
        let mut timer = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        // A client that reads slowly gets ticks late, not a burst of catch-up ticks.
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let token = &self.stop.token;
        let mut n: u64 = 0;
        loop {
            // Both futures are cancel-safe; the token first so a stopped ticker ends
            // even when a tick is due.
            tokio::select! {
                biased;
                () = token.cancelled() => return,
                _ = timer.tick() => {}
            }
            let permit = tokio::select! {
                biased;
                () = token.cancelled() => return,
                permit = tx.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            n += 1;
            let message = Message::text(tick(&self.id, n));
            let _sending = self
                .stop
                .sending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if token.is_cancelled() {
                return;
            }
            permit.send(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_defaults_and_clamps() {
        let ms = |params| interval(params).map(|d| d.as_millis());
        assert_eq!(ms(None), Some(1000));
        assert_eq!(ms(Some("[]")), Some(1000));
        assert_eq!(ms(Some("[250]")), Some(250));
        assert_eq!(ms(Some("[0]")), Some(10));
        assert_eq!(ms(Some("[99999999]")), Some(60_000));
        for bad in ["[-1]", "[1.5]", r#"["5"]"#, "[1, 2]", "5", "{}"] {
            assert_eq!(ms(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn ids_are_unique_and_the_limit_holds() {
        let mut subs = Subscriptions::new(CancellationToken::new());
        let second = Duration::from_secs(1);
        let ids: Vec<String> = (0..MAX_SUBSCRIPTIONS)
            .map(|_| subs.subscribe(second).map(|t| t.id().to_owned()))
            .collect::<Result<_, _>>()
            .expect("under the limit");
        assert_eq!(ids[0], r#""tick-1""#);
        assert_eq!(ids[1], r#""tick-2""#);
        assert_eq!(subs.subscribe(second), Err(TooMany));

        assert!(subs.unsubscribe("tick-1"));
        assert!(!subs.unsubscribe("tick-1"), "only once");
        assert!(!subs.unsubscribe("tick-999"));
        // A freed slot takes a new id; the old one stays dead.
        let next = subs.subscribe(second).expect("a slot is free");
        assert_eq!(next.id(), format!(r#""tick-{}""#, MAX_SUBSCRIPTIONS + 1));
        assert_eq!(subs.len(), MAX_SUBSCRIPTIONS);
    }

    #[test]
    fn unsubscribe_and_connection_end_stop_the_ticker() {
        let ending = CancellationToken::new();
        let mut subs = Subscriptions::new(ending.clone());
        let one = subs.subscribe(Duration::from_secs(1)).expect("a slot");
        let two = subs.subscribe(Duration::from_secs(1)).expect("a slot");
        assert!(subs.unsubscribe("tick-1"));
        assert!(one.stop.token.is_cancelled());
        assert!(!two.stop.token.is_cancelled());
        ending.cancel();
        assert!(two.stop.token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticker_counts_from_one_a_full_interval_apart() {
        let mut subs = Subscriptions::new(CancellationToken::new());
        let ticker = subs.subscribe(Duration::from_millis(100)).expect("a slot");
        let (tx, mut rx) = mpsc::channel(8);
        let start = Instant::now();
        let task = tokio::spawn(ticker.run(tx));
        for n in 1..=3u64 {
            let Some(Message::Text(text)) = rx.recv().await else {
                panic!("tick {n}");
            };
            assert_eq!(
                text.as_str(),
                format!(
                    r#"{{"jsonrpc":"2.0","method":"ticks","params":{{"subscription":"tick-1","result":{n}}}}}"#
                )
            );
            // Paused time: exact, not wall-clock.
            assert_eq!(
                start.elapsed(),
                Duration::from_millis(100) * u32::try_from(n).unwrap_or(0)
            );
        }
        assert!(subs.unsubscribe("tick-1"));
        task.await.expect("the ticker ends once unsubscribed");
    }
}
