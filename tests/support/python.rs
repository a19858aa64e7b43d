//! The Python `websockets` upstream (`tests/interop/upstream.py`), an upstream we did
//! not write: a virtualenv made once (or `RPCGATE_INTEROP_PYTHON`), and the process.

use super::with_timeout;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WEBSOCKETS: &str = "websockets==17.4";

/// A python interpreter that can `import websockets`, set up at most once.
pub fn python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(find_or_make_python).clone()
}

fn find_or_make_python() -> PathBuf {
    if let Some(p) = std::env::var_os("RPCGATE_INTEROP_PYTHON") {
        let p = PathBuf::from(p);
        assert!(
            has_websockets(&p),
            "RPCGATE_INTEROP_PYTHON={} cannot import websockets",
            p.display()
        );
        return p;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join("interop-venv");
    let python = venv.join("bin").join("python");
    std::fs::create_dir_all(root.join("target")).expect("create target/");
    // Test binaries may run in parallel processes (nextest): one builds the venv.
    let lock =
        std::fs::File::create(root.join("target").join("interop-venv.lock")).expect("lock file");
    lock.lock().expect("lock the venv");
    if !has_websockets(&python) {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the interop suite");
        assert!(made.success(), "python3 -m venv failed");
        let installed = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                WEBSOCKETS,
            ])
            .status()
            .expect("run pip");
        assert!(installed.success(), "pip install {WEBSOCKETS} failed");
    }
    python
}

fn has_websockets(python: &Path) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import websockets.asyncio.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python upstream, killed when dropped (its stdin closing also stops it).
pub struct PyUpstream {
    pub child: Child,
    pub url: String,
}

impl PyUpstream {
    pub async fn start(name: &str) -> PyUpstream {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/upstream.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the python upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        with_timeout(BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("read LISTENING line");
        let port = line
            .trim()
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("unexpected first line from upstream.py: {line:?}"));
        PyUpstream {
            child,
            url: format!("ws://127.0.0.1:{port}/"),
        }
    }
}
