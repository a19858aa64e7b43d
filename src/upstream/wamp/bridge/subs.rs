//! The bridge's subscription bookkeeping: the router's subscriptions and the local ids
//! that share them, when one may be closed, and the notification an EVENT becomes.

use super::{Bridge, codec, quoted};
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt::Write as _;

/// A router subscription and the local ids that share it. Kept with no local id only
/// while a SUBSCRIBE of the same topic is on its way, which the router answers with
/// this same subscription: UNSUBSCRIBE then would leave that caller with a dead one.
#[derive(Debug)]
pub(super) struct RouterSub {
    /// Topic and options: what the router keys a session's subscription by.
    pub(super) key: String,
    /// The topic as a JSON string, for the notifications.
    pub(super) topic: String,
    pub(super) locals: Vec<u64>,
}

#[derive(Debug)]
pub(super) struct Subscribing {
    pub(super) key: String,
    pub(super) topic: String,
    /// Its caller gave up: what the router opens is closed at once.
    pub(super) orphan: bool,
}

impl Bridge {
    /// The notification one EVENT is for one local subscription.
    pub(super) fn event(&self, local: u64, topic: &str, publication: u64, result: &str) -> Bytes {
        let method = quoted(&self.link.methods.event_method);
        let mut text = String::with_capacity(96 + method.len() + topic.len() + result.len());
        let _ = write!(
            text,
            r#"{{"jsonrpc":"2.0","method":{method},"params":{{"subscription":{local},"topic":{topic},"publication":{publication},"result":{result}}}}}"#
        );
        Bytes::from(text)
    }

    /// Forgets a local id; the router's subscription goes with its last one (the
    /// caller has sent, or is sending, the UNSUBSCRIBE), unless a SUBSCRIBE of its
    /// topic is on its way (see [`RouterSub`]).
    pub(super) fn drop_local(&mut self, local: u64, router: u64) {
        self.local.remove(&local);
        if let Some(sub) = self.subs.get_mut(&router) {
            sub.locals.retain(|&l| l != local);
            let awaited = awaited(&self.subscribing, &sub.key);
            if sub.locals.is_empty() && !awaited {
                self.subs.remove(&router);
            }
        }
    }

    /// UNSUBSCRIBEs every router subscription that nobody holds and no SUBSCRIBE on its
    /// way will claim: one kept for a SUBSCRIBE that was answered with another
    /// subscription or failed, or one whose caller left.
    pub(super) fn collect(&mut self) {
        let idle: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, sub)| sub.locals.is_empty() && !awaited(&self.subscribing, &sub.key))
            .map(|(&id, _)| id)
            .collect();
        for router in idle {
            self.subs.remove(&router);
            let request = self.discard_id();
            let mut text = String::with_capacity(40);
            codec::write_unsubscribe(&mut text, request, router);
            self.outbox.push(text);
        }
    }
}

/// Whether a SUBSCRIBE on its way has `key` (topic and options): the router will answer
/// it with the subscription it holds for that key.
pub(super) fn awaited(subscribing: &HashMap<u64, Subscribing>, key: &str) -> bool {
    subscribing.values().any(|p| p.key == key)
}
