//! Serving one open WebSocket: writing queued frames, reading replies, and noticing
//! when the upstream has gone quiet.
//!
//! The reader and the writer are two futures in one task, polled together: the
//! writer may wait on a full socket while the reader keeps draining replies, so a slow
//! upstream cannot deadlock us with both directions blocked.

use super::conn::Conn;
use super::connect::WsStream;
use super::mux::Frame;
use crate::config::WebSocketConfig;
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// Frames written per flush at most.
const WRITE_BATCH: usize = 256;
/// Bytes the writer takes off the queue at once (at least one frame): enough to fill
/// a socket buffer many times over, while what waits behind it stays in the queue's
/// byte limit.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// Why a socket ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum End {
    #[error("shutting down")]
    Shutdown,
    #[error("closed by upstream ({})", .0.as_ref().map_or_else(|| "no close frame".to_string(), |f| format!("{} {}", f.code, f.reason)))]
    ClosedByPeer(Option<CloseFrame>),
    #[error("socket closed without a close frame")]
    Eof,
    #[error("no pong within pong_timeout")]
    PongTimeout,
    #[error("upstream stopped reading: a write blocked past ping_interval + pong_timeout")]
    WriteStalled,
    #[error("{0}")]
    Error(tokio_tungstenite::tungstenite::Error),
    #[error("{0}")]
    Wamp(super::wamp::Ended),
}

/// Serves `socket` until it ends. Frames the writer took but did not write are left
/// in `unsent`, for [`Conn::closed`] to hand back as not sent. With `wamp`, frames go
/// through the connection's WAMP bridge both ways.
pub(super) async fn serve(
    socket: WsStream,
    conn: &Arc<Conn>,
    unsent: &mut Vec<Frame>,
    ws: &WebSocketConfig,
    stop: &CancellationToken,
    wamp: bool,
) -> End {
    let (mut sink, mut stream) = socket.split();
    let epoch = Instant::now();
    let ms = |at: Instant| at.duration_since(epoch).as_millis() as u64 + 1;
    // Milliseconds since `epoch` + 1 (0: none) when the unanswered ping went out, and
    // when the write in progress began. The liveness check reads them from a future of
    // its own, because a writer blocked on a full socket cannot check anything itself.
    let ping_sent = AtomicU64::new(0);
    let write_began = AtomicU64::new(0);

    let writer = async {
        // Whether the last flush carried several frames: the connection is under load.
        let mut busy = false;
        let start = Instant::now() + ws.ping_interval;
        let mut ping = tokio::time::interval_at(start, ws.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let batch = unsent;
        // WAMP only: one queued frame's messages, and the replies answered locally.
        let (mut messages, mut local) = (Vec::new(), Vec::new());
        loop {
            // Checked every round too: under constant load the select below never runs.
            if stop.is_cancelled() {
                return go_away(&mut sink, ws.handshake_timeout, wamp).await;
            }
            if wamp {
                // Timed like any write: a router that stopped reading must not hold
                // the writer here unseen by the liveness check.
                write_began.store(ms(Instant::now()), Ordering::Release);
                if let Err(e) = write_outbox(conn, &mut sink, &mut messages).await {
                    return End::Error(e);
                }
                write_began.store(0, Ordering::Release);
            }
            let due = if conn.take(batch, WRITE_BATCH, WRITE_BATCH_BYTES) > 0 {
                // Under constant load the queue is never empty: look at the ping
                // timer without waiting, or pings would never go out.
                ping.tick().now_or_never().is_some()
            } else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return go_away(&mut sink, ws.handshake_timeout, wamp).await,
                    _ = conn.wake.notified() => continue,
                    _ = ping.tick() => true,
                }
            };
            if due && ping_sent.load(Ordering::Acquire) == 0 {
                ping_sent.store(ms(Instant::now()), Ordering::Release);
                if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                    return End::Error(e);
                }
            }
            if batch.is_empty() {
                continue;
            }
            write_began.store(ms(Instant::now()), Ordering::Release);
            // Many frames, one flush: under load this turns hundreds of small writes
            // into a few syscalls. Under load, one yield first lets the callers already
            // running on this worker queue theirs too; on loopback a send costs far more
            // than a scheduler round. A lone caller (the last flush carried one frame)
            // skips it: nobody else is coming, and the round would only add latency.
            if batch.len() < WRITE_BATCH && (batch.len() > 1 || busy) {
                tokio::task::yield_now().await;
                conn.take(batch, WRITE_BATCH, WRITE_BATCH_BYTES);
            }
            busy = batch.len() > 1;
            // Written front to back; what is left on an error was never sent.
            batch.reverse();
            while let Some(frame) = batch.pop() {
                if !wamp {
                    if let Err(e) = sink.feed(Message::text(frame.text)).await {
                        return End::Error(e);
                    }
                    continue;
                }
                if let Some(bridge) = conn.bridge.lock().as_mut() {
                    bridge.outbound(&frame.text, &mut messages, &mut local);
                }
                for text in messages.drain(..) {
                    if let Err(e) = sink.feed(Message::text(text)).await {
                        return End::Error(e);
                    }
                }
                for reply in local.drain(..) {
                    conn.deliver(reply);
                }
            }
            if let Err(e) = sink.flush().await {
                return End::Error(e);
            }
            write_began.store(0, Ordering::Release);
        }
    };

    // Dead if a ping goes unanswered for pong_timeout, or if one write stays blocked for
    // ping_interval + pong_timeout: an upstream that stopped reading is as dead as one
    // that stopped answering.
    let liveness = async {
        let stalled_write = ws.ping_interval + ws.pong_timeout;
        let step = (ws.pong_timeout / 4).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(step).await;
            let now = ms(Instant::now());
            let older_than = |mark: u64, limit: Duration| {
                mark != 0 && now.saturating_sub(mark) > limit.as_millis() as u64
            };
            if older_than(ping_sent.load(Ordering::Acquire), ws.pong_timeout) {
                return End::PongTimeout;
            }
            if older_than(write_began.load(Ordering::Acquire), stalled_write) {
                return End::WriteStalled;
            }
        }
    };

    let reader = async {
        let mut translated = Vec::new();
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) if wamp => {
                    if let Err(ended) = from_router(conn, text.as_str(), &mut translated) {
                        return End::Wamp(ended);
                    }
                }
                Ok(Message::Text(text)) => conn.deliver(Bytes::from(text)),
                // wamp.2.json is text only.
                Ok(Message::Binary(_)) if wamp => conn.count_garbage(1),
                Ok(Message::Binary(data)) => conn.deliver(data),
                Ok(Message::Pong(_)) => ping_sent.store(0, Ordering::Release),
                Ok(Message::Close(frame)) => return End::ClosedByPeer(frame),
                Ok(Message::Ping(_) | Message::Frame(_)) => {}
                Err(e) => return End::Error(e),
            }
        }
        End::Eof
    };

    let end = tokio::select! {
        end = writer => end,
        end = reader => end,
        end = liveness => end,
    };
    if let End::Wamp(super::wamp::Ended::Goodbye(_)) = &end {
        // A router closing our session waits for our GOODBYE before it closes the socket.
        let _ = timeout(ws.handshake_timeout, async {
            let mut text = String::with_capacity(48);
            super::wamp::write_goodbye(&mut text, super::wamp::CLOSE_GOODBYE_AND_OUT);
            sink.send(Message::text(text)).await?;
            sink.close().await
        })
        .await;
    }
    end
}

/// Says goodbye (1001) to an upstream we are leaving, waiting at most `limit`; a WAMP
/// session is closed with GOODBYE first, so the router knows it was meant.
async fn go_away(sink: &mut SplitSink<WsStream, Message>, limit: Duration, wamp: bool) -> End {
    let close = CloseFrame {
        code: CloseCode::Away,
        reason: "rpcgate shutting down".into(),
    };
    let _ = timeout(limit, async {
        if wamp {
            let mut text = String::with_capacity(48);
            super::wamp::write_goodbye(&mut text, super::wamp::CLOSE_SHUTDOWN);
            sink.send(Message::text(text)).await?;
        }
        sink.send(Message::Close(Some(close))).await
    })
    .await;
    End::Shutdown
}

/// Writes what the WAMP bridge queued on its own (CANCELs, UNSUBSCRIBEs of
/// subscriptions nobody waits for).
async fn write_outbox(
    conn: &Conn,
    sink: &mut SplitSink<WsStream, Message>,
    scratch: &mut Vec<String>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if let Some(bridge) = conn.bridge.lock().as_mut() {
        bridge.take_outbox(scratch);
    }
    if scratch.is_empty() {
        return Ok(());
    }
    for text in scratch.drain(..) {
        sink.feed(Message::text(text)).await?;
    }
    sink.flush().await
}

/// One router frame through the bridge, then what it became into the multiplexer
/// (outside the bridge's lock: delivering reaches the push hub).
fn from_router(
    conn: &Arc<Conn>,
    text: &str,
    translated: &mut Vec<Bytes>,
) -> Result<(), super::wamp::Ended> {
    let (read, wake) = {
        let mut bridge = conn.bridge.lock();
        let Some(bridge) = bridge.as_mut() else {
            return Ok(());
        };
        let read = bridge.inbound(text, translated);
        (read, bridge.has_outbox())
    };
    if wake {
        conn.wake.notify_one();
    }
    match read {
        Ok(true) => {}
        Ok(false) => conn.count_garbage(1),
        Err(ended) => return Err(ended),
    }
    for frame in translated.drain(..) {
        conn.deliver(frame);
    }
    Ok(())
}
