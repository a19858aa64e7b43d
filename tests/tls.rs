//! `wss://` upstreams: a per-upstream `ca_file` extends trust beyond webpki roots, a certificate
//! from an unknown CA is never accepted, and an unusable `ca_file` stops startup.
//!
//! Certificates are generated per test run (nothing secret is committed); the upstream is a tiny
//! TLS WebSocket JSON-RPC server on 127.0.0.1 port 0.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::AlertDescription;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::task::AbortOnDropHandle;

use support::gateway::{config_for, start_gateway};
use support::{post, with_timeout};

const CALL: &str = r#"{"jsonrpc":"2.0","id":"tls-1","method":"probe","params":[1,"two"]}"#;

/// A throwaway CA and a `localhost` / 127.0.0.1 server certificate it signed.
struct Pki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    /// PEM of the server's private key: a PEM file that holds no certificate.
    server_key_pem: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rpcgate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");

    let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");

    Pki {
        ca_pem: ca.pem(),
        server_chain: vec![cert.der().clone(), ca.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        server_key_pem: key.serialize_pem(),
    }
}

/// A file under the temp dir, unique per process and per call, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with_contents(tag: &str, contents: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("rpcgate-tls-{}-{n}-{tag}.pem", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

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
    async fn start(pki: &Pki) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                pki.server_chain.clone(),
                PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
            )
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
    let pki = pki();
    let ca = TempFile::with_contents("ca", &pki.ca_pem);
    let mut upstream = TlsUpstream::start(&pki).await;
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
    let pki = pki();
    let mut upstream = TlsUpstream::start(&pki).await;
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
    let pki = pki();
    let empty = TempFile::with_contents("empty", "");
    let key_only = TempFile::with_contents("key-only", &pki.server_key_pem);
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
