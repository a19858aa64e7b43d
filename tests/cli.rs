//! The real `rpcgate` binary: flags, environment, check-config, demo, signals.

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use support::binary::line_after;
use support::{FakeUpstream, post, request, with_timeout};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_rpcgate");

fn rpcgate() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn addr_of(url: &str) -> SocketAddr {
    let hostport = url
        .trim_start_matches("http://")
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap();
    hostport.parse().unwrap()
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running child").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test]
async fn check_config_lists_every_problem_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("rpcgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nope\"\ntypo = 1\n[calls]\nrequest_timeout = \"later\"\n[cors]\nallowed_origins = [\"*\"]\nallow_credentials = true\n[[upstreams]]\nurl = \"http://x\"\n",
    )
    .unwrap();
    let out = with_timeout(rpcgate().arg("check-config").arg(&bad).output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "listen",
        "typo: unknown key",
        "calls.request_timeout",
        "cors.allow_credentials",
        "upstreams[0].url",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rpcgate.toml");
    let out = with_timeout(rpcgate().arg("check-config").arg(example).output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn flags_and_environment_configure_the_gateway_and_sigterm_stops_it() {
    let up = FakeUpstream::start().await;
    let mut child = rpcgate()
        .env("RPCGATE_UPSTREAM", up.url())
        .env("RPCGATE_CONNECTIONS", "3")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--request-timeout",
            "300ms",
            "--shutdown-delay",
            "0s",
        ])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = addr_of(&line_after(&mut lines, "rpcgate listening on").await);
    up.wait_for_connections(3).await;

    // The upstream holds the call: the 300ms deadline from the flag answers it.
    let resp = post(addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"slow"}"#).await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT);

    up.auto_reply(|f| Some(f.result_text(json!("served"))));
    let resp = post(addr, "/", r#"{"jsonrpc":"2.0","id":2,"method":"m"}"#).await;
    assert_eq!(resp.json()["result"], "served");

    sigterm(&child);
    let status = with_timeout(child.wait()).await.unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
}

#[tokio::test]
async fn bad_flags_fail_fast_with_a_message() {
    let out = with_timeout(
        rpcgate()
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "off"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no upstream"));
    let out = with_timeout(
        rpcgate()
            .args(["--upstream", "http://not-ws", "--request-timeout", "soon"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn demo_serves_what_it_prints() {
    let mut child = rpcgate()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = line_after(&mut lines, "rpcgate demo:").await;
    let addr = addr_of(url.split_whitespace().next().unwrap());
    let curl = line_after(&mut lines, "curl -s").await;
    // The printed curl line's body, sent as printed.
    let body = curl.split("-d '").nth(1).unwrap().trim_end_matches('\'');
    let resp = post(addr, "/", body.to_string()).await;
    assert_eq!(
        resp.json(),
        json!({"jsonrpc":"2.0","id":1,"result":["hello"]})
    );
    let resp = post(addr, "/", r#"{"jsonrpc":"2.0","id":2,"method":"whoami"}"#).await;
    assert_eq!(resp.json()["result"], "demo-echo");
    sigterm(&child);
    assert!(with_timeout(child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn echo_server_subcommand_serves_websocket_json_rpc() {
    let mut child = rpcgate()
        .args([
            "echo-server",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "cli-echo",
        ])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = line_after(&mut lines, "echo-server listening on").await;
    let mut config = support::gateway::config_for(&[url], 1);
    config.calls.request_timeout = std::time::Duration::from_secs(10);
    let gw = support::gateway::start_gateway(config).await;
    gw.wait_open(1).await;
    let resp = post(
        gw.addr,
        "/",
        r#"{"jsonrpc":"2.0","id":"w","method":"whoami"}"#,
    )
    .await;
    assert_eq!(resp.json()["result"], "cli-echo");
    sigterm(&child);
    assert!(with_timeout(child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn json_logs_carry_an_access_line_per_request() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("ok"))));
    let mut child = rpcgate()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--upstream",
            &up.url(),
            "--log-format",
            "json",
            "--shutdown-delay",
            "0s",
        ])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = addr_of(&line_after(&mut lines, "rpcgate listening on").await);
    up.wait_for_connections(4).await;
    let resp = post(
        addr,
        "/",
        r#"{"jsonrpc":"2.0","id":1,"method":"secret-method","params":["password"]}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    sigterm(&child);
    let out = with_timeout(child.wait_with_output()).await.unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let access: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "rpcgate::access")
        .collect();
    assert_eq!(access.len(), 1, "{stderr}");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["method"], "POST");
    assert!(
        access[0]["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("ws://"))
    );
    assert!(!stderr.contains("password"), "bodies are never logged");
    assert!(
        stderr
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{stderr}"
    );
}

#[tokio::test]
async fn two_instances_with_default_admin_flags_both_start_on_loopback() {
    // The default admin port taken, by this test or by anything else on the machine:
    // both instances must then fall back, so the fallback path always runs.
    let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 9464)).ok();
    let up = FakeUpstream::start().await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut child = rpcgate()
            .env_remove("RPCGATE_ADMIN_LISTEN")
            .args(["--listen", "127.0.0.1:0", "--upstream", &up.url()])
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let admin = addr_of(&line_after(&mut lines, "rpcgate admin on").await);
        line_after(&mut lines, "rpcgate listening on").await;
        instances.push((child, lines, admin));
    }
    let (first, second) = (instances[0].2, instances[1].2);
    assert_ne!(first, second);
    for (_, _, admin) in &instances {
        // The fallback keeps the default's IP, so this is the default's IP too.
        assert_eq!(admin.ip(), Ipv4Addr::LOCALHOST, "{admin}");
        if held.is_some() {
            assert_ne!(admin.port(), 9464);
        }
        let resp = request(*admin, Method::GET, "/healthz", &[], "").await;
        assert_eq!(resp.status, StatusCode::OK);
    }
    for (mut child, _lines, _) in instances {
        child.start_kill().unwrap();
        let out = with_timeout(child.wait_with_output()).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if held.is_some() {
            assert!(
                stderr.contains("the default address is taken"),
                "no fallback warning:\n{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn an_explicit_admin_address_that_is_taken_fails_startup_naming_it() {
    let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let up = FakeUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("rpcgate-cli-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("admin.toml");
    std::fs::write(
        &file,
        format!(
            "admin_listen = \"{addr}\"\n[[upstreams]]\nurl = \"{}\"\n",
            up.url()
        ),
    )
    .unwrap();

    let mut by_flag = rpcgate();
    by_flag.args(["--listen", "127.0.0.1:0", "--upstream", &up.url()]);
    by_flag.args(["--admin-listen", &addr]);
    // An operator's mistake is one line, not a backtrace.
    by_flag.env("RUST_BACKTRACE", "1");
    let mut by_env = rpcgate();
    by_env.args(["--listen", "127.0.0.1:0", "--upstream", &up.url()]);
    by_env.env("RPCGATE_ADMIN_LISTEN", &addr);
    let mut by_file = rpcgate();
    by_file
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&file);
    by_file.env_remove("RPCGATE_ADMIN_LISTEN");
    for (how, mut cmd) in [("flag", by_flag), ("env", by_env), ("file", by_file)] {
        let out = with_timeout(cmd.output()).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how}: started on a taken port");
        assert!(
            stderr.contains(&format!("cannot listen on {addr}"))
                && stderr.contains("admin_listen")
                && stderr.contains("--admin-listen"),
            "{how}: the message should name {addr} and the setting:\n{stderr}"
        );
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("rpcgate: "))
            .collect();
        assert_eq!(said.len(), 1, "{how}: one line says why:\n{stderr}");
        assert!(!stderr.contains("backtrace"), "{how}:\n{stderr}");
        assert!(!stderr.contains("Caused by"), "{how}:\n{stderr}");
        assert_eq!(
            stderr.matches("in use").count(),
            1,
            "{how}: the cause once:\n{stderr}"
        );
    }
    drop(held);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn check_config_shows_the_admin_address_and_the_default_is_loopback() {
    let dir = std::env::temp_dir().join(format!("rpcgate-cli-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let upstream = "[[upstreams]]\nurl = \"ws://127.0.0.1:9000/\"\n";
    for (admin_line, shown) in [
        ("", "admin 127.0.0.1:9464 or a free port if taken"),
        ("admin_listen = \"0.0.0.0:9464\"\n", "admin 0.0.0.0:9464)"),
        ("admin_listen = \"off\"\n", "admin off)"),
    ] {
        let file = dir.join("check.toml");
        std::fs::write(&file, format!("{admin_line}{upstream}")).unwrap();
        let out = with_timeout(rpcgate().arg("check-config").arg(&file).output())
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(shown), "{shown:?} missing from {stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Credentials in an upstream URL authenticate the handshake and are shown nowhere:
/// not in logs, the access log, `/metrics`, or `check-config`'s output.
#[tokio::test]
async fn url_credentials_reach_the_upstream_and_nothing_else() {
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("ok"))));
    let url = format!(
        "ws://alice:hunter2-pw@{}/rpc?apikey=hunter2-key&net=main",
        up.addr()
    );
    let mut child = rpcgate()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &url,
            "--log-format",
            "json",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--shutdown-delay", "0s"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let admin_addr = addr_of(&line_after(&mut lines, "rpcgate admin on").await);
    let addr = addr_of(&line_after(&mut lines, "rpcgate listening on").await);
    up.wait_for_connections(4).await;
    let handshake = up.handshake(0);
    assert_eq!(
        handshake
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Basic YWxpY2U6aHVudGVyMi1wdw=="),
        "the userinfo becomes Basic credentials"
    );
    assert_eq!(
        handshake.uri.to_string(),
        "/rpc?apikey=hunter2-key&net=main",
        "the query reaches the upstream as written"
    );
    let resp = post(addr, "/", r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#).await;
    assert_eq!(resp.status, StatusCode::OK);
    let metrics = request(admin_addr, Method::GET, "/metrics", &[], "")
        .await
        .text();
    assert!(
        metrics.contains("rpcgate_upstream_connections{"),
        "{metrics}"
    );
    assert!(!metrics.contains("hunter2"), "{metrics}");
    assert!(metrics.contains("/rpc?apikey=***&net=***"), "{metrics}");
    sigterm(&child);
    let out = with_timeout(child.wait_with_output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rpcgate::access"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("rpcgate-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[[upstreams]]\nurl = \"http://bob:hunter2-pw@example.com/?token=hunter2-key\"\n",
    )
    .unwrap();
    let out = with_timeout(rpcgate().args(["check-config"]).arg(&file).output())
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(shown.contains("must start with ws://"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP (a closed terminal, a reload habit) must not kill a gateway mid-call.
#[tokio::test]
async fn sighup_is_logged_and_ignored_while_calls_go_on() {
    let up = FakeUpstream::start().await;
    let mut child = rpcgate()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .args(["--upstream", &up.url(), "--shutdown-delay", "0s"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = addr_of(&line_after(&mut lines, "rpcgate listening on").await);
    up.wait_for_connections(4).await;
    let call = tokio::spawn(post(
        addr,
        "/",
        r#"{"jsonrpc":"2.0","id":1,"method":"slow"}"#,
    ));
    let frame = up.next_frame().await;
    let pid = child.id().expect("running child").to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("run kill");
    assert!(hup.success());
    // Still serving after the signal: a new call goes through...
    up.auto_reply(|f| Some(f.result_text(json!("after"))));
    let after = post(addr, "/", r#"{"jsonrpc":"2.0","id":2,"method":"m"}"#).await;
    assert_eq!(after.json()["result"], "after");
    // ...and the call in flight when it came still gets its answer.
    frame.reply_result(json!("slow-done"));
    let resp = with_timeout(call).await.unwrap();
    assert_eq!(resp.json()["result"], "slow-done");
    sigterm(&child);
    let out = with_timeout(child.wait_with_output()).await.unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SIGHUP"), "{stderr}");
}

/// `rpcgate hash-key`: the hash an operator puts in `[[auth.keys]]`, and a key that
/// then really opens the gateway.
#[tokio::test]
async fn hash_key_prints_the_hash_the_gateway_accepts() {
    use tokio::io::AsyncWriteExt as _;
    let mut child = rpcgate()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    with_timeout(stdin.write_all(b"secret\n")).await.unwrap();
    drop(stdin);
    let out = with_timeout(child.wait_with_output()).await.unwrap();
    assert!(out.status.success());
    // SHA-256 of "secret": the line break is not part of the key.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
    );

    let out = with_timeout(rpcgate().args(["hash-key", "--generate"]).output())
        .await
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (key, hash) = stdout
        .trim()
        .split_once('\n')
        .expect("a key, then its hash");
    assert!(
        key.len() >= 43 && !key.contains(char::is_whitespace),
        "{key:?}"
    );
    assert_eq!(hash, rpcgate::config::key_hash(key));

    // The pair works: the gateway takes the key, and nothing else.
    let up = FakeUpstream::start().await;
    up.auto_reply(|f| Some(f.result_text(json!("in"))));
    let dir = std::env::temp_dir().join(format!("rpcgate-cli-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"off\"\n[[auth.keys]]\nname = \"ops\"\nhash = \"{hash}\"\n[[upstreams]]\nurl = \"{}\"\n",
            up.url()
        ),
    )
    .unwrap();
    let mut child = rpcgate().arg("--config").arg(&file).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = addr_of(&line_after(&mut lines, "rpcgate listening on").await);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;
    let bearer = format!("Bearer {key}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", bearer.as_str()),
    ];
    let resp = request(addr, Method::POST, "/", &headers, call).await;
    assert_eq!(resp.json()["result"], "in");
    let resp = post(addr, "/", call).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    sigterm(&child);
    let out = with_timeout(child.wait_with_output()).await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
    // The access log names the caller by the key's name, and never shows the key.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let access: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("rpcgate::access"))
        .collect();
    assert_eq!(access.len(), 2, "{stderr}");
    assert!(
        access[0].contains("status=200") && access[0].contains("caller=\"ops\""),
        "{stderr}"
    );
    assert!(
        access[1].contains("status=401") && !access[1].contains("caller="),
        "{stderr}"
    );
    assert!(
        !stderr.contains(key),
        "the key itself must never be logged: {stderr}"
    );
}
