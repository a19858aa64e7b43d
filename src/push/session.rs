//! One push session, and the one reader of its events at a time.

use super::Hub;
use super::mailbox::{Mailbox, Read};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::watch;

/// One push session.
#[derive(Debug)]
pub struct Session {
    pub key: Arc<str>,
    pub(super) mailbox: Mutex<Mailbox>,
    /// (last event id, consumer generation): a consumer wakes on either changing.
    pub(super) signal: watch::Sender<(u64, u64)>,
    pub(super) last_active_ms: AtomicU64,
    /// Consumers attached now (0 or 1; a new one replaces the old).
    pub(super) attached: AtomicUsize,
    /// The last event id written to a WebSocket client: a socket that reconnects to
    /// the session gets what came after it, not again what it already had.
    pub(super) delivered: AtomicU64,
}

impl Session {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }
}

impl Session {
    pub(super) fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// The one reader of a session's events.
pub struct Consumer {
    pub session: Arc<Session>,
    pub(super) generation: u64,
    pub(super) rx: watch::Receiver<(u64, u64)>,
    pub(super) hub: Weak<Hub>,
}

/// Why a consumer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Another stream or socket took the session over.
    Replaced,
    /// The gateway is shutting down.
    Closed,
}

impl Consumer {
    /// Events after `after`, waiting until there is at least one.
    pub async fn next(&mut self, after: Option<u64>, max: usize) -> Result<Read, Stopped> {
        loop {
            if self.rx.borrow_and_update().1 != self.generation {
                return Err(Stopped::Replaced);
            }
            let read = self.session.mailbox.lock().read(after, max);
            if !read.items.is_empty() || read.missed.is_some() {
                if let Some(hub) = self.hub.upgrade() {
                    self.session.touch(hub.now_ms());
                }
                return Ok(read);
            }
            if self.rx.changed().await.is_err() {
                return Err(Stopped::Closed);
            }
        }
    }

    /// Events after `after` right now, without waiting.
    pub fn now(&self, after: Option<u64>, max: usize) -> Read {
        self.session.mailbox.lock().read(after, max)
    }

    /// Counts `n` messages written to the client, up to event `last`.
    pub fn delivered_to(&self, n: usize, last: u64) {
        self.session.delivered.fetch_max(last, Ordering::AcqRel);
        self.delivered(n);
    }

    /// Counts `n` messages written to the client.
    pub fn delivered(&self, n: usize) {
        if let Some(hub) = self.hub.upgrade() {
            hub.metrics
                .pushed
                .with_label_values(&["delivered"])
                .inc_by(n as u64);
            self.session.touch(hub.now_ms());
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.session.attached.fetch_sub(1, Ordering::AcqRel);
        if let Some(hub) = self.hub.upgrade() {
            self.session.touch(hub.now_ms());
            hub.metrics.push_streams.dec();
        }
    }
}
