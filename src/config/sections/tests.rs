//! Unit tests of `sections.rs`, kept apart so the module reads as one noun.

use super::super::{AdminListen, Affinity, BatchMode, DiscoveryMode, LogFormat, WhenFull};
use super::*;
use std::net::SocketAddr;
use std::time::Duration;

const UPSTREAM: &str = "[[upstreams]]\nurl = \"ws://127.0.0.1:9000/\"\n";

fn parse_with_upstream(text: &str) -> Result<Config, Vec<String>> {
    Config::parse(&format!("{text}\n{UPSTREAM}")).map_err(|p| p.0)
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
        write_timeout = "5s"
        max_header_bytes = "16KiB"
        http2_send_buffer_bytes = "32KiB"
        http2_stream_window_bytes = 131072
        http2_connection_window_bytes = "2MiB"
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
    assert_eq!(c.http.write_timeout, Duration::from_secs(5));
    assert_eq!(c.http.max_header_bytes, 16 * 1024);
    assert_eq!(c.http.http2_send_buffer_bytes, 32 * 1024);
    assert_eq!(c.http.http2_stream_window_bytes, 131_072);
    assert_eq!(c.http.http2_connection_window_bytes, 2 * 1024 * 1024);
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
fn per_client_session_limits_are_read_and_the_ip_header_is_normalized() {
    let c = parse_with_upstream(
        r#"
        [sessions]
        max_per_client = 8
        new_per_client_per_minute = 30
        client_ip_header = " X-Forwarded-For "
        "#,
    )
    .unwrap();
    assert_eq!(c.sessions.max_per_client, 8);
    assert_eq!(c.sessions.new_per_client_per_minute, 30);
    assert_eq!(
        c.sessions.client_ip_header.as_deref(),
        Some("x-forwarded-for")
    );
    let defaults = parse_with_upstream("").unwrap();
    assert_eq!(defaults.sessions.client_ip_header, None);
}

#[test]
fn named_values_are_read_by_their_from_str() {
    let c = parse_with_upstream(
        r#"
        [http]
        batch = "forward"
        [discovery]
        mode = "dns"
        [sessions]
        affinity = "connection"
        when_full = "evict"
        [log]
        format = "json"
        "#,
    )
    .unwrap();
    assert_eq!(c.http.batch, BatchMode::Forward);
    assert_eq!(c.discovery.mode, DiscoveryMode::Dns);
    assert_eq!(c.sessions.affinity, Affinity::Connection);
    assert_eq!(c.sessions.when_full, WhenFull::Evict);
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn a_bad_named_value_lists_the_accepted_ones_under_its_key() {
    let problems = parse_with_upstream(
        r#"
        [http]
        batch = "join"
        [sessions]
        affinity = "sticky"
        "#,
    )
    .unwrap_err();
    assert_eq!(
        problems,
        [
            r#"http.batch: "join" must be "split" or "forward""#,
            r#"sessions.affinity: "sticky" must be "none", "upstream" or "connection""#,
        ]
    );
}

#[test]
fn admin_listen_is_explicit_only_when_written() {
    assert_eq!(
        parse_with_upstream("").unwrap().admin_listen,
        AdminListen::default()
    );
    assert_eq!(
        parse_with_upstream(r#"admin_listen = "0.0.0.0:9464""#)
            .unwrap()
            .admin_listen,
        AdminListen::Explicit(SocketAddr::from(([0, 0, 0, 0], 9464)))
    );
    assert_eq!(
        parse_with_upstream(r#"admin_listen = "off""#)
            .unwrap()
            .admin_listen,
        AdminListen::Off
    );
    assert_eq!(
        parse_with_upstream(r#"admin_listen = "everywhere""#).unwrap_err(),
        [r#"admin_listen: "everywhere" is not an address like 0.0.0.0:9464 (or "off")"#]
    );
}

#[test]
fn absent_keys_keep_their_defaults() {
    let c = parse_with_upstream("[calls]\nconnect_wait = \"2s\"").unwrap();
    assert_eq!(c.calls.connect_wait, Duration::from_secs(2));
    assert_eq!(c.calls.request_timeout, Duration::from_secs(30));
    assert!(c.log.access_log);
}
