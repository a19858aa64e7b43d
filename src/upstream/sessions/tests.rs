//! Unit tests of `sessions.rs`, kept apart so the module reads as one noun.

use super::*;
use crate::config::{Config, UpstreamConfig};
use crate::metrics::Metrics;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_client_is_counted_until_its_last_session_closes() {
    let (a, b) = (ClientId::of(ip("10.0.0.1")), ClientId::of(ip("10.0.0.2")));
    let mut per = PerClient::default();
    per.add(a);
    per.add(a);
    per.add(b);
    assert_eq!((per.open(a), per.open(b), per.len()), (2, 1, 2));
    per.remove(a);
    assert_eq!((per.open(a), per.len()), (1, 2));
    per.remove(a);
    assert_eq!(per.len(), 1, "a client without sessions leaves the table");
    // A stray second close must not wrap or resurrect the entry.
    per.remove(a);
    assert_eq!((per.open(a), per.len()), (0, 1));
}

#[test]
fn an_ipv6_client_counts_by_its_64_and_a_mapped_ipv4_one_as_ipv4() {
    assert_eq!(
        ClientId::of(ip("2001:db8:1:2::1")),
        ClientId::of(ip("2001:db8:1:2:ffff::9"))
    );
    assert_ne!(
        ClientId::of(ip("2001:db8:1:2::1")),
        ClientId::of(ip("2001:db8:1:3::1"))
    );
    assert_eq!(
        ClientId::of(ip("::ffff:10.0.0.1")),
        ClientId::of(ip("10.0.0.1"))
    );
}

#[tokio::test(start_paused = true)]
async fn the_creation_rate_allows_a_burst_then_refills_and_forgets_idle_clients() {
    let rate = CreationRate::new(3);
    let (a, b) = (ClientId::of(ip("10.0.0.1")), ClientId::of(ip("10.0.0.2")));
    assert!(
        (0..3).all(|_| rate.allow(a)),
        "the burst is the per-minute rate"
    );
    assert!(!rate.allow(a));
    assert!(rate.allow(b), "another client has its own allowance");
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(rate.allow(a), "one more every 60s / rate");
    assert!(!rate.allow(a));
    assert_eq!(rate.len(), 2);
    // Full again 60s after the last creation; governor keeps one interval more.
    tokio::time::advance(Duration::from_secs(60)).await;
    rate.forget_idle();
    assert_eq!(rate.len(), 1, "b is full again, a not quite");
    tokio::time::advance(Duration::from_secs(21)).await;
    rate.forget_idle();
    assert_eq!(rate.len(), 0, "full allowances are not kept");
}

/// A session table whose upstream accepts TCP but never answers the handshake: its
/// sockets stay connecting, which the bookkeeping does not care about.
async fn table(config: SessionConfig) -> (Arc<Sessions>, tokio::net::TcpListener) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", silent.local_addr().unwrap());
    let gateway = Config {
        upstreams: vec![UpstreamConfig::new(url)],
        ..Config::default()
    };
    let metrics = Arc::new(Metrics::new(std::iter::empty()));
    let upstreams = Upstreams::start(&gateway, metrics).unwrap();
    (Sessions::start(config, upstreams, 8), silent)
}

#[tokio::test(start_paused = true)]
async fn per_client_counts_follow_refusals_evictions_idle_closes_and_shutdown() {
    let config = SessionConfig {
        max_sessions: 3,
        when_full: WhenFull::Evict,
        max_per_client: 2,
        idle_timeout: Duration::from_secs(10),
        ..SessionConfig::default()
    };
    let (sessions, _upstream) = table(config).await;
    let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
    let tick = || tokio::time::advance(Duration::from_millis(1));
    for (key, client) in [("a1", a), ("a2", a), ("b1", b)] {
        assert!(sessions.connection(key, client).is_ok(), "{key}");
        tick().await;
    }
    assert_eq!(
        sessions.connection("a3", a).err(),
        Some(Error::TooManyClientSessions(ClientLimit::Open(2)))
    );
    assert!(
        sessions.connection("a1", a).is_ok(),
        "open sessions still work"
    );
    assert!(
        sessions.connection("a1", b).is_ok(),
        "a known key is not new"
    );
    assert_eq!((sessions.open_for(a), sessions.open_for(b)), (2, 1));

    // Full: c's session evicts the least recently used, a2, and a gets room again.
    tick().await;
    assert!(sessions.connection("c1", c).is_ok());
    assert_eq!(sessions.len(), 3);
    assert_eq!(
        (
            sessions.open_for(a),
            sessions.open_for(b),
            sessions.open_for(c)
        ),
        (1, 1, 1)
    );
    assert!(sessions.connection("a3", a).is_ok());
    assert_eq!((sessions.open_for(a), sessions.open_for(b)), (2, 0));
    assert_eq!(sessions.clients(), 2, "b left with its last session");

    tokio::time::advance(Duration::from_secs(10)).await;
    sessions.sweep_idle();
    assert_eq!((sessions.len(), sessions.clients()), (0, 0));

    assert!(sessions.connection("a4", a).is_ok());
    sessions.close();
    assert_eq!((sessions.len(), sessions.clients()), (0, 0));
}

#[test]
fn keys_are_128_bit_hex_and_distinct() {
    let keys: std::collections::HashSet<String> = (0..1000).map(|_| new_key().unwrap()).collect();
    assert_eq!(keys.len(), 1000);
    assert!(
        keys.iter()
            .all(|k| k.len() == 32 && k.chars().all(|c| c.is_ascii_hexdigit()))
    );
}
