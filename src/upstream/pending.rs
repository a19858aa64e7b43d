//! The per-connection map from our upstream ids to waiting callers.
//!
//! Plain synchronous data with no I/O, so it can be reasoned about and tested alone.
//! The connection wraps it in a mutex that is never held across an `.await`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Ids we hand out: unique on their connection for the connection's whole life, across
/// reconnects, so a late reply from an old socket can never match a newer call.
pub type CallId = u64;

/// Calls waiting for a reply on one connection.
#[derive(Debug)]
pub struct PendingMap<T> {
    /// Calls may be added only while the socket is open; closing drains the map, and a
    /// closed map refuses inserts, so no caller can slip in after the drain.
    open: bool,
    next_id: CallId,
    calls: HashMap<CallId, T, BuildHasherDefault<IdHasher>>,
}

impl<T> Default for PendingMap<T> {
    fn default() -> Self {
        PendingMap {
            open: false,
            next_id: 1,
            calls: HashMap::default(),
        }
    }
}

impl<T> PendingMap<T> {
    /// Starts accepting calls (a socket just opened).
    pub fn open(&mut self) {
        self.open = true;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Registers a call and returns its new id, or gives the value back if closed.
    pub fn insert(&mut self, value: T) -> Result<CallId, T> {
        if !self.open {
            return Err(value);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.calls.insert(id, value);
        Ok(id)
    }

    /// Takes the call a reply (or a caller giving up) refers to.
    pub fn remove(&mut self, id: CallId) -> Option<T> {
        self.calls.remove(&id)
    }

    /// Stops accepting calls and hands back every one still waiting.
    pub fn close(&mut self) -> Vec<(CallId, T)> {
        self.open = false;
        let calls = self.calls.drain().collect();
        // A burst can leave a large table behind; give the memory back while idle.
        self.calls.shrink_to(64);
        calls
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// Our ids are sequential integers: a multiplicative hash spreads them over the
/// table's control bits at a fraction of SipHash's cost, and they are not
/// attacker-chosen, so flooding is not a concern.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_map_refuses_calls() {
        let mut m = PendingMap::default();
        assert_eq!(m.insert("a"), Err("a"));
        m.open();
        assert_eq!(m.insert("a"), Ok(1));
    }

    #[test]
    fn ids_are_unique_across_reopen() {
        let mut m = PendingMap::default();
        m.open();
        let a = m.insert(1).unwrap();
        let b = m.insert(2).unwrap();
        assert_ne!(a, b);
        let drained = m.close();
        assert_eq!(drained.len(), 2);
        assert_eq!(m.len(), 0);
        m.open();
        let c = m.insert(3).unwrap();
        assert!(c > b, "ids keep increasing after a reconnect");
    }

    #[test]
    fn remove_is_exactly_once() {
        let mut m = PendingMap::default();
        m.open();
        let id = m.insert("x").unwrap();
        assert_eq!(m.remove(id), Some("x"));
        assert_eq!(m.remove(id), None);
        assert_eq!(m.remove(999), None);
    }

    #[test]
    fn churn_keeps_size_bounded() {
        let mut m = PendingMap::default();
        m.open();
        let mut live = std::collections::VecDeque::new();
        for i in 0..100_000u32 {
            live.push_back(m.insert(i).unwrap());
            if live.len() > 100 {
                let id = live.pop_front().unwrap();
                assert!(m.remove(id).is_some());
            }
        }
        assert_eq!(m.len(), 100);
    }
}
