//! Closed-loop load: N clients, each with one connection and one call in flight,
//! sending the next call as soon as the previous reply is in and checked.
//!
//! A run has three phases: connect every client (not timed), a warmup whose calls are
//! not recorded, then the measured window. A call counts if its reply arrives inside
//! the window. Failures of any kind (connect, IO, status, wrong reply, timeout) are
//! counted as errors in every phase and the client reconnects; nothing here panics
//! on what a server does.

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// One TCP connect plus handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One call; far above any latency a healthy run shows, so it only ends hangs.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// After the window, calls still in flight get this long to finish cleanly before
/// their clients give up on them (uncounted either way).
const DRAIN: Duration = Duration::from_secs(2);
/// Pause before a client retries a failed connect, so a dead server costs a few
/// errors per client per second instead of a spin.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Connects in progress at once: a burst of 10,000 SYNs would overflow the
/// listener's backlog and turn into one-second SYN retransmits.
const CONNECT_PARALLEL: usize = 256;
/// Histograms shared by clients (a client takes its shard's lock once per call): one
/// per client would cost 10,000 × about 128 KiB.
const SHARDS: usize = 16;
/// Highest latency the histograms track, µs; slower calls are recorded as this.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Something the generator can open connections to and make calls on.
pub trait Target: Clone + Send + Sync + 'static {
    type Conn: Send + 'static;
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, String>> + Send;
    /// Sends `body` and returns the reply's body.
    fn call(
        &self,
        conn: &mut Self::Conn,
        body: &Bytes,
    ) -> impl Future<Output = Result<Bytes, String>> + Send;
}

/// POSTs over HTTP/1.1 keep-alive connections.
#[derive(Clone)]
pub struct HttpTarget {
    addr: SocketAddr,
    uri: Uri,
    host: HeaderValue,
    /// Each connection sends its own random `rpcgate-session` key.
    sessions: bool,
}

impl HttpTarget {
    /// `url` is `http://HOST:PORT/PATH`; HOST must resolve (only the first address is
    /// used).
    pub async fn new(url: &str) -> Result<HttpTarget, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        let addr = tokio::net::lookup_host(authority)
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: host has no address"))?;
        let uri = path.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = HeaderValue::from_str(authority).map_err(|e| format!("{url}: {e}"))?;
        Ok(HttpTarget {
            addr,
            uri,
            host,
            sessions: false,
        })
    }

    /// The same target, each connection a sticky session of its own.
    pub fn with_sessions(mut self) -> HttpTarget {
        self.sessions = true;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

pub struct HttpConn {
    sender: http1::SendRequest<Full<Bytes>>,
    session: Option<HeaderValue>,
}

impl HttpConn {
    /// False once the server (or an error) has closed the connection.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

impl Target for HttpTarget {
    type Conn = HttpConn;

    async fn connect(&self) -> Result<HttpConn, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // Its errors surface on the next call through `sender`.
        tokio::spawn(connection);
        let session = self.sessions.then(|| {
            HeaderValue::from_str(&format!("bench-{:032x}", fastrand::u128(..)))
                .unwrap_or(HeaderValue::from_static("bench"))
        });
        Ok(HttpConn { sender, session })
    }

    async fn call(&self, conn: &mut HttpConn, body: &Bytes) -> Result<Bytes, String> {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &conn.session {
            headers.insert("rpcgate-session", key.clone());
        }
        conn.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let reply = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reply body: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!("status {status}"));
        }
        Ok(reply)
    }
}

/// Sends each call as one text message over a WebSocket and waits for the next data
/// message.
#[derive(Clone)]
pub struct WsTarget {
    url: Arc<str>,
    /// `None`: tungstenite's defaults.
    config: Option<WebSocketConfig>,
}

impl WsTarget {
    pub fn new(url: &str) -> WsTarget {
        WsTarget {
            url: url.into(),
            config: None,
        }
    }

    /// The same target, each connection reading through a buffer of `bytes` instead of
    /// tungstenite's default 128 KiB, allocated up front: what 10,000 held sockets of
    /// the generator must not cost.
    pub fn with_read_buffer(mut self, bytes: usize) -> WsTarget {
        self.config = Some(WebSocketConfig::default().read_buffer_size(bytes));
        self
    }
}

impl Target for WsTarget {
    type Conn = WebSocketStream<MaybeTlsStream<TcpStream>>;

    async fn connect(&self) -> Result<Self::Conn, String> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(&*self.url, self.config, true)
            .await
            .map_err(|e| format!("ws connect: {e}"))?;
        Ok(ws)
    }

    async fn call(&self, ws: &mut Self::Conn, body: &Bytes) -> Result<Bytes, String> {
        let text = Utf8Bytes::try_from(body.clone()).map_err(|e| format!("body: {e}"))?;
        ws.send(Message::Text(text))
            .await
            .map_err(|e| format!("ws send: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.into()),
                Some(Ok(Message::Binary(bytes))) => return Ok(bytes),
                Some(Ok(Message::Close(_))) | None => return Err("ws closed".into()),
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("ws receive: {e}")),
            }
        }
    }
}

/// One kind of request and how to tell its reply is right.
pub struct Call {
    pub body: Bytes,
    /// The reply must contain `expect` once per JSON-RPC call the request carries.
    pub expect: Bytes,
    /// JSON-RPC calls in the request: 1, or the size of a batch.
    pub calls: usize,
}

impl Call {
    /// A single call of `method` with `params` (raw JSON), whose reply must hold
    /// `"result":RESULT`.
    pub fn single(method: &str, params: &str, result: &str) -> Call {
        Call {
            body: Bytes::from(format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#
            )),
            expect: Bytes::from(format!(r#""result":{result}"#)),
            calls: 1,
        }
    }

    /// A batch of `size` calls of `method`, ids 1..=size.
    pub fn batch(size: usize, method: &str, params: &str, result: &str) -> Call {
        let items: Vec<String> = (1..=size)
            .map(|id| {
                format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#)
            })
            .collect();
        Call {
            body: Bytes::from(format!("[{}]", items.join(","))),
            expect: Bytes::from(format!(r#""result":{result}"#)),
            calls: size,
        }
    }

    pub fn check(&self, reply: &[u8]) -> bool {
        count(reply, &self.expect) == self.calls
    }
}

/// Non-overlapping occurrences of `needle` in `haystack`.
fn count(haystack: &[u8], needle: &[u8]) -> usize {
    let Some(&first) = needle.first() else {
        return 0;
    };
    let mut found = 0;
    let mut at = 0;
    while at + needle.len() <= haystack.len() {
        match haystack[at..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            Some(offset) => {
                at += offset;
                if &haystack[at..at + needle.len()] == needle {
                    found += 1;
                    at += needle.len();
                } else {
                    at += 1;
                }
            }
            None => break,
        }
    }
    found
}

/// What each client sends: `main` calls, with a share of `other` mixed in.
pub struct Workload {
    pub main: Call,
    /// A second kind of call and the fraction of calls that are of that kind. Its
    /// latencies are kept apart, so the main calls' can be read without them.
    pub other: Option<(Call, f64)>,
}

impl Workload {
    pub fn only(call: Call) -> Arc<Workload> {
        Arc::new(Workload {
            main: call,
            other: None,
        })
    }
}

/// The measured part of a run, on the runtime's clock.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    /// Warmup from now, then the window.
    pub fn after_warmup(warmup: Duration, length: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window {
            start,
            end: start + length,
        }
    }

    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

/// Latency histograms of calls replied to inside the window, µs.
struct Shard {
    main: Histogram<u64>,
    other: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Per-client counts, summed when the run ends.
#[derive(Default)]
struct Tally {
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, message: String) {
        self.errors += 1;
        self.first_error.get_or_insert(message);
    }

    fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Connections opened before a run; `None` where the connect failed (its client will
/// keep trying during the run).
pub struct Connected<C> {
    pub conns: Vec<Option<C>>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Opens `n` connections, `CONNECT_PARALLEL` at a time.
pub async fn connect_all<T: Target>(target: &T, n: usize) -> Connected<T::Conn> {
    let attempts = futures_util::stream::iter(0..n)
        .map(|_| tokio::time::timeout(CONNECT_TIMEOUT, target.connect()))
        .buffer_unordered(CONNECT_PARALLEL);
    let results: Vec<_> = attempts.collect().await;
    let mut tally = Tally::default();
    let conns = results
        .into_iter()
        .map(|r| match r {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                tally.error(e);
                None
            }
            Err(_) => {
                tally.error("connect timed out".into());
                None
            }
        })
        .collect();
    Connected {
        conns,
        errors: tally.errors,
        first_error: tally.first_error,
    }
}

/// What a run measured.
pub struct Outcome {
    pub clients: usize,
    /// Clients whose first connect succeeded.
    pub connected: usize,
    pub window: Duration,
    /// Requests answered correctly inside the window.
    pub requests: u64,
    /// JSON-RPC calls in those requests (batches count each element).
    pub calls: u64,
    /// Failures during the whole run, connects included.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of the main calls.
    pub main: Histogram<u64>,
    /// Latency of the mixed-in calls (empty without any).
    pub other: Histogram<u64>,
}

impl Outcome {
    /// Latency of every request, whatever its kind.
    pub fn all(&self) -> Histogram<u64> {
        let mut all = self.main.clone();
        // Both have the same bounds, so adding cannot fail.
        let _ = all.add(&self.other);
        all
    }
}

/// Drives every connection in a closed loop until `window` ends, then lets calls in
/// flight finish (for at most `DRAIN`) and closes the connections.
pub async fn drive<T: Target>(
    target: &T,
    connected: Connected<T::Conn>,
    workload: Arc<Workload>,
    window: Window,
) -> Outcome {
    let shards: Arc<[Mutex<Shard>]> = (0..SHARDS)
        .map(|_| {
            Mutex::new(Shard {
                main: histogram(),
                other: histogram(),
            })
        })
        .collect();
    let clients = connected.conns.len();
    let connected_ok = connected.conns.iter().filter(|c| c.is_some()).count();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, conn) in connected.conns.into_iter().enumerate() {
        tasks.spawn(client(
            target.clone(),
            conn,
            workload.clone(),
            window,
            shards.clone(),
            i,
        ));
    }
    let mut tally = Tally {
        requests: 0,
        errors: connected.errors,
        first_error: connected.first_error,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(t) => tally.add(t),
            Err(e) => tally.error(format!("client task: {e}")),
        }
    }
    let mut main = histogram();
    let mut other = histogram();
    for shard in shards.iter() {
        let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        let _ = main.add(&shard.main);
        let _ = other.add(&shard.other);
    }
    let other_calls = workload.other.as_ref().map_or(0, |(c, _)| c.calls as u64);
    Outcome {
        clients,
        connected: connected_ok,
        window: window.end - window.start,
        requests: tally.requests,
        calls: main.len() * workload.main.calls as u64 + other.len() * other_calls,
        errors: tally.errors,
        first_error: tally.first_error,
        main,
        other,
    }
}

async fn client<T: Target>(
    target: T,
    mut conn: Option<T::Conn>,
    workload: Arc<Workload>,
    window: Window,
    shards: Arc<[Mutex<Shard>]>,
    index: usize,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = fastrand::Rng::with_seed(index as u64);
    let shard = &shards[index % shards.len()];
    let give_up = window.end + DRAIN;
    while Instant::now() < window.end {
        let c = match &mut conn {
            Some(c) => c,
            None => match tokio::time::timeout(CONNECT_TIMEOUT, target.connect()).await {
                Ok(Ok(c)) => conn.insert(c),
                failed => {
                    let message = match failed {
                        Ok(Err(e)) => e,
                        _ => "connect timed out".into(),
                    };
                    if Instant::now() < window.end {
                        tally.error(message);
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                    continue;
                }
            },
        };
        let (call, is_other) = match &workload.other {
            Some((other, share)) if rng.f64() < *share => (other, true),
            _ => (&workload.main, false),
        };
        let started = Instant::now();
        let deadline = (started + CALL_TIMEOUT).min(give_up);
        let result = tokio::time::timeout_at(deadline, target.call(c, &call.body)).await;
        let done = Instant::now();
        match result {
            Ok(Ok(reply)) if call.check(&reply) => {
                if window.contains(done) {
                    tally.requests += 1;
                    let micros = u64::try_from((done - started).as_micros()).unwrap_or(u64::MAX);
                    let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                    let h = if is_other {
                        &mut shard.other
                    } else {
                        &mut shard.main
                    };
                    h.saturating_record(micros.max(1));
                }
            }
            Ok(Ok(reply)) => {
                let shown = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
                tally.error(format!("unexpected reply: {shown}"));
            }
            Ok(Err(e)) => {
                tally.error(e);
                conn = None;
            }
            // Out of time because the run is over: not the server's fault.
            Err(_) if done >= give_up => break,
            Err(_) => {
                tally.error(format!("no reply within {CALL_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    tally
}

/// Connections each made one successful call and were kept, open and idle.
pub struct Held<C> {
    pub conns: Vec<C>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Opens up to `n` connections and makes one `call` on each, keeping those that
/// succeed. Stops starting new ones at `deadline`, so the connections opened first are
/// still inside the server's keep-alive timeout when the caller looks at them.
pub async fn open_idle<T: Target>(
    target: &T,
    n: usize,
    call: &Call,
    deadline: Instant,
) -> Held<T::Conn> {
    let attempts = futures_util::stream::iter(0..n)
        .take_while(|_| std::future::ready(Instant::now() < deadline))
        .map(|_| async {
            let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, target.connect())
                .await
                .map_err(|_| "connect timed out".to_owned())??;
            let reply = tokio::time::timeout(CALL_TIMEOUT, target.call(&mut conn, &call.body))
                .await
                .map_err(|_| format!("no reply within {CALL_TIMEOUT:?}"))??;
            if !call.check(&reply) {
                return Err("unexpected reply".to_owned());
            }
            Ok(conn)
        })
        .buffer_unordered(CONNECT_PARALLEL);
    let results: Vec<Result<T::Conn, String>> = attempts.collect().await;
    let mut tally = Tally::default();
    let mut conns = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(conn) => conns.push(conn),
            Err(e) => tally.error(e),
        }
    }
    Held {
        conns,
        errors: tally.errors,
        first_error: tally.first_error,
    }
}

/// Connections each held open by a task of its own that reads from it (so that a
/// WebSocket answers the server's pings) until it closes or this is dropped.
pub struct Kept {
    /// Connections that were opened and made ready.
    pub opened: usize,
    /// Of those, closed since (by the server, or an error).
    closed: Arc<AtomicUsize>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Dropping it aborts the tasks, and so closes the connections.
    tasks: tokio::task::JoinSet<()>,
}

impl Kept {
    /// Connections still open.
    pub fn open_now(&self) -> usize {
        self.opened
            .saturating_sub(self.closed.load(Ordering::Relaxed))
    }

    /// Closes every connection and waits until their tasks are gone.
    pub async fn close(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Opens up to `n` connections with `open(i)`, `CONNECT_PARALLEL` at a time, and hands
/// each one that opens to `keep` in a task of its own at once (not when all are open:
/// the first ones would miss the server's pings meanwhile). Stops starting new ones at
/// `deadline`.
pub async fn open_kept<C, O, K>(
    n: usize,
    deadline: Instant,
    open: impl Fn(usize) -> O,
    keep: impl Fn(C) -> K,
) -> Kept
where
    O: Future<Output = Result<C, String>>,
    K: Future<Output = ()> + Send + 'static,
{
    let closed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tally = Tally::default();
    let mut opened = 0;
    let mut attempts = std::pin::pin!(
        futures_util::stream::iter(0..n)
            .take_while(|_| std::future::ready(Instant::now() < deadline))
            .map(|i| {
                let attempt = open(i);
                async move {
                    tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, attempt)
                        .await
                        .unwrap_or_else(|_| Err("connect and first call timed out".into()))
                }
            })
            .buffer_unordered(CONNECT_PARALLEL)
    );
    while let Some(result) = attempts.next().await {
        match result {
            Ok(conn) => {
                opened += 1;
                let held = keep(conn);
                let closed = closed.clone();
                tasks.spawn(async move {
                    held.await;
                    closed.fetch_add(1, Ordering::Relaxed);
                });
            }
            Err(e) => tally.error(e),
        }
    }
    Kept {
        opened,
        closed,
        errors: tally.errors,
        first_error: tally.first_error,
        tasks,
    }
}

/// A WebSocket of `target` that made one `call`.
pub async fn ws_after_call(
    target: &WsTarget,
    call: &Call,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, String> {
    let mut ws = target.connect().await?;
    let reply = target.call(&mut ws, &call.body).await?;
    if !call.check(&reply) {
        return Err(format!(
            "unexpected reply: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        ));
    }
    Ok(ws)
}

/// Reads (answering pings) until the socket closes.
pub async fn ws_keep(mut ws: WebSocketStream<MaybeTlsStream<TcpStream>>) {
    while let Some(Ok(_)) = ws.next().await {}
}

/// An event stream of session `key`: `GET path?session=KEY`, answered 200 with a
/// chunked body; the connection, after the response head.
pub async fn open_event_stream(
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {path}?session={key} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err("response head over 16 KiB".into());
        }
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed in the response head".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        return Err(format!(
            "{path} answered {:?}",
            String::from_utf8_lossy(line)
        ));
    }
    Ok(conn)
}

/// Reads and drops what the server sends (the stream's events and keep-alive
/// comments) until it closes.
pub async fn stream_keep(mut conn: TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 256];
    while let Ok(n) = conn.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
