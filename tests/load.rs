//! Many clients, few upstream sockets, replies in random order: nobody gets another
//! client's answer.

mod support;

use http::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{Client, FakeUpstream, with_timeout_of};

const CLIENTS: usize = 200;
const CALLS_PER_CLIENT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_calls_from_200_clients_over_2_connections_all_matched() {
    let up = FakeUpstream::start().await;
    // Random delays reorder replies on each connection; correctness never depends on them.
    up.auto_reply_with_delay(Duration::from_millis(3), |f| {
        Some(f.result_text(json!({ "echo": f.params().cloned().unwrap_or_default() })))
    });
    let gw = start_gateway(config_for(&[up.url()], 2)).await;
    gw.wait_open(2).await;

    let clients = (0..CLIENTS).map(|c| {
        let addr = gw.addr;
        tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            for i in 0..CALLS_PER_CLIENT {
                let nonce = format!("{c}-{i}-{}", fastrand::u64(..));
                // Every client uses the same small ids: rewriting must keep them apart.
                let body = json!({"jsonrpc":"2.0","id": i,"method":"echo","params":[nonce]});
                let resp = client.post("/", body.to_string()).await;
                assert_eq!(resp.status, StatusCode::OK);
                let v = resp.json();
                assert_eq!(v["id"], json!(i));
                assert_eq!(
                    v["result"]["echo"][0],
                    Value::String(nonce),
                    "client {c} call {i}"
                );
            }
        })
    });
    let all = futures_util::future::join_all(clients);
    for outcome in with_timeout_of(Duration::from_secs(120), all).await {
        outcome.expect("client task");
    }
    assert_eq!(up.frames_received(), CLIENTS * CALLS_PER_CLIENT);
    assert_eq!(up.total_connections(), 2, "all of it over the two sockets");
    assert_eq!(gw.upstreams.pending_calls(), 0);
}
