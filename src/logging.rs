//! Logging that never runs on the event loop.
//!
//! Two paths lead to stderr, neither through a runtime worker thread's `write(2)`:
//!
//! - Ordinary events (startup, warnings, debug) are formatted where they happen and
//!   handed, one line per message, to `tracing_appender`'s lossy non-blocking writer,
//!   whose own thread writes them. They are rare; one message per line is fine.
//! - The access log, one line per HTTP request, is the hot path (`logging/access.rs`).
//!   The HTTP side only moves a plain [`AccessRecord`] into a bounded queue; a thread
//!   per gateway takes the whole queue every [`BATCH_INTERVAL`], turns each record
//!   into its line and writes the batch with one `write(2)` per [`WRITE_CHUNK`].
//!
//! Moving work to another thread does not make it free: the gateway's CPU per call
//! still includes every line. So the access thread, when the subscriber is the one
//! [`init`] installed and writes no colours, formats lines itself
//! (`logging/line.rs`), byte for byte what tracing-subscriber would write for the
//! `rpcgate::access` event, at a fraction of the cost. Under any other subscriber (a
//! test's, or colours on a terminal) it emits the event through tracing like any
//! other.
//!
//! Nothing ever waits for a slow or stuck stderr: a full queue drops the line and
//! counts it, in both paths. [`dropped_lines`] is the total, for the
//! `rpcgate_log_lines_dropped_total` counter.

mod access;
mod line;

pub use access::{ACCESS_QUEUE, AccessLog, AccessRecord, BATCH_INTERVAL, FLUSH_TIMEOUT};

use crate::config::LogFormat;
use std::io::{self, IsTerminal as _, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Bytes of lines written with one `write(2)`: a pipe's default capacity, so a write
/// to a pipe whose reader keeps up does not block halfway.
pub const WRITE_CHUNK: usize = 64 * 1024;
/// Lines the non-blocking writer queues for stderr. Its channel is allocated up
/// front; ordinary events are rare, and tracing-appender's default (128,000) would
/// cost 5 MB of resident memory.
const STDERR_QUEUE: usize = 8192;

/// Access records dropped because their queue was full, over all gateways.
static ACCESS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines a failing stderr (closed pipe, full disk) lost, over both paths.
static STDERR_LOST: AtomicU64 = AtomicU64::new(0);
/// The non-blocking writer's count of lines its full queue dropped.
static STDERR_QUEUE_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines that never reached stderr since the process started: access records
/// dropped by a full queue, ordinary lines dropped by the non-blocking writer's full
/// queue, and lines whose write failed. Process-wide, as stderr is.
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

/// Installs the process's tracing subscriber: `RUST_LOG` wins over `level`; text, or
/// JSON with one object per line and the fields at its top level; to stderr, written
/// by other threads than the caller's. A second call leaves the first subscriber in
/// place.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (lines, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(STDERR_QUEUE)
        .lossy(true)
        .thread_name("rpcgate-log")
        .finish(StderrSink::default());
    let _ = STDERR_QUEUE_DROPPED.set(lines.error_counter());
    // Colours only on a terminal: in a file or journald escape codes are noise, and
    // they were about a quarter of what formatting a text line cost.
    let ansi =
        io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let direct = (!ansi).then(|| Direct {
        format,
        sink: Arc::new(|bytes: &[u8]| io::stderr().lock().write_all(bytes)),
    });
    // Err only if a subscriber is already installed, which then stays.
    let _ = subscriber(format, filter, ansi, Writer { lines, direct }).try_init();
    LogGuard { _writer: guard }
}

/// The subscriber `init` installs. Tests build it around other writers; the access
/// line formatter's tests hold it to tracing-subscriber's output.
fn subscriber(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: Writer,
) -> tracing::Dispatch {
    // A closed stderr (`rpcgate 2>&1 | head`) must not turn every log line into a
    // panic: tracing-subscriber would report the write error with eprintln!, which
    // panics in turn and takes the signal watcher down with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.finish().into(),
        LogFormat::Json => builder.json().flatten_event(true).finish().into(),
    }
}

/// Where a batch of lines goes; stderr outside tests.
type Sink = Arc<dyn Fn(&[u8]) -> io::Result<()> + Send + Sync>;

/// The writer of [`init`]'s subscriber. An access-log thread finds it in the
/// subscriber (`Dispatch::downcast_ref`) to learn that it may format lines itself.
struct Writer {
    lines: NonBlocking,
    /// Set when the subscriber writes plain lines that `line.rs` can reproduce.
    direct: Option<Direct>,
}

/// How an access-log thread writes lines without going through tracing.
#[derive(Clone)]
struct Direct {
    format: LogFormat,
    sink: Sink,
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = NonBlocking;

    fn make_writer(&'a self) -> NonBlocking {
        self.lines.clone()
    }
}

/// Writes `bytes` (holding `lines` lines) to `sink`, counting them as lost if that
/// fails. Nothing is reported: the report would go to the stderr that just failed.
fn write_lines(sink: &Sink, bytes: &[u8], lines: u64) {
    if !bytes.is_empty() && sink(bytes).is_err() {
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
        if !self.buf.is_empty() && io::stderr().lock().write_all(&self.buf).is_err() {
            STDERR_LOST.fetch_add(self.lines, Ordering::Relaxed);
        }
        self.buf.clear();
        self.lines = 0;
        Ok(())
    }
}

/// Writers for tests: what a subscriber or a sink wrote, and a gate that holds every
/// write until the test opens it.
#[cfg(test)]
mod capture {
    use super::Sink;
    use parking_lot::{Condvar, Mutex};
    use std::io::{self, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    pub struct Capture {
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
        pub fn gated() -> Capture {
            let c = Capture::default();
            *c.gate.closed.lock() = true;
            c
        }

        pub fn open(&self) {
            *self.gate.closed.lock() = false;
            self.gate.changed.notify_all();
        }

        /// Waits until a write has started (and is held at the gate).
        pub fn wait_entered(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut closed = self.gate.closed.lock();
            while self.gate.entered.load(Ordering::SeqCst) == 0 {
                let waited = self.gate.changed.wait_until(&mut closed, deadline);
                assert!(!waited.timed_out(), "the writer never wrote");
            }
        }

        pub fn bytes(&self) -> Vec<u8> {
            self.out.lock().clone()
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.out.lock()).into_owned()
        }

        pub fn json_lines(&self) -> Vec<serde_json::Value> {
            self.text()
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect()
        }

        /// A JSON subscriber (`init`'s layout) writing here through tracing.
        pub fn json_dispatch(&self) -> tracing::Dispatch {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(self.clone())
                .into()
        }

        pub fn sink(&self) -> Sink {
            let this = self.clone();
            Arc::new(move |bytes: &[u8]| this.clone().write_all(bytes))
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
}
