//! Per-client limits on `affinity = "connection"` sessions, end to end: one client
//! address cannot hold more than `sessions.max_per_client` upstream sockets nor open
//! more than `sessions.new_per_client_per_minute` sessions, whatever keys it makes up;
//! other clients are not affected, and a client gets its room back as its sessions close.
//!
//! Every test runs on loopback, so clients are told apart by `sessions.client_ip_header`
//! (`x-forwarded-for`), as they would be behind a proxy.

mod support;

use http::{Method, StatusCode};
use parking_lot::Mutex;
use rpcgate::config::{Affinity, Config};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::JSON;
use support::{FakeUpstream, Response, request};

const HEADER: &str = "rpcgate-session";
const FORWARDED: &str = "x-forwarded-for";

/// Answers `count` with 1, 2, 3… per upstream socket: a session that still has its
/// socket counts on, a new one starts at 1.
fn counting(up: &FakeUpstream) {
    let counters: Mutex<HashMap<usize, u64>> = Mutex::new(HashMap::new());
    up.auto_reply(move |f| {
        (f.method() == Some("count")).then(|| {
            let mut counters = counters.lock();
            let n = counters.entry(f.conn).or_insert(0);
            *n += 1;
            f.result_text(json!(*n))
        })
    });
}

/// `affinity = "connection"` with clients told apart by `x-forwarded-for`.
fn limited(up: &FakeUpstream, max_per_client: usize, per_minute: usize) -> Config {
    let mut config = config_for(&[up.url()], 1);
    config.sessions.affinity = Affinity::Connection;
    config.sessions.client_ip_header = Some(FORWARDED.into());
    config.sessions.max_per_client = max_per_client;
    config.sessions.new_per_client_per_minute = per_minute;
    config
}

/// A `count` call in session `session` from the client `forwarded_for` says it is.
async fn count_as(gw: &TestGateway, session: &str, forwarded_for: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "count"}).to_string();
    let headers = [JSON, (HEADER, session), (FORWARDED, forwarded_for)];
    request(gw.addr, Method::POST, "/", &headers, body).await
}

/// The number a session's socket counted to; panics on anything but a result.
#[track_caller]
fn counted(resp: &Response) -> u64 {
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    resp.json()["result"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {}", resp.text()))
}

/// Asserts the per-client refusal, naming `setting` in its message, and returns it.
#[track_caller]
fn refused(resp: &Response, setting: &str) -> Value {
    refused_retry_after(resp, setting, "1")
}

/// [`refused`], with the `Retry-After` the refusal must carry.
#[track_caller]
fn refused_retry_after(resp: &Response, setting: &str, retry_after: &str) -> Value {
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        resp.text()
    );
    assert_eq!(resp.header("retry-after"), Some(retry_after));
    let v = resp.json();
    assert_eq!(v["error"]["code"], -32087, "{v}");
    assert_eq!(
        v["error"]["data"]["kind"], "too_many_client_sessions",
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(setting), "{message:?} names {setting}");
    v
}

/// `rpcgate_sessions_refused_total{reason}` as /metrics shows it.
async fn refusals(admin: SocketAddr, reason: &str) -> f64 {
    let text = request(admin, Method::GET, "/metrics", &[], "")
        .await
        .text();
    let series = format!("rpcgate_sessions_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_past_max_per_client_is_refused_while_its_open_sessions_keep_answering() {
    let up = FakeUpstream::start().await;
    counting(&up);
    let gw = start_gateway(limited(&up, 3, 1000)).await;
    gw.wait_open(1).await;

    for key in ["a1", "a2", "a3"] {
        assert_eq!(counted(&count_as(&gw, key, "10.0.0.1").await), 1, "{key}");
    }
    refused(
        &count_as(&gw, "a4", "10.0.0.1").await,
        "sessions.max_per_client",
    );
    // Only the address the proxy appended counts, not what the client wrote before it.
    refused(
        &count_as(&gw, "a5", "192.0.2.9, 10.0.0.1").await,
        "sessions.max_per_client",
    );
    for key in ["a1", "a2", "a3"] {
        assert_eq!(
            counted(&count_as(&gw, key, "10.0.0.1").await),
            2,
            "{key} still has its socket"
        );
    }

    // Another address is not affected.
    assert_eq!(counted(&count_as(&gw, "b1", "10.0.0.2").await), 1);
    assert_eq!(counted(&count_as(&gw, "b1", "10.0.0.2").await), 2);
    assert_eq!(
        up.total_connections(),
        1 + 3 + 1,
        "the pooled socket, a's three sessions and b's: none for the refused keys"
    );
    assert_eq!(refusals(gw.admin, "max_per_client").await, 2.0);
}

#[tokio::test]
async fn a_client_opens_new_sessions_again_once_its_idle_ones_have_closed() {
    let up = FakeUpstream::start().await;
    counting(&up);
    let mut config = limited(&up, 2, 1000);
    // Long enough that no session expires before the refusal is seen, even on a
    // loaded machine; the test waits for the closes it needs, never for this long.
    config.sessions.idle_timeout = Duration::from_secs(1);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    assert_eq!(counted(&count_as(&gw, "a1", "10.0.0.1").await), 1);
    assert_eq!(counted(&count_as(&gw, "a2", "10.0.0.1").await), 1);
    refused(
        &count_as(&gw, "a3", "10.0.0.1").await,
        "sessions.max_per_client",
    );
    // A session leaves the table before its socket closes: once the upstream sees
    // both sockets end, the client's count is back to zero.
    let sockets: Vec<usize> = up
        .received()
        .iter()
        .filter(|r| r.method() == Some("count"))
        .map(|r| r.conn)
        .collect();
    for socket in sockets {
        up.wait_for_connection_end(socket).await;
    }
    assert_eq!(counted(&count_as(&gw, "a3", "10.0.0.1").await), 1);
    assert_eq!(counted(&count_as(&gw, "a4", "10.0.0.1").await), 1);
    refused(
        &count_as(&gw, "a5", "10.0.0.1").await,
        "sessions.max_per_client",
    );
}

#[tokio::test]
async fn a_burst_of_new_sessions_past_the_creation_rate_is_refused() {
    let up = FakeUpstream::start().await;
    counting(&up);
    // Two a minute: the next allowance is 30s away, far beyond this test.
    let gw = start_gateway(limited(&up, 64, 2)).await;
    gw.wait_open(1).await;

    assert_eq!(counted(&count_as(&gw, "a1", "10.0.0.1").await), 1);
    assert_eq!(counted(&count_as(&gw, "a2", "10.0.0.1").await), 1);
    // Two a minute frees one every 30 s: a client told "1" would only be refused again.
    refused_retry_after(
        &count_as(&gw, "a3", "10.0.0.1").await,
        "sessions.new_per_client_per_minute",
        "30",
    );
    assert_eq!(
        counted(&count_as(&gw, "a1", "10.0.0.1").await),
        2,
        "open sessions are not rate limited"
    );
    assert_eq!(counted(&count_as(&gw, "b1", "10.0.0.2").await), 1);
    assert_eq!(refusals(gw.admin, "new_per_client_per_minute").await, 1.0);
    assert_eq!(up.total_connections(), 1 + 2 + 1);
}

#[tokio::test]
async fn without_client_ip_header_a_forwarded_address_is_not_believed() {
    let up = FakeUpstream::start().await;
    counting(&up);
    let mut config = limited(&up, 1, 1000);
    config.sessions.client_ip_header = None;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    assert_eq!(counted(&count_as(&gw, "a1", "10.0.0.1").await), 1);
    refused(
        &count_as(&gw, "a2", "10.0.0.2").await,
        "sessions.max_per_client",
    );
}
