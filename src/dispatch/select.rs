//! Picking a connection for a message: an ordered list of candidate upstreams (the
//! first is the choice, the rest the fallback order), then the least-loaded open
//! connection of the first candidate that has room.
//!
//! One loop serves every route; only the order differs. Balanced calls use power of
//! two choices and order the rest by load only when the choice turns out full, so a
//! pick normally costs two load reads. Sticky calls take the first usable upstream of
//! their key's rendezvous order and stay there even when it is busy.

use super::Route;
use super::admission::Permit;
use crate::upstream::balance::{self, Candidate};
use crate::upstream::{Conn, Upstream, Upstreams};
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(super) enum Pick {
    Got(Permit),
    NoneOpen,
    AllFull,
}

/// Takes `count` slots on a connection `route` allows. `prelude` messages may use a
/// connection that is still preparing; `avoid` is the upstream that just failed.
pub(super) fn pick(
    upstreams: &Upstreams,
    route: Route<'_>,
    count: usize,
    prelude: bool,
    avoid: Option<&Arc<Upstream>>,
) -> Pick {
    let set = match route {
        Route::Own(conn) => return pick_on(upstreams, conn, count, None, prelude),
        Route::Upstream(upstream) if upstream.is_draining() => return Pick::NoneOpen,
        Route::Upstream(upstream) => return pick_in(upstreams, upstream, count),
        Route::Any | Route::Sticky(_) => upstreams.snapshot(),
    };
    // Inline for up to 8 upstreams: picking allocates nothing per call.
    let mut usable: SmallVec<[&Arc<Upstream>; 8]> = set.iter().filter(|u| u.usable()).collect();
    // After a failure, prefer any other upstream; fall back to the same one.
    if let Some(avoid) = avoid
        && usable.len() > 1
    {
        usable.retain(|u| !Arc::ptr_eq(u, avoid));
    }
    if usable.is_empty() {
        return Pick::NoneOpen;
    }
    let mut result = Pick::NoneOpen;
    for i in candidates(&usable, route) {
        match pick_in(upstreams, usable[i], count) {
            Pick::Got(permit) => return Pick::Got(permit),
            Pick::AllFull => result = Pick::AllFull,
            Pick::NoneOpen => {}
        }
    }
    result
}

/// The order in which `usable` upstreams are tried for `route`.
fn candidates(usable: &[&Arc<Upstream>], route: Route<'_>) -> impl Iterator<Item = usize> {
    let loads: SmallVec<[Candidate<'_>; 8]> = usable
        .iter()
        .map(|u| Candidate {
            id: &u.id,
            weight: u.weight,
            load: u.load(),
        })
        .collect();
    let (first, rest) = match route {
        _ if loads.len() == 1 => (Some(0), None),
        // A session stays on its upstream while that one is usable, even when it is
        // busy (the call waits for a slot there); only a down upstream moves it on.
        Route::Sticky(key) => (balance::rendezvous_first(key, &loads), None),
        _ => {
            let first = balance::p2c_choice(&loads, |n| fastrand::u64(..n));
            (first, first.map(|f| (loads, f)))
        }
    };
    // Only a full first choice pays for ordering the rest.
    let rest = rest
        .into_iter()
        .flat_map(|(loads, f)| balance::by_load_except(&loads, f));
    first.into_iter().chain(rest)
}

/// The least-loaded open connection of `upstream` with room for `count`.
fn pick_in(upstreams: &Upstreams, upstream: &Arc<Upstream>, count: usize) -> Pick {
    // Another caller may take the slot we saw between the look and the take; then
    // look again rather than report "full" while another connection has room.
    for _ in 0..=upstream.conns.len() {
        let mut best: Option<&Arc<Conn>> = None;
        let mut best_load = usize::MAX;
        let mut any_open = false;
        for conn in &upstream.conns {
            if !conn.is_open() {
                continue;
            }
            any_open = true;
            let load = conn.in_flight.load(Ordering::Acquire);
            if fits(load, count, conn.max_in_flight) && load < best_load {
                best = Some(conn);
                best_load = load;
            }
        }
        let Some(conn) = best else {
            return if any_open {
                Pick::AllFull
            } else {
                Pick::NoneOpen
            };
        };
        if let Pick::Got(permit) = pick_on(upstreams, conn, count, Some(upstream), false) {
            return Pick::Got(permit);
        }
    }
    Pick::AllFull
}

fn pick_on(
    upstreams: &Upstreams,
    conn: &Arc<Conn>,
    count: usize,
    upstream: Option<&Arc<Upstream>>,
    prelude: bool,
) -> Pick {
    let ready = match conn.state() {
        crate::upstream::ConnState::Open => true,
        crate::upstream::ConnState::Preparing => prelude,
        _ => false,
    };
    if !ready {
        return Pick::NoneOpen;
    }
    let before = conn.in_flight.fetch_add(count, Ordering::AcqRel);
    if !fits(before, count, conn.max_in_flight) {
        // Undone without a Permit: its drop would wake every waiter for nothing.
        conn.in_flight.fetch_sub(count, Ordering::AcqRel);
        return Pick::AllFull;
    }
    Pick::Got(Permit::new(conn, count, upstreams, upstream))
}

/// Whether `count` more calls fit beside `load`. A forwarded batch larger than
/// `max_in_flight` still gets an empty connection, or it could never be sent.
fn fits(load: usize, count: usize, max: usize) -> bool {
    load + count <= max.max(count)
}

#[cfg(test)]
mod tests {
    use super::fits;

    #[test]
    fn a_batch_larger_than_the_limit_fits_only_an_empty_connection() {
        assert!(fits(0, 5, 4));
        assert!(!fits(1, 5, 4));
        assert!(fits(3, 1, 4));
        assert!(!fits(4, 1, 4));
    }
}
