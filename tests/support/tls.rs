//! TLS for tests: throwaway CAs that issue server and client certificates, PEM files a
//! test can rewrite (to exercise reloads), and clients of the gateway's TLS listener.
//!
//! Nothing secret is committed: every key is generated per test run.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rpcgate::config::{ClientAuth, TlsConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::task::AbortOnDropHandle;

use super::http::{Error, JSON, Response, collect};
use super::with_timeout;

/// A certificate authority of one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its key, as PEM and as what rustls takes.
pub struct Leaf {
    /// The certificate then its issuer's: what a server presents.
    pub chain_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Leaf {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let pem = issuer.pem();
        Ca { issuer, pem }
    }

    /// The CA's own certificate, to trust it.
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `localhost` and 127.0.0.1, named `cn` (so two can be told apart).
    pub fn server(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, &[(DnType::CommonName, cn)])
    }

    /// A client certificate whose subject is `CN=<cn>,O=<org>`.
    pub fn client(&self, cn: &str, org: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(
            params,
            &[(DnType::OrganizationName, org), (DnType::CommonName, cn)],
        )
    }

    fn issue(&self, mut params: CertificateParams, names: &[(DnType, &str)]) -> Leaf {
        params.distinguished_name = DistinguishedName::new();
        for (ty, value) in names {
            params.distinguished_name.push(ty.clone(), *value);
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

/// A file under the temp dir, unique per process and per call, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn with_contents(tag: &str, contents: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("rpcgate-tls-{}-{n}-{tag}.pem", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Replaces the contents the way a renewal does: a new file renamed over the old.
    pub fn replace(&self, contents: &str) {
        let next = self.0.with_extension("next");
        std::fs::write(&next, contents).expect("write temp file");
        std::fs::rename(&next, &self.0).expect("rename temp file");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A gateway's certificate files, rewritable by the test.
pub struct Files {
    pub cert: TempFile,
    pub key: TempFile,
    pub client_ca: Option<TempFile>,
}

impl Files {
    pub fn new(leaf: &Leaf) -> Files {
        Files {
            cert: TempFile::with_contents("chain", &leaf.chain_pem),
            key: TempFile::with_contents("key", &leaf.key_pem),
            client_ca: None,
        }
    }

    pub fn with_client_ca(mut self, ca: &Ca) -> Files {
        self.client_ca = Some(TempFile::with_contents("client-ca", &ca.pem));
        self
    }

    pub fn config(&self, client_auth: Option<ClientAuth>) -> TlsConfig {
        TlsConfig {
            cert: self.cert.path().to_owned(),
            key: self.key.path().to_owned(),
            client_ca: self.client_ca.as_ref().map(|f| f.path().to_owned()),
            client_auth,
            // Small, so a test waiting for a reload waits little.
            reload_interval: Duration::from_millis(20),
            ..TlsConfig::default()
        }
    }

    /// Renews the way certificate tools do: the key first, then the chain.
    pub fn renew(&self, leaf: &Leaf) {
        self.key.replace(&leaf.key_pem);
        self.cert.replace(&leaf.chain_pem);
    }
}

/// A client trusting `ca`, presenting `identity` if given, offering `alpn`.
pub fn client_config(ca: &Ca, identity: Option<&Leaf>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("CA root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(leaf.chain(), leaf.key())
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `localhost` at `addr`; the error if the handshake fails.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    with_timeout(async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(config).connect(name, tcp).await
    })
    .await
}

/// The certificate the server presented on `stream`.
pub fn served_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a server certificate")
        .clone()
        .into_owned()
}

fn post_request(uri: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header(JSON.0, JSON.1)
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

/// HTTP/1.1 over an open TLS connection, kept alive for more requests.
pub struct Https {
    sender: http1::SendRequest<Full<Bytes>>,
    _driver: AbortOnDropHandle<Result<(), hyper::Error>>,
}

impl Https {
    pub async fn over(stream: TlsStream<TcpStream>) -> Result<Https, Error> {
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Https {
            sender,
            _driver: AbortOnDropHandle::new(tokio::spawn(conn)),
        })
    }

    /// POSTs `body` to `/`; connection-level failures (a refused client certificate
    /// shows up here under TLS 1.3) are the error.
    pub async fn post(&mut self, body: &str) -> Result<Response, Error> {
        with_timeout(async {
            self.sender.ready().await?;
            let response = self.sender.send_request(post_request("/", body)).await?;
            collect(response).await
        })
        .await
    }
}

/// Connects with `config` and POSTs `body` over HTTP/1.1: the whole exchange's error if
/// any step fails.
pub async fn https_post(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    body: &str,
) -> Result<Response, Error> {
    let stream = connect(addr, config).await?;
    Https::over(stream).await?.post(body).await
}

/// Connects with ALPN `h2` and POSTs `body` over HTTP/2; the negotiated protocol too.
pub async fn h2_post(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    body: &str,
) -> Result<(Option<Vec<u8>>, http::Version, Response), Error> {
    let stream = connect(addr, config).await?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    with_timeout(async move {
        let (mut sender, conn) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        let _driver = AbortOnDropHandle::new(tokio::spawn(conn));
        let response = sender
            .send_request(post_request("https://localhost/", body))
            .await?;
        let version = response.version();
        Ok((alpn, version, collect(response).await?))
    })
    .await
}
