//! rustls configurations built from PEM files: the listener's (its certificate, and
//! the CA client certificates must chain to) and an upstream's client certificate.
//!
//! The config check, startup and every reload go through these functions, so a file
//! that passes `check-config` is the file that is served, and every error names the
//! file to fix. Always the ring provider, chosen explicitly: no process-wide default
//! provider is installed or relied on.

use crate::config::{ClientAuth, TlsConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Which of the files named in the configuration a [`FileError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
    ClientCa,
}

/// A certificate or key file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct FileError {
    pub part: Part,
    /// The path, as configured.
    pub file: String,
    pub reason: String,
}

impl FileError {
    fn new(part: Part, path: &Path, reason: impl Into<String>) -> FileError {
        FileError {
            part,
            file: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// The listener's configurations, built together from one reading of the files.
#[derive(Debug)]
pub struct ServerConfigs {
    /// The JSON-RPC listener: ALPN `h2` and `http/1.1`, client certificates as
    /// configured.
    pub rpc: Arc<ServerConfig>,
    /// The admin listener: the same certificate, `http/1.1` only (it serves no
    /// HTTP/2), and no client certificates, which probes and scrapers do not have.
    pub admin: Arc<ServerConfig>,
    /// The server certificate's not-after, in Unix seconds, if it parses.
    pub not_after: Option<i64>,
}

/// The ring provider; rustls' other choice (aws-lc-rs) is not compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3: what rustls implements, and nothing older.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// Reads `tls`'s files and builds the listener's configurations.
pub fn server_configs(tls: &TlsConfig) -> Result<ServerConfigs, FileError> {
    let (chain, key) = key_pair(&tls.cert, &tls.key)?;
    let not_after = not_after(&chain[0]);
    let provider = provider();
    let versions = |p: &Arc<CryptoProvider>| {
        ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| FileError::new(Part::Cert, &tls.cert, e.to_string()))
    };
    let rpc = versions(&provider)?;
    let rpc = match &tls.client_ca {
        None => rpc.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(Part::ClientCa, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| FileError::new(Part::ClientCa, ca, e.to_string()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match tls.client_auth() {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| FileError::new(Part::ClientCa, ca, e.to_string()))?;
            rpc.with_client_cert_verifier(verifier)
        }
    };
    let mismatch = |e: rustls::Error| FileError::new(Part::Key, &tls.key, e.to_string());
    let mut rpc = rpc
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    rpc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut admin = versions(&provider)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(mismatch)?;
    admin.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerConfigs {
        rpc: Arc::new(rpc),
        admin: Arc::new(admin),
        not_after,
    })
}

/// A certificate chain and its private key, checked to belong together: a key
/// written before its certificate (a renewal half done) is caught here, not by the
/// first client's failed handshake.
pub fn key_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FileError> {
    let chain = certificates(Part::Cert, cert)?;
    let bytes = read(Part::Key, key)?;
    let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let reason = match e {
            pem::Error::NoItemsFound => {
                "no private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) in the file"
                    .to_string()
            }
            other => format!("not a PEM private key ({other})"),
        };
        FileError::new(Part::Key, key, reason)
    })?;
    CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider()).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("does not match the certificate in {}", cert.display())
            }
            other => other.to_string(),
        };
        FileError::new(Part::Key, key, reason)
    })?;
    Ok((chain, private))
}

/// Every certificate in a PEM file; at least one.
pub fn certificates(part: Part, path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let bytes = read(part, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::new(part, path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(FileError::new(
            part,
            path,
            "no certificate (BEGIN CERTIFICATE) in the file",
        ));
    }
    Ok(certs)
}

fn read(part: Part, path: &Path) -> Result<Vec<u8>, FileError> {
    read_key_file(path).map_err(|e| FileError::new(part, path, format!("cannot read it ({e})")))
}

/// Largest key, certificate or JWKS file read: they are kilobytes, and a path that
/// names something endless (`/dev/zero`, a log) must fail, not fill memory.
pub const MAX_KEY_FILE: u64 = 1024 * 1024;

/// Reads a file of key material, at most [`MAX_KEY_FILE`] bytes.
pub fn read_key_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_KEY_FILE} bytes: not a key, certificate or key set"
        )));
    }
    Ok(bytes)
}

fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_that_never_ends_is_refused_not_read_into_memory() {
        let err = read_key_file(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
