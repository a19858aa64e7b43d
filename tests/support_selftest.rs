//! Checks the shared test support itself, with plain tokio-tungstenite and hyper peers, so a failing
//! gateway test can be trusted to be about the gateway.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use support::{Client, Close, FakeUpstream, H2Client, post, raw_tcp, request, with_timeout};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(upstream: &FakeUpstream) -> Ws {
    let (ws, _) = with_timeout(tokio_tungstenite::connect_async(upstream.url()))
        .await
        .expect("WebSocket handshake with FakeUpstream");
    ws
}

async fn send_json(ws: &mut Ws, value: Value) {
    with_timeout(ws.send(Message::text(value.to_string())))
        .await
        .expect("send to FakeUpstream");
}

/// The next data frame from the upstream, parsed as JSON.
async fn recv_json(ws: &mut Ws) -> Value {
    loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).expect("FakeUpstream sent JSON");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the connection ends and returns how it ended.
async fn recv_end(ws: &mut Ws) -> Option<Result<Message, WsError>> {
    loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

fn call(id: u64, method: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": [id] })
}

#[tokio::test]
async fn replies_go_back_in_the_order_the_test_chooses() {
    let upstream = FakeUpstream::start().await;
    let mut ws = connect(&upstream).await;
    send_json(&mut ws, call(1, "first")).await;
    send_json(&mut ws, call(2, "second")).await;

    let first = upstream.next_frame().await;
    let second = upstream.next_frame().await;
    assert_eq!(first.conn, 0);
    assert_eq!(first.id(), Some(&json!(1)));
    assert_eq!(first.method(), Some("first"));
    assert_eq!(first.params(), Some(&json!([1])));
    assert_eq!(second.method(), Some("second"));

    // Answer from another task, newest first.
    let replier = tokio::spawn(async move {
        assert!(second.reply_result(json!("two")));
        assert!(first.reply_error(-32000, "one failed"));
    });
    with_timeout(replier).await.expect("replier task");

    let reply = recv_json(&mut ws).await;
    assert_eq!(reply, json!({ "jsonrpc": "2.0", "id": 2, "result": "two" }));
    let reply = recv_json(&mut ws).await;
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["error"]["code"], -32000);
    assert_eq!(reply["error"]["message"], "one failed");
    assert_eq!(upstream.frames_received(), 2);
    assert!(upstream.try_next_frame().is_none());
}

#[tokio::test]
async fn raw_and_binary_replies_are_sent_verbatim() {
    let upstream = FakeUpstream::start().await;
    let mut ws = connect(&upstream).await;
    send_json(&mut ws, call(7, "x")).await;
    let frame = upstream.next_frame().await;

    frame.reply_text("not json at all");
    frame.reply_binary(Bytes::from_static(b"\x00\x01"));

    match with_timeout(ws.next()).await {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), "not json at all"),
        other => panic!("expected the raw text, got {other:?}"),
    }
    match with_timeout(ws.next()).await {
        Some(Ok(Message::Binary(bytes))) => assert_eq!(&bytes[..], b"\x00\x01"),
        other => panic!("expected the binary frame, got {other:?}"),
    }
}

#[tokio::test]
async fn abrupt_close_and_reset_end_the_client_stream_without_a_close_frame() {
    for how in [Close::Abrupt, Close::Reset] {
        let upstream = FakeUpstream::start().await;
        let mut ws = connect(&upstream).await;
        upstream.wait_for_connections(1).await;
        assert_eq!(upstream.close_all(how), 1);

        match recv_end(&mut ws).await {
            None | Some(Err(_)) => {}
            other => {
                panic!("{how:?}: expected the stream to end without a close frame, got {other:?}")
            }
        }
        upstream.wait_for_open_connections(0).await;
        // The connection is gone, so a late reply is dropped rather than panicking.
        assert!(!upstream.close(0, Close::Clean));
        assert_eq!(upstream.send_to_all("late"), 0);
    }
}

#[tokio::test]
async fn clean_close_sends_the_requested_code() {
    for (how, code) in [
        (Close::Clean, CloseCode::Normal),
        (Close::Code(1011), CloseCode::Error),
    ] {
        let upstream = FakeUpstream::start().await;
        let mut ws = connect(&upstream).await;
        upstream.wait_for_connections(1).await;
        assert!(upstream.close(0, how));

        match recv_end(&mut ws).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, code),
            other => panic!("{how:?}: expected a close frame, got {other:?}"),
        }
        // Our side answers the close; the upstream then drops the connection.
        assert!(recv_end(&mut ws).await.is_none());
        upstream.wait_for_open_connections(0).await;
    }
}

#[tokio::test]
async fn handshake_is_recorded_and_the_first_subprotocol_accepted() {
    let upstream = FakeUpstream::start().await;
    let mut req = format!("{}v1/key?x=1", upstream.url())
        .into_client_request()
        .expect("valid URL");
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        "Bearer s3cret".parse().expect("header value"),
    );
    headers.insert(
        "sec-websocket-protocol",
        "jsonrpc, other".parse().expect("header value"),
    );

    let (_ws, response) = with_timeout(tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "jsonrpc");

    upstream.wait_for_connections(1).await;
    let handshake = upstream.handshake(0);
    assert_eq!(handshake.uri.path(), "/v1/key");
    assert_eq!(handshake.uri.query(), Some("x=1"));
    assert_eq!(handshake.protocol.as_deref(), Some("jsonrpc"));
    assert_eq!(
        upstream.handshake_headers(0)["authorization"],
        "Bearer s3cret"
    );
}

#[tokio::test]
async fn rejected_handshakes_carry_the_chosen_status() {
    let upstream = FakeUpstream::start().await;
    upstream.reject_handshakes(Some(StatusCode::UNAUTHORIZED));
    match with_timeout(tokio_tungstenite::connect_async(upstream.url())).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::UNAUTHORIZED),
        other => panic!("expected a 401 refusal, got {:?}", other.map(|(_, r)| r)),
    }
    assert_eq!(upstream.rejected_handshakes(), 1);
    assert_eq!(upstream.total_connections(), 0);

    upstream.reject_handshakes(None);
    let _ws = connect(&upstream).await;
    upstream.wait_for_connections(1).await;
}

#[tokio::test]
async fn send_to_all_reaches_every_open_connection() {
    let upstream = FakeUpstream::start().await;
    let mut a = connect(&upstream).await;
    let mut b = connect(&upstream).await;
    upstream.wait_for_connections(2).await;
    assert_eq!(upstream.open_connections(), 2);

    let note = json!({ "jsonrpc": "2.0", "method": "tick", "params": { "n": 1 } });
    assert_eq!(upstream.send_to_all(note.to_string()), 2);
    assert_eq!(recv_json(&mut a).await, note);
    assert_eq!(recv_json(&mut b).await, note);

    assert!(upstream.send_to(1, "{}"));
    assert_eq!(recv_json(&mut b).await, json!({}));

    with_timeout(a.close(None)).await.expect("close a");
    drop(b);
    upstream.wait_for_open_connections(0).await;
    assert_eq!(upstream.total_connections(), 2);
}

#[tokio::test]
async fn batch_frames_expose_their_elements() {
    let upstream = FakeUpstream::start().await;
    let mut ws = connect(&upstream).await;
    send_json(&mut ws, json!([call(1, "a"), call(2, "b")])).await;

    let frame = upstream.next_frame().await;
    let batch = frame.batch().expect("a batch");
    assert_eq!(batch.len(), 2);
    assert_eq!(frame.id(), None);
    let answers = batch
        .iter()
        .rev()
        .map(|req| support::fake_upstream::result_for(req, req["method"].clone()))
        .collect();
    frame.reply_batch(answers);

    let reply = recv_json(&mut ws).await;
    assert_eq!(
        reply[0],
        json!({ "jsonrpc": "2.0", "id": 2, "result": "b" })
    );
    assert_eq!(reply[1]["id"], 1);
}

#[tokio::test]
async fn auto_reply_answers_everything_in_shuffled_order_and_passes_the_rest_on() {
    const CALLS: u64 = 2000;
    let upstream = FakeUpstream::start().await;
    upstream.auto_reply_with_delay(Duration::from_millis(3), |frame| {
        let params = frame
            .params()
            .filter(|_| frame.method() != Some("manual"))?;
        Some(frame.result_text(params.clone()))
    });
    let mut ws = connect(&upstream).await;
    let (mut tx, mut rx) = (&mut ws).split();

    let sender = async {
        for id in 0..CALLS {
            tx.send(Message::text(call(id, "auto").to_string()))
                .await
                .expect("send");
        }
        tx.send(Message::text(call(CALLS, "manual").to_string()))
            .await
            .expect("send");
    };
    let receiver = async {
        let mut seen = HashSet::new();
        let mut in_order = true;
        while (seen.len() as u64) < CALLS {
            let Some(Ok(Message::Text(text))) = rx.next().await else {
                panic!("connection ended after {} replies", seen.len());
            };
            let reply: Value = serde_json::from_str(&text).expect("json reply");
            let id = reply["id"].as_u64().expect("numeric id");
            assert_eq!(reply["result"], json!([id]));
            in_order &= id == seen.len() as u64;
            assert!(seen.insert(id), "duplicate reply {id}");
        }
        in_order
    };
    let ((), in_order) = with_timeout(async { tokio::join!(sender, receiver) }).await;
    drop((tx, rx));
    // Random delays make an in-order run of 2000 practically impossible; this guards the shuffling.
    assert!(!in_order, "replies came back in request order");

    let manual = upstream.next_frame().await;
    assert_eq!(manual.method(), Some("manual"));
    assert_eq!(upstream.frames_received() as u64, CALLS + 1);

    upstream.stop_auto_reply();
    send_json(&mut ws, call(1, "auto")).await;
    assert_eq!(upstream.next_frame().await.method(), Some("auto"));
}

#[tokio::test]
#[should_panic(expected = "FakeUpstream auto_reply handler panicked: handler bug")]
async fn a_panicking_auto_reply_handler_fails_the_test() {
    let upstream = FakeUpstream::start().await;
    upstream.auto_reply(|_| panic!("handler bug"));
    let mut ws = connect(&upstream).await;
    send_json(&mut ws, call(1, "x")).await;
    // The frame is passed on only after the panic is recorded, so either this or the drop raises it.
    let _ = upstream.next_frame().await;
    drop(upstream);
}

#[tokio::test]
async fn stop_accepting_refuses_connections_until_resumed() {
    let upstream = FakeUpstream::start().await;
    let mut ws = connect(&upstream).await;
    upstream.wait_for_connections(1).await;

    upstream.stop_accepting().await;
    let refused = with_timeout(TcpStream::connect(upstream.addr())).await;
    assert_eq!(
        refused.map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    // Existing connections are untouched.
    send_json(&mut ws, call(1, "still-there")).await;
    assert_eq!(upstream.next_frame().await.conn, 0);

    upstream.resume_accepting().expect("rebind the same port");
    let _again = connect(&upstream).await;
    upstream.wait_for_connections(2).await;
    assert_eq!(upstream.open_connections(), 2);
}

#[tokio::test]
async fn start_on_takes_over_the_address_after_shutdown() {
    let first = FakeUpstream::start().await;
    let addr = first.addr();
    let mut ws = connect(&first).await;
    first.wait_for_connections(1).await;
    first.shutdown(Close::Abrupt).await;
    assert!(recv_end(&mut ws).await.is_none_or(|end| end.is_err()));
    assert!(with_timeout(TcpStream::connect(addr)).await.is_err());

    let second = FakeUpstream::start_on(addr).await.expect("rebind");
    assert_eq!(second.addr(), addr);
    let _ws = connect(&second).await;
    second.wait_for_connections(1).await;
}

#[tokio::test]
async fn frozen_upstream_reads_nothing_until_unfrozen() {
    let upstream = FakeUpstream::start().await;
    let mut ws = connect(&upstream).await;
    upstream.wait_for_connections(1).await;

    upstream.freeze();
    send_json(&mut ws, call(1, "queued")).await;
    upstream.unfreeze();
    assert_eq!(upstream.next_frame().await.method(), Some("queued"));

    with_timeout(ws.send(Message::Ping(Bytes::from_static(b"hi"))))
        .await
        .expect("send ping");
    upstream.wait_for_pings(1).await;
    match with_timeout(ws.next()).await {
        Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

/// A small HTTP/1.1 + h2c server that echoes what it received, numbering its connections.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = with_timeout(TcpListener::bind("127.0.0.1:0"))
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("local addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let conn = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let echo = json!({
                            "conn": conn,
                            "version": format!("{:?}", parts.version),
                            "method": parts.method.as_str(),
                            "path": parts.uri.path(),
                            "content_type": parts.headers.get("content-type").and_then(|v| v.to_str().ok()),
                            "body": String::from_utf8_lossy(&body),
                        });
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                            echo.to_string(),
                        ))))
                    },
                );
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn one_shot_requests_use_fresh_connections() {
    let (addr, connections) = echo_server().await;
    let response = post(addr, "/rpc", r#"{"a":1}"#).await;
    assert_eq!(response.status, StatusCode::OK);
    let echo = response.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/rpc");
    assert_eq!(echo["content_type"], "application/json");
    assert_eq!(echo["body"], r#"{"a":1}"#);

    let response = request(addr, Method::GET, "/healthz", &[], Bytes::new()).await;
    assert_eq!(response.json()["content_type"], Value::Null);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn keep_alive_client_reuses_its_connection_until_the_server_closes_it() {
    let (addr, connections) = echo_server().await;
    let mut client = Client::connect(addr).await;
    for i in 0..5 {
        let echo = client.post("/", format!("[{i}]")).await.json();
        assert_eq!(echo["conn"], 0);
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["body"], format!("[{i}]"));
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    let response = client
        .request(
            Method::POST,
            "/",
            &[support::http::JSON, ("connection", "close")],
            "{}",
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    client.closed().await;
    assert!(client.try_request(Method::GET, "/", &[], "").await.is_err());
}

#[tokio::test]
async fn h2c_client_multiplexes_one_connection() {
    let (addr, connections) = echo_server().await;
    let client = H2Client::connect(addr).await;
    let calls = (0..20).map(|i| {
        let client = client.clone();
        async move { client.post("/rpc", format!("{i}")).await.json() }
    });
    let echoes = with_timeout(futures_util::future::join_all(calls)).await;
    for (i, echo) in echoes.iter().enumerate() {
        assert_eq!(echo["version"], "HTTP/2.0");
        assert_eq!(echo["conn"], 0);
        assert_eq!(echo["body"], i.to_string());
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn raw_tcp_sees_everything_until_the_server_closes() {
    let (addr, _) = echo_server().await;
    let mut tcp = raw_tcp(addr).await;
    tcp.write("GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write request");
    let received = String::from_utf8(tcp.read_until_closed().await).expect("utf-8 response");
    assert!(received.starts_with("HTTP/1.1 200 OK\r\n"), "{received}");
    assert!(received.contains(r#""path":"/raw""#), "{received}");
}
