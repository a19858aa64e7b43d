//! Idle HTTP/1 connections are parked between requests (hyper's buffers and state
//! dropped, the socket kept): every request on them is still answered once and in
//! order, a WebSocket upgrade still works, and every limit and shutdown still closes
//! them. `rpcgate_http_connections_parked` says when a connection is parked, so the
//! tests wait for that, never for time to pass.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use support::admin::{eventually, metric};
use support::gateway::{TestGateway, config_for, start_gateway};
use support::tls::{Ca, Files, Https, client_config, connect};
use support::{Client, FakeUpstream, H2Client, RawTcp, raw_tcp, with_timeout};

const PARKED: &str = "rpcgate_http_connections_parked";
const OPEN: &str = "rpcgate_http_connections_open";

async fn gateway() -> (FakeUpstream, TestGateway) {
    let up = echo_upstream().await;
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    (up, gw)
}

async fn echo_upstream() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!({"echo": f.params().cloned()}))));
    up
}

async fn wait_parked(gw: &TestGateway, n: f64) {
    eventually(async || metric(gw.admin, PARKED).await == n).await;
}

fn call(id: u64) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"probe","params":[{id}]}}"#)
}

fn post(body: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// HTTP/1.1 by hand over one TCP connection, to control exactly which bytes go in
/// which write; answers are read back in the order they come.
struct Raw {
    tcp: RawTcp,
    received: Vec<u8>,
}

impl Raw {
    async fn connect(gw: &TestGateway) -> Raw {
        Raw {
            tcp: raw_tcp(gw.addr).await,
            received: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.tcp.write(bytes).await.expect("the gateway reads");
    }

    /// The next whole response: its status and its body as JSON (`Null` if none).
    async fn next(&mut self) -> (u16, Value) {
        loop {
            if let Some((status, body, used)) = parse(&self.received) {
                self.received.drain(..used);
                return (status, body);
            }
            let more = self.tcp.read_some().await;
            assert!(
                !more.is_empty(),
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&self.received)
            );
            self.received.extend_from_slice(&more);
        }
    }

    /// The next response, which must answer call `id`.
    async fn answer(&mut self, id: u64) {
        let (status, body) = self.next().await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], id, "{body}");
        assert_eq!(body["result"]["echo"], json!([id]), "{body}");
    }
}

/// The first whole response in `buf` (bodies by `content-length`), and its length.
fn parse(buf: &[u8]) -> Option<(u16, Value, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("a UTF-8 head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("no status: {head}"));
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse().expect("a length"))
        .unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + length)?;
    let json = serde_json::from_slice(body).unwrap_or(Value::Null);
    Some((status, json, end + 4 + length))
}

#[tokio::test]
async fn a_parked_connection_answers_each_next_request() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    for id in 1..=20 {
        raw.send(post(&call(id))).await;
        raw.answer(id).await;
        // Idle again: parked, and woken by the next request.
        wait_parked(&gw, 1.0).await;
    }
    assert_eq!(metric(gw.admin, OPEN).await, 1.0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(format!("{}{}", post(&call(1)), post(&call(2))))
        .await;
    raw.answer(1).await;
    raw.answer(2).await;
    wait_parked(&gw, 1.0).await;
    // A whole request and the start of the next in one write: the start is read
    // ahead with the first, and must survive the connection's idling in between.
    let fourth = post(&call(4));
    let (start, rest) = fourth.split_at(20);
    raw.send(format!("{}{start}", post(&call(3)))).await;
    raw.answer(3).await;
    raw.send(rest).await;
    raw.answer(4).await;
    wait_parked(&gw, 1.0).await;
}

#[tokio::test]
async fn a_request_arriving_in_pieces_across_a_park_is_answered() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    let second = post(&call(2));
    let (head_start, rest) = second.split_at(10);
    raw.send(head_start).await;
    // The first bytes unpark it; the rest of the head and the body come later.
    wait_parked(&gw, 0.0).await;
    let (head_end, body) = rest.split_at(rest.find("\r\n\r\n").unwrap() + 4);
    raw.send(head_end).await;
    raw.send(body).await;
    raw.answer(2).await;
    wait_parked(&gw, 1.0).await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_after_a_park() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    let body = call(2);
    raw.send(format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ))
    .await;
    let (status, _) = raw.next().await;
    assert_eq!(status, 100);
    raw.send(body).await;
    raw.answer(2).await;
}

#[tokio::test]
async fn a_client_leaving_while_parked_frees_its_connection() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    drop(raw);
    eventually(async || metric(gw.admin, OPEN).await == 0.0).await;
    assert_eq!(metric(gw.admin, PARKED).await, 0.0);
}

#[tokio::test]
async fn a_parked_connection_half_closed_by_its_client_is_closed() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    raw.tcp.shutdown_write().await.unwrap();
    assert!(raw.tcp.read_until_closed().await.is_empty());
    eventually(async || metric(gw.admin, OPEN).await == 0.0).await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let up = echo_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    // Far past the test timeout: only an immediate close passes.
    config.shutdown.drain_timeout = Duration::from_secs(120);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    gw.begin_shutdown();
    assert!(raw.tcp.read_until_closed().await.is_empty());
    with_timeout(gw.stop()).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_timeout_closes_a_parked_connection() {
    let up = echo_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.keep_alive_timeout = Duration::from_secs(20);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    // Parked for half the limit, then woken: the limit counts from the last answer.
    tokio::time::sleep(Duration::from_secs(10)).await;
    raw.send(post(&call(2))).await;
    raw.answer(2).await;
    let answered = tokio::time::Instant::now();
    let rest = raw
        .tcp
        .read_until_closed_within(Duration::from_secs(120))
        .await;
    assert!(rest.is_empty());
    // The paused clock makes this exact: closed by the limit, not before it.
    assert!(answered.elapsed() >= Duration::from_secs(20));
}

#[tokio::test]
async fn a_websocket_upgrade_on_a_connection_that_was_parked_works() {
    let (_up, gw) = gateway().await;
    let mut raw = Raw::connect(&gw).await;
    raw.send(post(&call(1))).await;
    raw.answer(1).await;
    wait_parked(&gw, 1.0).await;
    let (mut ws, resp) = with_timeout(tokio_tungstenite::client_async(
        format!("ws://{}/", gw.addr),
        raw.tcp.into_inner(),
    ))
    .await
    .expect("WebSocket handshake");
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    // The socket is the WebSocket's now, not a parked HTTP connection.
    assert_eq!(metric(gw.admin, PARKED).await, 0.0);
    with_timeout(ws.send(Message::text(call(2)))).await.unwrap();
    let reply = with_timeout(async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("no answer: {other:?}"),
            }
        }
    })
    .await;
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["id"], 2, "{reply}");
    assert_eq!(reply["result"]["echo"], json!([2]), "{reply}");
    assert_eq!(metric(gw.admin, OPEN).await, 1.0);
}

#[tokio::test]
async fn h2c_is_served_and_not_parked_beside_parked_http1() {
    let (_up, gw) = gateway().await;
    let h2 = H2Client::connect(gw.addr).await;
    assert_eq!(h2.post("/", call(1)).await.json()["id"], 1);
    let mut h1 = Client::connect(gw.addr).await;
    assert_eq!(h1.post("/", call(2)).await.json()["id"], 2);
    wait_parked(&gw, 1.0).await;
    assert_eq!(metric(gw.admin, OPEN).await, 2.0);
    assert_eq!(metric(gw.admin, PARKED).await, 1.0);
    assert_eq!(h2.post("/", call(3)).await.json()["id"], 3);
    assert_eq!(h1.post("/", call(4)).await.json()["id"], 4);
}

#[tokio::test]
async fn a_parked_tls_connection_answers_each_next_request() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("gw"));
    let up = echo_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.tls = Some(files.config(None));
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let stream = connect(gw.addr, client_config(&ca, None, &["http/1.1"]))
        .await
        .expect("TLS handshake");
    let mut https = Https::over(stream).await.expect("HTTP/1.1 over TLS");
    for id in 1..=5 {
        let resp = https.post(&call(id)).await.expect("an answer");
        assert_eq!(resp.json()["result"]["echo"], json!([id]));
        wait_parked(&gw, 1.0).await;
    }
}
