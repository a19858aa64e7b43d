//! [`Echo`]: the real demo backend (`rpcgate-echo`) on a loopback port, in-process.

use super::with_timeout;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A real `rpcgate-echo` backend on a loopback port.
pub struct Echo {
    pub url: String,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        Echo::serve(listener, name)
    }

    /// Serves on `listener`, bound earlier: until now connections waited in its backlog.
    pub fn serve(listener: TcpListener, name: &str) -> Echo {
        let url = format!("ws://{}", listener.local_addr().expect("local addr"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(rpcgate_echo::serve(listener, Arc::from(name), stop.clone()));
        Echo { url, stop, task }
    }

    /// Stops it: every connection gets a Close, and it is gone once this returns.
    pub async fn kill(mut self) {
        self.stop.cancel();
        let _ = with_timeout(&mut self.task).await;
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
