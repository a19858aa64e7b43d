//! Every kind of message the gateway sends upstream, as one enum.
//!
//! Each kind says how many slots it takes, how many replies it waits for, whether a
//! lost one may be sent again, and how its frame is written once the connection has
//! given it ids. The push work adds its kinds here (subscriptions, answers to an
//! upstream's requests), and they get admission, failover and metrics for free.

use crate::jsonrpc::{Call, finish_frame};
use crate::upstream::CallId;

/// Gateway-made calls a fresh socket runs before it carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prelude {
    OnConnect,
    Replay,
}

/// One message to an upstream.
#[derive(Debug, Clone, Copy)]
pub enum Outbound<'a> {
    /// A client's call: one reply.
    Call(&'a Call<'a>),
    /// A client's notification: queued, nobody waits.
    Notification(&'a Call<'a>),
    /// A client's batch forwarded as one frame (`batch = "forward"`): a reply per
    /// element with an id.
    Batch(&'a [Call<'a>]),
    /// `health_method`; `prefix` is the frame without its id.
    Health { prefix: &'a str },
    /// An `on_connect` or replayed call on a preparing socket.
    Prelude { kind: Prelude, prefix: &'a str },
    /// A call rpcgate makes for a push session: subscribing again after the socket
    /// that held a subscription died, unsubscribing when the session ends.
    Session { prefix: &'a str },
    /// A client's (or rpcgate's) response to a request the upstream sent: written as
    /// it is, with the upstream's own id; nobody waits.
    Answer { text: &'a str },
}

impl Outbound<'_> {
    /// Slots it holds on its connection while in flight. A notification holds one only
    /// until it is queued.
    pub fn slots(&self) -> usize {
        match self {
            Outbound::Batch(calls) => calls.len().max(1),
            _ => 1,
        }
    }

    /// Replies it waits for.
    pub fn expecting(&self) -> usize {
        match self {
            Outbound::Notification(_) | Outbound::Answer { .. } => 0,
            Outbound::Batch(calls) => calls.iter().filter(|c| !c.is_notification()).count(),
            _ => 1,
        }
    }

    /// Client calls in it, for the in-flight gauge and the call counters.
    pub fn client_calls(&self) -> usize {
        match self {
            Outbound::Call(_) | Outbound::Notification(_) => 1,
            Outbound::Batch(calls) => calls.len(),
            Outbound::Health { .. }
            | Outbound::Prelude { .. }
            | Outbound::Session { .. }
            | Outbound::Answer { .. } => 0,
        }
    }

    /// Whether a preparing socket takes it.
    pub fn is_prelude(&self) -> bool {
        matches!(self, Outbound::Prelude { .. })
    }

    /// The method, when it is a single client call.
    pub fn call(&self) -> Option<&Call<'_>> {
        match self {
            Outbound::Call(call) => Some(call),
            _ => None,
        }
    }

    /// The whole frame, given the ids of the calls that wait (in order).
    pub fn encode(&self, ids: &[CallId]) -> String {
        match self {
            Outbound::Call(call) | Outbound::Notification(call) => {
                let mut text = String::with_capacity(call.frame_len_hint());
                call.encode_prefix(&mut text);
                finish_frame(&mut text, ids.first().copied());
                text
            }
            Outbound::Batch(calls) => {
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
            }
            Outbound::Answer { text } => text.to_string(),
            Outbound::Health { prefix }
            | Outbound::Prelude { prefix, .. }
            | Outbound::Session { prefix } => {
                let mut text = String::with_capacity(prefix.len() + 24);
                text.push_str(prefix);
                finish_frame(&mut text, ids.first().copied());
                text
            }
        }
    }
}
