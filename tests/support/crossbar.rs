//! A real WAMP router ([`Router`], Crossbar.io) and a real WAMP callee and publisher
//! ([`Component`], `tests/wamp/component.py` on Autobahn|Python) on 127.0.0.1, for tests of
//! WAMP upstreams: peers we did not write.
//!
//! Where they come from: a virtualenv with the versions pinned in
//! `tests/wamp/requirements.txt`. `.ci/run` makes it in `target/wamp-venv` and exports
//! `RPCGATE_WAMP_VENV`; without the variable [`venv`] makes `target/wamp-venv` itself the first
//! time (about 3 minutes), under a lock file so that two test binaries running at once do not
//! both build it.
//!
//! Ports: Crossbar's config names its ports, and a restart must come back on the same ones (the
//! gateway reconnects to the URL it was given), so [`Router::start`] binds port 0 to pick two
//! free ports, closes them and writes them into the config. Another process can take such a port
//! in between; Crossbar then exits within seconds saying `Address already in use`, and `start`
//! tries again with new ports.
//!
//! Readiness is a log line, not a polled port: the controller prints `NODE_BOOT_COMPLETE` once
//! every worker and transport of the config is up, the component prints `ready` once its
//! procedures are registered and its ticks begin.
//!
//! Processes: each child runs in a process group of its own (Crossbar's controller starts its
//! router worker as a second process), killed whole when its owner is dropped. A test process
//! that dies without running `Drop` (a nextest timeout, Ctrl-C) must not leave a node holding its
//! ports: the router runs under a shell that waits for its stdin (our pipe) to close and then
//! kills its group; the component exits by itself when its stdin closes.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Notify;

use super::with_timeout_of;

/// The environment variable `.ci/run` exports: the virtualenv with Crossbar and Autobahn.
pub const VENV_ENV: &str = "RPCGATE_WAMP_VENV";

/// The realm of `tests/wamp/router.json.template`.
pub const REALM: &str = "realm1";

/// How long Crossbar may take to boot: about 4 s on an idle 2-core machine, but CI shares that
/// machine with compiles and other test binaries, and Python imports are slow under load.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the component may take to join and register (about 2 s idle), and the default for
/// [`Component::wait_for_line`].
pub const COMPONENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a stopped router may take to let go of its ports.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times [`Router::start`] picks new ports after losing a race for them.
const PORT_ATTEMPTS: usize = 5;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The virtualenv holding `crossbar` and Autobahn, checked (or made) once per test process.
/// Panics, naming `.ci/run`, if `RPCGATE_WAMP_VENV` is set to one that does not work: a test
/// that needs the router fails, it never passes by skipping.
pub fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(find_or_make_venv).clone()
}

fn find_or_make_venv() -> PathBuf {
    let requirements = Path::new(ROOT).join("tests/wamp/requirements.txt");
    if let Some(v) = std::env::var_os(VENV_ENV) {
        let venv = PathBuf::from(v);
        if let Err(why) = venv_problem(&venv, &requirements) {
            panic!(
                "{VENV_ENV}={} cannot run the WAMP tests: {why}. `.ci/run` makes it \
                 (tests/wamp/README.md says how by hand)",
                venv.display()
            );
        }
        return venv;
    }
    let target = Path::new(ROOT).join("target");
    let venv = target.join("wamp-venv");
    std::fs::create_dir_all(&target).expect("create target/");
    // Held until the venv is usable: a second test binary waits here, then finds it made.
    let lock = std::fs::File::create(target.join("wamp-venv.lock")).expect("create the lock file");
    lock.lock().expect("lock target/wamp-venv.lock");
    if venv_problem(&venv, &requirements).is_ok() {
        return venv;
    }
    let run = |cmd: &mut std::process::Command| {
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(status.success(), "{cmd:?} failed ({status})");
    };
    eprintln!("making {} (about 3 minutes, once)", venv.display());
    run(std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv));
    let pip = venv.join("bin/pip");
    run(std::process::Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements));
    // docs/wamp-notes.md: pip's isolated build compiles bjdata against NumPy 1.x, which then
    // prints a traceback in every process under the venv's NumPy 2; built here, it matches.
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
    if let Err(why) = venv_problem(&venv, &requirements) {
        panic!("made {} but it is not usable: {why}", venv.display());
    }
    venv
}

/// Checks the pinned versions and a silent import. A bjdata built against NumPy 1.x imports
/// "successfully" with a traceback on stderr, so only an empty stderr counts.
const VENV_CHECK: &str = r##"
import sys, importlib.metadata as md
import crossbar, autobahn.wamp.serializer
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, pinned = line.split("==")
        if md.version(name) != pinned:
            sys.exit(f"{name} is {md.version(name)}, requirements.txt pins {pinned}")
"##;

/// Where a venv that passed [`VENV_CHECK`] records the requirements it passed for. The check
/// imports crossbar (2.5 s), and nextest runs every test in a process of its own.
const CHECKED_STAMP: &str = "rpcgate-checked";

fn venv_problem(venv: &Path, requirements: &Path) -> Result<(), String> {
    let pins = std::fs::read(requirements)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements.display()));
    let stamp = venv.join(CHECKED_STAMP);
    if std::fs::read(&stamp).is_ok_and(|checked| checked == pins) {
        return Ok(());
    }
    let python = venv.join("bin/python");
    let out = std::process::Command::new(&python)
        .args(["-c", VENV_CHECK])
        .arg(requirements)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && stderr.trim().is_empty() {
        // Best effort: a venv we may not write to is checked again next time.
        let _ = std::fs::write(&stamp, pins);
        Ok(())
    } else {
        Err(format!("the import check said: {}", stderr.trim()))
    }
}

/// Lines a child printed (stdout and stderr merged), shared with the task that reads them, so a
/// test can wait for one and a failure can show what came before.
#[derive(Clone, Default)]
struct Output(Arc<(Mutex<Lines>, Notify)>);

#[derive(Default)]
struct Lines {
    /// The most recent lines; older ones are dropped so a long test cannot grow this unbounded.
    recent: VecDeque<String>,
    /// How many lines were dropped from the front of `recent`.
    dropped: usize,
    /// The child closed its output (it exited).
    ended: bool,
}

const KEEP_LINES: usize = 5000;

impl Output {
    /// Reads `from` line by line until it ends; keeps draining so that a chatty child never
    /// blocks on a full pipe.
    fn collect(&self, from: impl AsyncRead + Unpin + Send + 'static) {
        let output = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(from).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                output.update(|l| {
                    l.recent.push_back(line);
                    if l.recent.len() > KEEP_LINES {
                        l.recent.pop_front();
                        l.dropped += 1;
                    }
                });
            }
            output.update(|l| l.ended = true);
        });
    }

    fn update(&self, f: impl FnOnce(&mut Lines)) {
        f(&mut self.0.0.lock().expect("output lock"));
        self.0.1.notify_waiters();
    }

    /// Waits for a line (by number, counting from the child's first) at or after `from` that
    /// `matches`, for at most `limit`; its number, or what the child printed last if it ended
    /// first or the time ran out.
    async fn wait_for(
        &self,
        from: usize,
        limit: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<usize, String> {
        let found = tokio::time::timeout(limit, async {
            loop {
                // Registered before looking, so a line pushed in between still wakes us.
                let notified = self.0.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let l = self.0.0.lock().expect("output lock");
                    let skip = from.saturating_sub(l.dropped);
                    if let Some(i) = l.recent.iter().skip(skip).position(|s| matches(s)) {
                        return Some(l.dropped + skip + i);
                    }
                    if l.ended {
                        return None;
                    }
                }
                notified.await;
            }
        })
        .await;
        match found {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(format!("it exited; its last lines:\n{}", self.tail(40))),
            Err(_) => Err(format!(
                "not within {limit:?}; its last lines:\n{}",
                self.tail(40)
            )),
        }
    }

    /// Line number `n` (counting from the child's first), if still kept.
    fn line(&self, n: usize) -> Option<String> {
        let l = self.0.0.lock().expect("output lock");
        l.recent.get(n.checked_sub(l.dropped)?).cloned()
    }

    fn tail(&self, n: usize) -> String {
        let l = self.0.0.lock().expect("output lock");
        let skip = l.recent.len().saturating_sub(n);
        l.recent
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn text(&self) -> String {
        let l = self.0.0.lock().expect("output lock");
        l.recent.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A child in a process group of its own (`process_group(0)`), killed whole when dropped.
struct Group {
    child: Child,
    /// Our end of the child's stdin: closing it (dropping it, or our process dying) makes the
    /// child exit by itself, the fallback when no `Drop` runs.
    _stdin: Option<ChildStdin>,
    output: Output,
}

impl Group {
    /// Spawns `sh -c script args...` in a new process group, stdout and stderr merged by the
    /// script, stdin a pipe.
    fn spawn(script: &str, args: &[&std::ffi::OsStr]) -> Group {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh: {e}"));
        let output = Output::default();
        output.collect(child.stdout.take().expect("piped stdout"));
        let stdin = child.stdin.take();
        Group {
            child,
            _stdin: stdin,
            output,
        }
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the process group this Group created (its leader not yet
            // reaped, so the id cannot have been reused); no memory is involved.
            unsafe { libc::kill(-(pid as i32), signal) };
        }
    }

    /// Signals the Crossbar controller `ROUTER_SCRIPT` reported, if it is still in our group
    /// (so a reused pid is never signalled).
    fn signal_controller(&self, signal: i32) {
        let (Some(group), Some(pid)) = (self.child.id(), self.controller_pid()) else {
            return;
        };
        // SAFETY: getpgid(2) and kill(2) on a pid; no memory is involved.
        unsafe {
            if libc::getpgid(pid) == group as i32 {
                libc::kill(pid, signal);
            }
        }
    }

    fn controller_pid(&self) -> Option<i32> {
        self.output
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("controller pid ")?.trim().parse().ok())
    }

    /// Kills the group and reaps its leader.
    async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        with_timeout_of(STOP_TIMEOUT, self.child.wait())
            .await
            .expect("reap a killed child");
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// Runs Crossbar with its output on ours, says its controller's pid, and says when it exited
/// and how ([`EXITED`]). Beside it, a watcher waits for our end of the shell's stdin to close
/// (the Router dropped, or the test process gone without running `Drop`) and then kills the
/// whole group.
const ROUTER_SCRIPT: &str = r#"exec 3<&0 </dev/null
"$0" start --loglevel info --color false --cbdir "$1" 2>&1 &
crossbar=$!
echo "controller pid $crossbar"
(cat <&3; kill -KILL 0) >/dev/null 2>&1 &
exec 3<&-
wait "$crossbar"
echo "crossbar exited with status $?""#;

/// The line [`ROUTER_SCRIPT`] prints when Crossbar's controller has exited.
const EXITED: &str = "crossbar exited with status ";

/// A Crossbar.io node on two loopback ports, from `tests/wamp/router.json.template`: realm
/// [`REALM`]; [`Router::url`] takes anonymous sessions (the component joins there), and
/// [`Router::auth_url`] ticket and WAMP-CRA only (`ticket-user`/`ticket-secret`,
/// `cra-user`/`cra-secret`, `cra-salted`/`cra-salted-secret`). Killed when dropped.
pub struct Router {
    node: Option<Group>,
    port: u16,
    auth_port: u16,
    dir: TempDir,
}

impl Router {
    /// Starts a node on free ports and waits (up to [`BOOT_TIMEOUT`]) for `NODE_BOOT_COMPLETE`.
    pub async fn start() -> Router {
        let venv = venv();
        let mut lost_races = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let (port, auth_port) = free_ports();
            let dir = TempDir::new("crossbar");
            let mut router = Router {
                node: None,
                port,
                auth_port,
                dir,
            };
            router.write_config();
            match router.boot(&venv).await {
                Ok(()) => return router,
                Err(why) if why.contains("Address already in use") => lost_races.push(why),
                Err(why) => panic!("Crossbar did not boot: {why}"),
            }
        }
        panic!(
            "Crossbar lost the race for its ports {PORT_ATTEMPTS} times; the last:\n{}",
            lost_races.last().map_or("", String::as_str)
        );
    }

    fn write_config(&self) {
        let template =
            std::fs::read_to_string(Path::new(ROOT).join("tests/wamp/router.json.template"))
                .expect("read tests/wamp/router.json.template");
        let config = template
            .replace("__PORT__", &self.port.to_string())
            .replace("__AUTH_PORT__", &self.auth_port.to_string());
        std::fs::write(self.dir.0.join("config.json"), config).expect("write config.json");
    }

    async fn boot(&mut self, venv: &Path) -> Result<(), String> {
        // A node killed without its say leaves node.pid behind; if that pid were reused by a
        // live process, Crossbar would refuse to start ("already running").
        let _ = std::fs::remove_file(self.dir.0.join("node.pid"));
        let crossbar = venv.join("bin/crossbar");
        let mut node = Group::spawn(
            ROUTER_SCRIPT,
            &[crossbar.as_os_str(), self.dir.0.as_os_str()],
        );
        let booted = node
            .output
            .wait_for(0, BOOT_TIMEOUT, |l| {
                l.contains("NODE_BOOT_COMPLETE") || l.starts_with(EXITED)
            })
            .await;
        let booted = booted.and_then(|line| {
            if node
                .output
                .line(line)
                .is_some_and(|l| l.starts_with(EXITED))
            {
                Err(format!(
                    "it exited; its last lines:\n{}",
                    node.output.tail(40)
                ))
            } else {
                Ok(())
            }
        });
        if let Err(why) = booted {
            node.kill().await;
            return Err(why);
        }
        self.node = Some(node);
        // The boot line comes once the transports listen; say so plainly if not.
        for port in [self.port, self.auth_port] {
            assert!(
                accepts(port).await,
                "Crossbar reported NODE_BOOT_COMPLETE but 127.0.0.1:{port} refuses connections"
            );
        }
        Ok(())
    }

    /// `ws://127.0.0.1:PORT/ws`: anonymous sessions.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// `ws://127.0.0.1:AUTH_PORT/ws`: ticket and WAMP-CRA sessions only.
    pub fn auth_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.auth_port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn auth_port(&self) -> u16 {
        self.auth_port
    }

    /// Everything the running node printed (the most recent [`KEEP_LINES`] lines), for a
    /// failure message.
    pub fn log(&self) -> String {
        self.node
            .as_ref()
            .map(|n| n.output.text())
            .unwrap_or_default()
    }

    /// Stops the node gracefully (SIGTERM: Crossbar closes its sessions, the component's
    /// included, with GOODBYE) and waits until both ports refuse connections. Killed if it has
    /// not gone within 30 s.
    pub async fn stop(&mut self) {
        let Some(mut node) = self.node.take() else {
            return;
        };
        // To the controller alone: signalled directly, the worker would die without the
        // controller shutting it down in order.
        node.signal_controller(libc::SIGTERM);
        // Then the worker goes too; whatever is left when the controller is gone is killed.
        let _ = node
            .output
            .wait_for(0, STOP_TIMEOUT, |l| l.starts_with(EXITED))
            .await;
        node.kill().await;
        self.wait_ports_closed().await;
    }

    /// Kills the node at once (SIGKILL to its group: a crash, no GOODBYE) and waits until both
    /// ports refuse connections.
    pub async fn kill(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.kill().await;
        }
        self.wait_ports_closed().await;
    }

    async fn wait_ports_closed(&self) {
        let (port, auth_port) = (self.port, self.auth_port);
        with_timeout_of(STOP_TIMEOUT, async {
            while accepts(port).await || accepts(auth_port).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Stops the node (if running) and starts it again on the same ports and directory,
    /// waiting for `NODE_BOOT_COMPLETE`. A component must be started again: it exits when its
    /// router goes.
    pub async fn restart(&mut self) {
        self.stop().await;
        let venv = venv();
        let mut failures = Vec::new();
        // Between stop and start a port is free for anyone; an outgoing connection can be given
        // it as its local port for a moment. Rare: a few attempts, then give up loudly.
        for _ in 0..PORT_ATTEMPTS {
            match self.boot(&venv).await {
                Ok(()) => return,
                Err(why) if why.contains("Address already in use") => failures.push(why),
                Err(why) => panic!("Crossbar did not boot again: {why}"),
            }
        }
        panic!(
            "Crossbar could not get its ports {} and {} back:\n{}",
            self.port,
            self.auth_port,
            failures.last().map_or("", String::as_str)
        );
    }
}

/// Two distinct ports that were free a moment ago (bound on port 0 together, then closed).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    (port(&a), port(&b))
}

async fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// `tests/wamp/component.py` joined to a [`Router`]'s anonymous transport: the procedures
/// `com.example.{add2,pair,kw,echo,fail,slow}` and a tick on `com.example.tick` every 100 ms
/// (`[n]`, `{"n": n}`). It exits when its router goes (start a new one after
/// [`Router::restart`]); killed when dropped.
pub struct Component {
    process: Group,
}

impl Component {
    /// Starts the component and waits (up to [`COMPONENT_TIMEOUT`]) for its `ready` line.
    pub async fn start(router: &Router) -> Component {
        let python = venv().join("bin/python");
        let script = Path::new(ROOT).join("tests/wamp/component.py");
        let url = router.url();
        let process = Group::spawn(
            r#"exec "$0" "$1" --url "$2" 2>&1"#,
            &[python.as_os_str(), script.as_os_str(), url.as_ref()],
        );
        let component = Component { process };
        if let Err(why) = component
            .process
            .output
            .wait_for(0, COMPONENT_TIMEOUT, |l| l == "ready")
            .await
        {
            panic!("the WAMP component did not get ready: {why}");
        }
        component
    }

    /// Waits (up to [`COMPONENT_TIMEOUT`]) until the component has printed `line` (the whole
    /// line, e.g. `canceled 30` when a CANCEL reached `slow(30)`), at any time since it started.
    #[track_caller]
    pub fn wait_for_line<'a>(&'a self, line: &'a str) -> impl Future<Output = ()> + 'a {
        self.wait_for_line_within(line, COMPONENT_TIMEOUT)
    }

    /// [`Self::wait_for_line`] with an explicit limit.
    #[track_caller]
    pub fn wait_for_line_within<'a>(
        &'a self,
        line: &'a str,
        limit: Duration,
    ) -> impl Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            if let Err(why) = self.process.output.wait_for(0, limit, |l| l == line).await {
                panic!("the WAMP component did not print {line:?} at {caller}: {why}");
            }
        }
    }

    /// Whether the component has printed `line` so far.
    pub fn printed(&self, line: &str) -> bool {
        self.process.output.text().lines().any(|l| l == line)
    }

    /// Everything it printed so far, for a failure message.
    pub fn log(&self) -> String {
        self.process.output.text()
    }
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        // Numbered, not named after a port: two tests picking ports at the same moment can be
        // handed the same one (it is free again once closed), and must not share a cbdir.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rpcgate-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
