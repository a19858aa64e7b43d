//! `rpcgate demo`: the echo backend and a gateway in front of it, printing what to
//! try; with `--wamp URL`, a second gateway in front of that WAMP router.

use anyhow::{Context, Result};
use rpcgate::Gateway;
use rpcgate::config::{Affinity, Config, Protocol, SubscriptionRule, UpstreamConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `--wamp` and its companions: a WAMP router the demo also fronts.
#[derive(Debug, Clone)]
pub struct WampDemo {
    pub url: String,
    pub realm: String,
    pub prefix: String,
    pub listen: Option<SocketAddr>,
}

impl WampDemo {
    /// The second gateway: port 8081 if free, else any free port.
    async fn gateway(self) -> Result<Gateway> {
        let listener = bind_or_any(self.listen, 8081).await?;
        let addr = listener.local_addr()?;
        let mut config = Config {
            listen: addr,
            ..Config::default()
        };
        config.shutdown.delay = std::time::Duration::ZERO;
        let mut up = UpstreamConfig::new(self.url.clone());
        up.name = Some("wamp".into());
        up.protocol = Protocol::Wamp;
        up.realm = Some(self.realm.clone());
        up.procedure_prefix = self.prefix.clone();
        up.connections = 2;
        config.upstreams.push(up);
        let problems = config.check();
        if !problems.is_empty() {
            anyhow::bail!("--wamp: {}", problems.join("; "));
        }
        let gateway = Gateway::from_listener(listener, config)?;
        println!(
            "WAMP: http://{addr}/ -> router {} realm {:?}{}",
            self.url,
            self.realm,
            match self.prefix.is_empty() {
                true => String::new(),
                false => format!(", procedure prefix {:?}", self.prefix),
            }
        );
        println!(
            "  curl -s http://{addr}/ -H 'Content-Type: application/json' -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"<procedure>\",\"params\":[2,3]}}'"
        );
        println!("  curl -N 'http://{addr}/events?session=demo' -H 'Accept: text/event-stream'");
        println!(
            "  curl -s http://{addr}/ -H 'Content-Type: application/json' -H 'rpcgate-session: demo' -d '{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"wamp.subscribe\",\"params\":[\"<topic>\"]}}'"
        );
        println!(
            "  Methods are procedure URIs; wamp.subscribe [topic], wamp.unsubscribe [id], wamp.publish [topic, args..]."
        );
        Ok(gateway)
    }
}

/// `addr`, or 127.0.0.1:`port` if free, else any free port.
async fn bind_or_any(addr: Option<SocketAddr>, port: u16) -> Result<TcpListener> {
    Ok(match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?,
        None => match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind(("127.0.0.1", 0)).await?,
        },
    })
}

/// The demo: the echo backend, the gateway in front of it, and with `wamp` a second
/// gateway in front of that WAMP router.
pub async fn demo(
    listen: Option<SocketAddr>,
    upstream_listen: SocketAddr,
    wamp: Option<WampDemo>,
) -> Result<()> {
    let backend = TcpListener::bind(upstream_listen)
        .await
        .with_context(|| format!("cannot listen on {upstream_listen}"))?;
    let backend_addr = backend.local_addr()?;
    let listener = bind_or_any(listen, 8080).await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    crate::watch_signals(shutdown.clone(), None)?;
    // The backend outlives the gateway's drain, so calls still open at Ctrl-C finish.
    let backend_shutdown = CancellationToken::new();
    let echo_task = tokio::spawn(rpcgate_echo::serve(
        backend,
        Arc::from("demo-echo"),
        backend_shutdown.clone(),
    ));

    let mut config = Config {
        listen: addr,
        ..Config::default()
    };
    // Nothing routes to the demo through a load balancer: Ctrl-C stops at once.
    config.shutdown.delay = std::time::Duration::ZERO;
    // The backend's `ticks_subscribe` follows jsonrpsee's naming.
    config.subscriptions = SubscriptionRule::preset("substrate").into_iter().collect();
    // A session (the demo page's) gets its own upstream socket, so what the backend
    // pushes on it (`notify_me`, `ask`) reaches that session; calls without a session
    // key share the pool as usual.
    config.sessions.affinity = Affinity::Connection;
    config
        .upstreams
        .push(UpstreamConfig::new(format!("ws://{backend_addr}/")));
    let gateway = Gateway::from_listener(listener, config)?.with_demo_page();
    let wamp_gateway = match wamp {
        Some(w) => Some(w.gateway().await?),
        None => None,
    };
    println!("rpcgate demo: http://{addr}/ -> echo backend ws://{backend_addr}/");
    println!(
        "In a browser: http://{addr}/demo/ (the JavaScript client, WebSocket first, HTTP fallback)"
    );
    println!("Try:");
    println!(
        "  curl -s http://{addr}/ -H 'Content-Type: application/json' -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[\"hello\"]}}'"
    );
    println!(
        "  curl -s http://{addr}/ -H 'Content-Type: application/json' -d '[{{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"method\":\"sum\",\"params\":[1,2,3]}},{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"whoami\"}}]'"
    );
    println!("Push: open an event stream for session `demo`, then subscribe to ticks in it:");
    println!("  curl -N 'http://{addr}/events?session=demo' -H 'Accept: text/event-stream'");
    println!(
        "  curl -s http://{addr}/ -H 'Content-Type: application/json' -H 'rpcgate-session: demo' -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ticks_subscribe\",\"params\":[1000]}}'"
    );
    println!("WebSocket clients connect to ws://{addr}/ (e.g. websocat ws://{addr}/).");
    println!(
        "Methods: echo, sum, sleep [ms], whoami, fail, notify, notify_me [value], ticks_subscribe [ms], ticks_unsubscribe [id], ask [question]. Ctrl-C to stop."
    );
    let wamp_task = wamp_gateway.map(|g| tokio::spawn(g.run(shutdown.clone())));
    gateway.run(shutdown).await;
    if let Some(task) = wamp_task {
        task.await.context("WAMP gateway task")?;
    }
    backend_shutdown.cancel();
    echo_task.await.context("echo backend task")??;
    Ok(())
}
