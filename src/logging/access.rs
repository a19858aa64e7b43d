//! The access log: one line per HTTP request, queued by the HTTP side and written by a
//! thread of its own.
//!
//! Why a swapped queue and not a channel: a channel's send wakes a parked receiver,
//! which on a gateway doing a few thousand requests a second is a futex call and two
//! context switches per request, each costing more CPU than formatting the line. Here
//! the writer is woken only when it went idle, when the queue is half full, or to
//! flush; under load it wakes [`BATCH_INTERVAL`] apart, and takes every queued record
//! with one lock.
//!
//! A line's timestamp is when it is formatted: at most about [`BATCH_INTERVAL`] after
//! its request ended. Lines keep the order their requests finished in.

use super::line::Lines;
use super::{ACCESS_DROPPED, Direct, WRITE_CHUNK, Writer, write_lines};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Records an access log holds before it drops new ones: 80 ms of 100k requests a
/// second, while a batch takes [`BATCH_INTERVAL`] to gather. The queue's memory grows
/// only as far as bursts fill it (about 110 bytes a record).
pub const ACCESS_QUEUE: usize = 8192;
/// How long the access-log thread lets records gather before writing a batch.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);
/// How long [`AccessLog::flush`] waits for the lines queued so far.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// One HTTP request, as the access log reports it. Plain data, so that building it
/// costs the HTTP side nothing beyond a clone of `upstream`.
#[derive(Clone, Debug)]
pub struct AccessRecord {
    pub peer: SocketAddr,
    pub method: http::Method,
    pub status: u16,
    /// From the request's arrival to its response head being ready.
    pub duration_us: u64,
    /// Response body bytes.
    pub bytes: u64,
    /// Elements, when the request was a batch.
    pub batch: Option<usize>,
    /// The upstream that answered, when one did.
    pub upstream: Option<Arc<str>>,
    /// Who called, when `[auth]` named them: a key's or certificate's name, a
    /// token's subject; never a secret.
    pub caller: Option<Arc<str>>,
    /// The subject of the client's verified certificate (mTLS), when it sent one.
    pub client_cert: Option<Arc<str>>,
}

/// A gateway's access log: a bounded queue and the thread that writes it. Clones share
/// the queue; the thread exits, after writing what is queued, when the last clone is
/// dropped.
#[derive(Clone)]
pub struct AccessLog {
    /// `None` when off: disabled in the config, sampled at 0, or filtered out by the
    /// subscriber; then nothing is queued and no thread runs.
    queue: Option<Arc<Owner>>,
    /// Share of requests that get a line.
    sample: f64,
}

impl AccessLog {
    /// An access log for a share `sample` (0.0 to 1.0) of requests, writing through
    /// the subscriber current on this thread now. Off when `sample` is 0 or that
    /// subscriber does not want `rpcgate::access` at info: the filter is read once,
    /// here, as rpcgate never reloads it.
    pub fn start(sample: f64) -> AccessLog {
        AccessLog::with_capacity(sample, ACCESS_QUEUE)
    }

    /// No access log.
    pub fn off() -> AccessLog {
        AccessLog {
            queue: None,
            sample: 0.0,
        }
    }

    fn with_capacity(sample: f64, capacity: usize) -> AccessLog {
        if sample.is_nan()
            || sample <= 0.0
            || !tracing::enabled!(target: "rpcgate::access", tracing::Level::INFO)
        {
            return AccessLog::off();
        }
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let direct = dispatch
            .downcast_ref::<Writer>()
            .and_then(|w| w.direct.clone());
        let queue = Arc::new(Queue::new(capacity));
        let spawned = std::thread::Builder::new()
            .name("rpcgate-access".into())
            .spawn({
                let queue = queue.clone();
                move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        queue.write_until_closed(direct.map(DirectOut::new))
                    })
                }
            });
        match spawned {
            Ok(_) => AccessLog {
                queue: Some(Arc::new(Owner(queue))),
                sample,
            },
            Err(error) => {
                tracing::warn!(%error, "cannot start the access-log thread; access log off");
                AccessLog::off()
            }
        }
    }

    /// Whether this request gets a line; call once per request, before building its
    /// [`AccessRecord`]. Sampling happens here, so an unsampled request costs no
    /// record: a branch, plus a random draw when sampling below 1.0.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.queue.is_some() && (self.sample >= 1.0 || fastrand::f64() < self.sample)
    }

    /// Queues `record` for the writer thread, or drops and counts it if the queue is
    /// full. Never waits for the writer: the lock is only ever held for a push or a
    /// swap.
    pub fn record(&self, record: AccessRecord) {
        if let Some(owner) = &self.queue {
            owner.0.push(record);
        }
    }

    /// Waits, at most [`FLUSH_TIMEOUT`], until the records queued before the call are
    /// written. True if they were. Blocks the calling thread: from async code, call it
    /// in `spawn_blocking`.
    pub fn flush(&self) -> bool {
        self.flush_within(FLUSH_TIMEOUT)
    }

    /// [`AccessLog::flush`] with a timeout of the caller's choosing.
    pub fn flush_within(&self, timeout: Duration) -> bool {
        match &self.queue {
            Some(owner) => owner.0.flush(Instant::now() + timeout),
            None => true,
        }
    }

    /// Records this log dropped because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue
            .as_ref()
            .map_or(0, |o| o.0.dropped.load(Ordering::Relaxed))
    }
}

/// Held only by the [`AccessLog`] clones, not by the thread: its drop tells the thread
/// to finish.
struct Owner(Arc<Queue>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.state.lock().closed = true;
        self.0.wake.notify_one();
    }
}

struct Queue {
    state: Mutex<State>,
    /// Wakes the writer: the first record after it went idle, a half-full queue, a
    /// flush, the last handle gone.
    wake: Condvar,
    /// Wakes flushers after each batch is written.
    written: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

struct State {
    records: Vec<AccessRecord>,
    /// Records queued, and records written (or lost to stderr), since the start; a
    /// flush waits for `done` to reach what `queued` was.
    queued: u64,
    done: u64,
    /// The writer waits with no deadline: the next record must wake it. While it
    /// works or lets a batch gather, pushes need not.
    idle: bool,
    /// Flushes waiting: the writer must not let the next batch gather.
    flushing: usize,
    closed: bool,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                records: Vec::new(),
                queued: 0,
                done: 0,
                idle: false,
                flushing: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    fn push(&self, record: AccessRecord) {
        let mut state = self.state.lock();
        if state.records.len() >= self.capacity {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            ACCESS_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.records.push(record);
        state.queued += 1;
        // Half full: write now rather than drop what the rest of the interval brings.
        let wake = state.idle || state.records.len() == self.capacity.div_ceil(2);
        state.idle = false;
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }

    fn flush(&self, deadline: Instant) -> bool {
        let mut state = self.state.lock();
        let target = state.queued;
        if state.done >= target {
            return true;
        }
        state.flushing += 1;
        self.wake.notify_one();
        while state.done < target {
            if self.written.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        state.flushing -= 1;
        state.done >= target
    }

    /// The access-log thread: takes the queue a batch at a time, until the last
    /// handle is gone and the queue is empty.
    fn write_until_closed(&self, mut direct: Option<DirectOut>) {
        let mut batch = Vec::new();
        let mut state = self.state.lock();
        loop {
            while state.records.is_empty() && !state.closed {
                state.idle = true;
                self.wake.wait(&mut state);
            }
            state.idle = false;
            if state.records.is_empty() {
                return;
            }
            // The emptied vector of the last batch goes back, so the queue keeps its
            // capacity and pushes do not allocate.
            std::mem::swap(&mut state.records, &mut batch);
            let n = batch.len() as u64;
            MutexGuard::unlocked(&mut state, || match &mut direct {
                Some(out) => out.write_all(&mut batch),
                None => batch.drain(..).for_each(emit),
            });
            state.done += n;
            if state.flushing > 0 {
                self.written.notify_all();
            }
            let half = self.capacity.div_ceil(2);
            if !state.closed && state.flushing == 0 && state.records.len() < half {
                // Let the next batch gather. Spurious or early wakeups only make the
                // batch smaller.
                self.wake.wait_for(&mut state, BATCH_INTERVAL);
            }
        }
    }
}

/// Lines formatted on the access thread itself, written a chunk at a time.
struct DirectOut {
    lines: Lines,
    direct: Direct,
    buf: Vec<u8>,
    /// Lines in `buf`.
    pending: u64,
}

impl DirectOut {
    fn new(direct: Direct) -> DirectOut {
        DirectOut {
            lines: Lines::new(direct.format),
            direct,
            buf: Vec::with_capacity(WRITE_CHUNK + 1024),
            pending: 0,
        }
    }

    fn write_all(&mut self, batch: &mut Vec<AccessRecord>) {
        for record in batch.drain(..) {
            self.lines.write(&mut self.buf, &record, SystemTime::now());
            self.pending += 1;
            if self.buf.len() >= WRITE_CHUNK {
                self.write_out();
            }
        }
        self.write_out();
    }

    fn write_out(&mut self) {
        write_lines(&self.direct.sink, &self.buf, self.pending);
        self.buf.clear();
        self.pending = 0;
    }
}

/// The `rpcgate::access` event, for subscribers whose lines [`Lines`] cannot write.
pub(super) fn emit(record: AccessRecord) {
    let AccessRecord {
        peer,
        method,
        status,
        duration_us,
        bytes,
        batch,
        upstream,
        caller,
        client_cert,
    } = record;
    tracing::info!(
        target: "rpcgate::access",
        %peer,
        method = %method,
        status,
        duration_us,
        bytes,
        batch,
        upstream = upstream.as_deref(),
        caller = caller.as_deref(),
        client_cert = client_cert.as_deref(),
    );
}

#[cfg(test)]
pub(super) mod tests;
