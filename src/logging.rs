//! Logging that never runs on the event loop.
//!
//! Two paths lead to stderr, neither through a runtime worker thread's `write(2)`:
//!
//! - Ordinary events (startup, warnings, debug) are formatted where they happen and
//!   handed, one line per message, to `tracing_appender`'s lossy non-blocking writer,
//!   whose own thread writes them. They are rare; one message per line is fine.
//! - The access log, one line per HTTP request, is the hot path. The HTTP side only
//!   moves a plain [`AccessRecord`] into a bounded queue ([`AccessLog::record`]: an
//!   uncontended lock and a push). A thread per gateway takes the whole queue every
//!   [`BATCH_INTERVAL`], emits each record as the usual `rpcgate::access` event
//!   (so `RUST_LOG`, text/JSON and test subscribers apply as to any event), and writes
//!   the batch's lines to stderr with one `write(2)` per [`WRITE_CHUNK`].
//!
//! Why a swapped queue and not a channel: a channel's send wakes a parked receiver,
//! which on a gateway doing a few thousand requests a second is a futex call and two
//! context switches per request, each costing more CPU than formatting the line. Here
//! the writer is woken only when it went idle, when the queue is half full, or to
//! flush; under load it wakes [`BATCH_INTERVAL`] apart, and a batch of lines costs
//! one wakeup and a few writes instead of one each per line.
//!
//! Moving the work does not make it free: the process still formats every line, just
//! on another thread and without the per-line syscall and wakeup. What the worker
//! thread pays is the [`AccessLog::enabled`] check and the push.
//!
//! A line's timestamp is when it is formatted: at most about [`BATCH_INTERVAL`] after
//! its request ended, and lines keep the order the requests finished in.
//!
//! Nothing ever waits for a slow or stuck stderr: a full queue drops the record and
//! counts it, and so does the non-blocking writer. [`dropped_lines`] is the total, for
//! the `rpcgate_log_lines_dropped_total` counter.

use crate::config::LogFormat;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::cell::RefCell;
use std::io::{self, IsTerminal as _, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

/// Records an access log holds before it drops new ones: 80 ms of 100k requests a
/// second, while a batch takes [`BATCH_INTERVAL`] to gather. The queue's memory grows
/// only as far as bursts fill it (about 110 bytes a record).
pub const ACCESS_QUEUE: usize = 8192;
/// How long the access-log thread lets records gather before writing a batch.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes of lines written with one `write(2)`: a pipe's default capacity, so a write
/// to a pipe whose reader keeps up does not block halfway.
pub const WRITE_CHUNK: usize = 64 * 1024;
/// Lines the non-blocking writer queues for stderr. Its channel is allocated up
/// front; ordinary events are rare, and tracing-appender's default (128,000) would
/// cost 5 MB of resident memory.
const STDERR_QUEUE: usize = 8192;
/// How long [`AccessLog::flush`] waits for the lines queued so far.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Access records the queues dropped because they were full, over all gateways.
static ACCESS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines a failing stderr (closed pipe, full disk) lost, over both paths.
static STDERR_LOST: AtomicU64 = AtomicU64::new(0);
/// The non-blocking writer's count of lines its full queue dropped.
static STDERR_QUEUE_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines that never reached stderr since the process started: access records
/// dropped by a full queue, ordinary lines dropped by the non-blocking writer's full
/// queue, and lines whose write failed. A process-wide total, as the writers are.
pub fn dropped_lines() -> u64 {
    let queue = STDERR_QUEUE_DROPPED
        .get()
        .map_or(0, |c| c.dropped_lines() as u64);
    ACCESS_DROPPED.load(Ordering::Relaxed) + STDERR_LOST.load(Ordering::Relaxed) + queue
}

/// Keeps the non-blocking writer's thread running; dropping it writes what is still
/// queued (waiting at most a second), so hold it until the process exits.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Installs the process's tracing subscriber: `RUST_LOG` wins over `level`; text or
/// JSON (one object per line, fields at the top level) to stderr, written off the
/// calling threads. A second call leaves the first subscriber in place.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (lines, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(STDERR_QUEUE)
        .lossy(true)
        .thread_name("rpcgate-log")
        .finish(StderrSink::default());
    let _ = STDERR_QUEUE_DROPPED.set(lines.error_counter());
    // Escape codes only for a terminal: in a file or journald they are noise, and
    // they are a third of what a text access line costs to format.
    let ansi =
        io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // A closed stderr (`rpcgate 2>&1 | head`) must not turn every log line into a
    // panic: tracing-subscriber would report the write error with eprintln!, which
    // panics in turn and takes the signal watcher down with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Writer { lines })
        .with_ansi(ansi)
        .log_internal_errors(false);
    // Err only if a subscriber is already installed, which then stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard { _writer: guard }
}

thread_local! {
    /// Lines formatted on an access-log thread, waiting to be written together.
    /// `None` on every other thread.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

fn batching() -> bool {
    BATCH.with_borrow(Option::is_some)
}

/// The subscriber's writer: on an access-log thread, lines go to that thread's batch;
/// anywhere else, to the non-blocking writer.
#[derive(Clone)]
struct Writer {
    lines: NonBlocking,
}

enum Line {
    Batch,
    Queue(NonBlocking),
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        if batching() {
            Line::Batch
        } else {
            Line::Queue(self.lines.clone())
        }
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Line::Batch => {
                BATCH.with_borrow_mut(|batch| {
                    if let Some(batch) = batch {
                        batch.extend_from_slice(buf);
                    }
                });
                Ok(buf.len())
            }
            Line::Queue(lines) => lines.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` (holding `lines` lines) to stderr, counting them as lost if that
/// fails. Nothing is reported: the report would go to the stderr that just failed.
fn write_stderr(bytes: &[u8], lines: u64) {
    if !bytes.is_empty() && io::stderr().lock().write_all(bytes).is_err() {
        STDERR_LOST.fetch_add(lines, Ordering::Relaxed);
    }
}

/// What the non-blocking writer's thread writes into. It hands over one line per
/// `write`, and `flush`es whenever its queue is empty, so a burst of lines costs a few
/// writes instead of one each. Write errors are counted instead of returned: the
/// appender would `eprintln!` them, which panics on a closed stderr.
#[derive(Default)]
struct StderrSink {
    buf: Vec<u8>,
    lines: u64,
}

impl Write for StderrSink {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.buf.len() + line.len() > WRITE_CHUNK {
            self.flush()?;
        }
        self.buf.extend_from_slice(line);
        self.lines += 1;
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        write_stderr(&self.buf, self.lines);
        self.buf.clear();
        self.lines = 0;
        Ok(())
    }
}

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
        let queue = Arc::new(Queue::new(capacity));
        let spawned = std::thread::Builder::new()
            .name("rpcgate-access".into())
            .spawn({
                let queue = queue.clone();
                move || tracing::dispatcher::with_default(&dispatch, || queue.write_until_closed())
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
    /// full. Never blocks on the writer: the lock is only ever held for a push or a swap.
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

/// Held only by the [`AccessLog`] clones, not the thread: its drop tells the thread to
/// finish.
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
    /// Records queued, and records written (or lost to stderr), since the start;
    /// a flush waits for `done` to reach what `queued` was.
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
    fn write_until_closed(&self) {
        BATCH.set(Some(Vec::with_capacity(WRITE_CHUNK)));
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
            MutexGuard::unlocked(&mut state, || emit_all(&mut batch));
            state.done += n;
            if state.flushing > 0 {
                self.written.notify_all();
            }
            let half = self.capacity.div_ceil(2);
            if !state.closed && state.flushing == 0 && state.records.len() < half {
                // Let the next batch gather. Spurious or early wakeups only make
                // the batch smaller.
                self.wake.wait_for(&mut state, BATCH_INTERVAL);
            }
        }
    }
}

/// Emits each record as an `rpcgate::access` event, and writes the lines that our
/// subscriber's writer batched for this thread, a chunk at a time.
fn emit_all(batch: &mut Vec<AccessRecord>) {
    let mut pending = 0;
    for record in batch.drain(..) {
        emit(record);
        pending += 1;
        if BATCH.with_borrow(|b| b.as_ref().is_some_and(|b| b.len() >= WRITE_CHUNK)) {
            write_batch(&mut pending);
        }
    }
    write_batch(&mut pending);
}

fn write_batch(pending: &mut u64) {
    BATCH.with_borrow_mut(|batch| {
        if let Some(batch) = batch {
            write_stderr(batch, *pending);
            batch.clear();
        }
    });
    *pending = 0;
}

fn emit(record: AccessRecord) {
    let AccessRecord {
        peer,
        method,
        status,
        duration_us,
        bytes,
        batch,
        upstream,
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
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A writer for test subscribers: keeps the lines; with a closed gate, every
    /// write waits until the gate opens.
    #[derive(Clone, Default)]
    struct Capture {
        out: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Gate>,
    }

    #[derive(Default)]
    struct Gate {
        closed: Mutex<bool>,
        changed: Condvar,
        /// Writes that have started.
        entered: AtomicUsize,
    }

    impl Capture {
        fn gated() -> Capture {
            let c = Capture::default();
            *c.gate.closed.lock() = true;
            c
        }

        fn open(&self) {
            *self.gate.closed.lock() = false;
            self.gate.changed.notify_all();
        }

        /// Waits until a write has started (and is held at the gate).
        fn wait_entered(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut closed = self.gate.closed.lock();
            while self.gate.entered.load(Ordering::SeqCst) == 0 {
                let timed_out = self.gate.changed.wait_until(&mut closed, deadline);
                assert!(!timed_out.timed_out(), "the writer never wrote");
            }
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8_lossy(&self.out.lock())
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect()
        }

        /// A JSON subscriber like `init`'s, writing here.
        fn dispatch(&self) -> tracing::Dispatch {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(self.clone())
                .into()
        }
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut closed = self.gate.closed.lock();
            self.gate.entered.fetch_add(1, Ordering::SeqCst);
            self.gate.changed.notify_all();
            while *closed {
                self.gate.changed.wait(&mut closed);
            }
            drop(closed);
            self.out.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    fn record(status: u16) -> AccessRecord {
        AccessRecord {
            peer: "127.0.0.1:5000".parse().expect("an address"),
            method: http::Method::POST,
            status,
            duration_us: 12,
            bytes: 34,
            batch: Some(3),
            upstream: Some(Arc::from("ws://a/")),
        }
    }

    fn start(capture: &Capture, capacity: usize) -> AccessLog {
        tracing::dispatcher::with_default(&capture.dispatch(), || {
            AccessLog::with_capacity(1.0, capacity)
        })
    }

    #[test]
    fn a_record_becomes_an_access_event_with_every_field() {
        let capture = Capture::default();
        let log = start(&capture, 16);
        assert!(log.enabled());
        log.record(record(200));
        log.record(AccessRecord {
            batch: None,
            upstream: None,
            ..record(503)
        });
        assert!(log.flush());
        let lines = capture.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let full = &lines[0];
        assert_eq!(full["target"], "rpcgate::access");
        assert_eq!(full["level"], "INFO");
        assert_eq!(full["peer"], "127.0.0.1:5000");
        assert_eq!(full["method"], "POST");
        assert_eq!(full["status"], 200);
        assert_eq!(full["duration_us"], 12);
        assert_eq!(full["bytes"], 34);
        assert_eq!(full["batch"], 3);
        assert_eq!(full["upstream"], "ws://a/");
        let bare = &lines[1];
        assert_eq!(bare["status"], 503);
        assert!(bare.get("batch").is_none() && bare.get("upstream").is_none());
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let capture = Capture::gated();
        let log = start(&capture, 2);
        log.record(record(200));
        // The writer took the first record and is stuck writing it.
        capture.wait_entered();
        // On another thread, so that a record() that blocked fails the test instead
        // of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for status in [201, 202, 203, 204] {
                    log.record(record(status));
                }
                let _ = done.send(());
            }
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "record() blocked on a stuck writer"
        );
        assert_eq!(log.dropped(), 2);
        capture.open();
        assert!(log.flush());
        let statuses: Vec<_> = capture
            .lines()
            .iter()
            .map(|l| l["status"].clone())
            .collect();
        assert_eq!(statuses, [200, 201, 202]);
    }

    #[test]
    fn flush_waits_for_the_records_queued_before_it() {
        let capture = Capture::gated();
        let log = start(&capture, 16);
        log.record(record(200));
        capture.wait_entered();
        log.record(record(201));
        assert!(
            !log.flush_within(Duration::from_millis(20)),
            "nothing was written yet"
        );
        capture.open();
        assert!(log.flush());
        assert_eq!(capture.lines().len(), 2);
    }

    #[test]
    fn the_last_handle_dropped_still_writes_what_is_queued() {
        let capture = Capture::gated();
        let log = start(&capture, 16);
        log.record(record(200));
        capture.wait_entered();
        log.record(record(201));
        let queue = log.queue.as_ref().map(|o| o.0.clone()).expect("a queue");
        drop(log);
        capture.open();
        assert!(queue.flush(Instant::now() + Duration::from_secs(10)));
        assert_eq!(capture.lines().len(), 2);
    }

    #[test]
    fn off_when_the_subscriber_filters_the_access_target_out() {
        let capture = Capture::default();
        let dispatch: tracing::Dispatch = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,rpcgate::access=off",
            ))
            .with_writer(capture.clone())
            .into();
        let log = tracing::dispatcher::with_default(&dispatch, || AccessLog::start(1.0));
        assert!(!log.enabled());
        log.record(record(200));
        assert!(log.flush());
        assert!(capture.out.lock().is_empty());
    }

    #[test]
    fn sampling_picks_about_the_configured_share() {
        let capture = Capture::default();
        let never =
            tracing::dispatcher::with_default(&capture.dispatch(), || AccessLog::start(0.0));
        assert!(!never.enabled());
        let tenth =
            tracing::dispatcher::with_default(&capture.dispatch(), || AccessLog::start(0.1));
        let picked = (0..10_000).filter(|_| tenth.enabled()).count();
        // Ten standard deviations either side of 1,000.
        assert!((700..1300).contains(&picked), "{picked}");
    }

    #[test]
    fn the_writer_batches_on_an_access_thread_and_queues_elsewhere() {
        let capture = Capture::default();
        let (lines, guard) = tracing_appender::non_blocking(capture.clone());
        let writer = Writer { lines };
        writer.make_writer().write_all(b"queued\n").expect("write");
        let batched = std::thread::spawn({
            let writer = writer.clone();
            move || {
                BATCH.set(Some(Vec::new()));
                writer.make_writer().write_all(b"batched\n").expect("write");
                BATCH.take()
            }
        })
        .join()
        .expect("thread");
        drop(guard);
        assert_eq!(batched.as_deref(), Some(&b"batched\n"[..]));
        assert_eq!(&capture.out.lock()[..], b"queued\n");
    }
}
