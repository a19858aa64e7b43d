//! `runtime.workers = 2`: two shared-nothing workers behind one port. Every call is
//! answered with its own id whichever worker accepts it; the upstream connections are
//! split between the workers, not doubled; a session's requests all reach the worker
//! that owns it (its own upstream socket, its event stream), from any connection; and
//! stopping ends every worker.

mod support;

use http::StatusCode;
use parking_lot::Mutex;
use rpcgate::config::{AdminListen, Affinity, Config, SubscriptionRule};
use rpcgate::server::Workers;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use support::admin::{eventually, get, sample};
use support::echo::Echo;
use support::gateway::config_for;
use support::rpc::{call_body, post_as, result_of};
use support::sse::stream_of;
use support::{FakeUpstream, with_timeout};
use tokio_util::sync::CancellationToken;

/// A gateway of `count` workers on port 0, with its admin listener.
struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    workers: Option<Workers>,
}

fn start(mut config: Config, count: usize) -> Running {
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = AdminListen::Explicit("127.0.0.1:0".parse().unwrap());
    let stop = CancellationToken::new();
    let workers = Workers::start(config, count, stop.clone()).expect("workers start");
    Running {
        addr: workers.local_addr(),
        admin: workers.admin_addr().expect("an admin listener"),
        stop,
        workers: Some(workers),
    }
}

impl Running {
    async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.text()
    }

    /// Upstream connections open, over every worker.
    async fn open_upstream_connections(&self) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("rpcgate_upstream_connections{state=\"open\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn wait_open(&self, n: f64) {
        eventually(async || self.open_upstream_connections().await == n).await;
    }

    /// Stops every worker; returns once all their threads have ended.
    async fn stop(mut self) {
        self.stop.cancel();
        let workers = self.workers.take().expect("running");
        with_timeout(tokio::task::spawn_blocking(move || workers.join()))
            .await
            .expect("the workers' threads end");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn every_call_is_answered_with_its_own_id_over_two_workers_sharing_the_connections() {
    let echo = Echo::start("a").await;
    let gw = start(config_for(std::slice::from_ref(&echo.url), 4), 2);
    // 4 configured: 2 per worker, not 4 each.
    gw.wait_open(4.0).await;

    let calls: Vec<_> = (0..200u64)
        .map(|i| {
            let addr = gw.addr;
            tokio::spawn(async move {
                let resp = post_as(addr, None, call_body(i, "echo", json!([i, "x"]))).await;
                (i, resp)
            })
        })
        .collect();
    for call in calls {
        let (i, resp) = with_timeout(call).await.expect("the call's task");
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert_eq!(
            resp.json(),
            json!({"jsonrpc": "2.0", "id": i, "result": [i, "x"]}),
            "call {i} got its own answer"
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, "rpcgate_worker_handovers_total"),
        0.0,
        "calls without a session are served where they arrive"
    );
    // Each worker counts in its own shard; /metrics shows the sum.
    assert_eq!(
        sample(&metrics, r#"rpcgate_http_requests_total{status="200"}"#),
        200.0
    );
    assert_eq!(get(gw.admin, "/readyz").await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn a_sessions_own_upstream_socket_serves_it_from_any_connection() {
    let up = FakeUpstream::start().await;
    // `count` answers 1, 2, 3… per upstream connection: a session that reached a
    // second socket would start again from 1.
    let counters: Mutex<HashMap<usize, u64>> = Mutex::new(HashMap::new());
    up.auto_reply(move |f| {
        (f.method() == Some("count")).then(|| {
            let mut counters = counters.lock();
            let n = counters.entry(f.conn).or_default();
            *n += 1;
            f.result_text(json!(*n))
        })
    });
    let mut config = config_for(&[up.url()], 2);
    config.sessions.affinity = Affinity::Connection;
    let gw = start(config, 2);
    gw.wait_open(2.0).await;

    for round in 1..=8u64 {
        for session in ["alice", "bob", "carol"] {
            // A fresh connection each time: the kernel spreads them over both workers.
            let resp = post_as(gw.addr, Some(session), call_body(round, "count", json!([]))).await;
            assert_eq!(
                result_of(&resp),
                json!(round),
                "{session}'s call {round} reached its own socket"
            );
        }
    }
    // The pooled connections plus one per session, none opened twice.
    assert_eq!(up.total_connections(), 2 + 3);
    let handed = sample(&gw.metrics().await, "rpcgate_worker_handovers_total");
    assert!(
        handed > 0.0,
        "some of the 24 calls arrived at the worker not owning their session"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_event_stream_gets_the_notices_its_sessions_calls_asked_for_on_other_connections() {
    let echo = Echo::start("a").await;
    let mut config = config_for(std::slice::from_ref(&echo.url), 2);
    config.subscriptions = vec![SubscriptionRule::preset("substrate").unwrap()];
    config.sessions.affinity = Affinity::Connection;
    let gw = start(config, 2);
    gw.wait_open(2.0).await;
    let mut sse = stream_of(gw.addr, "own").await;

    for i in 0..6u64 {
        let resp = post_as(gw.addr, Some("own"), call_body(i, "notify_me", json!([i]))).await;
        assert_eq!(result_of(&resp), json!(true));
        assert_eq!(
            sse.event().await.json(),
            json!({"jsonrpc": "2.0", "method": "notice", "params": [i]}),
            "notice {i} reached the session's stream"
        );
    }
    drop(sse);
    gw.stop().await;
}

#[tokio::test]
async fn stopping_ends_every_worker_and_the_port_closes() {
    let echo = Echo::start("a").await;
    let gw = start(config_for(std::slice::from_ref(&echo.url), 2), 2);
    gw.wait_open(2.0).await;
    let resp = post_as(gw.addr, None, call_body(1, "echo", json!([1]))).await;
    assert_eq!(result_of(&resp), json!([1]));
    let addr = gw.addr;
    gw.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no worker is listening any more"
    );
}
