//! Upstreams crash and restart under steady load. Every request still gets exactly one
//! answer, nobody gets another client's answer, a call that is not safe to repeat never
//! runs twice, and once the upstreams are back the gateway serves on all of them again.

mod support;

use http::StatusCode;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::gateway::{config_for, start_gateway};
use support::{Client, Close, FakeUpstream, with_timeout, with_timeout_of};
use tokio::sync::watch;

const NAMES: [&str; 3] = ["up-a", "up-b", "up-c"];
/// Gateway connections to each upstream.
const CONNECTIONS: usize = 2;
const CLIENTS: usize = 100;
/// Kill/restart cycles; each takes one upstream down while the others carry the load.
const CYCLES: usize = 10;
/// Answers the clients must collect between two chaos steps, so every step hits an
/// upstream with calls in flight and the load keeps flowing while one is down.
const CALLS_PER_STEP: usize = 300;
/// Calls one client makes at most, so the load ends even if the chaos side hangs.
const MAX_CALLS_PER_CLIENT: usize = 5_000;
/// `tx` changes state and is not in `retry_methods`; `get` is safe to repeat and is.
const TX: &str = "tx";
const GET: &str = "get";

/// Executions per nonce, summed over every upstream and every restart.
type Executions = Arc<Mutex<HashMap<String, u32>>>;

/// Makes `up` behave like a real backend: it runs each call (counts its nonce) and
/// answers with the nonce and its own name. Replies leave after a short random delay,
/// so a kill always finds calls written but not yet answered.
fn serve(up: &FakeUpstream, name: &'static str, executions: &Executions) {
    let executions = executions.clone();
    up.auto_reply_with_delay(Duration::from_millis(5), move |f| {
        let nonce = f.params()?.get("nonce")?.as_str()?.to_owned();
        *executions.lock().entry(nonce.clone()).or_default() += 1;
        Some(f.result_text(json!({ "nonce": nonce, "upstream": name })))
    });
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// 200 with this call's own result, from the named upstream.
    Answered(String),
    /// 502 -32081: the connection died with the call written.
    Lost,
    /// 503 -32080 or -32083: no upstream could take it.
    Unavailable,
}

struct Record {
    method: &'static str,
    nonce: String,
    outcome: Outcome,
}

/// One call on `client`, checked against the error contract; panics on anything else.
async fn call(client: &mut Client, method: &'static str, nonce: &str, id: usize) -> Outcome {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {"nonce": nonce}});
    let resp = client.post("/", body.to_string()).await;
    let v = resp.json();
    assert_eq!(
        v["id"],
        json!(id),
        "{method} {nonce}: the client's id comes back: {v}"
    );
    let code = v["error"]["code"].as_i64();
    match (resp.status, code) {
        (StatusCode::OK, None) => {
            assert_eq!(
                v["result"]["nonce"],
                Value::from(nonce),
                "{method} {nonce} got another call's answer: {v}"
            );
            let upstream = v["result"]["upstream"].as_str().unwrap_or_default();
            assert!(NAMES.contains(&upstream), "{method} {nonce}: {v}");
            Outcome::Answered(upstream.to_owned())
        }
        (StatusCode::BAD_GATEWAY, Some(-32081)) => Outcome::Lost,
        (StatusCode::SERVICE_UNAVAILABLE, Some(-32080 | -32083)) => Outcome::Unavailable,
        (status, _) => panic!("{method} {nonce}: undocumented answer {status}: {v}"),
    }
}

/// A keep-alive client calling in a loop, alternating methods, until `stop`.
async fn client_loop(
    addr: SocketAddr,
    c: usize,
    stop: Arc<AtomicBool>,
    answered: watch::Sender<usize>,
) -> Vec<Record> {
    let mut client = Client::connect(addr).await;
    let mut records = Vec::new();
    for i in 0..MAX_CALLS_PER_CLIENT {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let method = if (c + i).is_multiple_of(2) { TX } else { GET };
        let nonce = format!("c{c}-{i}");
        let outcome = call(&mut client, method, &nonce, i).await;
        records.push(Record {
            method,
            nonce,
            outcome,
        });
        answered.send_modify(|n| *n += 1);
    }
    records
}

/// Waits until the clients have collected `CALLS_PER_STEP` more answers.
async fn more_answers(answered: &mut watch::Receiver<usize>) {
    let target = *answered.borrow_and_update() + CALLS_PER_STEP;
    with_timeout(answered.wait_for(|&n| n >= target))
        .await
        .expect("the answer counter lives as long as the test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstreams_crashing_under_load_never_duplicate_or_cross_answers() {
    let executions: Executions = Arc::default();
    let mut ups: Vec<Option<FakeUpstream>> = Vec::new();
    for name in NAMES {
        let up = FakeUpstream::start().await;
        serve(&up, name, &executions);
        ups.push(Some(up));
    }
    let urls: Vec<String> = ups.iter().flatten().map(FakeUpstream::url).collect();
    let mut config = config_for(&urls, CONNECTIONS);
    config.balance.retry_methods = vec![GET.to_owned()];
    // Far beyond any step of this test: a 504 would only hide what happened to a call.
    config.calls.request_timeout = Duration::from_secs(60);
    let gw = start_gateway(config).await;
    gw.wait_open(NAMES.len() * CONNECTIONS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (answered_tx, mut answered) = watch::channel(0usize);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client_loop(gw.addr, c, stop.clone(), answered_tx.clone())))
        .collect();

    let crashes = [Close::Abrupt, Close::Reset, Close::Code(1011)];
    for cycle in 0..CYCLES {
        more_answers(&mut answered).await;
        let victim = cycle % NAMES.len();
        let Some(up) = ups[victim].take() else {
            unreachable!("every upstream is back before the next cycle");
        };
        let up = if cycle.is_multiple_of(2) {
            // The process dies: its port refuses connections until it is restarted.
            let addr = up.addr();
            up.shutdown(crashes[(cycle / 2) % crashes.len()]).await;
            // The load keeps flowing while it is down.
            more_answers(&mut answered).await;
            let up = FakeUpstream::start_on(addr)
                .await
                .unwrap_or_else(|e| panic!("restarting {} on {addr}: {e}", NAMES[victim]));
            serve(&up, NAMES[victim], &executions);
            with_timeout(up.wait_for_connections(CONNECTIONS)).await;
            up
        } else {
            // The connections drop but the process keeps listening.
            let before = up.total_connections();
            up.close_all(Close::Abrupt);
            with_timeout(up.wait_for_connections(before + CONNECTIONS)).await;
            up
        };
        ups[victim] = Some(up);
    }
    // One more round of load with everything back up, then stop.
    more_answers(&mut answered).await;
    stop.store(true, Ordering::Release);
    let mut records = Vec::new();
    let finished = with_timeout_of(
        Duration::from_secs(30),
        futures_util::future::join_all(clients),
    );
    for outcome in finished.await {
        records.extend(outcome.expect("client task"));
    }

    let executed = executions.lock().clone();
    let sent: HashSet<&str> = records.iter().map(|r| r.nonce.as_str()).collect();
    assert_eq!(sent.len(), records.len(), "every nonce was sent once");
    for nonce in executed.keys() {
        assert!(
            sent.contains(nonce.as_str()),
            "{nonce} ran but no client sent it"
        );
    }
    let (mut tx_lost, mut get_repeated, mut unavailable) = (0, 0, 0);
    for r in &records {
        let runs = executed.get(&r.nonce).copied().unwrap_or(0);
        match (r.method, &r.outcome) {
            (TX, Outcome::Answered(_)) => assert_eq!(runs, 1, "tx {} ran {runs} times", r.nonce),
            (TX, Outcome::Lost) => {
                tx_lost += 1;
                assert!(runs <= 1, "tx {} ran {runs} times", r.nonce);
            }
            (_, Outcome::Unavailable) => {
                unavailable += 1;
                if r.method == TX {
                    assert_eq!(runs, 0, "tx {} answered 503 but ran", r.nonce);
                }
            }
            (GET, Outcome::Answered(_)) => {
                assert!(runs >= 1, "get {} answered but never ran", r.nonce);
                if runs > 1 {
                    get_repeated += 1;
                }
            }
            (GET, Outcome::Lost) => panic!("get {} got 502 though it may be retried", r.nonce),
            (method, outcome) => unreachable!("{method} {outcome:?}"),
        }
    }
    // Guards the test itself: the kills must have caught calls written but not yet
    // answered, of both kinds (dozens of each per run).
    assert!(
        tx_lost > 0 && get_repeated > 0,
        "the kills caught too little: {} calls, {tx_lost} tx lost, {get_repeated} get rerun, \
         {unavailable} unavailable",
        records.len()
    );

    // Recovery: with every upstream back, the next 100 calls all succeed...
    gw.wait_open(NAMES.len() * CONNECTIONS).await;
    let mut client = Client::connect(gw.addr).await;
    let mut served = HashSet::new();
    for i in 0..100usize {
        let method = if i.is_multiple_of(2) { TX } else { GET };
        let nonce = format!("after-{i}");
        match call(&mut client, method, &nonce, i).await {
            Outcome::Answered(upstream) => served.insert(upstream),
            other => panic!("call {i} after recovery: {other:?}"),
        };
    }
    // ...and every upstream takes its share again.
    for i in 100..400 {
        if served.len() == NAMES.len() {
            break;
        }
        if let Outcome::Answered(upstream) = call(&mut client, GET, &format!("after-{i}"), i).await
        {
            served.insert(upstream);
        }
    }
    assert_eq!(
        served.len(),
        NAMES.len(),
        "served after recovery: {served:?}"
    );
    let executed = executions.lock();
    for i in (0..100).step_by(2) {
        assert_eq!(
            executed.get(&format!("after-{i}")),
            Some(&1),
            "tx after-{i}"
        );
    }
}
