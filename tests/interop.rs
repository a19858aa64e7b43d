//! The core cases against an upstream we did not write: Python's `websockets`
//! (tests/interop/upstream.py). Its framing, ping/pong and close handshake are
//! independent of tungstenite, so a bug our echo backend shares with the gateway
//! cannot hide here.
//!
//! Python comes from `RPCGATE_INTEROP_PYTHON` (`.ci/run` sets it to its virtualenv);
//! otherwise a virtualenv is made once under `target/interop-venv`.

mod support;

use http::StatusCode;
use rpcgate::config::BatchMode;
use serde_json::{Value, json};
use std::time::Duration;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::python::PyUpstream;
use support::{Client, post, with_timeout};

async fn gateway_to(py: &PyUpstream, connections: usize, batch: BatchMode) -> TestGateway {
    let mut config = config_for(std::slice::from_ref(&py.url), connections);
    config.http.batch = batch;
    let gw = start_gateway(config).await;
    gw.wait_open(connections).await;
    gw
}

#[tokio::test]
async fn calls_errors_and_notifications() {
    let py = PyUpstream::start("py-1").await;
    let gw = gateway_to(&py, 2, BatchMode::Split).await;

    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":"\u00e9-1.50","method":"echo","params":{"a":[1,"x"]}}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(
        resp.text()
            .starts_with(r#"{"jsonrpc":"2.0","id":"\u00e9-1.50","#),
        "{}",
        resp.text()
    );
    assert_eq!(resp.json()["result"], json!({"a":[1,"x"]}));

    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":12345678901234567890123,"method":"sum","params":[1,2,3.5]}"#,
    )
    .await;
    assert!(resp.text().contains(r#""id":12345678901234567890123,"#));
    assert_eq!(resp.json()["result"], 6.5);

    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":null,"method":"whoami"}"#,
    )
    .await;
    assert_eq!(
        resp.json(),
        json!({"jsonrpc":"2.0","id":null,"result":"py-1"})
    );

    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":7,"method":"fail","params":[9]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.json()["error"],
        json!({"code":-32000,"message":"requested failure","data":[9]})
    );

    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":8,"method":"nope"}"#).await;
    assert_eq!(resp.json()["error"]["code"], -32601);

    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","method":"echo","params":[1]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);

    // The upstream pushes a notification before its reply: counted, not delivered.
    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":9,"method":"notify","params":["hi"]}"#,
    )
    .await;
    assert_eq!(resp.json()["result"], true);
    assert!(gw.upstreams.unmatched_counts().0 >= 1);
}

#[tokio::test]
async fn concurrent_slow_calls_come_back_out_of_order_and_matched() {
    let py = PyUpstream::start("py-2").await;
    let gw = gateway_to(&py, 1, BatchMode::Split).await;
    // Longer sleeps first: on the single socket, replies return in reverse order.
    let calls: Vec<_> = (0..20u64)
        .map(|i| {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":"c{i}","method":"sleep","params":[{}]}}"#,
                100 - i * 5
            );
            tokio::spawn(post(gw.addr, "/", body))
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let v = with_timeout(call).await.unwrap().json();
        assert_eq!(v["id"], format!("c{i}"));
        assert_eq!(v["result"], 100 - i as u64 * 5);
    }
}

#[tokio::test]
async fn batches_split_and_forwarded() {
    let py = PyUpstream::start("py-3").await;
    let body = r#"[
        {"jsonrpc":"2.0","id":1,"method":"sleep","params":[30]},
        {"jsonrpc":"2.0","method":"echo","params":[0]},
        {"jsonrpc":"2.0","id":"two","method":"sum","params":[2,2]},
        {"bad":true},
        {"jsonrpc":"2.0","id":3,"method":"fail"}
    ]"#;
    for mode in [BatchMode::Split, BatchMode::Forward] {
        let gw = gateway_to(&py, 2, mode).await;
        let v = post(gw.addr, "/", body).await.json();
        let items = v.as_array().unwrap_or_else(|| panic!("{mode:?}: {v}"));
        assert_eq!(items.len(), 4, "{mode:?}: {v}");
        assert_eq!(
            items[0],
            json!({"jsonrpc":"2.0","id":1,"result":30}),
            "{mode:?}"
        );
        assert_eq!(
            items[1],
            json!({"jsonrpc":"2.0","id":"two","result":4}),
            "{mode:?}"
        );
        assert_eq!(items[2]["error"]["code"], -32600, "{mode:?}");
        assert_eq!(items[3]["error"]["code"], -32000, "{mode:?}");
        gw.stop().await;
    }
}

#[tokio::test]
async fn upstream_closing_a_connection_is_survived() {
    let py = PyUpstream::start("py-4").await;
    let mut config = config_for(std::slice::from_ref(&py.url), 1);
    // A call written just before the server's Close frame arrives is lost with the
    // socket; only a method listed as idempotent may be sent again after that.
    config.balance.retry_methods = vec!["whoami".into()];
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let mut client = Client::connect(gw.addr).await;
    // `close` replies, then the server closes the socket (1000).
    let v = client
        .post("/", r#"{"jsonrpc":"2.0","id":1,"method":"close"}"#)
        .await
        .json();
    assert_eq!(v["result"], true);
    // The next call waits for the reconnect instead of failing.
    let v = client
        .post("/", r#"{"jsonrpc":"2.0","id":2,"method":"whoami"}"#)
        .await
        .json();
    assert_eq!(v["result"], "py-4");
}

#[tokio::test]
async fn killed_upstream_answers_in_flight_calls_502() {
    let mut py = PyUpstream::start("py-5").await;
    let mut config = config_for(std::slice::from_ref(&py.url), 2);
    config.calls.request_timeout = Duration::from_secs(300);
    config.calls.connect_wait = Duration::from_millis(200);
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"sleep","params":[60000]}}"#);
            tokio::spawn(post(gw.addr, "/", body))
        })
        .collect();
    // Every call is registered on a connection before the process dies.
    with_timeout(async {
        while gw.upstreams.pending_calls() < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    py.child.kill().await.expect("kill python");
    for call in calls {
        let resp = with_timeout(call).await.unwrap();
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
        assert_eq!(resp.json()["error"]["code"], -32081);
    }
    // Nothing to reconnect to: new calls get 503 after connect_wait.
    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"echo"}"#).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = resp.json();
    assert_eq!(v["error"]["code"], -32080);
}

/// A session with its own socket to the Python upstream: what that socket pushes
/// (a notification, a request to the client, subscription ticks) reaches the session's
/// long-poll, and the client's answer posted over HTTP reaches the upstream.
#[tokio::test]
async fn pushes_and_requests_to_the_client_reach_an_http_session() {
    use http::Method;
    use support::http::{JSON, request};
    let py = PyUpstream::start("py-push").await;
    let mut config = config_for(std::slice::from_ref(&py.url), 1);
    config.sessions.affinity = rpcgate::config::Affinity::Connection;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let addr = gw.addr;
    let call = move |body: Value| async move {
        let headers = [JSON, ("rpcgate-session", "py-s1")];
        request(addr, Method::POST, "/", &headers, body.to_string()).await
    };
    let poll = move |after: u64| async move {
        let path = format!("/events?session=py-s1&after={after}&wait=5");
        request(addr, Method::GET, &path, &[], "").await
    };

    let v = call(json!({"jsonrpc":"2.0","id":1,"method":"notify_me","params":[{"n":1.50}]}))
        .await
        .json();
    assert_eq!(v["result"], true, "{v}");
    let events = poll(0).await.json();
    assert_eq!(events[0]["id"], 1, "{events}");
    assert_eq!(
        events[0]["message"],
        json!({"jsonrpc":"2.0","method":"notice","params":[{"n":1.50}]})
    );

    // The upstream asks the client; the call that made it ask waits for the answer.
    let ask = tokio::spawn(call(
        json!({"jsonrpc":"2.0","id":2,"method":"ask","params":["sure?"]}),
    ));
    let events = poll(1).await.json();
    let question = &events[0]["message"];
    assert_eq!(question["method"], "confirm", "{events}");
    let answer = json!({"jsonrpc":"2.0","id":question["id"],"result":"yes"});
    let accepted = call(answer.clone()).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let asked = with_timeout(ask).await.expect("ask call").json();
    assert_eq!(
        asked["result"],
        json!({"question":"sure?","answer":"yes"}),
        "{asked}"
    );
    // Answered once: the same answer again is for nobody.
    let again = call(answer).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.json()["error"]["code"], -32096);
}
