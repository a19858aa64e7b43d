//! Validation of a whole [`Config`]: the relations between settings that no single
//! key can check on its own. It collects every problem instead of stopping at the
//! first, so one run of `check-config` shows the operator the whole list.

use super::Config;

/// The largest HTTP/2 flow-control window (RFC 9113, section 6.9.1).
const H2_MAX_WINDOW: usize = (1 << 31) - 1;

/// Every problem found in a configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} configuration problem(s):\n  {}", .0.len(), .0.join("\n  "))]
pub struct Problems(pub Vec<String>);

impl Config {
    /// Checks the relations between settings; returns every problem.
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        let limits = &self.limits;
        let memory = limits.memory_bytes();
        if limits.connection_bytes < self.http.max_body_bytes {
            p.push(format!(
                "limits.connection_bytes: {} is less than http.max_body_bytes ({}): a body of the largest allowed size could never be read",
                limits.connection_bytes, self.http.max_body_bytes
            ));
        }
        if memory < limits.connection_bytes {
            p.push(format!(
                "limits.memory: {memory} is less than limits.connection_bytes ({})",
                limits.connection_bytes
            ));
        }
        if limits.upstream_queue_bytes == 0 {
            p.push("limits.upstream_queue_bytes: must be at least 1".to_string());
        }
        if self.upstreams.is_empty() {
            p.push("no upstream: add an [[upstreams]] table or pass --upstream URL".to_string());
        }
        let mut names: Vec<String> = Vec::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            if let Err(e) = check_ws_url(&up.url) {
                p.push(format!("upstreams[{i}].url: {e}"));
            }
            let name = up.shown_name();
            if up.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                p.push(format!("upstreams[{i}].name: must not be empty"));
            } else if let Some(first) = names.iter().position(|n| *n == name) {
                // Labels and logs could not tell them apart.
                p.push(format!(
                    "upstreams[{i}]: shown as {name:?} like upstreams[{first}]; give one of them a distinct `name`"
                ));
            }
            names.push(name);
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
            super::wamp::check_upstream(i, up, &mut p);
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
        super::wamp::check_methods(&self.wamp, &mut p);
        self.cors.check(&mut p);
        self.auth.check(&self.rate_limits, &mut p);
        super::tls::check_tls(self, &mut p);
        let events = &self.push.events_path;
        if !events.starts_with('/') {
            p.push("push.events_path: must start with '/'".into());
        } else if *events == self.http.path {
            p.push(format!(
                "push.events_path: {events:?} is also http.path; give the event stream a path of its own"
            ));
        }
        if self.push.buffer == 0 {
            p.push("push.buffer: must be at least 1".into());
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
            ("http.write_timeout", self.http.write_timeout),
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
        if self.sessions.max_per_client == 0 {
            p.push("sessions.max_per_client: must be at least 1".into());
        }
        // The limiter counts in u32; a larger rate is no limit anyway.
        if !(1..=u32::MAX as usize).contains(&self.sessions.new_per_client_per_minute) {
            p.push(format!(
                "sessions.new_per_client_per_minute: must be from 1 to {}",
                u32::MAX
            ));
        }
        let ip_header = self.sessions.client_ip_header.as_ref();
        for (key, name) in [
            ("sessions.header", &self.sessions.header),
            ("sessions.cookie", &self.sessions.cookie),
        ]
        .into_iter()
        .chain(ip_header.map(|h| ("sessions.client_ip_header", h)))
        {
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
        // hyper panics outside these ranges, so they are refused here with the key's name.
        let h = &self.http;
        if h.max_header_bytes < 8192 || u32::try_from(h.max_header_bytes).is_err() {
            p.push(format!(
                "http.max_header_bytes: {} must be between 8192 (8KiB) and 4GiB",
                h.max_header_bytes
            ));
        }
        if h.http2_send_buffer_bytes == 0 || u32::try_from(h.http2_send_buffer_bytes).is_err() {
            p.push(format!(
                "http.http2_send_buffer_bytes: {} must be between 1 and 4GiB",
                h.http2_send_buffer_bytes
            ));
        }
        // HTTP/2 windows: at least the protocol's initial 65535, at most 2^31-1.
        for (key, v) in [
            (
                "http.http2_stream_window_bytes",
                h.http2_stream_window_bytes,
            ),
            (
                "http.http2_connection_window_bytes",
                h.http2_connection_window_bytes,
            ),
        ] {
            if !(65_535..=H2_MAX_WINDOW).contains(&v) {
                p.push(format!(
                    "{key}: {v} must be between 65535 and {H2_MAX_WINDOW} (2^31-1)"
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
        .map_err(|e| format!("{:?} is not a URL ({e})", super::redact_url(url)))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        _ => {
            return Err(format!(
                "{:?} must start with ws:// or wss://",
                super::redact_url(url)
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{:?} has no host", super::redact_url(url)));
    }
    Ok(())
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
    fn problems_list_one_per_line() {
        let problems = Problems(vec!["a: bad".into(), "b: worse".into()]);
        assert_eq!(
            problems.to_string(),
            "2 configuration problem(s):\n  a: bad\n  b: worse"
        );
    }

    #[test]
    fn upstream_urls_must_be_websocket_urls_with_a_host() {
        assert!(check_ws_url("ws://example.com/ws").is_ok());
        assert!(check_ws_url("wss://10.0.0.1:9000").is_ok());
        assert!(check_ws_url("http://example.com").is_err());
        assert!(check_ws_url("ws:///nohost").is_err());
        assert!(check_ws_url("not a url").is_err());
    }
}
