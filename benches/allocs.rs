//! Heap allocations per call on the gateway's thread: the count the per-call cost
//! work (issue 13) keeps a small constant.
//!
//! The gateway runs in this process on a current-thread runtime of its own thread,
//! with the shipped defaults (access log on, written by its own thread); the demo
//! backend and the client run on other threads. A counting global allocator keeps one
//! count per thread, so only what the gateway's thread allocates is counted: the HTTP
//! connection, the tower stack, parsing, dispatch, the upstream socket tasks, the
//! answer. The access log's writer thread and the backend are not.
//!
//! Run with `cargo bench --bench allocs`. Counts are deterministic up to the batching
//! of the upstream socket (several calls' frames in one write), so each row sends its
//! calls one at a time, waiting for each answer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Set while this thread's allocations are being traced; and while a trace is
    /// taken, so that the trace's own allocations are not traced.
    static TRACING: Cell<bool> = const { Cell::new(false) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    if TRACING.try_with(Cell::get).unwrap_or(false) && !IN_TRACE.try_with(Cell::get).unwrap_or(true)
    {
        IN_TRACE.with(|t| t.set(true));
        // `RPCGATE_ALLOCS_TRACE=1`: where each allocation of one call comes from, the
        // frames of this workspace and the crates it calls, innermost first.
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let frames: Vec<&str> = trace
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(": ") && !l.starts_with("at "))
            .filter_map(|l| l.split_once(": ").map(|(_, f)| f))
            .filter(|f| {
                ![
                    "count",
                    "alloc",
                    "realloc",
                    "__rust_alloc",
                    "__rust_realloc",
                    "alloc_zeroed",
                ]
                .contains(f)
                    && !f.starts_with("std::backtrace")
            })
            .take(8)
            .collect();
        eprintln!("alloc: {}", frames.join(" < "));
        IN_TRACE.with(|t| t.set(false));
    }
}

// SAFETY: every call is passed to the system allocator unchanged; the count is a
// const-initialized thread-local with no destructor, so touching it never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A runtime on a thread of its own, as `rpcgate` runs with `workers = 1`.
fn runtime_thread(name: &str) -> tokio::runtime::Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            tx.send(rt.handle().clone()).expect("send the handle");
            rt.block_on(std::future::pending::<()>());
        })
        .expect("spawn a thread");
    rx.recv().expect("the runtime's handle")
}

/// Allocations the gateway's thread has made so far.
async fn gateway_allocations(gateway: &tokio::runtime::Handle) -> u64 {
    gateway
        .spawn(async { ALLOCATIONS.with(Cell::get) })
        .await
        .expect("the count")
}

/// One HTTP/1.1 keep-alive connection that sends `body` and reads one whole answer.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn call(&mut self, request: &[u8]) {
        self.stream.write_all(request).await.expect("write");
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the gateway closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).expect("a text head");
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if self.buf.len() >= end + 4 + len {
                    return;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn post(body: &str, headers: &str) -> Vec<u8> {
    format!(
        "POST / HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A gateway with `adjust`ed defaults in front of the demo backend.
async fn gateway(
    echo: SocketAddr,
    adjust: impl FnOnce(&mut rpcgate::Config),
) -> (SocketAddr, tokio::runtime::Handle, CancellationToken) {
    let handle = runtime_thread("gateway");
    let mut config = rpcgate::Config {
        upstreams: vec![rpcgate::config::UpstreamConfig::new(format!("ws://{echo}"))],
        ..rpcgate::Config::default()
    };
    config.admin_listen = rpcgate::config::AdminListen::Off;
    config.shutdown.delay = Duration::ZERO;
    adjust(&mut config);
    let stop = CancellationToken::new();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let run = stop.clone();
    handle.spawn(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gateway = rpcgate::Gateway::from_listener(listener, config).expect("gateway");
        let upstreams = gateway.upstreams();
        let served = tokio::spawn(gateway.run(run));
        upstreams.wait_for_open(4).await;
        let _ = addr_tx.send(addr);
        let _ = served.await;
    });
    let addr = addr_rx.await.expect("the gateway's address");
    (addr, handle, stop)
}

const CALLS: u64 = 2000;

async fn row(label: &str, gw: SocketAddr, handle: &tokio::runtime::Handle, request: &[u8]) {
    let stream = TcpStream::connect(gw).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut client = Client {
        stream,
        buf: Vec::new(),
    };
    // Warm up: the connection's buffers, the pending map, the socket's write buffer.
    for _ in 0..200 {
        client.call(request).await;
    }
    let before = gateway_allocations(handle).await;
    for _ in 0..CALLS {
        client.call(request).await;
    }
    let after = gateway_allocations(handle).await;
    if std::env::var_os("RPCGATE_ALLOCS_TRACE").is_some() {
        handle
            .spawn(async { TRACING.with(|t| t.set(true)) })
            .await
            .expect("trace on");
        client.call(request).await;
        handle
            .spawn(async { TRACING.with(|t| t.set(false)) })
            .await
            .expect("trace off");
    }
    // The two counting tasks allocate too; a handful, spread over every call.
    let per_call = (after - before) as f64 / CALLS as f64;
    println!("| {label} | {per_call:.1} |");
}

fn main() {
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    client.block_on(async {
        let backend = runtime_thread("backend");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let echo = listener.local_addr().expect("addr");
        let backend_stop = CancellationToken::new();
        let stop = backend_stop.clone();
        backend.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("a tokio listener");
            let _ = rpcgate_echo::serve(listener, Arc::from("echo"), stop).await;
        });

        println!("| row | allocations per call on the gateway's thread |");
        println!("|---|---:|");
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":["hello"]}"#;
        let batch: String = format!(
            "[{}]",
            (0..10)
                .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"echo","params":[{i}]}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );

        let (gw, handle, stop) = gateway(echo, |_| {}).await;
        row(
            "single call, shipped defaults",
            gw,
            &handle,
            &post(call, ""),
        )
        .await;
        row("batch of 10 (per request)", gw, &handle, &post(&batch, "")).await;
        stop.cancel();

        let (gw, handle, stop) = gateway(echo, |c| c.log.access_log = false).await;
        row("single call, access log off", gw, &handle, &post(call, "")).await;
        stop.cancel();

        let key = "bench-key";
        let (gw, handle, stop) = gateway(echo, |c| {
            c.auth.keys = vec![rpcgate::config::KeyConfig {
                name: "bench".into(),
                sha256: rpcgate::config::parse_key_hash(&rpcgate::config::key_hash(key))
                    .expect("a hash"),
                methods: Default::default(),
            }];
            c.auth.methods.deny = vec!["admin_*".into()];
            c.rate_limits = vec![rpcgate::config::RateLimitConfig {
                name: "per-address".into(),
                scope: rpcgate::config::RateScope::Address,
                rate: u32::MAX,
                per: Duration::from_secs(1),
                burst: u32::MAX,
                method: None,
                costs: Vec::new(),
            }];
        })
        .await;
        let auth = format!("authorization: Bearer {key}\r\n");
        row(
            "single call, a key, a deny list, a rate limit",
            gw,
            &handle,
            &post(call, &auth),
        )
        .await;
        stop.cancel();
        backend_stop.cancel();
    });
}
