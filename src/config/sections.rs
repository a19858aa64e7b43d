//! What each table of the file holds: one reader per section, each starting from the
//! defaults in `types.rs` and overwriting only the keys present.

use super::file::{Section, expand_env};
use super::{
    BalanceConfig, Config, HttpConfig, LogConfig, PreludeCall, SessionConfig, UpstreamConfig,
};
use std::path::PathBuf;
use toml::{Table, Value};

pub(super) fn read_config(table: &Table, p: &mut Vec<String>) -> Config {
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
        s.parsed("mode", &mut c.discovery.mode, p);
        s.duration("resolve_interval", &mut c.discovery.resolve_interval, p);
        s.finish(p);
    }
    if let Some(t) = root.table("balance", p) {
        read_balance(t, &mut c.balance, p);
    }
    if let Some(t) = root.table("sessions", p) {
        read_sessions(t, &mut c.sessions, p);
    }
    // Only a value written here is `Explicit`: absent, the default stays `Default`.
    root.parsed("admin_listen", &mut c.admin_listen, p);
    if let Some(t) = root.table("shutdown", p) {
        let mut s = Section::new(t, "shutdown");
        s.duration("delay", &mut c.shutdown.delay, p);
        s.duration("drain_timeout", &mut c.shutdown.drain_timeout, p);
        s.finish(p);
    }
    if let Some(t) = root.table("log", p) {
        read_log(t, &mut c.log, p);
    }
    if let Some(t) = root.table("limits", p) {
        let l = &mut c.limits;
        let mut s = Section::new(t, "limits");
        let mut memory = usize::MAX;
        s.size("memory", &mut memory, p);
        if memory != usize::MAX {
            l.memory = Some(memory);
        }
        s.size("connection_bytes", &mut l.connection_bytes, p);
        s.size("upstream_queue_bytes", &mut l.upstream_queue_bytes, p);
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
                match item {
                    Value::Table(t) => c.on_connect.push(read_prelude(t, i, p)),
                    _ => p.push(format!("on_connect[{i}]: expected a table")),
                }
            }
        }
        Some(_) => p.push("on_connect: expected an array of tables ([[on_connect]])".into()),
    }
    if let Some(t) = root.table("cors", p) {
        super::cors::read_cors(t, &mut c.cors, p);
    }
    if let Some(t) = root.table("auth", p) {
        super::access::read_auth(t, &mut c.auth, p);
    }
    if let Some(v) = root.get("rate_limits") {
        c.rate_limits = super::rate_limits::read_rate_limits(v, p);
    }
    if let Some(t) = root.table("tls", p) {
        c.tls = Some(super::tls::read_tls(t, p));
    }
    if let Some(t) = root.table("push", p) {
        super::push::read_push(t, &mut c.push, p);
    }
    if let Some(t) = root.table("wamp", p) {
        super::wamp::read_wamp(t, &mut c.wamp, p);
    }
    if let Some(v) = root.get("subscriptions") {
        c.subscriptions = super::push::read_subscriptions(v, p);
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
    s.parsed("batch", &mut h.batch, p);
    s.duration("header_read_timeout", &mut h.header_read_timeout, p);
    s.duration("body_read_timeout", &mut h.body_read_timeout, p);
    s.duration("keep_alive_timeout", &mut h.keep_alive_timeout, p);
    s.number("max_connections", &mut h.max_connections, p);
    s.number(
        "max_connections_per_address",
        &mut h.max_connections_per_address,
        p,
    );
    s.boolean("websocket", &mut h.websocket, p);
    let mut streams = h.http2_max_streams as usize;
    s.number("http2_max_streams", &mut streams, p);
    h.http2_max_streams = u32::try_from(streams).unwrap_or(u32::MAX);
    s.duration("write_timeout", &mut h.write_timeout, p);
    s.size("max_header_bytes", &mut h.max_header_bytes, p);
    s.size("http2_send_buffer_bytes", &mut h.http2_send_buffer_bytes, p);
    s.size(
        "http2_stream_window_bytes",
        &mut h.http2_stream_window_bytes,
        p,
    );
    s.size(
        "http2_connection_window_bytes",
        &mut h.http2_connection_window_bytes,
        p,
    );
    s.finish(p);
}

fn read_balance(t: &Table, b: &mut BalanceConfig, p: &mut Vec<String>) {
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

fn read_sessions(t: &Table, c: &mut SessionConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "sessions");
    s.parsed("affinity", &mut c.affinity, p);
    if let Some(h) = s.string("header", p) {
        c.header = h;
    }
    if let Some(k) = s.string("cookie", p) {
        c.cookie = k;
    }
    s.boolean("issue_cookie", &mut c.issue_cookie, p);
    s.duration("idle_timeout", &mut c.idle_timeout, p);
    s.number("max_sessions", &mut c.max_sessions, p);
    s.parsed("when_full", &mut c.when_full, p);
    s.number("max_per_client", &mut c.max_per_client, p);
    s.number(
        "new_per_client_per_minute",
        &mut c.new_per_client_per_minute,
        p,
    );
    c.client_ip_header = s
        .string("client_ip_header", p)
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty());
    if let Some(list) = s.strings("replay_methods", p) {
        c.replay_methods = list;
    }
    s.number("max_replay", &mut c.max_replay, p);
    s.finish(p);
}

fn read_log(t: &Table, l: &mut LogConfig, p: &mut Vec<String>) {
    let mut s = Section::new(t, "log");
    s.parsed("format", &mut l.format, p);
    if let Some(level) = s.string("level", p) {
        if tracing_subscriber::EnvFilter::try_new(&level).is_ok() {
            l.level = level;
        } else {
            p.push(format!(
                "log.level: {level:?} is not a filter like info or rpcgate=debug,warn"
            ));
        }
    }
    s.boolean("access_log", &mut l.access_log, p);
    match s.get("access_log_sample") {
        None => {}
        Some(Value::Float(f)) if (0.0..=1.0).contains(f) => l.access_log_sample = *f,
        Some(Value::Integer(i)) if (0..=1).contains(i) => l.access_log_sample = *i as f64,
        Some(_) => p.push("log.access_log_sample: expected a number from 0.0 to 1.0".into()),
    }
    s.finish(p);
}

fn read_prelude(t: &Table, i: usize, p: &mut Vec<String>) -> PreludeCall {
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
    PreludeCall { method, params }
}

fn read_upstream(t: &Table, i: usize, p: &mut Vec<String>) -> UpstreamConfig {
    let mut s = Section::new(t, format!("upstreams[{i}]"));
    let mut up = UpstreamConfig::new(String::new());
    match s.string("url", p) {
        Some(url) => up.url = url,
        None => p.push(format!("upstreams[{i}].url: missing")),
    }
    up.name = s.string("name", p);
    s.number("connections", &mut up.connections, p);
    s.number("max_in_flight", &mut up.max_in_flight, p);
    let mut weight = up.weight as usize;
    s.number("weight", &mut weight, p);
    up.weight = u32::try_from(weight).unwrap_or(u32::MAX);
    up.subprotocol = s.string("subprotocol", p);
    up.ca_file = s.string("ca_file", p).map(PathBuf::from);
    up.client_cert = s.string("client_cert", p).map(PathBuf::from);
    up.client_key = s.string("client_key", p).map(PathBuf::from);
    s.parsed("protocol", &mut up.protocol, p);
    up.realm = s.string("realm", p);
    if let Some(prefix) = s.string("procedure_prefix", p) {
        up.procedure_prefix = prefix;
    }
    if let Some(t) = s.table("wamp_auth", p) {
        up.wamp_auth = super::wamp::read_wamp_auth(t, i, p);
    }
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

#[cfg(test)]
mod tests;
