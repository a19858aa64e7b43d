//! DRAFT (issue 14 groundwork): the WAMP codec (`rpcgate::upstream::wamp`) against a
//! real Crossbar.io router, over a plain tokio-tungstenite socket, no gateway yet. It
//! proves the frames, not rpcgate's handling of them; the wiring session should replace
//! it with black-box gateway tests and move the router and component start-up into
//! `tests/support/`.
//!
//! The router and the Autobahn|Python callee come from a virtualenv:
//! `RPCGATE_WAMP_VENV`, or `target/wamp-venv`, made here once (about 3 minutes) from
//! `tests/wamp/requirements.txt` (docs/wamp-notes.md says why bjdata is rebuilt).

use futures_util::{SinkExt, StreamExt};
use rpcgate::upstream::wamp::{self, CraChallenge, HelloAuth, Message, Payload};
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Crossbar needs about 4 s to boot on an idle 2-core machine; CI shares it.
const BOOT: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_secs(20);

fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("RPCGATE_WAMP_VENV") {
        return PathBuf::from(v);
    }
    let target = Path::new(ROOT).join("target");
    let venv = target.join("wamp-venv");
    std::fs::create_dir_all(&target).expect("create target/");
    // Test processes may run in parallel (nextest): one makes the venv.
    let lock = std::fs::File::create(target.join("wamp-venv.lock")).expect("lock file");
    lock.lock().expect("lock the venv");
    let python = venv.join("bin/python");
    // A bjdata built against NumPy 1.x imports "successfully" with a traceback on
    // stderr: only a silent import counts.
    let has = |p: &Path| {
        std::process::Command::new(p)
            .args(["-c", "import crossbar, autobahn.wamp.serializer"])
            .output()
            .is_ok_and(|o| o.status.success() && o.stderr.is_empty())
    };
    if !has(&python) {
        let run = |cmd: &mut std::process::Command| {
            let status = cmd.status().expect("run a setup command");
            assert!(status.success(), "{cmd:?} failed");
        };
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv));
        let pip = venv.join("bin/pip");
        let requirements = Path::new(ROOT).join("tests/wamp/requirements.txt");
        run(std::process::Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(requirements));
        run(std::process::Command::new(&pip).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--force-reinstall",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "bjdata==0.6.6",
        ]));
    }
    venv
}

/// A child in its own process group, which is killed whole when dropped: Crossbar's
/// controller starts its router worker as a second process.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            // SAFETY: kill(2) on a process group we created; no memory is involved.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// Waits for a line containing `needle` on the child's stdout (its stderr is merged
/// in), failing with what it printed if it exits first. The lines after it come on
/// the returned channel (the first 64 that were not read; later ones are dropped).
async fn wait_for_line(child: &mut Child, needle: &str) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let found = timeout(BOOT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                return true;
            }
            seen.push(line);
        }
        false
    })
    .await;
    let tail = seen
        .iter()
        .rev()
        .take(30)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        matches!(found, Ok(true)),
        "no {needle:?} line; last output:\n{tail}"
    );
    // Keep draining, so that a chatty child never blocks on a full pipe.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.try_send(line);
        }
    });
    rx
}

struct Router {
    _node: Group,
    _component: Group,
    /// What the component prints after `ready` (`canceled N` when a call is interrupted).
    component_lines: mpsc::Receiver<String>,
    port: u16,
    auth_port: u16,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_router() -> Router {
    let venv = venv();
    let (port, auth_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("rpcgate-crossbar-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make the cbdir");
    let dir = TempDir(dir);
    let template = std::fs::read_to_string(Path::new(ROOT).join("tests/wamp/router.json.template"))
        .expect("read the router config template");
    let config = template
        .replace("__PORT__", &port.to_string())
        .replace("__AUTH_PORT__", &auth_port.to_string());
    std::fs::write(dir.0.join("config.json"), config).expect("write config.json");

    // Through sh for `2>&1`: Crossbar logs to both streams; `exec` keeps the pid.
    let mut node = Command::new("sh")
        .args([
            "-c",
            r#"exec "$0" start --loglevel info --color false --cbdir "$1" 2>&1"#,
        ])
        .arg(venv.join("bin/crossbar"))
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start crossbar");
    let _ = wait_for_line(&mut node, "NODE_BOOT_COMPLETE").await;
    let node = Group(node);

    let mut component = Command::new("sh")
        .args(["-c", r#"exec "$0" "$1" --url "$2" 2>&1"#])
        .arg(venv.join("bin/python"))
        .arg(Path::new(ROOT).join("tests/wamp/component.py"))
        .arg(format!("ws://127.0.0.1:{port}/ws"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the Autobahn component");
    let component_lines = wait_for_line(&mut component, "ready").await;
    Router {
        _node: node,
        _component: Group(component),
        component_lines,
        port,
        auth_port,
        _dir: dir,
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn open(port: u16) -> Ws {
    let mut request = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        wamp::SUBPROTOCOL.parse().expect("header value"),
    );
    let (ws, response) = timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake");
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some(wamp::SUBPROTOCOL)
    );
    ws
}

async fn send(ws: &mut Ws, frame: String) {
    timeout(STEP, ws.send(WsMessage::text(frame)))
        .await
        .expect("send in time")
        .expect("send");
}

/// The next text frame; WAMP over JSON uses text frames only.
async fn next(ws: &mut Ws) -> String {
    loop {
        let m = timeout(STEP, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("read");
        if let WsMessage::Text(t) = m {
            return t.as_str().to_owned();
        }
    }
}

/// The next frame that is not an EVENT: ticks arrive every 100 ms while subscribed.
async fn next_not_event(ws: &mut Ws) -> String {
    loop {
        let frame = next(ws).await;
        if !matches!(wamp::parse(&frame), Ok(Message::Event { .. })) {
            return frame;
        }
    }
}

fn raw(s: &str) -> &RawValue {
    serde_json::from_str(s).expect("JSON")
}

/// Joins with WAMP-CRA as `authid`, answering the CHALLENGE with `secret`.
async fn join_cra(ws: &mut Ws, authid: &str, secret: &str) -> String {
    let mut out = String::new();
    wamp::write_hello(
        &mut out,
        "realm1",
        HelloAuth {
            methods: &["wampcra"],
            authid: Some(authid),
        },
    );
    send(ws, out).await;
    let frame = next(ws).await;
    let Ok(Message::Challenge { authmethod, extra }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(authmethod, "wampcra");
    let signature = CraChallenge::from_extra(extra)
        .expect("challenge extra")
        .sign(secret.as_bytes());
    let mut out = String::new();
    wamp::write_authenticate(&mut out, &signature.expect("sign"));
    send(ws, out).await;
    next(ws).await
}

#[tokio::test]
async fn draft_the_wamp_codec_speaks_to_a_real_crossbar_router() {
    let mut router = start_router().await;

    // Anonymous HELLO, WELCOME, CALL add2(2, 3), RESULT [5].
    let mut ws = open(router.port).await;
    let mut out = String::new();
    wamp::write_hello(&mut out, "realm1", HelloAuth::default());
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );

    let mut out = String::new();
    let payload = wamp::split_params(Some(raw("[2,3]"))).expect("params");
    wamp::write_call(&mut out, 1, None, r#""com.example.add2""#, payload);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Result {
        request: 1,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(wamp::result_json(payload), "5");

    // Keyword params in, keyword results out.
    let mut out = String::new();
    let payload = wamp::split_params(Some(raw(r#"{"a":5,"b":3}"#))).expect("params");
    wamp::write_call(&mut out, 2, None, r#""com.example.kw""#, payload);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Result {
        request: 2,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    let result: serde_json::Value =
        serde_json::from_str(&wamp::result_json(payload)).expect("JSON");
    assert_eq!(result, serde_json::json!({"sum": 8, "diff": 2}));

    // An ApplicationError comes back as ERROR with its URI and args.
    let mut out = String::new();
    wamp::write_call(
        &mut out,
        3,
        None,
        r#""com.example.fail""#,
        Payload {
            args: Some(raw(r#"["it broke"]"#)),
            kwargs: None,
        },
    );
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Error {
        request_type: wamp::code::CALL,
        request: 3,
        error,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    let mut object = String::new();
    wamp::write_error_object(&mut object, &error, payload);
    let object: serde_json::Value = serde_json::from_str(&object).expect("JSON");
    assert_eq!(object["message"], "com.example.error.fail: it broke");
    assert_eq!(object["data"]["args"], serde_json::json!(["it broke"]));

    // A timed-out call: CANCEL (killnowait) gets the caller its ERROR at once.
    let mut out = String::new();
    wamp::write_call(
        &mut out,
        4,
        None,
        r#""com.example.slow""#,
        Payload {
            args: Some(raw("[30]")),
            kwargs: None,
        },
    );
    send(&mut ws, out).await;
    let mut out = String::new();
    wamp::write_cancel(&mut out, 4, wamp::CancelMode::KillNoWait);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Error {
        request_type: wamp::code::CALL,
        request: 4,
        error,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(error, "wamp.error.canceled");
    // ... and the callee was interrupted (Autobahn also logs the `fail` call's error).
    let canceled = timeout(STEP, async {
        while let Some(line) = router.component_lines.recv().await {
            if line == "canceled 30" {
                return true;
            }
        }
        false
    });
    assert!(
        matches!(canceled.await, Ok(true)),
        "the callee did not print `canceled 30`"
    );

    // SUBSCRIBE, EVENTs from the component's ticks, PUBLISH acknowledged, UNSUBSCRIBE.
    let mut out = String::new();
    wamp::write_subscribe(&mut out, 5, None, r#""com.example.tick""#);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Subscribed {
        request: 5,
        subscription,
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    let frame = next(&mut ws).await;
    let Ok(Message::Event {
        subscription: s,
        payload,
        ..
    }) = wamp::parse(&frame)
    else {
        panic!("{frame}")
    };
    assert_eq!(s, subscription);
    // The component publishes `[n]` and `{"n": n}`: both kinds, so both are kept.
    let event: serde_json::Value = serde_json::from_str(&wamp::result_json(payload)).expect("JSON");
    assert_eq!(event["args"][0], event["kwargs"]["n"], "{frame}");

    // Our own PUBLISH is acknowledged, and reaches our own subscription too: one
    // upstream session carries many clients, so the codec asks for `exclude_me: false`.
    let mut out = String::new();
    wamp::write_publish(
        &mut out,
        6,
        true,
        r#""com.example.tick""#,
        Payload {
            args: Some(raw(r#"["mine"]"#)),
            kwargs: None,
        },
    );
    send(&mut ws, out).await;
    // Ticks keep coming, so `next`'s own timeout never fires here: bound the whole wait.
    let (mut published, mut mine) = (false, false);
    let waited = timeout(STEP, async {
        while !(published && mine) {
            let frame = next(&mut ws).await;
            match wamp::parse(&frame) {
                Ok(Message::Published { request: 6, .. }) => published = true,
                Ok(Message::Event { payload, .. }) => {
                    mine |= payload.args.is_some_and(|a| a.get() == r#"["mine"]"#)
                }
                _ => panic!("{frame}"),
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "PUBLISHED: {published}, our own EVENT: {mine}"
    );

    let mut out = String::new();
    wamp::write_unsubscribe(&mut out, 7, subscription);
    send(&mut ws, out).await;
    let frame = next_not_event(&mut ws).await;
    assert!(
        matches!(
            wamp::parse(&frame),
            Ok(Message::Unsubscribed { request: 7 })
        ),
        "{frame}"
    );

    // GOODBYE is answered with GOODBYE (an EVENT sent before the UNSUBSCRIBE took
    // effect may still come first).
    let mut out = String::new();
    wamp::write_goodbye(&mut out, wamp::CLOSE_SHUTDOWN);
    send(&mut ws, out).await;
    let frame = next_not_event(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Goodbye { .. })),
        "{frame}"
    );

    // A ticket.
    let mut ws = open(router.auth_port).await;
    let mut out = String::new();
    let auth = HelloAuth {
        methods: &["ticket"],
        authid: Some("ticket-user"),
    };
    wamp::write_hello(&mut out, "realm1", auth);
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Challenge { authmethod, .. }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(authmethod, "ticket");
    let mut out = String::new();
    wamp::write_authenticate(&mut out, "ticket-secret");
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );

    // WAMP-CRA, plain and salted, and a wrong secret.
    let mut ws = open(router.auth_port).await;
    let frame = join_cra(&mut ws, "cra-user", "cra-secret").await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );
    let mut ws = open(router.auth_port).await;
    let frame = join_cra(&mut ws, "cra-salted", "cra-salted-secret").await;
    assert!(
        matches!(wamp::parse(&frame), Ok(Message::Welcome { .. })),
        "{frame}"
    );
    let mut ws = open(router.auth_port).await;
    let frame = join_cra(&mut ws, "cra-user", "wrong").await;
    let Ok(Message::Abort { reason, .. }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(reason, "wamp.error.not_authorized");

    // An unknown realm is an ABORT with the router's explanation.
    let mut ws = open(router.port).await;
    let mut out = String::new();
    wamp::write_hello(&mut out, "nosuch", HelloAuth::default());
    send(&mut ws, out).await;
    let frame = next(&mut ws).await;
    let Ok(Message::Abort { reason, details }) = wamp::parse(&frame) else {
        panic!("{frame}")
    };
    assert_eq!(reason, "wamp.error.no_such_realm");
    assert!(
        wamp::details_message(details).is_some_and(|m| m.contains("nosuch")),
        "{frame}"
    );
}
