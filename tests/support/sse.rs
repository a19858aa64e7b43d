//! An event-stream (`GET /events`) reader for tests: a hyper HTTP/1 client that parses
//! events as their bytes arrive, so a test sees each one when the gateway sends it.

use super::with_timeout;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

/// One event of an event stream.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }

    pub fn is_gap(&self) -> bool {
        self.event.as_deref() == Some("rpcgate.gap")
    }
}

/// An open `GET /events` event stream, read incrementally.
pub struct Sse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    _driver: AbortOnDropHandle<Result<(), hyper::Error>>,
}

/// Opens an event stream at `path` (with `Accept: text/event-stream` and `headers`).
pub async fn open_sse(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
    with_timeout(async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let driver = AbortOnDropHandle::new(tokio::spawn(conn));
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", addr.to_string())
            .header("accept", "text/event-stream");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("event stream response");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Sse {
            status,
            content_type,
            body: resp.into_body(),
            buf: Vec::new(),
            _driver: driver,
        }
    })
    .await
}

/// Opens session `session`'s event stream and checks its head and first block: a
/// comment line and the `rpcgate.open` event naming the session.
pub async fn stream_of(addr: SocketAddr, session: &str) -> Sse {
    let mut sse = open_sse(addr, &format!("/events?session={session}"), &[]).await;
    assert_eq!(sse.status, StatusCode::OK);
    assert_eq!(sse.content_type.as_deref(), Some("text/event-stream"));
    let expected = format!(
        ": rpcgate events\nevent: rpcgate.open\ndata: {}",
        serde_json::json!({ "session": session })
    );
    assert_eq!(
        sse.next_block().await,
        Some(expected),
        "the first block of an event stream"
    );
    sse
}

impl Sse {
    /// The next block (lines up to a blank line), or `None` when the stream ended.
    pub async fn next_block(&mut self) -> Option<String> {
        with_timeout(async {
            loop {
                if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let block = String::from_utf8(self.buf[..at].to_vec()).expect("UTF-8");
                    self.buf.drain(..at + 2);
                    return Some(block);
                }
                match self.body.frame().await {
                    None | Some(Err(_)) => return None,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
            }
        })
        .await
    }

    /// The next event (comment lines skipped), or `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let block = self.next_block().await?;
            let mut event = SseEvent {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                any = true;
                let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                match field {
                    "id" => event.id = Some(value.parse().expect("numeric event id")),
                    "event" => event.event = Some(value.to_string()),
                    "data" => {
                        assert!(
                            event.data.is_empty(),
                            "data on more than one line: {block:?}"
                        );
                        event.data = value.to_string();
                    }
                    other => panic!("unexpected field {other:?} in {block:?}"),
                }
            }
            // The stream's opening event is checked by `stream_of`, not counted here.
            if any && event.event.as_deref() != Some("rpcgate.open") {
                return Some(event);
            }
        }
    }

    /// The next event, which must come.
    pub async fn event(&mut self) -> SseEvent {
        self.next_event().await.expect("the event stream ended")
    }

    /// Waits (bounded) until the gateway ends the stream, skipping what comes before.
    pub async fn ended(&mut self) {
        while self.next_event().await.is_some() {}
    }
}
