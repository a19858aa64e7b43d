//! TLS on the JSON-RPC listener: HTTPS over HTTP/1.1 and HTTP/2, `wss://` clients,
//! clean refusals of plain HTTP and TLS 1.1, certificate reloads (a changed file, a bad
//! one, SIGHUP to the real binary) that leave open connections alone, and client
//! certificates (mTLS), required or optional, and as credentials naming a caller.
//!
//! Certificates are generated per run; every wait is for an observable effect (a new
//! handshake seeing the new certificate, a metric), bounded by the test timeout.

mod support;

use std::process::Stdio;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use rpcgate::config::{CertificateConfig, ClientAuth, MethodRules, TlsConfig};
use serde_json::json;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;

use support::admin::{eventually, metric};
use support::binary::{listening_on, rpcgate};
use support::gateway::{TestGateway, config_for, start_gateway};
use support::tls::{
    Ca, Files, Https, Leaf, TempFile, client_config, connect, h2_post, https_post,
    served_certificate,
};
use support::{FakeUpstream, raw_tcp, with_timeout};

const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"probe","params":["x"]}"#;

async fn echo_upstream() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!({"echo": f.params().cloned()}))));
    up
}

async fn tls_gateway(up: &FakeUpstream, tls: TlsConfig) -> TestGateway {
    let mut config = config_for(&[up.url()], 1);
    config.tls = Some(tls);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    gw
}

#[track_caller]
fn assert_echoed(resp: &support::Response) {
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["id"], 7, "{v}");
    assert_eq!(v["result"]["echo"], json!(["x"]), "{v}");
}

#[tokio::test]
async fn https_over_http1_and_http2_reaches_the_upstream() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("gw"));
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;

    let h1 = client_config(&ca, None, &["http/1.1"]);
    assert_echoed(&https_post(gw.addr, h1, CALL).await.expect("HTTPS/1.1"));

    let h2 = client_config(&ca, None, &["h2", "http/1.1"]);
    let (alpn, version, resp) = h2_post(gw.addr, h2, CALL).await.expect("HTTPS/2");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN chose h2");
    assert_eq!(version, http::Version::HTTP_2);
    assert_echoed(&resp);
}

#[tokio::test]
async fn a_wss_client_is_answered_over_the_tls_listener() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("gw"));
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;

    let tcp = with_timeout(tokio::net::TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/", gw.addr.port());
    let connector = Connector::Rustls(client_config(&ca, None, &["http/1.1"]));
    let (mut ws, resp) = with_timeout(tokio_tungstenite::client_async_tls_with_config(
        url,
        tcp,
        None,
        Some(connector),
    ))
    .await
    .expect("wss handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    with_timeout(ws.send(Message::text(CALL))).await.unwrap();
    let reply = loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(text))) => break text.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("the socket ended: {other:?}"),
        }
    };
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["result"]["echo"], json!(["x"]), "{v}");
}

/// A TLS 1.1 ClientHello: legacy version 3.2, no supported_versions extension, two
/// TLS 1.2-era cipher suites.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // cipher suites
    body.extend([0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0, 0, body.len() as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn plain_http_and_tls_1_1_are_refused_cleanly() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("gw"));
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;

    let mut plain = raw_tcp(gw.addr).await;
    let request = format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CALL}",
        CALL.len()
    );
    plain.write(request).await.unwrap();
    let got = plain.read_until_closed().await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.0 400"), "plain HTTP got {text:?}");
    assert!(
        text.contains("https://"),
        "the answer says what to do: {text:?}"
    );

    let mut old = raw_tcp(gw.addr).await;
    old.write(tls11_client_hello()).await.unwrap();
    let got = old.read_until_closed().await;
    // Nothing, or a TLS alert record (content type 21): never a handshake.
    assert!(got.is_empty() || got[0] == 21, "TLS 1.1 got {got:?}");

    eventually(async || metric(gw.admin, "rpcgate_tls_handshake_failures_total").await >= 2.0)
        .await;
    let h1 = client_config(&ca, None, &["http/1.1"]);
    assert_echoed(&https_post(gw.addr, h1, CALL).await.expect("still served"));
}

#[tokio::test]
async fn over_max_connections_a_tls_client_still_gets_its_503() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("gw"));
    let up = echo_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.tls = Some(files.config(None));
    config.http.max_connections = 1;
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let h1 = client_config(&ca, None, &["http/1.1"]);
    let mut held = Https::over(connect(gw.addr, h1.clone()).await.unwrap())
        .await
        .unwrap();
    assert_echoed(&held.post(CALL).await.unwrap());
    let refused = https_post(gw.addr, h1, CALL).await.expect("an answer");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["error"]["data"]["reason"], "max_connections");
}

/// Waits until a new handshake with `addr` is served `leaf`.
async fn wait_until_served(addr: std::net::SocketAddr, ca: &Ca, leaf: &Leaf) {
    let config = client_config(ca, None, &["http/1.1"]);
    eventually(async || {
        let stream = connect(addr, config.clone()).await;
        stream.is_ok_and(|s| served_certificate(&s) == leaf.der)
    })
    .await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_handshakes_and_open_connections_keep_going() {
    let ca = Ca::new("test CA");
    let first = ca.server("first");
    let files = Files::new(&first);
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;
    let h1 = client_config(&ca, None, &["http/1.1"]);
    let stream = connect(gw.addr, h1.clone()).await.unwrap();
    assert_eq!(served_certificate(&stream), first.der);
    let mut open = Https::over(stream).await.unwrap();
    assert_echoed(&open.post(CALL).await.unwrap());

    let second = ca.server("second");
    files.renew(&second);
    wait_until_served(gw.addr, &ca, &second).await;
    assert!(metric(gw.admin, r#"rpcgate_tls_reloads_total{result="ok"}"#).await >= 1.0);
    // The connection from before the reload is still served, on its old session.
    assert_echoed(&open.post(CALL).await.expect("the open connection"));
    assert_echoed(&https_post(gw.addr, h1, CALL).await.unwrap());
}

#[tokio::test]
async fn a_bad_new_certificate_keeps_the_one_in_use() {
    let ca = Ca::new("test CA");
    let first = ca.server("first");
    let files = Files::new(&first);
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;
    let errors = r#"rpcgate_tls_reloads_total{result="error"}"#;

    // A certificate whose key is not the one in the key file.
    let other = ca.server("other");
    files.cert.replace(&other.chain_pem);
    eventually(async || metric(gw.admin, errors).await >= 1.0).await;
    let h1 = client_config(&ca, None, &["http/1.1"]);
    let stream = connect(gw.addr, h1.clone()).await.unwrap();
    assert_eq!(
        served_certificate(&stream),
        first.der,
        "the old one is kept"
    );
    assert_echoed(&Https::over(stream).await.unwrap().post(CALL).await.unwrap());

    // Not a certificate at all: kept too; then a good pair is picked up.
    files.cert.replace("not a certificate");
    eventually(async || metric(gw.admin, errors).await >= 2.0).await;
    let renewed = ca.server("renewed");
    files.renew(&renewed);
    wait_until_served(gw.addr, &ca, &renewed).await;
}

#[tokio::test]
async fn required_client_certificates_are_verified_against_client_ca() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca.server("gw")).with_client_ca(&clients);
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(None)).await;

    let none = client_config(&ca, None, &["http/1.1"]);
    assert!(
        https_post(gw.addr, none, CALL).await.is_err(),
        "no certificate"
    );
    let stranger = Ca::new("another CA").client("mallory", "Elsewhere");
    let foreign = client_config(&ca, Some(&stranger), &["http/1.1"]);
    assert!(
        https_post(gw.addr, foreign, CALL).await.is_err(),
        "another CA's"
    );
    let alice = clients.client("alice", "Example");
    let good = client_config(&ca, Some(&alice), &["h2"]);
    let (_, _, resp) = h2_post(gw.addr, good, CALL)
        .await
        .expect("a valid certificate");
    assert_echoed(&resp);
    assert!(metric(gw.admin, "rpcgate_tls_handshake_failures_total").await >= 2.0);
}

#[tokio::test]
async fn optional_client_certificates_let_clients_without_one_in() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca.server("gw")).with_client_ca(&clients);
    let up = echo_upstream().await;
    let gw = tls_gateway(&up, files.config(Some(ClientAuth::Optional))).await;

    let none = client_config(&ca, None, &["http/1.1"]);
    assert_echoed(
        &https_post(gw.addr, none, CALL)
            .await
            .expect("no certificate"),
    );
    let alice = clients.client("alice", "Example");
    let with_one = client_config(&ca, Some(&alice), &["http/1.1"]);
    assert_echoed(
        &https_post(gw.addr, with_one, CALL)
            .await
            .expect("a valid one"),
    );
    let stranger = Ca::new("another CA").client("mallory", "Elsewhere");
    let foreign = client_config(&ca, Some(&stranger), &["http/1.1"]);
    assert!(
        https_post(gw.addr, foreign, CALL).await.is_err(),
        "a certificate sent must still verify"
    );
}

/// The real binary serving `files` (plus `tls_extra` in its `[tls]`) in front of `up`;
/// its address, and the config file, which must outlive it.
async fn run_binary(
    files: &Files,
    up: &FakeUpstream,
    tls_extra: &str,
    stderr: Stdio,
) -> (tokio::process::Child, std::net::SocketAddr, TempFile) {
    let path = |f: &TempFile| format!("{:?}", f.path().display().to_string());
    let mut toml = format!(
        "[tls]\ncert = {}\nkey = {}\n{tls_extra}",
        path(&files.cert),
        path(&files.key)
    );
    if let Some(ca) = &files.client_ca {
        toml.push_str(&format!("client_ca = {}\n", path(ca)));
    }
    toml.push_str(&format!(
        "[[upstreams]]\nurl = {:?}\nconnections = 1\n",
        up.url()
    ));
    let toml = TempFile::with_contents("config", &toml);
    let config = toml.path().display().to_string();
    let args = [
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
    ];
    let args = [&args[..], &["--log-format", "json"]].concat();
    let mut child = rpcgate(&args, stderr).spawn().expect("run rpcgate");
    let (addr, _stdout) = listening_on(&mut child).await;
    with_timeout(up.wait_for_open_connections(1)).await;
    (child, addr, toml)
}

#[tokio::test]
async fn the_client_certificate_subject_is_in_the_access_log() {
    use tokio::io::AsyncBufReadExt;

    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca.server("gw")).with_client_ca(&clients);
    let up = echo_upstream().await;
    let (mut child, addr, _config) = run_binary(&files, &up, "", Stdio::piped()).await;
    let alice = clients.client("alice", "Example");
    let config = client_config(&ca, Some(&alice), &["http/1.1"]);
    assert_echoed(&https_post(addr, config, CALL).await.expect("answered"));

    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let access = loop {
        let line = with_timeout(stderr.next_line()).await.unwrap();
        let line = line.expect("an access-log line before stderr ends");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["target"] == "rpcgate::access" {
            break v;
        }
    };
    assert_eq!(access["client_cert"], "CN=alice,O=Example", "{access}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_the_real_binary() {
    use support::binary::signal;

    let ca = Ca::new("test CA");
    let first = ca.server("first");
    let files = Files::new(&first);
    let up = echo_upstream().await;
    // Checked rarely: only the signal can explain a reload within the test.
    let (mut child, addr, _config) =
        run_binary(&files, &up, "reload_interval = \"1h\"\n", Stdio::null()).await;
    with_timeout(up.wait_for_open_connections(1)).await;
    let h1 = client_config(&ca, None, &["http/1.1"]);
    let stream = connect(addr, h1.clone()).await.unwrap();
    assert_eq!(served_certificate(&stream), first.der);
    let mut open = Https::over(stream).await.unwrap();
    assert_echoed(&open.post(CALL).await.unwrap());

    let second = ca.server("second");
    files.renew(&second);
    signal(&child, "-HUP");
    wait_until_served(addr, &ca, &second).await;
    assert_echoed(&open.post(CALL).await.expect("the open connection"));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped rpcgate"
    );
}

#[tokio::test]
async fn a_client_certificate_names_its_caller_and_that_callers_rules_apply() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca.server("gw")).with_client_ca(&clients);
    let up = echo_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    config.tls = Some(files.config(Some(ClientAuth::Optional)));
    config.auth.certificates = vec![CertificateConfig {
        subject: "CN=alice,*".into(),
        name: "alice".into(),
        methods: MethodRules {
            allow: vec!["probe".into()],
            deny: Vec::new(),
        },
    }];
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;

    let alice = client_config(
        &ca,
        Some(&clients.client("alice", "Example")),
        &["http/1.1"],
    );
    assert_echoed(
        &https_post(gw.addr, alice.clone(), CALL)
            .await
            .expect("alice"),
    );
    let other = r#"{"jsonrpc":"2.0","id":8,"method":"admin_peers"}"#;
    let resp = https_post(gw.addr, alice, other).await.expect("alice");
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], -32071);

    // A certificate the CA signed, but for a subject no rule names: 401.
    let bob = client_config(&ca, Some(&clients.client("bob", "Example")), &["http/1.1"]);
    let resp = https_post(gw.addr, bob, CALL).await.expect("bob");
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert!(resp.text().contains("certificate"), "{}", resp.text());
    // No certificate (optional at the TLS layer) and no key: 401 too.
    let none = client_config(&ca, None, &["http/1.1"]);
    let resp = https_post(gw.addr, none, CALL)
        .await
        .expect("no certificate");
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let series = "rpcgate_caller_calls_total{caller=\"alice\"}";
    assert_eq!(metric(gw.admin, series).await, 1.0);
}
