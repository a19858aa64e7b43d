//! What operators watch: metrics that move, readiness that flips, a graceful stop.

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use support::admin::{eventually, get, sample};
use support::gateway::{config_for, start_gateway};
use support::{Close, FakeUpstream, post, with_timeout};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn metrics_move_with_calls_failures_and_upstream_drops() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.calls.request_timeout = Duration::from_millis(300);
    config.metric_methods = vec!["known".into()];
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let text = get(gw.admin, "/metrics").await.text();
    let open_line = text
        .lines()
        .find(|l| l.starts_with("rpcgate_upstream_connections{") && l.contains(r#"state="open""#));
    assert!(open_line.is_some_and(|l| l.ends_with(" 1")), "{text}");
    assert!(text.contains("process_resident_memory_bytes"));

    up.auto_reply(|f| match f.method() {
        Some("known") => Some(f.result_text(json!(1))),
        Some("bad") => Some(f.error_text(-32000, "no")),
        _ => None, // "slow": never answered, times out
    });
    post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"known"}"#).await;
    post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":2,"method":"bad"}"#).await;
    let slow = post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":3,"method":"slow"}"#).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    post(gw.addr, "/", "{nope").await;
    post(
        gw.addr,
        "/",
        r#"[{"jsonrpc":"2.0","id":4,"method":"known"},{"jsonrpc":"2.0","id":5,"method":"known"}]"#,
    )
    .await;
    up.send_to_all(r#"{"jsonrpc":"2.0","method":"pushed"}"#);

    let text = get(gw.admin, "/metrics").await.text();
    assert!(text.contains("# HELP rpcgate_rpc_calls_total"), "{text}");
    assert!(text.contains("# TYPE rpcgate_rpc_call_duration_seconds histogram"));
    assert_eq!(
        sample(
            &text,
            r#"rpcgate_rpc_calls_total{method="known",outcome="ok"}"#
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"rpcgate_rpc_calls_total{method="other",outcome="rpc_error"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"rpcgate_rpc_calls_total{method="other",outcome="timeout"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, r#"rpcgate_http_requests_total{status="200"}"#),
        3.0
    );
    assert_eq!(
        sample(&text, r#"rpcgate_http_requests_total{status="504"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"rpcgate_http_requests_total{status="400"}"#),
        1.0
    );
    assert_eq!(sample(&text, "rpcgate_batch_size_count"), 1.0);
    assert_eq!(sample(&text, "rpcgate_rpc_calls_in_flight"), 0.0);
    assert!(sample(&text, "rpcgate_http_request_bytes_total") > 100.0);
    assert!(sample(&text, "rpcgate_http_response_bytes_total") > 100.0);
    assert_eq!(sample(&text, "rpcgate_ready"), 1.0);

    // The pushed notification and the late reply of "slow" (none: it was never
    // answered) arrive as unmatched messages.
    eventually(async || {
        let text = get(gw.admin, "/metrics").await.text();
        sample(
            &text,
            r#"rpcgate_upstream_unmatched_messages_total{kind="unsolicited"}"#,
        ) >= 1.0
    })
    .await;

    // The upstream drops: a reconnect is counted, and connections show the state.
    up.close_all(Close::Abrupt);
    up.wait_for_connections(2).await;
    eventually(async || {
        let text = get(gw.admin, "/metrics").await.text();
        text.lines()
            .any(|l| l.starts_with("rpcgate_upstream_reconnects_total{") && l.ends_with(" 1"))
    })
    .await;
}

/// Every call counts once, with its latency, whichever way it came: a single call, a
/// notification, each element of a split batch and of a forwarded one.
#[tokio::test]
async fn every_path_counts_its_calls_once_with_latency() {
    use rpcgate::config::BatchMode;
    for batch in [BatchMode::Split, BatchMode::Forward] {
        let up = FakeUpstream::start().await;
        up.auto_reply(|f| match f.batch() {
            Some(calls) => Some(
                serde_json::Value::Array(
                    calls
                        .iter()
                        .filter(|c| c.get("id").is_some())
                        .map(|c| support::fake_upstream::result_for(c, json!("ok")))
                        .collect(),
                )
                .to_string(),
            ),
            None if f.id().is_some() => Some(f.result_text(json!("ok"))),
            None => None,
        });
        let mut config = config_for(&[up.url()], 1);
        config.metric_methods = vec!["a".into(), "note".into()];
        config.http.batch = batch;
        let gw = start_gateway(config).await;
        gw.wait_open(1).await;

        post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"a"}"#).await;
        let note = post(gw.addr, "/", r#"{"jsonrpc":"2.0","method":"note"}"#).await;
        assert_eq!(note.status, StatusCode::NO_CONTENT);
        let resp = post(
            gw.addr,
            "/",
            r#"[{"jsonrpc":"2.0","id":2,"method":"a"},{"jsonrpc":"2.0","id":3,"method":"a"},{"jsonrpc":"2.0","method":"note"},{"id":4}]"#,
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK, "{batch:?}");

        let text = get(gw.admin, "/metrics").await.text();
        let calls = |method: &str, outcome: &str| {
            sample(
                &text,
                &format!(r#"rpcgate_rpc_calls_total{{method="{method}",outcome="{outcome}"}}"#),
            )
        };
        assert_eq!(calls("a", "ok"), 3.0, "{batch:?}: {text}");
        assert_eq!(
            calls("note", "ok"),
            2.0,
            "{batch:?}: notifications count as calls"
        );
        assert_eq!(calls("other", "invalid"), 1.0, "{batch:?}");
        let latency = |method: &str| {
            sample(
                &text,
                &format!(r#"rpcgate_rpc_call_duration_seconds_count{{method="{method}"}}"#),
            )
        };
        assert_eq!(
            latency("a"),
            3.0,
            "{batch:?}: every call's latency is recorded"
        );
        assert_eq!(latency("note"), 2.0, "{batch:?}");
        assert_eq!(sample(&text, "rpcgate_rpc_calls_in_flight"), 0.0);
        gw.stop().await;
    }
}

#[tokio::test]
async fn readiness_follows_the_upstreams_and_health_is_separate() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    let gw = start_gateway(config_for(&[up.url()], 2)).await;
    gw.wait_open(2).await;
    assert_eq!(get(gw.admin, "/readyz").await.status, StatusCode::OK);
    assert_eq!(get(gw.admin, "/healthz").await.status, StatusCode::OK);

    // The last upstream goes away: not ready, still alive.
    up.shutdown(Close::Abrupt).await;
    eventually(async || get(gw.admin, "/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE)
        .await;
    assert_eq!(get(gw.admin, "/healthz").await.status, StatusCode::OK);
    let text = get(gw.admin, "/metrics").await.text();
    assert_eq!(sample(&text, "rpcgate_ready"), 0.0);

    // It returns: ready again.
    let _up = FakeUpstream::start_on(addr).await.expect("rebind");
    gw.wait_open(1).await;
    assert_eq!(get(gw.admin, "/readyz").await.status, StatusCode::OK);
    assert_eq!(get(gw.admin, "/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_turns_readiness_off_at_once_and_keeps_serving_through_the_delay() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("still here"))));
    let mut config = config_for(&[up.url()], 1);
    config.shutdown.delay = Duration::from_secs(300);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    gw.begin_shutdown();
    eventually(async || get(gw.admin, "/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE)
        .await;
    // Load balancers still routing here during the delay are served normally.
    let resp = post(gw.addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#).await;
    assert_eq!(resp.json()["result"], "still here");
    assert_eq!(get(gw.admin, "/healthz").await.status, StatusCode::OK);
}

fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_drains_a_slow_call_refuses_new_connections_and_exits_0() {
    let up = FakeUpstream::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpcgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &up.url(),
            "--connections",
            "1",
            "--shutdown-delay",
            "100ms",
            "--drain-timeout",
            "30s",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn rpcgate");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut addr = None;
    let mut admin = None;
    while addr.is_none() || admin.is_none() {
        let line = with_timeout(lines.next_line())
            .await
            .unwrap()
            .expect("a line");
        let url = |prefix: &str| -> Option<SocketAddr> {
            line.strip_prefix(prefix)?
                .trim()
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .ok()
        };
        admin = admin.or(url("rpcgate admin on "));
        addr = addr.or(url("rpcgate listening on "));
    }
    let (addr, admin) = (addr.unwrap(), admin.unwrap());
    up.wait_for_connections(1).await;

    let slow = tokio::spawn(post(
        addr,
        "/",
        r#"{"jsonrpc":"2.0","id":"slow","method":"m"}"#,
    ));
    let frame = up.next_frame().await;
    sigterm(child.id().expect("running"));
    // Not ready at once, then the listener closes: new connections are refused.
    eventually(async || {
        support::http::try_request(admin, Method::GET, "/readyz", &[], "")
            .await
            .map_or(true, |r| r.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    eventually(async || tokio::net::TcpStream::connect(addr).await.is_err()).await;
    // The call in flight still completes, and the process exits 0.
    frame.reply_result(json!("done"));
    let resp = with_timeout(slow).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["result"], "done");
    let status = with_timeout(child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Upstream sockets were closed (1001) by the drain.
    up.wait_for_open_connections(0).await;
}
