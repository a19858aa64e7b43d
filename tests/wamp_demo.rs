//! `rpcgate demo --wamp URL`: the real binary fronts a real Crossbar.io router (and the
//! Autobahn component) next to the echo demo, and what it prints works as printed.

mod support;

use serde_json::{Value, json};
use std::net::SocketAddr;
use support::binary::line_after;
use support::crossbar::{Component, Router};
use support::http::post;
use support::with_timeout;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `http://127.0.0.1:PORT/ -> ...` → the address.
fn addr_of(line: &str) -> SocketAddr {
    let url = line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[tokio::test]
async fn demo_with_a_wamp_router_serves_its_procedures_next_to_the_echo_backend() {
    let router = Router::start().await;
    let _component = Component::start(&router).await;
    let mut child = support::binary::rpcgate(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--wamp",
            &router.url(),
            "--wamp-prefix",
            "com.example.",
            "--wamp-listen",
            "127.0.0.1:0",
        ],
        std::process::Stdio::null(),
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let wamp = addr_of(&line_after(&mut lines, "WAMP:").await);
    // The printed call, with the demo's placeholder procedure made a real one.
    let curl = line_after(&mut lines, "curl -s").await;
    let body = curl
        .split("-d '")
        .nth(1)
        .unwrap()
        .trim_end_matches('\'')
        .replace("<procedure>", "add2");
    let echo = addr_of(&line_after(&mut lines, "rpcgate demo:").await);
    // The connection joins in the background: retried, bounded, until the router answers.
    let mut answer = Value::Null;
    for _ in 0..100 {
        answer = post(wamp, "/", body.clone()).await.json();
        if answer.get("result").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(answer, json!({"jsonrpc":"2.0","id":1,"result":5}));
    let whoami = post(echo, "/", r#"{"jsonrpc":"2.0","id":2,"method":"whoami"}"#).await;
    assert_eq!(
        whoami.json()["result"],
        "demo-echo",
        "the echo demo still runs"
    );
    support::binary::signal(&child, "-TERM");
    assert!(with_timeout(child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn demo_wamp_flags_need_a_router() {
    let out = with_timeout(
        support::binary::rpcgate(&["demo", "--wamp-realm", "x"], std::process::Stdio::piped())
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--wamp <WAMP>"), "{stderr}");
}
