//! Starting a real gateway in-process on 127.0.0.1 port 0.

use rpcgate::Gateway;
use rpcgate::config::{AdminListen, Config, UpstreamConfig};
use rpcgate::upstream::Upstreams;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A gateway serving on a free loopback port; stops when dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    pub upstreams: Arc<Upstreams>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Defaults, with `connections` sockets to each of `urls`.
pub fn config_for(urls: &[String], connections: usize) -> Config {
    let mut config = Config {
        upstreams: urls
            .iter()
            .map(|url| {
                let mut up = UpstreamConfig::new(url.clone());
                up.connections = connections;
                up
            })
            .collect(),
        ..Config::default()
    };
    // Tests bind their own admin listener on port 0; stopping should not wait out a
    // production shutdown delay.
    config.admin_listen = AdminListen::Off;
    config.shutdown.delay = std::time::Duration::ZERO;
    // Reconnects in tests should not wait out production-sized backoffs.
    config.websocket.reconnect_base = Duration::from_millis(10);
    config.websocket.reconnect_max = Duration::from_millis(200);
    config
}

/// Starts a gateway with `config` (its `listen` is ignored: port 0 is used).
pub async fn start_gateway(config: Config) -> TestGateway {
    start_gateway_with(config, |g| g).await
}

/// [`start_gateway`], with `adjust` applied to the gateway before it runs (e.g.
/// `Gateway::with_demo_page`).
pub async fn start_gateway_with(
    config: Config,
    adjust: impl FnOnce(Gateway) -> Gateway,
) -> TestGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let admin = admin_listener.local_addr().expect("local addr");
    let gateway = adjust(
        Gateway::from_listener(listener, config)
            .expect("gateway starts")
            .with_admin(Some(admin_listener)),
    );
    let upstreams = gateway.upstreams();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));
    TestGateway {
        addr,
        admin,
        upstreams,
        shutdown,
        task: Some(task),
    }
}

impl TestGateway {
    /// Waits (bounded) until `n` upstream connections are open.
    pub async fn wait_open(&self, n: usize) {
        super::with_timeout(self.upstreams.wait_for_open(n)).await;
    }

    /// Starts a graceful stop without waiting for it (see `shutdown.delay`).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Requests a graceful stop and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            super::with_timeout_of(Duration::from_secs(60), task)
                .await
                .expect("gateway task");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
