//! Opening one upstream WebSocket: TCP (with `TCP_NODELAY`), TLS via rustls with the
//! ring provider for `wss://`, then the WebSocket handshake with the configured headers.

use crate::config::{Protocol, UpstreamConfig, WampConfig, WebSocketConfig};
use http::{HeaderName, HeaderValue, Uri};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig as WsConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// Bytes read from an upstream socket at a time (see `connect`).
const READ_BUFFER: usize = 16 * 1024;

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Problems building a connection target; reported at startup.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{path}: cannot read CA certificates: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate: {0}")]
    ClientCert(#[from] crate::tls::FileError),
}

/// Failures of one connection attempt; logged, then retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {addr}: {source}")]
    Tcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("WebSocket handshake: {0}")]
    Handshake(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Everything needed to (re)open a connection to one upstream, built once.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as it may be shown: without credentials.
    pub url: String,
    uri: Uri,
    /// `host:port` to dial: the URL's, or one resolved address (DNS discovery), while
    /// `Host` and TLS SNI keep the URL's host name.
    authority: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `protocol = "wamp"`: the session each socket joins, and how calls map.
    pub wamp: Option<Arc<crate::upstream::wamp::Link>>,
}

impl Target {
    pub fn new(up: &UpstreamConfig) -> Result<Target, TargetError> {
        // Errors and logs show the URL without its credentials.
        let url_err = |reason: String| TargetError::Url {
            url: crate::config::redact_url(&up.url),
            reason,
        };
        // The userinfo becomes a Basic `Authorization` header, which is what a URL with
        // `user:password@` asks for; the handshake's URI goes without it.
        let uri: Uri = crate::config::without_userinfo(&up.url)
            .parse()
            .map_err(|e| url_err(format!("{e}")))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(url_err("scheme must be ws or wss".into())),
        };
        let host = uri.host().ok_or_else(|| url_err("no host".into()))?;
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        // An IPv6 literal keeps its brackets in `host()`, which is what dialing wants.
        let authority = format!("{host}:{port}");
        let mut headers = Vec::new();
        for (name, value) in &up.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| url_err(format!("header {name:?}: {e}")))?;
            let value =
                HeaderValue::from_str(value).map_err(|e| url_err(format!("header {name}: {e}")))?;
            headers.push((name, value));
        }
        let has_authorization = headers
            .iter()
            .any(|(name, _)| name == http::header::AUTHORIZATION);
        if let Some(info) = crate::config::userinfo(&up.url)
            && !has_authorization
        {
            headers.push((
                http::header::AUTHORIZATION,
                basic_auth(info).map_err(url_err)?,
            ));
        }
        let wamp = (up.protocol == Protocol::Wamp).then(|| {
            Arc::new(crate::upstream::wamp::Link {
                realm: up.realm.clone().unwrap_or_default(),
                procedures: crate::upstream::wamp::Procedures::new(&up.procedure_prefix),
                auth: up.wamp_auth.clone(),
                auth_at: format!("upstream {}: wamp_auth", up.shown_name()),
                methods: WampConfig::default(),
            })
        });
        let subprotocol = match wamp {
            Some(_) => Some(crate::upstream::wamp::SUBPROTOCOL),
            None => up.subprotocol.as_deref(),
        };
        if let Some(proto) = subprotocol {
            let value =
                HeaderValue::from_str(proto).map_err(|e| url_err(format!("subprotocol: {e}")))?;
            headers.push((http::header::SEC_WEBSOCKET_PROTOCOL, value));
        }
        let tls = if secure {
            Some(Arc::new(tls_config(up)?))
        } else {
            None
        };
        Ok(Target {
            url: crate::config::redact_url(&up.url),
            uri,
            authority,
            headers,
            tls,
            wamp,
        })
    }

    /// The same target, with `[wamp]`'s method names for a WAMP upstream.
    pub fn with_wamp_methods(mut self, methods: &WampConfig) -> Target {
        if let Some(link) = &mut self.wamp {
            Arc::make_mut(link).methods = methods.clone();
        }
        self
    }

    /// The same upstream, dialled at `addr` instead of by host name.
    pub fn at_address(&self, addr: std::net::SocketAddr) -> Target {
        Target {
            authority: addr.to_string(),
            ..self.clone()
        }
    }

    /// Host and port of the URL.
    pub fn host_port(&self) -> (String, u16) {
        let secure = self.tls.is_some();
        let host = self.uri.host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        (
            host,
            self.uri.port_u16().unwrap_or(if secure { 443 } else { 80 }),
        )
    }

    /// What this target dials, `ip:port` or `host:port`: its identity for balancing.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// One connection attempt, sending `cookies` (kept from earlier handshakes, e.g. a
    /// load balancer's affinity cookie). The caller bounds it with the handshake timeout.
    pub async fn connect(
        &self,
        ws: &WebSocketConfig,
        cookies: Option<&str>,
    ) -> Result<(WsStream, Vec<String>), ConnectError> {
        let mut request = (&self.uri).into_client_request()?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(cookies) = cookies.and_then(|c| HeaderValue::from_str(c).ok()) {
            request.headers_mut().insert(http::header::COOKIE, cookies);
        }
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| ConnectError::Tcp {
                addr: self.authority.clone(),
                source,
            })?;
        // Small JSON-RPC frames must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        // tungstenite zeroes its whole read buffer before every read (even one that
        // finds nothing): at its 128 KiB default that was ~4% of the gateway's CPU
        // under load. Replies coalesced under load fit 16 KiB many times over; a large
        // reply takes more reads, not more memory.
        let config = WsConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(ws.max_message_bytes))
            .max_frame_size(Some(ws.max_message_bytes));
        let connector = match &self.tls {
            Some(tls) => Connector::Rustls(tls.clone()),
            None => Connector::Plain,
        };
        let (socket, response) = tokio_tungstenite::client_async_tls_with_config(
            request,
            tcp,
            Some(config),
            Some(connector),
        )
        .await?;
        let set_cookies = response
            .headers()
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        Ok((socket, set_cookies))
    }
}

/// webpki roots plus the upstream's own CA file, on the ring provider; the client
/// certificate, if configured, for an upstream that asks for one (mTLS).
fn tls_config(up: &UpstreamConfig) -> Result<rustls::ClientConfig, TargetError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &up.ca_file {
        let ca_err = |reason: String| TargetError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no certificates in file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&up.client_cert, &up.client_key) {
        (Some(cert), Some(key)) => {
            let (chain, key) = crate::tls::key_pair(cert, key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        // The config check refuses one without the other.
        _ => builder.with_no_client_auth(),
    })
}

/// `Authorization: Basic ...` for a URL's percent-encoded `user:password`.
fn basic_auth(userinfo: &str) -> Result<HeaderValue, String> {
    use base64::Engine as _;
    let decoded = percent_encoding::percent_decode_str(userinfo).collect::<Vec<u8>>();
    let token = base64::engine::general_purpose::STANDARD.encode(decoded);
    let mut value = HeaderValue::from_str(&format!("Basic {token}"))
        .map_err(|_| "credentials in the URL are not a valid header".to_string())?;
    // Kept out of any debug output of the request.
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let up = UpstreamConfig::new("ws://al%40ice:s3cr%3At@127.0.0.1:9/ws?key=k");
        let target = Target::new(&up).unwrap();
        assert_eq!(target.url, "ws://127.0.0.1:9/ws?key=***");
        assert_eq!(target.uri.to_string(), "ws://127.0.0.1:9/ws?key=k");
        let auth = target
            .headers
            .iter()
            .find(|(n, _)| n == http::header::AUTHORIZATION)
            .map(|(_, v)| v.clone())
            .unwrap();
        // base64("al@ice:s3cr:t")
        assert_eq!(auth, "Basic YWxAaWNlOnMzY3I6dA==");
    }

    #[test]
    fn an_explicit_authorization_header_wins_over_url_credentials() {
        let mut up = UpstreamConfig::new("ws://u:p@127.0.0.1:9/");
        up.headers.push(("Authorization".into(), "Bearer t".into()));
        let target = Target::new(&up).unwrap();
        let auth: Vec<_> = target
            .headers
            .iter()
            .filter(|(n, _)| n == http::header::AUTHORIZATION)
            .collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0].1, "Bearer t");
    }
}
