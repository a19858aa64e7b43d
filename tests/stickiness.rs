//! Sticky sessions, end to end: `affinity = "upstream"` keeps a session's calls on one
//! upstream; `affinity = "connection"` gives a session its own upstream WebSocket, which
//! comes back to the same upstream after a restart with its login replayed and the load
//! balancer's cookie sent again; issued cookies, the session table's limits, idle expiry.

mod support;

use http::{Method, StatusCode};
use parking_lot::Mutex;
use rpcgate::config::{Affinity, Config, WhenFull};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::JSON;
use support::{Client, Close, FakeUpstream, Response, request, with_timeout};

const HEADER: &str = "rpcgate-session";

fn body(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string()
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Calls `method` with extra request headers (a session header or cookie) on a fresh
/// connection. The future owns what it needs, so it can be spawned.
fn call_with(
    gw: &TestGateway,
    headers: &[(&str, &str)],
    method: &str,
) -> impl Future<Output = Response> + use<> {
    let addr = gw.addr;
    let owned: Vec<(String, String)> = [JSON]
        .iter()
        .chain(headers)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let body = body(method, json!([]));
    async move {
        let headers: Vec<(&str, &str)> = owned
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        request(addr, Method::POST, "/", &headers, body).await
    }
}

/// The `result` of a 200 answer.
#[track_caller]
fn result_of(resp: &Response) -> Value {
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    let v = resp.json();
    assert!(v.get("error").is_none(), "an error: {v}");
    v["result"].clone()
}

/// A session's `count` call: the number its upstream connection has counted to.
async fn count(gw: &TestGateway, session: &str) -> u64 {
    let resp = call_with(gw, &[(HEADER, session)], "count").await;
    result_of(&resp)
        .as_u64()
        .unwrap_or_else(|| panic!("count is not a number: {}", resp.text()))
}

/// Answers `whoami` with `name`.
fn named(up: &FakeUpstream, name: &'static str) {
    up.auto_reply(move |f| (f.method() == Some("whoami")).then(|| f.result_text(json!(name))));
}

/// Answers `count` with 1, 2, 3… per WebSocket connection, and `login` with `true` (or
/// with an error when `login_fails`).
fn counting(up: &FakeUpstream, login_fails: bool) {
    let counters: Mutex<HashMap<usize, u64>> = Mutex::new(HashMap::new());
    up.auto_reply(move |f| match f.method() {
        Some("count") => {
            let mut counters = counters.lock();
            let n = counters.entry(f.conn).or_default();
            *n += 1;
            Some(f.result_text(json!(*n)))
        }
        Some("login") if login_fails => Some(f.error_text(-32000, "unknown user")),
        Some("login") => Some(f.result_text(json!(true))),
        _ => None,
    });
}

/// The connection a frame calling `method` first arrived on.
#[track_caller]
fn conn_of(up: &FakeUpstream, method: &str) -> usize {
    up.received()
        .iter()
        .find(|r| r.method() == Some(method))
        .map(|r| r.conn)
        .unwrap_or_else(|| panic!("the upstream never received {method:?}"))
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

fn sessions_config(urls: &[String], affinity: Affinity) -> Config {
    let mut config = config_for(urls, 1);
    config.sessions.affinity = affinity;
    config
}

async fn three_named_upstreams() -> ([FakeUpstream; 3], TestGateway) {
    let ups = [
        FakeUpstream::start().await,
        FakeUpstream::start().await,
        FakeUpstream::start().await,
    ];
    for (up, name) in ups.iter().zip(["a", "b", "c"]) {
        named(up, name);
    }
    let urls: Vec<String> = ups.iter().map(FakeUpstream::url).collect();
    let gw = start_gateway(sessions_config(&urls, Affinity::Upstream)).await;
    gw.wait_open(3).await;
    (ups, gw)
}

/// Who answers `whoami` for a request carrying `headers`, over a keep-alive client.
async fn whoami(client: &mut Client, headers: &[(&str, &str)]) -> String {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    let resp = client
        .request(Method::POST, "/", &all, body("whoami", json!([])))
        .await;
    match result_of(&resp) {
        Value::String(name) => name,
        other => panic!("whoami answered {other}"),
    }
}

#[tokio::test]
async fn upstream_affinity_keeps_every_call_of_a_session_on_one_upstream() {
    let (_ups, gw) = three_named_upstreams().await;
    let mut client = Client::connect(gw.addr).await;
    let mut homes = HashMap::new();
    for s in 0..20 {
        let key = format!("session-{s}");
        let home = whoami(&mut client, &[(HEADER, &key)]).await;
        for call in 1..10 {
            let now = whoami(&mut client, &[(HEADER, &key)]).await;
            assert_eq!(now, home, "{key} call {call} moved");
        }
        homes.insert(key, home);
    }
    let used: HashSet<&String> = homes.values().collect();
    assert!(
        used.len() > 1,
        "20 sessions all landed on one upstream: {homes:?}"
    );
}

#[tokio::test]
async fn upstream_affinity_reads_the_key_from_the_session_cookie_too() {
    let (_ups, gw) = three_named_upstreams().await;
    let mut client = Client::connect(gw.addr).await;
    for s in 0..20 {
        let key = format!("session-{s}");
        let by_header = whoami(&mut client, &[(HEADER, &key)]).await;
        let cookie = format!("theme=dark; rpcgate_session={key}; lang=en");
        for _ in 0..5 {
            let by_cookie = whoami(&mut client, &[("cookie", &cookie)]).await;
            assert_eq!(
                by_cookie, by_header,
                "the same key by cookie goes elsewhere: {key}"
            );
        }
    }
}

#[tokio::test]
async fn upstream_affinity_still_balances_calls_without_a_key() {
    let (_ups, gw) = three_named_upstreams().await;
    let mut client = Client::connect(gw.addr).await;
    let mut seen = HashSet::new();
    for _ in 0..60 {
        seen.insert(whoami(&mut client, &[]).await);
    }
    assert!(seen.len() > 1, "60 keyless calls all went to {seen:?}");
}

#[tokio::test]
async fn connection_affinity_gives_each_session_its_own_upstream_socket() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let gw = start_gateway(sessions_config(&[up.url()], Affinity::Connection)).await;
    gw.wait_open(1).await;

    for expected in 1..=3 {
        assert_eq!(count(&gw, "alice").await, expected);
    }
    for expected in 1..=2 {
        assert_eq!(
            count(&gw, "bob").await,
            expected,
            "bob has a counter of his own"
        );
    }
    assert_eq!(count(&gw, "alice").await, 4, "alice's counter went on");
    // The pooled connection plus one per session.
    assert_eq!(up.total_connections(), 3);
    assert_ne!(
        up.received()
            .iter()
            .find(|r| r.method() == Some("count"))
            .map(|r| r.conn),
        Some(0),
        "session calls never use the pooled connection"
    );
}

#[tokio::test]
async fn a_restarted_upstream_gets_the_session_back_with_its_login_replayed_and_lb_cookie_sent() {
    let up = FakeUpstream::start().await;
    // The upstream's load balancer pins clients with a cookie.
    up.set_handshake_cookie(Some("lb=node-1; Path=/; HttpOnly".into()));
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.replay_methods = vec!["login".into()];
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let login = request(
        gw.addr,
        Method::POST,
        "/",
        &[JSON, (HEADER, "alice")],
        body("login", json!(["alice", "pw"])),
    )
    .await;
    assert_eq!(result_of(&login), json!(true));
    assert_eq!(count(&gw, "alice").await, 1);
    assert_eq!(count(&gw, "alice").await, 2);
    let first = conn_of(&up, "login");
    assert!(
        up.handshake_headers(first).get("cookie").is_none(),
        "nothing to send back on the first handshake"
    );

    let addr = up.addr();
    up.shutdown(Close::Abrupt).await;
    let up = FakeUpstream::start_on(addr)
        .await
        .expect("restart on the same port");
    counting(&up, false);
    up.wait_for_method("login", 1).await;

    assert_eq!(
        count(&gw, "alice").await,
        1,
        "the session is on a fresh socket of the restarted upstream"
    );
    let session = conn_of(&up, "login");
    assert_eq!(
        up.methods_on(session),
        ["login", "count"],
        "login was replayed before the session's next call"
    );
    let replayed = up
        .received()
        .into_iter()
        .find(|r| r.method() == Some("login"))
        .and_then(|r| r.params().cloned());
    assert_eq!(replayed, Some(json!(["alice", "pw"])), "replayed as sent");
    let cookie = up.handshake_headers(session).get("cookie").cloned();
    assert_eq!(
        cookie.as_ref().and_then(|c| c.to_str().ok()),
        Some("lb=node-1"),
        "the load balancer's cookie came back on reconnect"
    );
    assert_eq!(count(&gw, "alice").await, 2);
    assert_eq!(up.count_method("login"), 1, "replayed once, not per call");
}

#[tokio::test]
async fn a_failed_replay_fails_the_sessions_calls_with_502_naming_the_method() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.replay_methods = vec!["login".into()];
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let login = call_with(&gw, &[(HEADER, "alice")], "login").await;
    assert_eq!(result_of(&login), json!(true));
    assert_eq!(count(&gw, "alice").await, 1);

    let addr = up.addr();
    up.shutdown(Close::Abrupt).await;
    let up = FakeUpstream::start_on(addr)
        .await
        .expect("restart on the same port");
    // The restarted upstream has forgotten alice.
    counting(&up, true);
    // A second attempt is only made once the first one's failure was recorded.
    up.wait_for_method("login", 2).await;

    let resp = call_with(&gw, &[(HEADER, "alice")], "count").await;
    assert_eq!(
        resp.status,
        StatusCode::BAD_GATEWAY,
        "body: {}",
        resp.text()
    );
    let v = resp.json();
    assert_eq!(error_code(&v), -32085);
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("login"),
        "message names the method: {message}"
    );
    assert_eq!(up.count_method("count"), 0, "nothing ran without the login");
}

#[tokio::test]
async fn a_call_waiting_for_its_sessions_reconnect_learns_that_the_replay_failed() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.replay_methods = vec!["login".into()];
    config.calls.connect_wait = Duration::from_secs(4);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    let login = call_with(&gw, &[(HEADER, "alice")], "login").await;
    assert_eq!(result_of(&login), json!(true));

    let addr = up.addr();
    up.shutdown(Close::Abrupt).await;
    // Both the pooled and the session socket are known to be gone: the next call waits
    // for the session's reconnect instead of being written to a dead socket.
    eventually(|| gw.upstreams.open_connections() == 0).await;
    let waiting = tokio::spawn(call_with(&gw, &[(HEADER, "alice")], "count"));

    let up = FakeUpstream::start_on(addr)
        .await
        .expect("restart on the same port");
    // Logins are answered by hand, so the replay fails only after the call is waiting.
    up.auto_reply(|f| (f.method() != Some("login")).then(|| f.result_text(json!(0))));
    let replay = up.next_frame().await;
    assert_eq!(replay.method(), Some("login"));
    replay.reply_error(-32000, "unknown user");

    let resp = with_timeout(waiting).await.expect("call task");
    assert_eq!(
        (resp.status, error_code(&resp.json())),
        (StatusCode::BAD_GATEWAY, -32085),
        "the waiting call is told the session's state is gone, not to retry later: {}",
        resp.text()
    );
}

/// The `rpcgate_session=<key>` cookie an answer sets, with its attributes.
#[track_caller]
fn issued_cookie(resp: &Response) -> (String, Vec<String>) {
    let line = resp
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {:?}", resp.headers));
    let mut parts = line.split(';').map(str::trim);
    let pair = parts.next().unwrap_or_default();
    let key = pair
        .strip_prefix("rpcgate_session=")
        .unwrap_or_else(|| panic!("not the session cookie: {line}"));
    (key.to_owned(), parts.map(str::to_owned).collect())
}

#[tokio::test]
async fn issue_cookie_gives_keyless_clients_a_session_they_can_keep() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.issue_cookie = true;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let first = call_with(&gw, &[], "count").await;
    assert_eq!(result_of(&first), json!(1));
    let (key, attrs) = issued_cookie(&first);
    assert_eq!(key.len(), 32, "128 random bits in hex: {key}");
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{key}");
    assert_eq!(attrs, ["Path=/", "HttpOnly", "SameSite=Lax"]);

    let tls = call_with(&gw, &[("x-forwarded-proto", "https")], "count").await;
    assert_eq!(result_of(&tls), json!(1), "a new session of its own");
    let (other, attrs) = issued_cookie(&tls);
    assert_ne!(other, key);
    assert_eq!(attrs, ["Path=/", "HttpOnly", "SameSite=Lax", "Secure"]);

    let cookie = format!("rpcgate_session={key}");
    for expected in 2..=3 {
        let again = call_with(&gw, &[("cookie", &cookie)], "count").await;
        assert_eq!(result_of(&again), json!(expected), "back on its socket");
        assert_eq!(
            again.header("set-cookie"),
            None,
            "a kept key is not reissued"
        );
    }
}

#[tokio::test]
async fn a_full_session_table_rejects_new_sessions_with_503() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.max_sessions = 1;
    config.sessions.when_full = WhenFull::Reject;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    assert_eq!(count(&gw, "alice").await, 1);
    let resp = call_with(&gw, &[(HEADER, "bob")], "count").await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        resp.text()
    );
    assert_eq!(error_code(&resp.json()), -32086);
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(
        count(&gw, "alice").await,
        2,
        "the open session is untouched"
    );
    assert_eq!(up.total_connections(), 2, "no socket was opened for bob");
}

#[tokio::test]
async fn a_full_session_table_evicts_the_least_recently_used_session() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.max_sessions = 1;
    config.sessions.when_full = WhenFull::Evict;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    assert_eq!(count(&gw, "alice").await, 1);
    assert_eq!(count(&gw, "alice").await, 2);
    let alice = conn_of(&up, "count");
    assert_eq!(count(&gw, "bob").await, 1, "a new session gets in");
    let bob = up
        .received()
        .iter()
        .find(|r| r.method() == Some("count") && r.conn != alice)
        .map(|r| r.conn)
        .expect("bob's socket");
    up.wait_for_connection_end(alice).await;
    assert!(!up.connection_ended(bob));
    assert_eq!(
        count(&gw, "alice").await,
        1,
        "alice's session was closed; she starts afresh"
    );
    up.wait_for_connection_end(bob).await;
}

#[tokio::test]
async fn an_idle_session_is_closed_and_starts_afresh() {
    let up = FakeUpstream::start().await;
    counting(&up, false);
    let mut config = sessions_config(&[up.url()], Affinity::Connection);
    config.sessions.idle_timeout = Duration::from_millis(200);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    assert_eq!(count(&gw, "alice").await, 1);
    assert_eq!(count(&gw, "alice").await, 2);
    let socket = conn_of(&up, "count");
    up.wait_for_connection_end(socket).await;
    assert_eq!(
        count(&gw, "alice").await,
        1,
        "the expired session starts again on a new socket"
    );
    assert_eq!(up.total_connections(), 3);
}
