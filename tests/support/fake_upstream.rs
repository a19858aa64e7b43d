//! A scriptable upstream: a real WebSocket server on 127.0.0.1 that hands every frame it receives
//! to the test over a channel, so the test decides exactly when, how and in which order to answer.
//!
//! One task per accepted connection owns the socket; replies reach it through a cheap clonable
//! sender carried by each [`Incoming`], so a test can answer from any task, at any time, in any
//! order. Dropping the [`FakeUpstream`] stops the listener and every connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, Location};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{SEC_WEBSOCKET_PROTOCOL, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::{TEST_TIMEOUT, labeled_timeout};

/// How a connection is ended by [`FakeUpstream::close_all`], [`FakeUpstream::close`] or
/// [`Incoming::close`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// A Close frame with code 1000 (an orderly restart); the socket ends once the peer answers.
    Clean,
    /// A Close frame with this code, e.g. 1001 "going away" or 1011 "internal error".
    Code(u16),
    /// The TCP socket is dropped without a Close frame (FIN): the upstream process crashed.
    Abrupt,
    /// The TCP socket is reset (RST, via a zero linger): the host or a middlebox killed it.
    Reset,
}

/// What a client sent during the WebSocket handshake of one connection.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// Request target, e.g. `/` or `/v1/some-key?x=1`.
    pub uri: Uri,
    /// Every request header, e.g. `Authorization` or `Sec-WebSocket-Protocol`.
    pub headers: HeaderMap,
    /// The subprotocol we accepted: the first one the client offered, if any.
    pub protocol: Option<String>,
}

/// One frame received by the fake upstream, with the means to answer on its connection.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Index of the connection it arrived on, `0..` in handshake-completion order.
    pub conn: usize,
    /// The frame's payload (lossily decoded if it was a binary frame).
    pub text: String,
    /// The payload parsed as JSON, or `Value::Null` if it is not JSON.
    pub json: Value,
    /// Whether it arrived as a binary frame rather than a text frame.
    pub binary: bool,
    conn_tx: ConnTx,
}

impl Incoming {
    /// The request's `id`, exactly as sent (`None` for a notification or a batch).
    pub fn id(&self) -> Option<&Value> {
        self.json.get("id")
    }

    /// The request's `method`.
    pub fn method(&self) -> Option<&str> {
        self.json.get("method").and_then(Value::as_str)
    }

    /// The request's `params`.
    pub fn params(&self) -> Option<&Value> {
        self.json.get("params")
    }

    /// The elements of a batch frame (a JSON array), `None` for a single message.
    pub fn batch(&self) -> Option<&[Value]> {
        self.json.as_array().map(Vec::as_slice)
    }

    /// The response text `{"jsonrpc":"2.0","id":<this id>,"result":result}`, for [`auto_reply`]
    /// handlers and for replies a test wants to send later or twice.
    ///
    /// [`auto_reply`]: FakeUpstream::auto_reply
    pub fn result_text(&self, result: Value) -> String {
        result_for(&self.json, result).to_string()
    }

    /// The error response text with this request's id.
    pub fn error_text(&self, code: i64, message: &str) -> String {
        error_for(&self.json, code, message).to_string()
    }

    /// Answers with `{"jsonrpc":"2.0","id":<this id>,"result":result}` on this frame's connection.
    /// Returns false (and sends nothing) if that connection has already ended.
    pub fn reply_result(&self, result: Value) -> bool {
        self.reply_text(self.result_text(result))
    }

    /// Answers with a JSON-RPC error object carrying this request's id.
    pub fn reply_error(&self, code: i64, message: &str) -> bool {
        self.reply_text(self.error_text(code, message))
    }

    /// Answers a batch with a JSON array of the given responses (see [`result_for`]).
    pub fn reply_batch(&self, responses: Vec<Value>) -> bool {
        self.reply_text(Value::Array(responses).to_string())
    }

    /// Sends any text frame on this frame's connection: garbage, a wrong id, a notification...
    pub fn reply_text(&self, text: impl Into<String>) -> bool {
        self.conn_tx.send(Message::text(text.into()))
    }

    /// Sends a binary frame on this frame's connection.
    pub fn reply_binary(&self, bytes: impl Into<Bytes>) -> bool {
        self.conn_tx.send(Message::Binary(bytes.into()))
    }

    /// Ends the connection this frame arrived on.
    pub fn close(&self, how: Close) -> bool {
        self.conn_tx.close(how)
    }
}

/// One frame as the fake upstream's log keeps it: every text or binary frame, including those
/// answered by `auto_reply` and the gateway's own calls (`on_connect`, replays, health checks).
#[derive(Clone, Debug)]
pub struct Received {
    /// Index of the connection it arrived on.
    pub conn: usize,
    /// The payload parsed as JSON, or `Value::Null` if it is not JSON.
    pub json: Value,
}

impl Received {
    /// The request's `method` (`None` for a batch or a non-request).
    pub fn method(&self) -> Option<&str> {
        self.json.get("method").and_then(Value::as_str)
    }

    /// The request's `params`.
    pub fn params(&self) -> Option<&Value> {
        self.json.get("params")
    }
}

/// `{"jsonrpc":"2.0","id":<request's id>,"result":result}`; the id is `null` if `request` has none.
/// Useful for building batch answers element by element.
pub fn result_for(request: &Value, result: Value) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// `{"jsonrpc":"2.0","id":<request's id>,"error":{"code":code,"message":message}}`.
pub fn error_for(request: &Value, code: i64, message: &str) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// A real WebSocket JSON-RPC server for tests. See the module docs.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Behind an async mutex so `next_frame` can take `&self` and the upstream can sit in an `Arc`.
    frames: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
    /// The accept loop; it owns the listener, so ending it makes new connections fail.
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

/// State shared by the accept loop, the connection tasks and the test-facing handle.
struct Shared {
    /// Per-connection records, indexed by connection number.
    conns: Mutex<Vec<ConnRecord>>,
    /// Frames for `next_frame`. Unbounded so an unread frame never stalls a connection task: a test
    /// that ignores a notification must not deadlock the upstream.
    frames_tx: mpsc::UnboundedSender<Incoming>,
    /// Completed handshakes so far; watched so tests wait for a count instead of polling.
    handshakes: watch::Sender<usize>,
    /// Connections currently open.
    open: watch::Sender<usize>,
    /// Ping frames received from clients, for keepalive tests.
    pings: watch::Sender<usize>,
    /// Text and binary frames received, whether answered automatically or handed to the test.
    frames_seen: AtomicUsize,
    /// Handshakes refused because of `reject_handshakes`.
    rejected: AtomicUsize,
    /// Every frame received, in arrival order; its length is watched so tests can wait for one.
    log: Mutex<Vec<Received>>,
    logged: watch::Sender<usize>,
    /// A `Set-Cookie` value every later handshake response carries (a load balancer's affinity
    /// cookie).
    handshake_cookie: Mutex<Option<String>>,
    /// When set, handshakes are refused with this status (e.g. 401, 503).
    reject_with: Mutex<Option<StatusCode>>,
    /// When true, connection tasks stop reading: no frames are delivered and pings go unanswered.
    frozen: watch::Sender<bool>,
    /// Set by `unfreeze_for`: frames still to deliver before reading stops again.
    freeze_after: Mutex<Option<usize>>,
    /// The `auto_reply` handler, if any.
    auto: RwLock<Option<Arc<AutoReply>>>,
    /// First panic message from an `auto_reply` handler; re-raised on the test's side.
    handler_panic: Mutex<Option<String>>,
    /// Ends every connection task when the `FakeUpstream` is dropped.
    cancel: CancellationToken,
}

struct ConnRecord {
    handshake: Handshake,
    /// `None` once the connection has ended.
    tx: Option<ConnTx>,
    /// The socket, for `unread_bytes`.
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
}

type Handler = dyn Fn(&Incoming) -> Option<String> + Send + Sync;

struct AutoReply {
    handler: Box<Handler>,
    /// Each reply is sent after a random delay in `0..=max_delay`, so replies overtake each other.
    max_delay: Duration,
}

#[derive(Debug)]
enum Command {
    Send(Message),
    Close(Close),
}

/// Sender half of one connection's command queue; cheap to clone, usable from any task.
#[derive(Clone, Debug)]
struct ConnTx(mpsc::UnboundedSender<Command>);

impl ConnTx {
    fn send(&self, msg: Message) -> bool {
        self.0.send(Command::Send(msg)).is_ok()
    }

    fn close(&self, how: Close) -> bool {
        self.0.send(Command::Close(how)).is_ok()
    }
}

impl FakeUpstream {
    /// Starts a fake upstream on `127.0.0.1` with an OS-chosen port.
    pub async fn start() -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        match Self::start_on(addr).await {
            Ok(upstream) => upstream,
            Err(e) => panic!("FakeUpstream could not bind {addr}: {e}"),
        }
    }

    /// Starts a fake upstream on a given address, e.g. the address of a previous one that was
    /// dropped, to simulate a restart. Best effort: the OS may still hold the port (`EADDRINUSE`).
    pub async fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conns: Mutex::new(Vec::new()),
            frames_tx,
            handshakes: watch::Sender::new(0),
            open: watch::Sender::new(0),
            pings: watch::Sender::new(0),
            frames_seen: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            logged: watch::Sender::new(0),
            handshake_cookie: Mutex::new(None),
            reject_with: Mutex::new(None),
            frozen: watch::Sender::new(false),
            freeze_after: Mutex::new(None),
            auto: RwLock::new(None),
            handler_panic: Mutex::new(None),
            cancel: CancellationToken::new(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            frames: tokio::sync::Mutex::new(frames_rx),
            accept_task: Mutex::new(Some(accept_task)),
        })
    }

    /// `ws://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next frame not answered by an `auto_reply` handler, in arrival order across all
    /// connections. Panics after [`TEST_TIMEOUT`].
    #[track_caller]
    pub fn next_frame(&self) -> impl Future<Output = Incoming> + '_ {
        let caller = Location::caller();
        async move {
            self.raise_handler_panic();
            let next = labeled_timeout(TEST_TIMEOUT, "the next upstream frame", caller, async {
                self.frames.lock().await.recv().await
            });
            match next.await {
                Some(frame) => frame,
                // `shared` holds a sender for as long as `self` lives.
                None => unreachable!("FakeUpstream frame channel closed while the upstream exists"),
            }
        }
    }

    /// The next frame if one has already arrived. Lets a test check "nothing else was forwarded"
    /// at a point where ordering guarantees it would have arrived, without waiting for it.
    pub fn try_next_frame(&self) -> Option<Incoming> {
        self.raise_handler_panic();
        self.frames.try_lock().ok()?.try_recv().ok()
    }

    /// Sends an unsolicited text frame (e.g. a subscription notification) on every open
    /// connection; returns how many connections it was queued on.
    pub fn send_to_all(&self, text: impl Into<String>) -> usize {
        let text: Utf8Bytes = text.into().into();
        self.open_senders()
            .iter()
            .filter(|tx| tx.send(Message::Text(text.clone())))
            .count()
    }

    /// Sends a text frame on one connection; false if that connection has ended.
    pub fn send_to(&self, conn: usize, text: impl Into<String>) -> bool {
        self.sender(conn)
            .is_some_and(|tx| tx.send(Message::text(text.into())))
    }

    /// Ends every open connection; returns how many were told to close. Use
    /// [`wait_for_open_connections`](Self::wait_for_open_connections) to know they are gone.
    pub fn close_all(&self, how: Close) -> usize {
        self.open_senders()
            .iter()
            .filter(|tx| tx.close(how))
            .count()
    }

    /// Ends one connection; false if it had already ended.
    pub fn close(&self, conn: usize, how: Close) -> bool {
        self.sender(conn).is_some_and(|tx| tx.close(how))
    }

    /// Stops listening: from the moment this returns, new connections are refused (the port is
    /// released). Open connections are untouched; close them with `close_all` to simulate a crash.
    pub async fn stop_accepting(&self) {
        let task = self.accept_task.lock().take();
        if let Some(task) = task {
            task.abort();
            // Aborting only schedules the cancellation; awaiting guarantees the listener is dropped.
            let _ = task.await;
        }
    }

    /// Stops listening and ends every connection the way `how` says, returning once all are gone,
    /// so `FakeUpstream::start_on(addr)` can take over the address straight away (a restart).
    #[track_caller]
    pub fn shutdown(self, how: Close) -> impl Future<Output = ()> {
        let caller = Location::caller();
        async move {
            self.stop_accepting().await;
            self.close_all(how);
            let mut open = self.shared.open.subscribe();
            let closed =
                labeled_timeout(TEST_TIMEOUT, "upstream connections to end", caller, async {
                    let _ = open.wait_for(|&count| count == 0).await;
                });
            closed.await;
        }
    }

    /// Listens again on the same address after `stop_accepting`; connection numbering continues.
    /// Best effort, like [`start_on`](Self::start_on).
    pub fn resume_accepting(&self) -> io::Result<()> {
        let mut task = self.accept_task.lock();
        if task.is_none() {
            let listener = bind(self.addr)?;
            *task = Some(tokio::spawn(accept_loop(listener, self.shared.clone())));
        }
        Ok(())
    }

    /// Refuses every later handshake with `status` (e.g. 401 or 503), or accepts again with `None`.
    pub fn reject_handshakes(&self, status: Option<StatusCode>) {
        *self.shared.reject_with.lock() = status;
    }

    /// Makes every later handshake response carry `Set-Cookie: <cookie>` (e.g.
    /// `"lb=node-1; Path=/"`), the way a load balancer pins a client; `None` stops it.
    pub fn set_handshake_cookie(&self, cookie: Option<String>) {
        *self.shared.handshake_cookie.lock() = cookie;
    }

    /// Every frame received so far, in arrival order, including those answered by `auto_reply`.
    pub fn received(&self) -> Vec<Received> {
        self.shared.log.lock().clone()
    }

    /// The methods of the frames received on connection `conn`, in order.
    pub fn methods_on(&self, conn: usize) -> Vec<String> {
        let log = self.shared.log.lock();
        log.iter()
            .filter(|r| r.conn == conn)
            .filter_map(|r| r.method().map(str::to_owned))
            .collect()
    }

    /// How many frames calling `method` arrived so far, on any connection.
    pub fn count_method(&self, method: &str) -> usize {
        let log = self.shared.log.lock();
        log.iter().filter(|r| r.method() == Some(method)).count()
    }

    /// Waits until at least `n` frames calling `method` have arrived in total.
    #[track_caller]
    pub fn wait_for_method<'a>(
        &'a self,
        method: &'a str,
        n: usize,
    ) -> impl Future<Output = ()> + 'a {
        let caller = Location::caller();
        let mut rx = self.shared.logged.subscribe();
        async move {
            let reached = labeled_timeout(TEST_TIMEOUT, "an upstream call", caller, async {
                let _ = rx.wait_for(|_| self.count_method(method) >= n).await;
            });
            reached.await;
            self.raise_handler_panic();
        }
    }

    /// Whether connection `conn` has ended (false while open or if it never existed).
    pub fn connection_ended(&self, conn: usize) -> bool {
        let conns = self.shared.conns.lock();
        conns.get(conn).is_some_and(|record| record.tx.is_none())
    }

    /// Waits until connection `conn` (which must exist) has ended, however it ended.
    #[track_caller]
    pub fn wait_for_connection_end(&self, conn: usize) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        let mut rx = self.shared.open.subscribe();
        async move {
            let ended = labeled_timeout(
                TEST_TIMEOUT,
                "an upstream connection to end",
                caller,
                async {
                    // Every end marks its record before lowering the open count, so none is missed.
                    let _ = rx.wait_for(|_| self.connection_ended(conn)).await;
                },
            );
            ended.await;
            self.raise_handler_panic();
        }
    }

    /// How many handshakes were refused because of `reject_handshakes`.
    pub fn rejected_handshakes(&self) -> usize {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections in total (open or since closed) have completed the handshake.
    #[track_caller]
    pub fn wait_for_connections(&self, n: usize) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        let mut rx = self.shared.handshakes.subscribe();
        async move {
            let reached = labeled_timeout(TEST_TIMEOUT, "upstream connections", caller, async {
                // The sender lives in `shared`, which `self` keeps alive: this cannot fail.
                let _ = rx.wait_for(|&count| count >= n).await;
            });
            reached.await;
            self.raise_handler_panic();
        }
    }

    /// Waits until exactly `n` connections are open, e.g. 0 after the gateway shut down.
    #[track_caller]
    pub fn wait_for_open_connections(&self, n: usize) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        let mut rx = self.shared.open.subscribe();
        async move {
            let reached =
                labeled_timeout(TEST_TIMEOUT, "open upstream connections", caller, async {
                    let _ = rx.wait_for(|&count| count == n).await;
                });
            reached.await;
            self.raise_handler_panic();
        }
    }

    /// Waits until at least `n` ping frames have been received in total.
    #[track_caller]
    pub fn wait_for_pings(&self, n: usize) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        let mut rx = self.shared.pings.subscribe();
        async move {
            let reached = labeled_timeout(TEST_TIMEOUT, "upstream pings", caller, async {
                let _ = rx.wait_for(|&count| count >= n).await;
            });
            reached.await;
        }
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Connections that completed the handshake so far, open or not.
    pub fn total_connections(&self) -> usize {
        *self.shared.handshakes.borrow()
    }

    /// Pings received so far.
    pub fn pings_received(&self) -> usize {
        *self.shared.pings.borrow()
    }

    /// Text and binary frames received so far, including those answered by `auto_reply`.
    pub fn frames_received(&self) -> usize {
        self.shared.frames_seen.load(Ordering::SeqCst)
    }

    /// The handshake of connection `conn`. Panics if there is no such connection yet.
    #[track_caller]
    pub fn handshake(&self, conn: usize) -> Handshake {
        match self.shared.conns.lock().get(conn) {
            Some(record) => record.handshake.clone(),
            None => panic!("FakeUpstream has no connection {conn}; wait_for_connections first"),
        }
    }

    /// The handshake request headers of connection `conn`.
    #[track_caller]
    pub fn handshake_headers(&self, conn: usize) -> HeaderMap {
        self.handshake(conn).headers
    }

    /// Answers every later frame with `handler`'s text, immediately, on the frame's connection.
    /// Frames for which it returns `None` go to `next_frame` as usual. Replaces any previous
    /// handler. A panic inside `handler` fails the test at the next `FakeUpstream` call or drop.
    pub fn auto_reply<F>(&self, handler: F)
    where
        F: Fn(&Incoming) -> Option<String> + Send + Sync + 'static,
    {
        self.auto_reply_with_delay(Duration::ZERO, handler);
    }

    /// Like [`auto_reply`](Self::auto_reply), but each reply leaves after its own random delay in
    /// `0..=max_delay`, so replies come back in shuffled order. Correctness never depends on the
    /// delays; they only create reordering.
    pub fn auto_reply_with_delay<F>(&self, max_delay: Duration, handler: F)
    where
        F: Fn(&Incoming) -> Option<String> + Send + Sync + 'static,
    {
        let auto = AutoReply {
            handler: Box::new(handler),
            max_delay,
        };
        *self.shared.auto.write() = Some(Arc::new(auto));
    }

    /// Hands every later frame to `next_frame` again.
    pub fn stop_auto_reply(&self) {
        *self.shared.auto.write() = None;
    }

    /// Stops reading on every connection: frames sit unread and pings go unanswered, like a hung
    /// upstream. Scripted replies and closes are still sent.
    pub fn freeze(&self) {
        *self.shared.freeze_after.lock() = None;
        self.shared.frozen.send_replace(true);
    }

    /// Resumes reading after [`freeze`](Self::freeze); frames sent meanwhile are delivered then.
    pub fn unfreeze(&self) {
        *self.shared.freeze_after.lock() = None;
        self.shared.frozen.send_replace(false);
    }

    /// Resumes reading until `frames` more frames (over all connections) have been delivered,
    /// then stops reading again as after [`freeze`](Self::freeze): lets exactly one big frame
    /// through, say, while what follows it piles up in the socket.
    pub fn unfreeze_for(&self, frames: usize) {
        if frames == 0 {
            return;
        }
        *self.shared.freeze_after.lock() = Some(frames);
        self.shared.frozen.send_replace(false);
    }

    /// Bytes that have reached connection `conn`'s socket but that the fake has not read yet
    /// (e.g. while frozen); 0 once the connection has ended. Shows that a peer is writing to a
    /// frozen upstream without unfreezing it.
    #[cfg(unix)]
    pub fn unread_bytes(&self, conn: usize) -> usize {
        let conns = self.shared.conns.lock();
        let Some(record) = conns.get(conn).filter(|record| record.tx.is_some()) else {
            return 0;
        };
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD only writes one int through the valid pointer it is given. Should the
        // socket have closed a moment ago, the call fails (or reads another socket's count),
        // which is harmless here.
        let rc = unsafe { libc::ioctl(record.fd, libc::FIONREAD, &mut unread) };
        if rc == 0 {
            usize::try_from(unread).unwrap_or(0)
        } else {
            0
        }
    }

    fn sender(&self, conn: usize) -> Option<ConnTx> {
        self.shared.conns.lock().get(conn)?.tx.clone()
    }

    fn open_senders(&self) -> Vec<ConnTx> {
        let conns = self.shared.conns.lock();
        conns
            .iter()
            .filter_map(|record| record.tx.clone())
            .collect()
    }

    #[track_caller]
    fn raise_handler_panic(&self) {
        if let Some(message) = self.shared.handler_panic.lock().take() {
            panic!("FakeUpstream auto_reply handler panicked: {message}");
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        if let Some(task) = self.accept_task.get_mut().take() {
            task.abort();
        }
        // Never panic while already unwinding: that would abort the whole test binary.
        if !std::thread::panicking() {
            self.raise_handler_panic();
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets `start_on`/`resume_accepting` rebind while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let cancel = shared.cancel.clone();
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = serve_connection(stream, &shared) => {}
                    }
                });
            }
            // Per-connection failures (e.g. a reset before accept completed) are not fatal; yield
            // so a persistent one (e.g. out of file descriptors) cannot starve the runtime.
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    #[cfg(unix)]
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let reject_with = *shared.reject_with.lock();
    let set_cookie = shared.handshake_cookie.lock().clone();
    let mut handshake = None;
    // tungstenite's `Callback` fixes the error type; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| {
        let protocol = first_offered_protocol(request.headers());
        handshake = Some(Handshake {
            uri: request.uri().clone(),
            headers: request.headers().clone(),
            protocol: protocol.clone(),
        });
        if let Some(status) = reject_with {
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            let mut refusal = ErrorResponse::new(Some("refused by FakeUpstream".to_owned()));
            *refusal.status_mut() = status;
            return Err(refusal);
        }
        if let Some(value) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
            response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, value);
        }
        if let Some(value) = set_cookie
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            response.headers_mut().append(SET_COOKIE, value);
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some(handshake) = handshake else {
        return;
    };

    let (tx, commands) = mpsc::unbounded_channel();
    let conn_tx = ConnTx(tx);
    let conn = {
        let mut conns = shared.conns.lock();
        conns.push(ConnRecord {
            handshake,
            tx: Some(conn_tx.clone()),
            #[cfg(unix)]
            fd,
        });
        conns.len() - 1
    };
    // Drop-guarded so the bookkeeping also happens when the task is cancelled mid-connection.
    let _registered = Registered { shared, conn };
    shared.open.send_modify(|n| *n += 1);
    shared.handshakes.send_modify(|n| *n += 1);

    run_connection(ws, conn, conn_tx, commands, shared).await;
}

/// Marks a connection as ended when its task finishes, however it finishes.
struct Registered<'a> {
    shared: &'a Shared,
    conn: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.shared.conns.lock().get_mut(self.conn) {
            record.tx = None;
        }
        self.shared.open.send_modify(|n| *n -= 1);
    }
}

async fn run_connection(
    mut ws: WebSocketStream<TcpStream>,
    conn: usize,
    conn_tx: ConnTx,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: &Shared,
) {
    let mut frozen = shared.frozen.subscribe();
    loop {
        let is_frozen = *frozen.borrow_and_update();
        tokio::select! {
            // Commands first: a scripted close must not wait behind a flood of incoming frames.
            biased;
            // Cancel-safe: `recv` loses nothing when another branch wins.
            Some(command) = commands.recv() => match command {
                Command::Send(msg) => {
                    if ws.send(msg).await.is_err() {
                        return;
                    }
                }
                Command::Close(Close::Abrupt) => return,
                Command::Close(Close::Reset) => {
                    let _ = ws.get_ref().set_zero_linger();
                    return;
                }
                Command::Close(Close::Clean) => start_close(&mut ws, 1000).await,
                Command::Close(Close::Code(code)) => start_close(&mut ws, code).await,
            },
            // Only wakes the loop so the read branch is re-enabled or disabled.
            Ok(()) = frozen.changed() => {}
            // Cancel-safe: tungstenite keeps partially read frames in its own buffer.
            msg = ws.next(), if !is_frozen => match msg {
                Some(Ok(Message::Text(text))) => deliver(shared, conn, &conn_tx, text.to_string(), false),
                Some(Ok(Message::Binary(bytes))) => {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    deliver(shared, conn, &conn_tx, text, true);
                }
                // tungstenite queues the pong itself; we only count.
                Some(Ok(Message::Ping(_))) => shared.pings.send_modify(|n| *n += 1),
                // A Close from the peer is answered by tungstenite; the stream then ends.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// Sends a Close frame; the loop keeps reading until the peer's answer ends the stream.
async fn start_close(ws: &mut WebSocketStream<TcpStream>, code: u16) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    };
    let _ = ws.close(Some(frame)).await;
}

fn deliver(shared: &Shared, conn: usize, conn_tx: &ConnTx, text: String, binary: bool) {
    shared.frames_seen.fetch_add(1, Ordering::SeqCst);
    let incoming = Incoming {
        conn,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        binary,
        conn_tx: conn_tx.clone(),
    };
    let logged = {
        let mut log = shared.log.lock();
        log.push(Received {
            conn,
            json: incoming.json.clone(),
        });
        log.len()
    };
    shared.logged.send_replace(logged);
    {
        let mut countdown = shared.freeze_after.lock();
        if let Some(left) = countdown.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                *countdown = None;
                shared.frozen.send_replace(true);
            }
        }
    }
    let auto = shared.auto.read().clone();
    if let Some(auto) = auto {
        match std::panic::catch_unwind(AssertUnwindSafe(|| (auto.handler)(&incoming))) {
            Ok(Some(reply)) => {
                send_auto_reply(conn_tx, reply, auto.max_delay);
                return;
            }
            Ok(None) => {}
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                shared.handler_panic.lock().get_or_insert(message);
            }
        }
    }
    // The receiver lives in the `FakeUpstream`; if it is gone, nobody is left to care.
    let _ = shared.frames_tx.send(incoming);
}

fn send_auto_reply(conn_tx: &ConnTx, reply: String, max_delay: Duration) {
    if max_delay.is_zero() {
        conn_tx.send(Message::text(reply));
        return;
    }
    let max_nanos = u64::try_from(max_delay.as_nanos()).unwrap_or(u64::MAX);
    let delay = Duration::from_nanos(fastrand::u64(0..=max_nanos));
    let conn_tx = conn_tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        conn_tx.send(Message::text(reply));
    });
}

fn first_offered_protocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find(|p| !p.is_empty())
        .map(str::to_owned)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
