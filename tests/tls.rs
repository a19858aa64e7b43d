//! `wss://` upstreams: a per-upstream `ca_file` extends trust beyond webpki roots, a certificate
//! from an unknown CA is never accepted, an unusable `ca_file` stops startup, and an upstream
//! that requires a client certificate gets the configured one (mTLS).
//!
//! Certificates are generated per test run (nothing secret is committed); the upstream is a tiny
//! TLS WebSocket JSON-RPC server on 127.0.0.1 port 0.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use rustls::AlertDescription;
use rustls::server::WebPkiClientVerifier;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::task::AbortOnDropHandle;

use support::gateway::{config_for, start_gateway};
use support::tls::{Ca, Leaf, TempFile};
use support::{post, with_timeout};

const CALL: &str = r#"{"jsonrpc":"2.0","id":"tls-1","method":"probe","params":[1,"two"]}"#;

/// What the TLS upstream has seen so far.
#[derive(Debug, Default)]
struct Seen {
    /// TLS handshakes that failed on our side.
    tls_failures: usize,
    /// Why the first one failed, when rustls said (e.g. the client's alert).
    first_failure: Option<rustls::Error>,
    /// WebSocket handshakes completed over TLS.
    websockets: usize,
}

/// A `wss://` JSON-RPC server answering every call with
/// `{"tls":true,"params":<params>}`; stops (with every connection) when dropped.
struct TlsUpstream {
    port: u16,
    seen: watch::Receiver<Seen>,
    _task: AbortOnDropHandle<()>,
}

impl TlsUpstream {
    /// Serving `leaf`; with `clients`, only to clients with a certificate it issued.
    async fn start(leaf: &Leaf, clients: Option<&Ca>) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der()).expect("client CA");
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(leaf.chain(), leaf.key())
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let port = listener.local_addr().expect("local addr").port();
        let (seen_tx, seen) = watch::channel(Seen::default());
        let task = tokio::spawn(async move {
            // Owned here so that aborting this task drops, and so aborts, every connection.
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(serve(tcp, acceptor.clone(), seen_tx.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        TlsUpstream {
            port,
            seen,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Waits (bounded) until the upstream has seen what `done` asks for.
    async fn wait_for(&mut self, done: impl FnMut(&Seen) -> bool) {
        with_timeout(self.seen.wait_for(done))
            .await
            .expect("the upstream task is alive");
    }
}

async fn serve(tcp: TcpStream, acceptor: TlsAcceptor, seen: watch::Sender<Seen>) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            let reason = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned();
            seen.send_modify(|s| {
                s.tls_failures += 1;
                s.first_failure = s.first_failure.take().or(reason);
            });
            return;
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
        return;
    };
    seen.send_modify(|s| s.websockets += 1);
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(request) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let reply = json!({
            "jsonrpc": "2.0",
            "id": request["id"],
            "result": { "tls": true, "params": request["params"] },
        });
        if ws.send(Message::text(reply.to_string())).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn wss_upstream_with_extra_ca_file_is_trusted() {
    let pki = Ca::new("rpcgate test CA");
    let ca = TempFile::with_contents("ca", &pki.pem);
    let mut upstream = TlsUpstream::start(&pki.server("localhost"), None).await;
    let mut config = config_for(&[format!("wss://localhost:{}/", upstream.port)], 1);
    config.upstreams[0].ca_file = Some(ca.path().to_owned());
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    upstream.wait_for(|s| s.websockets == 1).await;

    let resp = post(gw.addr, "/", CALL).await;
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    let v = resp.json();
    assert_eq!(v["id"], "tls-1", "the client's id comes back: {v}");
    assert_eq!(v["result"]["tls"], true, "answered over TLS: {v}");
    assert_eq!(v["result"]["params"], json!([1, "two"]));
    assert_eq!(upstream.seen.borrow().tls_failures, 0);
}

#[tokio::test]
async fn wss_upstream_with_unknown_ca_is_never_trusted() {
    let pki = Ca::new("rpcgate test CA");
    let mut upstream = TlsUpstream::start(&pki.server("localhost"), None).await;
    let mut config = config_for(&[format!("wss://localhost:{}/", upstream.port)], 1);
    config.calls.connect_wait = Duration::from_millis(300);
    let gw = start_gateway(config).await;

    // The gateway did reach the server and refused its certificate: not a network failure.
    upstream.wait_for(|s| s.tls_failures >= 1).await;
    assert_eq!(
        upstream.seen.borrow().first_failure,
        Some(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
        "the gateway rejected the certificate's issuer"
    );

    let resp = post(gw.addr, "/", CALL).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "body: {}",
        resp.text()
    );
    let v = resp.json();
    assert_eq!(v["error"]["code"], -32080, "{v}");
    assert_eq!(v["id"], "tls-1", "{v}");

    // Retried (backoff is capped at 200ms in tests) and still refused, never opened.
    upstream.wait_for(|s| s.tls_failures >= 2).await;
    assert_eq!(upstream.seen.borrow().websockets, 0);
    assert_eq!(gw.upstreams.open_connections(), 0);
}

#[tokio::test]
async fn missing_or_empty_ca_file_is_a_startup_error() {
    let pki = Ca::new("rpcgate test CA");
    let empty = TempFile::with_contents("empty", "");
    let key_only = TempFile::with_contents("key-only", &pki.server("localhost").key_pem);
    let missing = std::env::temp_dir().join(format!(
        "rpcgate-tls-{}-surely-missing.pem",
        std::process::id()
    ));

    for path in [empty.path(), key_only.path(), missing.as_path()] {
        let mut config = config_for(&["wss://localhost:1/".to_string()], 1);
        config.upstreams[0].ca_file = Some(path.to_owned());
        let listener = with_timeout(TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("bind port 0");
        let err = match rpcgate::Gateway::from_listener(listener, config) {
            Ok(_) => panic!("{} was accepted as a CA file", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&path.display().to_string()),
            "the error names the file: {err}"
        );
    }
}

#[tokio::test]
async fn an_upstream_requiring_client_certificates_accepts_the_configured_one_only() {
    let pki = Ca::new("rpcgate test CA");
    let clients = Ca::new("upstream client CA");
    let ca = TempFile::with_contents("ca", &pki.pem);
    let gateway_cert = clients.client("rpcgate", "Example");
    let cert = TempFile::with_contents("client-chain", &gateway_cert.chain_pem);
    let key = TempFile::with_contents("client-key", &gateway_cert.key_pem);
    let mut upstream = TlsUpstream::start(&pki.server("localhost"), Some(&clients)).await;
    let url = format!("wss://localhost:{}/", upstream.port);

    let mut config = config_for(std::slice::from_ref(&url), 1);
    config.upstreams[0].ca_file = Some(ca.path().to_owned());
    config.upstreams[0].client_cert = Some(cert.path().to_owned());
    config.upstreams[0].client_key = Some(key.path().to_owned());
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    upstream.wait_for(|s| s.websockets == 1).await;
    let resp = post(gw.addr, "/", CALL).await;
    assert_eq!(resp.status, StatusCode::OK, "body: {}", resp.text());
    assert_eq!(resp.json()["result"]["tls"], true);
    drop(gw);

    // Without one, the upstream refuses every handshake and nothing opens.
    let mut config = config_for(&[url], 1);
    config.upstreams[0].ca_file = Some(ca.path().to_owned());
    config.calls.connect_wait = Duration::from_millis(300);
    let gw = start_gateway(config).await;
    upstream.wait_for(|s| s.tls_failures >= 2).await;
    assert_eq!(
        upstream.seen.borrow().websockets,
        1,
        "only the first gateway's"
    );
    let resp = post(gw.addr, "/", CALL).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
    assert_eq!(gw.upstreams.open_connections(), 0);
}

#[test]
fn client_cert_and_client_key_go_together_and_must_match() {
    let pki = Ca::new("rpcgate test CA");
    let one = pki.client("a", "Example");
    let other = pki.client("b", "Example");
    let cert = TempFile::with_contents("chain", &one.chain_pem);
    let key = TempFile::with_contents("key", &one.key_pem);
    let wrong = TempFile::with_contents("wrong-key", &other.key_pem);
    let problems = |cert: Option<&TempFile>, key: Option<&TempFile>| {
        let mut config = config_for(&["wss://localhost:1/".to_string()], 1);
        config.upstreams[0].client_cert = cert.map(|f| f.path().to_owned());
        config.upstreams[0].client_key = key.map(|f| f.path().to_owned());
        config.check().join("\n")
    };
    assert_eq!(problems(Some(&cert), Some(&key)), "");
    assert!(problems(Some(&cert), None).contains("set both or neither"));
    assert!(problems(None, Some(&key)).contains("set both or neither"));
    let mismatch = problems(Some(&cert), Some(&wrong));
    assert!(
        mismatch.contains("upstreams[0].client_key") && mismatch.contains("does not match"),
        "{mismatch}"
    );
}
