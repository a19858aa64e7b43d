//! Giving memory back to the system after a burst of client connections.
//!
//! glibc's allocator keeps what a burst freed (thousands of connections' buffers) in
//! its arenas, so the process's RSS stays at its peak long after the clients left, or
//! went idle: a parked connection frees hyper's buffers as a closed one does. A
//! `malloc_trim` returns the free pages; it walks every arena, so it runs only when
//! many connections closed since the last one, at most every few seconds, off the
//! request path (a background task).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Connections closed or parked since the last trim.
static CLOSED: AtomicUsize = AtomicUsize::new(0);

/// Connections that must have closed (or parked) before a trim is worth its cost.
const WORTH_IT: usize = 256;
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Notes that a client connection closed.
pub(super) fn connection_closed() {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

/// Notes that a client connection was parked: its buffers were freed.
pub(super) fn connection_parked() {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

/// Trims after bursts until `stop`.
pub(super) async fn run(stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if CLOSED.load(Ordering::Relaxed) >= WORTH_IT {
            CLOSED.store(0, Ordering::Relaxed);
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free memory to the system; it takes no pointers
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
