//! Guards the harnesses for upstream pushes, talking to each upstream directly (a
//! tokio-tungstenite client, no gateway): ganache's `eth_subscribe` (`newHeads` after
//! `Ganache::mine`, `logs` after `Ganache::emit_log`) and the pushing methods of the Python
//! upstream (tests/interop/upstream.py: `notify_me`, `ticks_subscribe`/`ticks_unsubscribe`,
//! `ask`). If one of these fails, the gateway-level push tests built on them mean nothing.
//!
//! Needs `RPCGATE_GANACHE` (and, for Python, `RPCGATE_INTEROP_PYTHON`, else a virtualenv is
//! made under `target/interop-venv` as tests/interop.rs does): `.ci/run` sets both.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::ganache::{Ganache, ganache_package, hex, parse_quantity};
use support::python::PyUpstream;
use support::with_timeout;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A plain JSON-RPC client on one WebSocket connection.
struct Peer {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Peer {
    async fn connect(url: &str) -> Peer {
        let (ws, _) = with_timeout(tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Peer { ws }
    }

    async fn send(&mut self, message: Value) {
        with_timeout(self.ws.send(Message::text(message.to_string())))
            .await
            .expect("send");
    }

    /// The next JSON message, whatever it is.
    async fn recv(&mut self) -> Value {
        loop {
            let message = with_timeout(self.ws.next())
                .await
                .expect("the upstream closed the connection")
                .expect("read");
            let text = match message {
                Message::Text(text) => text.as_str().to_owned(),
                Message::Binary(bytes) => String::from_utf8(bytes.to_vec()).expect("utf-8"),
                _ => continue,
            };
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }

    /// Sends a call and returns the next message, which must be its reply.
    async fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let reply = self.recv().await;
        assert_eq!(
            reply["id"], id,
            "expected the reply to {method}, got {reply}"
        );
        reply
    }
}

// ---------------------------------------------------------------------------------------------
// ganache

#[tokio::test]
async fn ganache_new_heads_come_from_mine() {
    let ganache = Ganache::start().await;
    assert_eq!(
        ganache.account(),
        "0x90f8bf6a479f320ead074411a4b0e7944ea8c9c1",
        "deterministic wallet"
    );
    // Block 1 deployed the log contract; the miner is stopped since.
    assert_eq!(ganache.block_number().await, 1);

    let mut peer = Peer::connect(&ganache.ws_url()).await;
    let sub = peer.call(1, "eth_subscribe", json!(["newHeads"])).await["result"].clone();
    assert!(sub.is_string(), "subscription id: {sub}");
    // A transaction alone mines nothing (no instamine): the next message on this connection is
    // the reply to the call after it, not a block.
    let hash = ganache
        .call(
            "eth_sendTransaction",
            json!([{"from": ganache.account(), "to": ganache.account(), "value": "0x1"}]),
        )
        .await;
    assert_eq!(
        peer.call(2, "eth_blockNumber", json!([])).await["result"],
        "0x1"
    );
    assert_eq!(
        ganache
            .call("eth_getTransactionReceipt", json!([hash]))
            .await,
        Value::Null,
        "pending until mined"
    );

    for expected in [2u64, 3] {
        let n = ganache.mine().await;
        assert_eq!(n, expected);
        let note = peer.recv().await;
        assert_eq!(note["method"], "eth_subscription", "{note}");
        assert_eq!(note["params"]["subscription"], sub, "{note}");
        assert_eq!(
            parse_quantity(&note["params"]["result"]["number"]),
            n,
            "{note}"
        );
    }
    let receipt = ganache
        .call("eth_getTransactionReceipt", json!([hash]))
        .await;
    assert_eq!(
        receipt["blockNumber"], "0x2",
        "mined by the first mine(): {receipt}"
    );

    assert_eq!(
        peer.call(3, "eth_unsubscribe", json!([sub])).await["result"],
        true
    );
    ganache.mine().await;
    // Unsubscribed: the reply to the next call is the next message, no block before it.
    assert_eq!(
        peer.call(4, "eth_blockNumber", json!([])).await["result"],
        "0x4"
    );
}

#[tokio::test]
async fn ganache_logs_come_from_emit_log() {
    let ganache = Ganache::start().await;
    let mut peer = Peer::connect(&ganache.ws_url()).await;
    let filter = json!({"address": ganache.log_contract()});
    let logs = peer.call(1, "eth_subscribe", json!(["logs", filter])).await["result"].clone();
    let heads = peer.call(2, "eth_subscribe", json!(["newHeads"])).await["result"].clone();
    assert_ne!(logs, heads);

    let mut topic = [0u8; 32];
    topic[31] = 0x2a;
    for data in [&b""[..], b"hello, logs"] {
        let emitted = ganache.emit_log(topic, data).await;
        assert_eq!(emitted.log["topics"], json!([hex(&topic)]), "{:?}", emitted);
        assert_eq!(emitted.log["data"], hex(data));
        assert_eq!(emitted.log["address"], ganache.log_contract());

        // One block, so one newHeads and one logs notification; their order is ganache's.
        let mut log_note = None;
        let mut head_note = None;
        for _ in 0..2 {
            let note = peer.recv().await;
            assert_eq!(note["method"], "eth_subscription", "{note}");
            let sub = &note["params"]["subscription"];
            if *sub == logs {
                assert!(log_note.replace(note).is_none(), "two logs notifications");
            } else {
                assert_eq!(*sub, heads, "{note}");
                assert!(
                    head_note.replace(note).is_none(),
                    "two newHeads notifications"
                );
            }
        }
        let log = &log_note.expect("logs notification")["params"]["result"];
        let head = &head_note.expect("newHeads notification")["params"]["result"];
        assert_eq!(parse_quantity(&head["number"]), emitted.block_number);
        for field in [
            "address",
            "topics",
            "data",
            "blockNumber",
            "transactionHash",
            "logIndex",
        ] {
            assert_eq!(
                log[field], emitted.log[field],
                "{field}: {log} vs {}",
                emitted.log
            );
        }
        assert_eq!(log["transactionHash"], emitted.transaction_hash);
    }
}

#[tokio::test]
async fn ganaches_side_by_side_get_their_own_ports() {
    let (a, b) = tokio::join!(Ganache::start(), Ganache::start());
    assert_ne!(a.port(), b.port());
    a.mine().await;
    assert_eq!(a.block_number().await, 2);
    assert_eq!(b.block_number().await, 1);
}

#[test]
fn without_rpcgate_ganache_the_harness_says_to_run_ci_run() {
    let err = ganache_package(None).unwrap_err();
    assert!(
        err.contains("RPCGATE_GANACHE") && err.contains(".ci/run"),
        "{err}"
    );
    let err = ganache_package(Some("/nonexistent/ganache".into())).unwrap_err();
    assert!(err.contains(".ci/run"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The Python upstream (tests/interop/upstream.py), launched by tests/support/python.rs.

#[tokio::test]
async fn python_notify_me_replies_then_notifies() {
    let py = PyUpstream::start("py-selftest").await;
    let mut peer = Peer::connect(&py.url).await;
    let value = json!({"k": [1, "é"]});
    assert_eq!(
        peer.call(1, "notify_me", json!([value])).await["result"],
        true
    );
    assert_eq!(
        peer.recv().await,
        json!({"jsonrpc": "2.0", "method": "notice", "params": [value]})
    );
    // Sent as a notification it still pushes, and there is no reply.
    peer.send(json!({"jsonrpc": "2.0", "method": "notify_me", "params": [2]}))
        .await;
    assert_eq!(peer.recv().await["params"], json!([2]));
    let reply = peer.call(2, "notify_me", json!([])).await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    // The existing methods are untouched.
    assert_eq!(peer.call(3, "echo", json!([7])).await["result"], json!([7]));
}

#[tokio::test]
async fn python_ticks_count_until_unsubscribed() {
    let py = PyUpstream::start("py-selftest").await;
    let mut peer = Peer::connect(&py.url).await;
    let sub = peer.call(1, "ticks_subscribe", json!([10])).await["result"].clone();
    assert!(sub.is_string(), "{sub}");
    for n in 1..=3 {
        assert_eq!(
            peer.recv().await,
            json!({"jsonrpc": "2.0", "method": "ticks", "params": {"subscription": sub, "result": n}})
        );
    }
    // Ticks keep coming while the unsubscribe is on its way; none after its reply.
    peer.send(json!({"jsonrpc": "2.0", "id": 2, "method": "ticks_unsubscribe", "params": [sub]}))
        .await;
    let reply = loop {
        let message = peer.recv().await;
        if message.get("id").is_some() {
            break message;
        }
        assert_eq!(message["method"], "ticks", "{message}");
    };
    assert_eq!(reply, json!({"jsonrpc": "2.0", "id": 2, "result": true}));
    assert_eq!(
        peer.call(3, "ticks_unsubscribe", json!([sub])).await["result"],
        false
    );
    assert_eq!(
        peer.call(4, "echo", json!("after")).await["result"],
        "after"
    );

    // Two subscriptions on one connection have their own ids and counts.
    let a = peer.call(5, "ticks_subscribe", json!([15])).await["result"].clone();
    let b = peer.call(6, "ticks_subscribe", json!([15])).await["result"].clone();
    assert_ne!(a, b);
    let mut last = std::collections::HashMap::new();
    while last.len() < 2 || last.values().any(|n| *n < 2) {
        let note = peer.recv().await;
        let sub = note["params"]["subscription"]
            .as_str()
            .expect("id")
            .to_owned();
        let n = note["params"]["result"].as_u64().expect("count");
        let prev = last.insert(sub, n).unwrap_or(0);
        assert_eq!(n, prev + 1, "{note}");
    }
    let reply = peer.call(7, "ticks_subscribe", json!([0])).await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
}

#[tokio::test]
async fn python_ask_round_trip() {
    let py = PyUpstream::start("py-selftest").await;
    let mut peer = Peer::connect(&py.url).await;

    peer.send(json!({"jsonrpc": "2.0", "id": 1, "method": "ask", "params": ["deploy?"]}))
        .await;
    let confirm = peer.recv().await;
    assert_eq!(
        confirm,
        json!({"jsonrpc": "2.0", "id": "ask-1", "method": "confirm", "params": ["deploy?"]})
    );
    // Other calls go on while the ask waits for us.
    assert_eq!(peer.call(2, "echo", json!(1)).await["result"], 1);
    peer.send(json!({"jsonrpc": "2.0", "id": "ask-1", "result": {"ok": true}}))
        .await;
    assert_eq!(
        peer.recv().await,
        json!({"jsonrpc": "2.0", "id": 1, "result": {"question": "deploy?", "answer": {"ok": true}}})
    );

    peer.send(json!({"jsonrpc": "2.0", "id": 3, "method": "ask", "params": ["again?"]}))
        .await;
    let confirm = peer.recv().await;
    assert_eq!(confirm["id"], "ask-2");
    let refusal = json!({"code": 4001, "message": "user said no", "data": [1]});
    peer.send(json!({"jsonrpc": "2.0", "id": "ask-2", "error": refusal}))
        .await;
    let reply = peer.recv().await;
    assert_eq!(reply["id"], 3);
    assert_eq!(reply["error"]["code"], -32001, "{reply}");
    assert_eq!(reply["error"]["data"], refusal, "{reply}");

    // A response nobody asked for is still an invalid request, as before.
    peer.send(json!({"jsonrpc": "2.0", "id": "ask-2", "result": true}))
        .await;
    let reply = peer.recv().await;
    assert_eq!(reply["error"]["code"], -32600, "{reply}");
}
