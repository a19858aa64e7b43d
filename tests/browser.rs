//! rpcgate from a real browser: headless Chromium (`tests/support/browser.rs`) loads a
//! page from one origin (a small server in the test) and calls rpcgate on another.

mod support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rpcgate::config::Config;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use support::FakeUpstream;
use support::browser::Browser;
use support::gateway::{TestGateway, config_for, start_gateway};
use tokio::net::TcpListener;

const PAGE: &str = "<!doctype html><html><head><meta charset=utf-8><title>t</title></head><body>test page</body></html>";

/// Serves the test page (and the JavaScript client) on a port of its own: an origin
/// other than the gateway's.
async fn page_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/rpcgate.js"
    ))
    .unwrap_or_default();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let client = client.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (body, kind) = match req.uri().path() {
                        "/rpcgate.js" => (client.clone(), "text/javascript"),
                        _ => (PAGE.to_string(), "text/html"),
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::OK)
                                .header("content-type", kind)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn gateway(up: &FakeUpstream, config: impl FnOnce(&mut Config)) -> TestGateway {
    let mut c = config_for(&[up.url()], 1);
    config(&mut c);
    let gw = start_gateway(c).await;
    gw.wait_open(1).await;
    gw
}

/// JavaScript that POSTs `body` to the gateway and yields the JSON answer, or
/// `"blocked: ..."` when the browser kept the answer from the page.
fn fetch_js(gw: SocketAddr, body: &Value) -> String {
    format!(
        r#"fetch("http://{gw}/", {{method: "POST", headers: {{"content-type": "application/json"}}, body: {body}}})
            .then(r => r.json()).catch(e => "blocked: " + e)"#,
        body = serde_json::to_string(&body.to_string()).unwrap()
    )
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_calls_and_batches_and_another_is_blocked() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!({"echo": f.method()}))));
    let page = page_server().await;
    let origin = format!("http://{page}");
    let gw = gateway(&up, |c| c.cors.allowed_origins = vec![origin.clone()]).await;
    let mut browser = Browser::start().await;
    let tab = browser.open(&format!("{origin}/")).await;

    let call = json!({"jsonrpc":"2.0","id":1.50,"method":"echo","params":["hi"]});
    let v = browser.eval(&tab, &fetch_js(gw.addr, &call)).await;
    assert_eq!(v["result"]["echo"], "echo", "{v}");
    let batch = json!([
        {"jsonrpc":"2.0","id":"a","method":"sum"},
        {"jsonrpc":"2.0","id":"b","method":"whoami"}
    ]);
    let v = browser.eval(&tab, &fetch_js(gw.addr, &batch)).await;
    assert_eq!(v[0]["id"], "a", "{v}");
    assert_eq!(v[1]["result"]["echo"], "whoami", "{v}");
    // The page can read the session header rpcgate exposes.
    let exposed = browser
        .eval(
            &tab,
            &format!(
                r#"fetch("http://{}/", {{method: "POST", headers: {{"content-type": "application/json", "rpcgate-session": "s1"}}, body: '{{"jsonrpc":"2.0","id":1,"method":"echo"}}'}}).then(r => r.status)"#,
                gw.addr
            ),
        )
        .await;
    assert_eq!(exposed, 200, "a custom header passes the preflight");

    // A gateway that allows some other origin: the browser blocks the page.
    let other = gateway(&up, |c| {
        c.cors.allowed_origins = vec!["http://elsewhere.example".into()]
    })
    .await;
    let v = browser.eval(&tab, &fetch_js(other.addr, &call)).await;
    assert!(v.as_str().is_some_and(|s| s.starts_with("blocked")), "{v}");
}

#[tokio::test]
async fn a_page_on_another_origin_cannot_open_a_websocket_unless_allowed() {
    let up = FakeUpstream::start().await;
    let page = page_server().await;
    let origin = format!("http://{page}");
    let open_js = |gw: SocketAddr| {
        format!(
            r#"new Promise(done => {{ const ws = new WebSocket("ws://{gw}/"); ws.onopen = () => {{ ws.close(); done("open"); }}; ws.onerror = () => done("refused"); }})"#
        )
    };
    let allowed = gateway(&up, |c| c.cors.allowed_origins = vec![origin.clone()]).await;
    let plain = gateway(&up, |_| {}).await;
    let mut browser = Browser::start().await;
    let tab = browser.open(&format!("{origin}/")).await;
    assert_eq!(browser.eval(&tab, &open_js(allowed.addr)).await, "open");
    assert_eq!(browser.eval(&tab, &open_js(plain.addr)).await, "refused");
}

/// The demo backend on a port of its own, for the client tests: it pushes (`notify_me`,
/// ticks) and asks (`ask`).
async fn demo_backend() -> (String, tokio_util::sync::CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/", listener.local_addr().expect("addr"));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(rpcgate_echo::serve(
        listener,
        std::sync::Arc::from("browser"),
        stop.clone(),
    ));
    (url, stop)
}

/// What `rpcgate demo` runs with: sessions with their own upstream socket, ticks tracked.
fn demo_config(backend: &str) -> Config {
    let mut c = config_for(&[backend.to_string()], 1);
    c.sessions.affinity = rpcgate::config::Affinity::Connection;
    c.subscriptions = vec![rpcgate::config::SubscriptionRule::preset("substrate").unwrap()];
    c
}

/// A gateway in front of the demo backend for a page on `origin`: sessions with their
/// own upstream socket (so the backend's pushes and questions reach the page), and the
/// ticks subscriptions tracked.
async fn client_gateway(backend: &str, origin: &str, websocket: bool) -> TestGateway {
    let mut c = demo_config(backend);
    c.cors.allowed_origins = vec![origin.to_string()];
    c.http.websocket = websocket;
    let gw = start_gateway(c).await;
    gw.wait_open(1).await;
    gw
}

/// The page's script: imports the client, connects to `gw` with `transports`, and runs
/// what the test checks. Yields an object the test reads.
fn client_js(gw: SocketAddr, transports: &str) -> String {
    format!(
        r#"(async () => {{
            const {{ connect }} = await import("/rpcgate.js");
            const rpc = await connect("http://{gw}/", {{ transports: {transports} }});
            const notes = [];
            rpc.on("notification", (m) => notes.push(m));
            rpc.handle("confirm", async (params) => "yes to " + params[0]);
            const echoed = await rpc.call("echo", ["hi"]);
            const batch = await rpc.batch([["sum", [1, 2]], ["whoami"]]);
            await rpc.call("notify_me", [{{ n: 1 }}]);
            const asked = await rpc.call("ask", ["ok?"]);
            for (let i = 0; i < 100 && notes.length === 0; i++) await new Promise(r => setTimeout(r, 50));
            let failed = null;
            try {{ await rpc.call("fail", [1]); }} catch (e) {{ failed = {{ code: e.code, message: e.message }}; }}
            const out = {{ transport: rpc.transport, session: rpc.session, echoed, batch, asked, notes, failed }};
            rpc.close();
            return out;
        }})()"#
    )
}

#[tokio::test]
async fn the_client_uses_the_websocket_and_falls_back_to_http_when_upgrades_are_refused() {
    let (backend, _stop) = demo_backend().await;
    let page = page_server().await;
    let origin = format!("http://{page}");
    let mut browser = Browser::start().await;
    let tab = browser.open(&format!("{origin}/")).await;
    for (websocket, expected) in [(true, "websocket"), (false, "http")] {
        let gw = client_gateway(&backend, &origin, websocket).await;
        let v = browser
            .eval(&tab, &client_js(gw.addr, r#"["websocket", "http"]"#))
            .await;
        assert_eq!(v["transport"], expected, "{v}");
        assert_eq!(v["echoed"], json!(["hi"]), "{v}");
        assert_eq!(v["batch"][0], 3, "{v}");
        assert_eq!(v["batch"][1], "browser", "{v}");
        assert_eq!(
            v["asked"],
            json!({"question": "ok?", "answer": "yes to ok?"}),
            "{v}"
        );
        assert_eq!(
            v["notes"][0],
            json!({"jsonrpc":"2.0","method":"notice","params":[{"n":1}]}),
            "{v}"
        );
        assert_eq!(v["failed"]["code"], -32000, "{v}");
        assert_eq!(
            v["session"].as_str().map(str::len),
            Some(32),
            "a 128-bit key in hex: {v}"
        );
    }
}

/// Waits in the page (bounded) until `condition` (a JS expression) holds.
fn wait_js(condition: &str) -> String {
    format!(
        r#"(async () => {{ for (let i = 0; i < 200; i++) {{ if ({condition}) return true; await new Promise(r => setTimeout(r, 50)); }} return false; }})()"#
    )
}

#[tokio::test]
async fn the_demo_page_calls_and_falls_back_in_a_browser() {
    let (backend, _stop) = demo_backend().await;
    let gw =
        support::gateway::start_gateway_with(demo_config(&backend), |g| g.with_demo_page()).await;
    gw.wait_open(1).await;
    let mut browser = Browser::start().await;
    let tab = browser.open(&format!("http://{}/demo/", gw.addr)).await;
    let transport = r#"document.getElementById("transport").textContent"#;
    let calls = r#"document.getElementById("calls").textContent"#;
    let pushed = r#"document.getElementById("pushed").textContent"#;
    assert_eq!(
        browser
            .eval(&tab, &wait_js(&format!(r#"{transport} === "websocket""#)))
            .await,
        true
    );
    browser
        .eval(&tab, r##"document.querySelector("#call button").click()"##)
        .await;
    assert_eq!(
        browser
            .eval(
                &tab,
                &wait_js(&format!(
                    r#"{calls}.includes('echo ["hello"] → ["hello"]')"#
                ))
            )
            .await,
        true
    );
    browser
        .eval(&tab, r#"document.getElementById("ticks").click()"#)
        .await;
    assert_eq!(
        browser
            .eval(
                &tab,
                &wait_js(&format!(r#"{pushed}.includes('"method":"ticks"')"#))
            )
            .await,
        true
    );

    // The button that forces the fallback: the same calls over HTTP.
    browser
        .eval(&tab, r#"document.getElementById("http").click()"#)
        .await;
    assert_eq!(
        browser
            .eval(&tab, &wait_js(&format!(r#"{transport} === "http""#)))
            .await,
        true
    );
    browser.eval(&tab, r##"document.getElementById("params").value = '["again"]'; document.querySelector("#call button").click()"##).await;
    assert_eq!(
        browser
            .eval(
                &tab,
                &wait_js(&format!(
                    r#"{calls}.includes('echo ["again"] → ["again"]')"#
                ))
            )
            .await,
        true
    );
}

#[tokio::test]
async fn a_pages_subscription_survives_an_upstream_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let first = tokio::spawn(rpcgate_echo::serve(
        listener,
        std::sync::Arc::from("one"),
        stop.clone(),
    ));
    let page = page_server().await;
    let origin = format!("http://{page}");
    let mut c = config_for(&[format!("ws://{addr}/")], 1);
    c.cors.allowed_origins = vec![origin.clone()];
    c.subscriptions = vec![rpcgate::config::SubscriptionRule::preset("substrate").unwrap()];
    let gw = start_gateway(c).await;
    gw.wait_open(1).await;
    let mut browser = Browser::start().await;
    let tab = browser.open(&format!("{origin}/")).await;
    let sub = browser
        .eval(
            &tab,
            &format!(
                r#"(async () => {{
                    const {{ connect }} = await import("/rpcgate.js");
                    window.rpc = await connect("http://{}/");
                    window.notes = []; window.gaps = [];
                    rpc.on("notification", (m) => notes.push(m));
                    rpc.on("gap", (g) => gaps.push(g));
                    return await rpc.call("ticks_subscribe", [50]);
                }})()"#,
                gw.addr
            ),
        )
        .await;
    assert!(sub.is_string(), "{sub}");
    let ticks_of_sub = format!(r#"notes.filter(m => m.params.subscription === {sub})"#);
    assert_eq!(
        browser
            .eval(&tab, &wait_js(&format!("{ticks_of_sub}.length >= 2")))
            .await,
        true
    );

    // The upstream restarts on the same address; rpcgate subscribes again.
    stop.cancel();
    let _ = support::with_timeout(first).await;
    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(rpcgate_echo::serve(
        listener,
        std::sync::Arc::from("two"),
        stop.clone(),
    ));

    // The page hears of the gap, then ticks again under the id it holds, counting afresh.
    assert_eq!(
        browser
            .eval(
                &tab,
                &wait_js(r#"gaps.some(g => g.reason === "upstream_reconnected")"#)
            )
            .await,
        true
    );
    assert_eq!(
        browser
            .eval(
                &tab,
                &wait_js(&format!(
                    "{ticks_of_sub}.some((m, i) => i > 0 && m.params.result === 1)"
                ))
            )
            .await,
        true,
        "ticks of the re-made subscription reach the page under its id"
    );
    browser.eval(&tab, "rpc.close()").await;
    stop.cancel();
}
