//! Failover between upstreams, end to end: calls that never reached a socket go elsewhere,
//! written calls are sent again only when their method is in `retry_methods`; weights,
//! health checks, `on_connect` calls and the bounded waiting room.

mod support;

use http::StatusCode;
use rpcgate::config::{Config, PreludeCall};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::{
    Client, Close, FakeUpstream, H2Client, Response, post, with_timeout, with_timeout_of,
};

fn body(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Waits (bounded) until `cond` holds, checking after every short pause.
#[track_caller]
fn eventually(mut cond: impl FnMut() -> bool) -> impl Future<Output = ()> {
    with_timeout(async move {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Answers every call except `health` with `{"by": name, "tag": params[0]}`.
fn answering(up: &FakeUpstream, name: &'static str) {
    up.auto_reply(move |f| {
        let tag = f
            .params()
            .and_then(|p| p.get(0))
            .cloned()
            .unwrap_or_else(|| json!(""));
        (f.method() != Some("health")).then(|| f.result_text(json!({"by": name, "tag": tag})))
    });
}

/// The tags (`params[0]`) of every call an upstream received.
fn tags_seen(up: &FakeUpstream) -> Vec<String> {
    up.received()
        .iter()
        .filter_map(|r| r.params()?.get(0)?.as_str().map(str::to_owned))
        .collect()
}

/// Who answered a 200 call, and its tag.
#[track_caller]
fn answered_by(resp: &Response) -> (String, String) {
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    let v = resp.json();
    let field = |name: &str| {
        v["result"][name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .to_owned()
    };
    (field("by"), field("tag"))
}

/// Which upstream answers a plain call, over a keep-alive client.
async fn who(client: &mut Client, n: u64) -> String {
    let resp = client.post("/", body(n, "whoami", json!([]))).await;
    answered_by(&resp).0
}

fn two(a: &FakeUpstream, b: &FakeUpstream) -> Config {
    config_for(&[a.url(), b.url()], 1)
}

/// Upstream `a` stops reading while `b` still refuses handshakes. A big call fills `a`'s
/// socket, many small calls queue behind it; `b` comes up; `a` reads the big call and nothing
/// more, so the gateway takes the next lot of small calls off the queue and writes until the
/// socket is full again; then `a` closes its connection. Returns each call's tag and answer,
/// after `a` has read (and logged) everything that reached its socket.
async fn a_connection_dies_mid_write() -> (FakeUpstream, FakeUpstream, Vec<(String, Response)>) {
    // More than the gateway takes off a connection's queue at once (256), so some stay queued.
    const CALLS: usize = 300;
    const PAD: usize = 64 * 1024;
    // More than the kernel buffers of a loopback socket hold.
    const BIG: usize = 8 * 1024 * 1024;
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    answering(&b, "b");
    b.reject_handshakes(Some(StatusCode::SERVICE_UNAVAILABLE));
    let mut config = two(&a, &b);
    config.http.max_body_bytes = 2 * BIG;
    // Room for all of it: this is about failover, not the memory budget.
    config.limits.connection_bytes = 8 * BIG;
    config.limits.upstream_queue_bytes = 8 * BIG;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    a.freeze();

    // Streams of two HTTP/2 connections: hundreds of connects at once would overflow the
    // listen backlog.
    let clients = [
        H2Client::connect(gw.addr).await,
        H2Client::connect(gw.addr).await,
    ];
    let send = |i: usize, method: &str, tag: &str, pad: usize| {
        let client = clients[i % 2].clone();
        // Written out by hand: building megabytes through `json!` is slow in debug builds.
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"{method}","params":["{tag}","{}"]}}"#,
            "x".repeat(pad)
        );
        tokio::spawn(async move { client.post("/", body).await })
    };
    let mut calls = vec![("big".to_owned(), send(0, "upload", "big", BIG))];
    // Bytes in a's socket: the gateway is writing the big call, alone.
    eventually(|| a.unread_bytes(0) > 0).await;
    for i in 1..=CALLS {
        let tag = format!("call-{i}");
        calls.push((tag.clone(), send(i, "put", &tag, PAD)));
    }
    eventually(|| gw.upstreams.pending_calls() == CALLS + 1).await;
    b.reject_handshakes(None);
    gw.wait_open(2).await;

    a.unfreeze_for(1);
    a.wait_for_method("upload", 1).await;
    // New bytes after the big call: the gateway took more calls off the queue.
    eventually(|| a.unread_bytes(0) > 0).await;
    a.stop_accepting().await;
    a.close_all(Close::Code(1001));

    let mut answers = Vec::with_capacity(calls.len());
    for (tag, call) in calls {
        answers.push((tag, with_timeout(call).await.expect("call task")));
    }
    // What reached a's socket is still in the kernel's buffers: read it all.
    a.unfreeze();
    a.wait_for_open_connections(0).await;
    drop(gw);
    (a, b, answers)
}

#[tokio::test]
async fn calls_still_queued_when_a_connection_dies_go_to_another_upstream() {
    let (a, b, answers) = a_connection_dies_mid_write().await;
    let at_a: HashSet<String> = tags_seen(&a).into_iter().collect();
    let at_b = tags_seen(&b);
    let at_b_set: HashSet<&String> = at_b.iter().collect();
    assert_eq!(at_b.len(), at_b_set.len(), "b ran some call twice");

    let mut moved = 0;
    for (tag, resp) in &answers {
        match resp.status {
            StatusCode::OK => {
                assert_eq!(answered_by(resp), ("b".to_owned(), tag.clone()));
                moved += 1;
            }
            StatusCode::BAD_GATEWAY => {
                assert_eq!(error_code(&resp.json()), -32081, "{tag}");
                assert!(!at_b_set.contains(tag), "{tag} failed yet ran on b");
            }
            other => panic!("{tag}: unexpected {other}: {}", resp.text()),
        }
        assert!(
            !(at_a.contains(tag) && at_b_set.contains(tag)),
            "{tag} ran on both upstreams"
        );
    }
    assert!(moved > 0, "no queued call was moved to b");
    assert_eq!(moved, at_b.len(), "every call b ran was answered");
}

#[tokio::test]
async fn calls_taken_for_writing_but_never_written_go_to_another_upstream_too() {
    // A write stopped by a full socket leaves unwritten only what is in the WebSocket writer's
    // buffer (up to 128 KiB plus the frame that overflowed it) and the frame about to enter
    // it: six of these 64 KiB calls at most.
    const UNWRITTEN_AT_MOST: usize = 6;
    let (a, _b, answers) = a_connection_dies_mid_write().await;
    let at_a: HashSet<String> = tags_seen(&a).into_iter().collect();
    let never_sent: Vec<&String> = answers
        .iter()
        .filter(|(tag, resp)| resp.status == StatusCode::BAD_GATEWAY && !at_a.contains(tag))
        .map(|(tag, _)| tag)
        .collect();
    assert!(
        never_sent.len() <= UNWRITTEN_AT_MOST,
        "{} calls got 502 although upstream a never received them (it received {}, {} went \
         to b); calls that never reached the socket must go to b",
        never_sent.len(),
        at_a.len(),
        answers
            .iter()
            .filter(|(_, resp)| resp.status == StatusCode::OK)
            .count()
    );
}

#[tokio::test]
async fn an_upstream_crashing_under_load_never_runs_a_call_twice() {
    const CLIENTS: usize = 20;
    const CALLS: usize = 30;
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    for (up, name) in [(&a, "a"), (&b, "b")] {
        up.auto_reply_with_delay(Duration::from_millis(3), move |f| {
            let tag = f
                .params()
                .and_then(|p| p.get(0))
                .cloned()
                .unwrap_or_default();
            Some(f.result_text(json!({"by": name, "tag": tag})))
        });
    }
    let gw = start_gateway(config_for(&[a.url(), b.url()], 2)).await;
    gw.wait_open(4).await;

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = gw.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut answers = Vec::with_capacity(CALLS);
                for i in 0..CALLS {
                    let tag = format!("{c}-{i}");
                    let resp = client.post("/", body(i as u64, "put", json!([tag]))).await;
                    answers.push((tag, resp));
                }
                answers
            })
        })
        .collect();
    // Crash a while calls flow to both.
    eventually(|| a.frames_received() + b.frames_received() >= CLIENTS * CALLS / 3).await;
    a.stop_accepting().await;
    a.close_all(Close::Abrupt);

    let mut answers = Vec::new();
    for client in clients {
        answers.extend(
            with_timeout_of(Duration::from_secs(30), client)
                .await
                .expect("client"),
        );
    }
    let at_a: HashSet<String> = tags_seen(&a).into_iter().collect();
    let at_b: HashSet<String> = tags_seen(&b).into_iter().collect();
    let mut lost = 0;
    for (tag, resp) in &answers {
        assert!(
            !(at_a.contains(tag) && at_b.contains(tag)),
            "{tag} ran on both upstreams"
        );
        match resp.status {
            StatusCode::OK => {
                let (by, echoed) = answered_by(resp);
                assert_eq!(&echoed, tag);
                let ran = if by == "a" { &at_a } else { &at_b };
                assert!(
                    ran.contains(tag),
                    "{tag} answered by {by}, which never got it"
                );
            }
            StatusCode::BAD_GATEWAY => {
                assert_eq!(error_code(&resp.json()), -32081, "{tag}");
                assert!(!at_b.contains(tag), "{tag} failed, yet b ran it");
                lost += 1;
            }
            other => panic!("{tag}: unexpected {other}: {}", resp.text()),
        }
    }
    // Only calls in flight on a's sockets can have been lost: one per client at most.
    assert!(lost <= CLIENTS, "{lost} calls lost");

    // Once the gateway knows a is gone, everything goes to b.
    eventually(|| gw.upstreams.open_connections() == 2).await;
    let mut client = Client::connect(gw.addr).await;
    for i in 0..20 {
        let resp = client.post("/", body(i, "put", json!(["after"]))).await;
        assert_eq!(answered_by(&resp).0, "b");
    }
}

/// `a` receives one `method` call and holds it; `b` comes up; `a`'s connection dies.
async fn a_written_call_dies_with_its_connection(
    method: &str,
    retry: bool,
) -> (FakeUpstream, FakeUpstream, Response) {
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    answering(&b, "b");
    b.reject_handshakes(Some(StatusCode::SERVICE_UNAVAILABLE));
    let mut config = two(&a, &b);
    if retry {
        config.balance.retry_methods = vec![method.to_owned()];
    }
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let call = tokio::spawn(post(gw.addr, "/", body(1, method, json!(["t-1"]))));
    let frame = a.next_frame().await;
    assert_eq!(frame.method(), Some(method));
    b.reject_handshakes(None);
    gw.wait_open(2).await;
    a.stop_accepting().await;
    frame.close(Close::Abrupt);
    let resp = with_timeout(call).await.expect("call task");
    drop(gw);
    (a, b, resp)
}

#[tokio::test]
async fn a_written_call_is_not_sent_again_when_its_connection_dies() {
    let (a, b, resp) = a_written_call_dies_with_its_connection("transfer", false).await;
    assert_eq!(
        resp.status,
        StatusCode::BAD_GATEWAY,
        "body: {}",
        resp.text()
    );
    assert_eq!(error_code(&resp.json()), -32081);
    assert_eq!(a.count_method("transfer"), 1);
    assert_eq!(
        b.count_method("transfer"),
        0,
        "it may have run: never twice"
    );
}

#[tokio::test]
async fn a_written_call_to_a_retry_method_is_sent_again_elsewhere() {
    let (a, b, resp) = a_written_call_dies_with_its_connection("get_balance", true).await;
    assert_eq!(answered_by(&resp), ("b".to_owned(), "t-1".to_owned()));
    assert_eq!(a.count_method("get_balance"), 1);
    assert_eq!(b.count_method("get_balance"), 1);
}

#[tokio::test]
async fn weights_share_plain_calls() {
    const CALLS: u64 = 400;
    let light = FakeUpstream::start().await;
    let heavy = FakeUpstream::start().await;
    answering(&light, "light");
    answering(&heavy, "heavy");
    let mut config = two(&light, &heavy);
    config.upstreams[1].weight = 3;
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;

    let mut client = Client::connect(gw.addr).await;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for n in 0..CALLS {
        *counts.entry(who(&mut client, n).await).or_default() += 1;
    }
    let heavy = counts.get("heavy").copied().unwrap_or(0);
    // Expect 3/4 of the calls.
    assert!(
        heavy * 100 > CALLS * 60,
        "weight 3 got {heavy} of {CALLS}: {counts:?}"
    );
    assert!(
        heavy * 100 < CALLS * 90,
        "weight 1 got almost nothing: {counts:?}"
    );
}

/// Whether the gateway currently counts the upstream at `url` as healthy.
fn healthy(gw: &TestGateway, url: &str) -> bool {
    gw.upstreams
        .snapshot()
        .iter()
        .find(|u| u.url == url)
        .is_some_and(|u| u.is_healthy())
}

#[tokio::test]
async fn a_failing_health_check_takes_an_upstream_out_until_it_passes_again() {
    let good = FakeUpstream::start().await;
    let sick = FakeUpstream::start().await;
    let passing = Arc::new(AtomicBool::new(false));
    {
        let passing = passing.clone();
        sick.auto_reply(move |f| match f.method() {
            Some("health") if passing.load(Ordering::SeqCst) => Some(f.result_text(json!("ok"))),
            Some("health") => Some(f.error_text(-32000, "database unreachable")),
            _ => Some(f.result_text(json!({"by": "sick", "tag": ""}))),
        });
    }
    good.auto_reply(|f| Some(f.result_text(json!({"by": "good", "tag": ""}))));
    let mut config = two(&good, &sick);
    config.balance.health_method = Some("health".into());
    config.balance.health_params = Some(r#"{"deep":true}"#.into());
    config.balance.health_interval = Duration::from_millis(50);
    let gw = start_gateway(config).await;
    gw.wait_open(2).await;

    sick.wait_for_method("health", 1).await;
    let check = sick
        .received()
        .into_iter()
        .find(|r| r.method() == Some("health"));
    assert_eq!(
        check.and_then(|r| r.params().cloned()),
        Some(json!({"deep": true}))
    );
    eventually(|| !healthy(&gw, &sick.url())).await;
    let mut client = Client::connect(gw.addr).await;
    for n in 0..40 {
        assert_eq!(
            who(&mut client, n).await,
            "good",
            "call {n} reached the sick upstream"
        );
    }

    passing.store(true, Ordering::SeqCst);
    eventually(|| healthy(&gw, &sick.url())).await;
    let mut seen = HashSet::new();
    for n in 0..40 {
        seen.insert(who(&mut client, n).await);
    }
    assert!(
        seen.contains("sick"),
        "back in rotation once healthy: {seen:?}"
    );
}

fn with_auth(mut config: Config) -> Config {
    // What `params = '["${API_TOKEN}"]'` in the file becomes once expanded.
    config.on_connect = vec![PreludeCall {
        method: "auth".into(),
        params: Some(r#"["s3cret"]"#.into()),
    }];
    config
}

/// Accepts `auth` only with the right token; answers everything else with its name.
fn guarded(up: &FakeUpstream, name: &'static str, token: &'static str) {
    up.auto_reply(move |f| match f.method() {
        Some("auth") if f.params() == Some(&json!([token])) => Some(f.result_text(json!(true))),
        Some("auth") => Some(f.error_text(-32001, "bad token")),
        _ => Some(f.result_text(json!({"by": name, "tag": ""}))),
    });
}

#[tokio::test]
async fn on_connect_calls_run_first_on_every_new_connection() {
    let up = FakeUpstream::start().await;
    guarded(&up, "up", "s3cret");
    let gw = start_gateway(with_auth(config_for(&[up.url()], 2))).await;
    gw.wait_open(2).await;
    let mut client = Client::connect(gw.addr).await;
    for n in 0..10 {
        assert_eq!(who(&mut client, n).await, "up");
    }

    up.close_all(Close::Abrupt);
    up.wait_for_connections(4).await;
    let mut client = Client::connect(gw.addr).await;
    for n in 0..10 {
        assert_eq!(who(&mut client, n).await, "up");
    }

    for conn in 0..4 {
        let methods = up.methods_on(conn);
        assert_eq!(
            methods.first().map(String::as_str),
            Some("auth"),
            "conn {conn}: {methods:?}"
        );
        assert_eq!(
            methods.iter().filter(|m| *m == "auth").count(),
            1,
            "conn {conn}: {methods:?}"
        );
    }
    let calls: usize = (0..4).map(|c| up.methods_on(c).len() - 1).sum();
    assert_eq!(
        calls, 20,
        "every call went over an authenticated connection"
    );
}

#[tokio::test]
async fn an_upstream_refusing_on_connect_gets_no_traffic() {
    let good = FakeUpstream::start().await;
    let wrong = FakeUpstream::start().await;
    guarded(&good, "good", "s3cret");
    // This one expects another token.
    guarded(&wrong, "wrong", "other");
    let gw = start_gateway(with_auth(two(&good, &wrong))).await;
    gw.wait_open(1).await;
    wrong.wait_for_method("auth", 1).await;
    let mut client = Client::connect(gw.addr).await;
    for n in 0..20 {
        assert_eq!(who(&mut client, n).await, "good");
    }
    assert!(
        wrong.received().iter().all(|r| r.method() == Some("auth")),
        "only auth attempts reached it"
    );

    let mut config = with_auth(config_for(&[wrong.url()], 1));
    config.calls.connect_wait = Duration::from_millis(300);
    let alone = start_gateway(config).await;
    let resp = post(alone.addr, "/", body(1, "whoami", json!([]))).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        resp.text()
    );
    assert_eq!(error_code(&resp.json()), -32080);
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(wrong.received().iter().all(|r| r.method() == Some("auth")));
}

#[tokio::test]
async fn past_max_waiting_a_call_gets_503_at_once() {
    let up = FakeUpstream::start().await;
    let mut config = config_for(&[up.url()], 1);
    config.upstreams[0].max_in_flight = 1;
    config.balance.max_waiting = 1;
    // Long enough that only the waiting-room limit can answer within the test's timeout.
    config.calls.queue_timeout = Duration::from_secs(60);
    config.calls.request_timeout = Duration::from_secs(120);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let first = tokio::spawn(post(gw.addr, "/", body(1, "slow", json!([1]))));
    let held = up.next_frame().await;
    let mut second = tokio::spawn(post(gw.addr, "/", body(2, "slow", json!([2]))));
    let mut third = tokio::spawn(post(gw.addr, "/", body(3, "slow", json!([3]))));
    // One of the two waits for the slot; the other finds the waiting room full.
    let (refused, waiting) = with_timeout(async {
        tokio::select! {
            r = &mut second => (r, third),
            r = &mut third => (r, second),
        }
    })
    .await;
    let refused = refused.expect("call task");
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        refused.text()
    );
    assert_eq!(error_code(&refused.json()), -32083);
    assert_eq!(refused.header("retry-after"), Some("1"));

    held.reply_result(json!("first"));
    assert_eq!(
        with_timeout(first).await.expect("call task").status,
        StatusCode::OK
    );
    let next = up.next_frame().await;
    next.reply_result(json!("waited"));
    let resp = with_timeout(waiting).await.expect("call task");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["result"], "waited");
}
