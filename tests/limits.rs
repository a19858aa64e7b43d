//! Limits a single client runs into: connections per client address (HTTP and
//! WebSocket alike), the HTTP/2 header list, the WebSocket message size; and what
//! happens when the process runs out of file descriptors.

mod support;

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use rpcgate::config::HttpConfig;
use support::admin::{eventually, metric};
use support::binary::{listening_on, rpcgate};
use support::gateway::{TestGateway, config_for, start_gateway};
use support::http::try_request;
use support::{Client, FakeUpstream, H2Client, raw_tcp, with_timeout};

const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;

fn raw_call() -> String {
    format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CALL}",
        CALL.len()
    )
}

async fn answering_upstream() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("ok"))));
    up
}

/// A gateway whose HTTP settings `adjust` changed, in front of an answering upstream.
async fn gateway(adjust: impl FnOnce(&mut HttpConfig)) -> (FakeUpstream, TestGateway) {
    let up = answering_upstream().await;
    let mut config = config_for(&[up.url()], 1);
    adjust(&mut config.http);
    let gw = start_gateway(config).await;
    gw.wait_open(1).await;
    (up, gw)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_client(addr: std::net::SocketAddr) -> Ws {
    let url = format!("ws://{addr}/");
    let (ws, _) = with_timeout(tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket handshake");
    ws
}

/// Whether a new connection's call is answered 200 now.
async fn served(addr: std::net::SocketAddr) -> bool {
    let headers = [("content-type", "application/json")];
    try_request(addr, Method::POST, "/", &headers, CALL)
        .await
        .is_ok_and(|r| r.status == StatusCode::OK)
}

#[tokio::test]
async fn past_max_connections_per_address_a_connection_gets_429_until_one_closes() {
    let (_up, gw) = gateway(|http| http.max_connections_per_address = 2).await;

    let mut a = Client::connect(gw.addr).await;
    let mut b = Client::connect(gw.addr).await;
    assert_eq!(a.post("/", CALL).await.status, StatusCode::OK);
    assert_eq!(b.post("/", CALL).await.status, StatusCode::OK);

    let mut third = raw_tcp(gw.addr).await;
    third.write(raw_call()).await.unwrap();
    let got = third.read_until_closed_within(Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).expect("a JSON-RPC error body");
    assert_eq!(body["error"]["code"], -32073, "{body}");
    assert_eq!(
        body["error"]["data"]["kind"],
        "too_many_connections_from_address"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("http.max_connections_per_address")),
        "{body}"
    );
    let refused = r#"rpcgate_http_connections_refused_total{reason="max_connections_per_address"}"#;
    assert_eq!(metric(gw.admin, refused).await, 1.0);
    // The ones it has keep being served.
    assert_eq!(a.post("/", CALL).await.status, StatusCode::OK);

    drop(a);
    eventually(async || served(gw.addr).await).await;
    assert_eq!(b.post("/", CALL).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_websocket_client_holds_its_address_place() {
    let (_up, gw) = gateway(|http| http.max_connections_per_address = 1).await;

    let mut ws = ws_client(gw.addr).await;
    with_timeout(ws.send(Message::text(CALL))).await.unwrap();
    let answered = with_timeout(ws.next()).await;
    assert!(
        matches!(answered, Some(Ok(Message::Text(_)))),
        "{answered:?}"
    );

    // The upgraded socket is one open connection of 127.0.0.1.
    let headers = [("content-type", "application/json")];
    let refused = try_request(gw.addr, Method::POST, "/", &headers, CALL)
        .await
        .expect("an answer");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);

    drop(ws);
    eventually(async || served(gw.addr).await).await;
}

#[tokio::test]
async fn an_http2_header_list_over_max_header_bytes_is_refused_and_the_next_is_served() {
    let (_up, gw) = gateway(|http| http.max_header_bytes = 16 * 1024).await;

    let h2 = H2Client::connect(gw.addr).await;
    let big = "a".repeat(24 * 1024);
    let headers = [
        ("content-type", "application/json"),
        ("x-big", big.as_str()),
    ];
    let answer = h2.try_request(Method::POST, "/", &headers, CALL).await;
    let status = answer.expect("an answer on the stream").status;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let fresh = H2Client::connect(gw.addr).await;
    assert_eq!(fresh.post("/", CALL).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_websocket_message_over_max_body_bytes_closes_the_socket() {
    let (up, gw) = gateway(|http| http.max_body_bytes = 1024).await;

    let mut ws = ws_client(gw.addr).await;
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":["{}"]}}"#,
        "x".repeat(2048)
    );
    let _ = with_timeout(ws.send(Message::text(big))).await;
    // A close frame saying why (1009: message too big), or the socket just ends.
    let ended = with_timeout(async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(Message::Text(t))) => panic!("answered a message over the limit: {t}"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    assert!(matches!(ended, None | Some(1009)), "closed with {ended:?}");
    assert_eq!(up.count_method("m"), 0, "nothing went upstream");
}

/// The child's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn out_of_file_descriptors_rpcgate_serves_what_it_has_and_does_not_spin() {
    use tokio::io::AsyncBufReadExt;
    const LIMIT: u64 = 64;

    let up = answering_upstream().await;
    let url = up.url();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &url,
        "--connections",
        "1",
        "--admin-listen",
        "off",
        "--workers",
        "1",
        "--log-format",
        "json",
    ];
    let mut cmd = rpcgate(&args, Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else. Soft and
    // hard alike: rpcgate raises its soft limit to the hard one at startup.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().expect("run rpcgate");
    let pid = child.id().expect("running");
    let (addr, _stdout) = listening_on(&mut child).await;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = lines_tx.send(v);
            }
        }
    });
    with_timeout(up.wait_for_open_connections(1)).await;

    // Served connections, each proven by an answer, well within the limit.
    let used = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let mut held = Vec::new();
    for _ in 0..(LIMIT - used) / 2 {
        let mut client = Client::connect(addr).await;
        assert_eq!(client.post("/", CALL).await.status, StatusCode::OK);
        held.push(client);
    }
    // More than the descriptors left: the rest wait in the kernel's backlog.
    let mut waiting = Vec::new();
    for _ in 0..LIMIT {
        let mut tcp = raw_tcp(addr).await;
        tcp.write(raw_call()).await.unwrap();
        waiting.push(tcp);
    }
    let mut accept_failures = async || loop {
        let v = with_timeout(lines.recv()).await.expect("stderr open");
        let message = v["message"].as_str().unwrap_or_default();
        if message.contains("accept failed; out of file descriptors") {
            return v["suppressed"].as_u64().unwrap_or(0);
        }
    };
    accept_failures().await;

    // The connections it has are still answered.
    for client in &mut held {
        assert_eq!(client.post("/", CALL).await.status, StatusCode::OK);
    }
    // Between two of its once-a-second lines (timed by rpcgate's own clock), it
    // retried a bounded number of times and used a sliver of a CPU second.
    let before = cpu_ticks(pid);
    accept_failures().await;
    let retries = accept_failures().await;
    let used_ticks = cpu_ticks(pid) - before;
    // SAFETY: sysconf only reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        retries <= 40,
        "{retries} accept attempts in a second: it spins"
    );
    assert!(
        used_ticks < per_second,
        "{used_ticks} ticks of CPU over two one-second log intervals ({per_second}/s)"
    );
    assert!(child.try_wait().unwrap().is_none(), "rpcgate exited");

    // Descriptors freed, it accepts again.
    drop((held, waiting));
    eventually(async || served(addr).await).await;
    assert!(child.try_wait().unwrap().is_none(), "rpcgate exited");
}
