//! Who holds which subscription: the id the client knows, the id the upstream uses
//! now, the connection it lives on, and the call that opened it (to open it again
//! after that connection dies).
//!
//! Plain data under the hub's lock. The client's id is fixed for the subscription's
//! life; the upstream's id and connection change each time it is re-established.

use crate::upstream::Conn;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Notifications for a subscription id nobody holds yet, kept at most this long: the
/// upstream may notify before the subscribe call's reply has been read by its caller.
pub const PARK_FOR: Duration = Duration::from_secs(10);
/// Such notifications kept at most, over all connections.
pub const MAX_PARKED: usize = 1024;

pub type SubId = u64;

#[derive(Debug)]
pub struct Sub {
    pub session: Arc<str>,
    /// The id as the client got it (raw JSON).
    pub client_id: String,
    /// The id the upstream uses now (raw JSON).
    pub upstream_id: String,
    pub conn: Arc<Conn>,
    /// Index of the `[[subscriptions]]` rule it came by.
    pub rule: usize,
    /// The subscribe call's frame without its id, to send again.
    pub prefix: String,
    /// Its connection died and it is being opened again.
    pub moving: bool,
}

/// A notification waiting for its subscription to be recorded.
#[derive(Debug)]
pub struct Parked {
    pub at: Instant,
    pub serial: u64,
    pub upstream_id: String,
    pub text: String,
    /// The connection's session, for an own socket: what expires goes there as it is.
    pub owner: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub struct Table {
    next: SubId,
    subs: HashMap<SubId, Sub>,
    by_upstream: HashMap<(u64, String), SubId>,
    by_client: HashMap<(Arc<str>, String), SubId>,
    per_session: HashMap<Arc<str>, usize>,
    /// Subscribe calls on their way, per session: they count against its allowance.
    pending: HashMap<Arc<str>, usize>,
    parked: VecDeque<Parked>,
    /// Subscriptions the client closed while they were moving, with their rule and
    /// subscribe frame: a re-subscribe already sent must close what it opens.
    cancelled: HashMap<SubId, (usize, String)>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Subscriptions `session` holds or has on their way.
    pub fn of_session(&self, session: &str) -> usize {
        self.per_session.get(session).copied().unwrap_or(0)
            + self.pending.get(session).copied().unwrap_or(0)
    }

    /// A subscribe call of `session` is on its way.
    pub fn reserve(&mut self, session: &Arc<str>) {
        *self.pending.entry(session.clone()).or_default() += 1;
    }

    /// ... and has been answered (or given up).
    pub fn release(&mut self, session: &str) {
        if let Some(n) = self.pending.get_mut(session) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(session);
            }
        }
    }

    /// Keeps a notification for an id not recorded yet. Returns what no longer fits
    /// or waited too long.
    pub fn park(&mut self, parked: Parked) -> Vec<Parked> {
        let mut out = self.expire(parked.at);
        if self.parked.len() >= MAX_PARKED {
            out.extend(self.parked.pop_front());
        }
        self.parked.push_back(parked);
        out
    }

    /// Notifications that waited longer than [`PARK_FOR`].
    pub fn expire(&mut self, now: Instant) -> Vec<Parked> {
        let mut out = Vec::new();
        while self
            .parked
            .front()
            .is_some_and(|p| now.duration_since(p.at) > PARK_FOR)
        {
            out.extend(self.parked.pop_front());
        }
        out
    }

    /// The notifications kept for `upstream_id` on connection `serial`, oldest first.
    pub fn claim(&mut self, serial: u64, upstream_id: &str) -> Vec<String> {
        if self.parked.is_empty() {
            return Vec::new();
        }
        let (mine, rest): (VecDeque<Parked>, VecDeque<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.serial == serial && p.upstream_id == upstream_id);
        self.parked = rest;
        mine.into_iter().map(|p| p.text).collect()
    }

    /// The client closed moving subscription `id`: forgotten now, remembered only
    /// for the re-subscribe on its way.
    pub fn cancel(&mut self, id: SubId) {
        if let Some(sub) = self.remove(id) {
            self.cancelled.insert(id, (sub.rule, sub.prefix));
        }
    }

    /// Whether `id` was cancelled while moving (and forgets that it was).
    pub fn take_cancelled(&mut self, id: SubId) -> Option<(usize, String)> {
        self.cancelled.remove(&id)
    }

    /// Whether `session` already holds a subscription the client knows as `client_id`.
    pub fn client_id_taken(&self, session: &Arc<str>, client_id: &str) -> bool {
        self.by_client
            .contains_key(&(session.clone(), client_id.to_string()))
    }

    pub fn add(&mut self, sub: Sub) -> SubId {
        self.next += 1;
        let id = self.next;
        self.by_upstream
            .insert((sub.conn.serial, sub.upstream_id.clone()), id);
        self.by_client
            .insert((sub.session.clone(), sub.client_id.clone()), id);
        *self.per_session.entry(sub.session.clone()).or_default() += 1;
        self.subs.insert(id, sub);
        id
    }

    pub fn get(&self, id: SubId) -> Option<&Sub> {
        self.subs.get(&id)
    }

    pub fn remove(&mut self, id: SubId) -> Option<Sub> {
        let sub = self.subs.remove(&id)?;
        self.by_upstream
            .remove(&(sub.conn.serial, sub.upstream_id.clone()));
        self.by_client
            .remove(&(sub.session.clone(), sub.client_id.clone()));
        if let Some(n) = self.per_session.get_mut(&sub.session) {
            *n -= 1;
            if *n == 0 {
                self.per_session.remove(&sub.session);
            }
        }
        Some(sub)
    }

    /// The subscription a notification on connection `serial` with `upstream_id` is for.
    pub fn by_upstream(&self, serial: u64, upstream_id: &str) -> Option<&Sub> {
        let id = self.by_upstream.get(&(serial, upstream_id.to_string()))?;
        self.subs.get(id)
    }

    pub fn by_client(&self, session: &Arc<str>, client_id: &str) -> Option<SubId> {
        self.by_client
            .get(&(session.clone(), client_id.to_string()))
            .copied()
    }

    /// Marks every subscription on connection `serial` as moving, and returns them.
    pub fn lost_connection(&mut self, serial: u64) -> Vec<SubId> {
        let lost: Vec<SubId> = self
            .subs
            .iter()
            .filter(|(_, s)| s.conn.serial == serial && !s.moving)
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            if let Some(sub) = self.subs.get_mut(id) {
                sub.moving = true;
                self.by_upstream
                    .remove(&(sub.conn.serial, sub.upstream_id.clone()));
            }
        }
        lost
    }

    /// Subscription `id` lives on `conn` as `upstream_id` now.
    pub fn moved(&mut self, id: SubId, conn: Arc<Conn>, upstream_id: String) -> bool {
        let Some(sub) = self.subs.get_mut(&id) else {
            return false;
        };
        self.by_upstream
            .remove(&(sub.conn.serial, sub.upstream_id.clone()));
        sub.conn = conn;
        sub.upstream_id = upstream_id;
        sub.moving = false;
        self.by_upstream
            .insert((sub.conn.serial, sub.upstream_id.clone()), id);
        true
    }

    /// Every subscription of `session`, removed.
    pub fn end_session(&mut self, session: &str) -> Vec<Sub> {
        let ids: Vec<SubId> = self
            .subs
            .iter()
            .filter(|(_, s)| &*s.session == session)
            .map(|(id, _)| *id)
            .collect();
        let mut ended = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(sub) = self.remove(id) {
                if sub.moving {
                    self.cancelled.insert(id, (sub.rule, sub.prefix.clone()));
                }
                ended.push(sub);
            }
        }
        ended
    }
}
