//! The memory budget: bytes held on behalf of clients, counted where they are taken and
//! given back when their owner goes away.
//!
//! Counting how *many* things are held (calls per connection, callers waiting) does not
//! bound memory: 800 calls of 1 MB are 800 MB. So every buffer a client can make
//! rpcgate hold is charged, in bytes, to two budgets at once: the client connection's
//! own (`limits.connection_bytes`) and the gateway's (`limits.memory`). New work that
//! does not fit is refused at once with 503, before it is read or queued; a [`Charge`]
//! gives its bytes back when dropped, however its owner ends (answered, timed out,
//! client gone).
//!
//! What is charged: request bodies as they are read (`server/rpc.rs`) and answers until
//! the client has taken them (`server/response.rs`). Answers are charged with
//! [`Charge::force`]: the call already ran, so its answer is never thrown away; being
//! over budget then refuses the *next* request instead. Frames waiting for an upstream
//! socket are bounded per connection by `limits.upstream_queue_bytes` (`upstream/mux.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One pool of bytes with a limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes charged right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` bytes if they fit under the limit.
    fn take(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&next| next <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes held against a connection's budget and the gateway's, given back on drop.
#[derive(Debug)]
pub struct Charge {
    connection: Arc<Budget>,
    gateway: Arc<Budget>,
    bytes: usize,
}

/// The two budgets a client connection's buffers count against.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub connection: Arc<Budget>,
    pub gateway: Arc<Budget>,
}

impl Budgets {
    /// A connection of its own with `limit` bytes, inside `gateway`.
    pub fn for_connection(gateway: &Arc<Budget>, limit: usize) -> Budgets {
        Budgets {
            connection: Budget::new(limit),
            gateway: gateway.clone(),
        }
    }

    /// An empty charge, to grow as bytes arrive.
    pub fn empty(&self) -> Charge {
        Charge {
            connection: self.connection.clone(),
            gateway: self.gateway.clone(),
            bytes: 0,
        }
    }

    /// `n` bytes if both budgets have room; `None` means "refuse this work".
    pub fn charge(&self, n: usize) -> Option<Charge> {
        let mut charge = self.empty();
        charge.grow(n).then_some(charge)
    }

    /// `n` bytes whether or not they fit: for what must not be dropped (an answer to a
    /// call that already ran). Going over makes the next [`Budgets::charge`] fail.
    pub fn force(&self, n: usize) -> Charge {
        self.connection.used.fetch_add(n, Ordering::AcqRel);
        self.gateway.used.fetch_add(n, Ordering::AcqRel);
        Charge {
            connection: self.connection.clone(),
            gateway: self.gateway.clone(),
            bytes: n,
        }
    }

    /// Whether both budgets are under their limits: new work may start.
    pub fn has_room(&self) -> bool {
        self.connection.used() < self.connection.limit && self.gateway.used() < self.gateway.limit
    }
}

impl Charge {
    /// Adds `n` bytes if both budgets have room; on `false` nothing was added.
    pub fn grow(&mut self, n: usize) -> bool {
        if !self.connection.take(n) {
            return false;
        }
        if !self.gateway.take(n) {
            self.connection.give_back(n);
            return false;
        }
        self.bytes += n;
        true
    }

    /// Gives `n` of the charged bytes back (at most all of them).
    pub fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.connection.give_back(n);
        self.gateway.give_back(n);
        self.bytes -= n;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.connection.give_back(self.bytes);
            self.gateway.give_back(self.bytes);
        }
    }
}

/// The default gateway budget: a quarter of the memory the process may use (its
/// cgroup's limit, as containers set it), or 256 MiB when there is no limit.
pub fn default_memory_limit() -> usize {
    const FALLBACK: usize = 256 * 1024 * 1024;
    cgroup_memory_limit().map_or(FALLBACK, |limit| (limit / 4).max(16 * 1024 * 1024))
}

/// The cgroup memory limit, v2 first, then v1; `None` when unlimited or unknown.
fn cgroup_memory_limit() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let parse = |text: String| text.trim().parse::<u64>().ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .and_then(parse)
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes").and_then(parse))?;
    // cgroup v1 says "unlimited" with a number near u64::MAX.
    (limit < (1u64 << 60)).then(|| usize::try_from(limit).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_takes_from_both_budgets_and_gives_back_on_drop() {
        let gateway = Budget::new(100);
        let a = Budgets::for_connection(&gateway, 60);
        let b = Budgets::for_connection(&gateway, 60);
        let held = a.charge(50).unwrap();
        assert_eq!((a.connection.used(), gateway.used()), (50, 50));
        // The connection's own limit: a's second charge does not fit, b's does.
        assert!(a.charge(20).is_none());
        let other = b.charge(40).unwrap();
        // The gateway's limit: 90 of 100 used.
        assert!(b.charge(15).is_none());
        assert_eq!(
            b.connection.used(),
            40,
            "a refused charge leaves nothing behind"
        );
        drop(held);
        drop(other);
        assert_eq!(
            (a.connection.used(), b.connection.used(), gateway.used()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_growing_charge_stops_at_the_limit_and_keeps_what_it_had() {
        let gateway = Budget::new(1000);
        let conn = Budgets::for_connection(&gateway, 100);
        let mut body = conn.empty();
        assert!(body.grow(60));
        assert!(!body.grow(60));
        assert_eq!(body.bytes(), 60);
        assert_eq!(gateway.used(), 60);
        drop(body);
        assert_eq!(gateway.used(), 0);
    }

    #[test]
    fn a_forced_charge_goes_over_and_refuses_the_next_work_until_it_is_gone() {
        let gateway = Budget::new(100);
        let conn = Budgets::for_connection(&gateway, 1000);
        let answer = conn.force(150);
        assert!(!conn.has_room());
        assert!(conn.charge(1).is_none());
        drop(answer);
        assert!(conn.has_room());
        assert!(conn.charge(1).is_some());
    }
}
