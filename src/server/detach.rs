//! Event streams served without hyper once their head is out.
//!
//! An event stream is one long response: hyper would hold the connection's read and
//! write buffers (16 KiB) and its dispatcher for as long as it runs, mostly to write a
//! few bytes of heartbeat a minute. On HTTP/1.1, once hyper has sent the head and all
//! it was given (its write buffer is empty), the connection is taken apart as a
//! parked one is (`connection.rs`), and the stream's remaining chunks are written here,
//! in the same chunked framing hyper started; when the stream ends, the last chunk
//! goes out and a fresh hyper connection serves the next request. HTTP/2 streams stay
//! with hyper: they share their connection with other requests.

use super::connection::Io;
use super::watch::Activity;
use bytes::Bytes;
use parking_lot::Mutex;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

/// An event stream's chunks, read by its response body until the connection takes
/// the receiver over.
pub type Events = Arc<Mutex<Option<Receiver<Bytes>>>>;

/// The event stream a connection's current response may hand over.
///
/// Held weakly: the response body holds the stream, so an offer whose body hyper has
/// dropped (the stream ended, or never left hyper) is no offer, and a later request
/// on the connection is never taken for it.
#[derive(Default)]
pub struct Detachable {
    /// Checked after each of hyper's polls: one atomic load unless a stream was offered.
    offered: AtomicBool,
    events: Mutex<Weak<Mutex<Option<Receiver<Bytes>>>>>,
}

impl Detachable {
    /// Offers `events` (read by the response being sent now) to be served here.
    pub fn offer(&self, events: &Events) {
        *self.events.lock() = Arc::downgrade(events);
        self.offered.store(true, Ordering::Release);
    }

    pub fn is_offered(&self) -> bool {
        if !self.offered.load(Ordering::Acquire) {
            return false;
        }
        let alive = self.events.lock().strong_count() > 0;
        if !alive {
            self.offered.store(false, Ordering::Release);
        }
        alive
    }

    /// Takes the offered stream's receiver away from its response body, which must
    /// still be alive (taken before hyper's connection, and the body, are dropped).
    pub fn take(&self) -> Option<Receiver<Bytes>> {
        self.offered.store(false, Ordering::Release);
        let events = std::mem::take(&mut *self.events.lock()).upgrade()?;
        events.lock().take()
    }
}

/// How a detached stream ended.
pub enum Ended {
    /// Its last chunk was sent: the connection may serve its next request, starting
    /// with these bytes the client sent meanwhile.
    KeepAlive(Bytes),
    /// Sent its last chunk, but the connection is to close (shutting down).
    Close,
    /// The client went away, stopped reading, or sent more than a request head.
    Drop,
}

/// Writes `events`' chunks to `io` until the stream ends. `ahead` holds what the
/// client sent beyond the stream's request, which is kept for the next one up to
/// `max_ahead` bytes.
pub async fn serve(
    io: &mut Io,
    mut events: Receiver<Bytes>,
    mut ahead: Vec<u8>,
    max_ahead: usize,
    write_timeout: Duration,
    activity: &Arc<Activity>,
    shutdown: &CancellationToken,
) -> Ended {
    // A request in progress for the watchdogs, and its end the start of the idle time.
    let _serving = activity.request_started();
    let mut frame = Vec::new();
    let mut read = [0u8; 512];
    loop {
        tokio::select! {
            chunk = events.recv() => {
                frame.clear();
                let ended = chunk.is_none();
                match chunk {
                    // Chunked framing: the length in hex, the bytes, CRLF.
                    Some(chunk) => {
                        let _ = write!(frame, "{:x}\r\n", chunk.len());
                        frame.extend_from_slice(&chunk);
                        frame.extend_from_slice(b"\r\n");
                    }
                    // The stream's end: the last chunk, with no trailers.
                    None => frame.extend_from_slice(b"0\r\n\r\n"),
                }
                let written = tokio::time::timeout(write_timeout, async {
                    io.write_all(&frame).await?;
                    io.flush().await
                });
                if !matches!(written.await, Ok(Ok(()))) {
                    return Ended::Drop;
                }
                // Grown for a large read of events, not kept for a heartbeat.
                if frame.capacity() > 4096 {
                    frame = Vec::new();
                }
                if ended {
                    return if shutdown.is_cancelled() {
                        Ended::Close
                    } else {
                        Ended::KeepAlive(Bytes::from(ahead))
                    };
                }
            }
            n = io.read(&mut read) => match n {
                Ok(0) | Err(_) => return Ended::Drop,
                Ok(n) if ahead.len() + n > max_ahead => return Ended::Drop,
                Ok(n) => ahead.extend_from_slice(&read[..n]),
            },
        }
    }
}
