//! The edge of the listener: connections over `max_connections` get a fast 503 and
//! `/readyz` says so; clients that stop reading, send oversized heads, or never
//! finish a request line are cut off without hurting anyone else.
//!
//! Real sockets and a real clock: each wait is for an observable condition (a socket
//! closing, a metric reaching a value), bounded by `with_timeout`.

mod support;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use support::admin::{eventually, get, metric, sample};
use support::gateway::{config_for, start_gateway};
use support::{Client, FakeUpstream, H2Client, post, raw_tcp, request, with_timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;

/// `CALL` as one raw HTTP/1.1 request.
fn raw_call() -> String {
    format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CALL}",
        CALL.len()
    )
}

/// A raw HTTP/1 answer split into its status line, lowercased head, and body.
fn split_answer(raw: &[u8]) -> (String, String, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_ascii_lowercase(), body)
}

async fn answering_upstream() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("ok"))));
    up
}

#[tokio::test]
async fn a_client_over_max_connections_gets_a_fast_503_and_readyz_says_not_ready() {
    let up = answering_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_connections = 2;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    eventually(async || get(gw.admin, "/readyz").await.status == StatusCode::OK).await;

    // Two served connections, each proven open by an answer.
    let mut a = Client::connect(gw.addr).await;
    let mut b = Client::connect(gw.addr).await;
    assert_eq!(a.post("/", CALL).await.status, StatusCode::OK);
    assert_eq!(b.post("/", CALL).await.status, StatusCode::OK);

    let ready = get(gw.admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.text(), "not ready: at max_connections\n");

    // The third is answered and closed, well before any of the idle limits.
    let mut third = raw_tcp(gw.addr).await;
    third.write(raw_call()).await.unwrap();
    let got = third.read_until_closed_within(Duration::from_secs(5)).await;
    let (status, head, body) = split_answer(&got);
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body["error"]["code"], -32083, "{body}");
    assert_eq!(body["error"]["data"]["reason"], "max_connections", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("http.max_connections")),
        "{body}"
    );

    // HTTP/2 gets the same answer on its stream.
    let h2 = H2Client::connect(gw.addr).await;
    let answer = h2.post("/", CALL).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json()["error"]["data"]["reason"], "max_connections");
    assert_eq!(answer.header("retry-after"), Some("1"));

    assert!(
        metric(
            gw.admin,
            r#"rpcgate_http_connections_refused_total{reason="max_connections"}"#
        )
        .await
            >= 2.0
    );
    assert_eq!(metric(gw.admin, "rpcgate_http_connections_open").await, 2.0);
    assert_eq!(metric(gw.admin, "rpcgate_ready").await, 0.0);

    // Closing the served ones makes room again.
    drop((a, b));
    eventually(async || get(gw.admin, "/readyz").await.status == StatusCode::OK).await;
    assert_eq!(metric(gw.admin, "rpcgate_http_connections_open").await, 0.0);
    assert_eq!(post(gw.addr, "/", CALL).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_stops_reading_large_answers_is_dropped_after_write_timeout() {
    let up = FakeUpstream::start().await;
    // ~2 MB per answer: four of them are more than the two kernels' socket buffers hold.
    let big = "x".repeat(2 * 1024 * 1024);
    up.auto_reply(move |f| Some(f.result_text(json!(big))));
    let mut config = config_for(&[up.url()], 1);
    config.http.write_timeout = Duration::from_millis(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    // A small receive buffer, set before connecting so the window stays small too.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = with_timeout(socket.connect(gw.addr)).await.unwrap();
    let requests = raw_call().repeat(4);
    with_timeout(stream.write_all(requests.as_bytes()))
        .await
        .unwrap();

    // Served, answers pending, and then dropped although not one byte was read.
    eventually(async || metric(gw.admin, "rpcgate_http_connections_open").await == 1.0).await;
    eventually(async || {
        let text = get(gw.admin, "/metrics").await.text();
        sample(&text, "rpcgate_http_connections_open") == 0.0
            && sample(&text, "rpcgate_memory_budget_used_bytes") == 0.0
    })
    .await;

    // What the kernel had buffered still arrives, then the end: closed by the gateway.
    let mut received = 0usize;
    let mut buf = vec![0; 64 * 1024];
    with_timeout(async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(
        received < 4 * 2 * 1024 * 1024,
        "all four answers arrived ({received} bytes): the client was never stalled"
    );
    // Everyone else is still served.
    up.auto_reply(|f| Some(f.result_text(json!("ok"))));
    assert_eq!(post(gw.addr, "/", CALL).await.status, StatusCode::OK);
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// A POST of `CALL` on `stream`, as HEADERS (HPACK, static-table names, no Huffman)
/// and one DATA frame that ends the stream.
fn h2_call(stream: u32) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x84]; // :method POST, :scheme http, :path /
    block.extend([0x01, 1, b'x']); // :authority x, literal, not indexed
    let json = b"application/json";
    block.extend([0x0f, 0x10, json.len() as u8]); // content-type (static index 31)
    block.extend(json);
    let mut out = h2_frame(0x1, 0x4, stream, &block); // END_HEADERS
    out.extend(h2_frame(0x0, 0x1, stream, CALL.as_bytes())); // END_STREAM
    out
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_is_dropped_after_write_timeout() {
    let up = FakeUpstream::start().await;
    let big = "x".repeat(2 * 1024 * 1024);
    up.auto_reply(move |f| Some(f.result_text(json!(big))));
    let mut config = config_for(&[up.url()], 1);
    config.http.write_timeout = Duration::from_millis(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = with_timeout(socket.connect(gw.addr)).await.unwrap();
    // Windows wide open, so that only the socket can hold the answers back.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let max_window: u32 = (1 << 31) - 1;
    let mut settings = vec![0x00, 0x04]; // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend(max_window.to_be_bytes());
    hello.extend(h2_frame(0x4, 0, 0, &settings));
    hello.extend(h2_frame(0x8, 0, 0, &(max_window - 65_535).to_be_bytes()));
    for id in [1, 3, 5, 7] {
        hello.extend(h2_call(id));
    }
    with_timeout(stream.write_all(&hello)).await.unwrap();

    eventually(async || metric(gw.admin, "rpcgate_http_connections_open").await == 1.0).await;
    eventually(async || {
        let text = get(gw.admin, "/metrics").await.text();
        sample(&text, "rpcgate_http_connections_open") == 0.0
            && sample(&text, "rpcgate_memory_budget_used_bytes") == 0.0
    })
    .await;
    let mut received = 0usize;
    let mut buf = vec![0; 64 * 1024];
    with_timeout(async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(
        received < 4 * 2 * 1024 * 1024,
        "all four answers arrived ({received} bytes): the client was never stalled"
    );
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_is_refused_and_others_are_served() {
    let up = answering_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_header_bytes = 16 * 1024;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let mut tcp = raw_tcp(gw.addr).await;
    let big = "a".repeat(40 * 1024);
    // The gateway may close before all of it is written; that is the point.
    let _ = tcp
        .write(format!(
            "POST / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
    let got = tcp.read_until_closed().await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "an oversized head gets 431 or a closed connection: {text}"
    );

    // A head under the limit is still fine, on a new connection and on HTTP/2.
    let fine = "a".repeat(8 * 1024);
    let answer = request(
        gw.addr,
        Method::POST,
        "/",
        &[("content-type", "application/json"), ("x-fine", &fine)],
        CALL,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let h2 = H2Client::connect(gw.addr).await;
    assert_eq!(h2.post("/", CALL).await.status, StatusCode::OK);
}

#[tokio::test]
async fn partial_request_lines_are_dropped_after_header_read_timeout_and_cost_others_nothing() {
    let up = answering_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.header_read_timeout = Duration::from_millis(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let mut partial = Vec::new();
    for _ in 0..200 {
        let mut tcp = raw_tcp(gw.addr).await;
        tcp.write("POST / HT").await.unwrap();
        partial.push(tcp);
    }
    eventually(async || metric(gw.admin, "rpcgate_http_connections_open").await >= 200.0).await;
    // A normal call is answered meanwhile.
    assert_eq!(post(gw.addr, "/", CALL).await.status, StatusCode::OK);

    // Each is closed without an answer, long before keep_alive_timeout (60s).
    for tcp in &mut partial {
        let got = tcp.read_until_closed_within(Duration::from_secs(5)).await;
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    eventually(async || metric(gw.admin, "rpcgate_http_connections_open").await == 0.0).await;
}
