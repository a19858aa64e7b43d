//! Subscriptions on their way through the hub: a subscribe call's place in its
//! session's allowance, recording what it opened (and delivering what came before its
//! reply), unsubscribing on the right socket, and opening them again after their socket
//! died.

use super::pointer;
use super::subs::{self, Sub, SubId};
use super::{Event, Hub, gap};
use crate::config::method_matches;
use crate::dispatch::{self, Outbound, Route, Sent};
use crate::error::Error;
use crate::jsonrpc::Call;
use crate::upstream::{Backoff, Conn, ConnState, Reply};
use bytes::Bytes;
use serde_json::value::RawValue;
use std::sync::{Arc, Weak};
use tokio::time::Instant;

impl Hub {
    /// Checks a subscribe call may go ahead for `session` and holds its place in the
    /// session's allowance until it is answered.
    pub fn may_subscribe(
        self: &Arc<Self>,
        session: Option<&str>,
        method: &str,
    ) -> Result<Reservation, Error> {
        let Some(key) = session else {
            return Err(Error::NoPushTarget(
                method.to_string(),
                self.config.events_path.clone(),
            ));
        };
        let session = self.session(key)?.key.clone();
        let mut table = self.subs.lock();
        if table.of_session(&session) >= self.config.max_subscriptions {
            return Err(Error::TooManySubscriptions(self.config.max_subscriptions));
        }
        table.reserve(&session);
        Ok(Reservation {
            hub: self.clone(),
            session,
            released: false,
        })
    }

    /// A subscribe call was answered: remembers the subscription and returns the reply
    /// the client gets (its id rewritten only when the session already holds one the
    /// same, which subscriptions on different sockets can be). Notifications that came
    /// before this reply was read are delivered first, in order.
    pub fn subscribed(
        &self,
        mut reservation: Reservation,
        rule: usize,
        call: &Call<'_>,
        reply: Reply,
    ) -> Reply {
        let session = reservation.session.clone();
        let mut table = self.subs.lock();
        table.release(&session);
        reservation.released = true;
        let Some(conn) = reply.conn.clone() else {
            return reply;
        };
        if reply.is_error() {
            return reply;
        }
        let upstream_id = reply.payload().to_string();
        if self.existing(&session).is_none() {
            // Its session ended while the call was out (a WebSocket client that left):
            // nobody will ever read it, so it is closed upstream at once.
            drop(table);
            self.close_upstream(rule, &conn, &upstream_id, call.method_name().as_ref());
            return reply;
        }
        let mut prefix = String::with_capacity(call.frame_len_hint());
        call.encode_prefix(&mut prefix);
        let mut client_id = upstream_id.clone();
        let mut n = 1;
        while table.client_id_taken(&session, &client_id) {
            n += 1;
            client_id = serde_json::to_string(&format!("{}~{n}", unquoted(&upstream_id)))
                .unwrap_or_else(|_| upstream_id.clone());
        }
        let answer = match client_id == upstream_id {
            true => reply,
            false => reply.with_result(client_id.clone()),
        };
        let early = table.claim(conn.serial, &upstream_id);
        table.add(Sub {
            session: session.clone(),
            client_id: client_id.clone(),
            upstream_id,
            conn,
            rule,
            prefix,
            moving: false,
        });
        self.metrics.push_subscriptions.set(table.len() as i64);
        // Under the table's lock: the connection's reader cannot deliver a later
        // notification of this subscription before these.
        for text in early {
            let text = self.rewritten(rule, &text, &client_id);
            self.deliver(&session, Event::Message(Bytes::from(text)), false);
        }
        answer
    }

    /// `text` with the subscription id at `rule`'s pointer replaced by `client_id`.
    pub(super) fn rewritten(&self, rule: usize, text: &str, client_id: &str) -> String {
        let pointer = self
            .rules
            .get(rule)
            .map_or("/params/subscription", |r| r.id_pointer.as_str());
        match pointer::find(text, pointer) {
            Some(at) if text[at.clone()] != *client_id => pointer::splice(text, at, client_id),
            _ => text.to_string(),
        }
    }

    /// What an unsubscribe call with these params is to rpcgate.
    pub fn unsubscribe_target(
        &self,
        session: Option<&str>,
        params: Option<&RawValue>,
    ) -> Unsubscribe {
        let (Some(session), Some(first)) = (session, pointer::first_param(params)) else {
            return Unsubscribe::NotHeld;
        };
        let session: Arc<str> = Arc::from(session);
        let mut table = self.subs.lock();
        let Some(id) = table.by_client(&session, first.get()) else {
            return Unsubscribe::NotHeld;
        };
        let Some(sub) = table.get(id) else {
            return Unsubscribe::NotHeld;
        };
        if sub.moving {
            // Its socket is gone and the new one is not open yet: nothing to tell the
            // upstream; a re-subscribe already sent closes what it opens (`moved`).
            table.cancel(id);
            self.metrics.push_subscriptions.set(table.len() as i64);
            return Unsubscribe::Moving;
        }
        let Some(params) = params.map(RawValue::get) else {
            return Unsubscribe::NotHeld;
        };
        let start = first.get().as_ptr() as usize - params.as_ptr() as usize;
        let rewritten = pointer::splice(params, start..start + first.get().len(), &sub.upstream_id);
        Unsubscribe::Held {
            id,
            conn: sub.conn.clone(),
            params: rewritten,
        }
    }

    /// The client unsubscribed (whatever the upstream said: it asked to stop).
    pub fn unsubscribed(&self, id: SubId) {
        let mut table = self.subs.lock();
        table.remove(id);
        self.metrics.push_subscriptions.set(table.len() as i64);
    }

    /// The session a subscription notification is for, with the id the client holds;
    /// or kept for a while, when its id is not recorded yet.
    pub(super) fn subscription_event(&self, conn: &Conn, method: &str, text: &str) -> Routed {
        for rule in &self.rules {
            if rule
                .notification
                .as_deref()
                .is_some_and(|n| !method_matches(n, method))
            {
                continue;
            }
            let Some(at) = pointer::find(text, &rule.id_pointer) else {
                continue;
            };
            let upstream_id = &text[at.clone()];
            let mut table = self.subs.lock();
            let Some(sub) = table.by_upstream(conn.serial, upstream_id) else {
                // The subscribe call's reply may still be on its way to its caller
                // (or its connection's replacement): keep it, under the same lock
                // `subscribed` and `moved` record subscriptions with.
                let expired = table.park(subs::Parked {
                    at: Instant::now(),
                    serial: conn.serial,
                    upstream_id: upstream_id.to_string(),
                    text: text.to_string(),
                    owner: conn.owner.clone(),
                });
                return Routed::Parked(expired);
            };
            let out = match sub.client_id == sub.upstream_id {
                true => text.to_string(),
                false => pointer::splice(text, at, &sub.client_id),
            };
            return Routed::To(sub.session.clone(), out);
        }
        Routed::No
    }

    /// Subscription `id` was opened again with `reply`; if the client unsubscribed
    /// meanwhile, what was opened is closed again.
    pub(super) fn moved(&self, id: SubId, reply: &Reply) {
        let Some(conn) = reply.conn.clone() else {
            return;
        };
        let upstream_id = reply.payload().to_string();
        let mut table = self.subs.lock();
        if let Some((rule, prefix)) = table.take_cancelled(id) {
            drop(table);
            let subscribe = method_of(&prefix).and_then(|m| serde_json::from_str::<String>(m).ok());
            self.close_upstream(
                rule,
                &conn,
                &upstream_id,
                subscribe.as_deref().unwrap_or(""),
            );
            return;
        }
        if table.get(id).is_none() {
            return;
        }
        table.moved(id, conn.clone(), upstream_id.clone());
        let early = table.claim(conn.serial, &upstream_id);
        let Some(sub) = table.get(id) else { return };
        let (session, client_id, rule) = (sub.session.clone(), sub.client_id.clone(), sub.rule);
        self.metrics.resubscribed.with_label_values(&["ok"]).inc();
        if self.existing(&session).is_none() {
            return;
        }
        // A session's own socket announced its gap when it dropped (`lost`).
        if conn.owner.is_none() {
            self.deliver(&session, gap("upstream_reconnected"), false);
        }
        for text in early {
            let text = self.rewritten(rule, &text, &client_id);
            self.deliver(&session, Event::Message(Bytes::from(text)), false);
        }
    }

    /// Closes `upstream_id` on `conn` with `rule`'s unsubscribe method, in the
    /// background (`subscribe` names the method that opened it, for pattern rules).
    pub(super) fn close_upstream(
        &self,
        rule: usize,
        conn: &Arc<Conn>,
        upstream_id: &str,
        subscribe: &str,
    ) {
        let Some(unsubscribe) = self.unsubscribe_method(rule, subscribe) else {
            return;
        };
        let prefix = crate::upstream::prefix_for(&unsubscribe, Some(&format!("[{upstream_id}]")));
        let (upstreams, conn, timeout) =
            (self.upstreams.clone(), conn.clone(), self.request_timeout);
        tokio::spawn(async move {
            let Some(upstreams) = upstreams.upgrade() else {
                return;
            };
            let deadline = Instant::now() + timeout;
            let msg = Outbound::Session { prefix: &prefix };
            if let Err(e) = dispatch::send(&upstreams, msg, Route::Own(&conn), None, deadline).await
            {
                tracing::debug!(error = %e, "closing a subscription nobody holds failed");
            }
        });
    }

    /// The unsubscribe method of `rule`: a pattern's is derived from the subscribe
    /// method (`chain_subscribeNewHeads` → `chain_unsubscribeNewHeads`).
    pub(super) fn unsubscribe_method(&self, rule: usize, subscribe: &str) -> Option<String> {
        let rule = self.rules.get(rule)?;
        match rule.unsubscribe.contains('*') {
            false => Some(rule.unsubscribe.clone()),
            true if subscribe.contains("subscribe") => {
                Some(subscribe.replacen("subscribe", "unsubscribe", 1))
            }
            true => None,
        }
    }
}

/// A subscribe call's place in its session's allowance, from before it is sent until
/// its answer is recorded (or it fails, or its caller goes away).
pub struct Reservation {
    hub: Arc<Hub>,
    session: Arc<str>,
    released: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.released {
            self.hub.subs.lock().release(&self.session);
        }
    }
}

/// What an unsubscribe call is, to rpcgate.
#[derive(Debug)]
pub enum Unsubscribe {
    /// A subscription of this session: send it to `conn` with these params.
    Held {
        id: SubId,
        conn: Arc<Conn>,
        params: String,
    },
    /// A subscription of this session whose socket died: closed once it is back.
    Moving,
    /// Not one this session holds.
    NotHeld,
}

/// Where a subscription notification goes.
pub(super) enum Routed {
    To(Arc<str>, String),
    /// Kept until its subscription is recorded; these others expired meanwhile.
    Parked(Vec<subs::Parked>),
    No,
}

/// The raw `method` of a frame prefix made by `Call::encode_prefix`.
pub(super) fn method_of(prefix: &str) -> Option<&str> {
    let start = prefix.find(r#""method":"#)? + r#""method":"#.len();
    let rest = &prefix[start..];
    let end = rest[1..].find('"')? + 2;
    Some(&rest[..end])
}

/// A JSON string's contents without its quotes (other values as they are).
fn unquoted(raw: &str) -> String {
    serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
}

/// Opens subscription `id` again, until it works or nobody needs it any more.
pub(super) async fn resubscribe(hub: Weak<Hub>, id: SubId) {
    let mut backoff = None;
    for _ in 0..1000 {
        let Some(strong) = hub.upgrade() else { return };
        let found = {
            let mut table = strong.subs.lock();
            let found = table.get(id).map(|s| (s.prefix.clone(), s.conn.clone()));
            if found.is_none() {
                // Unsubscribed (or its session ended) while there was no socket:
                // nothing was opened, so nothing to close.
                table.take_cancelled(id);
            }
            found
        };
        let Some((prefix, conn)) = found else {
            return;
        };
        let Some(upstreams) = strong.upstreams.upgrade() else {
            return;
        };
        // A session's own socket reconnects by itself: the subscription goes back on
        // it. A shared one goes to any open connection.
        let route = match conn.owner.is_some() {
            true => Route::Own(&conn),
            false => Route::Any,
        };
        if conn.owner.is_some() && conn.state() == ConnState::Stopped {
            strong.unsubscribed(id);
            return;
        }
        let deadline = Instant::now() + strong.request_timeout;
        match dispatch::send(
            &upstreams,
            Outbound::Session { prefix: &prefix },
            route,
            None,
            deadline,
        )
        .await
        {
            Ok(Sent::Reply(reply)) if !reply.is_error() => {
                strong.moved(id, &reply);
                return;
            }
            Ok(Sent::Reply(reply)) => {
                tracing::warn!(
                    error = reply.payload(),
                    "re-subscribing was refused by the upstream"
                );
                strong
                    .metrics
                    .resubscribed
                    .with_label_values(&["failed"])
                    .inc();
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "re-subscribing failed; trying again"),
        }
        let (base, max) = strong.backoff;
        drop(strong);
        let delay = backoff
            .get_or_insert_with(|| Backoff::new(base, max))
            .next_delay();
        tokio::time::sleep(delay).await;
    }
}
