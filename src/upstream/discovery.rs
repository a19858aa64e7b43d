//! DNS discovery: each configured upstream's host name resolves to all its addresses
//! (a Kubernetes headless Service gives one per pod), and each address gets a pool.
//!
//! Resolution goes through [`Resolver`] so tests can feed addresses without DNS.

use super::set::Upstreams;
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a host name and port into addresses.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// The operating system's resolver (`getaddrinfo`, via tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Applies one resolution of source `source`: adds the new addresses, drains the
/// vanished ones. An empty answer is treated like a failed one (the set is kept):
/// removing every upstream on a DNS hiccup would turn a blip into an outage.
pub fn apply(upstreams: &Arc<Upstreams>, source: usize, addrs: &[SocketAddr]) {
    if addrs.is_empty() {
        return;
    }
    let wanted: HashSet<String> = addrs.iter().map(|a| a.to_string()).collect();
    for upstream in upstreams.snapshot().iter() {
        if upstream.source == source && !wanted.contains(&upstream.id) {
            upstreams.drain(&upstream.id);
        }
    }
    for addr in addrs {
        upstreams.add(source, Some(*addr));
    }
}

/// Re-resolves every source each `interval` until `token` is cancelled.
pub async fn run(
    upstreams: Arc<Upstreams>,
    resolver: Arc<dyn Resolver>,
    interval: Duration,
    token: CancellationToken,
) {
    let sources = upstreams.sources();
    loop {
        for (source, (host, port)) in sources.iter().enumerate() {
            match resolver.resolve(host, *port).await {
                Ok(addrs) if !addrs.is_empty() => apply(&upstreams, source, &addrs),
                Ok(_) => tracing::warn!(%host, "DNS returned no address; keeping the current set"),
                Err(e) => {
                    tracing::warn!(%host, error = %e, "DNS resolution failed; keeping the current set")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = token.cancelled() => return,
        }
    }
}
