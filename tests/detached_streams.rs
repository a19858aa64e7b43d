//! HTTP/1.1 event streams are served without hyper once their head is out
//! (`server/detach.rs`): their events still arrive, in valid chunked framing (the
//! hyper client of `support::sse` decodes them, and here a hand-written decoder reads
//! the raw bytes); a stream that ends sends its last chunk and leaves the connection
//! serving its next request; a client leaving frees it. `rpcgate_event_streams_detached`
//! says when a stream is detached, so the tests wait for that, never for time to pass.

mod support;

use rpcgate::config::{Affinity, Config, SubscriptionRule};
use serde_json::{Value, json};
use support::admin::{eventually, metric};
use support::echo::Echo;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::rpc::{call_body, post_as, result_of};
use support::sse::stream_of;
use support::{RawTcp, raw_tcp, with_timeout};

const DETACHED: &str = "rpcgate_event_streams_detached";
const OPEN: &str = "rpcgate_http_connections_open";

async fn gateway(echo: &Echo) -> TestGateway {
    let mut config: Config = config_for(std::slice::from_ref(&echo.url), 1);
    config.subscriptions = vec![SubscriptionRule::preset("substrate").unwrap()];
    config.sessions.affinity = Affinity::Connection;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    gw
}

async fn wait_detached(gw: &TestGateway, n: f64) {
    eventually(async || metric(gw.admin, DETACHED).await == n).await;
}

/// An HTTP/1.1 client by hand, reading a chunked event stream byte by byte.
struct Raw {
    tcp: RawTcp,
    received: Vec<u8>,
}

impl Raw {
    async fn open_stream(gw: &TestGateway, session: &str) -> Raw {
        let mut tcp = raw_tcp(gw.addr).await;
        let get = format!(
            "GET /events?session={session} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n"
        );
        tcp.write(get).await.expect("the gateway reads");
        let mut raw = Raw {
            tcp,
            received: Vec::new(),
        };
        let head = raw.until(b"\r\n\r\n").await;
        let head = String::from_utf8(head).expect("a UTF-8 head");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        raw
    }

    /// Everything up to and including `end`, reading more as needed.
    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.received.windows(end.len()).position(|w| w == end) {
                return self.received.drain(..at + end.len()).collect();
            }
            let more = self.tcp.read_some().await;
            assert!(
                !more.is_empty(),
                "closed while waiting for {:?}; had {:?}",
                String::from_utf8_lossy(end),
                String::from_utf8_lossy(&self.received)
            );
            self.received.extend_from_slice(&more);
        }
    }

    /// The next chunk's data; `None` for the last (empty) chunk.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let size = self.until(b"\r\n").await;
        let size = std::str::from_utf8(&size[..size.len() - 2]).expect("a hex size");
        let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("size {size:?}"));
        if size == 0 {
            assert_eq!(self.until(b"\r\n").await, b"\r\n", "no trailers");
            return None;
        }
        while self.received.len() < size + 2 {
            let more = self.tcp.read_some().await;
            assert!(!more.is_empty(), "closed inside a chunk");
            self.received.extend_from_slice(&more);
        }
        let data: Vec<u8> = self.received.drain(..size).collect();
        assert_eq!(self.received.drain(..2).collect::<Vec<_>>(), b"\r\n");
        Some(data)
    }

    /// The data of the next event (skipping comment-only blocks such as heartbeats).
    async fn event_data(&mut self) -> Value {
        loop {
            let chunk = self.chunk().await.expect("an event, not the stream's end");
            let text = String::from_utf8(chunk).expect("UTF-8 events");
            if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                return serde_json::from_str(data).expect("JSON data");
            }
        }
    }
}

#[tokio::test]
async fn a_detached_stream_still_delivers_every_event_in_chunked_framing() {
    let echo = Echo::start("a").await;
    let gw = gateway(&echo).await;
    let mut raw = Raw::open_stream(&gw, "s").await;
    wait_detached(&gw, 1.0).await;
    assert_eq!(raw.event_data().await, json!({"session": "s"}));
    for i in 0..5u64 {
        let resp = post_as(gw.addr, Some("s"), call_body(i, "notify_me", json!([i]))).await;
        assert_eq!(result_of(&resp), json!(true));
        assert_eq!(
            raw.event_data().await,
            json!({"jsonrpc": "2.0", "method": "notice", "params": [i]})
        );
    }
    // And through hyper's client, which checks the framing strictly.
    let mut sse = stream_of(gw.addr, "t").await;
    wait_detached(&gw, 2.0).await;
    let resp = post_as(gw.addr, Some("t"), call_body(9, "notify_me", json!(["x"]))).await;
    assert_eq!(result_of(&resp), json!(true));
    assert_eq!(
        sse.event().await.json(),
        json!({"jsonrpc": "2.0", "method": "notice", "params": ["x"]})
    );
}

#[tokio::test]
async fn a_stream_that_ends_sends_its_last_chunk_and_its_connection_serves_the_next_request() {
    let echo = Echo::start("a").await;
    let gw = gateway(&echo).await;
    let mut raw = Raw::open_stream(&gw, "s").await;
    wait_detached(&gw, 1.0).await;
    assert_eq!(raw.event_data().await, json!({"session": "s"}));
    // A second stream for the session replaces (ends) the first.
    let _second = stream_of(gw.addr, "s").await;
    loop {
        if raw.chunk().await.is_none() {
            break;
        }
    }
    wait_detached(&gw, 1.0).await;
    // The same connection, back with hyper: a call on it is answered.
    let body = call_body(7, "echo", json!(["again"]));
    raw.tcp
        .write(format!(
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await
        .expect("the gateway reads");
    let head = String::from_utf8(raw.until(b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answer = raw.until(b"}").await;
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.contains(r#""id":7"#), "{answer}");
}

#[tokio::test]
async fn a_client_leaving_a_detached_stream_frees_its_connection() {
    let echo = Echo::start("a").await;
    let gw = gateway(&echo).await;
    let raw = Raw::open_stream(&gw, "s").await;
    wait_detached(&gw, 1.0).await;
    drop(raw);
    eventually(async || metric(gw.admin, OPEN).await == 0.0).await;
    assert_eq!(metric(gw.admin, DETACHED).await, 0.0);
}

#[tokio::test]
async fn shutdown_ends_a_detached_stream_with_its_last_chunk() {
    let echo = Echo::start("a").await;
    let gw = gateway(&echo).await;
    let mut raw = Raw::open_stream(&gw, "s").await;
    wait_detached(&gw, 1.0).await;
    assert_eq!(raw.event_data().await, json!({"session": "s"}));
    gw.begin_shutdown();
    with_timeout(async { while raw.chunk().await.is_some() {} }).await;
    // Then the connection closes.
    let rest = raw.tcp.read_until_closed().await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}
