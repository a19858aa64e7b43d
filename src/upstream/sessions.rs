//! `affinity = "connection"`: each session gets its own upstream WebSocket.
//!
//! A session is exactly what a client holding its own WebSocket would have: one
//! socket, so per-connection state on the service (a login) works.
//! The socket follows the session key's rendezvous order, so it reconnects to the
//! same address while that address is present; cookies its handshakes set are sent
//! again; successful calls to `replay_methods` are recorded by the dispatch pipeline
//! and replayed, in order, before the session's next call goes through.

use super::conn::Conn;
use super::set::Upstreams;
use crate::config::{SessionConfig, WhenFull};
use crate::error::Error;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest session key accepted; longer keys are refused rather than stored.
pub const MAX_KEY_LEN: usize = 256;

/// The open sessions.
pub struct Sessions {
    config: SessionConfig,
    upstreams: Arc<Upstreams>,
    /// Calls in flight per session connection at most.
    max_in_flight: usize,
    table: Mutex<HashMap<String, Session>>,
    /// When the table started: `last_used` counts milliseconds from here.
    epoch: Instant,
    shutdown: CancellationToken,
}

struct Session {
    conn: Arc<Conn>,
    token: CancellationToken,
    last_used_ms: AtomicU64,
}

impl Sessions {
    /// Creates the table and its idle sweeper.
    pub fn start(
        config: SessionConfig,
        upstreams: Arc<Upstreams>,
        max_in_flight: usize,
    ) -> Arc<Self> {
        let sessions = Arc::new(Sessions {
            config,
            upstreams,
            max_in_flight,
            table: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(sweep(
            Arc::downgrade(&sessions),
            sessions.shutdown.clone(),
            sessions.config.idle_timeout,
        ));
        sessions
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection of session `key`, opening one if needed.
    pub(crate) fn connection(&self, key: &str) -> Result<Arc<Conn>, Error> {
        let now = self.now_ms();
        let mut table = self.table.lock();
        if let Some(session) = table.get(key) {
            session.last_used_ms.store(now, Ordering::Relaxed);
            return Ok(session.conn.clone());
        }
        if table.len() >= self.config.max_sessions {
            match self.config.when_full {
                WhenFull::Reject => return Err(Error::TooManySessions(self.config.max_sessions)),
                WhenFull::Evict => {
                    // O(sessions), but only when a new session meets a full table.
                    let oldest = table
                        .iter()
                        .min_by_key(|(_, s)| s.last_used_ms.load(Ordering::Relaxed))
                        .map(|(k, _)| k.clone());
                    if let Some(old) = oldest.and_then(|k| table.remove(&k)) {
                        tracing::debug!("session table full; closing the least recently used");
                        old.token.cancel();
                    }
                }
            }
        }
        let token = self.shutdown.child_token();
        let conn = self.upstreams.session_connection(
            key.as_bytes(),
            table.len(),
            self.max_in_flight,
            self.config.max_replay,
            token.clone(),
        );
        table.insert(
            key.to_string(),
            Session {
                conn: conn.clone(),
                token,
                last_used_ms: AtomicU64::new(now),
            },
        );
        Ok(conn)
    }

    /// Closes every session's connection.
    pub fn close(&self) {
        self.shutdown.cancel();
        self.table.lock().clear();
    }

    fn sweep_idle(&self) {
        let limit = self.config.idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        self.table.lock().retain(|_, s| {
            let idle = now.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) >= limit
                && s.conn.in_flight.load(Ordering::Acquire) == 0;
            if idle {
                s.token.cancel();
            }
            !idle
        });
    }
}

/// Closes sessions idle for `idle_timeout`, checking a few times per timeout.
async fn sweep(sessions: std::sync::Weak<Sessions>, token: CancellationToken, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = token.cancelled() => return,
        }
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        sessions.sweep_idle();
    }
}

/// A new session key: 128 random bits from the operating system's CSPRNG, hex
/// encoded, so no key can be guessed from another.
pub fn new_key() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("no randomness for a session key"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_128_bit_hex_and_distinct() {
        let keys: std::collections::HashSet<String> =
            (0..1000).map(|_| new_key().unwrap()).collect();
        assert_eq!(keys.len(), 1000);
        assert!(
            keys.iter()
                .all(|k| k.len() == 32 && k.chars().all(|c| c.is_ascii_hexdigit()))
        );
    }
}
