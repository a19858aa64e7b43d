//! Push, end to end against the real demo backend (`rpcgate-echo`): subscriptions opened
//! over HTTP and read from an event stream or a long-poll, replays and gaps, one reader per
//! session, WebSocket clients, a session's own upstream socket (`affinity = "connection"`)
//! with requests from the upstream answered by the client, subscriptions surviving the death
//! of their upstream connection, the push metrics, and 200 sessions at once.

mod support;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use rpcgate::config::{Affinity, Config, SubscriptionRule};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use support::admin::{eventually, metric};
use support::echo::Echo;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::JSON;
use support::rpc::{call_body, post_as, result_of};
use support::sse::{Sse, open_sse, stream_of};
use support::{request, with_timeout, with_timeout_of};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const HEADER: &str = "rpcgate-session";

// ---------------------------------------------------------------------------------------
// The echo backend
// ---------------------------------------------------------------------------------------

/// A config for `urls` with `connections` sockets each and the substrate subscription rule.
fn push_config(urls: &[String], connections: usize) -> Config {
    let mut config = config_for(urls, connections);
    config.subscriptions = vec![SubscriptionRule::preset("substrate").unwrap()];
    config
}

async fn gateway_with(config: Config, open: usize) -> TestGateway {
    let gw = start_gateway(config).await;
    gw.wait_open(open).await;
    gw
}

// ---------------------------------------------------------------------------------------
// HTTP calls
// ---------------------------------------------------------------------------------------

#[track_caller]
fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Subscribes session `session` to ticks every `interval_ms`; the subscription id.
async fn subscribe(addr: SocketAddr, session: &str, interval_ms: u64) -> String {
    let resp = post_as(
        addr,
        Some(session),
        call_body(1, "ticks_subscribe", json!([interval_ms])),
    )
    .await;
    match result_of(&resp) {
        Value::String(id) => id,
        other => panic!("subscription id is not a string: {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Event streams
// ---------------------------------------------------------------------------------------

/// Checks `event` is a tick of subscription `sub`; its count.
#[track_caller]
fn tick_of(message: &Value, sub: &str) -> u64 {
    assert_eq!(message["jsonrpc"], "2.0", "{message}");
    assert_eq!(message["method"], "ticks", "{message}");
    assert_eq!(message["params"]["subscription"], sub, "{message}");
    message["params"]["result"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {message}"))
}

/// A long-poll of session `session` (`query` after `?session=…&`).
async fn long_poll(addr: SocketAddr, session: &str, query: &str) -> Vec<Value> {
    let path = format!("/events?session={session}&{query}");
    let resp = request(
        addr,
        Method::GET,
        &path,
        &[("accept", "application/json")],
        "",
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    match resp.json() {
        Value::Array(items) => items,
        other => panic!("a long-poll answer is not an array: {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client to `path` with extra `headers`; the socket and the session
/// the gateway says it has.
async fn ws_connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (Ws, String) {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    for (n, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let (ws, resp) = with_timeout(tokio_tungstenite::connect_async(req))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let session = resp
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .expect("the handshake answer names the session")
        .to_string();
    (ws, session)
}

/// The next text frame (pings and pongs skipped), or `None` once the socket is closed.
async fn ws_next_text(ws: &mut Ws) -> Option<String> {
    with_timeout(async {
        loop {
            match ws.next().await? {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    })
    .await
}

/// The next text frame as JSON; it must come.
async fn ws_next(ws: &mut Ws) -> Value {
    let text = ws_next_text(ws).await.expect("the socket closed");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"))
}

async fn ws_send(ws: &mut Ws, text: impl Into<String>) {
    with_timeout(ws.send(Message::text(text.into())))
        .await
        .expect("send a frame");
}

// ---------------------------------------------------------------------------------------
// Subscriptions over HTTP, read from event streams and long-polls
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_subscribe_call_without_a_session_is_refused() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;

    let resp = post_as(gw.addr, None, call_body(1, "ticks_subscribe", json!([50]))).await;
    assert_eq!(
        resp.status,
        StatusCode::BAD_REQUEST,
        "body: {}",
        resp.text()
    );
    let v = resp.json();
    assert_eq!(error_code(&v), -32088, "{v}");
    assert_eq!(v["id"], 1, "{v}");
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
}

#[tokio::test]
async fn an_event_stream_carries_its_sessions_subscription_until_unsubscribed() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut sse = stream_of(gw.addr, "s1").await;

    let sub = subscribe(gw.addr, "s1", 20).await;
    assert_eq!(sub, "tick-1");
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 1.0);
    for n in 1..=3 {
        let event = sse.event().await;
        assert_eq!(event.id, Some(n), "events are numbered from 1: {event:?}");
        assert!(event.event.is_none(), "{event:?}");
        assert_eq!(tick_of(&event.json(), &sub), n);
    }

    let resp = post_as(
        gw.addr,
        Some("s1"),
        call_body(2, "ticks_unsubscribe", json!([sub])),
    )
    .await;
    assert_eq!(result_of(&resp), json!(true));
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);

    // No tick of the old subscription follows the unsubscribe's answer: once a tick of a
    // new one has come, none of the old may.
    let second = subscribe(gw.addr, "s1", 20).await;
    assert_ne!(second, sub);
    let mut seen_new = 0;
    while seen_new < 3 {
        let message = sse.event().await.json();
        let of = message["params"]["subscription"]
            .as_str()
            .unwrap()
            .to_string();
        if of == second {
            seen_new += 1;
        } else {
            assert_eq!(of, sub, "{message}");
            assert_eq!(seen_new, 0, "a tick of the unsubscribed {sub}: {message}");
        }
    }
    assert!(
        metric(
            gw.admin,
            "rpcgate_pushed_messages_total{outcome=\"buffered\"}"
        )
        .await
            >= 6.0
    );
    eventually(async || {
        metric(
            gw.admin,
            "rpcgate_pushed_messages_total{outcome=\"delivered\"}",
        )
        .await
            >= 6.0
    })
    .await;
    assert_eq!(metric(gw.admin, "rpcgate_push_sessions").await, 1.0);
    assert_eq!(metric(gw.admin, "rpcgate_push_streams").await, 1.0);
    drop(sse);
    eventually(async || metric(gw.admin, "rpcgate_push_streams").await == 0.0).await;
}

#[tokio::test]
async fn a_session_is_named_by_header_cookie_or_query() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    // The stream names it in the query; the calls by cookie and by header.
    let mut sse = stream_of(gw.addr, "k").await;
    let by_cookie = request(
        gw.addr,
        Method::POST,
        "/",
        &[JSON, ("cookie", "other=1; rpcgate_session=k")],
        call_body(1, "ticks_subscribe", json!([20])),
    )
    .await;
    let by_cookie = result_of(&by_cookie).as_str().unwrap().to_string();
    let by_query = request(
        gw.addr,
        Method::POST,
        "/?session=k",
        &[JSON],
        call_body(1, "ticks_subscribe", json!([20])),
    )
    .await;
    let by_query = result_of(&by_query).as_str().unwrap().to_string();
    let by_header = subscribe(gw.addr, "k", 20).await;

    let wanted: HashSet<String> = [by_cookie, by_query, by_header].into();
    assert_eq!(wanted.len(), 3);
    let mut seen = HashSet::new();
    while seen.len() < 3 {
        let message = sse.event().await.json();
        let of = message["params"]["subscription"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(wanted.contains(&of), "{message}");
        seen.insert(of);
    }
    assert_eq!(metric(gw.admin, "rpcgate_push_sessions").await, 1.0);
}

#[tokio::test]
async fn each_session_gets_only_its_own_subscriptions() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut a = stream_of(gw.addr, "a").await;
    let mut b = stream_of(gw.addr, "b").await;
    let sub_a = subscribe(gw.addr, "a", 20).await;
    let sub_b = subscribe(gw.addr, "b", 20).await;
    assert_ne!(sub_a, sub_b, "one upstream connection numbers them apart");
    for n in 1..=5 {
        assert_eq!(tick_of(&a.event().await.json(), &sub_a), n);
        assert_eq!(tick_of(&b.event().await.json(), &sub_b), n);
    }
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 2.0);
    assert_eq!(metric(gw.admin, "rpcgate_push_streams").await, 2.0);
}

#[tokio::test]
async fn last_event_id_and_after_replay_what_came_after() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut sse = stream_of(gw.addr, "r").await;
    let sub = subscribe(gw.addr, "r", 20).await;
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(sse.event().await);
    }
    drop(sse);

    // Reconnecting with Last-Event-ID: 1 starts at event 2, the same message as before.
    let mut again = open_sse(gw.addr, "/events?session=r", &[("last-event-id", "1")]).await;
    assert_eq!(again.status, StatusCode::OK);
    let e = again.event().await;
    assert_eq!(e.id, Some(2));
    assert_eq!(e.data, first[1].data);
    assert_eq!(tick_of(&e.json(), &sub), 2);
    drop(again);

    // `?after=` does the same for an event stream...
    let mut after = open_sse(gw.addr, "/events?session=r&after=2", &[]).await;
    let e = after.event().await;
    assert_eq!((e.id, e.data.as_str()), (Some(3), first[2].data.as_str()));
    drop(after);

    // ...and for a long-poll, which answers a JSON array.
    let items = long_poll(gw.addr, "r", "after=3&wait=5").await;
    assert!(!items.is_empty());
    assert_eq!(items[0]["id"], 4, "{items:?}");
    assert_eq!(
        items[0]["message"],
        serde_json::from_str::<Value>(&first[3].data).unwrap()
    );
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["id"], 4 + i as u64, "{items:?}");
        assert_eq!(tick_of(&item["message"], &sub), 4 + i as u64);
    }
}

#[tokio::test]
async fn a_long_poll_waits_for_the_first_message() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;

    // Nothing yet, and no wait: an empty array (no Accept header at all).
    let resp = request(gw.addr, Method::GET, "/events?session=p&wait=0", &[], "").await;
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    assert_eq!(resp.json(), json!([]));

    let addr = gw.addr;
    let poll = tokio::spawn(async move { long_poll(addr, "p", "after=0&wait=8").await });
    eventually(async || metric(gw.admin, "rpcgate_push_streams").await == 1.0).await;
    let sub = subscribe(gw.addr, "p", 20).await;
    let items = with_timeout(poll).await.expect("long-poll task");
    assert!(
        !items.is_empty(),
        "a long-poll answered before anything came"
    );
    assert_eq!(items[0]["id"], 1, "{items:?}");
    assert_eq!(tick_of(&items[0]["message"], &sub), 1);
}

#[tokio::test]
async fn a_new_reader_of_a_session_replaces_the_old_one() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut first = stream_of(gw.addr, "one").await;
    let mut second = stream_of(gw.addr, "one").await;
    // The old stream ends once another reader takes the session; nothing has to be pushed.
    first.ended().await;

    // A new stream gets what is pushed from now on.
    let sub = subscribe(gw.addr, "one", 20).await;
    assert_eq!(tick_of(&second.event().await.json(), &sub), 1);

    // A WebSocket client of the same session replaces the stream too.
    let (mut ws, session) = ws_connect(gw.addr, "/?session=one", &[]).await;
    assert_eq!(session, "one");
    second.ended().await;
    let next = ws_next(&mut ws).await;
    tick_of(&next, &sub);
    eventually(async || metric(gw.admin, "rpcgate_push_streams").await == 1.0).await;
}

#[tokio::test]
async fn a_full_buffer_is_announced_as_a_gap() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.buffer = 4;
    let gw = gateway_with(config, 1).await;
    // Nobody reads the session: past 4 events the oldest are pushed out.
    let sub = subscribe(gw.addr, "g", 10).await;
    eventually(async || {
        metric(
            gw.admin,
            "rpcgate_pushed_messages_total{outcome=\"dropped\"}",
        )
        .await
            >= 3.0
    })
    .await;

    let items = long_poll(gw.addr, "g", "after=0&wait=0").await;
    let gap = &items[0];
    assert_eq!(gap["gap"]["reason"], "buffer_overflow", "{items:?}");
    let missed = gap["gap"]["missed"].as_u64().expect("a count of missed");
    assert!(missed >= 3, "{items:?}");
    assert_eq!(items[1]["id"], missed + 1, "{items:?}");
    assert_eq!(tick_of(&items[1]["message"], &sub), missed + 1);

    // An event stream from the start says the same, as an `rpcgate.gap` event.
    let mut sse = open_sse(gw.addr, "/events?session=g", &[("last-event-id", "0")]).await;
    let e = sse.event().await;
    assert!(e.is_gap(), "{e:?}");
    let gap = e.json();
    assert_eq!(gap["reason"], "buffer_overflow", "{gap}");
    assert!(gap["missed"].as_u64().unwrap() >= missed, "{gap}");
    let next = sse.event().await;
    assert!(!next.is_gap());
    assert_eq!(next.id, Some(gap["missed"].as_u64().unwrap() + 1));
}

// ---------------------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_websocket_client_is_answered_like_http() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let (mut ws, session) = ws_connect(gw.addr, "/", &[]).await;
    assert!(!session.is_empty());

    // Ids come back byte for byte.
    ws_send(
        &mut ws,
        r#"{"jsonrpc":"2.0","method":"echo","params":[1],"id":1.50}"#,
    )
    .await;
    let text = ws_next_text(&mut ws).await.unwrap();
    assert!(text.contains(r#""id":1.50"#), "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["result"],
        json!([1])
    );

    // A batch: answers in order, none for the notification.
    ws_send(
        &mut ws,
        r#"[{"jsonrpc":"2.0","id":"b","method":"echo","params":["b"]},
            {"jsonrpc":"2.0","method":"echo","params":["n"]},
            {"jsonrpc":"2.0","id":"a","method":"echo","params":["a"]}]"#,
    )
    .await;
    let batch = ws_next(&mut ws).await;
    assert_eq!(
        batch,
        json!([
            {"jsonrpc": "2.0", "id": "b", "result": ["b"]},
            {"jsonrpc": "2.0", "id": "a", "result": ["a"]},
        ])
    );

    // Bad frames get error frames and the socket stays open.
    ws_send(&mut ws, "{not json").await;
    let parse = ws_next(&mut ws).await;
    assert_eq!(error_code(&parse), -32700, "{parse}");
    assert_eq!(parse["id"], Value::Null, "{parse}");
    ws_send(&mut ws, r#"{"jsonrpc":"2.0","id":4,"method":7}"#).await;
    let invalid = ws_next(&mut ws).await;
    assert_eq!(error_code(&invalid), -32600, "{invalid}");

    ws_send(&mut ws, call_body(9, "sum", json!([2, 3]))).await;
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"jsonrpc": "2.0", "id": 9, "result": 5})
    );
    assert_eq!(metric(gw.admin, "rpcgate_push_streams").await, 1.0);
}

#[tokio::test]
async fn a_websocket_client_gets_its_subscriptions_on_the_socket() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let (mut ws, _) = ws_connect(gw.addr, "/", &[]).await;
    ws_send(&mut ws, call_body(1, "ticks_subscribe", json!([20]))).await;
    let reply = ws_next(&mut ws).await;
    assert_eq!(reply["id"], 1, "{reply}");
    let sub = reply["result"]
        .as_str()
        .expect("a subscription id")
        .to_string();
    for n in 1..=3 {
        assert_eq!(tick_of(&ws_next(&mut ws).await, &sub), n);
    }

    ws_send(&mut ws, call_body(2, "ticks_unsubscribe", json!([sub]))).await;
    loop {
        let frame = ws_next(&mut ws).await;
        if frame.get("id").is_some() {
            assert_eq!(frame, json!({"jsonrpc": "2.0", "id": 2, "result": true}));
            break;
        }
        tick_of(&frame, &sub);
    }
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);

    // A session of its own ends with its socket.
    assert_eq!(metric(gw.admin, "rpcgate_push_sessions").await, 1.0);
    with_timeout(ws.close(None)).await.ok();
    drop(ws);
    eventually(async || metric(gw.admin, "rpcgate_push_sessions").await == 0.0).await;
}

#[tokio::test]
async fn a_websocket_client_may_name_its_session() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let (mut ws, session) = ws_connect(gw.addr, "/", &[(HEADER, "mine")]).await;
    assert_eq!(session, "mine");
    // A subscription made over HTTP for that session arrives on the socket.
    let sub = subscribe(gw.addr, "mine", 20).await;
    assert_eq!(tick_of(&ws_next(&mut ws).await, &sub), 1);

    let (mut by_cookie, session) =
        ws_connect(gw.addr, "/", &[("cookie", "rpcgate_session=baked")]).await;
    assert_eq!(session, "baked");
    let sub = subscribe(gw.addr, "baked", 20).await;
    assert_eq!(tick_of(&ws_next(&mut by_cookie).await, &sub), 1);
}

#[tokio::test]
async fn websocket_upgrades_can_be_turned_off() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.http.websocket = false;
    let gw = gateway_with(config, 1).await;
    let resp = request(
        gw.addr,
        Method::GET,
        "/",
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        "",
    )
    .await;
    assert_eq!(
        resp.status,
        StatusCode::BAD_REQUEST,
        "body: {}",
        resp.text()
    );
    assert_eq!(error_code(&resp.json()), -32097, "{}", resp.text());
    // Plain HTTP still works.
    let resp = post_as(gw.addr, None, call_body(1, "sum", json!([1, 2]))).await;
    assert_eq!(result_of(&resp), json!(3));
}

// ---------------------------------------------------------------------------------------
// A session's own upstream socket: everything on it is the session's
// ---------------------------------------------------------------------------------------

fn own_socket_config(echo: &Echo) -> Config {
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.sessions.affinity = Affinity::Connection;
    config
}

#[tokio::test]
async fn an_own_socket_pushes_notices_and_asks_answered_over_http() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(own_socket_config(&echo), 1).await;
    let mut sse = stream_of(gw.addr, "own").await;

    let resp = post_as(
        gw.addr,
        Some("own"),
        call_body(1, "notify_me", json!(["hi"])),
    )
    .await;
    assert_eq!(result_of(&resp), json!(true));
    let notice = sse.event().await.json();
    assert_eq!(
        notice,
        json!({"jsonrpc": "2.0", "method": "notice", "params": ["hi"]})
    );

    // `ask`: the upstream asks the client, the client answers with a POST.
    let addr = gw.addr;
    let ask = tokio::spawn(async move {
        post_as(addr, Some("own"), call_body(2, "ask", json!(["sure?"]))).await
    });
    let confirm = sse.event().await.json();
    assert_eq!(
        confirm,
        json!({"jsonrpc": "2.0", "id": "ask-1", "method": "confirm", "params": ["sure?"]})
    );
    let answer = post_as(
        gw.addr,
        Some("own"),
        json!({"jsonrpc": "2.0", "id": "ask-1", "result": "yes"}).to_string(),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::ACCEPTED,
        "body: {}",
        answer.text()
    );
    let resp = with_timeout(ask).await.expect("ask task");
    assert_eq!(
        result_of(&resp),
        json!({"question": "sure?", "answer": "yes"})
    );
    assert_eq!(
        metric(
            gw.admin,
            "rpcgate_server_requests_total{outcome=\"answered\"}"
        )
        .await,
        1.0
    );

    // Answered with an error, the upstream says the client refused.
    let ask = tokio::spawn(async move {
        post_as(addr, Some("own"), call_body(3, "ask", json!(["again?"]))).await
    });
    let confirm = sse.event().await.json();
    assert_eq!(confirm["id"], "ask-2", "{confirm}");
    let answer = post_as(
        gw.addr,
        Some("own"),
        json!({"jsonrpc": "2.0", "id": "ask-2", "error": {"code": 1, "message": "no"}}).to_string(),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::ACCEPTED,
        "body: {}",
        answer.text()
    );
    let resp = with_timeout(ask).await.expect("ask task");
    assert_eq!(error_code(&resp.json()), -32001, "{}", resp.text());
}

#[tokio::test]
async fn an_answer_nobody_asked_for_is_404() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(own_socket_config(&echo), 1).await;
    let resp = post_as(
        gw.addr,
        Some("nobody"),
        json!({"jsonrpc": "2.0", "id": "ask-9", "result": 1}).to_string(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "body: {}", resp.text());
    let v = resp.json();
    assert_eq!(error_code(&v), -32096, "{v}");
    assert_eq!(v["id"], "ask-9", "{v}");
}

#[tokio::test]
async fn an_unanswered_ask_is_answered_by_rpcgate() {
    let echo = Echo::start("a").await;
    let mut config = own_socket_config(&echo);
    config.calls.request_timeout = Duration::from_millis(300);
    let gw = gateway_with(config, 1).await;
    let mut sse = stream_of(gw.addr, "silent").await;
    let addr = gw.addr;
    // The call itself may time out as well; what matters is what the upstream is told.
    let ask = tokio::spawn(async move {
        post_as(addr, Some("silent"), call_body(1, "ask", json!(["there?"]))).await
    });
    let confirm = sse.event().await.json();
    assert_eq!(confirm["method"], "confirm", "{confirm}");
    eventually(async || {
        metric(
            gw.admin,
            "rpcgate_server_requests_total{outcome=\"timed_out\"}",
        )
        .await
            == 1.0
    })
    .await;
    let _ = with_timeout(ask).await;
    // Too late now: the request is no longer waiting.
    let late = post_as(
        gw.addr,
        Some("silent"),
        json!({"jsonrpc": "2.0", "id": confirm["id"], "result": "here"}).to_string(),
    )
    .await;
    assert_eq!(late.status, StatusCode::NOT_FOUND, "body: {}", late.text());
    assert_eq!(
        metric(
            gw.admin,
            "rpcgate_server_requests_total{outcome=\"answered\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn a_websocket_client_answers_asks_on_its_socket() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(own_socket_config(&echo), 1).await;
    let (mut ws, _) = ws_connect(gw.addr, "/", &[]).await;

    ws_send(&mut ws, call_body(1, "notify_me", json!([{"x": 1}]))).await;
    let mut frames = vec![ws_next(&mut ws).await, ws_next(&mut ws).await];
    frames.sort_by_key(|f| f.get("id").is_some());
    assert_eq!(
        frames,
        vec![
            json!({"jsonrpc": "2.0", "method": "notice", "params": [{"x": 1}]}),
            json!({"jsonrpc": "2.0", "id": 1, "result": true}),
        ]
    );

    ws_send(&mut ws, call_body(2, "ask", json!(["ok?"]))).await;
    let confirm = ws_next(&mut ws).await;
    assert_eq!(
        confirm,
        json!({"jsonrpc": "2.0", "id": "ask-1", "method": "confirm", "params": ["ok?"]})
    );
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": "ask-1", "result": 42}).to_string(),
    )
    .await;
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"jsonrpc": "2.0", "id": 2, "result": {"question": "ok?", "answer": 42}})
    );
}

// ---------------------------------------------------------------------------------------
// Subscriptions outlive their upstream connection
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_subscription_is_reopened_when_its_upstream_dies() {
    let first = Echo::start("first").await;
    // The second upstream is bound but not served yet: the gateway's connections to it wait,
    // so the subscription can only go to the first.
    let second_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_url = format!("ws://{}", second_listener.local_addr().unwrap());
    let gw = gateway_with(push_config(&[first.url.clone(), second_url], 1), 1).await;

    let mut sse = stream_of(gw.addr, "keep").await;
    let sub = subscribe(gw.addr, "keep", 20).await;
    for n in 1..=5 {
        assert_eq!(tick_of(&sse.event().await.json(), &sub), n);
    }

    let second = Echo::serve(second_listener, "second");
    gw.wait_open(2).await;
    first.kill().await;

    let gaps = resumed_after_gap(&mut sse, &sub).await;
    assert_eq!(gaps, 1, "one connection lost, one gap");
    assert_eq!(
        metric(
            gw.admin,
            "rpcgate_push_resubscriptions_total{result=\"ok\"}"
        )
        .await,
        1.0
    );
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 1.0);

    // Unsubscribing with the client's id reaches the new connection.
    let resp = post_as(
        gw.addr,
        Some("keep"),
        call_body(3, "ticks_unsubscribe", json!([sub])),
    )
    .await;
    assert_eq!(result_of(&resp), json!(true));
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
    drop(second);
}

/// Reads `sse` past the gap(s) an upstream reconnect causes (reason
/// `upstream_reconnected`) up to three ticks of the re-opened subscription, still under
/// `sub`: they count afresh from 1, one by one. Returns how many gaps came.
async fn resumed_after_gap(sse: &mut Sse, sub: &str) -> usize {
    let mut gaps = 0;
    let mut after_gap: Vec<u64> = Vec::new();
    while after_gap.len() < 3 {
        let e = sse.event().await;
        if e.is_gap() {
            let gap = e.json();
            assert_eq!(gap["reason"], "upstream_reconnected", "{gap}");
            assert_eq!(gap["missed"], Value::Null, "{gap}");
            gaps += 1;
            after_gap.clear();
            continue;
        }
        let count = tick_of(&e.json(), sub);
        if gaps > 0 {
            if let Some(last) = after_gap.last() {
                assert_eq!(count, last + 1, "{e:?}");
            }
            after_gap.push(count);
        }
    }
    // The new upstream subscription counts from 1, and none of its ticks is lost, even
    // those that came before its subscribe call's answer was read.
    assert_eq!(after_gap[0], 1, "not counting afresh from 1: {after_gap:?}");
    gaps
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_sessions_each_get_only_their_own_ticks() {
    const SESSIONS: usize = 200;
    const TICKS: u64 = 5;
    let echo = Echo::start("a").await;
    // The echo backend allows 64 subscriptions per connection.
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 8), 8).await;
    let addr = gw.addr;

    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| {
            tokio::spawn(async move {
                let session = format!("load-{i}");
                let mut sse = stream_of(addr, &session).await;
                let sub = subscribe(addr, &session, 50).await;
                // Ids are per upstream connection, so two sessions may hold the same one;
                // a tick of another session's would show as a count out of sequence.
                // The first is 1: a tick that beats the subscribe's answer is kept.
                let mut last = None;
                for n in 1..=TICKS {
                    let e = sse.event().await;
                    assert!(!e.is_gap(), "{session}: {e:?}");
                    assert_eq!(e.id, Some(n), "{session}: {e:?}");
                    let message = e.json();
                    assert_eq!(
                        message["params"]["subscription"], sub,
                        "{session} got a tick of another subscription: {message}"
                    );
                    let count = tick_of(&message, &sub);
                    assert_eq!(count, last.map_or(1, |l| l + 1), "{session}: {message}");
                    last = Some(count);
                }
                let resp = post_as(
                    addr,
                    Some(&session),
                    call_body(2, "ticks_unsubscribe", json!([sub])),
                )
                .await;
                assert_eq!(result_of(&resp), json!(true), "{session}");
            })
        })
        .collect();
    with_timeout_of(Duration::from_secs(60), async {
        for task in tasks {
            task.await.expect("a session's task");
        }
    })
    .await;
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
    assert_eq!(
        metric(gw.admin, "rpcgate_push_sessions").await,
        SESSIONS as f64
    );
    assert!(
        metric(
            gw.admin,
            "rpcgate_pushed_messages_total{outcome=\"delivered\"}"
        )
        .await
            >= (SESSIONS as u64 * TICKS) as f64
    );
}

// ---------------------------------------------------------------------------------------
// Isolation, limits and the end of sessions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_sessions_subscriptions_on_different_sockets_get_distinct_ids() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 2), 2).await;
    let mut sse = stream_of(gw.addr, "many").await;
    let mut subs = Vec::new();
    for _ in 0..8 {
        subs.push(subscribe(gw.addr, "many", 20).await);
    }
    let distinct: HashSet<&String> = subs.iter().collect();
    assert_eq!(distinct.len(), subs.len(), "{subs:?}");
    // Every tick names one of them, and each counts 1, 2, 3... with no other's mixed in.
    let mut counts: std::collections::HashMap<String, u64> = Default::default();
    while counts.len() < subs.len() || counts.values().any(|c| *c < 3) {
        let message = sse.event().await.json();
        let of = message["params"]["subscription"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(subs.contains(&of), "{message} is none of {subs:?}");
        let count = tick_of(&message, &of);
        let last = counts.entry(of).or_insert(0);
        assert_eq!(count, *last + 1, "{message}");
        *last = count;
    }
    // Each unsubscribes with the id the client got, whichever socket it is on.
    for (i, sub) in subs.iter().enumerate() {
        let resp = post_as(
            gw.addr,
            Some("many"),
            call_body(10 + i as u64, "ticks_unsubscribe", json!([sub])),
        )
        .await;
        assert_eq!(result_of(&resp), json!(true), "unsubscribing {sub}");
    }
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
}

#[tokio::test]
async fn a_session_may_hold_only_so_many_subscriptions() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.max_subscriptions = 2;
    let gw = gateway_with(config, 1).await;
    subscribe(gw.addr, "few", 1000).await;
    subscribe(gw.addr, "few", 1000).await;
    let resp = post_as(
        gw.addr,
        Some("few"),
        call_body(3, "ticks_subscribe", json!([1000])),
    )
    .await;
    let v = resp.json();
    assert!(v.get("error").is_some(), "a third subscription: {v}");
    assert_eq!(v["id"], 3, "{v}");
    // Another session has its own allowance.
    subscribe(gw.addr, "other", 1000).await;
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 3.0);
}

#[tokio::test]
async fn an_idle_session_ends_and_its_subscriptions_with_it() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.idle_timeout = Duration::from_millis(200);
    let gw = gateway_with(config, 1).await;
    subscribe(gw.addr, "idle", 20).await;
    assert_eq!(metric(gw.admin, "rpcgate_push_sessions").await, 1.0);
    eventually(async || metric(gw.admin, "rpcgate_push_sessions").await == 0.0).await;
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
}

#[tokio::test]
async fn a_closed_websocket_clients_subscriptions_are_closed_upstream() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    // The echo backend allows 64 per connection: 64 sockets fill it, and once they are
    // gone (and their subscriptions closed upstream) there is room again.
    for _ in 0..64 {
        let (mut ws, _) = ws_connect(gw.addr, "/", &[]).await;
        ws_send(&mut ws, call_body(1, "ticks_subscribe", json!([60000]))).await;
        let reply = ws_next(&mut ws).await;
        assert!(reply["result"].is_string(), "{reply}");
        with_timeout(ws.close(None)).await.ok();
    }
    eventually(async || metric(gw.admin, "rpcgate_push_subscriptions").await == 0.0).await;
    let addr = gw.addr;
    eventually(async move || {
        let resp = post_as(
            addr,
            Some("after"),
            call_body(1, "ticks_subscribe", json!([60000])),
        )
        .await;
        resp.json()["result"].is_string()
    })
    .await;
}

#[tokio::test]
async fn an_idle_event_stream_gets_heartbeats() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.heartbeat = Duration::from_millis(50);
    let gw = gateway_with(config, 1).await;
    let mut sse = stream_of(gw.addr, "hb").await;
    assert_eq!(sse.next_block().await.as_deref(), Some(": heartbeat"));
    assert_eq!(sse.next_block().await.as_deref(), Some(": heartbeat"));
}

#[tokio::test]
async fn the_events_path_wants_get_and_a_session() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let resp = request(gw.addr, Method::GET, "/events", &[], "").await;
    assert_eq!(
        resp.status,
        StatusCode::BAD_REQUEST,
        "body: {}",
        resp.text()
    );
    let resp = request(gw.addr, Method::POST, "/events?session=x", &[JSON], "{}").await;
    assert_eq!(
        resp.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "body: {}",
        resp.text()
    );
    assert_eq!(resp.header("allow"), Some("GET"));
}

#[tokio::test]
async fn an_own_socket_subscription_survives_an_upstream_restart() {
    let echo = Echo::start("a").await;
    let addr = echo.url.trim_start_matches("ws://").to_string();
    let gw = gateway_with(own_socket_config(&echo), 1).await;
    let mut sse = stream_of(gw.addr, "mine").await;
    let sub = subscribe(gw.addr, "mine", 20).await;
    for n in 1..=5 {
        assert_eq!(tick_of(&sse.event().await.json(), &sub), n);
    }

    echo.kill().await;
    let listener = TcpListener::bind(&addr)
        .await
        .expect("rebind the same port");
    let _again = Echo::serve(listener, "a");
    // The session's own socket comes back and the subscription is opened on it again:
    // announced as one gap, then ticks of the new one under the id the client holds.
    assert_eq!(
        resumed_after_gap(&mut sse, &sub).await,
        1,
        "one restart, one gap"
    );
    assert_eq!(
        metric(
            gw.admin,
            "rpcgate_push_resubscriptions_total{result=\"ok\"}"
        )
        .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// Batches, readers taking over, limits on sessions
// ---------------------------------------------------------------------------------------

/// A batch of two subscribe calls for `session` (`None`: no session); the answers by id.
async fn batch_subscribe(addr: SocketAddr, session: Option<&str>) -> Vec<Value> {
    let body = json!([
        {"jsonrpc": "2.0", "id": "s1", "method": "ticks_subscribe", "params": [20]},
        {"jsonrpc": "2.0", "id": "s2", "method": "ticks_subscribe", "params": [20]},
    ])
    .to_string();
    let resp = post_as(addr, session, body).await;
    match resp.json() {
        Value::Array(items) => items,
        other => panic!("a batch answer is not an array: {other}"),
    }
}

async fn subscriptions_in_a_batch(mode: rpcgate::config::BatchMode) {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.http.batch = mode;
    let gw = gateway_with(config, 1).await;

    let refused = batch_subscribe(gw.addr, None).await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    for item in &refused {
        assert_eq!(error_code(item), -32088, "{refused:?}");
    }

    let mut sse = stream_of(gw.addr, "b").await;
    let answers = batch_subscribe(gw.addr, Some("b")).await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0]["id"], "s1", "{answers:?}");
    assert_eq!(answers[1]["id"], "s2", "{answers:?}");
    let subs: HashSet<String> = answers
        .iter()
        .map(|a| a["result"].as_str().expect("a subscription id").to_string())
        .collect();
    assert_eq!(subs.len(), 2);
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 2.0);
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        let message = sse.event().await.json();
        let of = message["params"]["subscription"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(subs.contains(&of), "{message}");
        seen.insert(of);
    }
}

#[tokio::test]
async fn subscriptions_in_a_split_batch_are_the_sessions() {
    subscriptions_in_a_batch(rpcgate::config::BatchMode::Split).await;
}

#[tokio::test]
async fn a_named_websocket_session_resumes_where_it_was() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let (mut ws, _) = ws_connect(gw.addr, "/?session=back", &[]).await;
    let sub = subscribe(gw.addr, "back", 20).await;
    let mut last = 0;
    for n in 1..=3 {
        last = tick_of(&ws_next(&mut ws).await, &sub);
        assert_eq!(last, n);
    }
    with_timeout(ws.close(None)).await.ok();
    drop(ws);
    let (mut again, _) = ws_connect(gw.addr, "/?session=back", &[]).await;
    assert_eq!(tick_of(&ws_next(&mut again).await, &sub), last + 1);
    drop(again);
    // `?after=` asks for an earlier point.
    let (mut replay, _) = ws_connect(gw.addr, "/?session=back&after=1", &[]).await;
    assert_eq!(tick_of(&ws_next(&mut replay).await, &sub), 2);
}

#[tokio::test]
async fn a_waiting_long_poll_ends_when_another_reader_takes_the_session() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.max_poll_wait = Duration::from_secs(600);
    let gw = gateway_with(config, 1).await;
    let addr = gw.addr;
    let poll = tokio::spawn(async move { long_poll(addr, "lp", "wait=600").await });
    eventually(async || metric(gw.admin, "rpcgate_push_streams").await == 1.0).await;
    let _sse = stream_of(gw.addr, "lp").await;
    let items = with_timeout(poll).await.expect("long-poll task");
    assert_eq!(items, Vec::<Value>::new());
}

#[tokio::test]
async fn push_sessions_are_limited() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.max_sessions = 1;
    let gw = gateway_with(config, 1).await;
    let _one = stream_of(gw.addr, "one").await;
    let resp = request(gw.addr, Method::GET, "/events?session=two&wait=0", &[], "").await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        resp.text()
    );
    assert_eq!(error_code(&resp.json()), -32095, "{}", resp.text());
    let resp = post_as(
        gw.addr,
        Some("two"),
        call_body(1, "ticks_subscribe", json!([20])),
    )
    .await;
    assert_eq!(error_code(&resp.json()), -32095, "{}", resp.text());
}

// ---------------------------------------------------------------------------------------
// Gaps on WebSocket clients, unsubscribing while the upstream is away
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_websocket_client_hears_of_gaps_as_notifications() {
    let first = Echo::start("first").await;
    let second_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_url = format!("ws://{}", second_listener.local_addr().unwrap());
    let mut config = push_config(&[first.url.clone(), second_url], 1);
    config.push.buffer = 4;
    let gw = gateway_with(config, 1).await;

    // A full buffer before the socket came: a gap first.
    let sub = subscribe(gw.addr, "wsgap", 10).await;
    eventually(async || {
        metric(
            gw.admin,
            "rpcgate_pushed_messages_total{outcome=\"dropped\"}",
        )
        .await
            >= 2.0
    })
    .await;
    let (mut ws, _) = ws_connect(gw.addr, "/?session=wsgap&after=0", &[]).await;
    let gap = ws_next(&mut ws).await;
    assert_eq!(gap["jsonrpc"], "2.0", "{gap}");
    assert_eq!(gap["method"], "rpcgate.gap", "{gap}");
    assert_eq!(gap["params"]["reason"], "buffer_overflow", "{gap}");
    assert!(gap["params"]["missed"].as_u64().unwrap() >= 2, "{gap}");
    assert!(gap.get("id").is_none(), "a gap is a notification: {gap}");
    tick_of(&ws_next(&mut ws).await, &sub);

    // The upstream holding the subscription dies: a gap, then ticks under the same id.
    let second = Echo::serve(second_listener, "second");
    gw.wait_open(2).await;
    first.kill().await;
    loop {
        let frame = ws_next(&mut ws).await;
        if frame["method"] == "rpcgate.gap" {
            assert_eq!(
                frame["params"],
                json!({"reason": "upstream_reconnected", "missed": null}),
                "{frame}"
            );
            break;
        }
        tick_of(&frame, &sub);
    }
    let a = tick_of(&ws_next(&mut ws).await, &sub);
    assert_eq!(tick_of(&ws_next(&mut ws).await, &sub), a + 1);
    drop(second);
}

#[tokio::test]
async fn unsubscribing_while_the_upstream_is_away_ends_the_subscription() {
    let echo = Echo::start("a").await;
    let addr = echo.url.trim_start_matches("ws://").to_string();
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    // The unsubscribe call waits this long for a connection that is not coming.
    config.calls.connect_wait = Duration::from_millis(200);
    let gw = gateway_with(config, 1).await;
    let mut sse = stream_of(gw.addr, "gone").await;
    let sub = subscribe(gw.addr, "gone", 20).await;
    tick_of(&sse.event().await.json(), &sub);
    echo.kill().await;
    eventually(async || gw.upstreams.open_connections() == 0).await;

    let resp = post_as(
        gw.addr,
        Some("gone"),
        call_body(2, "ticks_unsubscribe", json!([sub])),
    )
    .await;
    // The call could not reach the upstream (see the report: the client is told so though
    // the subscription is gone), but rpcgate forgets it either way.
    assert_eq!(resp.json()["id"], 2, "{}", resp.text());
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);

    let listener = TcpListener::bind(&addr)
        .await
        .expect("rebind the same port");
    let _again = Echo::serve(listener, "a");
    gw.wait_open(1).await;
    // Another session's subscription ticks; the ended one is not opened again.
    let mut other = stream_of(gw.addr, "other").await;
    let fresh = subscribe(gw.addr, "other", 20).await;
    for _ in 0..3 {
        tick_of(&other.event().await.json(), &fresh);
    }
    assert_eq!(
        metric(
            gw.admin,
            "rpcgate_push_resubscriptions_total{result=\"ok\"}"
        )
        .await,
        0.0
    );
    // Not asserted: that nothing unsolicited ticks upstream. A re-subscribe already on
    // its way when the client unsubscribed can still open it (see the report).
}

#[tokio::test]
async fn only_the_asked_session_may_answer() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(own_socket_config(&echo), 1).await;
    let mut sse = stream_of(gw.addr, "asked").await;
    let addr = gw.addr;
    let ask = tokio::spawn(async move {
        post_as(addr, Some("asked"), call_body(1, "ask", json!(["who?"]))).await
    });
    let confirm = sse.event().await.json();
    let answer = |session: &'static str| {
        post_as(
            addr,
            Some(session),
            json!({"jsonrpc": "2.0", "id": confirm["id"], "result": session}).to_string(),
        )
    };
    let wrong = answer("stranger").await;
    assert_eq!(
        wrong.status,
        StatusCode::NOT_FOUND,
        "body: {}",
        wrong.text()
    );
    let right = answer("asked").await;
    assert_eq!(right.status, StatusCode::ACCEPTED, "body: {}", right.text());
    let resp = with_timeout(ask).await.expect("ask task");
    assert_eq!(
        result_of(&resp),
        json!({"question": "who?", "answer": "asked"})
    );
}

#[tokio::test]
async fn another_session_cannot_unsubscribe_a_subscription_it_does_not_hold() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut a = stream_of(gw.addr, "victim").await;
    let sub = subscribe(gw.addr, "victim", 20).await;
    assert_eq!(tick_of(&a.event().await.json(), &sub), 1);

    let resp = post_as(
        gw.addr,
        Some("intruder"),
        call_body(5, "ticks_unsubscribe", json!([sub])),
    )
    .await;
    let v = resp.json();
    assert_ne!(
        v["result"],
        json!(true),
        "another session unsubscribed {sub}: {v}"
    );
    // The victim's ticks go on.
    let before = tick_of(&a.event().await.json(), &sub);
    assert_eq!(tick_of(&a.event().await.json(), &sub), before + 1);
    assert_eq!(tick_of(&a.event().await.json(), &sub), before + 2);
}

#[tokio::test]
async fn subscriptions_in_a_forwarded_batch_are_the_sessions() {
    subscriptions_in_a_batch(rpcgate::config::BatchMode::Forward).await;
}

#[tokio::test]
async fn a_websocket_taking_over_from_an_event_stream_does_not_replay_what_it_had() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let mut sse = stream_of(gw.addr, "mix").await;
    let sub = subscribe(gw.addr, "mix", 20).await;
    let mut last = 0;
    for _ in 0..3 {
        let e = sse.event().await;
        last = e.id.unwrap();
        tick_of(&e.json(), &sub);
    }
    let (mut ws, _) = ws_connect(gw.addr, "/?session=mix", &[]).await;
    let first = tick_of(&ws_next(&mut ws).await, &sub);
    assert!(
        first > last,
        "the socket got tick {first} again after the stream had {last}"
    );
}

#[tokio::test]
async fn the_subscription_limit_holds_for_concurrent_subscribes() {
    let echo = Echo::start("a").await;
    let mut config = push_config(std::slice::from_ref(&echo.url), 1);
    config.push.max_subscriptions = 2;
    let gw = gateway_with(config, 1).await;
    let addr = gw.addr;
    let calls: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(async move {
                post_as(
                    addr,
                    Some("racy"),
                    call_body(i, "ticks_subscribe", json!([60000])),
                )
                .await
                .json()
            })
        })
        .collect();
    let mut granted = 0;
    for call in calls {
        let v = with_timeout(call).await.expect("a call");
        if v["result"].is_string() {
            granted += 1;
        } else {
            assert_eq!(error_code(&v), -32089, "{v}");
        }
    }
    assert_eq!(
        granted, 2,
        "subscriptions granted past max_subscriptions = 2"
    );
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 2.0);
}

#[tokio::test]
async fn a_subscription_whose_client_left_before_the_answer_is_not_orphaned() {
    use support::FakeUpstream;
    let up = FakeUpstream::start().await;
    let gw = gateway_with(push_config(&[up.url()], 1), 1).await;
    let body = call_body(1, "ticks_subscribe", json!([20]));
    let mut raw = support::raw_tcp(gw.addr).await;
    raw.write(format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{HEADER}: left\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await
    .unwrap();
    let frame = up.next_frame().await;
    assert_eq!(frame.method(), Some("ticks_subscribe"));
    // The client goes (reset) before the upstream answers.
    let stream = raw.into_inner();
    stream.set_zero_linger().unwrap();
    drop(stream);
    eventually(async || metric(gw.admin, "rpcgate_http_connections_open").await == 0.0).await;
    assert!(frame.reply_result(json!("0xabc")));
    // Either rpcgate keeps the subscription for the session, or it closes it upstream;
    // it must not leave it ticking for nobody.
    eventually(async || {
        metric(gw.admin, "rpcgate_push_subscriptions").await == 1.0
            || up.count_method("ticks_unsubscribe") > 0
    })
    .await;
}
#[tokio::test]
async fn a_subscription_answered_after_its_websocket_left_is_not_orphaned() {
    use support::FakeUpstream;
    let up = FakeUpstream::start().await;
    let gw = gateway_with(push_config(&[up.url()], 1), 1).await;
    let (mut ws, _) = ws_connect(gw.addr, "/", &[]).await;
    ws_send(&mut ws, call_body(1, "ticks_subscribe", json!([20]))).await;
    let frame = up.next_frame().await;
    assert_eq!(frame.method(), Some("ticks_subscribe"));
    with_timeout(ws.close(None)).await.ok();
    drop(ws);
    eventually(async || metric(gw.admin, "rpcgate_push_sessions").await == 0.0).await;
    assert!(frame.reply_result(json!("0xabc")));
    // Its session is gone: rpcgate closes what the upstream opened, and keeps nothing.
    eventually(async || up.count_method("ticks_unsubscribe") == 1).await;
    let closed = up
        .received()
        .into_iter()
        .find(|r| r.method() == Some("ticks_unsubscribe"))
        .expect("an unsubscribe");
    assert_eq!(closed.params(), Some(&json!(["0xabc"])));
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
}

#[tokio::test]
async fn unsubscribing_while_a_resubscribe_is_out_closes_what_it_opens() {
    use support::{Close, FakeUpstream};
    let up = FakeUpstream::start().await;
    let gw = gateway_with(push_config(&[up.url()], 1), 1).await;
    up.auto_reply(|f| {
        (f.method() == Some("ticks_unsubscribe")).then(|| f.result_text(json!(true)))
    });
    let addr = gw.addr;
    let sub = tokio::spawn(async move { subscribe(addr, "race", 20).await });
    let frame = up.next_frame().await;
    assert_eq!(frame.method(), Some("ticks_subscribe"));
    frame.reply_result(json!("0x1"));
    assert_eq!(with_timeout(sub).await.unwrap(), "0x1");
    up.close_all(Close::Abrupt);
    // The re-subscribe reaches the new socket; it is not answered yet.
    let again = up.next_frame().await;
    assert_eq!(again.method(), Some("ticks_subscribe"));
    let resp = post_as(
        gw.addr,
        Some("race"),
        call_body(2, "ticks_unsubscribe", json!(["0x1"])),
    )
    .await;
    assert_eq!(resp.json()["result"], true, "{}", resp.text());
    assert_eq!(metric(gw.admin, "rpcgate_push_subscriptions").await, 0.0);
    again.reply_result(json!("0x2"));
    // What the re-subscribe opened is closed; the dead socket's id is never sent.
    eventually(async || up.count_method("ticks_unsubscribe") == 1).await;
    let closed = up
        .received()
        .into_iter()
        .find(|r| r.method() == Some("ticks_unsubscribe"))
        .expect("an unsubscribe");
    assert_eq!(closed.params(), Some(&json!(["0x2"])));
}

#[tokio::test]
async fn a_stream_after_delivered_starts_where_the_websocket_left_off() {
    let echo = Echo::start("a").await;
    let gw = gateway_with(push_config(std::slice::from_ref(&echo.url), 1), 1).await;
    let (mut ws, _) = ws_connect(gw.addr, "/?session=fall", &[]).await;
    let sub = subscribe(gw.addr, "fall", 20).await;
    let mut last = 0;
    for n in 1..=3 {
        last = tick_of(&ws_next(&mut ws).await, &sub);
        assert_eq!(last, n);
    }
    // The page falls back: its event stream starts after what the socket delivered.
    drop(ws);
    let mut sse = open_sse(gw.addr, "/events?session=fall&after=delivered", &[]).await;
    // (A tick written to the socket just before it closed may be past `last`.)
    let first = tick_of(&sse.event().await.json(), &sub);
    assert!(
        first > last,
        "tick {first} came again after the socket had {last}"
    );
}
