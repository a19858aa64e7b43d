//! A small JSON-RPC 2.0 over WebSocket backend for demos, smoke tests and benchmarks.
//!
//! Benchmarks use it as the upstream, so anything it costs shows up as gateway
//! overhead. That is why `params` and `id` stay `&RawValue` and are spliced into the
//! reply as they came, and why replies are built by appending to one `String` rather
//! than serializing a `Value`.
//!
//! It deliberately does not share the gateway's parser in `jsonrpc.rs`: an upstream that
//! reads requests with the same code as the gateway that writes them would hide the
//! bugs the two have in common.
//!
//! Methods: `echo`, `sum`, `sleep`, `whoami`, `fail`, `notify` (see [`Backend::call`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, de::IgnoredAny};
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Outgoing messages queued per connection. When it is full the reader stops reading,
/// which pushes back on a client that sends faster than it reads its replies.
const OUTBOUND_QUEUE: usize = 256;
/// Most messages written between two flushes: enough to coalesce a burst into a few
/// TCP segments, few enough that the first reply of a burst is not held back long.
const WRITE_BATCH: usize = 64;
/// Longest `sleep` honoured; longer requests are clamped so a typo cannot park a
/// connection's reply for hours.
const MAX_SLEEP_MS: u64 = 60_000;
/// `sleep` replies waiting per connection. Beyond this the reader waits for one to
/// finish, so a client cannot grow the number of timers and tasks without bound.
const MAX_PENDING_SLEEPS: usize = 1024;
/// A TCP connection that has not finished the WebSocket handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for a peer to acknowledge our Close frame (and for queued
/// replies to drain) before dropping the socket anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the pause after an accept error that is not about one connection
/// (typically running out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

const PARSE_ERROR: i32 = -32700;
const INVALID_REQUEST: i32 = -32600;
const METHOD_NOT_FOUND: i32 = -32601;
const INVALID_PARAMS: i32 = -32602;
const REQUESTED_FAILURE: i32 = -32000;

/// Serves JSON-RPC over WebSocket on `listener` until `shutdown` is cancelled.
///
/// On shutdown it stops accepting, sends every open connection a Close frame (1001,
/// going away) and returns once they are closed, waiting at most a few seconds for
/// peers that do not answer. Accept errors are logged and retried rather than
/// returned: a backend that stops at the first `EMFILE` would turn a load spike in a
/// benchmark into a dead upstream.
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let backend = Arc::new(Backend::new(&name));
    let connections = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    info!(%local, %name, "echo backend listening");

    loop {
        // `accept` is cancel-safe: losing the race to shutdown drops no connection.
        // Biased so that a listener with a backlog cannot delay shutdown.
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                connections.spawn(connection(stream, peer, backend.clone(), shutdown.clone()));
            }
            Err(error) if is_connection_error(&error) => {
                debug!(%error, "echo backend: accept failed for one connection");
            }
            Err(error) => {
                warn!(%error, ?backoff, "echo backend: accept failed, retrying");
                // Sleeping is cancel-safe; shutdown must not wait for the backoff.
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }

    drop(listener);
    connections.close();
    connections.wait().await;
    info!(%local, "echo backend stopped");
    Ok(())
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// Runs one client connection to its end. Never fails: whatever goes wrong ends only
/// this connection, and is logged at debug level because peers hanging up is routine.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<Backend>,
    shutdown: CancellationToken,
) {
    // Replies are small and benchmarks measure their latency; Nagle would hold them back.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%peer, %error, "echo backend: cannot set TCP_NODELAY");
    }
    // Dropping the handshake future on shutdown just drops the socket, which is all a
    // half-open connection deserves.
    let ws = tokio::select! {
        biased;
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::accept_async(stream)) => {
            match handshake {
                Ok(Ok(ws)) => ws,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "echo backend: handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "echo backend: handshake timed out");
                    return;
                }
            }
        }
    };
    let (sink, mut source) = ws.split();
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    // Cancelled when the connection is ending for any reason (shutdown, the writer
    // failing): stops pending sleeps and tells the reader its replies have nowhere to go.
    let ending = shutdown.child_token();
    let writer = tokio::spawn(write_loop(sink, rx, ending.clone(), peer));
    let sleeps = Arc::new(Semaphore::new(MAX_PENDING_SLEEPS));

    // Dropping `read_loop` midway can lose a reply it was queueing, which is fine
    // because in both cases the connection is ending.
    tokio::select! {
        biased;
        () = ending.cancelled() => {}
        () = read_loop(&mut source, &backend, &tx, &sleeps, &ending, peer) => {}
    }
    if shutdown.is_cancelled() {
        go_away(&mut source, &tx).await;
    }
    ending.cancel();
    drop(tx);
    // The writer ends once every sender is gone, but a peer that stopped reading can
    // keep it stuck in a flush; do not let that hold up shutdown.
    let abort = writer.abort_handle();
    if tokio::time::timeout(CLOSE_TIMEOUT, writer).await.is_err() {
        abort.abort();
    }
}

/// Reads messages and dispatches them until the peer closes or the socket fails.
async fn read_loop(
    source: &mut Source,
    backend: &Backend,
    tx: &mpsc::Sender<Message>,
    sleeps: &Arc<Semaphore>,
    ending: &CancellationToken,
    peer: SocketAddr,
) {
    while let Some(message) = source.next().await {
        let dispatched = match message {
            Ok(Message::Text(text)) => backend.dispatch(text.as_str()),
            Ok(Message::Binary(bytes)) => backend.dispatch_bytes(&bytes),
            // tungstenite answers Pings itself and acknowledges a Close on the next
            // read, after which the stream ends; neither needs anything from us.
            Ok(_) => continue,
            Err(error) => {
                debug!(%peer, %error, "echo backend: read failed");
                return;
            }
        };
        if !deliver(dispatched, tx, sleeps, ending).await {
            return;
        }
    }
}

/// Queues what one incoming message produced. Returns false once the writer is gone.
async fn deliver(
    dispatched: Dispatched,
    tx: &mpsc::Sender<Message>,
    sleeps: &Arc<Semaphore>,
    ending: &CancellationToken,
) -> bool {
    for notification in dispatched.notifications {
        if tx.send(Message::text(notification)).await.is_err() {
            return false;
        }
    }
    let Some(reply) = dispatched.reply else {
        return true;
    };
    if dispatched.delay.is_zero() {
        return tx.send(Message::text(reply)).await.is_ok();
    }
    // The semaphore is never closed, so this only fails if that changes.
    let Ok(permit) = sleeps.clone().acquire_owned().await else {
        return false;
    };
    let tx = tx.clone();
    let ending = ending.clone();
    tokio::spawn(async move {
        let _permit = permit;
        // Cancel-safe: a reply dropped here belongs to a connection that is ending.
        tokio::select! {
            biased;
            () = ending.cancelled() => {}
            _ = async {
                tokio::time::sleep(dispatched.delay).await;
                tx.send(Message::text(reply)).await
            } => {}
        }
    });
    true
}

/// Sends our Close (1001) after whatever is already queued, then reads until the peer
/// acknowledges it so that the close handshake completes instead of the TCP connection
/// just dropping.
async fn go_away(source: &mut Source, tx: &mpsc::Sender<Message>) {
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "server shutting down".into(),
    }));
    let handshake = async {
        if tx.send(close).await.is_err() {
            return;
        }
        // Requests that arrive before the peer's Close are dropped: we are leaving.
        while let Some(Ok(_)) = source.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// Owns the socket's write half: drains whatever is queued, writes it, flushes once.
async fn write_loop(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Message>,
    ending: CancellationToken,
    peer: SocketAddr,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let written: Result<(), tokio_tungstenite::tungstenite::Error> = async {
        while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            let mut closing = false;
            for message in batch.drain(..) {
                closing = matches!(message, Message::Close(_));
                sink.feed(message).await?;
                // Nothing can be written after our Close.
                if closing {
                    break;
                }
            }
            sink.flush().await?;
            if closing {
                break;
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = written {
        debug!(%peer, %error, "echo backend: write failed");
    }
    ending.cancel();
}

/// The pure part: one incoming message in, what to send back out.
#[derive(Debug)]
struct Backend {
    /// The server name as a JSON string literal, encoded once for every `whoami`.
    name_json: Box<str>,
}

/// What one incoming WebSocket message asks the connection to send.
#[derive(Debug, Default, PartialEq)]
struct Dispatched {
    /// Server-initiated notifications from `notify`, sent before the reply.
    notifications: Vec<String>,
    /// `None` when the message held only notifications.
    reply: Option<String>,
    /// How long to hold the reply back: the longest `sleep` the message asked for.
    /// The sleeps of a batch run side by side, so the batch waits for the longest.
    delay: Duration,
}

/// The reply to one call, borrowing from the request (and from the `Backend`).
struct Reply<'a> {
    /// Raw JSON text of the request's id, or `null` when it could not be read.
    id: &'a str,
    outcome: Outcome<'a>,
}

enum Outcome<'a> {
    /// Raw JSON text of the result.
    Raw(&'a str),
    Int(i64),
    Float(f64),
    Error {
        code: i32,
        /// Written without escaping, so it must be plain ASCII without quotes.
        message: &'static str,
        /// Raw JSON text.
        data: Option<&'a str>,
    },
}

impl Outcome<'_> {
    fn error(code: i32, message: &'static str) -> Self {
        Outcome::Error {
            code,
            message,
            data: None,
        }
    }
}

/// The members of a request object that we read; others are ignored.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    jsonrpc: Cow<'a, str>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// What is left to read of a request that is not valid: its id, so the error can carry it.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// A member that is present, even as `null`, becomes `Some`: a plain
/// `Option<&RawValue>` would read `"id": null` as a notification.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The spec allows a string, a number or null as an id.
fn valid_id(id: &RawValue) -> bool {
    matches!(
        id.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9' | b'n')
    )
}

impl Backend {
    fn new(name: &str) -> Self {
        // Display on a `Value` cannot fail, unlike `to_string`'s `Result`.
        let name_json = serde_json::Value::from(name).to_string().into_boxed_str();
        Backend { name_json }
    }

    fn dispatch_bytes(&self, bytes: &[u8]) -> Dispatched {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.dispatch(text),
            Err(_) => Dispatched {
                reply: Some(single(&Reply {
                    id: "null",
                    outcome: Outcome::error(PARSE_ERROR, "parse error: not UTF-8"),
                })),
                ..Dispatched::default()
            },
        }
    }

    fn dispatch(&self, text: &str) -> Dispatched {
        let mut out = Dispatched::default();
        let is_batch = text.trim_ascii_start().starts_with('[');
        if !is_batch {
            let reply = self.call(text, &mut out);
            out.reply = reply.map(|reply| single(&reply));
            return out;
        }
        let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else {
            out.reply = Some(single(&Reply {
                id: "null",
                outcome: Outcome::error(PARSE_ERROR, "parse error"),
            }));
            return out;
        };
        if items.is_empty() {
            out.reply = Some(single(&Reply {
                id: "null",
                outcome: Outcome::error(INVALID_REQUEST, "invalid request: empty batch"),
            }));
            return out;
        }
        let mut buf = String::with_capacity(text.len() + 64);
        buf.push('[');
        for item in items {
            if let Some(reply) = self.call(item.get(), &mut out) {
                if buf.len() > 1 {
                    buf.push(',');
                }
                write_reply(&mut buf, &reply);
            }
        }
        // A batch of notifications gets no reply at all, not `[]`.
        if buf.len() > 1 {
            buf.push(']');
            out.reply = Some(buf);
        }
        out
    }

    /// Runs one request object and returns its reply, `None` for a notification.
    fn call<'a>(&'a self, text: &'a str, out: &mut Dispatched) -> Option<Reply<'a>> {
        let request = match serde_json::from_str::<Request<'_>>(text) {
            Ok(request) => request,
            Err(error) => return Some(invalid(text, &error)),
        };
        let id = match request.id {
            Some(id) if !valid_id(id) => {
                return Some(Reply {
                    id: "null",
                    outcome: Outcome::error(INVALID_REQUEST, "invalid request: bad id"),
                });
            }
            id => id.map(RawValue::get),
        };
        if request.jsonrpc != "2.0" {
            return Some(Reply {
                id: id.unwrap_or("null"),
                outcome: Outcome::error(INVALID_REQUEST, "invalid request: jsonrpc must be 2.0"),
            });
        }
        let params = request.params.map(RawValue::get);
        let outcome = match &*request.method {
            "echo" => Outcome::Raw(params.unwrap_or("null")),
            "sum" => sum(params),
            "sleep" => match sleep_ms(params) {
                Some(ms) => {
                    // Only a call holds its reply back; a notification has none to hold.
                    if id.is_some() {
                        out.delay = out.delay.max(Duration::from_millis(ms));
                    }
                    Outcome::Int(i64::try_from(ms).unwrap_or(i64::MAX))
                }
                None => Outcome::error(
                    INVALID_PARAMS,
                    "invalid params: sleep expects [milliseconds]",
                ),
            },
            "whoami" => Outcome::Raw(&self.name_json),
            "fail" => Outcome::Error {
                code: REQUESTED_FAILURE,
                message: "requested failure",
                data: params,
            },
            "notify" => {
                out.notifications.push(notification(params));
                Outcome::Raw("true")
            }
            _ => Outcome::error(METHOD_NOT_FOUND, "method not found"),
        };
        Some(Reply { id: id?, outcome })
    }
}

/// The reply to text that did not parse as a request object.
fn invalid<'a>(text: &'a str, error: &serde_json::Error) -> Reply<'a> {
    // serde stops at the first member of the wrong type, so a data error does not
    // prove that the rest of the text is JSON; only a full parse tells.
    if !error.is_data() || serde_json::from_str::<IgnoredAny>(text).is_err() {
        return Reply {
            id: "null",
            outcome: Outcome::error(PARSE_ERROR, "parse error"),
        };
    }
    // Answering with the id when it can still be read lets a multiplexing client
    // route the error back to whoever sent the request.
    let id = serde_json::from_str::<IdOnly<'_>>(text)
        .ok()
        .and_then(|r| r.id)
        .filter(|id| valid_id(id))
        .map_or("null", RawValue::get);
    Reply {
        id,
        outcome: Outcome::error(
            INVALID_REQUEST,
            "invalid request: expected an object with jsonrpc, method and optional params and id",
        ),
    }
}

fn single(reply: &Reply<'_>) -> String {
    let payload = match reply.outcome {
        Outcome::Raw(raw) => raw.len(),
        Outcome::Error { data, .. } => data.map_or(0, str::len),
        Outcome::Int(_) | Outcome::Float(_) => 0,
    };
    // Envelope, message and number fit in the 96; sized up front so a large echo is one allocation.
    let mut buf = String::with_capacity(96 + reply.id.len() + payload);
    write_reply(&mut buf, reply);
    buf
}

fn write_reply(buf: &mut String, reply: &Reply<'_>) {
    buf.push_str(r#"{"jsonrpc":"2.0","id":"#);
    buf.push_str(reply.id);
    match reply.outcome {
        Outcome::Raw(raw) => {
            buf.push_str(r#","result":"#);
            buf.push_str(raw);
        }
        Outcome::Int(n) => {
            buf.push_str(r#","result":"#);
            buf.push_str(itoa::Buffer::new().format(n));
        }
        Outcome::Float(f) => {
            buf.push_str(r#","result":"#);
            match serde_json::Number::from_f64(f) {
                // Writing to a String cannot fail.
                Some(n) => {
                    let _ = write!(buf, "{n}");
                }
                // `sum` never produces a non-finite float; keep the reply valid JSON anyway.
                None => buf.push_str("null"),
            }
        }
        Outcome::Error {
            code,
            message,
            data,
        } => {
            buf.push_str(r#","error":{"code":"#);
            buf.push_str(itoa::Buffer::new().format(code));
            buf.push_str(r#","message":""#);
            buf.push_str(message);
            buf.push('"');
            if let Some(data) = data {
                buf.push_str(r#","data":"#);
                buf.push_str(data);
            }
            buf.push('}');
        }
    }
    buf.push('}');
}

fn notification(params: Option<&str>) -> String {
    let params = params.unwrap_or("null");
    let mut buf = String::with_capacity(64 + params.len());
    buf.push_str(r#"{"jsonrpc":"2.0","method":"notification","params":"#);
    buf.push_str(params);
    buf.push('}');
    buf
}

fn sleep_ms(params: Option<&str>) -> Option<u64> {
    let (ms,): (u64,) = serde_json::from_str(params?).ok()?;
    Some(ms.min(MAX_SLEEP_MS))
}

fn sum(params: Option<&str>) -> Outcome<'static> {
    const BAD: &str = "invalid params: sum expects an array of numbers";
    let Some(Ok(total)) = params.map(serde_json::from_str::<Sum>) else {
        return Outcome::error(INVALID_PARAMS, BAD);
    };
    match total.int.map(i64::try_from) {
        Some(Ok(n)) => Outcome::Int(n),
        _ if total.float.is_finite() => Outcome::Float(total.float),
        _ => Outcome::error(INVALID_PARAMS, "invalid params: sum is not a finite number"),
    }
}

/// The sum of a JSON array of numbers, added up while parsing so no `Vec` is built.
struct Sum {
    /// Exact sum while every element is an integer; `None` after the first float.
    /// i128 so that any i64/u64 elements add up without overflowing in practice.
    int: Option<i128>,
    /// Sum of every element as f64, the answer when `int` is `None` or does not fit i64.
    float: f64,
}

impl<'de> Deserialize<'de> for Sum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(SumVisitor)
    }
}

struct SumVisitor;

impl<'de> Visitor<'de> for SumVisitor {
    type Value = Sum;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of numbers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Sum, A::Error> {
        let mut total = Sum {
            int: Some(0),
            float: 0.0,
        };
        while let Some(n) = seq.next_element::<serde_json::Number>()? {
            let Some(f) = n.as_f64() else {
                return Err(de::Error::custom("number out of range"));
            };
            total.float += f;
            let exact = n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from));
            total.int = total.int.zip(exact).and_then(|(acc, n)| acc.checked_add(n));
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend::new("unit")
    }

    /// The immediate reply text, asserting there was no delay or notification.
    fn reply(request: &str) -> String {
        let out = backend().dispatch(request);
        assert!(out.notifications.is_empty(), "{out:?}");
        assert_eq!(out.delay, Duration::ZERO, "{out:?}");
        out.reply.unwrap_or_else(|| panic!("no reply to {request}"))
    }

    fn result(id: &str, result: &str) -> String {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
    }

    fn error(id: &str, code: i32) -> impl Fn(&str) -> bool {
        let prefix = format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{code},"message":""#);
        move |reply: &str| {
            reply.starts_with(&prefix) && serde_json::from_str::<IgnoredAny>(reply).is_ok()
        }
    }

    #[test]
    fn echo_returns_params_byte_for_byte() {
        let params = r#"{"b": [1, 2.50, "\u00e9", null],  "a":{}}"#;
        let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"echo","params":{params}}}"#);
        assert_eq!(reply(&request), result("1", params));
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":2,"method":"echo"}"#),
            result("2", "null")
        );
    }

    #[test]
    fn ids_come_back_exactly() {
        for id in [
            r#""abc""#,
            "1.5",
            "12345678901234567890123",
            "null",
            r#""\u00e9""#,
            "-0",
            "1e3",
        ] {
            let request = format!(r#"{{"id": {id} ,"jsonrpc":"2.0","method":"echo","params":[]}}"#);
            assert_eq!(reply(&request), result(id, "[]"), "id {id}");
        }
    }

    #[test]
    fn sum_adds_integers_exactly_and_falls_back_to_float() {
        let sum = |params: &str| {
            reply(&format!(
                r#"{{"jsonrpc":"2.0","id":7,"method":"sum","params":{params}}}"#
            ))
        };
        assert_eq!(sum("[1, 2, 3]"), result("7", "6"));
        assert_eq!(sum("[]"), result("7", "0"));
        assert_eq!(sum("[-5]"), result("7", "-5"));
        assert_eq!(
            sum("[9223372036854775807, 1, -1]"),
            result("7", "9223372036854775807")
        );
        assert_eq!(
            sum("[18446744073709551615, -9223372036854775808]"),
            result("7", "9223372036854775807")
        );
        // Floats are compared as numbers: how they are spelled (`e18` or `e+18`) is
        // up to serde_json's formatter.
        let float = |params: &str| {
            #[derive(Deserialize)]
            struct Reply {
                result: serde_json::Number,
            }
            let reply = sum(params);
            let parsed: Reply = serde_json::from_str(&reply).expect("a result");
            assert!(parsed.result.is_f64(), "{reply}");
            parsed.result.as_f64()
        };
        assert_eq!(
            float("[9223372036854775807, 1]"),
            Some(9.223_372_036_854_776e18)
        );
        assert_eq!(float("[1.5, 1.5]"), Some(3.0));
        assert_eq!(float("[1, 0.25]"), Some(1.25));
        assert_eq!(
            float("[12345678901234567890123]"),
            Some(1.234_567_890_123_456_8e22)
        );
        for bad in [
            r#"["1"]"#,
            "[null]",
            r#"{"a":1}"#,
            "3",
            "[[1]]",
            "[1e308, 1e308]",
        ] {
            assert!(
                error("7", INVALID_PARAMS)(&sum(bad)),
                "params {bad}: {}",
                sum(bad)
            );
        }
        assert!(error("7", INVALID_PARAMS)(&reply(
            r#"{"jsonrpc":"2.0","id":7,"method":"sum"}"#
        )));
    }

    #[test]
    fn sleep_delays_the_reply_and_clamps() {
        let out =
            backend().dispatch(r#"{"jsonrpc":"2.0","id":"s","method":"sleep","params":[250]}"#);
        assert_eq!(out.delay, Duration::from_millis(250));
        assert_eq!(out.reply.as_deref(), Some(result(r#""s""#, "250").as_str()));

        let out =
            backend().dispatch(r#"{"jsonrpc":"2.0","id":1,"method":"sleep","params":[99999999]}"#);
        assert_eq!(out.delay, Duration::from_millis(MAX_SLEEP_MS));
        assert_eq!(out.reply.as_deref(), Some(result("1", "60000").as_str()));

        for bad in [
            "[-1]",
            "[1.5]",
            "[1, 2]",
            "[]",
            "5",
            r#"{"ms":5}"#,
            r#"["5"]"#,
        ] {
            let request = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"sleep","params":{bad}}}"#);
            assert!(error("1", INVALID_PARAMS)(&reply(&request)), "params {bad}");
        }
    }

    #[test]
    fn whoami_returns_the_name_as_a_json_string() {
        let backend = Backend::new("up \"1\"");
        let out = backend.dispatch(r#"{"jsonrpc":"2.0","id":1,"method":"whoami"}"#);
        assert_eq!(out.reply, Some(result("1", r#""up \"1\"""#)));
    }

    #[test]
    fn fail_returns_params_as_error_data() {
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":1,"method":"fail","params":{"x":[1]}}"#),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"requested failure","data":{"x":[1]}}}"#
        );
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","id":1,"method":"fail"}"#),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"requested failure"}}"#
        );
    }

    #[test]
    fn notify_pushes_a_notification_before_replying() {
        let out =
            backend().dispatch(r#"{"jsonrpc":"2.0","id":3,"method":"notify","params":["hi"]}"#);
        assert_eq!(
            out.notifications,
            [r#"{"jsonrpc":"2.0","method":"notification","params":["hi"]}"#]
        );
        assert_eq!(out.reply, Some(result("3", "true")));
    }

    #[test]
    fn unknown_method_is_not_found() {
        assert!(error("1", METHOD_NOT_FOUND)(&reply(
            r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#
        )));
    }

    #[test]
    fn notifications_get_no_reply_but_still_run() {
        for request in [
            r#"{"jsonrpc":"2.0","method":"echo","params":[1]}"#,
            r#"{"jsonrpc":"2.0","method":"nope"}"#,
            r#"{"jsonrpc":"2.0","method":"sum","params":"x"}"#,
            r#"{"jsonrpc":"2.0","method":"sleep","params":[1000]}"#,
        ] {
            assert_eq!(
                backend().dispatch(request),
                Dispatched::default(),
                "{request}"
            );
        }
        let out = backend().dispatch(r#"{"jsonrpc":"2.0","method":"notify","params":{}}"#);
        assert_eq!(out.notifications.len(), 1);
        assert_eq!(out.reply, None);
    }

    #[test]
    fn malformed_json_is_a_parse_error_with_null_id() {
        for request in [
            "",
            "{",
            r#"{"jsonrpc":"2.0","id":1,"method":"echo""#,
            r#"{"jsonrpc":"2.0","id":1,"method":"echo"} x"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5,]"#,
            "[1,",
            "nul",
        ] {
            assert!(
                error("null", PARSE_ERROR)(&reply(request)),
                "{request:?}: {}",
                reply(request)
            );
        }
        let out = backend().dispatch_bytes(b"\xff\xfe");
        assert!(error("null", PARSE_ERROR)(
            out.reply.as_deref().unwrap_or_default()
        ));
    }

    #[test]
    fn invalid_requests_keep_their_id_when_readable() {
        for (request, id) in [
            (r#"{"jsonrpc":"2.0","id":4,"method":5}"#, "4"),
            (r#"{"jsonrpc":"1.0","id":"x","method":"echo"}"#, r#""x""#),
            (r#"{"id":4,"method":"echo"}"#, "4"),
            (r#"{"jsonrpc":"2.0","id":{},"method":"echo"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":true,"method":"echo"}"#, "null"),
            (r#"{"jsonrpc":"2.0","methd":"echo","id":5}"#, "5"),
            ("42", "null"),
            (r#""text""#, "null"),
        ] {
            assert!(
                error(id, INVALID_REQUEST)(&reply(request)),
                "{request}: {}",
                reply(request)
            );
        }
    }

    #[test]
    fn batch_replies_in_request_order_and_skips_notifications() {
        let out = backend().dispatch(
            r#" [{"jsonrpc":"2.0","id":1,"method":"echo","params":"a"},
                {"jsonrpc":"2.0","method":"echo","params":"n"},
                {"jsonrpc":"2.0","id":"2","method":"sum","params":[1,2]},
                {"jsonrpc":"2.0","id":3,"method":"whoami"}]"#,
        );
        assert_eq!(
            out.reply.as_deref(),
            Some(
                r#"[{"jsonrpc":"2.0","id":1,"result":"a"},{"jsonrpc":"2.0","id":"2","result":3},{"jsonrpc":"2.0","id":3,"result":"unit"}]"#
            )
        );
    }

    #[test]
    fn batch_waits_for_its_longest_sleep_and_collects_notifications() {
        let out = backend().dispatch(
            r#"[{"jsonrpc":"2.0","id":1,"method":"sleep","params":[20]},
                {"jsonrpc":"2.0","id":2,"method":"sleep","params":[50]},
                {"jsonrpc":"2.0","method":"sleep","params":[900]},
                {"jsonrpc":"2.0","id":3,"method":"notify","params":1}]"#,
        );
        assert_eq!(out.delay, Duration::from_millis(50));
        assert_eq!(
            out.notifications,
            [r#"{"jsonrpc":"2.0","method":"notification","params":1}"#]
        );
        assert_eq!(
            out.reply.as_deref(),
            Some(
                r#"[{"jsonrpc":"2.0","id":1,"result":20},{"jsonrpc":"2.0","id":2,"result":50},{"jsonrpc":"2.0","id":3,"result":true}]"#
            )
        );
    }

    #[test]
    fn batch_edge_cases() {
        assert!(error("null", INVALID_REQUEST)(&reply("[]")));
        assert!(error("null", INVALID_REQUEST)(&reply(" [ ] ")));
        assert_eq!(
            backend()
                .dispatch(r#"[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"x"}]"#),
            Dispatched::default()
        );
        // Each bad element gets its own error, as in the spec's `[1,2,3]` example.
        let bad = reply(r#"[1, {"jsonrpc":"2.0","id":9,"method":"echo","params":[]}, {"id":8}]"#);
        let replies: Vec<&RawValue> = serde_json::from_str(&bad).expect("a JSON array");
        assert_eq!(replies.len(), 3, "{bad}");
        assert!(error("null", INVALID_REQUEST)(replies[0].get()), "{bad}");
        assert_eq!(replies[1].get(), result("9", "[]"));
        assert!(error("8", INVALID_REQUEST)(replies[2].get()), "{bad}");
        // A nested batch is not a request.
        let nested = reply("[[]]");
        let replies: Vec<&RawValue> = serde_json::from_str(&nested).expect("a JSON array");
        assert_eq!(replies.len(), 1, "{nested}");
        assert!(error("null", INVALID_REQUEST)(replies[0].get()), "{nested}");
    }

    mod socket {
        //! The connection plumbing, against a real socket and a real WebSocket client.

        use super::super::serve;
        use futures_util::{SinkExt as _, StreamExt as _};
        use std::future::Future;
        use std::net::SocketAddr;
        use std::sync::Arc;
        use std::time::Duration;
        use tokio::net::TcpListener;
        use tokio::task::JoinHandle;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_util::sync::CancellationToken;

        type Client = tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >;

        /// Generous: it only bounds how long a broken build takes to fail.
        async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
            tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .unwrap_or_else(|_| panic!("timed out: {what}"))
        }

        async fn start() -> (
            SocketAddr,
            CancellationToken,
            JoinHandle<std::io::Result<()>>,
        ) {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(serve(listener, Arc::from("sock"), shutdown.clone()));
            (addr, shutdown, server)
        }

        async fn connect(addr: SocketAddr) -> Client {
            let url = format!("ws://{addr}");
            within("connect", tokio_tungstenite::connect_async(url))
                .await
                .expect("handshake")
                .0
        }

        async fn next_text(client: &mut Client) -> String {
            loop {
                match within("next message", client.next()).await {
                    Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                    Some(Ok(Message::Pong(_))) => {}
                    other => panic!("expected a text message, got {other:?}"),
                }
            }
        }

        #[tokio::test]
        async fn slow_replies_do_not_hold_back_fast_ones() {
            let (addr, shutdown, server) = start().await;
            let mut client = connect(addr).await;

            // The sleep outlasts the test; its reply must not stand in the echo's way.
            let sleep = r#"{"jsonrpc":"2.0","id":1,"method":"sleep","params":[60000]}"#;
            within("send", client.send(Message::text(sleep)))
                .await
                .expect("send");
            let echo = r#"{"jsonrpc":"2.0","id":2,"method":"echo","params":[2]}"#;
            within(
                "send",
                client.send(Message::binary(echo.as_bytes().to_vec())),
            )
            .await
            .expect("send");
            assert_eq!(
                next_text(&mut client).await,
                r#"{"jsonrpc":"2.0","id":2,"result":[2]}"#
            );

            let notify = r#"{"jsonrpc":"2.0","id":3,"method":"notify","params":"n"}"#;
            within("send", client.send(Message::text(notify)))
                .await
                .expect("send");
            assert_eq!(
                next_text(&mut client).await,
                r#"{"jsonrpc":"2.0","method":"notification","params":"n"}"#
            );
            assert_eq!(
                next_text(&mut client).await,
                r#"{"jsonrpc":"2.0","id":3,"result":true}"#
            );

            within("ping", client.send(Message::Ping(b"p".to_vec().into())))
                .await
                .expect("ping");
            let whoami = r#"{"jsonrpc":"2.0","id":4,"method":"whoami"}"#;
            within("send", client.send(Message::text(whoami)))
                .await
                .expect("send");
            assert_eq!(
                next_text(&mut client).await,
                r#"{"jsonrpc":"2.0","id":4,"result":"sock"}"#
            );

            // Shutdown says goodbye with 1001 even though a sleep is still pending.
            shutdown.cancel();
            match within("close", client.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
                other => panic!("expected Close(1001), got {other:?}"),
            }
            assert!(within("close ack", client.next()).await.is_none());
            within("server to stop", server)
                .await
                .expect("server task")
                .expect("serve");
        }

        #[tokio::test]
        async fn a_client_closing_or_vanishing_does_not_stop_the_server() {
            let (addr, shutdown, server) = start().await;

            let mut polite = connect(addr).await;
            within("close", polite.close(None)).await.expect("close");
            match within("close ack", polite.next()).await {
                Some(Ok(Message::Close(_))) => {}
                other => panic!("expected the server's Close, got {other:?}"),
            }
            assert!(within("end of stream", polite.next()).await.is_none());

            let rude = connect(addr).await;
            drop(rude);
            let garbage = tokio::net::TcpStream::connect(addr)
                .await
                .expect("tcp connect");
            drop(garbage);

            let mut client = connect(addr).await;
            let sum = r#"[{"jsonrpc":"2.0","id":1,"method":"sum","params":[1,2]}]"#;
            within("send", client.send(Message::text(sum)))
                .await
                .expect("send");
            assert_eq!(
                next_text(&mut client).await,
                r#"[{"jsonrpc":"2.0","id":1,"result":3}]"#
            );

            shutdown.cancel();
            // Reading lets the client acknowledge the Close; a client that never does
            // would hold shutdown up for CLOSE_TIMEOUT.
            while let Some(Ok(_)) = within("close", client.next()).await {}
            within("server to stop", server)
                .await
                .expect("server task")
                .expect("serve");
        }
    }
}
