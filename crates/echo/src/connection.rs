//! One client connection: the WebSocket handshake, a reader that dispatches each
//! message, a writer task that owns the socket's write half, the tasks that push
//! (tickers, `ask`s waiting for answers), and the Close on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::ask::ANSWER_TIMEOUT;
use crate::backend::{Backend, Dispatched, Session};

/// Outgoing messages queued per connection. When it is full the reader stops reading,
/// which pushes back on a client that sends faster than it reads its replies.
const OUTBOUND_QUEUE: usize = 256;
/// Most messages written between two flushes: enough to coalesce a burst into a few
/// TCP segments, few enough that the first reply of a burst is not held back long.
const WRITE_BATCH: usize = 64;
/// `sleep` replies waiting per connection. Beyond this the reader waits for one to
/// finish, so a client cannot grow the number of timers and tasks without bound.
const MAX_PENDING_SLEEPS: usize = 1024;
/// A TCP connection that has not finished the WebSocket handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for a peer to acknowledge our Close frame (and for queued
/// replies to drain) before dropping the socket anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// Runs one client connection to its end. Never fails: whatever goes wrong ends only
/// this connection, and is logged at debug level because peers hanging up is routine.
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<Backend>,
    tasks: TaskTracker,
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
    let mut conn = Conn {
        session: Session::new(ending.clone()),
        tx: tx.clone(),
        sleeps,
        ending: ending.clone(),
        tasks,
    };

    // Dropping `read_loop` midway can lose a reply it was queueing, which is fine
    // because in both cases the connection is ending.
    tokio::select! {
        biased;
        () = ending.cancelled() => {}
        () = read_loop(&mut source, &backend, &mut conn, peer) => {}
    }
    // Ending stops the tickers; dropping the session drops the senders every
    // waiting `ask` listens on.
    ending.cancel();
    drop(conn);
    if shutdown.is_cancelled() {
        go_away(&mut source, &tx).await;
    }
    drop(tx);
    // The writer ends once every sender is gone, but a peer that stopped reading can
    // keep it stuck in a flush; do not let that hold up shutdown.
    let abort = writer.abort_handle();
    if tokio::time::timeout(CLOSE_TIMEOUT, writer).await.is_err() {
        abort.abort();
    }
}

/// What the reader needs to run what a message asks for.
struct Conn {
    /// Subscriptions and waiting `ask`s: only the reader touches them.
    session: Session,
    tx: mpsc::Sender<Message>,
    sleeps: Arc<Semaphore>,
    /// Cancelled when the connection ends; every task below stops on it.
    ending: CancellationToken,
    /// Where tickers and `ask` waits are spawned, so `serve` can wait for them too
    /// (and tests can see that none outlives its socket).
    tasks: TaskTracker,
}

/// Reads messages and dispatches them until the peer closes or the socket fails.
async fn read_loop(source: &mut Source, backend: &Backend, conn: &mut Conn, peer: SocketAddr) {
    while let Some(message) = source.next().await {
        let dispatched = match message {
            Ok(Message::Text(text)) => backend.dispatch(text.as_str(), &mut conn.session),
            Ok(Message::Binary(bytes)) => backend.dispatch_bytes(&bytes, &mut conn.session),
            // tungstenite answers Pings itself and acknowledges a Close on the next
            // read, after which the stream ends; neither needs anything from us.
            Ok(_) => continue,
            Err(error) => {
                debug!(%peer, %error, "echo backend: read failed");
                return;
            }
        };
        if !deliver(dispatched, conn).await {
            return;
        }
    }
}

/// Queues what one incoming message produced. Returns false once the writer is gone.
async fn deliver(dispatched: Dispatched, conn: &Conn) -> bool {
    let Dispatched {
        before,
        reply,
        after,
        delay,
        tickers,
        ask,
    } = dispatched;
    for message in before {
        if conn.tx.send(Message::text(message)).await.is_err() {
            return false;
        }
    }
    if let Some(ask) = ask {
        let tx = conn.tx.clone();
        let ending = conn.ending.clone();
        // Its own task, so the reader goes on serving calls (and reading the answer).
        conn.tasks.spawn(async move {
            // Cancel-safe: a reply dropped here belongs to a connection that is ending.
            tokio::select! {
                biased;
                () = ending.cancelled() => {}
                _ = async {
                    if let Some(reply) = ask.reply(ANSWER_TIMEOUT).await {
                        let _ = tx.send(Message::text(reply)).await;
                    }
                } => {}
            }
        });
    }
    // What follows the reply: notices, then tickers, whose first tick is therefore
    // queued behind the reply that carries their id.
    let follow = Follow {
        reply,
        after,
        tickers,
    };
    if delay.is_zero() {
        return follow.send(&conn.tx, &conn.tasks).await;
    }
    // The semaphore is never closed, so this only fails if that changes.
    let Ok(permit) = conn.sleeps.clone().acquire_owned().await else {
        return false;
    };
    let tx = conn.tx.clone();
    let ending = conn.ending.clone();
    let tasks = conn.tasks.clone();
    tokio::spawn(async move {
        let _permit = permit;
        // Cancel-safe: a reply dropped here belongs to a connection that is ending.
        tokio::select! {
            biased;
            () = ending.cancelled() => {}
            _ = async {
                tokio::time::sleep(delay).await;
                follow.send(&tx, &tasks).await
            } => {}
        }
    });
    true
}

/// A message's reply and what must come after it.
struct Follow {
    reply: Option<String>,
    after: Vec<String>,
    tickers: Vec<crate::ticks::Ticker>,
}

impl Follow {
    /// Returns false once the writer is gone.
    async fn send(self, tx: &mpsc::Sender<Message>, tasks: &TaskTracker) -> bool {
        for message in self.reply.into_iter().chain(self.after) {
            if tx.send(Message::text(message)).await.is_err() {
                return false;
            }
        }
        for ticker in self.tickers {
            tasks.spawn(ticker.run(tx.clone()));
        }
        true
    }
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

#[cfg(test)]
pub(crate) mod tests {
    //! The connection plumbing, against a real socket and a real WebSocket client.
    //! The helpers are shared with `push_tests.rs`.

    use crate::serve_tracked;
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
    use tokio_util::task::TaskTracker;

    pub(crate) type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// Generous: it only bounds how long a broken build takes to fail.
    pub(crate) async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("timed out: {what}"))
    }

    async fn start() -> (
        SocketAddr,
        CancellationToken,
        JoinHandle<std::io::Result<()>>,
    ) {
        let (addr, shutdown, server, _) = start_tracked().await;
        (addr, shutdown, server)
    }

    /// [`start`], also returning the tracker of every connection and push task.
    pub(crate) async fn start_tracked() -> (
        SocketAddr,
        CancellationToken,
        JoinHandle<std::io::Result<()>>,
        TaskTracker,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let server = tokio::spawn(serve_tracked(
            listener,
            Arc::from("sock"),
            shutdown.clone(),
            tasks.clone(),
        ));
        (addr, shutdown, server, tasks)
    }

    pub(crate) async fn connect(addr: SocketAddr) -> Client {
        let url = format!("ws://{addr}");
        within("connect", tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake")
            .0
    }

    pub(crate) async fn next_text(client: &mut Client) -> String {
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
