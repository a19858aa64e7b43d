//! DNS discovery, with a resolver whose answer the test sets: addresses that appear get
//! calls, addresses that vanish drain (calls in flight finish, then the sockets close),
//! each address is dialled by IP with the URL's host in `Host`, and an empty or failed
//! answer changes nothing. Also: a refusing upstream is retried with growing delays.

mod support;

use http::StatusCode;
use parking_lot::Mutex;
use rpcgate::Gateway;
use rpcgate::config::{Config, DiscoveryMode};
use rpcgate::upstream::Upstreams;
use rpcgate::upstream::discovery::{ResolveFuture, Resolver};
use serde_json::json;
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{FakeUpstream, post, with_timeout, with_timeout_of};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// The configured upstream. Its port is never dialled: only the resolved addresses are.
const URL: &str = "ws://rpc.test:8546/v1/key";
const HOST: &str = "rpc.test";
const PORT: u16 = 8546;

/// What the fake resolver answers next.
#[derive(Clone)]
enum Answer {
    Addrs(Vec<SocketAddr>),
    Fail,
}

struct DnsState {
    answer: Answer,
    /// Resolutions so far.
    count: usize,
    /// Every distinct (host, port) asked for.
    asked: Vec<(String, u16)>,
}

/// A resolver whose answer the test controls, counting its resolutions.
struct FakeDns {
    state: Mutex<DnsState>,
    /// The resolution count, published after each resolution so tests can wait for one.
    resolved: watch::Sender<usize>,
}

impl FakeDns {
    fn new(addrs: &[SocketAddr]) -> Arc<FakeDns> {
        Arc::new(FakeDns {
            state: Mutex::new(DnsState {
                answer: Answer::Addrs(addrs.to_vec()),
                count: 0,
                asked: Vec::new(),
            }),
            resolved: watch::Sender::new(0),
        })
    }

    /// Makes every later resolution answer `answer`, and waits until the gateway has
    /// acted on it.
    ///
    /// The answer is read and the count raised under one lock, so the resolution that
    /// raises the count past its value here read the new answer. Discovery applies an
    /// answer before it resolves again, so once the count has gone up by two, the new
    /// answer has been applied.
    async fn answer(&self, answer: Answer) {
        let since = {
            let mut state = self.state.lock();
            state.answer = answer;
            state.count
        };
        let mut rx = self.resolved.subscribe();
        with_timeout(rx.wait_for(|&n| n >= since + 2))
            .await
            .expect("the sender lives in self");
    }

    fn asked(&self) -> Vec<(String, u16)> {
        self.state.lock().asked.clone()
    }
}

impl Resolver for FakeDns {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            let (answer, count) = {
                let mut state = self.state.lock();
                let asked = (host.to_owned(), port);
                if !state.asked.contains(&asked) {
                    state.asked.push(asked);
                }
                state.count += 1;
                (state.answer.clone(), state.count)
            };
            self.resolved.send_replace(count);
            match answer {
                Answer::Addrs(addrs) => Ok(addrs),
                Answer::Fail => Err(io::Error::other("SERVFAIL")),
            }
        })
    }
}

/// A gateway on port 0 in DNS mode, resolving through `dns`; stops when dropped.
struct DnsGateway {
    addr: SocketAddr,
    upstreams: Arc<Upstreams>,
    shutdown: CancellationToken,
    _task: AbortOnDropHandle<()>,
}

impl DnsGateway {
    async fn start(dns: Arc<FakeDns>) -> DnsGateway {
        let mut config: Config = config_for(&[URL.to_owned()], 1);
        config.discovery.mode = DiscoveryMode::Dns;
        config.discovery.resolve_interval = Duration::from_millis(20);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let gateway = Gateway::with_resolver(listener, config, dns).expect("gateway starts");
        let upstreams = gateway.upstreams();
        let shutdown = CancellationToken::new();
        let task = AbortOnDropHandle::new(tokio::spawn(gateway.run(shutdown.clone())));
        DnsGateway {
            addr,
            upstreams,
            shutdown,
            _task: task,
        }
    }

    async fn wait_open(&self, n: usize) {
        with_timeout(self.upstreams.wait_for_open(n)).await;
    }

    /// The ids of the current upstream set, sorted.
    fn upstream_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .upstreams
            .snapshot()
            .iter()
            .map(|u| u.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// One call; returns the name of the upstream that answered it.
    async fn call(&self) -> String {
        let resp = post(
            self.addr,
            "/",
            r#"{"jsonrpc":"2.0","id":1,"method":"whoami"}"#,
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        resp.json()["result"]
            .as_str()
            .unwrap_or_else(|| panic!("no name in {}", resp.text()))
            .to_owned()
    }

    /// Calls until every one of `names` has answered one; fails after 200 calls.
    async fn calls_reach(&self, names: &[&str]) {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let name = self.call().await;
            assert!(names.contains(&name.as_str()), "{name} answered");
            seen.insert(name);
            if seen.len() == names.len() {
                return;
            }
        }
        panic!("after 200 calls only {seen:?} of {names:?} answered");
    }
}

impl Drop for DnsGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An upstream answering every call with its name.
async fn named(name: &'static str) -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.auto_reply(move |f| Some(f.result_text(json!(name))));
    up
}

fn ids(ups: &[&FakeUpstream]) -> Vec<String> {
    let mut ids: Vec<String> = ups.iter().map(|u| u.addr().to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn an_address_that_appears_gets_calls() {
    let (a, b) = (named("a").await, named("b").await);
    let dns = FakeDns::new(&[a.addr()]);
    let gw = DnsGateway::start(dns.clone()).await;
    gw.wait_open(1).await;
    assert_eq!(gw.upstream_ids(), ids(&[&a]));
    for _ in 0..5 {
        assert_eq!(gw.call().await, "a");
    }

    dns.answer(Answer::Addrs(vec![a.addr(), b.addr()])).await;
    assert_eq!(gw.upstream_ids(), ids(&[&a, &b]));
    b.wait_for_connections(1).await;
    gw.wait_open(2).await;
    gw.calls_reach(&["a", "b"]).await;
    // The address that stayed kept its pool: no reconnect.
    assert_eq!(a.total_connections(), 1);
    assert_eq!(a.open_connections(), 1);
}

#[tokio::test]
async fn a_vanished_address_finishes_its_calls_then_closes() {
    // `a` hands its frames to the test; `b` answers by itself.
    let (a, b) = (FakeUpstream::start().await, named("b").await);
    let dns = FakeDns::new(&[a.addr()]);
    let gw = DnsGateway::start(dns.clone()).await;
    gw.wait_open(1).await;
    let held = tokio::spawn(post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":"held","method":"whoami"}"#,
    ));
    let frame = a.next_frame().await;

    dns.answer(Answer::Addrs(vec![b.addr()])).await;
    assert_eq!(gw.upstream_ids(), ids(&[&b]), "a left the set");
    b.wait_for_connections(1).await;
    gw.wait_open(2).await;
    for _ in 0..20 {
        assert_eq!(
            gw.call().await,
            "b",
            "new calls go only where the answer points"
        );
    }
    assert_eq!(a.frames_received(), 1, "a got no new call");
    assert!(a.try_next_frame().is_none());
    // Its call is still in flight, so its connection stays.
    assert_eq!(a.open_connections(), 1);
    assert!(!a.connection_ended(0));

    assert!(frame.reply_result(json!("a")));
    let resp = with_timeout(held).await.expect("held call task");
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"jsonrpc": "2.0", "id": "held", "result": "a"})
    );
    // With nothing left in flight the drained connection closes, for good.
    a.wait_for_connection_end(0).await;
    dns.answer(Answer::Addrs(vec![b.addr()])).await;
    assert_eq!(
        a.total_connections(),
        1,
        "a drained upstream is not redialled"
    );
    assert_eq!(b.total_connections(), 1);
}

#[tokio::test]
async fn each_address_is_dialled_with_the_urls_host_in_host() {
    let a = named("a").await;
    let dns = FakeDns::new(&[a.addr()]);
    let gw = DnsGateway::start(dns.clone()).await;
    a.wait_for_connections(1).await;
    gw.wait_open(1).await;
    assert_eq!(dns.asked(), vec![(HOST.to_owned(), PORT)]);
    let handshake = a.handshake(0);
    assert_eq!(handshake.headers["host"], format!("{HOST}:{PORT}").as_str());
    assert_eq!(handshake.uri.path(), "/v1/key");
    // The upstream's identity (for balancing and stickiness) is the address it dials.
    assert_eq!(gw.upstream_ids(), ids(&[&a]));
    assert_eq!(gw.call().await, "a");
}

#[tokio::test]
async fn an_empty_or_failed_answer_keeps_the_current_set() {
    let (a, b) = (named("a").await, named("b").await);
    let dns = FakeDns::new(&[a.addr(), b.addr()]);
    let gw = DnsGateway::start(dns.clone()).await;
    a.wait_for_connections(1).await;
    b.wait_for_connections(1).await;
    gw.wait_open(2).await;

    for answer in [Answer::Addrs(Vec::new()), Answer::Fail] {
        dns.answer(answer).await;
        assert_eq!(gw.upstream_ids(), ids(&[&a, &b]));
        for up in [&a, &b] {
            assert_eq!(up.open_connections(), 1);
            assert_eq!(up.total_connections(), 1);
        }
        gw.calls_reach(&["a", "b"]).await;
    }

    // A real answer still takes effect after a failure.
    dns.answer(Answer::Addrs(vec![b.addr()])).await;
    assert_eq!(gw.upstream_ids(), ids(&[&b]));
    a.wait_for_connection_end(0).await;
}

/// Reconnect backoff, on a paused clock: the upstream's port accepts TCP and drops it, so
/// every attempt fails and each one is seen as an accepted connection.
///
/// Real sockets on a paused clock: while the gateway waits on I/O the clock may jump to
/// its next timer, the 50 ms handshake timeout. That only ever makes an attempt end
/// later, never sooner, and is covered by the slack below.
#[tokio::test(start_paused = true)]
async fn a_refusing_upstream_is_retried_with_growing_capped_delays() {
    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    const HANDSHAKE: Duration = Duration::from_millis(50);
    const SPAN: Duration = Duration::from_secs(60);
    // One handshake timeout for the attempt, one for noticing it, and timer rounding.
    const SLACK: Duration = Duration::from_millis(2 * 50 + 10);

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let url = format!("ws://{}/", listener.local_addr().expect("local addr"));
    let mut config = config_for(&[url], 1);
    config.websocket.reconnect_base = BASE;
    config.websocket.reconnect_max = MAX;
    config.websocket.handshake_timeout = HANDSHAKE;
    let start = Instant::now();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _acceptor = {
        let attempts = attempts.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                attempts.lock().push(start.elapsed());
                drop(stream);
            }
        }))
    };
    let _gw = start_gateway(config).await;
    with_timeout_of(SPAN * 2, tokio::time::sleep(SPAN)).await;

    let attempts = attempts.lock().clone();
    // A fixed 100 ms retry would make 400 to 600 attempts (each 100 to 150 ms); growing
    // delays make about a dozen. Lower bound: even if every delay were its ceiling,
    // 0.1 + 0.2 + ... + 25.6 s plus the handshakes fit ten attempts into 60 s.
    assert!(
        (8..=40).contains(&attempts.len()),
        "{} attempts in {SPAN:?}, the first at {:?}",
        attempts.len(),
        &attempts[..attempts.len().min(20)]
    );
    // Each delay stays under its ceiling: base * 2^k, capped at reconnect_max.
    for (k, pair) in attempts.windows(2).enumerate() {
        let ceiling = BASE.saturating_mul(1 << k.min(20)).min(MAX);
        let gap = pair[1] - pair[0];
        assert!(
            gap <= ceiling + SLACK,
            "delay {k} was {gap:?}, its ceiling {ceiling:?}: {attempts:?}"
        );
    }
}
