//! TLS on the listeners: the certificate in force, swapped on reload without
//! touching open connections; the handshake; and who a client certificate names.
//!
//! A handshake takes the configuration current when it starts (an `Arc`), so a
//! reload only changes what later handshakes get. A reload reads every file again
//! and replaces the configuration only if all of them load and belong together: a
//! renewal written half-way keeps the certificate that works, with a warning saying
//! why, and the next change of a file tries again.

use crate::config::TlsConfig;
use crate::metrics::Metrics;
use crate::tls::{FileError, ServerConfigs, server_configs};
use parking_lot::{Mutex, RwLock};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The subject of the verified client certificate a request came with (mTLS), as
/// an RFC 4514 string, most specific part first: `CN=alice,O=Example`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub subject: Arc<str>,
}

/// Which listener a handshake is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Rpc,
    Admin,
}

/// The listeners' TLS: what is served now, and what it was loaded from.
pub struct Tls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfigs>>,
    /// The files as they were when last read, successfully or not: a failed reload is
    /// retried when a file changes again, not warned about every interval.
    stamps: Mutex<Vec<Stamp>>,
    metrics: Arc<Metrics>,
}

/// What is compared to notice a new file: cheap (one `stat`), and a renewal changes
/// at least one of them. The inode catches a file renamed over the old one (how
/// certificate tools and Kubernetes secrets replace files) even when it has the same
/// length and a modification time within the same coarse clock tick.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: Option<u64>,
    inode: Option<u64>,
}

impl Tls {
    /// Loads the files named in `files`.
    pub fn load(files: &TlsConfig, metrics: Arc<Metrics>) -> Result<Arc<Tls>, FileError> {
        let stamps = stamps(files);
        let configs = server_configs(files)?;
        set_expiry(&metrics, &configs);
        Ok(Arc::new(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(configs)),
            stamps: Mutex::new(stamps),
            metrics,
        }))
    }

    /// Reads the files again; the new certificate is used if they load, the old one
    /// kept otherwise. True if it was replaced. Reads files: call it off the runtime.
    pub fn reload(&self) -> bool {
        // Before reading, so a file written during the read is noticed next time.
        *self.stamps.lock() = stamps(&self.files);
        match server_configs(&self.files) {
            Ok(configs) => {
                set_expiry(&self.metrics, &configs);
                *self.current.write() = Arc::new(configs);
                self.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                self.metrics.tls_reloads.with_label_values(&["error"]).inc();
                tracing::warn!(%error, "TLS reload failed; still serving the certificate loaded before");
                false
            }
        }
    }

    /// [`Tls::reload`] if a file's modification time or length changed.
    fn reload_if_changed(&self) {
        if *self.stamps.lock() != stamps(&self.files) {
            self.reload();
        }
    }

    /// Checks the files every `reload_interval` until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.files.reload_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let tls = self.clone();
            // `stat` and small reads, but still file IO: not on a runtime thread.
            let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
        }
    }

    /// The server side of a handshake on `tcp`, bounded by `within`. `None` when it
    /// fails (logged at debug and counted: a scanner or a plain-HTTP client is not
    /// the operator's problem).
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        within: Duration,
        listener: Listener,
    ) -> Option<(TlsStream<TcpStream>, Option<ClientIdentity>)> {
        let config = {
            let current = self.current.read();
            match listener {
                Listener::Rpc => current.rpc.clone(),
                Listener::Admin => current.admin.clone(),
            }
        };
        let failed = |reason: &dyn std::fmt::Display| {
            self.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, error = %reason, "TLS handshake failed");
        };
        match tokio::time::timeout(within, handshake(config, tcp)).await {
            Ok(Ok(stream)) => {
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| subject(cert))
                    .map(|subject| ClientIdentity {
                        subject: subject.into(),
                    });
                Some((stream, identity))
            }
            Ok(Err(e)) => {
                failed(&e);
                None
            }
            Err(_) => {
                failed(&"not finished within http.header_read_timeout");
                None
            }
        }
    }
}

/// What a plain-HTTP request on a TLS port is answered, as Go's net/http does: the
/// client (often an operator with curl) reads what is wrong instead of a reset.
const PLAIN_HTTP: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
connection: close\r\n\r\nThis port speaks TLS: use https:// (or wss://).\n";

async fn handshake(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> std::io::Result<TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    // A TLS connection opens with a handshake record (content type 22); an HTTP
    // request with the letters of its method.
    if tcp.peek(&mut first).await? == 1 && first[0].is_ascii_uppercase() {
        // What has arrived is read first: closing a socket with unread data resets
        // it, and the reset can overtake the answer.
        let mut request = [0u8; 4096];
        let _ = tcp.try_read(&mut request);
        let mut tcp = tcp;
        let _ = tcp.write_all(PLAIN_HTTP).await;
        let _ = tcp.shutdown().await;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "plain HTTP on the TLS port; answered 400",
        ));
    }
    TlsAcceptor::from(config).accept(tcp).await
}

fn set_expiry(metrics: &Metrics, configs: &ServerConfigs) {
    if let Some(at) = configs.not_after {
        metrics.tls_certificate_expiry.set(at);
    }
}

fn stamps(files: &TlsConfig) -> Vec<Stamp> {
    let paths: [Option<&PathBuf>; 3] = [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ];
    paths
        .into_iter()
        .flatten()
        .map(|path| {
            let meta = std::fs::metadata(path).ok();
            #[cfg(unix)]
            let inode = meta.as_ref().map(std::os::unix::fs::MetadataExt::ino);
            #[cfg(not(unix))]
            let inode = None;
            Stamp {
                modified: meta.as_ref().and_then(|m| m.modified().ok()),
                len: meta.as_ref().map(|m| m.len()),
                inode,
            }
        })
        .collect()
}

/// A certificate's subject as RFC 4514 writes it: the last RDN first, short names
/// for the usual attributes, dotted OIDs for the rest, special characters escaped.
pub fn subject(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let mut rdns: Vec<String> = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let parts: Vec<String> = rdn
            .iter()
            .map(|attr| {
                let oid = attr.attr_type().to_id_string();
                let name = short_name(&oid).map_or(oid.clone(), str::to_string);
                let value = attr.as_str().map_or_else(|_| hex(attr.as_slice()), escape);
                format!("{name}={value}")
            })
            .collect();
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        _ => return None,
    })
}

/// RFC 4514 section 2.4: `,+"\<>;` anywhere, `#` or a space first, a space last.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A value that is not a string, as RFC 4514 writes it: `#` and its DER in hex.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::from("#");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_reads_most_specific_first_with_specials_escaped() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        // Without rcgen's default common name, which would come first.
        params.distinguished_name = rcgen::DistinguishedName::new();
        let dn = &mut params.distinguished_name;
        dn.push(rcgen::DnType::CountryName, "NL");
        dn.push(rcgen::DnType::OrganizationName, "Example, Inc.");
        dn.push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject(cert.der()).as_deref(),
            Some(r"CN=alice,O=Example\, Inc.,C=NL")
        );
    }

    #[test]
    fn leading_and_trailing_specials_are_escaped() {
        assert_eq!(escape("#x y "), r"\#x y\ ");
        assert_eq!(escape("a+b<c>;\"d\\"), r#"a\+b\<c\>\;\"d\\"#);
    }
}
