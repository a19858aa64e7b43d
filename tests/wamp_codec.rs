//! The WAMP codec (`rpcgate::upstream::wamp`) against a real Crossbar.io router and the
//! Autobahn|Python component (`tests/support/crossbar.rs`), over a bare tokio-tungstenite
//! socket: no gateway. It proves that the frames the codec writes are the ones a real router
//! takes, and that it parses what a real router sends; tests/wamp.rs tests the gateway's use of
//! them.

mod support;

use futures_util::{SinkExt, StreamExt};
use rpcgate::upstream::wamp::{self, CraChallenge, HelloAuth, Message, Payload};
use serde_json::value::RawValue;
use support::crossbar::{Component, REALM, Router};
use support::with_timeout;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket to `url` asking for `wamp.2.json`, which the router must choose.
async fn open(url: &str) -> Ws {
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        wamp::SUBPROTOCOL.parse().expect("header value"),
    );
    let (ws, response) = with_timeout(tokio_tungstenite::connect_async(request))
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some(wamp::SUBPROTOCOL)
    );
    ws
}

async fn send(ws: &mut Ws, frame: String) {
    with_timeout(ws.send(WsMessage::text(frame)))
        .await
        .expect("send");
}

/// The next text frame; WAMP over JSON uses text frames only.
async fn next(ws: &mut Ws) -> String {
    loop {
        let m = with_timeout(ws.next())
            .await
            .expect("the router closed the socket")
            .expect("read");
        if let WsMessage::Text(t) = m {
            return t.as_str().to_owned();
        }
    }
}

/// The next frame that is not an EVENT: ticks arrive every 100 ms while subscribed.
async fn next_not_event(ws: &mut Ws) -> String {
    with_timeout(async {
        loop {
            let frame = next(ws).await;
            if !matches!(wamp::parse(&frame), Ok(Message::Event { .. })) {
                return frame;
            }
        }
    })
    .await
}

fn raw(s: &str) -> &RawValue {
    serde_json::from_str(s).expect("JSON")
}

/// An anonymous session on `url`: HELLO, WELCOME.
async fn join_anonymous(url: &str) -> Ws {
    let mut ws = open(url).await;
    let mut out = String::new();
    wamp::write_hello(&mut out, REALM, HelloAuth::default());
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );
    ws
}

/// Joins with WAMP-CRA as `authid`, answering the CHALLENGE with `secret`; the router's answer
/// (WELCOME or ABORT).
async fn join_cra(url: &str, authid: &str, secret: &str) -> String {
    let mut ws = open(url).await;
    let mut out = String::new();
    let auth = HelloAuth {
        methods: &["wampcra"],
        authid: Some(authid),
    };
    wamp::write_hello(&mut out, REALM, auth);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Challenge { authmethod, extra }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(authmethod, "wampcra");
    let signature = CraChallenge::from_extra(extra)
        .expect("challenge extra")
        .sign(secret.as_bytes());
    let mut out = String::new();
    wamp::write_authenticate(&mut out, &signature.expect("sign"));
    send(&mut ws, out).await;
    next(&mut ws).await
}

/// CALLs `procedure` with `params` (as JSON-RPC params) and returns the answer's frame.
async fn call(ws: &mut Ws, request: u64, procedure: &str, params: Option<&str>) -> String {
    let mut out = String::new();
    let payload = wamp::split_params(params.map(raw)).expect("params");
    wamp::write_call(&mut out, request, None, procedure, payload);
    send(ws, out).await;
    next(ws).await
}

/// The JSON-RPC `result` a RESULT frame for `request` maps to.
#[track_caller]
fn result_of(frame: &str, request: u64) -> serde_json::Value {
    match wamp::parse(frame) {
        Ok(Message::Result {
            request: r,
            payload,
            ..
        }) if r == request => serde_json::from_str(&wamp::result_json(payload)).expect("JSON"),
        _ => panic!("not a RESULT for request {request}: {frame}"),
    }
}

#[tokio::test]
async fn calls_map_params_results_and_errors_both_ways() {
    let router = Router::start().await;
    let _component = Component::start(&router).await;
    let mut ws = join_anonymous(&router.url()).await;

    // Positional params in, one positional result out.
    let frame = call(&mut ws, 1, r#""com.example.add2""#, Some("[2,3]")).await;
    assert_eq!(result_of(&frame, 1), serde_json::json!(5));
    // Several positional results come back as the array.
    let frame = call(&mut ws, 2, r#""com.example.pair""#, None).await;
    assert_eq!(result_of(&frame, 2), serde_json::json!([1, 2]));
    // Keyword params in (a kwargs-only CALL carries `[]` as its Arguments), keyword results out.
    let frame = call(&mut ws, 3, r#""com.example.kw""#, Some(r#"{"a":5,"b":3}"#)).await;
    assert_eq!(
        result_of(&frame, 3),
        serde_json::json!({"sum": 8, "diff": 2})
    );
    // Nothing in, nothing out: `null`.
    let frame = call(&mut ws, 4, r#""com.example.echo""#, None).await;
    assert_eq!(result_of(&frame, 4), serde_json::Value::Null);

    // An ApplicationError comes back as ERROR with its URI and args.
    let frame = call(&mut ws, 5, r#""com.example.fail""#, Some(r#"["it broke"]"#)).await;
    let Ok(Message::Error {
        request_type: wamp::code::CALL,
        request: 5,
        error,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(wamp::error_code(&error), -32000);
    let mut object = String::new();
    wamp::write_error_object(&mut object, &error, payload);
    let object: serde_json::Value = serde_json::from_str(&object).expect("JSON");
    assert_eq!(object["message"], "com.example.error.fail: it broke");
    assert_eq!(
        object["data"],
        serde_json::json!({"uri": "com.example.error.fail", "args": ["it broke"]})
    );

    // A procedure nobody registered: the router's own error, mapped to "method not found".
    let frame = call(&mut ws, 6, r#""com.example.nosuch""#, None).await;
    let Ok(Message::Error { error, .. }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(error, "wamp.error.no_such_procedure");
    assert_eq!(wamp::error_code(&error), -32601);

    // GOODBYE is answered with GOODBYE.
    let mut out = String::new();
    wamp::write_goodbye(&mut out, wamp::CLOSE_SHUTDOWN);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Goodbye { .. })),
        "{frame}"
    );
}

#[tokio::test]
async fn a_cancel_answers_the_caller_at_once_and_interrupts_the_callee() {
    let router = Router::start().await;
    let component = Component::start(&router).await;
    let mut ws = join_anonymous(&router.url()).await;

    let mut out = String::new();
    let payload = Payload {
        args: Some(raw("[30]")),
        kwargs: None,
    };
    wamp::write_call(&mut out, 1, None, r#""com.example.slow""#, payload);
    send(&mut ws, out).await;
    // killnowait: the router answers the caller without waiting for the callee.
    let mut out = String::new();
    wamp::write_cancel(&mut out, 1, wamp::CancelMode::KillNoWait);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Error {
        request_type: wamp::code::CALL,
        request: 1,
        error,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(error, "wamp.error.canceled");
    // ... and the INTERRUPT reached the callee, which stopped sleeping.
    component.wait_for_line("canceled 30").await;
}

#[tokio::test]
async fn subscribe_event_publish_and_unsubscribe() {
    let router = Router::start().await;
    let _component = Component::start(&router).await;
    let mut ws = join_anonymous(&router.url()).await;

    let mut out = String::new();
    wamp::write_subscribe(&mut out, 1, None, r#""com.example.tick""#);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Subscribed {
        request: 1,
        subscription,
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    let frame = next(&mut ws).await;
    let Ok(Message::Event {
        subscription: s,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(s, subscription);
    // The component publishes `[n]` and `{"n": n}`: both kinds, so both are kept.
    let event: serde_json::Value = serde_json::from_str(&wamp::result_json(payload)).expect("JSON");
    assert!(event["args"][0].is_u64(), "{frame}");
    assert_eq!(event["args"][0], event["kwargs"]["n"], "{frame}");

    // Our own PUBLISH is acknowledged, and reaches our own subscription too: one upstream
    // session carries many clients, so the codec asks for `exclude_me: false`.
    let mut out = String::new();
    let payload = Payload {
        args: Some(raw(r#"["mine"]"#)),
        kwargs: None,
    };
    wamp::write_publish(&mut out, 2, true, r#""com.example.tick""#, payload);
    send(&mut ws, out).await;
    // Ticks keep coming, so `next`'s own timeout never fires here: bound the whole wait.
    let (mut published, mut mine) = (false, false);
    with_timeout(async {
        while !(published && mine) {
            let frame = next(&mut ws).await;
            match wamp::parse(&frame) {
                Ok(Message::Published { request: 2, .. }) => published = true,
                Ok(Message::Event { payload, .. }) => {
                    mine |= payload.args.is_some_and(|a| a.get() == r#"["mine"]"#)
                }
                _ => panic!("{frame}"),
            }
        }
    })
    .await;

    let mut out = String::new();
    wamp::write_unsubscribe(&mut out, 3, subscription);
    send(&mut ws, out).await;
    let frame = next_not_event(&mut ws).await;
    assert!(
        matches!(
            wamp::parse(&frame),
            Ok(Message::Unsubscribed { request: 3 })
        ),
        "{frame}"
    );
}

#[tokio::test]
async fn ticket_and_wamp_cra_join_and_refusals_say_why() {
    // No component: nothing here calls a procedure.
    let router = Router::start().await;

    // A ticket.
    let mut ws = open(&router.auth_url()).await;
    let mut out = String::new();
    let auth = HelloAuth {
        methods: &["ticket"],
        authid: Some("ticket-user"),
    };
    wamp::write_hello(&mut out, REALM, auth);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Challenge { authmethod, .. }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(authmethod, "ticket");
    let mut out = String::new();
    wamp::write_authenticate(&mut out, "ticket-secret");
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );

    // WAMP-CRA, plain and salted (the key derived with the challenge's salt).
    let frame = join_cra(&router.auth_url(), "cra-user", "cra-secret").await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );
    let frame = join_cra(&router.auth_url(), "cra-salted", "cra-salted-secret").await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );

    // A wrong secret is an ABORT (never a silent anonymous session on this transport).
    let frame = join_cra(&router.auth_url(), "cra-user", "wrong").await;
    let Ok(Message::Abort { reason, .. }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(reason, "wamp.error.not_authorized");

    // An unknown realm is an ABORT with the router's explanation.
    let mut ws = open(&router.url()).await;
    let mut out = String::new();
    wamp::write_hello(&mut out, "nosuch", HelloAuth::default());
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Abort { reason, details }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(reason, "wamp.error.no_such_realm");
    assert!(
        wamp::details_message(details).is_some_and(|m| m.contains("nosuch")),
        "{frame}"
    );
}

/// The harness itself: a router stopped and started again comes back on the same ports, and a
/// component started after it works.
#[tokio::test]
async fn the_router_restarts_on_the_same_ports() {
    let mut router = Router::start().await;
    let (url, auth_url) = (router.url(), router.auth_url());
    router.restart().await;
    assert_eq!((router.url(), router.auth_url()), (url.clone(), auth_url));
    let _component = Component::start(&router).await;
    let mut ws = join_anonymous(&url).await;
    let frame = call(&mut ws, 1, r#""com.example.add2""#, Some("[20,22]")).await;
    assert_eq!(result_of(&frame, 1), serde_json::json!(42));
}
