//! Configuration: the TOML file, its defaults, and validation that reports every
//! problem at once.
//!
//! The file is read key by key from a `toml::Table` rather than through
//! `#[derive(Deserialize)]`, because serde stops at the first bad value and an operator
//! fixing a config wants the whole list: unknown keys, bad durations, out-of-range
//! numbers and bad URLs, each with its path (`upstreams[1].url`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::{Table, Value};

/// Everything rpcgate needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the JSON-RPC HTTP listener binds.
    pub listen: SocketAddr,
    pub http: HttpConfig,
    pub calls: CallConfig,
    pub websocket: WebSocketConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub discovery: DiscoveryConfig,
    pub balance: BalanceConfig,
    pub sessions: SessionConfig,
    /// Calls run on every new upstream connection before it carries traffic.
    pub on_connect: Vec<PreludeCall>,
    pub runtime: RuntimeConfig,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); `None` turns it off.
    pub admin_listen: Option<SocketAddr>,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    /// Method names that get their own `method` label value in metrics.
    pub metric_methods: Vec<String>,
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
    pub format: LogFormat,
    /// Filter used when `RUST_LOG` is not set, e.g. `info` or `rpcgate=debug,warn`.
    pub level: String,
    /// One line per HTTP request (target `rpcgate::access`, level info).
    pub access_log: bool,
    /// Share of requests that get an access-log line, 0.0 to 1.0.
    pub access_log_sample: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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

/// `text` or `json`.
pub fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{text:?} must be \"text\" or \"json\"")),
    }
}

/// The async runtime's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads: 1 runs single-threaded, 0 means one per CPU.
    ///
    /// One is the default: forwarding is I/O-bound, one core carries tens of thousands
    /// of calls a second, and a single thread spends less CPU per call (no
    /// cross-thread wakeups) than two on a small machine it shares with its upstream.
    /// Raise it on a dedicated machine with many cores.
    pub workers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { workers: 1 }
    }
}

/// Where upstream addresses come from.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    pub mode: DiscoveryMode,
    /// How often `dns` mode re-resolves each upstream's host name.
    pub resolve_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    /// Each `[[upstreams]]` URL is one upstream, dialled by its host name.
    Static,
    /// Each URL's host resolves to all its addresses, one upstream per address.
    Dns,
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
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Calls waiting for a connection or a slot at most; past it, 503 at once.
    pub max_waiting: usize,
}

/// Sticky sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub affinity: Affinity,
    /// Request header carrying the session key.
    pub header: String,
    /// Cookie carrying the session key.
    pub cookie: String,
    /// Give clients without a key a new random one in a cookie.
    pub issue_cookie: bool,
    /// A `connection` session unused this long is closed.
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    pub when_full: WhenFull,
    /// Methods whose successful calls are recorded and replayed on reconnect.
    pub replay_methods: Vec<String>,
    /// Recorded calls kept per session at most (the oldest go first).
    pub max_replay: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// No stickiness: every call is balanced on its own.
    None,
    /// A session's calls go to one upstream, over its shared connections.
    Upstream,
    /// A session gets its own upstream WebSocket.
    Connection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// New sessions get 503 while `max_sessions` are open.
    Reject,
    /// The least recently used session is closed to make room.
    Evict,
}

/// A call made on every new connection, e.g. an authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct PreludeCall {
    pub method: String,
    /// Raw JSON params (`${VAR}` expanded), or none.
    pub params: Option<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            mode: DiscoveryMode::Static,
            resolve_interval: Duration::from_secs(10),
        }
    }
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
            replay_methods: Vec::new(),
            max_replay: 32,
        }
    }
}

/// The client-facing HTTP side.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Path JSON-RPC is served on; other paths get 404.
    pub path: String,
    pub max_body_bytes: usize,
    pub max_batch_size: usize,
    pub batch: BatchMode,
    /// A client must send its complete request head within this time.
    pub header_read_timeout: Duration,
    /// A client must send its complete body within this time.
    pub body_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this time.
    pub keep_alive_timeout: Duration,
    /// Open client connections at most; further accepts wait for one to close.
    pub max_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_streams: u32,
}

/// How a JSON-RPC batch travels upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// Each element is its own upstream call, spread over connections.
    Split,
    /// The batch goes upstream as one frame on one connection.
    Forward,
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

/// Settings shared by every upstream WebSocket connection.
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketConfig {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// TCP connect + TLS + WebSocket handshake.
    pub handshake_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max`, with jitter.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Largest message accepted from an upstream.
    pub max_message_bytes: usize,
}

/// One upstream service.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `ws://` or `wss://` URL.
    pub url: String,
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
    /// Share of plain calls and of sessions relative to the other upstreams.
    pub weight: u32,
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
            http2_max_streams: 256,
        }
    }
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

impl UpstreamConfig {
    /// An upstream at `url` with default settings.
    pub fn new(url: impl Into<String>) -> Self {
        UpstreamConfig {
            url: url.into(),
            connections: 4,
            max_in_flight: 1024,
            headers: Vec::new(),
            subprotocol: None,
            ca_file: None,
            weight: 1,
        }
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
            admin_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9464))),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            metric_methods: Vec::new(),
        }
    }
}

/// Every problem found in a configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} configuration problem(s):\n  {}", .0.len(), .0.join("\n  "))]
pub struct Problems(pub Vec<String>);

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems(vec![format!("{}: {e}", path.display())]))?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, Problems> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            Problems(vec![format!("not valid TOML: {}", e.to_string().trim())])
        })?;
        let mut problems = Vec::new();
        let config = read_config(&table, &mut problems);
        problems.extend(config.check());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Problems(problems))
        }
    }

    /// Checks the relations between settings; returns every problem.
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.upstreams.is_empty() {
            p.push("no upstream: add an [[upstreams]] table or pass --upstream URL".to_string());
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            if let Err(e) = check_ws_url(&up.url) {
                p.push(format!("upstreams[{i}].url: {e}"));
            }
            if up.connections == 0 {
                p.push(format!("upstreams[{i}].connections: must be at least 1"));
            }
            if up.weight == 0 {
                p.push(format!("upstreams[{i}].weight: must be at least 1"));
            }
            if up.max_in_flight == 0 {
                p.push(format!("upstreams[{i}].max_in_flight: must be at least 1"));
            }
            for (name, value) in &up.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    p.push(format!(
                        "upstreams[{i}].headers: {name:?} is not a valid header name"
                    ));
                }
                if http::HeaderValue::from_str(value).is_err() {
                    p.push(format!(
                        "upstreams[{i}].headers.{name}: not a valid header value"
                    ));
                }
            }
            if let Some(proto) = &up.subprotocol
                && (proto.is_empty() || http::HeaderValue::from_str(proto).is_err())
            {
                p.push(format!(
                    "upstreams[{i}].subprotocol: not a valid header value"
                ));
            }
            if let Some(ca) = &up.ca_file
                && !ca.is_file()
            {
                p.push(format!(
                    "upstreams[{i}].ca_file: {} is not a readable file",
                    ca.display()
                ));
            }
        }
        if !self.http.path.starts_with('/') {
            p.push("http.path: must start with '/'".into());
        }
        let nonzero = [
            ("http.max_body_bytes", self.http.max_body_bytes),
            ("http.max_batch_size", self.http.max_batch_size),
            ("http.max_connections", self.http.max_connections),
            (
                "http.http2_max_streams",
                self.http.http2_max_streams as usize,
            ),
            (
                "websocket.max_message_bytes",
                self.websocket.max_message_bytes,
            ),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                p.push(format!("{key}: must be at least 1"));
            }
        }
        let durations = [
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.keep_alive_timeout", self.http.keep_alive_timeout),
            ("calls.request_timeout", self.calls.request_timeout),
            ("websocket.ping_interval", self.websocket.ping_interval),
            ("websocket.pong_timeout", self.websocket.pong_timeout),
            (
                "websocket.handshake_timeout",
                self.websocket.handshake_timeout,
            ),
            ("websocket.reconnect_base", self.websocket.reconnect_base),
            ("websocket.reconnect_max", self.websocket.reconnect_max),
        ];
        for (key, d) in durations {
            if d.is_zero() {
                p.push(format!("{key}: must be longer than 0s"));
            }
        }
        for (key, d) in [
            (
                "discovery.resolve_interval",
                self.discovery.resolve_interval,
            ),
            ("balance.health_interval", self.balance.health_interval),
            ("balance.health_timeout", self.balance.health_timeout),
            ("sessions.idle_timeout", self.sessions.idle_timeout),
        ] {
            if d.is_zero() {
                p.push(format!("{key}: must be longer than 0s"));
            }
        }
        if self.sessions.max_sessions == 0 {
            p.push("sessions.max_sessions: must be at least 1".into());
        }
        for (key, name) in [
            ("sessions.header", &self.sessions.header),
            ("sessions.cookie", &self.sessions.cookie),
        ] {
            if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.push(format!("{key}: {name:?} is not a valid name"));
            }
        }
        let raw_json = |text: &str| {
            serde_json::from_str::<&serde_json::value::RawValue>(text)
                .is_ok_and(|v| matches!(v.get().as_bytes().first(), Some(b'[' | b'{')))
        };
        if self.balance.health_params.is_some() && self.balance.health_method.is_none() {
            p.push("balance.health_params: set without balance.health_method".into());
        }
        if let Some(params) = &self.balance.health_params
            && !raw_json(params)
        {
            p.push("balance.health_params: must be a JSON array or object".into());
        }
        for (i, call) in self.on_connect.iter().enumerate() {
            if call.method.is_empty() {
                p.push(format!("on_connect[{i}].method: missing"));
            }
            if let Some(params) = &call.params
                && !raw_json(params)
            {
                p.push(format!(
                    "on_connect[{i}].params: must be a JSON array or object"
                ));
            }
        }
        if self.websocket.reconnect_max < self.websocket.reconnect_base {
            p.push("websocket.reconnect_max: must not be shorter than reconnect_base".into());
        }
        p
    }
}

/// Checks that `url` is a usable `ws://` or `wss://` URL.
pub fn check_ws_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        _ => return Err(format!("{url:?} must start with ws:// or wss://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// Parses `30s`, `250ms`, `1m 30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30s or 250ms ({e})"))
}

/// Reads one table, remembering which keys were used so the rest can be reported.
struct Section<'a> {
    table: &'a Table,
    path: String,
    used: HashSet<&'static str>,
}

impl<'a> Section<'a> {
    fn new(table: &'a Table, path: impl Into<String>) -> Self {
        Section {
            table,
            path: path.into(),
            used: HashSet::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.table.get(key)
    }

    fn string(&mut self, key: &'static str, p: &mut Vec<String>) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                p.push(format!(
                    "{}: expected a string, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    fn duration(&mut self, key: &'static str, slot: &mut Duration, p: &mut Vec<String>) {
        if let Some(text) = self.string(key, p) {
            match parse_duration(&text) {
                Ok(d) => *slot = d,
                Err(e) => p.push(format!("{}: {e}", self.key(key))),
            }
        }
    }

    fn number(&mut self, key: &'static str, slot: &mut usize, p: &mut Vec<String>) {
        match self.get(key) {
            None => {}
            Some(Value::Integer(n)) => match usize::try_from(*n) {
                Ok(n) => *slot = n,
                Err(_) => p.push(format!("{}: must not be negative", self.key(key))),
            },
            Some(other) => p.push(format!(
                "{}: expected an integer, found {}",
                self.key(key),
                other.type_str()
            )),
        }
    }

    fn strings(&mut self, key: &'static str, p: &mut Vec<String>) -> Option<Vec<String>> {
        match self.get(key)? {
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => p.push(format!(
                            "{}: expected strings, found {}",
                            self.key(key),
                            other.type_str()
                        )),
                    }
                }
                Some(out)
            }
            other => {
                p.push(format!(
                    "{}: expected an array of strings, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    fn table(&mut self, key: &'static str, p: &mut Vec<String>) -> Option<&'a Table> {
        match self.get(key)? {
            Value::Table(t) => Some(t),
            other => {
                p.push(format!(
                    "{}: expected a table, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    /// Reports keys nobody asked for: usually typos, which would otherwise be silently ignored.
    fn finish(self, p: &mut Vec<String>) {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str()) {
                p.push(format!("{}: unknown key", self.key(key)));
            }
        }
    }
}

fn read_config(table: &Table, p: &mut Vec<String>) -> Config {
    let mut c = Config::default();
    let mut root = Section::new(table, "");
    if let Some(listen) = root.string("listen", p) {
        match listen.parse() {
            Ok(a) => c.listen = a,
            Err(_) => p.push(format!(
                "listen: {listen:?} is not an address like 0.0.0.0:8080"
            )),
        }
    }
    if let Some(t) = root.table("http", p) {
        read_http(t, &mut c.http, p);
    }
    if let Some(t) = root.table("calls", p) {
        let mut s = Section::new(t, "calls");
        s.duration("request_timeout", &mut c.calls.request_timeout, p);
        s.duration("connect_wait", &mut c.calls.connect_wait, p);
        s.duration("queue_timeout", &mut c.calls.queue_timeout, p);
        s.finish(p);
    }
    if let Some(t) = root.table("websocket", p) {
        let w = &mut c.websocket;
        let mut s = Section::new(t, "websocket");
        s.duration("ping_interval", &mut w.ping_interval, p);
        s.duration("pong_timeout", &mut w.pong_timeout, p);
        s.duration("handshake_timeout", &mut w.handshake_timeout, p);
        s.duration("reconnect_base", &mut w.reconnect_base, p);
        s.duration("reconnect_max", &mut w.reconnect_max, p);
        s.number("max_message_bytes", &mut w.max_message_bytes, p);
        s.finish(p);
    }
    if let Some(t) = root.table("discovery", p) {
        let mut s = Section::new(t, "discovery");
        if let Some(mode) = s.string("mode", p) {
            match mode.as_str() {
                "static" => c.discovery.mode = DiscoveryMode::Static,
                "dns" => c.discovery.mode = DiscoveryMode::Dns,
                _ => p.push(format!(
                    "discovery.mode: {mode:?} must be \"static\" or \"dns\""
                )),
            }
        }
        s.duration("resolve_interval", &mut c.discovery.resolve_interval, p);
        s.finish(p);
    }
    if let Some(t) = root.table("balance", p) {
        let b = &mut c.balance;
        let mut s = Section::new(t, "balance");
        if let Some(list) = s.strings("retry_methods", p) {
            b.retry_methods = list;
        }
        b.health_method = s.string("health_method", p).filter(|m| !m.is_empty());
        if let Some(params) = s.string("health_params", p) {
            match expand_env(&params) {
                Ok(v) => b.health_params = Some(v),
                Err(e) => p.push(format!("balance.health_params: {e}")),
            }
        }
        s.duration("health_interval", &mut b.health_interval, p);
        s.duration("health_timeout", &mut b.health_timeout, p);
        s.number("max_waiting", &mut b.max_waiting, p);
        s.finish(p);
    }
    if let Some(t) = root.table("sessions", p) {
        read_sessions(t, &mut c.sessions, p);
    }
    if let Some(admin) = root.string("admin_listen", p) {
        match admin.as_str() {
            "" | "off" => c.admin_listen = None,
            addr => match addr.parse() {
                Ok(a) => c.admin_listen = Some(a),
                Err(_) => p.push(format!(
                    "admin_listen: {addr:?} is not an address like 0.0.0.0:9464 (or \"off\")"
                )),
            },
        }
    }
    if let Some(t) = root.table("shutdown", p) {
        let mut s = Section::new(t, "shutdown");
        s.duration("delay", &mut c.shutdown.delay, p);
        s.duration("drain_timeout", &mut c.shutdown.drain_timeout, p);
        s.finish(p);
    }
    if let Some(t) = root.table("log", p) {
        let mut s = Section::new(t, "log");
        if let Some(f) = s.string("format", p) {
            match parse_log_format(&f) {
                Ok(f) => c.log.format = f,
                Err(e) => p.push(format!("log.format: {e}")),
            }
        }
        if let Some(level) = s.string("level", p) {
            if tracing_subscriber::EnvFilter::try_new(&level).is_ok() {
                c.log.level = level;
            } else {
                p.push(format!(
                    "log.level: {level:?} is not a filter like info or rpcgate=debug,warn"
                ));
            }
        }
        match s.get("access_log") {
            None => {}
            Some(Value::Boolean(b)) => c.log.access_log = *b,
            Some(_) => p.push("log.access_log: expected true or false".into()),
        }
        match s.get("access_log_sample") {
            None => {}
            Some(Value::Float(f)) if (0.0..=1.0).contains(f) => c.log.access_log_sample = *f,
            Some(Value::Integer(i)) if (0..=1).contains(i) => c.log.access_log_sample = *i as f64,
            Some(_) => p.push("log.access_log_sample: expected a number from 0.0 to 1.0".into()),
        }
        s.finish(p);
    }
    if let Some(t) = root.table("metrics", p) {
        let mut s = Section::new(t, "metrics");
        if let Some(list) = s.strings("methods", p) {
            c.metric_methods = list;
        }
        s.finish(p);
    }
    if let Some(t) = root.table("runtime", p) {
        let mut s = Section::new(t, "runtime");
        s.number("workers", &mut c.runtime.workers, p);
        s.finish(p);
    }
    match root.get("on_connect") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Value::Table(t) = item else {
                    p.push(format!("on_connect[{i}]: expected a table"));
                    continue;
                };
                let mut s = Section::new(t, format!("on_connect[{i}]"));
                let method = s.string("method", p).unwrap_or_default();
                let params = match s.string("params", p).map(|v| expand_env(&v)) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(e)) => {
                        p.push(format!("on_connect[{i}].params: {e}"));
                        None
                    }
                    None => None,
                };
                s.finish(p);
                c.on_connect.push(PreludeCall { method, params });
            }
        }
        Some(_) => p.push("on_connect: expected an array of tables ([[on_connect]])".into()),
    }
    match root.get("upstreams") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Table(t) => c.upstreams.push(read_upstream(t, i, p)),
                    _ => p.push(format!("upstreams[{i}]: expected a table")),
                }
            }
        }
        Some(_) => p.push("upstreams: expected an array of tables ([[upstreams]])".into()),
    }
    root.finish(p);
    c
}

fn read_http(t: &Table, h: &mut HttpConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "http");
    if let Some(path) = s.string("path", p) {
        h.path = path;
    }
    s.number("max_body_bytes", &mut h.max_body_bytes, p);
    s.number("max_batch_size", &mut h.max_batch_size, p);
    if let Some(mode) = s.string("batch", p) {
        match mode.as_str() {
            "split" => h.batch = BatchMode::Split,
            "forward" => h.batch = BatchMode::Forward,
            _ => p.push(format!(
                "http.batch: {mode:?} must be \"split\" or \"forward\""
            )),
        }
    }
    s.duration("header_read_timeout", &mut h.header_read_timeout, p);
    s.duration("body_read_timeout", &mut h.body_read_timeout, p);
    s.duration("keep_alive_timeout", &mut h.keep_alive_timeout, p);
    s.number("max_connections", &mut h.max_connections, p);
    let mut streams = h.http2_max_streams as usize;
    s.number("http2_max_streams", &mut streams, p);
    h.http2_max_streams = u32::try_from(streams).unwrap_or(u32::MAX);
    s.finish(p);
}

fn read_sessions(t: &Table, c: &mut SessionConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "sessions");
    if let Some(a) = s.string("affinity", p) {
        match parse_affinity(&a) {
            Ok(a) => c.affinity = a,
            Err(e) => p.push(format!("sessions.affinity: {e}")),
        }
    }
    if let Some(h) = s.string("header", p) {
        c.header = h;
    }
    if let Some(k) = s.string("cookie", p) {
        c.cookie = k;
    }
    match s.get("issue_cookie") {
        None => {}
        Some(Value::Boolean(b)) => c.issue_cookie = *b,
        Some(_) => p.push("sessions.issue_cookie: expected true or false".into()),
    }
    s.duration("idle_timeout", &mut c.idle_timeout, p);
    s.number("max_sessions", &mut c.max_sessions, p);
    if let Some(w) = s.string("when_full", p) {
        match w.as_str() {
            "reject" => c.when_full = WhenFull::Reject,
            "evict" => c.when_full = WhenFull::Evict,
            _ => p.push(format!(
                "sessions.when_full: {w:?} must be \"reject\" or \"evict\""
            )),
        }
    }
    if let Some(list) = s.strings("replay_methods", p) {
        c.replay_methods = list;
    }
    s.number("max_replay", &mut c.max_replay, p);
    s.finish(p);
}

/// `none`, `upstream` or `connection`.
pub fn parse_affinity(text: &str) -> Result<Affinity, String> {
    match text {
        "none" => Ok(Affinity::None),
        "upstream" => Ok(Affinity::Upstream),
        "connection" => Ok(Affinity::Connection),
        _ => Err(format!(
            "{text:?} must be \"none\", \"upstream\" or \"connection\""
        )),
    }
}

/// `static` or `dns`.
pub fn parse_discovery(text: &str) -> Result<DiscoveryMode, String> {
    match text {
        "static" => Ok(DiscoveryMode::Static),
        "dns" => Ok(DiscoveryMode::Dns),
        _ => Err(format!("{text:?} must be \"static\" or \"dns\"")),
    }
}

fn read_upstream(t: &Table, i: usize, p: &mut Vec<String>) -> UpstreamConfig {
    let mut s = Section::new(t, format!("upstreams[{i}]"));
    let mut up = UpstreamConfig::new(String::new());
    match s.string("url", p) {
        Some(url) => up.url = url,
        None => p.push(format!("upstreams[{i}].url: missing")),
    }
    s.number("connections", &mut up.connections, p);
    s.number("max_in_flight", &mut up.max_in_flight, p);
    let mut weight = up.weight as usize;
    s.number("weight", &mut weight, p);
    up.weight = u32::try_from(weight).unwrap_or(u32::MAX);
    up.subprotocol = s.string("subprotocol", p);
    up.ca_file = s.string("ca_file", p).map(PathBuf::from);
    if let Some(headers) = s.table("headers", p) {
        for (name, value) in headers {
            match value {
                Value::String(v) => match expand_env(v) {
                    Ok(v) => up.headers.push((name.clone(), v)),
                    Err(e) => p.push(format!("upstreams[{i}].headers.{name}: {e}")),
                },
                _ => p.push(format!("upstreams[{i}].headers.{name}: expected a string")),
            }
        }
    }
    s.finish(p);
    up
}

/// Expands `${VAR}` from the environment, so secrets stay out of config files.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unclosed ${ in value".to_string())?;
        let name = &after[..end];
        let value =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_needs_an_upstream() {
        let err = Config::parse("").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].contains("no upstream"));
    }

    #[test]
    fn full_file_reads_every_key() {
        let text = r#"
            listen = "0.0.0.0:9000"
            [http]
            path = "/rpc"
            max_body_bytes = 2048
            max_batch_size = 5
            batch = "forward"
            header_read_timeout = "2s"
            body_read_timeout = "3s"
            keep_alive_timeout = "4s"
            max_connections = 10
            http2_max_streams = 7
            [calls]
            request_timeout = "250ms"
            connect_wait = "1s"
            queue_timeout = "5ms"
            [websocket]
            ping_interval = "1m"
            pong_timeout = "20s"
            handshake_timeout = "3s"
            reconnect_base = "50ms"
            reconnect_max = "5s"
            max_message_bytes = 1000
            [[upstreams]]
            url = "wss://example.com/ws"
            connections = 2
            max_in_flight = 8
            subprotocol = "jsonrpc"
            headers = { Authorization = "Bearer x" }
        "#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.http.path, "/rpc");
        assert_eq!(c.http.batch, BatchMode::Forward);
        assert_eq!(c.http.http2_max_streams, 7);
        assert_eq!(c.calls.request_timeout, Duration::from_millis(250));
        assert_eq!(c.websocket.ping_interval, Duration::from_secs(60));
        assert_eq!(c.upstreams[0].connections, 2);
        assert_eq!(
            c.upstreams[0].headers,
            vec![("Authorization".into(), "Bearer x".into())]
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
            listen = "nowhere"
            colour = "blue"
            [calls]
            request_timeout = "soon"
            connect_wait = 5
            [[upstreams]]
            url = "http://example.com"
            connections = 0
            [[upstreams]]
            connections = -1
        "#;
        let problems = Config::parse(text).unwrap_err().0;
        let all = problems.join("\n");
        for needle in [
            "listen:",
            "colour: unknown key",
            "calls.request_timeout",
            "calls.connect_wait: expected a string",
            "upstreams[0].url",
            "upstreams[0].connections",
            "upstreams[1].url: missing",
            "upstreams[1].connections: must not be negative",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn env_expansion() {
        // PATH is set in every environment tests run in.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(expand_env("a ${PATH} b").unwrap(), format!("a {path} b"));
        assert!(expand_env("${RPCGATE_SURELY_UNSET_VARIABLE}").is_err());
        assert!(expand_env("${open").is_err());
    }
}
