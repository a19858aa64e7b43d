//! Clients that stall are cut off; idle keep-alive connections are bounded.
//!
//! The clock is paused: timers fire as soon as everything else is idle, so these tests
//! wait for events, never for wall-clock time.

mod support;

use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{FakeUpstream, raw_tcp};

const LIMIT: Duration = Duration::from_secs(120);

async fn gateway() -> (FakeUpstream, support::gateway::TestGateway) {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.header_read_timeout = Duration::from_secs(5);
    config.http.body_read_timeout = Duration::from_secs(5);
    config.http.keep_alive_timeout = Duration::from_secs(20);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    (up, gw)
}

#[tokio::test(start_paused = true)]
async fn unfinished_headers_are_cut_off() {
    let (_up, gw) = gateway().await;
    let mut tcp = raw_tcp(gw.addr).await;
    tcp.write("POST / HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
        .await
        .unwrap();
    let got = tcp.read_until_closed_within(LIMIT).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.starts_with("HTTP/1.1 2"),
        "no success for half a request: {text}"
    );
}

#[tokio::test(start_paused = true)]
async fn unfinished_body_is_answered_408_and_never_forwarded() {
    let (up, gw) = gateway().await;
    let mut tcp = raw_tcp(gw.addr).await;
    tcp.write("POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"jsonrpc\"")
        .await
        .unwrap();
    let got = tcp.read_until_closed_within(LIMIT).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("-32094"), "{text}");
    assert_eq!(up.frames_received(), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connections_are_closed() {
    let (up, gw) = gateway().await;
    up.auto_reply(|f| Some(f.result_text(serde_json::json!(1))));
    let mut tcp = raw_tcp(gw.addr).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;
    tcp.write(format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await
    .unwrap();
    // The answer arrives, then the connection idles until the gateway closes it.
    let got = tcp.read_until_closed_within(LIMIT).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with(r#""result":1}"#), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_speaks_is_closed() {
    let (_up, gw) = gateway().await;
    let mut tcp = raw_tcp(gw.addr).await;
    let got = tcp.read_until_closed_within(LIMIT).await;
    assert!(got.is_empty());
}

#[tokio::test(start_paused = true)]
async fn keep_alive_outlasts_the_header_timeout_between_requests() {
    let (up, gw) = gateway().await;
    up.auto_reply(|f| Some(f.result_text(serde_json::json!("again"))));
    let mut client = support::Client::connect(gw.addr).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;
    assert_eq!(client.post("/", body).await.status, http::StatusCode::OK);
    // Longer than header_read_timeout (5s), shorter than keep_alive_timeout (20s); the
    // paused clock makes this exact.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!client.is_closed());
    let resp = client.post("/", body).await;
    assert_eq!(resp.json()["result"], "again");
}
