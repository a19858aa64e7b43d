//! The real `rpcgate` binary in a child process: for what only a process shows
//! (signals, resource limits).

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::with_timeout;

/// `rpcgate` with `args`, stdout piped (for [`listening_on`]), stderr as `stderr`
/// says, no `RUST_LOG` from the test's environment; killed when dropped.
pub fn rpcgate(args: &[&str], stderr: Stdio) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rpcgate"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    cmd
}

/// Reads the child's stdout up to its `rpcgate listening on` line; the address in it.
pub async fn listening_on(child: &mut Child) -> (SocketAddr, Lines<BufReader<ChildStdout>>) {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = with_timeout(lines.next_line())
            .await
            .expect("read stdout")
            .expect("rpcgate exited before listening");
        if let Some(rest) = line.strip_prefix("rpcgate listening on http://") {
            let hostport = rest.split('/').next().unwrap_or_default();
            return (hostport.parse().expect("an address"), lines);
        }
    }
}

/// Sends `signal` (`-HUP`, `-TERM`) to the child.
pub fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("a running child").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Reads stdout lines until one starts with `prefix` (after indentation); returns the
/// rest of it.
pub async fn line_after(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    loop {
        let line = with_timeout(lines.next_line())
            .await
            .expect("read stdout")
            .unwrap_or_else(|| panic!("stdout ended before a line starting {prefix:?}"));
        if let Some(rest) = line.trim_start().strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}
