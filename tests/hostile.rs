//! Hostile and unlucky clients against the memory budget: what used to grow without
//! bound now gets a fast 503, and what is held is given back when its owner goes.
//! Sizes are scaled down (megabytes, not gigabytes): the limits are set to match.

mod support;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{FakeUpstream, post, raw_tcp, request, with_timeout};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The value of an unlabelled sample on the admin listener's `/metrics`.
async fn gauge(admin: SocketAddr, name: &str) -> f64 {
    let text = request(admin, Method::GET, "/metrics", &[], "")
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Polls until the gateway holds nothing for clients any more.
async fn budget_drains(admin: SocketAddr) {
    with_timeout(async {
        while gauge(admin, "rpcgate_memory_budget_used_bytes").await > 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn call_of(size: usize, id: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"store","params":["{}"]}}"#,
        "x".repeat(size)
    )
}

/// Many large calls to an upstream that is slow to answer: past `limits.memory` the
/// rest are refused at once instead of piling up, every admitted call is answered,
/// and the budget is given back.
#[tokio::test]
async fn large_calls_past_the_memory_budget_get_a_fast_503_and_the_rest_are_answered() {
    const CALLS: usize = 24;
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 2);
    config.limits.memory = Some(8 * MIB);
    config.limits.connection_bytes = 4 * MIB;
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;
    assert_eq!(
        gauge(gw.admin, "rpcgate_memory_budget_limit_bytes").await,
        (8 * MIB) as f64
    );

    // 512 KiB each, counted twice until the frame is written (body and frame): at
    // most 16 fit in 8 MiB, fewer while frames wait; the upstream answers none yet.
    let calls: Vec<_> = (0..CALLS)
        .map(|i| tokio::spawn(post(gw.addr, "/", call_of(512 * KIB, i))))
        .collect();
    // Every call either reached the upstream or was refused, and the refused ones were
    // answered while the upstream still sat on the others.
    with_timeout(async {
        while calls.iter().filter(|c| c.is_finished()).count() + up.frames_received() < CALLS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (done, waiting): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.is_finished());
    assert!(!done.is_empty(), "some calls must be refused past 8 MiB");
    assert!(!waiting.is_empty(), "some calls must be admitted");
    for call in done {
        let resp = call.await.unwrap();
        assert_eq!(
            resp.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            resp.text()
        );
        assert_eq!(resp.header("retry-after"), Some("1"));
        let v: Value = resp.json();
        assert_eq!(v["error"]["code"], -32083);
        assert_eq!(v["error"]["data"]["reason"], "memory", "{v}");
    }
    let held = gauge(gw.admin, "rpcgate_memory_budget_used_bytes").await;
    assert!(held <= (8 * MIB) as f64, "held {held} bytes");
    assert!(
        held >= (waiting.len() * 512 * KIB) as f64,
        "each of the {} admitted calls holds its body: {held}",
        waiting.len()
    );
    // The upstream answers every admitted call now, and each gets its own answer.
    for _ in 0..waiting.len() {
        let frame = up.next_frame().await;
        let tag = frame.id().cloned().unwrap_or_default();
        frame.reply_result(json!({ "stored": tag }));
    }
    for call in waiting {
        let resp = with_timeout(call).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    }
    budget_drains(gw.admin).await;
    // And it serves again, a large call included.
    up.auto_reply(|f| Some(f.result_text(json!("stored"))));
    let resp = post(gw.addr, "/", call_of(512 * KIB, 99)).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
}

/// A declared body that cannot fit is refused before a byte of it is sent.
#[tokio::test]
async fn a_declared_body_past_the_budget_is_refused_before_it_is_read() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_body_bytes = 4 * MIB;
    config.limits.memory = Some(MIB);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let mut tcp = raw_tcp(gw.addr).await;
    let head = format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        2 * MIB
    );
    tcp.write(head).await.unwrap();
    // No body sent: the answer comes anyway.
    let answer = String::from_utf8_lossy(&tcp.read_some().await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"reason\":\"memory\""), "{answer}");
    assert_eq!(up.frames_received(), 0);
    assert_eq!(
        gauge(gw.admin, "rpcgate_memory_budget_used_bytes").await,
        0.0
    );
}

/// One connection cannot take the whole budget: its own limit refuses it while other
/// clients still get through.
#[tokio::test]
async fn one_connection_past_its_own_budget_does_not_starve_the_others() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.limits.memory = Some(64 * MIB);
    // Four 512 KiB calls and their JSON around them, not five; two while each one's
    // frame is still queued too (body and frame both charged until it is written).
    config.limits.connection_bytes = 2 * MIB + 4 * KIB;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    // One HTTP/2 connection, many 512 KiB streams: only some fit its 2 MiB.
    let h2 = support::H2Client::connect(gw.addr).await;
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let h2 = h2.clone();
            tokio::spawn(async move { h2.post("/", call_of(512 * KIB, i)).await })
        })
        .collect();
    // Every stream either reached the upstream or was refused, while the upstream
    // still sat on the others.
    with_timeout(async {
        while streams.iter().filter(|s| s.is_finished()).count() + up.frames_received() < 8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let admitted = up.frames_received();
    assert!((2..=4).contains(&admitted), "{admitted} of 8 admitted");
    let mut first = Vec::new();
    for _ in 0..admitted {
        first.push(up.next_frame().await);
    }
    // Another client is not affected.
    let other = tokio::spawn(post(gw.addr, "/", call_of(KIB, 100)));
    let frame = up.next_frame().await;
    frame.reply_result(json!("other"));
    assert_eq!(with_timeout(other).await.unwrap().json()["result"], "other");
    for frame in first {
        frame.reply_result(json!("stored"));
    }
    let (mut ok, mut refused) = (0, 0);
    for stream in streams {
        let resp = with_timeout(stream).await.unwrap();
        match resp.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(resp.json()["error"]["data"]["reason"], "memory");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", resp.text()),
        }
    }
    assert_eq!((ok, refused), (admitted, 8 - admitted));
    budget_drains(gw.admin).await;
}
