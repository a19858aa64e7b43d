//! The settings themselves and their defaults. Every default lives here, so the
//! TOML reader, the flags and tests all start from the same `Config::default()`.

use super::{
    AdminListen, Affinity, AuthConfig, BatchMode, CorsConfig, DiscoveryMode, LogFormat, PushConfig,
    RateLimitConfig, SubscriptionRule, TlsConfig, WhenFull,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything rpcgate needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the JSON-RPC HTTP listener binds.
    pub listen: SocketAddr,
    /// The client-facing HTTP side: path, size limits, client timeouts.
    pub http: HttpConfig,
    /// Deadlines of one call.
    pub calls: CallConfig,
    /// Settings shared by every upstream WebSocket connection.
    pub websocket: WebSocketConfig,
    /// The upstream services, in file (or `--upstream`) order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Where upstream addresses come from.
    pub discovery: DiscoveryConfig,
    /// Failover and health checks.
    pub balance: BalanceConfig,
    /// Sticky sessions.
    pub sessions: SessionConfig,
    /// Calls run on every new upstream connection before it carries traffic.
    pub on_connect: Vec<PreludeCall>,
    /// The async runtime's shape.
    pub runtime: RuntimeConfig,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), and whether its address
    /// was chosen by the operator (see [`AdminListen`]).
    pub admin_listen: AdminListen,
    /// How a SIGTERM is handled.
    pub shutdown: ShutdownConfig,
    /// Log format, filter and access log.
    pub log: LogConfig,
    /// Method names that get their own `method` label value in metrics.
    pub metric_methods: Vec<String>,
    /// The memory budget: bytes held for clients.
    pub limits: LimitsConfig,
    /// Session buffers, event streams and their limits.
    pub push: PushConfig,
    /// Calls that open and close subscriptions on shared connections.
    pub subscriptions: Vec<SubscriptionRule>,
    /// Which web origins browsers may call from.
    pub cors: CorsConfig,
    /// Who may call, and which methods.
    pub auth: AuthConfig,
    /// How often callers may call.
    pub rate_limits: Vec<RateLimitConfig>,
    /// TLS on the listener; `None`: plain HTTP (and h2c).
    pub tls: Option<TlsConfig>,
    /// The methods that stand for WAMP's PubSub.
    pub wamp: super::WampConfig,
}

/// The memory budget (see `budget.rs`): bytes of request bodies, answers and queued
/// frames that clients can make rpcgate hold.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Bytes held for all clients together; `None`: a quarter of the cgroup memory
    /// limit, or 256 MiB without one.
    pub memory: Option<usize>,
    /// Bytes held for one client connection (its bodies and unsent answers).
    pub connection_bytes: usize,
    /// Bytes of frames waiting for one upstream socket; past it, the upstream is not
    /// reading and new calls get 503 at once.
    pub upstream_queue_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            memory: None,
            connection_bytes: 16 * 1024 * 1024,
            upstream_queue_bytes: 16 * 1024 * 1024,
        }
    }
}

impl LimitsConfig {
    /// The gateway budget in force: `memory`, or its default for this machine.
    pub fn memory_bytes(&self) -> usize {
        self.memory
            .unwrap_or_else(crate::budget::default_memory_limit)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http: HttpConfig::default(),
            calls: CallConfig::default(),
            websocket: WebSocketConfig::default(),
            upstreams: Vec::new(),
            discovery: DiscoveryConfig::default(),
            balance: BalanceConfig::default(),
            sessions: SessionConfig::default(),
            on_connect: Vec::new(),
            runtime: RuntimeConfig::default(),
            admin_listen: AdminListen::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            metric_methods: Vec::new(),
            limits: LimitsConfig::default(),
            push: PushConfig::default(),
            subscriptions: Vec::new(),
            cors: CorsConfig::default(),
            auth: AuthConfig::default(),
            rate_limits: Vec::new(),
            tls: None,
            wamp: super::WampConfig::default(),
        }
    }
}

/// The client-facing HTTP side.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Path JSON-RPC is served on; other paths get 404.
    pub path: String,
    /// Largest request body; a larger one gets 413 before anything goes upstream.
    pub max_body_bytes: usize,
    /// Most elements in one batch; a bigger batch gets 400.
    pub max_batch_size: usize,
    /// How a batch travels upstream.
    pub batch: BatchMode,
    /// A client must send its complete request head within this time.
    pub header_read_timeout: Duration,
    /// A client must send its complete body within this time.
    pub body_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this time.
    pub keep_alive_timeout: Duration,
    /// Open client connections at most; past it a connection is answered 503 and closed.
    pub max_connections: usize,
    /// Open client connections from one address (IPv4) or /64 (IPv6) at most; past
    /// it a connection is answered 429 and closed. 0: no limit, because behind a load
    /// balancer or a NAT every connection comes from one address.
    pub max_connections_per_address: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_streams: u32,
    /// A connection whose socket writes make no progress this long (a client that
    /// stopped reading) is dropped, and so is a graceful close that takes longer.
    pub write_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Bytes of answer HTTP/2 buffers per stream ahead of the client's window.
    pub http2_send_buffer_bytes: usize,
    /// The HTTP/2 receive window of each stream: request body bytes a client may send
    /// ahead of our reading.
    pub http2_stream_window_bytes: usize,
    /// The same, for all streams of one connection together.
    pub http2_connection_window_bytes: usize,
    /// Whether the JSON-RPC path also takes WebSocket upgrades.
    pub websocket: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            path: "/".into(),
            max_body_bytes: 1024 * 1024,
            max_batch_size: 100,
            batch: BatchMode::Split,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(60),
            max_connections: 20_000,
            max_connections_per_address: 0,
            http2_max_streams: 256,
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            http2_send_buffer_bytes: 64 * 1024,
            http2_stream_window_bytes: 256 * 1024,
            http2_connection_window_bytes: 1024 * 1024,
            websocket: true,
        }
    }
}

/// Deadlines of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallConfig {
    /// From the moment the request is read to the reply.
    pub request_timeout: Duration,
    /// How long a call waits for an upstream connection to open (capped by its deadline).
    pub connect_wait: Duration,
    /// How long a call waits for a free in-flight slot when all connections are full.
    pub queue_timeout: Duration,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            request_timeout: Duration::from_secs(30),
            connect_wait: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// Settings shared by every upstream WebSocket connection.
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketConfig {
    /// How often each connection is pinged to check it is alive.
    pub ping_interval: Duration,
    /// A connection with no pong within this time is dead and reopened.
    pub pong_timeout: Duration,
    /// TCP connect + TLS + WebSocket handshake.
    pub handshake_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max`, with jitter.
    pub reconnect_base: Duration,
    /// Ceiling of the reconnect delay.
    pub reconnect_max: Duration,
    /// Largest message accepted from an upstream.
    pub max_message_bytes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            reconnect_base: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One upstream service.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `ws://` or `wss://` URL. May carry credentials (`user:password@`, a query
    /// key); it is never shown as written (see [`UpstreamConfig::name`]).
    pub url: String,
    /// What logs, the access log and metric labels call it; `None`: the URL without
    /// its credentials (see `redact.rs`).
    pub name: Option<String>,
    /// Persistent connections opened to this upstream.
    pub connections: usize,
    /// Calls in flight per connection at most.
    pub max_in_flight: usize,
    /// Extra handshake headers, e.g. `Authorization`; `${VAR}` expands from the environment.
    pub headers: Vec<(String, String)>,
    /// `Sec-WebSocket-Protocol` to request.
    pub subprotocol: Option<String>,
    /// PEM file with extra CA certificates trusted for this upstream, besides webpki roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a `wss://` upstream that asks for one (mTLS).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Share of plain calls and of sessions relative to the other upstreams.
    pub weight: u32,
    /// What it speaks: JSON-RPC, or WAMP through a router.
    pub protocol: super::Protocol,
    /// WAMP only: the realm each connection's session joins.
    pub realm: Option<String>,
    /// WAMP only: put before a method name to make its procedure URI.
    pub procedure_prefix: String,
    /// WAMP only: how the session authenticates; `None`: anonymously.
    pub wamp_auth: Option<super::WampAuth>,
}

impl UpstreamConfig {
    /// The name it is shown by: `name`, or the URL without credentials.
    pub fn shown_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => super::redact_url(&self.url),
        }
    }

    /// An upstream at `url` with default settings.
    pub fn new(url: impl Into<String>) -> Self {
        UpstreamConfig {
            url: url.into(),
            name: None,
            connections: 4,
            max_in_flight: 1024,
            headers: Vec::new(),
            subprotocol: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            weight: 1,
            protocol: super::Protocol::JsonRpc,
            realm: None,
            procedure_prefix: String::new(),
            wamp_auth: None,
        }
    }
}

/// Where upstream addresses come from.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// One upstream per URL, or one per address its host resolves to.
    pub mode: DiscoveryMode,
    /// How often `dns` mode re-resolves each upstream's host name.
    pub resolve_interval: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            mode: DiscoveryMode::Static,
            resolve_interval: Duration::from_secs(10),
        }
    }
}

/// Failover and health.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// Methods safe to send again after a connection died with the call in flight.
    pub retry_methods: Vec<String>,
    /// A cheap method called periodically on each upstream; failing takes it out.
    pub health_method: Option<String>,
    /// Raw JSON params for `health_method`.
    pub health_params: Option<String>,
    /// Time between two health calls on one upstream.
    pub health_interval: Duration,
    /// A health call not answered within this time has failed.
    pub health_timeout: Duration,
    /// Calls waiting for a connection or a slot at most; past it, 503 at once.
    pub max_waiting: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            retry_methods: Vec::new(),
            health_method: None,
            health_params: None,
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(2),
            max_waiting: 10_000,
        }
    }
}

/// Sticky sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// What a session sticks to, if anything.
    pub affinity: Affinity,
    /// Request header carrying the session key.
    pub header: String,
    /// Cookie carrying the session key.
    pub cookie: String,
    /// Give clients without a key a new random one in a cookie.
    pub issue_cookie: bool,
    /// A `connection` session unused this long is closed.
    pub idle_timeout: Duration,
    /// `connection` sessions open at most; each holds one upstream socket.
    pub max_sessions: usize,
    /// What a new session gets while `max_sessions` are open.
    pub when_full: WhenFull,
    /// `connection` sessions one client address may hold open at once, so that one
    /// client cannot take every upstream socket `max_sessions` allows.
    pub max_per_client: usize,
    /// `connection` sessions one client address may open per minute (the burst is the
    /// same size): a client cycling through keys cannot churn upstream sockets.
    pub new_per_client_per_minute: usize,
    /// Header whose right-most address is the client's, for a gateway behind a proxy
    /// that appends to it (`x-forwarded-for`); unset, the TCP peer is the client.
    pub client_ip_header: Option<String>,
    /// Methods whose successful calls are recorded and replayed on reconnect.
    pub replay_methods: Vec<String>,
    /// Recorded calls kept per session at most (the oldest go first).
    pub max_replay: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            affinity: Affinity::None,
            header: "rpcgate-session".into(),
            cookie: "rpcgate_session".into(),
            issue_cookie: false,
            idle_timeout: Duration::from_secs(300),
            max_sessions: 10_000,
            when_full: WhenFull::Reject,
            max_per_client: 64,
            new_per_client_per_minute: 120,
            client_ip_header: None,
            replay_methods: Vec::new(),
            max_replay: 32,
        }
    }
}

/// A call made on every new connection, e.g. an authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct PreludeCall {
    /// The JSON-RPC method; must not be empty.
    pub method: String,
    /// Raw JSON params (`${VAR}` expanded), or none.
    pub params: Option<String>,
}

/// The async runtime's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Shared-nothing workers (`server/workers.rs`): 1 runs on one thread, N on N
    /// threads each with its own listener socket, upstream connections and sessions;
    /// 0 means one per CPU.
    ///
    /// One is the default: forwarding is I/O-bound, one core carries tens of thousands
    /// of calls a second, and on a small machine shared with the upstream a second
    /// worker mostly competes with it for the same cores. Raise it on a machine with
    /// cores to spare.
    pub workers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { workers: 1 }
    }
}

/// How a SIGTERM is handled.
#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    /// Readiness is false at once, but the listener keeps serving this long, so load
    /// balancers (Kubernetes endpoints) stop sending traffic before it closes.
    pub delay: Duration,
    /// Then open requests get this long to finish before connections are cut.
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            delay: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Human-readable lines or one JSON object per line.
    pub format: LogFormat,
    /// Filter used when `RUST_LOG` is not set, e.g. `info` or `rpcgate=debug,warn`.
    pub level: String,
    /// One line per HTTP request (target `rpcgate::access`, level info).
    pub access_log: bool,
    /// Share of requests that get an access-log line, 0.0 to 1.0.
    pub access_log_sample: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            access_log: true,
            access_log_sample: 1.0,
        }
    }
}
