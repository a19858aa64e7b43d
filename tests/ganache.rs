//! rpcgate in front of an Ethereum node we did not write: ganache's `eth_subscribe`
//! (`newHeads`, `logs`) through WebSocket clients of rpcgate and through HTTP sessions
//! reading event streams and long-polls, with `--subscription ethereum` over shared upstream
//! connections.
//!
//! Needs ganache (`.ci/run` installs it; see `tests/support/ganache.rs`).

mod support;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use rpcgate::config::SubscriptionRule;
use serde_json::{Value, json};
use support::ganache::{Ganache, hex};
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::{JSON, request};
use support::with_timeout;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A gateway with four shared connections to `ganache`, tracking `eth_subscribe`.
async fn gateway(ganache: &Ganache) -> TestGateway {
    let mut config = config_for(&[ganache.ws_url()], 4);
    config.subscriptions = vec![SubscriptionRule::preset("ethereum").expect("a preset")];
    let gw = start_gateway(config).await;
    gw.wait_open(4).await;
    gw
}

async fn ws(gw: &TestGateway) -> Ws {
    let (ws, _) = with_timeout(tokio_tungstenite::connect_async(format!(
        "ws://{}/",
        gw.addr
    )))
    .await
    .expect("WebSocket to rpcgate");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    with_timeout(ws.send(Message::text(v.to_string())))
        .await
        .expect("send");
}

/// The next text frame, as JSON.
async fn next(ws: &mut Ws) -> Value {
    loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON frame"),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

/// The reply to call `id`, skipping notifications that arrive first.
async fn reply(ws: &mut Ws, id: u64) -> Value {
    loop {
        let v = next(ws).await;
        if v["id"] == id {
            return v;
        }
    }
}

async fn post_in(gw: &TestGateway, session: &str, body: Value) -> Value {
    let headers = [JSON, ("rpcgate-session", session)];
    let resp = request(gw.addr, Method::POST, "/", &headers, body.to_string()).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    resp.json()
}

/// One long-poll of `session`'s events after `after`, waiting up to 5 s.
async fn poll(gw: &TestGateway, session: &str, after: u64) -> Vec<Value> {
    let path = format!("/events?session={session}&after={after}&wait=5");
    let resp = request(gw.addr, Method::GET, &path, &[], "").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    resp.json().as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn new_heads_reach_the_websocket_client_that_subscribed_under_its_id() {
    let ganache = Ganache::start().await;
    let gw = gateway(&ganache).await;
    let mut alice = ws(&gw).await;
    let mut bob = ws(&gw).await;
    send(
        &mut alice,
        json!({"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]}),
    )
    .await;
    let sub = reply(&mut alice, 1).await["result"].clone();
    assert!(sub.is_string(), "a subscription id: {sub}");
    let block = ganache.mine().await;
    let note = next(&mut alice).await;
    assert_eq!(note["method"], "eth_subscription", "{note}");
    assert_eq!(note["params"]["subscription"], sub);
    assert_eq!(
        u64::from_str_radix(
            note["params"]["result"]["number"]
                .as_str()
                .unwrap()
                .trim_start_matches("0x"),
            16
        )
        .unwrap(),
        block
    );
    // Bob subscribed to nothing: his socket gets only his own call's reply.
    send(
        &mut bob,
        json!({"jsonrpc":"2.0","id":7,"method":"eth_blockNumber"}),
    )
    .await;
    let own = next(&mut bob).await;
    assert_eq!(own["id"], 7, "bob got something else first: {own}");

    // Whatever socket the subscription is on, unsubscribing with the client's id works.
    send(
        &mut alice,
        json!({"jsonrpc":"2.0","id":2,"method":"eth_unsubscribe","params":[sub]}),
    )
    .await;
    assert_eq!(reply(&mut alice, 2).await["result"], true);
}

#[tokio::test]
async fn an_http_session_long_polls_its_logs_and_unsubscribes_on_the_right_socket() {
    let ganache = Ganache::start().await;
    let gw = gateway(&ganache).await;
    let filter = json!({"address": ganache.log_contract()});
    // Several sessions, so subscriptions spread over the four sockets: each
    // unsubscribe must still find its own.
    let mut subs = Vec::new();
    for i in 0..6 {
        let session = format!("s{i}");
        let v = post_in(
            &gw,
            &session,
            json!({"jsonrpc":"2.0","id":i,"method":"eth_subscribe","params":["logs", filter]}),
        )
        .await;
        subs.push((session, v["result"].clone()));
    }
    let emitted = ganache.emit_log([7; 32], b"hello").await;
    for (session, sub) in &subs {
        let events = poll(&gw, session, 0).await;
        let logs: Vec<&Value> = events
            .iter()
            .filter(|e| e["message"]["method"] == "eth_subscription")
            .collect();
        assert_eq!(logs.len(), 1, "{session}: {events:?}");
        let params = &logs[0]["message"]["params"];
        assert_eq!(
            &params["subscription"], sub,
            "{session} got another's notification"
        );
        assert_eq!(
            params["result"]["transactionHash"],
            json!(emitted.transaction_hash)
        );
        assert_eq!(params["result"]["topics"][0], json!(hex(&[7; 32])));
    }
    for (i, (session, sub)) in subs.iter().enumerate() {
        let v = post_in(
            &gw,
            session,
            json!({"jsonrpc":"2.0","id":i,"method":"eth_unsubscribe","params":[sub]}),
        )
        .await;
        assert_eq!(v["result"], true, "{session}: {v}");
    }
}

#[tokio::test]
async fn a_subscribe_call_with_nowhere_to_deliver_is_refused_not_dropped() {
    let ganache = Ganache::start().await;
    let gw = gateway(&ganache).await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]});
    let resp = request(gw.addr, Method::POST, "/", &[JSON], body.to_string()).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let v = resp.json();
    assert_eq!(v["error"]["code"], -32088, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("/events"),
        "{v}"
    );
}

#[tokio::test]
async fn new_heads_reach_an_http_sessions_event_stream() {
    let ganache = Ganache::start().await;
    let gw = gateway(&ganache).await;
    let mut stream = support::sse::stream_of(gw.addr, "heads").await;
    let v = post_in(
        &gw,
        "heads",
        json!({"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]}),
    )
    .await;
    let sub = v["result"].clone();
    for _ in 0..2 {
        let block = ganache.mine().await;
        let event = stream.event().await;
        let note = event.json();
        assert_eq!(note["params"]["subscription"], sub, "{note}");
        let number = note["params"]["result"]["number"]
            .as_str()
            .expect("a block number");
        assert_eq!(
            u64::from_str_radix(number.trim_start_matches("0x"), 16).unwrap(),
            block
        );
    }
}
