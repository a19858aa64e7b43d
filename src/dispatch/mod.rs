//! The one way into an upstream socket.
//!
//! Every message the gateway sends upstream (a client's call, notification or
//! forwarded batch, a health check, an `on_connect` or replayed call) is an
//! [`Outbound`] value that goes through [`send`]:
//!
//! 1. **admission** (`admission.rs`): a slot on a connection, or a bounded wait for
//!    one (`connect_wait`, `queue_timeout`, the waiting room);
//! 2. **pick** (`select.rs`): the candidate upstreams in order for the [`Route`],
//!    then the least-loaded open connection with room;
//! 3. **submit** (`upstream/mux.rs`): new ids from the connection's pending map, the
//!    frame finished with them and queued, in one critical section;
//! 4. **await** the replies until the deadline;
//! 5. **failover**: a frame that never reached its socket goes elsewhere; a call
//!    written when its socket died is sent again only if its method is in
//!    `retry_methods`, so a non-idempotent call never runs twice;
//! 6. **metrics**: every client call counted once, here, whatever path it came by.

mod admission;
mod outbound;
mod route;
mod select;

pub use outbound::{Outbound, Prelude};
pub use route::{OwnedRoute, Route};

use crate::budget::Budgets;
use crate::error::{Busy, Error, rounded};
use crate::metrics::Metrics;
use crate::upstream::{
    CallId, Conn, Failure, FrameIds, PreludeCall, Refused, Reply, ReplySenders, Upstreams,
};
use smallvec::SmallVec;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};

/// What a message got back.
#[derive(Debug)]
pub enum Sent {
    /// A notification, on an open connection's queue.
    Queued,
    /// The reply to a single call.
    Reply(Reply),
    /// One answer per batch element with an id, in order.
    Batch(Vec<Result<Reply, Error>>),
}

/// Sends `msg` where `route` allows and waits for its replies until `deadline`. The
/// frame counts against `payer`'s memory budget until it is written (a client's
/// message; the gateway's own health and prelude calls have no payer).
pub async fn send(
    upstreams: &Upstreams,
    msg: Outbound<'_>,
    route: Route<'_>,
    payer: Option<&Budgets>,
    deadline: Instant,
) -> Result<Sent, Error> {
    let started = Instant::now();
    let calls = msg.client_calls();
    let to = Target { route, payer };
    if calls == 0 {
        return deliver(upstreams, &msg, to, deadline, started).await;
    }
    let metrics = &upstreams.signals.metrics;
    // Counted down even when the client goes away and this future is dropped.
    let _in_flight = InFlight::enter(metrics, calls);
    let sent = deliver(upstreams, &msg, to, deadline, started).await;
    count(metrics, &msg, &sent, started.elapsed());
    if let (Route::Own(conn), Outbound::Call(call), Ok(Sent::Reply(reply))) = (route, msg, &sent) {
        record_replay(upstreams, conn, call, reply);
    }
    sent
}

/// Where a message goes and who pays for its frame.
#[derive(Clone, Copy)]
struct Target<'a> {
    route: Route<'a>,
    payer: Option<&'a Budgets>,
}

/// Admission, pick, submit, await and failover, until an answer or a final failure.
async fn deliver(
    upstreams: &Upstreams,
    msg: &Outbound<'_>,
    Target { route, payer }: Target<'_>,
    deadline: Instant,
    started: Instant,
) -> Result<Sent, Error> {
    let mut waits = admission::Waits::default();
    let mut avoid = None;
    loop {
        let permit =
            admission::reserve(upstreams, msg, route, avoid.as_ref(), deadline, &mut waits).await?;
        let (senders, receivers): (ReplySenders, SmallVec<[_; 1]>) =
            (0..msg.expecting()).map(|_| oneshot::channel()).unzip();
        let ids = match permit
            .conn
            .submit(msg.is_prelude(), payer, senders, |ids| msg.encode(ids))
        {
            Ok(ids) => ids,
            // Closed between the pick and the submit: pick again.
            Err(Refused::Closed) => continue,
            Err(Refused::Full) => return Err(Error::Overloaded(Busy::UpstreamNotReading)),
            Err(Refused::Memory) => return Err(Error::Overloaded(Busy::Memory)),
        };
        let mut ticket = Ticket {
            conn: &permit.conn,
            ids,
            settled: false,
        };
        let label = permit.upstream.as_ref().map(|u| u.label.clone());
        let (mut not_sent, mut lost, mut timed_out) = (false, false, false);
        let mut answers: SmallVec<[_; 1]> = SmallVec::with_capacity(receivers.len());
        for rx in receivers {
            answers.push(match timeout_at(deadline, rx).await {
                Err(_) => {
                    timed_out = true;
                    Err(Error::Timeout(rounded(started.elapsed())))
                }
                Ok(Ok(Ok(mut reply))) => {
                    reply.upstream = label.clone();
                    reply.conn = Some(permit.conn.clone());
                    Ok(reply)
                }
                Ok(Ok(Err(Failure::NotSent))) => {
                    not_sent = true;
                    Err(Error::UpstreamLost)
                }
                Ok(Ok(Err(Failure::InvalidReply))) => Err(Error::InvalidUpstreamReply),
                Ok(Ok(Err(Failure::Lost)) | Err(_)) => {
                    lost = true;
                    Err(Error::UpstreamLost)
                }
            });
        }
        // Every entry still pending is the connection's to drop, unless one timed out.
        ticket.settled = !timed_out;
        // A frame reaches its socket whole or not at all: nothing of it ran.
        if not_sent || (lost && retryable(upstreams, msg)) {
            avoid = permit.upstream.clone();
            continue;
        }
        return match msg {
            Outbound::Notification(_) | Outbound::Answer { .. } => Ok(Sent::Queued),
            Outbound::Batch(_) => Ok(Sent::Batch(answers.into_vec())),
            _ => match answers.pop() {
                Some(Ok(reply)) => Ok(Sent::Reply(reply)),
                Some(Err(e)) => Err(e),
                None => Err(Error::Internal(
                    "a call was sent without waiting for its reply",
                )),
            },
        };
    }
}

/// A call written when its connection died may run twice if sent again: only methods
/// the operator listed as idempotent are.
fn retryable(upstreams: &Upstreams, msg: &Outbound<'_>) -> bool {
    let methods = &upstreams.retry_methods;
    !methods.is_empty()
        && msg
            .call()
            .is_some_and(|call| methods.contains(call.method_name().as_ref()))
}

/// Keeps a session's successful `replay_methods` call, to run again after a reconnect.
fn record_replay(
    upstreams: &Upstreams,
    conn: &Conn,
    call: &crate::jsonrpc::Call<'_>,
    reply: &Reply,
) {
    let methods = &upstreams.replay_methods;
    if reply.is_error() || methods.is_empty() || !conn.records_replay() {
        return;
    }
    let method = call.method_name();
    if methods.contains(method.as_ref()) {
        let mut prefix = String::with_capacity(call.frame_len_hint());
        call.encode_prefix(&mut prefix);
        conn.record_replay(PreludeCall {
            method: method.into_owned(),
            prefix,
        });
    }
}

/// Forgets a message's calls on its connection if its caller stops waiting first
/// (timeout, or the HTTP client went away and dropped us).
struct Ticket<'a> {
    conn: &'a Conn,
    ids: FrameIds,
    /// Every reply arrived (or the connection answered for them): nothing to forget.
    settled: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let ids: &[CallId] = self.ids.as_slice();
        if !self.settled && !ids.is_empty() {
            self.conn.forget(ids);
        }
    }
}

/// The in-flight gauge's share of one message.
struct InFlight<'a> {
    metrics: &'a Metrics,
    calls: i64,
}

impl<'a> InFlight<'a> {
    fn enter(metrics: &'a Metrics, calls: usize) -> InFlight<'a> {
        let calls = calls as i64;
        metrics.in_flight.add(calls);
        InFlight { metrics, calls }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.sub(self.calls);
    }
}

/// The `outcome` label of one call's answer.
fn outcome(answer: &Result<Reply, Error>) -> &'static str {
    match answer {
        Ok(reply) if reply.is_error() => "rpc_error",
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

/// Counts each client call of `msg` once, with its own outcome and the message's latency.
fn count(metrics: &Metrics, msg: &Outbound<'_>, sent: &Result<Sent, Error>, took: Duration) {
    match (msg, sent) {
        (Outbound::Call(call), Ok(Sent::Reply(reply))) => {
            let outcome = if reply.is_error() { "rpc_error" } else { "ok" };
            metrics.call_done(&call.method_name(), outcome, took)
        }
        (Outbound::Batch(calls), Ok(Sent::Batch(answers))) => {
            let mut answers = answers.iter();
            for call in calls.iter() {
                let outcome = match call.is_notification() {
                    true => "ok",
                    false => answers.next().map_or("internal", outcome),
                };
                metrics.call_done(&call.method_name(), outcome, took);
            }
        }
        (Outbound::Call(call) | Outbound::Notification(call), Ok(_)) => {
            metrics.call_done(&call.method_name(), "ok", took)
        }
        (Outbound::Call(call) | Outbound::Notification(call), Err(e)) => {
            metrics.call_done(&call.method_name(), e.kind(), took)
        }
        (Outbound::Batch(calls), Err(e)) => {
            for call in calls.iter() {
                metrics.call_done(&call.method_name(), e.kind(), took);
            }
        }
        (Outbound::Batch(_), Ok(_))
        | (
            Outbound::Health { .. }
            | Outbound::Prelude { .. }
            | Outbound::Session { .. }
            | Outbound::Answer { .. },
            _,
        ) => {}
    }
}
