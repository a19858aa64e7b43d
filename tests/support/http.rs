//! Clients that reach the gateway over real TCP, the way users do.
//!
//! Every helper that awaits the network has the [`TEST_TIMEOUT`] built in and panics with the
//! caller's location; `try_*` variants return connection-level errors instead of panicking on
//! them, for tests that expect the gateway to refuse or drop a connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::Location;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

use super::{TEST_TIMEOUT, labeled_timeout};

/// Any failure below HTTP semantics: connect refused, connection reset, malformed response...
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A fully received HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The body parsed as JSON; panics with the status and body if it is not JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        match serde_json::from_slice(&self.body) {
            Ok(value) => value,
            Err(e) => panic!(
                "response body is not JSON ({e}); status {}, body {:?}",
                self.status,
                self.text()
            ),
        }
    }

    /// The body as text (lossily decoded).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// POSTs `body` as `application/json` on a fresh connection.
#[track_caller]
pub fn post(
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> impl Future<Output = Response> {
    request(addr, Method::POST, path, &[JSON], body)
}

/// Sends one request on a fresh connection. No header is added except `Host`, so tests control
/// `Content-Type` and friends exactly.
#[track_caller]
pub fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> impl Future<Output = Response> {
    let caller = Location::caller();
    let fut = try_request(addr, method, path, headers, body);
    async move {
        let outcome = labeled_timeout(TEST_TIMEOUT, "an HTTP response", caller, fut).await;
        outcome.unwrap_or_else(|e| panic!("HTTP request to {addr} failed at {caller}: {e}"))
    }
}

/// [`request`] returning connection-level failures instead of panicking on them. Still panics if
/// nothing happens within [`TEST_TIMEOUT`].
#[track_caller]
pub fn try_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> impl Future<Output = Result<Response, Error>> {
    let caller = Location::caller();
    let req = build_request(method, &origin_uri(path), Some(addr), headers, body.into());
    let exchange = async move {
        let mut client = Client::try_connect_untimed(addr).await?;
        client.send(req?).await
    };
    labeled_timeout(TEST_TIMEOUT, "an HTTP response", caller, exchange)
}

/// An HTTP/1.1 client that keeps one connection alive for many sequential requests.
pub struct Client {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    /// Drives the connection; finishes when either side closes it.
    driver: AbortOnDropHandle<Result<(), hyper::Error>>,
}

impl Client {
    /// Opens the connection; panics if that fails.
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> impl Future<Output = Client> {
        let caller = Location::caller();
        async move {
            let connected = labeled_timeout(
                TEST_TIMEOUT,
                "an HTTP/1.1 connection",
                caller,
                Self::try_connect_untimed(addr),
            );
            connected
                .await
                .unwrap_or_else(|e| panic!("connecting to {addr} failed at {caller}: {e}"))
        }
    }

    /// Opens the connection, returning the error if the gateway refuses it.
    #[track_caller]
    pub fn try_connect(addr: SocketAddr) -> impl Future<Output = Result<Client, Error>> {
        labeled_timeout(
            TEST_TIMEOUT,
            "an HTTP/1.1 connection",
            Location::caller(),
            Self::try_connect_untimed(addr),
        )
    }

    async fn try_connect_untimed(addr: SocketAddr) -> Result<Client, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let driver = AbortOnDropHandle::new(tokio::spawn(connection));
        Ok(Client {
            addr,
            sender,
            driver,
        })
    }

    /// POSTs `body` as `application/json` on this connection.
    #[track_caller]
    pub fn post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Response> + '_ {
        self.request(Method::POST, path, &[JSON], body)
    }

    /// Sends one request on this connection and reads the whole response.
    #[track_caller]
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Response> + '_ {
        let caller = Location::caller();
        let fut = self.try_request(method, path, headers, body);
        async move {
            let outcome = labeled_timeout(TEST_TIMEOUT, "an HTTP response", caller, fut).await;
            outcome.unwrap_or_else(|e| panic!("HTTP request failed at {caller}: {e}"))
        }
    }

    /// [`request`](Self::request) returning connection-level failures, e.g. because the gateway
    /// closed this connection.
    #[track_caller]
    pub fn try_request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Result<Response, Error>> + '_ {
        let caller = Location::caller();
        let req = build_request(
            method,
            &origin_uri(path),
            Some(self.addr),
            headers,
            body.into(),
        );
        let exchange = async move { self.send(req?).await };
        labeled_timeout(TEST_TIMEOUT, "an HTTP response", caller, exchange)
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response, Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        collect(response).await
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Waits until the gateway closes this connection (e.g. during graceful shutdown) while we keep
    /// our side open.
    #[track_caller]
    pub fn closed(&mut self) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        let driver = &mut self.driver;
        async move {
            let _ = labeled_timeout(TEST_TIMEOUT, "the gateway to close", caller, driver).await;
        }
    }
}

/// An HTTP/2 client with prior knowledge (h2c); clones share one connection and may send
/// concurrently.
#[derive(Clone)]
pub struct H2Client {
    addr: SocketAddr,
    sender: http2::SendRequest<Full<Bytes>>,
    driver: Arc<AbortOnDropHandle<Result<(), hyper::Error>>>,
}

impl H2Client {
    /// Opens the connection; panics if that fails.
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> impl Future<Output = H2Client> {
        let caller = Location::caller();
        async move {
            let connected = labeled_timeout(
                TEST_TIMEOUT,
                "an h2c connection",
                caller,
                Self::try_connect(addr),
            );
            connected
                .await
                .unwrap_or_else(|e| panic!("h2c connection to {addr} failed at {caller}: {e}"))
        }
    }

    /// Opens the connection, returning the error if the gateway refuses it or does not speak h2c.
    pub async fn try_connect(addr: SocketAddr) -> Result<H2Client, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        let driver = Arc::new(AbortOnDropHandle::new(tokio::spawn(connection)));
        Ok(H2Client {
            addr,
            sender,
            driver,
        })
    }

    /// POSTs `body` as `application/json` on a new stream of this connection.
    #[track_caller]
    pub fn post(&self, path: &str, body: impl Into<Bytes>) -> impl Future<Output = Response> {
        self.request(Method::POST, path, &[JSON], body)
    }

    /// Sends one request on a new stream of this connection and reads the whole response.
    #[track_caller]
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Response> {
        let caller = Location::caller();
        let fut = self.try_request(method, path, headers, body);
        async move {
            let outcome = labeled_timeout(TEST_TIMEOUT, "an h2c response", caller, fut).await;
            outcome.unwrap_or_else(|e| panic!("h2c request failed at {caller}: {e}"))
        }
    }

    /// [`request`](Self::request) returning connection- and stream-level failures.
    #[track_caller]
    pub fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Result<Response, Error>> {
        let caller = Location::caller();
        // HTTP/2 carries scheme and authority as pseudo-headers, so the URI must be absolute.
        let uri = format!("http://{}{}", self.addr, origin_uri(path));
        let req = build_request(method, &uri, None, headers, body.into());
        let mut sender = self.sender.clone();
        let exchange = async move {
            sender.ready().await?;
            let response = sender.send_request(req?).await?;
            collect(response).await
        };
        labeled_timeout(TEST_TIMEOUT, "an h2c response", caller, exchange)
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A bare TCP connection for byte-level tests: slow clients, malformed requests, pipelining.
pub struct RawTcp {
    stream: TcpStream,
}

/// Connects a [`RawTcp`]; panics if that fails.
#[track_caller]
pub fn raw_tcp(addr: SocketAddr) -> impl Future<Output = RawTcp> {
    let caller = Location::caller();
    async move {
        let connected = labeled_timeout(TEST_TIMEOUT, "a TCP connection", caller, async {
            TcpStream::connect(addr).await
        });
        let stream = connected
            .await
            .unwrap_or_else(|e| panic!("TCP connect to {addr} failed at {caller}: {e}"));
        let _ = stream.set_nodelay(true);
        RawTcp { stream }
    }
}

impl RawTcp {
    /// Writes all of `bytes`. Errors (e.g. the gateway already closed the connection) are returned,
    /// since provoking that is often the point of the test.
    #[track_caller]
    pub fn write(&mut self, bytes: impl AsRef<[u8]>) -> impl Future<Output = io::Result<()>> + '_ {
        let caller = Location::caller();
        let bytes = bytes.as_ref().to_vec();
        let stream = &mut self.stream;
        labeled_timeout(TEST_TIMEOUT, "a TCP write", caller, async move {
            stream.write_all(&bytes).await?;
            stream.flush().await
        })
    }

    /// Half-closes: the gateway sees EOF on its read side.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads whatever arrives next (at least one byte, or empty at EOF or on error).
    #[track_caller]
    pub fn read_some(&mut self) -> impl Future<Output = Vec<u8>> + '_ {
        let caller = Location::caller();
        let stream = &mut self.stream;
        labeled_timeout(TEST_TIMEOUT, "TCP data", caller, async move {
            let mut buf = vec![0; 64 * 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            buf.truncate(n);
            buf
        })
    }

    /// Reads until the gateway closes the connection; a reset counts as closed. Returns everything
    /// received. Panics after [`TEST_TIMEOUT`].
    #[track_caller]
    pub fn read_until_closed(&mut self) -> impl Future<Output = Vec<u8>> + '_ {
        self.read_until_closed_within(TEST_TIMEOUT)
    }

    /// [`read_until_closed`](Self::read_until_closed) with an explicit limit.
    #[track_caller]
    pub fn read_until_closed_within(
        &mut self,
        limit: Duration,
    ) -> impl Future<Output = Vec<u8>> + '_ {
        let caller = Location::caller();
        let stream = &mut self.stream;
        labeled_timeout(
            limit,
            "the gateway to close the TCP connection",
            caller,
            async move {
                let mut received = Vec::new();
                let mut buf = vec![0; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return received,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
            },
        )
    }

    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

fn origin_uri(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// `host` is added as the `Host` header (HTTP/1.1) unless `headers` already has one; HTTP/2 passes
/// `None` because the authority travels in the URI.
fn build_request(
    method: Method,
    uri: &str,
    host: Option<SocketAddr>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, Error> {
    let mut builder = Request::builder().method(method).uri(uri);
    let has_host = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"));
    if let Some(host) = host.filter(|_| !has_host) {
        builder = builder.header(HOST, host.to_string());
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(Full::new(body))?)
}

pub async fn collect(response: hyper::Response<hyper::body::Incoming>) -> Result<Response, Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// The content type `post` sends, for tests that build their own header lists.
pub const JSON: (&str, &str) = ("content-type", "application/json");
