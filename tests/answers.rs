//! Every row of the answer table in docs/errors.md, end to end over real sockets.

mod support;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{Close, FakeUpstream, post, request, with_timeout, with_timeout_of};

const CALL: &str = r#"{"jsonrpc":"2.0","id":"c-1","method":"echo","params":[1,2]}"#;

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

#[tokio::test]
async fn valid_call_gets_the_upstreams_reply_with_the_clients_id() {
    let up = FakeUpstream::start().await;
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;

    let reply = tokio::spawn(post(gw.addr, "/", CALL));
    let frame = up.next_frame().await;
    // The upstream sees our id, a number, never the client's.
    assert!(
        frame.id().is_some_and(Value::is_u64),
        "rewritten id: {}",
        frame.text
    );
    assert_eq!(frame.method(), Some("echo"));
    assert_eq!(frame.params(), Some(&json!([1, 2])));
    frame.reply_result(json!({"ok": true}));

    let resp = with_timeout(reply).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json(),
        json!({"jsonrpc":"2.0","id":"c-1","result":{"ok":true}})
    );
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged_with_200() {
    let up = FakeUpstream::start().await;
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let reply = tokio::spawn(post(gw.addr, "/", CALL));
    let frame = up.next_frame().await;
    let id = frame.id().cloned().unwrap();
    frame.reply_text(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32042,"message":"nope","data":{{"why":[1,2.50]}}}}}}"#
    ));
    let resp = with_timeout(reply).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.text(),
        r#"{"jsonrpc":"2.0","id":"c-1","error":{"code":-32042,"message":"nope","data":{"why":[1,2.50]}}}"#
    );
}

#[tokio::test]
async fn notification_is_forwarded_and_answered_204_without_waiting() {
    let up = FakeUpstream::start().await;
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    // The upstream never answers notifications; the client must not wait for it.
    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","method":"tick","params":{"n":1}}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);
    assert!(resp.body.is_empty());
    let frame = up.next_frame().await;
    assert_eq!(frame.method(), Some("tick"));
    assert!(
        frame.json.get("id").is_none(),
        "a notification stays one: {}",
        frame.text
    );
}

#[tokio::test]
async fn client_errors_are_answered_without_touching_the_upstream() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_body_bytes = 1024;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let json_ct = [("content-type", "application/json")];

    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":"#).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let v = resp.json();
    assert_eq!(error_code(&v), -32700);
    assert_eq!(v["id"], Value::Null);

    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":7,"id":"keep"}"#).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let v = resp.json();
    assert_eq!(error_code(&v), -32600);
    assert_eq!(v["id"], "keep", "the id is echoed when it can be read");

    let resp = request(gw.addr, Method::GET, "/", &[], "").await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.header("allow"), Some("POST"));
    assert_eq!(error_code(&resp.json()), -32090);

    let resp = request(
        gw.addr,
        Method::POST,
        "/",
        &[("content-type", "text/plain")],
        CALL,
    )
    .await;
    assert_eq!(resp.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&resp.json()), -32091);
    let resp = request(gw.addr, Method::POST, "/", &[], CALL).await;
    assert_eq!(
        resp.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a missing content type too"
    );

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"echo","params":["{}"]}}"#,
        "x".repeat(2000)
    );
    let resp = request(gw.addr, Method::POST, "/", &json_ct, big.clone()).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&resp.json()), -32092);

    let resp = request(gw.addr, Method::POST, "/elsewhere", &json_ct, CALL).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.json()), -32093);

    assert_eq!(
        up.frames_received(),
        0,
        "none of these reached the upstream"
    );
}

#[tokio::test]
async fn body_over_the_limit_without_content_length_is_413() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.http.max_body_bytes = 1024;
    let gw = start_gateway(config).await;
    let mut tcp = support::raw_tcp(gw.addr).await;
    // Chunked: the size is only discovered while reading.
    let chunk = "y".repeat(3000);
    let req = format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    tcp.write(req).await.unwrap();
    let answer = String::from_utf8_lossy(&tcp.read_some().await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("-32092"), "{answer}");
}

#[tokio::test]
async fn content_type_parameters_and_case_are_accepted() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("fine"))));
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ] {
        let resp = request(gw.addr, Method::POST, "/", &[("content-type", ct)], CALL).await;
        assert_eq!(resp.status, StatusCode::OK, "content type {ct}");
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_is_504_and_forgets_the_call() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.calls.request_timeout = Duration::from_secs(3);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    // The upstream holds the call; the paused clock jumps to the deadline.
    let resp = with_timeout_of(Duration::from_secs(60), post(gw.addr, "/", CALL)).await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT);
    let v = resp.json();
    assert_eq!(error_code(&v), -32082);
    assert_eq!(v["id"], "c-1");
    assert_eq!(
        gw.upstreams.pending_calls(),
        0,
        "the pending entry is removed"
    );

    // The late reply is dropped, and the connection keeps working.
    let late = up.next_frame().await;
    late.reply_result(json!("too late"));
    up.auto_reply(|f| Some(f.result_text(json!("on time"))));
    let resp = with_timeout_of(Duration::from_secs(60), post(gw.addr, "/", CALL)).await;
    assert_eq!(resp.json()["result"], "on time");
    assert_eq!(
        gw.upstreams.unmatched_counts().0,
        1,
        "the late reply was counted"
    );
}

#[tokio::test(start_paused = true)]
async fn no_upstream_is_503_after_connect_wait() {
    // A port nobody listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = config_for(&[format!("ws://{free}/")], 2);
    config.calls.connect_wait = Duration::from_secs(2);
    let gw = start_gateway(config).await;
    let resp = with_timeout_of(Duration::from_secs(60), post(gw.addr, "/", CALL)).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    let v = resp.json();
    assert_eq!(error_code(&v), -32080);
    assert_eq!(v["id"], "c-1");
    let note = with_timeout_of(
        Duration::from_secs(60),
        post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":"n"}"#),
    )
    .await;
    assert_eq!(
        note.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "notifications too"
    );
}

#[tokio::test]
async fn a_short_upstream_blip_delays_calls_instead_of_failing_them() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_gateway(config_for(&[format!("ws://{free}/")], 1)).await;
    let pending = tokio::spawn(post(gw.addr, "/", CALL));
    // The upstream comes up while the call waits (connect_wait is 5s by default).
    let up = FakeUpstream::start_on(free)
        .await
        .expect("rebind the free port");
    up.auto_reply(|f| Some(f.result_text(json!("after blip"))));
    let resp = with_timeout(pending).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["result"], "after blip");
}

#[tokio::test]
async fn dropped_upstream_answers_every_in_flight_call_with_502_then_recovers() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 2);
    // Far beyond the test's own timeout: a 502 cannot come from waiting it out.
    config.calls.request_timeout = Duration::from_secs(300);
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;

    let calls: Vec<_> = (0..20)
        .map(|i| {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"hold"}}"#);
            tokio::spawn(post(gw.addr, "/", body))
        })
        .collect();
    for _ in 0..20 {
        up.next_frame().await;
    }
    up.close_all(Close::Abrupt);
    for (i, call) in calls.into_iter().enumerate() {
        let resp = with_timeout(call).await.unwrap();
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "call {i}");
        let v = resp.json();
        assert_eq!(error_code(&v), -32081);
        assert_eq!(v["id"], i);
    }
    // Reconnect, then service resumes.
    up.wait_for_open_connections(2).await;
    gw.wait_open(2).await;
    up.auto_reply(|f| Some(f.result_text(json!("back"))));
    let resp = post(gw.addr, "/", CALL).await;
    assert_eq!(resp.json()["result"], "back");
}

#[tokio::test]
async fn clean_close_by_the_upstream_also_answers_502_at_once() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.calls.request_timeout = Duration::from_secs(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let call = tokio::spawn(post(gw.addr, "/", CALL));
    let frame = up.next_frame().await;
    frame.close(Close::Code(1001));
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(start_paused = true)]
async fn full_connections_make_calls_wait_then_503() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.upstreams[0].max_in_flight = 2;
    config.calls.queue_timeout = Duration::from_secs(1);
    config.calls.request_timeout = Duration::from_secs(5);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let first = tokio::spawn(post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":1,"method":"a"}"#,
    ));
    let second = tokio::spawn(post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":2,"method":"b"}"#,
    ));
    let f1 = up.next_frame().await;
    let f2 = up.next_frame().await;
    let third = with_timeout_of(
        Duration::from_secs(60),
        post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":3,"method":"c"}"#),
    )
    .await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&third.json()), -32083);
    assert_eq!(third.json()["id"], 3);

    // A queued call gets the slot a finished one frees.
    let fourth = tokio::spawn(post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":4,"method":"d"}"#,
    ));
    f1.reply_result(json!("one"));
    let f4 = up.next_frame().await;
    assert_eq!(f4.method(), Some("d"));
    f4.reply_result(json!("four"));
    f2.reply_result(json!("two"));
    for (task, want) in [(first, "one"), (second, "two"), (fourth, "four")] {
        let resp = with_timeout_of(Duration::from_secs(60), task)
            .await
            .unwrap();
        assert_eq!(resp.json()["result"], want);
    }
}

#[tokio::test]
async fn garbage_and_unsolicited_frames_never_break_the_connection() {
    let up = FakeUpstream::start().await;
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let call = tokio::spawn(post(gw.addr, "/", CALL));
    let frame = up.next_frame().await;
    frame.reply_text("this is not json");
    frame.reply_binary(vec![0xff, 0xfe, 0x00]);
    frame.reply_text(r#"{"jsonrpc":"2.0","method":"pushed","params":[1]}"#);
    frame.reply_text(r#"{"jsonrpc":"2.0","id":999999,"result":"unknown id"}"#);
    frame.reply_text(r#"[1, {"x": 2}]"#);
    // Binary frames with JSON are replies too.
    let id = frame.id().cloned().unwrap();
    frame.reply_binary(
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":"via binary"}}"#).into_bytes(),
    );
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.json()["result"], "via binary");
    let (unmatched, garbage) = gw.upstreams.unmatched_counts();
    assert_eq!(unmatched, 2, "notification and unknown id");
    assert!(
        garbage >= 3,
        "not-json, not-utf8 and non-message array elements: {garbage}"
    );
    assert_eq!(up.total_connections(), 1, "the connection survived");
}

#[tokio::test]
async fn handshake_carries_configured_headers_and_subprotocol() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.upstreams[0].headers = vec![("Authorization".into(), "Bearer s3cret".into())];
    config.upstreams[0].subprotocol = Some("jsonrpc-2.0".into());
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let hs = up.handshake(0);
    assert_eq!(hs.headers.get("authorization").unwrap(), "Bearer s3cret");
    assert_eq!(hs.protocol.as_deref(), Some("jsonrpc-2.0"));
}

#[tokio::test]
async fn unanswered_pings_mark_the_connection_dead() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.websocket.ping_interval = Duration::from_millis(50);
    config.websocket.pong_timeout = Duration::from_millis(100);
    config.calls.request_timeout = Duration::from_secs(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let call = tokio::spawn(post(gw.addr, "/", CALL));
    up.next_frame().await;
    // A hung upstream: the socket stays open but nothing is read or answered.
    up.freeze();
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
    up.unfreeze();
    up.wait_for_connections(2).await;
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_same_port() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("h2"))));
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let client = support::H2Client::connect(gw.addr).await;
    let calls: Vec<_> = (0..10).map(|_| client.post("/", CALL)).collect();
    for resp in futures_util::future::join_all(calls).await {
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.json()["result"], "h2");
    }
}

#[tokio::test]
async fn an_upstream_that_stops_reading_is_declared_dead() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.websocket.ping_interval = Duration::from_millis(200);
    config.websocket.pong_timeout = Duration::from_millis(100);
    config.calls.request_timeout = Duration::from_secs(300);
    config.http.max_body_bytes = 8 << 20;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    up.freeze();
    // Far more than the loopback socket buffers hold: the gateway's writer blocks.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"echo","params":["{}"]}}"#,
        "z".repeat(4 << 20)
    );
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(post(gw.addr, "/", big.clone())))
        .collect();
    let (mut lost, mut refused) = (0, 0);
    for call in calls {
        let resp = with_timeout(call).await.unwrap();
        match resp.status {
            // Written or queued when the socket was declared dead.
            StatusCode::BAD_GATEWAY => lost += 1,
            // Past limits.upstream_queue_bytes (16 MiB: four of these) nothing more
            // piles up behind the stalled socket.
            StatusCode::SERVICE_UNAVAILABLE => {
                let v = resp.json();
                assert_eq!(v["error"]["data"]["reason"], "upstream_not_reading", "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", resp.text()),
        }
    }
    assert!(lost > 0, "the stalled socket was declared dead");
    assert!(refused > 0, "the queue stopped growing at its byte limit");
}

#[tokio::test]
async fn a_full_connection_queue_answers_overloaded_instead_of_spinning() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.upstreams[0].max_in_flight = 2;
    config.http.max_body_bytes = 8 << 20;
    config.calls.request_timeout = Duration::from_secs(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    up.freeze();
    let big = format!(
        r#"{{"jsonrpc":"2.0","method":"echo","params":["{}"]}}"#,
        "z".repeat(4 << 20)
    );
    // Notifications free their slot once queued, so only the queue bounds them; with
    // the writer blocked behind a frozen upstream, it fills.
    for _ in 0..3 {
        assert_eq!(
            post(gw.addr, "/", big.clone()).await.status,
            StatusCode::NO_CONTENT
        );
    }
    let mut statuses = Vec::new();
    for _ in 0..200 {
        let note = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":"n"}"#).await;
        statuses.push(note.status);
        if note.status != StatusCode::NO_CONTENT {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    let small = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":"n"}"#).await;
    assert_eq!(small.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&small.json()), -32083);
}

#[tokio::test]
async fn a_reply_with_neither_result_nor_a_proper_error_answers_502_at_once() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    // Long enough that a 502 can only come from the reply itself, not the deadline.
    config.calls.request_timeout = Duration::from_secs(600);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    for shape in [
        r#"{"jsonrpc":"2.0","id":ID}"#,
        r#"{"jsonrpc":"2.0","id":ID,"error":{"code":"E1"}}"#,
        r#"{"jsonrpc":"2.0","id":ID,"error":"something broke"}"#,
    ] {
        let reply = tokio::spawn(post(gw.addr, "/", CALL));
        let frame = up.next_frame().await;
        let id = frame.id().cloned().unwrap();
        frame.reply_text(shape.replace("ID", &id.to_string()));
        let resp = with_timeout(reply).await.unwrap();
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{shape}");
        let v = resp.json();
        assert_eq!(error_code(&v), -32084, "{shape}");
        assert_eq!(v["id"], "c-1");
        assert_eq!(v["error"]["data"]["kind"], "invalid_upstream_reply");
        assert_eq!(v["error"]["data"]["may_have_run"], true);
    }
    assert_eq!(gw.upstreams.pending_calls(), 0);
}

#[tokio::test]
async fn gateway_errors_say_they_are_the_gateways_and_upstream_errors_do_not() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.error_text(-32000, "execution reverted")));
    let gw = start_gateway(config_for(&[up.url()], 1)).await;
    gw.wait_open(1).await;
    let passed = post(gw.addr, "/", CALL).await.json();
    assert_eq!(passed["error"]["code"], -32000);
    assert!(passed["error"].get("data").is_none(), "{passed}");
    let ours = post(gw.addr, "/", "{nope").await.json();
    assert_eq!(ours["error"]["data"]["source"], "rpcgate", "{ours}");
    assert_eq!(ours["error"]["data"]["kind"], "parse");
    let ours = request(gw.addr, Method::GET, "/", &[], "").await.json();
    assert_eq!(ours["error"]["data"]["source"], "rpcgate", "{ours}");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_shorter_than_connect_wait_is_the_wait_the_message_names() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = config_for(&[format!("ws://{free}/")], 1);
    config.calls.connect_wait = Duration::from_secs(5);
    config.calls.request_timeout = Duration::from_millis(800);
    let gw = start_gateway(config).await;
    let resp = with_timeout_of(Duration::from_secs(60), post(gw.addr, "/", CALL)).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    let v = resp.json();
    assert_eq!(error_code(&v), -32080);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("within 800ms"), "{message}");
    assert_eq!(v["error"]["data"]["waited_ms"], 800);
}
