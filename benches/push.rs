//! Push-path benchmark: the release `rpcgate` in front of the release echo backend,
//! with `--subscription substrate`, so that rpcgate tracks `ticks_subscribe` on its
//! shared upstream sockets and routes each `ticks` notification to the session that
//! subscribed.
//!
//! Rows:
//! 1. 1,000 WebSocket clients, one `ticks_subscribe [100]` each.
//! 2. 1,000 event streams (`GET /events?session=K`), each subscribed by a POST with
//!    `rpcgate-session: K`.
//! 3. The gateway's RSS with 10,000 idle event streams open.
//!
//! For rows 1 and 2: ticks delivered per second over the window, gateway CPU µs per
//! delivered tick, gateway peak RSS, and ticks that carried another client's
//! subscription id (must be 0).
//!
//! Run with `cargo bench --bench push`. Settings from the environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `RPCGATE_BENCH_SECS` | 5 | measured seconds per row (after 1 s warmup) |
//! | `RPCGATE_BENCH_PUSH_CLIENTS` | 1000 | subscribers in rows 1 and 2 |
//! | `RPCGATE_BENCH_PUSH_IDLE` | 10000 | idle event streams in row 3 |
//! | `RPCGATE_BENCH_PUSH_CONNECTIONS` | clients × 1.25 / 64 | `--connections` of the second run of rows 1 and 2 |
//!
//! Rows 1 and 2 run twice: with the shipped defaults (4 upstream connections), where
//! the echo backend's cap of 64 subscriptions per connection lets only 256 clients
//! subscribe, and with `--connections N`, enough sockets for every client.
//!
//! The gateway runs with no `RUST_LOG` and no `RPCGATE_*` settings but the flags
//! above (`procs.rs` strips them), its stderr a pipe this bench drains. Each row gets
//! a fresh gateway. Results go to stdout and `target/bench/push.md`.

#[path = "gateway/procs.rs"]
#[allow(dead_code)]
mod procs;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use procs::{Monitor, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

const WARMUP: Duration = Duration::from_secs(1);
const INTERVAL_MS: u64 = 100;
/// Clients connecting (and subscribing) at once: stays under the listen backlog.
const BATCH: usize = 100;
/// Longest any one setup step (connect, handshake, subscribe reply) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest all clients of a row may take to connect and subscribe.
const SETUP_BUDGET: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("push bench: nothing to do outside `cargo bench --bench push`");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("push bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let nofile = procs::raise_nofile_limit().ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("push bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    secs: Duration,
    clients: usize,
    idle: usize,
    /// `--connections` of the second run of rows 1 and 2.
    connections: usize,
}

/// Subscriptions the echo backend allows per connection.
const ECHO_MAX_SUBSCRIPTIONS: usize = 64;

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let count = |name: &str, default: usize, max: usize| -> Result<usize> {
            match var(name) {
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => bail!("{name}={v}: want a count in 1..={max}"),
                },
                None => Ok(default),
            }
        };
        let secs = match var("RPCGATE_BENCH_SECS") {
            Some(v) => {
                let s: f64 = v
                    .trim()
                    .parse()
                    .with_context(|| format!("RPCGATE_BENCH_SECS={v}"))?;
                if !(s > 0.0 && s <= 600.0) {
                    bail!("RPCGATE_BENCH_SECS={v}: want seconds in (0, 600]");
                }
                Duration::from_secs_f64(s)
            }
            None => Duration::from_secs(5),
        };
        let clients = count("RPCGATE_BENCH_PUSH_CLIENTS", 1000, 5000)?;
        // A quarter more than the least that fits, for an uneven spread.
        let enough = (clients * 5 / 4).div_ceil(ECHO_MAX_SUBSCRIPTIONS).max(1);
        let connections = count("RPCGATE_BENCH_PUSH_CONNECTIONS", enough, 1024)?;
        Ok(Settings {
            secs,
            clients,
            idle: count("RPCGATE_BENCH_PUSH_IDLE", 10_000, 10_000)?,
            connections,
        })
    }
}

fn rpcgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rpcgate"))
}

/// `CARGO_TARGET_DIR` if set (relative to the package), else the package's `target/`.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => manifest.join(dir),
        _ => manifest.join("target"),
    }
}

fn subscribe_body() -> String {
    format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ticks_subscribe","params":[{INTERVAL_MS}]}}"#)
}

/// Counters shared by every client of a row.
#[derive(Default)]
struct Counts {
    /// Ticks carrying the client's own subscription id.
    ticks: AtomicU64,
    /// Ticks carrying any other id.
    mismatched: AtomicU64,
    /// Other messages (gaps, anything that is not a tick).
    other: AtomicU64,
    /// Clients whose subscription was acknowledged.
    subscribed: AtomicU64,
    /// Clients that failed to connect or subscribe.
    failed: AtomicU64,
    /// Streams or sockets that ended during the run.
    closed: AtomicU64,
    /// First failure, for the report.
    first_error: parking_lot::Mutex<Option<String>>,
}

impl Counts {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(why);
        }
    }

    /// Counts one pushed message (a JSON text) for the client holding `own`.
    fn message(&self, text: &[u8], own: &str) {
        let v: serde_json::Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(_) => {
                self.other.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if v.get("method").and_then(|m| m.as_str()) != Some("ticks") {
            self.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sub = v.pointer("/params/subscription").and_then(|s| s.as_str());
        if sub == Some(own) {
            self.ticks.fetch_add(1, Ordering::Relaxed);
        } else {
            self.mismatched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Row {
    what: String,
    clients: usize,
    subscribed: u64,
    failed: u64,
    secs: f64,
    ticks: u64,
    mismatched: u64,
    other: u64,
    closed: u64,
    cpu_us: Option<f64>,
    echo_cpu_us: Option<f64>,
    rss_kib: Option<u64>,
    foreign_cores: Option<f64>,
    first_error: Option<String>,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.ticks as f64 / self.secs
    }
    /// Delivered over what the subscribed clients should have got.
    fn delivered_share(&self) -> f64 {
        let expected = self.subscribed as f64 * self.secs * 1000.0 / INTERVAL_MS as f64;
        self.ticks as f64 / expected
    }
    fn cpu_per_msg(&self) -> Option<f64> {
        self.cpu_us.map(|c| c / self.ticks.max(1) as f64)
    }
}

struct IdleRow {
    streams: usize,
    opened: usize,
    before_kib: Option<u64>,
    with_kib: Option<u64>,
    fds: Option<usize>,
    connect_secs: f64,
    /// Seconds the first and the last tenth of the connect batches took.
    first_tenth: f64,
    last_tenth: f64,
    first_error: Option<String>,
}

async fn run(settings: Settings, nofile: Option<u64>) -> Result<()> {
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let echo = Proc::spawn(
        "echo-server",
        rpcgate_bin(),
        [
            "echo-server",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "bench-echo",
        ],
        &[],
        "echo-server listening on ",
    )
    .await?;
    let upstream = echo.url().to_owned();
    let mut rows = Vec::new();

    let runs = [
        (Kind::WebSocket, None),
        (Kind::EventStream, None),
        (Kind::WebSocket, Some(settings.connections)),
        (Kind::EventStream, Some(settings.connections)),
    ];
    for (kind, connections) in runs {
        let gateway = start_gateway(&upstream, connections).await?;
        let addr = addr_of(gateway.url())?;
        wait_ready(addr).await?;
        let row = measure(kind, addr, &gateway, echo.pid(), &settings, connections).await;
        let scan = gateway.stop().await;
        let row = row?;
        eprintln!(
            "push bench: {}: {:.0} ticks/s ({:.1}% of expected), {:.1} µs CPU/tick, {} mismatched, {} failed, gateway stderr {} lines",
            row.what,
            row.per_sec(),
            row.delivered_share() * 100.0,
            row.cpu_per_msg().unwrap_or(f64::NAN),
            row.mismatched,
            row.failed,
            scan.map_or(0, |s| s.lines),
        );
        rows.push(row);
        tokio::time::sleep(SETTLE).await;
    }

    let gateway = start_gateway(&upstream, None).await?;
    let addr = addr_of(gateway.url())?;
    wait_ready(addr).await?;
    let idle = idle_streams(addr, gateway.pid(), settings.idle).await;
    gateway.stop().await;
    let idle = idle?;
    echo.stop().await;

    let md = report(&rows, &idle, &settings, nofile);
    print!("{md}");
    let path = out_dir.join("push.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("push bench: wrote {}", path.display());
    Ok(())
}

async fn start_gateway(upstream: &str, connections: Option<usize>) -> Result<Proc> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--admin-listen",
        "off",
        "--subscription",
        "substrate",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(n) = connections {
        args.extend(["--connections".to_owned(), n.to_string()]);
    }
    Proc::spawn(
        "rpcgate",
        rpcgate_bin(),
        &args,
        &[],
        "rpcgate listening on ",
    )
    .await
}

/// `http://127.0.0.1:PORT/` → the socket address; loopback only.
fn addr_of(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("gateway URL {url:?} is not http://"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("gateway address {host:?}"))?;
    if !addr.ip().is_loopback() {
        bail!("gateway at {addr}: loopback only");
    }
    Ok(addr)
}

/// Posts `echo` until it is answered, so that no warmup is spent waiting for the
/// gateway's upstream sockets.
async fn wait_ready(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":["hello"]}"#;
    let mut last = String::new();
    while Instant::now() < deadline {
        match timeout(STEP_TIMEOUT, post(addr, body, None)).await {
            Ok(Ok(reply)) if reply.contains("\"result\"") => return Ok(()),
            Ok(Ok(reply)) => last = reply,
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("gateway not answering within 15 s: {last}")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    WebSocket,
    EventStream,
}

/// Sets up `settings.clients` subscribers of `kind`, then measures one window.
async fn measure(
    kind: Kind,
    addr: SocketAddr,
    gateway: &Proc,
    echo_pid: u32,
    settings: &Settings,
    connections: Option<usize>,
) -> Result<Row> {
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(settings.clients);
    let setup_deadline = Instant::now() + SETUP_BUDGET;
    for batch in (0..settings.clients).collect::<Vec<_>>().chunks(BATCH) {
        let mut ready = Vec::with_capacity(batch.len());
        for &i in batch {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let counts = counts.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let result = match kind {
                    Kind::WebSocket => ws_client(addr, &counts, &stop, tx).await,
                    Kind::EventStream => sse_client(addr, i, &counts, &stop, tx).await,
                };
                if let Err(e) = result {
                    counts.fail(format!("{e:#}"));
                }
            }));
            ready.push(rx);
        }
        // A batch is done when each client has subscribed or given up.
        for rx in ready {
            let _ = tokio::time::timeout_at(setup_deadline, rx).await;
        }
        if Instant::now() >= setup_deadline {
            eprintln!("push bench: setup budget spent; measuring the clients set up so far");
            break;
        }
    }
    let subscribed = counts.subscribed.load(Ordering::Relaxed);

    let start = Instant::now() + WARMUP;
    let end = start + settings.secs;
    let monitor = Monitor::start(
        vec![gateway.pid(), echo_pid],
        start.into_std(),
        end.into_std(),
    );
    tokio::time::sleep_until(start).await;
    let t0 = counts.ticks.load(Ordering::Relaxed);
    let m0 = counts.mismatched.load(Ordering::Relaxed);
    let o0 = counts.other.load(Ordering::Relaxed);
    let c0 = counts.closed.load(Ordering::Relaxed);
    tokio::time::sleep_until(end).await;
    let ticks = counts.ticks.load(Ordering::Relaxed) - t0;
    let mismatched_window = counts.mismatched.load(Ordering::Relaxed) - m0;
    let other = counts.other.load(Ordering::Relaxed) - o0;
    let closed = counts.closed.load(Ordering::Relaxed) - c0;
    let watched = monitor.finish().await;

    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    // Mismatches anywhere in the run count, not only in the window.
    let mismatched = counts
        .mismatched
        .load(Ordering::Relaxed)
        .max(mismatched_window);
    let usage = |i: usize| watched.usage.get(i).copied().flatten();
    let secs = settings.secs.as_secs_f64();
    let first_error = counts.first_error.lock().clone();
    let config = connections.map_or("defaults (4 upstream conns)".to_owned(), |n| {
        format!("--connections {n}")
    });
    Ok(Row {
        what: match kind {
            Kind::WebSocket => format!("{} WebSocket clients, {config}", settings.clients),
            Kind::EventStream => {
                format!("{} event streams (SSE + POST), {config}", settings.clients)
            }
        },
        clients: settings.clients,
        subscribed,
        failed: counts.failed.load(Ordering::Relaxed),
        secs,
        ticks,
        mismatched,
        other,
        closed,
        cpu_us: usage(0).map(|u| u.cpu_us),
        echo_cpu_us: usage(1).map(|u| u.cpu_us),
        rss_kib: usage(0).and_then(|u| u.peak_rss_kib),
        foreign_cores: watched.foreign_cpu_us.map(|us| us / 1e6 / secs),
        first_error,
    })
}

/// One WebSocket client: subscribes, then counts what is pushed to it.
async fn ws_client(
    addr: SocketAddr,
    counts: &Counts,
    stop: &AtomicBool,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let url = format!("ws://{addr}/");
    let (mut ws, _) = timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(&url))
        .await
        .context("WebSocket connect timed out")?
        .context("WebSocket connect")?;
    ws.send(Message::text(subscribe_body()))
        .await
        .context("sending ticks_subscribe")?;
    let own = timeout(STEP_TIMEOUT, async {
        while let Some(msg) = ws.next().await {
            let msg = msg.context("reading the subscribe reply")?;
            if let Message::Text(text) = msg {
                let v: serde_json::Value = serde_json::from_str(text.as_str())?;
                if v.get("id").is_some() {
                    return match v.get("result").and_then(|r| r.as_str()) {
                        Some(id) => Ok(id.to_owned()),
                        None => bail!("ticks_subscribe answered {text}"),
                    };
                }
            }
        }
        bail!("socket closed before the subscribe reply")
    })
    .await
    .context("no subscribe reply in time")??;
    counts.subscribed.fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => counts.message(text.as_bytes(), &own),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                counts.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    Ok(())
}

/// One event-stream client: opens `GET /events?session=K`, subscribes by POST with the
/// session header, then counts the `data:` lines of its stream.
async fn sse_client(
    addr: SocketAddr,
    i: usize,
    counts: &Counts,
    stop: &AtomicBool,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let key = format!("bench-push-{i}");
    let mut stream = timeout(STEP_TIMEOUT, open_stream(addr, &key))
        .await
        .context("opening the event stream timed out")??;
    let reply = timeout(STEP_TIMEOUT, post(addr, &subscribe_body(), Some(&key)))
        .await
        .context("subscribe POST timed out")??;
    let v: serde_json::Value =
        serde_json::from_str(&reply).with_context(|| format!("subscribe reply {reply:?}"))?;
    let own = match v.get("result").and_then(|r| r.as_str()) {
        Some(id) => id.to_owned(),
        None => bail!("ticks_subscribe answered {reply}"),
    };
    counts.subscribed.fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(());
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = match stream.conn.read(&mut buf).await {
            Ok(0) | Err(_) => {
                counts.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(n) => n,
        };
        stream.feed(&buf[..n], |line| {
            // The stream's `rpcgate.open` event names the session; it is no message.
            if let Some(data) = line.strip_prefix(b"data: ")
                && !data.starts_with(br#"{"session":"#)
            {
                counts.message(data, &own);
            }
        })?;
    }
    Ok(())
}

/// An event stream whose response head has been read: the rest is the chunked body.
struct EventStream {
    conn: TcpStream,
    chunks: Chunked,
    /// A line not yet ended.
    line: Vec<u8>,
}

impl EventStream {
    /// Decodes `bytes` of the body and calls `on_line` for each complete line.
    fn feed(&mut self, bytes: &[u8], mut on_line: impl FnMut(&[u8])) -> Result<()> {
        let line = &mut self.line;
        self.chunks.feed(bytes, |data| {
            let mut rest = data;
            while let Some(at) = rest.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&rest[..at]);
                on_line(line);
                line.clear();
                rest = &rest[at + 1..];
            }
            line.extend_from_slice(rest);
        })
    }
}

async fn open_stream(addr: SocketAddr, key: &str) -> Result<EventStream> {
    let mut conn = TcpStream::connect(addr).await.context("connecting")?;
    let req = format!(
        "GET /events?session={key} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut conn).await?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET /events answered {:?}",
            head.lines().next().unwrap_or("")
        );
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("event stream is not chunked: {head:?}");
    }
    let mut stream = EventStream {
        conn,
        chunks: Chunked::default(),
        line: Vec::new(),
    };
    stream.feed(&rest, |_| {})?;
    Ok(stream)
}

/// Reads up to the end of a response head; the head, and what followed it.
async fn read_head(conn: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..at]).into_owned();
            return Ok((head, buf[at + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head over 64 KiB");
        }
        let n = conn.read(&mut tmp).await?;
        if n == 0 {
            bail!("connection closed in the response head");
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// POSTs `body` to `/` on a connection of its own; the response body.
async fn post(addr: SocketAddr, body: &str, session: Option<&str>) -> Result<String> {
    let mut conn = TcpStream::connect(addr).await.context("connecting")?;
    let session = session.map_or(String::new(), |k| format!("rpcgate-session: {k}\r\n"));
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{session}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await?;
    let mut all = Vec::new();
    conn.read_to_end(&mut all).await?;
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    let head = String::from_utf8_lossy(&all[..at]).to_ascii_lowercase();
    let raw = &all[at + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        Chunked::default().feed(raw, |d| out.extend_from_slice(d))?;
        out
    } else {
        raw.to_vec()
    };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 chunked-body decoder fed in arbitrary pieces.
#[derive(Default)]
struct Chunked {
    /// Bytes left in the current chunk's data.
    left: usize,
    /// The CRLF after a chunk's data still to skip.
    crlf: usize,
    /// A size line not yet ended.
    size_line: Vec<u8>,
    done: bool,
}

impl Chunked {
    fn feed(&mut self, mut bytes: &[u8], mut data: impl FnMut(&[u8])) -> Result<()> {
        while !bytes.is_empty() && !self.done {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                data(&bytes[..n]);
                self.left -= n;
                bytes = &bytes[n..];
                if self.left == 0 {
                    self.crlf = 2;
                }
            } else if self.crlf > 0 {
                let n = self.crlf.min(bytes.len());
                self.crlf -= n;
                bytes = &bytes[n..];
            } else {
                match bytes.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        self.size_line.extend_from_slice(&bytes[..at]);
                        bytes = &bytes[at + 1..];
                        let text = String::from_utf8_lossy(&self.size_line);
                        let hex = text.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .with_context(|| format!("chunk size line {text:?}"))?;
                        self.size_line.clear();
                        if size == 0 {
                            self.done = true;
                        }
                        self.left = size;
                    }
                    None => {
                        self.size_line.extend_from_slice(bytes);
                        if self.size_line.len() > 1024 {
                            bail!("chunk size line over 1 KiB");
                        }
                        bytes = &[];
                    }
                }
            }
        }
        Ok(())
    }
}

/// Opens `n` event streams of distinct sessions, none subscribed, and reads the
/// gateway's RSS before and with them open.
async fn idle_streams(addr: SocketAddr, pid: u32, n: usize) -> Result<IdleRow> {
    tokio::time::sleep(SETTLE).await;
    let before_kib = procs::status_kib(pid, "VmRSS").ok();
    let started = Instant::now();
    let deadline = started + SETUP_BUDGET;
    let mut open = Vec::with_capacity(n);
    let mut first_error = None;
    let mut failed = 0usize;
    let mut batch_secs = Vec::new();
    'batches: for batch in (0..n).collect::<Vec<_>>().chunks(BATCH * 2) {
        let batch_start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for &i in batch {
            set.spawn(async move {
                timeout(STEP_TIMEOUT, open_stream(addr, &format!("bench-idle-{i}")))
                    .await
                    .context("timed out")?
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => open.push(s.conn),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        batch_secs.push(batch_start.elapsed().as_secs_f64());
        if Instant::now() >= deadline || failed > 100 {
            break 'batches;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_kib = procs::status_kib(pid, "VmRSS").ok();
    let fds = procs::open_fds(pid).ok();
    let opened = open.len();
    drop(open);
    let tenth = (batch_secs.len() / 10).max(1);
    let first_tenth: f64 = batch_secs.iter().take(tenth).sum();
    let last_tenth: f64 = batch_secs.iter().rev().take(tenth).sum();
    Ok(IdleRow {
        first_tenth,
        last_tenth,
        streams: n,
        opened,
        before_kib,
        with_kib,
        fds,
        connect_secs,
        first_error,
    })
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn report(rows: &[Row], idle: &IdleRow, settings: &Settings, nofile: Option<u64>) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let _ = writeln!(md, "# rpcgate push path\n");
    let _ = writeln!(
        md,
        "Gateway: `rpcgate --listen 127.0.0.1:0 --upstream ws://ECHO/ --admin-listen off --subscription substrate` (plus `--connections N` where a row says so), no RUST_LOG, stderr piped and drained. \
         Each subscriber: `ticks_subscribe [{INTERVAL_MS}]` (10 ticks/s expected). Window {:.0} s after {:.0} s warmup. \
         CPU and RSS from /proc of the gateway process; `other work` is CPU the rest of the machine used in the window (not this bench, the gateway or the echo backend).\n",
        settings.secs.as_secs_f64(),
        WARMUP.as_secs_f64(),
    );
    let _ = writeln!(
        md,
        "| row | subscribed / clients | ticks/s delivered | % of expected | gateway CPU µs/tick | echo CPU µs/tick | gateway peak RSS MiB | mismatched ids | other msgs | closed | other work (cores) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} / {} | {:.0} | {:.1}% | {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            r.subscribed,
            r.clients,
            r.per_sec(),
            r.delivered_share() * 100.0,
            r.cpu_per_msg().map_or("n/a".into(), |c| format!("{c:.2}")),
            r.echo_cpu_us.map_or("n/a".into(), |c| format!(
                "{:.2}",
                c / r.ticks.max(1) as f64
            )),
            mib(r.rss_kib),
            r.mismatched,
            r.other,
            r.closed,
            r.foreign_cores.map_or("n/a".into(), |c| format!("{c:.2}")),
        );
    }
    for pair in rows.chunks(2) {
        if let [a, b] = pair
            && let (Some(x), Some(y)) = (a.cpu_per_msg(), b.cpu_per_msg())
        {
            let _ = writeln!(
                md,
                "\nEvent stream / WebSocket gateway CPU per tick ({} subscribed): {:.2}×",
                a.subscribed.min(b.subscribed),
                y / x
            );
        }
    }
    for r in rows {
        if r.failed > 0 {
            let _ = writeln!(
                md,
                "\n{}: {} clients failed to set up; first: {}",
                r.what,
                r.failed,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| idle event streams | opened | gateway RSS before MiB | with streams MiB | per stream KiB | gateway fds | connect time s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let per = match (idle.before_kib, idle.with_kib) {
        (Some(b), Some(w)) if idle.opened > 0 => {
            format!("{:.2}", w.saturating_sub(b) as f64 / idle.opened as f64)
        }
        _ => "n/a".into(),
    };
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {per} | {} | {:.1} |",
        idle.streams,
        idle.opened,
        mib(idle.before_kib),
        mib(idle.with_kib),
        idle.fds.map_or("n/a".into(), |f| f.to_string()),
        idle.connect_secs,
    );
    let _ = writeln!(
        md,
        "\nConnect time of the idle streams: first tenth of the batches {:.2} s, last tenth {:.2} s ({:.1}×).",
        idle.first_tenth,
        idle.last_tenth,
        idle.last_tenth / idle.first_tenth.max(1e-9)
    );
    if let Some(e) = &idle.first_error {
        let _ = writeln!(md, "\nIdle streams: first failure: {e}");
    }
    if let Some(n) = nofile {
        let _ = writeln!(md, "\nRLIMIT_NOFILE (bench and gateway): {n}");
    }
    md
}
