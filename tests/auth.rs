//! Who may call, what, and how often, end to end against the real demo backend: API
//! keys (header, custom header, query parameter), JWTs (HS256, RS256, ES256, EdDSA
//! from a JWKS file that is re-read), method allow and deny lists per key and for
//! everyone, element by element in batches and on WebSockets, sessions tied to their
//! caller, and rate limits with their 429s.

mod support;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rpcgate::config::{
    Affinity, Config, JwtConfig, KeyConfig, MethodRules, RateLimitConfig, RateScope, parse_key_hash,
};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::admin::{eventually, metric};
use support::echo::Echo;
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::JSON;
use support::sse::open_sse;
use support::{Response, request, with_timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const ALICE: &str = "alice-secret-key";
const BOB: &str = "bob-secret-key";

fn rules(allow: &[&str], deny: &[&str]) -> MethodRules {
    MethodRules {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    }
}

fn key(name: &str, secret: &str, methods: MethodRules) -> KeyConfig {
    KeyConfig {
        name: name.into(),
        sha256: parse_key_hash(&rpcgate::config::key_hash(secret)).expect("a hash"),
        methods,
    }
}

/// Alice may call `echo` and `sum` and anything but `admin_*`; Bob anything not denied.
fn with_keys(config: &mut Config) {
    config.auth.keys = vec![
        key("alice", ALICE, rules(&["echo", "sum", "notify_me"], &[])),
        key("bob", BOB, MethodRules::default()),
    ];
    config.auth.methods = rules(&[], &["admin_*"]);
}

struct Setup {
    gw: TestGateway,
    _echo: Echo,
}

async fn gateway(adjust: impl FnOnce(&mut Config)) -> Setup {
    let echo = Echo::start("auth").await;
    let mut config = config_for(std::slice::from_ref(&echo.url), 1);
    adjust(&mut config);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    Setup { gw, _echo: echo }
}

fn body(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string()
}

async fn post_with(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Response {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    request(gw.addr, Method::POST, path, &all, body).await
}

async fn call_as(gw: &TestGateway, secret: &str, method: &str, params: Value) -> Response {
    let bearer = format!("Bearer {secret}");
    post_with(gw, "/", &[("authorization", &bearer)], body(method, params)).await
}

#[track_caller]
fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn without_a_credential_the_answer_is_401_with_a_bearer_challenge() {
    let s = gateway(with_keys).await;
    let resp = post_with(&s.gw, "/", &[], body("echo", json!([1]))).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer realm=\"rpcgate\"")
    );
    let v = resp.json();
    assert_eq!(code(&v), -32070);
    assert_eq!(v["error"]["data"]["kind"], "unauthorized");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no credential"),
        "{v}"
    );

    let resp = call_as(&s.gw, "not-a-key", "echo", json!([1])).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer realm=\"rpcgate\", error=\"invalid_token\"")
    );
    assert_eq!(code(&resp.json()), -32070);
    let missing = metric(
        s.gw.admin,
        "rpcgate_auth_failures_total{reason=\"missing\"}",
    )
    .await;
    let unknown = metric(
        s.gw.admin,
        "rpcgate_auth_failures_total{reason=\"unknown_key\"}",
    )
    .await;
    assert_eq!((missing, unknown), (1.0, 1.0));
}

#[tokio::test]
async fn a_known_key_calls_through_from_the_header_or_the_query() {
    let s = gateway(with_keys).await;
    let resp = call_as(&s.gw, ALICE, "echo", json!(["hi"])).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()["result"], json!(["hi"]));
    // The scheme is case-insensitive (RFC 6750).
    let lower = format!("bearer {BOB}");
    let resp = post_with(
        &s.gw,
        "/",
        &[("authorization", &lower)],
        body("echo", json!([2])),
    )
    .await;
    assert_eq!(resp.json()["result"], json!([2]));
    let path = format!("/?access_token={ALICE}");
    let resp = post_with(&s.gw, &path, &[], body("echo", json!([3]))).await;
    assert_eq!(resp.json()["result"], json!([3]));
    let alice = metric(s.gw.admin, "rpcgate_caller_calls_total{caller=\"alice\"}").await;
    let bob = metric(s.gw.admin, "rpcgate_caller_calls_total{caller=\"bob\"}").await;
    assert_eq!((alice, bob), (2.0, 1.0));
}

#[tokio::test]
async fn a_custom_header_holds_the_key_itself_and_the_query_can_be_turned_off() {
    let s = gateway(|c| {
        with_keys(c);
        c.auth.header = "x-api-key".into();
        c.auth.query_param = None;
    })
    .await;
    let resp = post_with(
        &s.gw,
        "/",
        &[("x-api-key", ALICE)],
        body("echo", json!([1])),
    )
    .await;
    assert_eq!(resp.json()["result"], json!([1]));
    // The bearer form is not read from another header name.
    let resp = call_as(&s.gw, ALICE, "echo", json!([1])).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let path = format!("/?access_token={ALICE}");
    let resp = post_with(&s.gw, &path, &[], body("echo", json!([1]))).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn anonymous_callers_are_let_in_when_not_required_and_held_to_the_global_rules() {
    let s = gateway(|c| {
        with_keys(c);
        c.auth.required = Some(false);
    })
    .await;
    let resp = post_with(&s.gw, "/", &[], body("echo", json!([1]))).await;
    assert_eq!(resp.json()["result"], json!([1]));
    let resp = post_with(&s.gw, "/", &[], body("admin_peers", json!([]))).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    // A key that is sent must still be a good one.
    let resp = call_as(&s.gw, "wrong", "echo", json!([1])).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------
// Methods
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_method_outside_the_rules_is_403_and_never_reaches_the_upstream() {
    let s = gateway(with_keys).await;
    let resp = call_as(&s.gw, ALICE, "whoami", json!([])).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    let v = resp.json();
    assert_eq!(code(&v), -32071);
    assert_eq!(v["id"], 1);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alice") && message.contains("whoami"),
        "{message}"
    );
    assert!(
        !message.contains(ALICE),
        "the secret must never be shown: {message}"
    );
    // Bob may call anything but the global deny list.
    let resp = call_as(&s.gw, BOB, "whoami", json!([])).await;
    assert_eq!(resp.json()["result"], "auth");
    let resp = call_as(&s.gw, BOB, "admin_peers", json!([])).await;
    assert_eq!(code(&resp.json()), -32071);
    // A refused notification is answered too: HTTP has no silence.
    let note = json!({"jsonrpc": "2.0", "method": "admin_x"}).to_string();
    let bearer = format!("Bearer {BOB}");
    let resp = post_with(&s.gw, "/", &[("authorization", &bearer)], note).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    let forbidden = metric(s.gw.admin, "rpcgate_calls_forbidden_total{caller=\"bob\"}").await;
    assert_eq!(forbidden, 2.0);
}

#[tokio::test]
async fn a_batch_is_checked_element_by_element_and_the_rest_runs() {
    for batch_mode in [
        rpcgate::config::BatchMode::Split,
        rpcgate::config::BatchMode::Forward,
    ] {
        let s = gateway(|c| {
            with_keys(c);
            c.http.batch = batch_mode;
        })
        .await;
        let batch = json!([
            {"jsonrpc": "2.0", "id": "a", "method": "echo", "params": [1]},
            {"jsonrpc": "2.0", "id": "b", "method": "whoami"},
            {"jsonrpc": "2.0", "method": "admin_x"},
            {"jsonrpc": "2.0", "id": "c", "method": "sum", "params": [2, 3]},
        ]);
        let bearer = format!("Bearer {ALICE}");
        let resp = post_with(&s.gw, "/", &[("authorization", &bearer)], batch.to_string()).await;
        assert_eq!(resp.status, StatusCode::OK, "{batch_mode:?}");
        let answers = resp.json();
        let by_id = |id: &str| {
            answers
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["id"] == id)
                .cloned()
                .unwrap_or_else(|| panic!("{batch_mode:?}: no answer for {id} in {answers}"))
        };
        assert_eq!(
            answers.as_array().unwrap().len(),
            3,
            "{batch_mode:?}: {answers}"
        );
        assert_eq!(by_id("a")["result"], json!([1]));
        assert_eq!(code(&by_id("b")), -32071);
        assert_eq!(by_id("c")["result"], 5);
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients and event streams
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_websocket_needs_a_credential_and_each_frame_is_checked() {
    let s = gateway(with_keys).await;
    let url = format!("ws://{}/", s.gw.addr);
    match with_timeout(tokio_tungstenite::connect_async(url.clone())).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::UNAUTHORIZED),
        other => panic!("an upgrade without a credential: {other:?}"),
    }
    let url = format!("ws://{}/?access_token={ALICE}", s.gw.addr);
    let (mut ws, _) = with_timeout(tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade");
    for (method, expect_ok) in [("echo", true), ("whoami", false)] {
        let frame = body(method, json!(["x"]));
        with_timeout(ws.send(Message::text(frame)))
            .await
            .expect("send");
        let answer = loop {
            match with_timeout(ws.next()).await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        };
        match expect_ok {
            true => assert_eq!(answer["result"], json!(["x"])),
            false => assert_eq!(code(&answer), -32071, "{answer}"),
        }
    }
    // The header works as well as the query.
    let mut req = format!("ws://{}/", s.gw.addr)
        .into_client_request()
        .unwrap();
    let bearer = format!("Bearer {BOB}");
    req.headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    with_timeout(tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade with the header");
}

#[tokio::test]
async fn a_session_belongs_to_its_caller_even_when_another_knows_its_key() {
    let s = gateway(|c| {
        with_keys(c);
        c.sessions.affinity = Affinity::Connection;
    })
    .await;
    assert_eq!(
        request(s.gw.addr, Method::GET, "/events?session=shared", &[], "")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let path = format!("/events?session=shared&access_token={ALICE}");
    let mut alice = open_sse(s.gw.addr, &path, &[]).await;
    assert_eq!(alice.status, StatusCode::OK);
    let first = with_timeout(alice.next_block())
        .await
        .expect("the open event");
    // The session as the client named it; the caller it is tied to stays inside.
    assert!(first.ends_with(r#"data: {"session":"shared"}"#), "{first}");
    // Same session key, other caller: Bob's push goes to Bob's session, not Alice's.
    let notify = |secret: &'static str, value: &'static str| {
        let bearer = format!("Bearer {secret}");
        let gw = &s.gw;
        async move {
            let headers = [
                ("authorization", bearer.as_str()),
                ("rpcgate-session", "shared"),
            ];
            let resp = post_with(gw, "/", &headers, body("notify_me", json!([value]))).await;
            assert_eq!(resp.json()["result"], true, "{}", resp.text());
        }
    };
    notify(BOB, "for bob").await;
    notify(ALICE, "for alice").await;
    let event = with_timeout(alice.next_event())
        .await
        .expect("a pushed event");
    assert_eq!(
        event.json()["params"],
        json!(["for alice"]),
        "{:?}",
        event.data
    );
}

// ---------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c =
        json!({"sub": "user-7", "iss": "https://id.example", "aud": "rpcgate", "exp": now() + 600});
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    c
}

fn token(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).expect("a token")
}

/// A file in a fresh temporary directory, removed when the test ends.
struct TempFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let dir = std::env::temp_dir().join(format!(
            "rpcgate-auth-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        TempFile { dir, path }
    }

    /// Replaces the contents in one rename, as a secret manager or `kubectl` does.
    fn replace(&self, contents: &[u8]) {
        let next = self.dir.join("next");
        std::fs::write(&next, contents).unwrap();
        std::fs::rename(&next, &self.path).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn jwt_config(adjust: impl FnOnce(&mut JwtConfig)) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        let mut jwt = JwtConfig {
            issuer: Some("https://id.example".into()),
            audience: Some("rpcgate".into()),
            leeway: Duration::ZERO,
            reload_interval: Duration::from_millis(20),
            ..JwtConfig::default()
        };
        adjust(&mut jwt);
        c.auth.jwt = Some(jwt);
    }
}

#[tokio::test]
async fn hs256_tokens_are_checked_for_signature_expiry_issuer_and_audience() {
    let secret = TempFile::new("secret", b"a shared secret of some length\n");
    let path = secret.path.clone();
    let s = gateway(jwt_config(|j| j.secret_file = Some(path))).await;
    let key = EncodingKey::from_secret(b"a shared secret of some length");
    let good = token(Algorithm::HS256, None, &key, &claims(json!({})));
    let resp = call_as(&s.gw, &good, "echo", json!([1])).await;
    assert_eq!(resp.json()["result"], json!([1]), "{}", resp.text());
    assert_eq!(
        metric(s.gw.admin, "rpcgate_caller_calls_total{caller=\"jwt\"}").await,
        1.0
    );

    let cases = [
        (claims(json!({"exp": now() - 60})), "expired"),
        (claims(json!({"iss": "https://other.example"})), "issuer"),
        (claims(json!({"aud": "someone-else"})), "audience"),
        (claims(json!({"nbf": now() + 600})), "not valid yet"),
    ];
    for (claims, why) in cases {
        let bad = token(Algorithm::HS256, None, &key, &claims);
        let resp = call_as(&s.gw, &bad, "echo", json!([1])).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{why}");
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(why), "{why}: {message}");
    }
    let mut no_exp = claims(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    let resp = call_as(
        &s.gw,
        &token(Algorithm::HS256, None, &key, &no_exp),
        "echo",
        json!([]),
    )
    .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "a token without exp");
    let forged = token(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"guess"),
        &claims(json!({})),
    );
    let resp = call_as(&s.gw, &forged, "echo", json!([])).await;
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "a token signed with another secret"
    );
}

#[tokio::test]
async fn the_methods_claim_selects_what_a_token_may_call() {
    let secret = TempFile::new("secret", b"another shared secret");
    let path = secret.path.clone();
    let s = gateway(jwt_config(|j| {
        j.secret_file = Some(path);
        j.methods = rules(&[], &["fail"]);
    }))
    .await;
    let key = EncodingKey::from_secret(b"another shared secret");
    let narrow = token(
        Algorithm::HS256,
        None,
        &key,
        &claims(json!({"rpcgate_methods": ["echo"]})),
    );
    assert_eq!(
        call_as(&s.gw, &narrow, "echo", json!([1])).await.json()["result"],
        json!([1])
    );
    assert_eq!(
        call_as(&s.gw, &narrow, "sum", json!([1, 2])).await.status,
        StatusCode::FORBIDDEN
    );
    // A space-separated string, as OAuth scopes are written.
    let spaced = token(
        Algorithm::HS256,
        None,
        &key,
        &claims(json!({"rpcgate_methods": "sum whoami"})),
    );
    assert_eq!(
        call_as(&s.gw, &spaced, "sum", json!([1, 2])).await.json()["result"],
        3
    );
    assert_eq!(
        call_as(&s.gw, &spaced, "echo", json!([])).await.status,
        StatusCode::FORBIDDEN
    );
    // No claim: anything the configured rules allow, which deny `fail`.
    let open = token(Algorithm::HS256, None, &key, &claims(json!({})));
    assert_eq!(
        call_as(&s.gw, &open, "sum", json!([1, 2])).await.json()["result"],
        3
    );
    assert_eq!(
        call_as(&s.gw, &open, "fail", json!([])).await.status,
        StatusCode::FORBIDDEN
    );
    // An empty list allows nothing.
    let none = token(
        Algorithm::HS256,
        None,
        &key,
        &claims(json!({"rpcgate_methods": []})),
    );
    assert_eq!(
        call_as(&s.gw, &none, "echo", json!([])).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn rs256_and_es256_verify_with_pem_public_keys_and_no_algorithm_confusion() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let rsa_public = fixtures.join("jwt-test-rsa.pub.pem");
    let rsa_private = std::fs::read(fixtures.join("jwt-test-rsa.key.pem")).unwrap();
    let s = gateway(jwt_config(|j| j.public_key = Some(rsa_public.clone()))).await;
    let rsa = EncodingKey::from_rsa_pem(&rsa_private).unwrap();
    let good = token(Algorithm::RS256, None, &rsa, &claims(json!({})));
    assert_eq!(
        call_as(&s.gw, &good, "echo", json!([1])).await.json()["result"],
        json!([1])
    );
    // The public key's bytes used as an HMAC secret: the classic confusion attack.
    let public_bytes = std::fs::read(&rsa_public).unwrap();
    let confused = token(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&public_bytes),
        &claims(json!({})),
    );
    assert_eq!(
        call_as(&s.gw, &confused, "echo", json!([])).await.status,
        StatusCode::UNAUTHORIZED
    );
    drop(s);

    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec_public = TempFile::new("ec.pem", ec.public_key_pem().as_bytes());
    let path = ec_public.path.clone();
    let s = gateway(jwt_config(|j| j.public_key = Some(path))).await;
    let signing = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let good = token(Algorithm::ES256, None, &signing, &claims(json!({})));
    assert_eq!(
        call_as(&s.gw, &good, "echo", json!([2])).await.json()["result"],
        json!([2])
    );
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = token(
        Algorithm::ES256,
        None,
        &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap(),
        &claims(json!({})),
    );
    assert_eq!(
        call_as(&s.gw, &forged, "echo", json!([])).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// A JWKS holding the Ed25519 public key of `pair` under `kid`.
fn jwks(kid: &str, pair: &rcgen::KeyPair) -> Vec<u8> {
    use base64::Engine as _;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
    json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid, "x": x}]})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn eddsa_keys_come_from_a_jwks_file_that_is_re_read_when_it_changes() {
    let first = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let file = TempFile::new("jwks.json", &jwks("k1", &first));
    let path = file.path.clone();
    let s = gateway(jwt_config(|j| j.jwks = Some(path))).await;
    let sign = |pair: &rcgen::KeyPair, kid: &str| {
        let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
        token(Algorithm::EdDSA, Some(kid), &key, &claims(json!({})))
    };
    let by_first = sign(&first, "k1");
    let by_second = sign(&second, "k2");
    assert_eq!(
        call_as(&s.gw, &by_first, "echo", json!([1])).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call_as(&s.gw, &by_second, "echo", json!([1])).await.status,
        StatusCode::UNAUTHORIZED
    );

    // The provider rotates its key: the file now holds only the second.
    file.replace(&jwks("k2", &second));
    eventually(async || {
        call_as(&s.gw, &by_second, "echo", json!([1])).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(
        call_as(&s.gw, &by_first, "echo", json!([1])).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A broken file keeps the keys in use.
    let failed = "rpcgate_auth_key_reloads_total{result=\"error\"}";
    assert_eq!(metric(s.gw.admin, failed).await, 0.0);
    file.replace(b"{not json");
    eventually(async || metric(s.gw.admin, failed).await == 1.0).await;
    assert_eq!(
        call_as(&s.gw, &by_second, "echo", json!([1])).await.status,
        StatusCode::OK
    );
    let ok = metric(s.gw.admin, "rpcgate_auth_key_reloads_total{result=\"ok\"}").await;
    assert_eq!(ok, 1.0);
}

// ---------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------

fn limit(name: &str, scope: RateScope, rate: u32, per: Duration, burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        name: name.into(),
        scope,
        rate,
        per,
        burst,
        method: None,
        costs: Vec::new(),
    }
}

#[tokio::test]
async fn without_credentials_configured_an_authorization_header_is_nobody_s_business() {
    let s = gateway(|c| c.auth.methods = rules(&[], &["admin_*"])).await;
    let resp = call_as(&s.gw, "a token meant for someone else", "echo", json!([1])).await;
    assert_eq!(resp.json()["result"], json!([1]), "{}", resp.text());
    let resp = call_as(&s.gw, "whatever", "admin_peers", json!([])).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn past_its_burst_an_address_gets_429_with_retry_after() {
    let s = gateway(|c| {
        c.rate_limits = vec![limit(
            "per-address",
            RateScope::Address,
            1,
            Duration::from_secs(60),
            3,
        )];
    })
    .await;
    for i in 0..3 {
        let resp = post_with(&s.gw, "/", &[], body("echo", json!([i]))).await;
        assert_eq!(resp.json()["result"], json!([i]));
    }
    let resp = post_with(&s.gw, "/", &[], body("echo", json!([9]))).await;
    assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let v = resp.json();
    assert_eq!(code(&v), -32072);
    assert_eq!(v["id"], 1);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per-address"),
        "{v}"
    );
    let counted = metric(
        s.gw.admin,
        "rpcgate_rate_limited_total{caller=\"anonymous\",limit=\"per-address\"}",
    )
    .await;
    assert_eq!(counted, 1.0);
    assert_eq!(
        metric(
            s.gw.admin,
            "rpcgate_rate_limit_burst{limit=\"per-address\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn every_batch_element_counts_and_the_ones_past_the_limit_get_their_own_error() {
    let s = gateway(|c| {
        c.rate_limits = vec![limit(
            "a",
            RateScope::Address,
            1,
            Duration::from_secs(60),
            3,
        )];
    })
    .await;
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "echo", "params": [i]}))
        .collect();
    let resp = post_with(&s.gw, "/", &[], Value::from(batch).to_string()).await;
    assert_eq!(resp.status, StatusCode::OK);
    let answers = resp.json();
    let answers = answers.as_array().unwrap();
    let passed = answers.iter().filter(|a| a.get("result").is_some()).count();
    let limited = answers
        .iter()
        .filter(|a| a["error"]["code"] == -32072)
        .count();
    assert_eq!((passed, limited), (3, 2), "{answers:?}");
    // Nothing left: every element is refused, and the batch as a whole is a 429.
    let batch: Vec<Value> = (0..2)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "echo", "params": [i]}))
        .collect();
    let resp = post_with(&s.gw, "/", &[], Value::from(batch).to_string()).await;
    assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.header("retry-after").is_some());
    let answers = resp.json();
    assert_eq!(answers.as_array().map(Vec::len), Some(2), "{answers}");
    assert!(
        answers
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["error"]["code"] == -32072)
    );
}

#[tokio::test]
async fn per_key_limits_and_method_costs() {
    let s = gateway(|c| {
        with_keys(c);
        let mut alice = limit(
            "alice",
            RateScope::Caller("alice".into()),
            1,
            Duration::from_secs(60),
            4,
        );
        alice.costs = vec![("sum".into(), 3)];
        c.rate_limits = vec![alice];
    })
    .await;
    assert_eq!(
        call_as(&s.gw, ALICE, "sum", json!([1, 1])).await.json()["result"],
        2
    );
    assert_eq!(
        call_as(&s.gw, ALICE, "echo", json!([1])).await.status,
        StatusCode::OK
    );
    // Four tokens spent: three for the sum, one for the echo.
    assert_eq!(
        call_as(&s.gw, ALICE, "echo", json!([1])).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Bob has no limit.
    for _ in 0..10 {
        assert_eq!(
            call_as(&s.gw, BOB, "echo", json!([1])).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn a_limit_on_one_method_leaves_the_others_alone() {
    let s = gateway(|c| {
        let mut logs = limit(
            "sum-only",
            RateScope::Address,
            1,
            Duration::from_secs(60),
            1,
        );
        logs.method = Some("sum".into());
        c.rate_limits = vec![logs];
    })
    .await;
    assert_eq!(
        post_with(&s.gw, "/", &[], body("sum", json!([1, 2])))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post_with(&s.gw, "/", &[], body("sum", json!([1, 2])))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..5 {
        assert_eq!(
            post_with(&s.gw, "/", &[], body("echo", json!([])))
                .await
                .status,
            StatusCode::OK
        );
    }
}
