//! WAMP upstreams (issue 14), black box: the gateway in-process with `protocol = "wamp"`, a real
//! Crossbar.io router and the Autobahn|Python component `tests/wamp/component.py`
//! (`tests/support/crossbar.rs`), and HTTP clients that know nothing of WAMP: JSON-RPC calls
//! become CALLs, `wamp.subscribe` / `wamp.publish` become SUBSCRIBE / PUBLISH, and EVENTs reach
//! the subscribing session's event stream as `wamp.event` notifications.
//!
//! Each test has a router of its own, so a restart or a refused login never disturbs another.
//! With `RUST_LOG` set (e.g. `RUST_LOG=rpcgate=debug`), the gateway's log goes to stderr.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use rpcgate::config::Config;
use serde_json::{Value, json};
use support::admin::{eventually, get};
use support::crossbar::{Component, Router};
use support::gateway::{TestGateway, start_gateway};
use support::rpc::post_as;
use support::sse::{Sse, stream_of};
use support::{Response, with_timeout_of};

/// The common part of every config: no admin listener of its own (the test binds one), no
/// shutdown delay, test-sized reconnect backoffs.
const BASE: &str = r#"
admin_listen = "off"
[shutdown]
delay = "0s"
[websocket]
reconnect_base = "10ms"
reconnect_max = "200ms"
"#;

/// A config with one WAMP upstream at `url` on `realm1`; `upstream` adds keys (and
/// sub-tables) to it, `sections` adds tables before it.
fn config(url: &str, upstream: &str, sections: &str) -> Config {
    let text = format!(
        "{BASE}\n{sections}\n[[upstreams]]\nurl = \"{url}\"\nprotocol = \"wamp\"\nrealm = \"realm1\"\n{upstream}\n"
    );
    Config::parse(&text)
        .unwrap_or_else(|p| panic!("the test's config is refused: {:?}\n{text}", p.0))
}

/// Installs the gateway's log subscriber once, off unless `RUST_LOG` says otherwise.
fn logs() {
    static LOGS: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        // The guard keeps the log writer's thread; this process needs it to the end.
        std::mem::forget(rpcgate::logging::init(
            rpcgate::config::LogFormat::Text,
            "off",
        ));
    });
}

/// A router, its component, and a gateway in front of it.
struct Setup {
    router: Router,
    component: Component,
    gw: TestGateway,
}

/// Router, component, and a gateway with `config(router)`, waited for until `/readyz` is 200.
async fn setup(config: impl FnOnce(&Router) -> Config) -> Setup {
    logs();
    let router = Router::start().await;
    let component = Component::start(&router).await;
    let gw = start_gateway(config(&router)).await;
    wait_ready(&gw).await;
    Setup {
        router,
        component,
        gw,
    }
}

/// An anonymous WAMP upstream with `upstream` keys and `sections` tables.
async fn setup_with(upstream: &'static str, sections: &'static str) -> Setup {
    setup(|r| config(&r.url(), upstream, sections)).await
}

/// How long a gateway may take to join its router: a handshake, HELLO and WELCOME, on a busy
/// machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

async fn wait_ready(gw: &TestGateway) {
    wait_ready_at(gw.admin).await;
}

/// Polls `/readyz` on `admin` until it is 200; fails with what it said last.
async fn wait_ready_at(admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let resp = get(admin, "/readyz").await;
        if resp.status == StatusCode::OK {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not get ready within {READY_TIMEOUT:?}; /readyz said {} {:?}",
            resp.status,
            resp.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(addr: SocketAddr, body: &str) -> Response {
    post_as(addr, None, body.to_string()).await
}

/// A call's whole answer (200 or not), as JSON.
async fn call(addr: SocketAddr, method: &str, params: Option<Value>) -> Value {
    let mut body = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if let Some(p) = params {
        body["params"] = p;
    }
    post(addr, &body.to_string()).await.json()
}

/// A call that must succeed: its `result`.
#[track_caller]
fn result(answer: Value) -> Value {
    assert!(answer.get("error").is_none(), "an error: {answer}");
    answer["result"].clone()
}

/// A call in `session`: the whole answer, which must be 200.
async fn call_in(addr: SocketAddr, session: &str, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let resp = post_as(addr, Some(session), body.to_string()).await;
    assert_eq!(resp.status, StatusCode::OK, "{method}: {}", resp.text());
    resp.json()
}

/// `wamp.subscribe [topic]` in `session`: the subscription id, which must be a number.
async fn subscribe(addr: SocketAddr, session: &str, topic: &str) -> Value {
    let id = result(call_in(addr, session, "wamp.subscribe", json!([topic])).await);
    assert!(id.is_u64(), "a subscription id is a number: {id}");
    id
}

/// The next `wamp.event` notification on `sse` (gap events skipped): its `params`.
async fn next_wamp_event(sse: &mut Sse) -> Value {
    loop {
        let event = sse.event().await;
        if event.is_gap() {
            continue;
        }
        let message = event.json();
        assert_eq!(message["jsonrpc"], "2.0", "{message}");
        assert_eq!(message["method"], "wamp.event", "{message}");
        assert!(message.get("id").is_none(), "a notification: {message}");
        return message["params"].clone();
    }
}

/// The next event on `sse` for `topic`, skipping others (ticks between publications).
async fn next_event_on(sse: &mut Sse, topic: &str) -> Value {
    with_timeout_of(Duration::from_secs(20), async {
        loop {
            let params = next_wamp_event(sse).await;
            if params["topic"] == topic {
                return params;
            }
        }
    })
    .await
}

/// A tick's `n` from a `com.example.tick` event's params, checking the event's shape: the
/// component publishes `[n]` and `{"n": n}`, so the result carries both.
#[track_caller]
fn tick_n(params: &Value, subscription: &Value) -> u64 {
    assert_eq!(&params["subscription"], subscription, "{params}");
    assert_eq!(params["topic"], "com.example.tick", "{params}");
    assert!(params["publication"].is_u64(), "{params}");
    let n = params["result"]["args"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("a tick is [n], {{\"n\": n}}: {params}"));
    assert_eq!(params["result"], json!({"args": [n], "kwargs": {"n": n}}));
    n
}

#[tokio::test]
async fn calls_reach_wamp_procedures_and_results_come_back_as_json_rpc() {
    let s = setup_with("", "").await;
    let addr = s.gw.addr;
    // Positional params are the CALL's Arguments; one positional result is the result.
    assert_eq!(
        result(call(addr, "com.example.add2", Some(json!([2, 3]))).await),
        5
    );
    // Object params are its ArgumentsKw; keyword-only results are the object.
    assert_eq!(
        result(call(addr, "com.example.kw", Some(json!({"a": 5, "b": 3}))).await),
        json!({"sum": 8, "diff": 2})
    );
    // Several positional results are the array.
    assert_eq!(
        result(call(addr, "com.example.pair", None).await),
        json!([1, 2])
    );
    // Nothing in, nothing out: null.
    assert_eq!(
        result(call(addr, "com.example.echo", None).await),
        Value::Null
    );
    assert_eq!(
        result(call(addr, "com.example.echo", Some(json!(["x"]))).await),
        "x"
    );
    // The whole answer is JSON-RPC with the client's id.
    let answer = call(addr, "com.example.add2", Some(json!([40, 2]))).await;
    assert_eq!(answer, json!({"jsonrpc": "2.0", "id": 1, "result": 42}));
}

#[tokio::test]
async fn a_procedure_prefix_goes_before_the_method_name() {
    let s = setup_with(r#"procedure_prefix = "com.example.""#, "").await;
    assert_eq!(
        result(call(s.gw.addr, "add2", Some(json!([2, 3]))).await),
        5
    );
    assert_eq!(
        result(call(s.gw.addr, "kw", Some(json!({"a": 1, "b": 1}))).await),
        json!({"sum": 2, "diff": 0})
    );
}

#[tokio::test]
async fn a_callee_error_is_a_json_rpc_error_with_the_wamp_uri_and_args() {
    let s = setup_with("", "").await;
    let resp = post(
        s.gw.addr,
        r#"{"jsonrpc":"2.0","id":7,"method":"com.example.fail","params":["boom"]}"#,
    )
    .await;
    // The callee failed, not rpcgate: 200, like any upstream JSON-RPC error.
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let answer = resp.json();
    assert_eq!(answer["id"], 7);
    assert_eq!(
        answer["error"],
        json!({
            "code": -32000,
            "message": "com.example.error.fail: boom",
            "data": {"uri": "com.example.error.fail", "args": ["boom"]}
        })
    );

    // A procedure nobody registered: the router's error, as "method not found".
    let answer = call(s.gw.addr, "com.example.nosuch", Some(json!([]))).await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("wamp.error.no_such_procedure"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_call_past_the_request_timeout_is_answered_by_rpcgate_and_canceled_at_the_callee() {
    let s = setup_with("", "[calls]\nrequest_timeout = \"500ms\"\n").await;
    let resp = post(
        s.gw.addr,
        r#"{"jsonrpc":"2.0","id":"late","method":"com.example.slow","params":[30]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT, "{}", resp.text());
    let answer = resp.json();
    assert_eq!(answer["id"], "late");
    assert_eq!(answer["error"]["code"], -32082, "{answer}");
    assert_eq!(answer["error"]["data"]["source"], "rpcgate", "{answer}");
    // The CANCEL reached the callee: it stopped sleeping instead of working 30 s for nobody.
    s.component.wait_for_line("canceled 30").await;
    // And the upstream session is still good for the next call.
    assert_eq!(
        result(call(s.gw.addr, "com.example.add2", Some(json!([1, 1]))).await),
        2
    );
}

#[tokio::test]
async fn a_client_leaving_during_a_call_cancels_it_at_the_callee() {
    let s = setup_with("", "").await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"com.example.slow","params":[25]}"#;
    let mut client = support::raw_tcp(s.gw.addr).await;
    client
        .write(format!(
            "POST / HTTP/1.1\r\nhost: rpcgate\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await
        .expect("send the call");
    s.component.wait_for_line("slow 25").await;
    // Nobody is left to answer: the callee should not work on for 25 s.
    drop(client);
    s.component.wait_for_line("canceled 25").await;
}

#[tokio::test]
async fn a_call_running_when_the_router_goes_gets_upstream_lost_at_once() {
    let Setup {
        mut router,
        component,
        gw,
    } = setup_with("", "").await;
    let addr = gw.addr;
    let running = tokio::spawn(async move {
        post(
            addr,
            r#"{"jsonrpc":"2.0","id":1,"method":"com.example.slow","params":[20]}"#,
        )
        .await
    });
    component.wait_for_line("slow 20").await;
    // GOODBYE to the gateway's session with the call written: not a 30 s wait for the deadline.
    router.stop().await;
    let resp = with_timeout_of(Duration::from_secs(10), running)
        .await
        .expect("the call's task");
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], -32081, "{}", resp.text());
}

#[tokio::test]
async fn pubsub_calls_wamp_cannot_carry_get_invalid_params_from_rpcgate() {
    let s = setup_with("", "").await;
    let addr = s.gw.addr;
    let _sse = stream_of(addr, "odd").await;
    for (method, params) in [
        ("wamp.subscribe", json!([])),
        ("wamp.subscribe", json!([42])),
        ("wamp.publish", json!([])),
        ("wamp.publish", json!({"args": ["no topic"]})),
    ] {
        let answer = call_in(addr, "odd", method, params.clone()).await;
        assert_eq!(
            answer["error"]["code"], -32602,
            "{method} {params}: {answer}"
        );
    }
    // An id the session does not hold: `false`, as for any subscription rule's unsubscribe
    // (src/server/rpc.rs answers it; docs/errors.md's WAMP table says -32602).
    let answer = call_in(addr, "odd", "wamp.unsubscribe", json!([987654321])).await;
    assert_eq!(answer["result"], false, "{answer}");
}

#[tokio::test]
async fn a_batch_gets_every_answer_with_the_clients_ids_and_a_notification_gets_204() {
    let s = setup_with("", "").await;
    let resp = post(
        s.gw.addr,
        r#"[
            {"jsonrpc":"2.0","id":1,"method":"com.example.add2","params":[2,3]},
            {"jsonrpc":"2.0","id":"k","method":"com.example.kw","params":{"a":5,"b":3}},
            {"jsonrpc":"2.0","method":"com.example.echo","params":["unanswered"]},
            {"jsonrpc":"2.0","id":3,"method":"com.example.fail","params":["boom"]}
        ]"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let answers = resp.json();
    let answers = answers.as_array().expect("an array of answers");
    // One answer per call, none for the notification, in any order.
    assert_eq!(answers.len(), 3, "{answers:?}");
    let by_id = |id: Value| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer with id {id}: {answers:?}"))
    };
    assert_eq!(by_id(json!(1))["result"], 5);
    assert_eq!(by_id(json!("k"))["result"], json!({"sum": 8, "diff": 2}));
    assert_eq!(by_id(json!(3))["error"]["code"], -32000);

    // A lone notification: 204, no body (docs/errors.md).
    let resp = post(
        s.gw.addr,
        r#"{"jsonrpc":"2.0","method":"com.example.echo","params":["unanswered"]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{}", resp.text());
    assert!(resp.body.is_empty());
}

#[tokio::test]
async fn client_ids_come_back_byte_for_byte() {
    let s = setup_with("", "").await;
    // WAMP request ids are the gateway's own integers; the client's come back as it wrote
    // them: an escaped string, an integer no JSON number type holds, a decimal's trailing 0.
    for id in [
        r#""abc""#,
        r#""\u00e9""#,
        "123456789012345678901234567890",
        "1.50",
    ] {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"com.example.add2","params":[2,3]}}"#);
        let resp = post(s.gw.addr, &body).await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert_eq!(
            resp.text(),
            format!(r#"{{"jsonrpc":"2.0","id":{id},"result":5}}"#)
        );
    }
}

#[tokio::test]
async fn a_session_subscribed_to_a_topic_gets_its_events_on_its_event_stream() {
    let s = setup_with("", "").await;
    let mut sse = stream_of(s.gw.addr, "ticker").await;
    let subscription = subscribe(s.gw.addr, "ticker", "com.example.tick").await;
    // Ticks come every 100 ms, counting up, each under the id the client was given.
    let first = tick_n(&next_wamp_event(&mut sse).await, &subscription);
    let mut last = first;
    for _ in 0..3 {
        let n = tick_n(&next_wamp_event(&mut sse).await, &subscription);
        assert!(n > last, "ticks count up: {n} after {last}");
        last = n;
    }
}

#[tokio::test]
async fn a_prefix_subscription_gets_events_naming_the_topic_they_were_published_to() {
    let s = setup_with("", "").await;
    let addr = s.gw.addr;
    // SUBSCRIBE's options ride along: `[topic, options]` and `{"topic", "options"}`.
    for (session, params) in [
        ("array", json!(["com.example.", {"match": "prefix"}])),
        (
            "object",
            json!({"topic": "com.example.", "options": {"match": "prefix"}}),
        ),
    ] {
        let mut sse = stream_of(addr, session).await;
        let subscription = result(call_in(addr, session, "wamp.subscribe", params).await);
        assert!(subscription.is_u64(), "{subscription}");
        // The ticks' topic, not the prefix: a client subscribed to many topics must tell them
        // apart.
        let event = next_wamp_event(&mut sse).await;
        tick_n(&event, &subscription);
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text message on a WebSocket client of the gateway.
async fn ws_next(ws: &mut Ws) -> Value {
    use futures_util::StreamExt;
    loop {
        let message = support::with_timeout(ws.next())
            .await
            .expect("the gateway closed the WebSocket")
            .expect("read the WebSocket");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).expect("JSON");
        }
    }
}

/// The router's subscription to `topic`, by Crossbar's meta API through the gateway: a number
/// while anyone subscribes, null once nobody does.
async fn router_subscription(addr: SocketAddr, topic: &str) -> Value {
    result(call(addr, "wamp.subscription.lookup", Some(json!([topic]))).await)
}

#[tokio::test]
async fn a_websocket_client_gets_its_events_on_its_socket_and_closing_it_unsubscribes_upstream() {
    use futures_util::SinkExt;
    let s = setup_with("", "").await;
    let addr = s.gw.addr;
    assert_eq!(
        router_subscription(addr, "com.example.tick").await,
        Value::Null
    );
    let (mut ws, _) =
        support::with_timeout(tokio_tungstenite::connect_async(format!("ws://{addr}/")))
            .await
            .expect("a WebSocket to the gateway");
    let subscribe = json!({"jsonrpc": "2.0", "id": "s", "method": "wamp.subscribe", "params": ["com.example.tick"]});
    support::with_timeout(ws.send(tokio_tungstenite::tungstenite::Message::text(
        subscribe.to_string(),
    )))
    .await
    .expect("send");
    let answer = ws_next(&mut ws).await;
    assert_eq!(answer["id"], "s", "{answer}");
    let subscription = answer["result"].clone();
    assert!(subscription.is_u64(), "{answer}");
    // Ticks on the same socket, as notifications.
    with_timeout_of(Duration::from_secs(20), async {
        for _ in 0..2 {
            let message = ws_next(&mut ws).await;
            assert_eq!(message["method"], "wamp.event", "{message}");
            tick_n(&message["params"], &subscription);
        }
    })
    .await;
    assert!(
        router_subscription(addr, "com.example.tick").await.is_u64(),
        "the router holds a subscription while the client does"
    );
    // A socket's own session ends with it, and its subscriptions with it (docs/push.md): the
    // router's subscription goes, since nobody else holds one.
    drop(ws);
    eventually(async || {
        router_subscription(addr, "com.example.tick")
            .await
            .is_null()
    })
    .await;
}

#[tokio::test]
async fn two_sessions_share_a_topic_and_one_unsubscribing_leaves_the_other_subscribed() {
    // One upstream connection: one WAMP session, so the router gives both clients' SUBSCRIBEs
    // the same subscription and every event reaches the gateway in one order.
    let s = setup_with("connections = 1", "").await;
    let addr = s.gw.addr;
    let mut one = stream_of(addr, "one").await;
    let mut two = stream_of(addr, "two").await;
    let tick_one = subscribe(addr, "one", "com.example.tick").await;
    let tick_two = subscribe(addr, "two", "com.example.tick").await;
    // Both get ticks.
    tick_n(&next_wamp_event(&mut one).await, &tick_one);
    tick_n(&next_wamp_event(&mut two).await, &tick_two);
    // Markers on a second topic, published through the gateway, order what follows.
    let news_one = subscribe(addr, "one", "com.example.news").await;
    let news_two = subscribe(addr, "two", "com.example.news").await;

    let unsubscribed = call_in(addr, "one", "wamp.unsubscribe", json!([tick_one])).await;
    assert_eq!(result(unsubscribed), true);
    // A marker published after the unsubscribe was answered: ticks that reach the gateway
    // after it are not for session one.
    result(
        call_in(
            addr,
            "two",
            "wamp.publish",
            json!(["com.example.news", "m1"]),
        )
        .await,
    );
    // Session two still gets ticks after the marker ...
    let mut after_m1 = 0;
    with_timeout_of(Duration::from_secs(20), async {
        let mut seen_m1 = false;
        while after_m1 < 3 {
            let params = next_wamp_event(&mut two).await;
            if params["topic"] == "com.example.news" {
                assert_eq!(params["subscription"], news_two);
                seen_m1 |= params["result"] == "m1";
            } else if seen_m1 {
                tick_n(&params, &tick_two);
                after_m1 += 1;
            }
        }
    })
    .await;
    result(
        call_in(
            addr,
            "two",
            "wamp.publish",
            json!(["com.example.news", "m2"]),
        )
        .await,
    );
    // ... and session one none between the two markers (ticks before m1 were in flight).
    with_timeout_of(Duration::from_secs(20), async {
        let mut seen_m1 = false;
        loop {
            let params = next_wamp_event(&mut one).await;
            if params["topic"] == "com.example.news" {
                assert_eq!(params["subscription"], news_one);
                if params["result"] == "m2" {
                    assert!(seen_m1, "m2 came before m1");
                    break;
                }
                seen_m1 |= params["result"] == "m1";
            } else {
                assert!(
                    !seen_m1,
                    "session one got a tick after unsubscribing: {params}"
                );
            }
        }
    })
    .await;

    // The router's subscription lasted while session two held it, and goes with the last.
    assert!(router_subscription(addr, "com.example.tick").await.is_u64());
    let unsubscribed = call_in(addr, "two", "wamp.unsubscribe", json!([tick_two])).await;
    assert_eq!(result(unsubscribed), true);
    eventually(async || {
        router_subscription(addr, "com.example.tick")
            .await
            .is_null()
    })
    .await;
}

#[tokio::test]
async fn publish_as_a_call_returns_the_publication_id_and_reaches_subscribers() {
    let s = setup_with("", "").await;
    let addr = s.gw.addr;
    let mut sse = stream_of(addr, "reader").await;
    let subscription = subscribe(addr, "reader", "com.example.news").await;

    // Positional form: the topic, then the Arguments.
    let publication = result(
        call(
            addr,
            "wamp.publish",
            Some(json!(["com.example.news", "hello"])),
        )
        .await,
    );
    assert!(publication.is_u64(), "a publication id: {publication}");
    let event = next_event_on(&mut sse, "com.example.news").await;
    assert_eq!(
        event,
        json!({
            "subscription": subscription,
            "topic": "com.example.news",
            "publication": publication,
            "result": "hello"
        })
    );

    // Object form: topic, args and kwargs by name (both kinds, so both are kept).
    let publication = result(
        call(
            addr,
            "wamp.publish",
            Some(json!({"topic": "com.example.news", "args": ["x"], "kwargs": {"k": 1}})),
        )
        .await,
    );
    assert!(publication.is_u64(), "a publication id: {publication}");
    let event = next_event_on(&mut sse, "com.example.news").await;
    assert_eq!(event["publication"], publication, "{event}");
    assert_eq!(
        event["result"],
        json!({"args": ["x"], "kwargs": {"k": 1}}),
        "{event}"
    );

    // As a notification: nothing to answer (204), and still published.
    let resp = post(
        addr,
        r#"{"jsonrpc":"2.0","method":"wamp.publish","params":["com.example.news","unacknowledged"]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{}", resp.text());
    let event = next_event_on(&mut sse, "com.example.news").await;
    assert_eq!(event["result"], "unacknowledged", "{event}");
    assert!(event["publication"].is_u64(), "{event}");
}

/// How the router goes away in [`router_restart`].
#[derive(Clone, Copy)]
enum Outage {
    /// SIGTERM: Crossbar closes its sessions with GOODBYE.
    Stop,
    /// SIGKILL: the sockets just die.
    Crash,
}

/// Calls and a subscription made before the router goes work again once it is back on the
/// same port: the gateway rejoins, subscribes again, and the client keeps its id.
async fn router_restart(outage: Outage) {
    let Setup {
        mut router,
        component,
        gw,
    } = setup_with("", "").await;
    let addr = gw.addr;
    let mut sse = stream_of(addr, "survivor").await;
    let subscription = subscribe(addr, "survivor", "com.example.tick").await;
    // Let the old component count to 20 first: the new one starts from 1, and the gateway has
    // subscribed again long before it gets to 20 (reconnects back off 200 ms at most), so the
    // count going down marks the first tick from after the restart.
    let mut last = 0;
    with_timeout_of(Duration::from_secs(20), async {
        while last < 20 {
            last = tick_n(&next_wamp_event(&mut sse).await, &subscription);
        }
    })
    .await;

    drop(component);
    match outage {
        Outage::Stop => router.stop().await,
        Outage::Crash => router.kill().await,
    }
    // While it is down a call gets rpcgate's own answer, not a hang.
    let answer = call(addr, "com.example.add2", Some(json!([2, 3]))).await;
    assert_eq!(answer["error"]["data"]["source"], "rpcgate", "{answer}");
    router.restart().await;
    let _component = Component::start(&router).await;

    // Calls work again once the gateway has rejoined (each try waits up to connect_wait).
    with_timeout_of(Duration::from_secs(60), async {
        loop {
            let answer = call(addr, "com.example.add2", Some(json!([2, 3]))).await;
            if answer["result"] == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The new component counts from 1 again: where the count goes down, the ticks are from
    // after the restart, and they come under the subscription id the client already holds.
    with_timeout_of(Duration::from_secs(30), async {
        loop {
            let n = tick_n(&next_wamp_event(&mut sse).await, &subscription);
            if n < last {
                break;
            }
            last = n;
        }
    })
    .await;
    drop(gw);
}

#[tokio::test]
async fn after_a_router_restart_calls_work_and_subscriptions_resume_under_the_same_id() {
    router_restart(Outage::Stop).await;
}

#[tokio::test]
async fn after_a_router_crash_calls_work_and_subscriptions_resume_under_the_same_id() {
    router_restart(Outage::Crash).await;
}

#[tokio::test]
async fn the_pubsub_method_names_can_be_changed() {
    let s = setup_with(
        "",
        "[wamp]\nsubscribe_method = \"topic_subscribe\"\nunsubscribe_method = \"topic_unsubscribe\"\npublish_method = \"topic_publish\"\nevent_method = \"topic_event\"\n",
    )
    .await;
    let addr = s.gw.addr;
    let mut sse = stream_of(addr, "renamed").await;
    let subscription = result(
        call_in(
            addr,
            "renamed",
            "topic_subscribe",
            json!(["com.example.news"]),
        )
        .await,
    );
    assert!(subscription.is_u64(), "{subscription}");
    let publication = result(
        call(
            addr,
            "topic_publish",
            Some(json!(["com.example.news", "hi"])),
        )
        .await,
    );
    let event = with_timeout_of(Duration::from_secs(20), async {
        loop {
            let event = sse.event().await;
            if !event.is_gap() {
                return event.json();
            }
        }
    })
    .await;
    assert_eq!(
        event,
        json!({
            "jsonrpc": "2.0",
            "method": "topic_event",
            "params": {
                "subscription": subscription,
                "topic": "com.example.news",
                "publication": publication,
                "result": "hi"
            }
        })
    );
    assert_eq!(
        result(call_in(addr, "renamed", "topic_unsubscribe", json!([subscription])).await),
        true
    );
    // The default names are now ordinary procedure names: nobody registered that one.
    let answer = call(addr, "wamp.publish", Some(json!(["com.example.news", "x"]))).await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
}

#[tokio::test]
async fn a_subscribe_with_no_session_is_refused_saying_how_to_get_events() {
    // docs/push.md: a subscribe call whose events would have nowhere to go is refused
    // (NoPushTarget) rather than answered with a subscription nobody can read.
    let s = setup_with("", "").await;
    let resp = post(
        s.gw.addr,
        r#"{"jsonrpc":"2.0","id":1,"method":"wamp.subscribe","params":["com.example.tick"]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], -32088, "{}", resp.text());
}

/// Sum of `name{...}` samples whose labels contain every one of `labels`.
fn samples(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A secret in a file of its own, removed when dropped.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new(name: &str, secret: &str) -> SecretFile {
        let path = std::env::temp_dir().join(format!("rpcgate-wamp-{}-{name}", std::process::id()));
        std::fs::write(&path, secret).expect("write the secret file");
        SecretFile(path)
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn wamp_cra_with_a_secret_from_the_environment_joins_the_auth_transport() {
    // The real binary, so the variable is set in its environment only (setting it in this
    // process would race with the other tests' threads).
    logs();
    let router = Router::start().await;
    let _component = Component::start(&router).await;
    let dir = std::env::temp_dir().join(format!("rpcgate-wamp-cra-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make a temp dir");
    let file = dir.join("rpcgate.toml");
    std::fs::write(
        &file,
        format!(
            r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[shutdown]
delay = "0s"
[[upstreams]]
url = "{}"
protocol = "wamp"
realm = "realm1"
[upstreams.wamp_auth]
method = "wampcra"
authid = "cra-user"
secret_env = "RPCGATE_TEST_CRA_SECRET"
"#,
            router.auth_url()
        ),
    )
    .expect("write the config");
    let mut child = support::binary::rpcgate(
        &["--config", &file.display().to_string()],
        std::process::Stdio::piped(),
    )
    .env("RPCGATE_TEST_CRA_SECRET", "cra-secret")
    .spawn()
    .expect("start rpcgate");
    // Its log through eprintln!, which the test harness captures and shows only on failure.
    let stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn(async move {
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("rpcgate: {line}");
        }
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let (mut admin, mut listen) = (None, None);
    with_timeout_of(Duration::from_secs(30), async {
        while admin.is_none() || listen.is_none() {
            let line = lines
                .next_line()
                .await
                .expect("read rpcgate's stdout")
                .expect("rpcgate exited before listening (its log is above)");
            let addr_in = |prefix: &str| {
                let rest = line.trim().strip_prefix(prefix)?.trim();
                let rest = rest.trim_start_matches("http://");
                rest.split('/').next()?.parse::<SocketAddr>().ok()
            };
            admin = admin.or(addr_in("rpcgate admin on"));
            listen = listen.or(addr_in("rpcgate listening on"));
        }
    })
    .await;
    let (admin, addr) = (admin.expect("admin"), listen.expect("listen"));
    wait_ready_at(admin).await;
    // The authenticated session may call (role "user"), here through the gateway.
    assert_eq!(
        result(call(addr, "com.example.add2", Some(json!([2, 3]))).await),
        5
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_ticket_from_a_file_joins_the_auth_transport() {
    // As `echo ticket-secret > file` writes it: the newline is not part of the secret.
    let secret = SecretFile::new("ticket", "ticket-secret\n");
    let path = secret.path();
    let s = setup(|r| {
        let upstream = format!(
            "[upstreams.wamp_auth]\nmethod = \"ticket\"\nauthid = \"ticket-user\"\nsecret_file = \"{path}\"\n"
        );
        config(&r.auth_url(), &upstream, "")
    })
    .await;
    assert_eq!(
        result(call(s.gw.addr, "com.example.add2", Some(json!([2, 3]))).await),
        5
    );
}

#[tokio::test]
async fn salted_wamp_cra_from_a_file_joins_the_auth_transport() {
    let secret = SecretFile::new("salted", "cra-salted-secret");
    let path = secret.path();
    let s = setup(|r| {
        let upstream = format!(
            "[upstreams.wamp_auth]\nmethod = \"wampcra\"\nauthid = \"cra-salted\"\nsecret_file = \"{path}\"\n"
        );
        config(&r.auth_url(), &upstream, "")
    })
    .await;
    assert_eq!(
        result(call(s.gw.addr, "com.example.add2", Some(json!([2, 3]))).await),
        5
    );
}

/// A gateway whose upstream the router refuses: not ready, with the reason.
async fn refused(
    url: impl FnOnce(&Router) -> String,
    upstream: &str,
    realm: &str,
) -> (Setup, String) {
    logs();
    let router = Router::start().await;
    let component = Component::start(&router).await;
    let url = url(&router);
    let text = format!(
        "{BASE}\n[calls]\nconnect_wait = \"300ms\"\n[[upstreams]]\nurl = \"{url}\"\nprotocol = \"wamp\"\nrealm = \"{realm}\"\n{upstream}\n"
    );
    let config = Config::parse(&text)
        .unwrap_or_else(|p| panic!("the test's config is refused: {:?}\n{text}", p.0));
    let gw = start_gateway(config).await;
    let admin = gw.admin;
    let series = "rpcgate_upstream_connect_failures_total";
    let upstream_label = format!("upstream=\"{url}\"");
    let labels = [upstream_label.as_str(), r#"reason="wamp_abort""#];
    // Every attempt is refused, so the failures keep counting (the backoff tops out at 200 ms).
    eventually(async || samples(&get(admin, "/metrics").await.text(), series, &labels) >= 2.0)
        .await;
    let resp = get(admin, "/readyz").await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
    let why = resp.text();
    // No usable upstream: a call waits `connect_wait` and gets rpcgate's own answer.
    let resp = post(
        gw.addr,
        r#"{"jsonrpc":"2.0","id":1,"method":"com.example.add2","params":[2,3]}"#,
    )
    .await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
    assert_eq!(resp.json()["error"]["code"], -32080, "{}", resp.text());
    (
        Setup {
            router,
            component,
            gw,
        },
        why,
    )
}

#[tokio::test]
async fn a_wrong_secret_leaves_the_gateway_not_ready_and_says_why() {
    let secret = SecretFile::new("wrong", "not-the-secret");
    let upstream = format!(
        "[upstreams.wamp_auth]\nmethod = \"wampcra\"\nauthid = \"cra-user\"\nsecret_file = \"{}\"\n",
        secret.path()
    );
    let (s, why) = refused(|r| r.auth_url(), &upstream, "realm1").await;
    assert!(
        ["wamp.error", "not_authorized", "authentication"]
            .iter()
            .any(|word| why.contains(word)),
        "/readyz should name the refusal: {why:?}"
    );
    // The file is read on every attempt: once it holds the right secret, the gateway joins
    // without a restart.
    std::fs::write(&secret.0, "cra-secret").expect("rewrite the secret file");
    wait_ready(&s.gw).await;
    assert_eq!(
        result(call(s.gw.addr, "com.example.add2", Some(json!([2, 3]))).await),
        5
    );
}

#[tokio::test]
async fn an_unknown_realm_leaves_the_gateway_not_ready_naming_the_realm() {
    let (_s, why) = refused(|r| r.url(), "", "nosuch").await;
    assert!(
        why.contains("wamp.error.no_such_realm") && why.contains("nosuch"),
        "/readyz should name the realm problem: {why:?}"
    );
}
