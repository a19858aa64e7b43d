//! Batches, split and forwarded: order, invalid elements, notifications, limits.

mod support;

use http::StatusCode;
use rpcgate::config::BatchMode;
use serde_json::{Value, json};
use support::gateway::{config_for, start_gateway};
use support::{FakeUpstream, Incoming, post, with_timeout};

#[tokio::test]
async fn split_batch_keeps_request_order_when_replies_come_back_reversed() {
    let up = FakeUpstream::start().await;
    let gw = start_gateway(config_for(&[up.url()], 2)).await;
    gw.wait_open(2).await;
    let body = r#"[
        {"jsonrpc":"2.0","id":"first","method":"m","params":[1]},
        {"jsonrpc":"2.0","method":"note","params":[2]},
        {"jsonrpc":"2.0","id":2,"method":"m","params":[3]},
        {"jsonrpc":"2.0","id":null,"method":"m","params":[4]}
    ]"#;
    let call = tokio::spawn(post(gw.addr, "/", body));
    let mut frames: Vec<Incoming> = Vec::new();
    for _ in 0..4 {
        frames.push(up.next_frame().await);
    }
    // Each element travelled as its own frame, spread over both connections.
    assert!(frames.iter().all(|f| f.batch().is_none()));
    let conns: std::collections::HashSet<_> = frames.iter().map(|f| f.conn).collect();
    assert_eq!(conns.len(), 2, "calls spread over connections");
    for f in frames.iter().rev() {
        if f.id().is_some() {
            let p = f.params().unwrap()[0].clone();
            f.reply_result(json!({ "echo": p }));
        }
    }
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.json(),
        json!([
            {"jsonrpc":"2.0","id":"first","result":{"echo":1}},
            {"jsonrpc":"2.0","id":2,"result":{"echo":3}},
            {"jsonrpc":"2.0","id":null,"result":{"echo":4}}
        ])
    );
}

#[tokio::test]
async fn invalid_elements_get_their_own_error_and_the_rest_still_runs() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("ran"))));
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let body = r#"[1, {"jsonrpc":"2.0","id":"ok","method":"m"}, {"jsonrpc":"1.0","id":"bad","method":"m"}, "x"]"#;
    let resp = post(gw.addr, "/", body).await;
    assert_eq!(resp.status, StatusCode::OK);
    let v = resp.json();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["error"]["code"], -32600);
    assert_eq!(items[0]["id"], Value::Null);
    assert_eq!(items[1], json!({"jsonrpc":"2.0","id":"ok","result":"ran"}));
    assert_eq!(items[2]["error"]["code"], -32600);
    assert_eq!(items[2]["id"], "bad");
    assert_eq!(items[3]["error"]["code"], -32600);
    assert_eq!(up.frames_received(), 1, "only the valid call went upstream");
}

#[tokio::test]
async fn only_notifications_is_204_and_empty_or_oversized_batches_are_400() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_batch_size = 3;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let resp = post(
        gw.addr,
        "/",
        r#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","method":"b"}]"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);
    assert!(resp.body.is_empty());
    let got = [up.next_frame().await, up.next_frame().await];
    assert!(got.iter().all(|f| f.json.get("id").is_none()));

    let resp = post(gw.addr, "/", " [ ] ").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let v = resp.json();
    assert!(v.is_object(), "a single error object, not an array: {v}");
    assert_eq!(v["error"]["code"], -32600);

    let four = r#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":2,"method":"a"},{"jsonrpc":"2.0","id":3,"method":"a"},{"jsonrpc":"2.0","id":4,"method":"a"}]"#;
    let resp = post(gw.addr, "/", four).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let v = resp.json();
    assert_eq!(v["error"]["code"], -32600);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_batch_size 3"),
        "message names the limit: {v}"
    );

    let resp = post(gw.addr, "/", r#"[{"jsonrpc":"2.0","id":1,"method":"a"},"#).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.json()["error"]["code"], -32700);
}

#[tokio::test]
async fn forward_mode_sends_one_frame_with_rewritten_ids() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 2);
    config.http.batch = BatchMode::Forward;
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;
    let body = r#"[
        {"jsonrpc":"2.0","id":"a","method":"m","params":[1]},
        {"jsonrpc":"2.0","method":"note"},
        7,
        {"jsonrpc":"2.0","id":12345678901234567890123,"method":"m","params":[2]}
    ]"#;
    let call = tokio::spawn(post(gw.addr, "/", body));
    let frame = up.next_frame().await;
    let batch = frame.batch().expect("one frame holding the batch").to_vec();
    assert_eq!(
        batch.len(),
        3,
        "the invalid element stays behind: {}",
        frame.text
    );
    assert!(batch[1].get("id").is_none(), "the notification keeps no id");
    let ids: Vec<&Value> = [&batch[0], &batch[2]].iter().map(|c| &c["id"]).collect();
    assert!(ids.iter().all(|id| id.is_u64()), "ids rewritten: {ids:?}");
    assert_ne!(ids[0], ids[1]);
    // Reply in reverse order, as a batch.
    frame.reply_batch(vec![
        json!({"jsonrpc":"2.0","id":ids[1],"result":"second"}),
        json!({"jsonrpc":"2.0","id":ids[0],"result":"first"}),
    ]);
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let text = resp.text();
    let v = resp.json();
    assert_eq!(v[0], json!({"jsonrpc":"2.0","id":"a","result":"first"}));
    assert_eq!(v[1]["error"]["code"], -32600);
    assert_eq!(v[2]["result"], "second");
    assert!(
        text.contains(r#""id":12345678901234567890123"#),
        "big id restored byte for byte: {text}"
    );
}
