//! Per-connection timeouts that hyper does not express the way we want.
//!
//! hyper 1 times the wait for *any* next request head with `header_read_timeout`, so an
//! idle keep-alive connection and a client trickling a head byte by byte share one
//! limit. We want two, as Go's `ReadHeaderTimeout`/`IdleTimeout` and Envoy do:
//! `keep_alive_timeout` from the end of the last request (or the accept) to the first
//! byte of the next one, and `header_read_timeout` from that first byte until the head
//! is complete. [`WatchedIo`] notes the first byte; [`expired`] resolves when either
//! limit passes, and the caller then shuts the connection down gracefully.
//!
//! hyper has no write timeout at all: a client that stops reading leaves its answers
//! (and their memory budget) in hyper's buffers for as long as the socket stays open.
//! [`WatchedIo`] also notes when a write could not proceed, and [`expired`] reports
//! [`Expiry::WriteStalled`] once no byte has gone out for `write_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What one client connection is doing, shared by its IO, its requests and its watchdog.
pub struct Activity {
    /// When the connection was accepted; the other times count from here.
    epoch: Instant,
    /// Requests being served right now.
    active: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished (0: accepted).
    idle_since_ms: AtomicU64,
    /// Milliseconds since `epoch` + 1 when the first byte of the next head arrived; 0: none yet.
    head_started_ms: AtomicU64,
    /// Milliseconds since `epoch` + 1 when a write first found the socket full; 0: the
    /// last write went through. Any byte written clears it.
    write_blocked_ms: AtomicU64,
    /// HTTP/2 reads frames (pings, window updates) all the time, which says nothing about
    /// a request head; only the idle limit applies to it.
    is_h2: AtomicBool,
    /// The last read found nothing to read: the stream's wake-up is armed and nothing
    /// is buffered below us (TLS: rustls had no plaintext). One of the conditions for
    /// parking an HTTP/1 connection (see [`Activity::parkable`]).
    read_waiting: AtomicBool,
    /// Wakes the watchdog when any of the above changes its deadline.
    changed: Notify,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(0),
            is_h2: AtomicBool::new(false),
            read_waiting: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request head was parsed and its handler starts; the guard marks its end.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
        RequestGuard {
            activity: self.clone(),
        }
    }

    /// Whether a request handler is running now.
    pub fn busy(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// The connection turned out to speak HTTP/2: its reads say nothing about heads.
    pub fn serving_h2(&self) {
        self.is_h2.store(true, Ordering::Release);
        // The preface's bytes, read to tell the protocol, started no head.
        self.head_started_ms.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    /// Whether an HTTP/1 connection is between requests with nothing in flight either
    /// way, so that hyper's state for it can be dropped: no request is being served
    /// (each holds its guard until its answer's last byte is handed to hyper), no byte
    /// of a next head has arrived, the last write went through (so hyper's write
    /// buffer and TLS's are empty), and the last read found the stream empty.
    pub fn parkable(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
            && self.head_started_ms.load(Ordering::Acquire) == 0
            && self.write_blocked_ms.load(Ordering::Acquire) == 0
            && self.read_waiting.load(Ordering::Acquire)
    }

    /// Everything written so far went out: hyper's write buffer (and TLS's) is empty.
    pub fn output_flushed(&self) -> bool {
        self.write_blocked_ms.load(Ordering::Acquire) == 0
    }

    /// Bytes of a next head were read ahead (pipelined behind the last request), and
    /// are given back to a new hyper connection: they start the head timeout, and keep
    /// the connection from parking again until that request starts.
    pub fn head_bytes_buffered(&self) {
        self.bytes_read();
    }

    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            self.write_blocked_ms
                .store(self.now_ms() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn bytes_written(&self) {
        // No wake-up: the stall deadline only moves later, and the watchdog
        // re-reads the state when the old one passes.
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Release);
        }
    }

    fn bytes_read(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && !self.is_h2.load(Ordering::Relaxed)
            && self.head_started_ms.load(Ordering::Acquire) == 0
        {
            self.head_started_ms
                .store(self.now_ms() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }
}

pub struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.idle_since_ms.store(a.now_ms(), Ordering::Release);
        a.active.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request for `keep_alive_timeout`.
    Idle,
    /// A request head unfinished after `header_read_timeout`.
    Head,
    /// No byte could be written for `write_timeout`: the client stopped reading.
    WriteStalled,
}

/// The per-connection limits [`expired`] watches.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub keep_alive: Duration,
    pub write_timeout: Duration,
}

/// Resolves when the connection has been idle for `keep_alive`, has spent
/// `header_timeout` on an unfinished request head, or has not written a byte for
/// `write_timeout` while it had some to write.
///
/// With `stalls_only`, only [`Expiry::WriteStalled`] is reported: for a connection
/// already closing gracefully, whose idle and head limits have done their part.
pub async fn expired(activity: &Activity, limits: Limits, stalls_only: bool) -> Expiry {
    loop {
        let stalled = match activity.write_blocked_ms.load(Ordering::Acquire) {
            0 => None,
            since => Some((
                Expiry::WriteStalled,
                activity.epoch + Duration::from_millis(since - 1) + limits.write_timeout,
            )),
        };
        let (header_timeout, keep_alive) = (limits.header_timeout, limits.keep_alive);
        let due = if stalls_only {
            None
        } else if activity.active.load(Ordering::Acquire) > 0 {
            // Body and handler have limits of their own (body_read_timeout, request_timeout).
            None
        } else {
            match activity.head_started_ms.load(Ordering::Acquire) {
                0 => {
                    let idle = activity.idle_since_ms.load(Ordering::Acquire);
                    Some((
                        Expiry::Idle,
                        activity.epoch + Duration::from_millis(idle) + keep_alive,
                    ))
                }
                started => Some((
                    Expiry::Head,
                    activity.epoch + Duration::from_millis(started - 1) + header_timeout,
                )),
            }
        };
        // The earlier of the two deadlines.
        let due = match (due, stalled) {
            (Some(a), Some(b)) => Some(if b.1 < a.1 { b } else { a }),
            (a, b) => a.or(b),
        };
        let changed = activity.changed.notified();
        match due {
            Some((expiry, due)) if Instant::now() >= due => return expiry,
            Some((_, due)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

/// Resolves when a connection closing gracefully since `since` has had its time:
/// `write_timeout` from `since`, or from the end of its last request if that is later,
/// with no request handler running (those have deadlines of their own). A request
/// that ends during the close still gets `write_timeout` to deliver its answer.
pub async fn closed_by(activity: &Activity, since: Instant, write_timeout: Duration) {
    loop {
        let changed = activity.changed.notified();
        if activity.busy() {
            changed.await;
            continue;
        }
        let idle =
            activity.epoch + Duration::from_millis(activity.idle_since_ms.load(Ordering::Acquire));
        let due = since.max(idle) + write_timeout;
        if Instant::now() >= due {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = changed => {}
        }
    }
}

/// A connection's stream (TCP, or TLS over it: what it sees is then the decrypted
/// bytes) that reports reads and stalled writes to its connection's [`Activity`].
pub struct WatchedIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> WatchedIo<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        WatchedIo { inner, activity }
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let waiting = polled.is_pending();
        if self.activity.read_waiting.load(Ordering::Relaxed) != waiting {
            self.activity.read_waiting.store(waiting, Ordering::Release);
        }
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<I> WatchedIo<I> {
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.bytes_written(),
            Poll::Ready(_) => {}
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        match polled {
            Poll::Pending => self.activity.write_blocked(),
            // Everything written is out of our buffers (TLS's too): nothing waits for
            // the client to read, whatever the writes before said.
            Poll::Ready(Ok(())) => self.activity.bytes_written(),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_secs(10),
        keep_alive: Duration::from_secs(60),
        write_timeout: Duration::from_secs(1),
    };

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_write_timeout_expires_even_during_a_request() {
        let activity = Activity::new();
        let _request = activity.request_started();
        activity.write_blocked();
        let start = Instant::now();
        assert_eq!(
            expired(&activity, LIMITS, false).await,
            Expiry::WriteStalled
        );
        assert_eq!(start.elapsed(), LIMITS.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_written_restart_the_stall_clock() {
        let activity = Activity::new();
        activity.write_blocked();
        tokio::time::advance(Duration::from_millis(900)).await;
        activity.bytes_written();
        activity.write_blocked();
        let start = Instant::now();
        assert_eq!(expired(&activity, LIMITS, true).await, Expiry::WriteStalled);
        assert_eq!(start.elapsed(), LIMITS.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_connection_gets_write_timeout_after_its_last_request() {
        let activity = Activity::new();
        let since = Instant::now();
        let request = activity.request_started();
        let close = closed_by(&activity, since, LIMITS.write_timeout);
        tokio::pin!(close);
        // A running request holds the close off, however long it takes.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), close.as_mut())
                .await
                .is_err()
        );
        drop(request);
        let ended = Instant::now();
        close.await;
        assert_eq!(ended.elapsed(), LIMITS.write_timeout);
    }
}
