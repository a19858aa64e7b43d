//! `[tls]`: the JSON-RPC listener's certificate, client certificates (mTLS), and how
//! often the files are checked for a new certificate.

use super::file::Section;
use super::{ClientAuth, Config};
use crate::tls::Part;
use std::path::PathBuf;
use std::time::Duration;
use toml::Table;

/// TLS on the listener. Present when `[tls]` or `--tls-cert` / `--tls-key` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or SEC1) of the first certificate.
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to; unset: no client
    /// certificates are asked for.
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate; `None`: required when
    /// `client_ca` is set.
    pub client_auth: Option<ClientAuth>,
    /// Whether the admin listener serves TLS too, with the same certificate.
    pub admin: bool,
    /// How often the files' modification times and lengths are compared with the
    /// ones last loaded; a difference reloads them.
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: None,
            client_auth: None,
            admin: false,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// The client certificate policy in force.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(ClientAuth::Required)
    }
}

pub(super) fn read_tls(t: &Table, p: &mut Vec<String>) -> TlsConfig {
    let mut tls = TlsConfig::default();
    let mut s = Section::new(t, "tls");
    if let Some(cert) = s.string("cert", p) {
        tls.cert = cert.into();
    }
    if let Some(key) = s.string("key", p) {
        tls.key = key.into();
    }
    tls.client_ca = s.string("client_ca", p).map(PathBuf::from);
    let mut auth = ClientAuth::Required;
    if s.get("client_auth").is_some() {
        s.parsed("client_auth", &mut auth, p);
        tls.client_auth = Some(auth);
    }
    s.boolean("admin", &mut tls.admin, p);
    s.duration("reload_interval", &mut tls.reload_interval, p);
    s.finish(p);
    tls
}

/// Every problem of `[tls]` and of the upstreams' client certificates: missing keys,
/// and files that cannot be read, hold nothing usable, or do not belong together.
pub(super) fn check_tls(c: &Config, p: &mut Vec<String>) {
    if let Some(tls) = &c.tls {
        let mut files_named = true;
        for (key, path, flag) in [
            ("tls.cert", &tls.cert, "--tls-cert"),
            ("tls.key", &tls.key, "--tls-key"),
        ] {
            if path.as_os_str().is_empty() {
                p.push(format!("{key}: missing (set it in [tls] or with {flag})"));
                files_named = false;
            }
        }
        if tls.client_auth.is_some() && tls.client_ca.is_none() {
            p.push("tls.client_auth: set without tls.client_ca".into());
        }
        if tls.reload_interval.is_zero() {
            p.push("tls.reload_interval: must be longer than 0s".into());
        }
        if files_named && let Err(e) = crate::tls::server_configs(tls) {
            let key = match e.part {
                Part::Cert => "tls.cert",
                Part::Key => "tls.key",
                Part::ClientCa => "tls.client_ca",
            };
            p.push(format!("{key}: {e}"));
        }
    }
    for (i, up) in c.upstreams.iter().enumerate() {
        match (&up.client_cert, &up.client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::key_pair(cert, key) {
                    let key = match e.part {
                        Part::Key => "client_key",
                        Part::Cert | Part::ClientCa => "client_cert",
                    };
                    p.push(format!("upstreams[{i}].{key}: {e}"));
                }
            }
            _ => p.push(format!(
                "upstreams[{i}]: client_cert and client_key go together: set both or neither"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "[[upstreams]]\nurl = \"ws://127.0.0.1:9/\"\n";

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(&format!("{text}\n{UPSTREAM}")) {
            Ok(_) => Vec::new(),
            Err(p) => p.0,
        }
    }

    #[test]
    fn every_key_of_tls_is_read() {
        let table: Table = r#"
            cert = "/etc/c.pem"
            key = "/etc/k.pem"
            client_ca = "/etc/ca.pem"
            client_auth = "optional"
            admin = true
            reload_interval = "1m"
        "#
        .parse()
        .unwrap();
        let mut p = Vec::new();
        let tls = read_tls(&table, &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(tls.cert, PathBuf::from("/etc/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/k.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.client_auth(), ClientAuth::Optional);
        assert!(tls.admin);
        assert_eq!(tls.reload_interval, Duration::from_secs(60));
    }

    #[test]
    fn problems_name_the_key_and_the_file() {
        let p =
            problems("[tls]\ncert = \"/surely/missing/chain.pem\"\nclient_auth = \"sometimes\"");
        let all = p.join("\n");
        assert!(all.contains("tls.key: missing"), "{all}");
        assert!(
            all.contains("tls.client_auth: \"sometimes\" must be"),
            "{all}"
        );
        let p = problems(
            "[tls]\ncert = \"/surely/missing/chain.pem\"\nkey = \"/k.pem\"\nclient_auth = \"optional\"",
        );
        let all = p.join("\n");
        assert!(
            all.contains("tls.cert: /surely/missing/chain.pem: cannot read it"),
            "{all}"
        );
        assert!(
            all.contains("tls.client_auth: set without tls.client_ca"),
            "{all}"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let p = problems("[[upstreams]]\nurl = \"wss://h/\"\nclient_cert = \"/c.pem\"");
        assert!(
            p.iter()
                .any(|p| p.contains("upstreams[0]: client_cert and client_key go together")),
            "{p:?}"
        );
    }
}
