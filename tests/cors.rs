//! Browsers on other origins: CORS preflights and headers from tower-http's layer, the
//! session cookie across sites, and WebSocket upgrades checked against the same origins.

mod support;

use http::{Method, StatusCode};
use rpcgate::config::Config;
use serde_json::json;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::JSON;
use support::{FakeUpstream, request, with_timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "http://app.example:3000";

async fn gateway(up: &FakeUpstream, cors: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = config_for(&[up.url()], 1);
    cors(&mut config);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    gw
}

fn allow_app(config: &mut Config) {
    config.cors.allowed_origins = vec![APP.into()];
}

async fn preflight(gw: &TestGateway, path: &str, origin: &str, method: &str) -> support::Response {
    let headers = [
        ("origin", origin),
        ("access-control-request-method", method),
        (
            "access-control-request-headers",
            "content-type, rpcgate-session",
        ),
    ];
    request(gw.addr, Method::OPTIONS, path, &headers, "").await
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_with_what_it_may_do() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, allow_app).await;
    for (path, method) in [("/", "POST"), ("/events", "GET")] {
        let resp = preflight(&gw, path, APP, method).await;
        assert!(resp.status.is_success(), "{path}: {}", resp.status);
        assert_eq!(
            resp.header("access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        let methods = resp
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .to_ascii_uppercase();
        assert!(
            methods.contains("POST") && methods.contains("GET"),
            "{methods}"
        );
        let allowed = resp
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        for name in ["content-type", "rpcgate-session", "authorization"] {
            assert!(allowed.contains(name), "{name} not in {allowed:?}");
        }
        assert_eq!(resp.header("access-control-max-age"), Some("600"));
    }
    assert_eq!(
        up.frames_received(),
        0,
        "a preflight reaches nobody upstream"
    );
}

#[tokio::test]
async fn an_allowed_origins_call_gets_its_answer_with_cors_headers_and_a_disallowed_one_gets_none()
{
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("hi"))));
    let gw = gateway(&up, allow_app).await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"echo"}).to_string();
    let resp = request(
        gw.addr,
        Method::POST,
        "/",
        &[JSON, ("origin", APP)],
        body.clone(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["result"], "hi");
    assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
    let exposed = resp
        .header("access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("rpcgate-session") && exposed.contains("retry-after"),
        "{exposed}"
    );

    let evil = "http://evil.example";
    let resp = request(gw.addr, Method::POST, "/", &[JSON, ("origin", evil)], body).await;
    assert_eq!(
        resp.header("access-control-allow-origin"),
        None,
        "no CORS for {evil}"
    );
    let resp = preflight(&gw, "/", evil, "POST").await;
    assert_eq!(resp.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn without_cors_no_headers_are_added() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("hi"))));
    let gw = gateway(&up, |_| {}).await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"echo"}).to_string();
    let resp = request(gw.addr, Method::POST, "/", &[JSON, ("origin", APP)], body).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("access-control-allow-origin"), None);
    // And a preflight is just an OPTIONS request, refused like any non-POST.
    let resp = preflight(&gw, "/", APP, "POST").await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn any_origin_and_refusals_carry_cors_headers_too() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |c| c.cors.allowed_origins = vec!["*".into()]).await;
    // A refusal from the checks still carries the header, or the page could not read it.
    let resp = request(gw.addr, Method::POST, "/", &[("origin", APP)], "{}").await;
    assert_eq!(resp.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn with_credentials_the_issued_cookie_works_cross_site() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("hi"))));
    let gw = gateway(&up, |c| {
        allow_app(c);
        c.cors.allow_credentials = true;
        c.sessions.affinity = rpcgate::config::Affinity::Upstream;
        c.sessions.issue_cookie = true;
    })
    .await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"echo"}).to_string();
    let resp = request(gw.addr, Method::POST, "/", &[JSON, ("origin", APP)], body).await;
    assert_eq!(
        resp.header("access-control-allow-credentials"),
        Some("true")
    );
    let cookie = resp.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("SameSite=None") && cookie.contains("Secure"),
        "{cookie}"
    );
}

async fn upgrade(gw: &TestGateway, origin: Option<&str>) -> Result<u16, u16> {
    let mut req = format!("ws://{}/", gw.addr)
        .into_client_request()
        .expect("a request");
    if let Some(origin) = origin {
        req.headers_mut().insert("origin", origin.parse().unwrap());
    }
    match with_timeout(tokio_tungstenite::connect_async(req)).await {
        Ok((_, resp)) => Ok(resp.status().as_u16()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value =
                serde_json::from_slice(&body).expect("a JSON-RPC error body");
            assert_eq!(v["error"]["code"], -32099, "{v}");
            Err(resp.status().as_u16())
        }
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

#[tokio::test]
async fn websocket_upgrades_are_checked_against_the_same_origins() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, allow_app).await;
    assert_eq!(upgrade(&gw, Some(APP)).await, Ok(101));
    assert_eq!(upgrade(&gw, Some("http://evil.example")).await, Err(403));
    assert_eq!(
        upgrade(&gw, None).await,
        Ok(101),
        "not a browser: no Origin, no check"
    );

    // Without [cors], only a page from the gateway's own origin may open one.
    let plain = gateway(&up, |_| {}).await;
    assert_eq!(upgrade(&plain, Some(APP)).await, Err(403));
    let own = format!("http://{}", plain.addr);
    assert_eq!(upgrade(&plain, Some(&own)).await, Ok(101));
}
