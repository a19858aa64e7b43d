//! Health checks: `health_method` called on each upstream every `health_interval`.
//!
//! A failure (no answer within `health_timeout`, a JSON-RPC error, a lost connection)
//! takes the upstream out of balancing until a check passes again. The check is an
//! ordinary message through the dispatch pipeline, routed to that upstream alone.

use super::set::{Upstream, Upstreams};
use crate::dispatch::{self, Outbound, Route, Sent};
use crate::error::Error;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) async fn run(
    upstreams: Arc<Upstreams>,
    upstream: Arc<Upstream>,
    prefix: String,
    token: CancellationToken,
) {
    let interval = upstreams.balance.health_interval;
    let limit = upstreams.balance.health_timeout;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = token.cancelled() => return,
        }
        if !upstream.has_open() {
            continue;
        }
        let deadline = Instant::now() + limit;
        let msg = Outbound::Health { prefix: &prefix };
        let sent = tokio::select! {
            sent = dispatch::send(&upstreams, msg, Route::Upstream(&upstream), None, deadline) => sent,
            _ = token.cancelled() => return,
        };
        let passed = match sent {
            Ok(Sent::Reply(reply)) => !reply.is_error(),
            // Busy to the brim is not unhealthy.
            Err(Error::Overloaded(_)) => continue,
            Ok(_) | Err(_) => false,
        };
        let was = upstream.healthy.swap(passed, Ordering::AcqRel);
        if was != passed {
            if passed {
                tracing::info!(upstream = %upstream.label, "health check passes again; back in rotation");
            } else {
                tracing::warn!(upstream = %upstream.label, "health check failed; out of rotation");
            }
            upstreams.signals.changed.notify_waiters();
        }
    }
}
