//! The `rpcgate` command: run the gateway, check a config, or run the demo backend.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use rpcgate::config::{
    AdminListen, Affinity, Config, DiscoveryMode, LogFormat, SubscriptionRule, TlsConfig,
    UpstreamConfig, parse_duration,
};
use rpcgate::server::{TlsReloader, Workers};
use rpcgate::{Gateway, logging};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[path = "cli/demo.rs"]
mod demo;

/// HTTP JSON-RPC 2.0 gateway to WebSocket-only JSON-RPC services.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// Flags of the gateway itself; each overrides the config file.
#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Address to serve HTTP on, e.g. 0.0.0.0:8080.
    #[arg(long, env = "RPCGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Upstream WebSocket URL (ws:// or wss://); repeat for several. Replaces the file's list.
    #[arg(long = "upstream", env = "RPCGATE_UPSTREAM", value_delimiter = ',')]
    upstreams: Vec<String>,
    /// Persistent connections per upstream.
    #[arg(long, env = "RPCGATE_CONNECTIONS")]
    connections: Option<usize>,
    /// Deadline of each call, e.g. 30s or 250ms.
    #[arg(long, env = "RPCGATE_REQUEST_TIMEOUT", value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// TOML config file (see deploy/rpcgate.toml).
    #[arg(long, env = "RPCGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Stickiness: none, upstream (a session stays on one upstream) or connection (a
    /// session gets its own upstream WebSocket).
    #[arg(long, env = "RPCGATE_AFFINITY")]
    affinity: Option<Affinity>,
    /// Request header carrying the session key.
    #[arg(long, env = "RPCGATE_SESSION_HEADER")]
    session_header: Option<String>,
    /// A method safe to send again after its connection died mid-call; repeat for several.
    #[arg(
        long = "retry-method",
        env = "RPCGATE_RETRY_METHODS",
        value_delimiter = ','
    )]
    retry_methods: Vec<String>,
    /// A method whose successful calls are replayed when a session reconnects; repeat.
    #[arg(
        long = "replay-method",
        env = "RPCGATE_REPLAY_METHODS",
        value_delimiter = ','
    )]
    replay_methods: Vec<String>,
    /// Where upstream addresses come from: static (the URLs) or dns (every address of each URL's host).
    #[arg(long, env = "RPCGATE_DISCOVERY")]
    discovery: Option<DiscoveryMode>,
    /// Runtime worker threads: 1 = single-threaded (lowest latency and CPU per call),
    /// 0 = one per CPU.
    #[arg(long, env = "RPCGATE_WORKERS")]
    workers: Option<usize>,
    /// Admin listener for /metrics, /healthz and /readyz (`off` disables it). Unset:
    /// 127.0.0.1:9464, or a free loopback port if that is taken.
    #[arg(long, env = "RPCGATE_ADMIN_LISTEN")]
    admin_listen: Option<AdminListen>,
    /// Log format: text or json.
    #[arg(long, env = "RPCGATE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// After SIGTERM, keep serving (not ready) this long before closing the listener.
    #[arg(long, env = "RPCGATE_SHUTDOWN_DELAY", value_parser = parse_duration)]
    shutdown_delay: Option<Duration>,
    /// After the listener closes, how long open requests get to finish.
    #[arg(long, env = "RPCGATE_DRAIN_TIMEOUT", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// A web origin browsers may call from (`https://app.example.com`, or `*`); repeat.
    #[arg(
        long = "cors-origin",
        env = "RPCGATE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// WebSocket clients on the JSON-RPC path: on or off.
    #[arg(long, env = "RPCGATE_WEBSOCKET", value_parser = on_off)]
    websocket: Option<bool>,
    /// Subscriptions to track on shared connections: a preset (ethereum, substrate) or
    /// SUBSCRIBE,UNSUBSCRIBE[,NOTIFICATION]; repeat for several.
    #[arg(
        long = "subscription",
        env = "RPCGATE_SUBSCRIPTIONS",
        value_delimiter = ';'
    )]
    subscriptions: Vec<SubscriptionRule>,
    /// Open connections one client address (an IPv6 /64) may have; past it, 429.
    /// 0: no limit.
    #[arg(long, env = "RPCGATE_MAX_CONNECTIONS_PER_ADDRESS")]
    max_connections_per_address: Option<usize>,
    /// Serve TLS with this PEM certificate chain (with --tls-key); replaces tls.cert.
    #[arg(long, env = "RPCGATE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert; replaces tls.key.
    #[arg(long, env = "RPCGATE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Ask clients for certificates signed by these PEM CAs (mTLS); replaces tls.client_ca.
    #[arg(long, env = "RPCGATE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
}

fn on_off(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{value:?}: expected on or off")),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and print every problem; exit 1 if there are any.
    CheckConfig { file: PathBuf },
    /// Serve a small JSON-RPC backend over WebSocket (echo, sum, sleep, whoami, fail, notify).
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        #[arg(long, default_value = "echo")]
        name: String,
        /// Runtime worker threads; 1 = single-threaded, 0 = one per CPU.
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Print the hash of an API key for `[[auth.keys]] hash`: the key is read from
    /// stdin (never an argument, which shell history and `ps` would keep).
    HashKey {
        /// Make up a new key instead (256 random bits), and print it, then its hash.
        #[arg(long)]
        generate: bool,
    },
    /// Run an echo backend and the gateway in front of it, and print a curl line to try.
    Demo {
        /// Gateway address; port 8080 if free, else any free port.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Echo backend address; any free port by default.
        #[arg(long, default_value = "127.0.0.1:0")]
        upstream_listen: SocketAddr,
        /// A WAMP router's WebSocket URL (`ws://127.0.0.1:8080/ws`): a second gateway
        /// fronts it, on port 8081 if free.
        #[arg(long)]
        wamp: Option<String>,
        /// The realm the WAMP gateway's sessions join.
        #[arg(long, default_value = "realm1", requires = "wamp")]
        wamp_realm: String,
        /// Put before method names to make procedure URIs (`com.example.`).
        #[arg(long, default_value = "", requires = "wamp")]
        wamp_prefix: String,
        /// The WAMP gateway's address.
        #[arg(long, requires = "wamp")]
        wamp_listen: Option<SocketAddr>,
    },
}

/// A failure to start is the operator's to fix: one line saying what and why, the
/// causes chained once, and no backtrace even with `RUST_BACKTRACE` set (anyhow's
/// `Debug` output would print one, and the cause twice).
fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rpcgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> Result<()> {
    let cli = Cli::parse();
    // Each arm holds the log guard until it returns, so the lines still queued are
    // written before the process exits.
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let _logs = logging::init(LogFormat::Text, "info");
            check_config(&file)
        }
        Some(Command::EchoServer {
            listen,
            name,
            workers,
        }) => {
            let _logs = logging::init(LogFormat::Text, "info");
            runtime(workers)?.block_on(echo_server(listen, name))
        }
        Some(Command::HashKey { generate }) => hash_key(generate),
        Some(Command::Demo {
            listen,
            upstream_listen,
            wamp,
            wamp_realm,
            wamp_prefix,
            wamp_listen,
        }) => {
            let _logs = logging::init(LogFormat::Text, "info");
            let wamp = wamp.map(|url| demo::WampDemo {
                url,
                realm: wamp_realm,
                prefix: wamp_prefix,
                listen: wamp_listen,
            });
            runtime(0)?.block_on(demo::demo(listen, upstream_listen, wamp))
        }
        None => {
            let format = cli.run.log_format;
            let config = build_config(cli.run)?;
            let _logs = logging::init(format.unwrap_or(config.log.format), &config.log.level);
            serve(config)
        }
    }
}

/// `rpcgate hash-key`: what an operator puts in `[[auth.keys]] hash`.
fn hash_key(generate: bool) -> Result<()> {
    let key = if generate {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
        use base64::Engine as _;
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        println!("{key}");
        key
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the key from stdin")?;
        // Only the line break: a key's other characters are all part of it.
        let key = line.strip_suffix('\n').unwrap_or(&line);
        let key = key.strip_suffix('\r').unwrap_or(key).to_string();
        if key.is_empty() {
            bail!("no key on stdin: `echo -n KEY | rpcgate hash-key`, or --generate for a new one");
        }
        key
    };
    println!("{}", rpcgate::config::key_hash(&key));
    Ok(())
}

/// The gateway's workers each run tokio's current-thread scheduler: every wakeup
/// between an HTTP request and its upstream connection stays on one thread. One
/// worker runs on this thread; more run shared-nothing on their own
/// (`rpcgate::server::Workers`), with this thread watching signals.
fn serve(config: Config) -> Result<()> {
    let count = rpcgate::server::worker_count(config.runtime.workers);
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if count == 1 {
        main.block_on(run(config))
    } else {
        main.block_on(run_workers(config, count))
    }
}

/// The echo server and the demo: the work-stealing scheduler, `workers` threads (0:
/// one per CPU); 1 runs tokio's current-thread scheduler.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn check_config(file: &std::path::Path) -> Result<()> {
    match Config::load(file) {
        Ok(config) => {
            println!(
                "{}: ok ({} upstream(s), listening on {}, admin {})",
                file.display(),
                config.upstreams.len(),
                config.listen,
                config.admin_listen
            );
            Ok(())
        }
        Err(problems) => {
            eprintln!("{}: {problems}", file.display());
            std::process::exit(1);
        }
    }
}

/// File (if any), then flags and environment on top, then validation.
fn build_config(args: RunArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|p| anyhow::anyhow!("{}: {p}", path.display()))?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if !args.upstreams.is_empty() {
        config.upstreams = args
            .upstreams
            .iter()
            .map(|u| UpstreamConfig::new(u.trim()))
            .collect();
    }
    if let Some(n) = args.connections {
        for up in &mut config.upstreams {
            up.connections = n;
        }
    }
    if let Some(t) = args.request_timeout {
        config.calls.request_timeout = t;
    }
    if let Some(a) = args.affinity {
        config.sessions.affinity = a;
    }
    if let Some(h) = args.session_header {
        config.sessions.header = h;
    }
    if !args.retry_methods.is_empty() {
        config.balance.retry_methods = args.retry_methods;
    }
    if !args.replay_methods.is_empty() {
        config.sessions.replay_methods = args.replay_methods;
    }
    if let Some(d) = args.discovery {
        config.discovery.mode = d;
    }
    if let Some(w) = args.workers {
        config.runtime.workers = w;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = admin;
    }
    if let Some(f) = args.log_format {
        config.log.format = f;
    }
    if let Some(d) = args.shutdown_delay {
        config.shutdown.delay = d;
    }
    if let Some(d) = args.drain_timeout {
        config.shutdown.drain_timeout = d;
    }
    if !args.cors_origins.is_empty() {
        config.cors.allowed_origins = args.cors_origins;
    }
    if let Some(on) = args.websocket {
        config.http.websocket = on;
    }
    if !args.subscriptions.is_empty() {
        config.subscriptions = args.subscriptions;
    }
    if let Some(n) = args.max_connections_per_address {
        config.http.max_connections_per_address = n;
    }
    if args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_client_ca.is_some() {
        // Flags fill in or replace what the file's [tls] says; the check below
        // reports a certificate without its key.
        let tls = config.tls.get_or_insert_with(TlsConfig::default);
        if let Some(cert) = args.tls_cert {
            tls.cert = cert;
        }
        if let Some(key) = args.tls_key {
            tls.key = key;
        }
        if let Some(ca) = args.tls_client_ca {
            tls.client_ca = Some(ca);
        }
    }
    let problems = config.check();
    if !problems.is_empty() {
        bail!("{}", rpcgate::config::Problems(problems));
    }
    Ok(config)
}

async fn run(config: Config) -> Result<()> {
    // Before anything is served, so a signal never meets its default action.
    let shutdown = CancellationToken::new();
    let hangup = Arc::new(Notify::new());
    watch_signals(shutdown.clone(), Some(hangup.clone()))?;
    let gateway = Gateway::bind(config.clone()).await?;
    reload_on_hangup(hangup, gateway.tls_reloader());
    announce(&config, gateway.local_addr()?, gateway.admin_addr(), 1);
    gateway.run(shutdown).await;
    tracing::info!("rpcgate stopped");
    Ok(())
}

/// `runtime.workers` > 1: the workers serve on their threads until a signal stops
/// them; this one handles the signals.
async fn run_workers(config: Config, count: usize) -> Result<()> {
    let shutdown = CancellationToken::new();
    let hangup = Arc::new(Notify::new());
    watch_signals(shutdown.clone(), Some(hangup.clone()))?;
    let workers = Workers::start(config.clone(), count, shutdown)?;
    reload_on_hangup(hangup, workers.tls_reloader());
    announce(&config, workers.local_addr(), workers.admin_addr(), count);
    tokio::task::spawn_blocking(move || workers.join())
        .await
        .context("waiting for the workers")?;
    tracing::info!("rpcgate stopped");
    Ok(())
}

/// SIGHUP reloads the TLS certificate, when there is one.
fn reload_on_hangup(hangup: Arc<Notify>, reloader: Option<TlsReloader>) {
    tokio::spawn(async move {
        loop {
            hangup.notified().await;
            match &reloader {
                Some(tls) => {
                    tracing::info!("SIGHUP: reloading the TLS certificate files");
                    tls.reload().await;
                }
                None => tracing::info!(
                    "SIGHUP: nothing to reload without [tls]; ignored (restart to apply a new config)"
                ),
            }
        }
    });
}

/// The addresses being served, in the log and as stable stdout lines for scripts and
/// harnesses that bind port 0.
fn announce(config: &Config, addr: SocketAddr, admin: Option<SocketAddr>, workers: usize) {
    if let Some(admin) = admin {
        tracing::info!(%admin, "admin listener: /metrics /healthz /readyz");
        println!("rpcgate admin on http://{admin}/");
    }
    tracing::info!(listen = %addr, upstreams = config.upstreams.len(), workers, "rpcgate serving");
    println!("rpcgate listening on http://{addr}{}", config.http.path);
}

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once. SIGHUP never stops the
/// process (its default action would kill it mid-call): it wakes `hangup`, which
/// reloads the TLS certificate; without one (`None`) it is logged and ignored.
///
/// Called before serving: the handlers are installed by the time it returns, so no
/// signal can meet its default action once rpcgate is up.
fn watch_signals(shutdown: CancellationToken, hangup: Option<Arc<Notify>>) -> Result<()> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    tokio::spawn(async move {
        loop {
            match signals.next().await {
                Some(Received::Stop) if shutdown.is_cancelled() => {
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(1);
                }
                Some(Received::Stop) => {
                    tracing::info!("shutdown requested; draining (signal again to exit at once)");
                    shutdown.cancel();
                }
                // A permit is stored if the reloader is busy: a SIGHUP during a
                // reload still gets one more.
                Some(Received::Hangup) => match &hangup {
                    Some(hangup) => hangup.notify_one(),
                    None => tracing::info!("SIGHUP: nothing to reload; ignored"),
                },
                None => return,
            }
        }
    });
    Ok(())
}

enum Received {
    /// SIGTERM or SIGINT (Ctrl-C).
    Stop,
    Hangup,
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Option<Received> {
        tokio::select! {
            s = self.term.recv() => s.map(|()| Received::Stop),
            s = self.int.recv() => s.map(|()| Received::Stop),
            s = self.hup.recv() => s.map(|()| Received::Hangup),
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Option<Received> {
        tokio::signal::ctrl_c().await.ok().map(|()| Received::Stop)
    }
}

async fn echo_server(listen: SocketAddr, name: String) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, %name, "echo server ready");
    println!("echo-server listening on ws://{addr}/");
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), None)?;
    rpcgate_echo::serve(listener, Arc::from(name), shutdown).await?;
    Ok(())
}
