//! Where a message may go: one value, decided once per request.

use crate::upstream::{Conn, Upstream};
use std::sync::Arc;

/// Where a message may go.
#[derive(Clone, Copy)]
pub enum Route<'a> {
    /// Balanced message by message (power of two choices).
    Any,
    /// `affinity = "upstream"`: the first usable upstream of the session key's
    /// rendezvous order, which the session keeps while that upstream is usable, even
    /// when it is busy; the rest of the order is where it fails over to.
    Sticky(&'a [u8]),
    /// `affinity = "connection"` (a session's own socket), and a fresh socket's
    /// prelude: that connection, nowhere else.
    Own(&'a Arc<Conn>),
    /// A health check: that upstream, healthy or not (the check is how it gets back
    /// into rotation), and no failover.
    Upstream(&'a Arc<Upstream>),
}

/// A [`Route`] that owns what it names.
pub enum OwnedRoute {
    Any,
    Sticky(Vec<u8>),
    Own(Arc<Conn>),
    Upstream(Arc<Upstream>),
}

impl OwnedRoute {
    pub fn of(route: Route<'_>) -> OwnedRoute {
        match route {
            Route::Any => OwnedRoute::Any,
            Route::Sticky(key) => OwnedRoute::Sticky(key.to_vec()),
            Route::Own(conn) => OwnedRoute::Own(conn.clone()),
            Route::Upstream(up) => OwnedRoute::Upstream(up.clone()),
        }
    }

    pub fn route(&self) -> Route<'_> {
        match self {
            OwnedRoute::Any => Route::Any,
            OwnedRoute::Sticky(key) => Route::Sticky(key),
            OwnedRoute::Own(conn) => Route::Own(conn),
            OwnedRoute::Upstream(up) => Route::Upstream(up),
        }
    }
}
