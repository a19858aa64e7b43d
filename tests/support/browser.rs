//! Headless Chromium driven over the DevTools protocol (CDP) with our own WebSocket
//! client: open a page, evaluate JavaScript in it, read what it returned.
//!
//! Chromium picks its own debugging port (`--remote-debugging-port=0`) and writes it to
//! `DevToolsActivePort` in its profile directory, so no port is guessed. `.ci/run`
//! installs Debian's `chromium`; without one these tests fail, saying so.

use super::{TEST_TIMEOUT, with_timeout_of};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long Chromium may take to start on a busy CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Browser {
    _child: Child,
    ws: Ws,
    next_id: u64,
    profile: PathBuf,
}

/// A page (a CDP session attached to one tab).
pub struct Page {
    session: String,
}

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("RPCGATE_CHROMIUM") {
        return path.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let candidate = PathBuf::from(dir).join(name);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "no Chromium found (chromium, chromium-browser, google-chrome, or RPCGATE_CHROMIUM): \
         `.ci/run` installs Debian's chromium; by hand: apt-get install -y chromium"
    );
}

impl Browser {
    pub async fn start() -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "rpcgate-chromium-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&profile).expect("profile directory");
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let file = profile.join("DevToolsActivePort");
        let endpoint = with_timeout_of(START_TIMEOUT, async {
            loop {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    let mut lines = text.lines();
                    if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                        return format!("ws://127.0.0.1:{port}{path}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let (ws, _) = with_timeout_of(START_TIMEOUT, tokio_tungstenite::connect_async(&endpoint))
            .await
            .expect("DevTools WebSocket");
        Browser {
            _child: child,
            ws,
            next_id: 0,
            profile,
        }
    }

    /// Sends a CDP command (to `session`, or the browser) and returns its result.
    async fn command(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            msg["sessionId"] = json!(session);
        }
        with_timeout_of(TEST_TIMEOUT, self.ws.send(Message::text(msg.to_string())))
            .await
            .expect("send a CDP command");
        loop {
            let frame = with_timeout_of(Duration::from_secs(60), self.ws.next())
                .await
                .expect("the DevTools socket closed")
                .expect("a DevTools frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("CDP JSON");
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    panic!("CDP {method} failed: {error}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab and waits until it has loaded.
    pub async fn open(&mut self, url: &str) -> Page {
        let target = self
            .command(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .command(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let page = Page {
            session: attached["sessionId"]
                .as_str()
                .expect("a session id")
                .to_string(),
        };
        self.command(Some(&page.session), "Page.enable", json!({}))
            .await;
        self.command(Some(&page.session), "Page.navigate", json!({"url": url}))
            .await;
        // Loaded once the document says so.
        for _ in 0..600 {
            let state = self.eval(&page, "document.readyState").await;
            if state == "complete" {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{url} did not finish loading");
    }

    /// Evaluates `expression` in `page` (promises awaited) and returns its value;
    /// panics with the page's exception if it threw.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self
            .command(
                Some(&page.session),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}");
        }
        result["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
