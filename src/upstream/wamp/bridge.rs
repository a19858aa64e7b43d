//! One WAMP session seen as a JSON-RPC upstream: the frames the multiplexer queues
//! (JSON-RPC, with our ids) become WAMP messages, and the router's answers become the
//! JSON-RPC replies and notifications the multiplexer and the push hub already know.
//!
//! Translating at the socket keeps everything above it (ids, admission, failover,
//! batches, sessions, subscriptions) protocol-blind: a WAMP request id *is* our call
//! id, so a RESULT is matched exactly like a JSON-RPC reply.
//!
//! WAMP has one subscription per topic and session, and a gateway's session carries
//! many clients; so each subscribe call gets a **local** subscription id of its own,
//! events fan out to every local id of the router's subscription, and the router's
//! subscription is dropped only with its last local one. To the push hub, this looks
//! like a JSON-RPC node that hands out a fresh id per subscribe call.
//!
//! Plain data, no I/O: the socket task (`socket.rs`) feeds it frames and writes what it
//! gives back. It lives in the connection (`Conn`), so that a caller giving up
//! ([`Bridge::forget`]) can queue the CANCEL for the writer.

use super::{self as codec, CancelMode, Message, Payload, Procedures};
use crate::config::WampConfig;
use bytes::Bytes;
use params::{
    error_reply, event_topic, explain, publication, quoted, reply, result_reply,
    subscription_param, topic_and_options,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use subs::{RouterSub, Subscribing, awaited};

/// Request ids of notifications (calls whose result is discarded) start here: above
/// every call id a connection will hand out, below WAMP's 2^53.
const DISCARD_BASE: u64 = 1 << 52;

/// What a WAMP upstream is told and asked for: fixed per upstream.
#[derive(Debug, Clone)]
pub struct Link {
    pub realm: String,
    pub procedures: Procedures,
    pub auth: Option<crate::config::WampAuth>,
    /// Where `auth` is configured, for messages (`upstreams[0].wamp_auth`).
    pub auth_at: String,
    pub methods: WampConfig,
}

/// Why the router ended the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    #[error("WAMP router said GOODBYE ({0})")]
    Goodbye(String),
    #[error("WAMP router aborted the session ({0})")]
    Abort(String),
}

/// The translation state of one connection's WAMP session.
#[derive(Debug)]
pub struct Bridge {
    link: Arc<Link>,
    /// CALLs written and not answered: what a caller giving up may CANCEL.
    calls: HashSet<u64>,
    subscribing: HashMap<u64, Subscribing>,
    /// UNSUBSCRIBE request → (local id, router id).
    unsubscribing: HashMap<u64, (u64, u64)>,
    subs: HashMap<u64, RouterSub>,
    /// Local subscription id → the router's.
    local: HashMap<u64, u64>,
    /// Grows across sockets: a local id never names two subscriptions of one connection.
    next_local: u64,
    next_discard: u64,
    /// Messages the writer sends next: CANCELs, UNSUBSCRIBEs of orphans.
    outbox: Vec<String>,
    /// Whether the router announced call canceling: a CANCEL to one that did not is a
    /// protocol violation that would cost every call on the session.
    cancel: bool,
    /// The highest call id written so far. Ids reach the writer in increasing order
    /// (the multiplexer allocates and queues them in one critical section), so a
    /// caller giving up on a higher one gave up on a frame still queued.
    written: u64,
    /// Those ids: their CALL or SUBSCRIBE is not sent at all.
    forgotten: HashSet<u64>,
}

/// One element of a JSON-RPC frame the multiplexer queued.
#[derive(Deserialize)]
struct Outgoing<'a> {
    #[serde(borrow)]
    method: &'a RawValue,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<u64>,
}

impl Bridge {
    /// A session's state; local subscription ids start at `next_local`. `cancel`: the
    /// router's WELCOME announced call canceling.
    pub fn new(link: Arc<Link>, next_local: u64, cancel: bool) -> Bridge {
        Bridge {
            link,
            calls: HashSet::new(),
            subscribing: HashMap::new(),
            unsubscribing: HashMap::new(),
            subs: HashMap::new(),
            local: HashMap::new(),
            next_local,
            next_discard: DISCARD_BASE,
            outbox: Vec::new(),
            cancel,
            written: 0,
            forgotten: HashSet::new(),
        }
    }

    /// An id for a request nobody waits on.
    fn discard_id(&mut self) -> u64 {
        self.next_discard += 1;
        if self.next_discard > codec::MAX_ID {
            self.next_discard = DISCARD_BASE + 1;
        }
        self.next_discard
    }

    /// The local id the next subscription gets.
    pub fn next_local(&self) -> u64 {
        self.next_local
    }

    /// Subscriptions the router holds for this session now.
    #[cfg(test)]
    pub fn router_subscriptions(&self) -> usize {
        self.subs.len()
    }

    /// Turns one queued JSON-RPC frame (a call, a notification or a batch) into WAMP
    /// messages (`out`), and answers at once what needs no router (`local`: JSON-RPC
    /// replies, e.g. to params WAMP cannot carry).
    pub fn outbound(&mut self, frame: &str, out: &mut Vec<String>, local: &mut Vec<Bytes>) {
        let batch = frame.trim_start().starts_with('[');
        if batch {
            match serde_json::from_str::<Vec<Outgoing<'_>>>(frame) {
                Ok(calls) => {
                    for call in &calls {
                        self.one(call, out, local);
                    }
                }
                Err(e) => tracing::error!(error = %e, "a queued batch is not JSON-RPC; dropped"),
            }
        } else {
            match serde_json::from_str::<Outgoing<'_>>(frame) {
                Ok(call) => self.one(&call, out, local),
                Err(e) => tracing::error!(error = %e, "a queued frame is not JSON-RPC; dropped"),
            }
        }
    }

    fn one(&mut self, call: &Outgoing<'_>, out: &mut Vec<String>, local: &mut Vec<Bytes>) {
        let method = codec::json_str(call.method).unwrap_or(Cow::Borrowed(""));
        let request = match call.id {
            Some(id) if (1..DISCARD_BASE).contains(&id) => id,
            // Our ids start at 1 and would need 2^52 calls to get here.
            Some(id) => {
                tracing::error!(id, "a queued call's id is outside WAMP's range; dropped");
                return;
            }
            None => self.discard_id(),
        };
        let methods = &self.link.methods;
        let subscribing = *method == methods.subscribe_method;
        if call.id.is_none() && (subscribing || *method == methods.unsubscribe_method) {
            // Nobody would learn the subscription's id, and an unsubscribe must come
            // through the push hub, which checks the id is the caller's own.
            tracing::debug!(%method, "a subscribe or unsubscribe notification is not sent");
            return;
        }
        if call.id.is_some() {
            self.written = self.written.max(request);
            let forgotten = self.forgotten.remove(&request);
            if !self.forgotten.is_empty() {
                self.forgotten.retain(|&id| id > request);
            }
            if forgotten && (subscribing || !self.is_pubsub(&method)) {
                // Its caller left while it was queued: nobody waits for what it opens.
                return;
            }
        }
        let refuse = |local: &mut Vec<Bytes>, message: String| {
            if let Some(id) = call.id {
                local.push(error_reply(id, -32602, &message));
            }
        };
        let methods = &self.link.methods;
        let mut text = String::with_capacity(64 + call.params.map_or(0, |p| p.get().len()));
        if subscribing {
            let Some((topic, options)) = topic_and_options(call.params) else {
                return refuse(
                    local,
                    format!(
                        "{method}: params must be [topic] or [topic, options] or {{\"topic\": .., \"options\": {{..}}}}"
                    ),
                );
            };
            let topic = quoted(&topic);
            let options = options.map(RawValue::get);
            codec::write_subscribe(&mut text, request, options, &topic);
            self.subscribing.insert(
                request,
                Subscribing {
                    key: format!("{topic}\u{0}{}", options.unwrap_or("{}")),
                    topic,
                    orphan: false,
                },
            );
        } else if *method == methods.unsubscribe_method {
            let held =
                subscription_param(call.params).and_then(|l| Some((l, *self.local.get(&l)?)));
            let Some((local_id, router)) = held else {
                return refuse(local, format!("{method}: no such subscription"));
            };
            let shared = self
                .subs
                .get(&router)
                .is_some_and(|s| s.locals.len() > 1 || awaited(&self.subscribing, &s.key));
            if shared {
                // Other clients still read this topic, or are about to: only this
                // local id goes.
                self.drop_local(local_id, router);
                if let Some(id) = call.id {
                    local.push(result_reply(id, "true"));
                }
                return;
            }
            codec::write_unsubscribe(&mut text, request, router);
            self.unsubscribing.insert(request, (local_id, router));
        } else if *method == methods.publish_method {
            let Some((topic, payload)) = publication(call.params) else {
                return refuse(
                    local,
                    format!(
                        "{method}: params must be [topic, args..] or {{\"topic\": .., \"args\": [..], \"kwargs\": {{..}}}}"
                    ),
                );
            };
            let payload = Payload {
                args: payload.0.as_deref(),
                kwargs: payload.1,
            };
            // Acknowledged when the client waits for an answer, not when it notified.
            codec::write_publish(
                &mut text,
                request,
                call.id.is_some(),
                &quoted(&topic),
                payload,
            );
        } else {
            let Ok(payload) = codec::split_params(call.params) else {
                return refuse(local, "params must be an array or an object".into());
            };
            let mut procedure = String::with_capacity(method.len() + 16);
            if !self.link.procedures.write(&mut procedure, call.method) {
                return refuse(local, "method must be a string".into());
            }
            codec::write_call(&mut text, request, None, &procedure, payload);
            if call.id.is_some() {
                self.calls.insert(request);
            }
        }
        out.push(text);
    }

    fn is_pubsub(&self, method: &str) -> bool {
        let m = &self.link.methods;
        method == m.subscribe_method || method == m.unsubscribe_method || method == m.publish_method
    }

    /// A caller stopped waiting for `request` (timeout, client gone): a CALL still
    /// running is canceled, a subscription still opening is closed once open, and a
    /// CALL or SUBSCRIBE still queued is not sent.
    pub fn forget(&mut self, request: u64) {
        if self.calls.remove(&request) {
            if self.cancel {
                let mut text = String::with_capacity(40);
                codec::write_cancel(&mut text, request, CancelMode::KillNoWait);
                self.outbox.push(text);
            }
        } else if let Some(s) = self.subscribing.get_mut(&request) {
            s.orphan = true;
        } else if request > self.written && request < DISCARD_BASE {
            self.forgotten.insert(request);
        }
    }

    /// Moves what the writer should send next into `out`.
    pub fn take_outbox(&mut self, out: &mut Vec<String>) {
        out.append(&mut self.outbox);
    }

    pub fn has_outbox(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Turns one router frame into JSON-RPC frames for the multiplexer (`out`).
    /// `Ok(false)`: the frame was no WAMP message a caller's session expects.
    pub fn inbound(&mut self, frame: &str, out: &mut Vec<Bytes>) -> Result<bool, Ended> {
        let message = match codec::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "WAMP router sent a message we do not read; ignored");
                return Ok(false);
            }
        };
        match message {
            Message::Result {
                request, payload, ..
            } => {
                self.calls.remove(&request);
                // A call we canceled, or whose caller left, is still answered: the
                // multiplexer counts it as unmatched. A notification's is dropped.
                if request < DISCARD_BASE {
                    out.push(result_reply(request, &codec::result_json(payload)));
                }
            }
            Message::Error {
                request,
                error,
                payload,
                ..
            } => {
                self.calls.remove(&request);
                if self.subscribing.remove(&request).is_some() {
                    self.collect();
                }
                if let Some((local, router)) = self.unsubscribing.remove(&request) {
                    // The router no longer knows it either way.
                    self.drop_local(local, router);
                }
                if request < DISCARD_BASE {
                    let mut text = String::with_capacity(96 + error.len());
                    codec::write_error_object(&mut text, &error, payload);
                    out.push(reply(request, "error", &text));
                }
            }
            Message::Subscribed {
                request,
                subscription,
            } => {
                let Some(s) = self.subscribing.remove(&request) else {
                    return Ok(false);
                };
                let local = self.next_local;
                self.next_local += 1;
                let sub = self.subs.entry(subscription).or_insert_with(|| RouterSub {
                    key: s.key,
                    topic: s.topic,
                    locals: Vec::new(),
                });
                sub.locals.push(local);
                self.local.insert(local, subscription);
                if s.orphan {
                    // Left for `collect` to close, unless another caller holds it.
                    self.local.remove(&local);
                    sub.locals.retain(|&l| l != local);
                } else {
                    out.push(result_reply(request, itoa::Buffer::new().format(local)));
                }
                self.collect();
            }
            Message::Unsubscribed { request } => {
                if let Some((local, router)) = self.unsubscribing.remove(&request) {
                    self.drop_local(local, router);
                    out.push(result_reply(request, "true"));
                }
            }
            Message::Published {
                request,
                publication,
            } if request < DISCARD_BASE => out.push(result_reply(
                request,
                itoa::Buffer::new().format(publication),
            )),
            Message::Published { .. } => {}
            Message::Event {
                subscription,
                publication,
                details,
                payload,
            } => {
                let Some(sub) = self.subs.get(&subscription) else {
                    return Ok(false);
                };
                let result = codec::result_json(payload);
                // A pattern subscription's events name the topic they were published to.
                let topic = event_topic(details);
                let topic = topic.as_deref().unwrap_or(&sub.topic);
                for &local in &sub.locals {
                    out.push(self.event(local, topic, publication, &result));
                }
            }
            Message::Goodbye { reason, details } => {
                return Err(Ended::Goodbye(explain(&reason, details)));
            }
            Message::Abort { reason, details } => {
                return Err(Ended::Abort(explain(&reason, details)));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

mod params;
mod subs;

#[cfg(test)]
mod tests;
