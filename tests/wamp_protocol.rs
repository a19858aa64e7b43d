//! The WAMP session rpcgate holds on each upstream connection, message by message,
//! against a scripted router (`FakeUpstream` answering WAMP by hand): what HELLO
//! announces and how a ticket is sent, GOODBYE on shutdown, a router's GOODBYE or ABORT
//! mid-session, and frames a caller's session does not expect. The behaviour against a
//! real router (Crossbar.io) is `tests/wamp.rs`.

mod support;

use serde_json::{Value, json};
use support::admin::metric;
use support::fake_upstream::{FakeUpstream, Incoming};
use support::gateway::{TestGateway, config_for, start_gateway};
use support::rpc::{call_body, post_as, result_of};
use support::with_timeout;

/// A gateway with one WAMP connection to `up`, realm `realm1`; `adjust` may add auth.
async fn gateway(
    up: &FakeUpstream,
    adjust: impl FnOnce(&mut rpcgate::config::UpstreamConfig),
) -> TestGateway {
    let mut config = config_for(&[up.url()], 1);
    let u = &mut config.upstreams[0];
    u.protocol = rpcgate::config::Protocol::Wamp;
    u.realm = Some("realm1".into());
    adjust(u);
    start_gateway(config).await
}

/// POSTs a call in the background (the test answers it as the router meanwhile).
fn call_later(
    gw: &TestGateway,
    session: Option<&'static str>,
    id: u64,
    method: &'static str,
    params: Value,
) -> tokio::task::JoinHandle<support::http::Response> {
    let addr = gw.addr;
    tokio::spawn(async move { post_as(addr, session, call_body(id, method, params)).await })
}

/// Waits for the next HELLO and answers WELCOME; returns the HELLO.
async fn welcome(up: &FakeUpstream) -> Incoming {
    let hello = up.next_frame().await;
    assert_eq!(hello.json[0], 1, "HELLO first: {}", hello.text);
    hello.reply_text(r#"[2,4242,{"roles":{"dealer":{},"broker":{}}}]"#);
    hello
}

/// Answers the next CALL with `args`; returns it.
async fn answer_call(up: &FakeUpstream, args: Value) -> Incoming {
    let call = up.next_frame().await;
    assert_eq!(call.json[0], 48, "a CALL: {}", call.text);
    call.reply_text(json!([50, call.json[1], {}, args]).to_string());
    call
}

#[tokio::test]
async fn hello_asks_for_the_realm_with_our_roles_and_a_ticket_answers_the_challenge() {
    let up = FakeUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("rpcgate-wamp-ticket-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ticket = dir.join("ticket");
    std::fs::write(&ticket, "the-ticket\n").unwrap();
    let gw = gateway(&up, |u| {
        u.procedure_prefix = "com.example.".into();
        u.wamp_auth = Some(rpcgate::config::WampAuth {
            method: rpcgate::config::WampAuthMethod::Ticket,
            authid: "gateway-1".into(),
            secret_env: None,
            secret_file: Some(ticket.clone()),
        });
    })
    .await;
    let hello = up.next_frame().await;
    assert_eq!(
        up.handshake(0).protocol.as_deref(),
        Some("wamp.2.json"),
        "the WebSocket handshake asks for WAMP's JSON subprotocol"
    );
    assert_eq!(hello.json[1], "realm1");
    let details = &hello.json[2];
    for role in ["caller", "subscriber", "publisher"] {
        assert!(details["roles"][role].is_object(), "role {role}: {details}");
    }
    assert_eq!(
        details["roles"]["caller"]["features"]["call_canceling"],
        true
    );
    assert_eq!(details["authmethods"], json!(["ticket"]));
    assert_eq!(details["authid"], "gateway-1");
    hello.reply_text(r#"[4,"ticket",{}]"#);
    let authenticate = up.next_frame().await;
    assert_eq!(
        authenticate.json,
        json!([5, "the-ticket", {}]),
        "the ticket without the file's line break"
    );
    // Not open before WELCOME: a call made now waits for it.
    let pending = call_later(&gw, None, 1, "add2", json!([2, 3]));
    authenticate.reply_text("[2,99,{}]");
    let call = answer_call(&up, json!([5])).await;
    assert_eq!(call.json[3], "com.example.add2");
    assert_eq!(call.json[4], json!([2, 3]));
    assert_eq!(result_of(&with_timeout(pending).await.unwrap()), json!(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stopping_the_gateway_says_goodbye_to_the_router() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    welcome(&up).await;
    gw.wait_open(1).await;
    gw.stop().await;
    let goodbye = up.next_frame().await;
    assert_eq!(goodbye.json, json!([6, {}, "wamp.close.system_shutdown"]));
    with_timeout(up.wait_for_connection_end(0)).await;
}

#[tokio::test]
async fn a_router_s_goodbye_is_answered_and_the_connection_joins_again() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let hello = welcome(&up).await;
    gw.wait_open(1).await;
    hello.reply_text(r#"[6,{"message":"maintenance"},"wamp.close.system_shutdown"]"#);
    let ours = up.next_frame().await;
    assert_eq!(
        (ours.conn, ours.json.clone()),
        (0, json!([6, {}, "wamp.close.goodbye_and_out"]))
    );
    // A new socket, a new session: HELLO again, and calls flow on it.
    let again = welcome(&up).await;
    assert_eq!(again.conn, 1);
    let pending = call_later(&gw, None, 7, "com.example.echo", json!(["x"]));
    let call = answer_call(&up, json!(["x"])).await;
    assert_eq!(call.conn, 1);
    assert_eq!(result_of(&with_timeout(pending).await.unwrap()), json!("x"));
}

#[tokio::test]
async fn an_abort_mid_session_ends_the_connection_and_its_call_is_answered_at_once() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let hello = welcome(&up).await;
    gw.wait_open(1).await;
    let pending = call_later(&gw, None, 3, "com.example.slow", json!([60]));
    let call = up.next_frame().await;
    assert_eq!(call.json[0], 48);
    hello.reply_text(r#"[3,{"message":"bye"},"wamp.error.protocol_violation"]"#);
    // The CALL was written when the session ended: it may have run, so it is not sent
    // again (no retry_methods), and its client learns so now, not at the deadline.
    let answer = with_timeout(pending).await.unwrap();
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.json()["error"]["data"]["kind"], "upstream_lost");
    let again = welcome(&up).await;
    assert_eq!(again.conn, 1, "a fresh socket joins again");
}

#[tokio::test]
async fn frames_a_caller_does_not_expect_are_counted_and_the_session_goes_on() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let hello = welcome(&up).await;
    gw.wait_open(1).await;
    // An INVOCATION (we register nothing), a RESULT for a request never made, an EVENT
    // for no subscription, and text that is not WAMP at all.
    for junk in [
        r#"[68,1,1,{},[1]]"#,
        r#"[50,123456,{},[1]]"#,
        r#"[36,77,1,{},[1]]"#,
        "not json",
    ] {
        hello.reply_text(junk);
    }
    let pending = call_later(&gw, None, 1, "com.example.add2", json!([1, 1]));
    answer_call(&up, json!([2])).await;
    assert_eq!(result_of(&with_timeout(pending).await.unwrap()), json!(2));
    assert_eq!(up.total_connections(), 1, "the same socket throughout");
    // The RESULT nobody asked for is unsolicited; the other three are no message a
    // caller's session reads.
    let unmatched =
        |kind: &str| format!(r#"rpcgate_upstream_unmatched_messages_total{{kind="{kind}"}}"#);
    assert_eq!(metric(gw.admin, &unmatched("garbage")).await, 3.0);
    assert_eq!(metric(gw.admin, &unmatched("unsolicited")).await, 1.0);
}

#[tokio::test]
async fn a_router_that_answers_hello_with_something_else_fails_the_connect_saying_so() {
    let up = FakeUpstream::start().await;
    let _gw = gateway(&up, |_| {}).await;
    let hello = up.next_frame().await;
    hello.reply_text(r#"[50,1,{},[1]]"#);
    // Not opened: the next attempt is a new socket with a new HELLO.
    let again = up.next_frame().await;
    assert_eq!((again.conn, again.json[0].clone()), (1, json!(1)));
}

#[tokio::test]
async fn a_stranger_s_unsubscribe_notification_leaves_another_session_s_subscription_alone() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let hello = welcome(&up).await;
    gw.wait_open(1).await;
    let addr = gw.addr;
    let pending = call_later(&gw, Some("alice"), 1, "wamp.subscribe", json!(["t"]));
    let sub = up.next_frame().await;
    assert_eq!(sub.json[0], 32, "{}", sub.text);
    sub.reply_text(json!([33, sub.json[1], 900]).to_string());
    let local = result_of(&with_timeout(pending).await.unwrap());
    // Local ids are small numbers; a notification would skip the hub's ownership check,
    // so neither it nor a call from another session may reach the router.
    let note = json!({"jsonrpc":"2.0","method":"wamp.unsubscribe","params":[local]});
    assert_eq!(post_as(addr, None, note.to_string()).await.status, 204);
    let call = call_body(2, "wamp.unsubscribe", json!([local]));
    assert_eq!(
        result_of(&post_as(addr, Some("mallory"), call).await),
        json!(false)
    );
    // The next frame the router sees is this call, not an UNSUBSCRIBE.
    let pending = call_later(&gw, None, 3, "com.example.add2", json!([1, 2]));
    answer_call(&up, json!([3])).await;
    assert_eq!(result_of(&with_timeout(pending).await.unwrap()), json!(3));
    drop(hello);
}
