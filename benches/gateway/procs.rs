//! Child processes (the gateway, the echo backend, the static responder) and what
//! /proc says about them: CPU time, resident memory, open descriptors.
//!
//! Children must never outlive a run, whatever way it ends: `kill_on_drop` covers a
//! normal return and a panic that unwinds, `PR_SET_PDEATHSIG` covers the bench being
//! killed outright.
//!
//! Children get only the settings the bench gives them: `RUST_LOG` and every
//! `RPCGATE_*` variable of the bench's own environment are removed, so that a
//! gateway started without settings runs the shipped defaults.
//!
//! With CPU pinning set ([`set_pinning`], from `RPCGATE_BENCH_CPUS`), each child is
//! started under `taskset -c LIST` by its role: rpcgate on the gateway's CPUs, the
//! echo backend on its own, the static responder on the gateway's (it sits in the
//! same seat) unless given its own, wrk on the generator's.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;

/// How long a child may take to print its "listening on" line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a killed child may take to be reaped before we stop waiting for it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Sampling period of VmRSS when the kernel's peak counter cannot be reset.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Lines of a child's stderr passed on to ours (warnings, errors, panics); beyond
/// these only their number is.
const FORWARD_LINES: usize = 20;

/// Pids of the children alive now, so that a window can tell the CPU this benchmark
/// used from what other work on the machine took.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process and its live children.
fn ours() -> Vec<u32> {
    let mut pids = children().clone();
    pids.push(std::process::id());
    pids
}

/// Which CPUs each role runs on: `RPCGATE_BENCH_CPUS`, e.g. `gen:0-1,gw:2-3,echo:4`.
#[derive(Clone, Debug)]
pub struct Pinning {
    /// (role, CPU list as taskset takes it), in the order given.
    roles: Vec<(Role, String)>,
}

/// What a pinned process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The load generators: this bench's own process (the built-in generator) and wrk.
    Gen,
    /// rpcgate.
    Gateway,
    /// The echo backends.
    Echo,
    /// The static responder; the gateway's CPUs when not given.
    Static,
}

impl Role {
    fn key(self) -> &'static str {
        match self {
            Role::Gen => "gen",
            Role::Gateway => "gw",
            Role::Echo => "echo",
            Role::Static => "static",
        }
    }

    /// The role of a child, by the name it is started with.
    fn of(name: &str) -> Option<Role> {
        match name {
            "rpcgate" => Some(Role::Gateway),
            "echo-server" => Some(Role::Echo),
            "static" => Some(Role::Static),
            "wrk" => Some(Role::Gen),
            _ => None,
        }
    }
}

impl Pinning {
    /// Parses `ROLE:LIST[,ROLE:LIST...]`, where ROLE is gen, gw, echo or static and LIST
    /// a taskset CPU list (`0-1`, `2,3`, `4`): a comma followed by no `ROLE:` continues
    /// the previous role's list. Every CPU must be one this process may run on.
    pub fn parse(text: &str) -> Result<Pinning> {
        let allowed = allowed_cpus()?;
        let mut roles: Vec<(Role, String)> = Vec::new();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let list = match token.split_once(':') {
                Some((key, list)) => {
                    let role = [Role::Gen, Role::Gateway, Role::Echo, Role::Static]
                        .into_iter()
                        .find(|r| r.key() == key.trim())
                        .with_context(|| format!("{key:?}: roles are gen, gw, echo and static"))?;
                    if roles.iter().any(|(r, _)| *r == role) {
                        bail!("{key} given twice");
                    }
                    roles.push((role, String::new()));
                    list.trim()
                }
                None => token,
            };
            let Some((_, cpus)) = roles.last_mut() else {
                bail!("{token:?}: a CPU list must follow a role, as in gw:2-3");
            };
            for cpu in expand(list)? {
                if !allowed.contains(&cpu) {
                    bail!("CPU {cpu} is not one this process may run on ({allowed:?})");
                }
            }
            if !cpus.is_empty() {
                cpus.push(',');
            }
            cpus.push_str(list);
        }
        for required in [Role::Gen, Role::Gateway, Role::Echo] {
            if !roles.iter().any(|(r, _)| *r == required) {
                bail!("no CPUs for {}", required.key());
            }
        }
        Ok(Pinning { roles })
    }

    /// The taskset CPU list of `role`.
    pub fn list(&self, role: Role) -> Option<&str> {
        let own = self.roles.iter().find(|(r, _)| *r == role);
        match (own, role) {
            (Some((_, list)), _) => Some(list),
            (None, Role::Static) => self.list(Role::Gateway),
            (None, _) => None,
        }
    }

    /// The CPUs of `role`, each once.
    pub fn cpus(&self, role: Role) -> Vec<usize> {
        let mut cpus = self
            .list(role)
            .map_or_else(Vec::new, |l| expand(l).unwrap_or_default());
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }

    /// CPUs the gateway has that neither the generator nor the backend uses.
    pub fn gateway_own_cpus(&self) -> usize {
        let others: Vec<usize> = [Role::Gen, Role::Echo]
            .into_iter()
            .flat_map(|r| self.cpus(r))
            .collect();
        self.cpus(Role::Gateway)
            .into_iter()
            .filter(|c| !others.contains(c))
            .count()
    }

    /// `gen 0-1, gw 2-3, echo 4`.
    pub fn describe(&self) -> String {
        self.roles
            .iter()
            .map(|(r, l)| format!("{} {l}", r.key()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Pins this process (the built-in generator) to the generator's CPUs. Before any
    /// thread is started: threads and children inherit it (children that have a role
    /// of their own get it from taskset).
    pub fn pin_self(&self) -> Result<()> {
        let cpus = self.cpus(Role::Gen);
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for
        // CPUs below CPU_SETSIZE, which `allowed_cpus` checked.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
            }
        }
        Ok(())
    }
}

/// The CPUs of a taskset list such as `0-2,5`.
fn expand(list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("{list:?}: {s:?} is not a CPU number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    bail!("{list:?}: range {part} runs backwards");
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(number(part)?),
        }
    }
    Ok(cpus)
}

/// The CPUs this process may run on now.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: sched_getaffinity fills the set it is given, of the size it is told.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
        Ok((0..max).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

static PINNING: OnceLock<Pinning> = OnceLock::new();

/// Starts every child with a role under `taskset -c` from now on. Checks first that
/// taskset (util-linux) runs.
pub fn set_pinning(pinning: Pinning) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .arg("-V")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => bail!("`taskset -V` failed ({})", o.status),
        Err(e) => bail!("taskset (util-linux) cannot run: {e}"),
    }
    PINNING
        .set(pinning)
        .map_err(|_| anyhow::anyhow!("CPU pinning set twice"))
}

pub fn pinning() -> Option<&'static Pinning> {
    PINNING.get()
}

/// `program args...`, or `taskset -c LIST program args...` when `name`'s role is pinned.
/// taskset execs the program, so the child's pid is the program's.
fn command_for<I, S>(name: &str, program: &OsStr, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let list = pinning().and_then(|p| p.list(Role::of(name)?));
    let mut command = match list {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(program);
            c
        }
        None => Command::new(program),
    };
    command.args(args);
    command
}

/// A running child that has announced its address.
pub struct Proc {
    /// For messages: "rpcgate", "echo-server", "static".
    name: String,
    child: Child,
    pid: u32,
    /// What followed "listening on " in the child's ready line.
    url: String,
    /// Held open only so that the static responder can treat EOF as "exit now".
    stdin: Option<ChildStdin>,
    /// Reads the child's stderr until it closes.
    stderr: Option<JoinHandle<StderrScan>>,
}

/// What a child wrote to stderr.
#[derive(Clone, Copy, Debug, Default)]
pub struct StderrScan {
    /// Lines in all.
    pub lines: u64,
    /// rpcgate's access-log lines (text format).
    pub access: u64,
}

impl Proc {
    /// Starts `program` and waits for the stdout line that holds `ready` (e.g.
    /// "rpcgate listening on "); the rest of that line is the child's URL.
    pub async fn spawn<I, S>(
        name: &str,
        program: &Path,
        args: I,
        envs: &[(&str, &str)],
        ready: &str,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = command_for(name, program.as_os_str(), args);
        only_our_settings(&mut command);
        command
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A pipe, as under journald or a container runtime; read by a task that
            // passes warnings on and counts the rest.
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id().context("child has no pid")?;
        let stdin = child.stdin.take();
        let stderr = child
            .stderr
            .take()
            .map(|e| tokio::spawn(scan_stderr(name.to_owned(), e)));
        let stdout = child.stdout.take().context("child stdout not piped")?;
        let mut lines = BufReader::new(stdout).lines();

        let found = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find(ready) {
                    return Ok(Some(line[at + ready.len()..].trim().to_owned()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let url = match found {
            Ok(Ok(Some(url))) => url,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                bail!("{name} exited before it was ready (status {status:?})");
            }
            Ok(Err(error)) => bail!("reading {name}'s stdout: {error}"),
            Err(_) => bail!("{name} printed no {ready:?} line within {READY_TIMEOUT:?}"),
        };
        children().push(pid);
        // Keep draining stdout so a chatty child can never block on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
            url,
            stdin,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes stdin, kills the child and reaps it; then what it wrote to stderr.
    pub async fn stop(mut self) -> Option<StderrScan> {
        drop(self.stdin.take());
        if let Err(error) = self.child.start_kill() {
            eprintln!("bench: killing {}: {error}", self.name);
        }
        if tokio::time::timeout(REAP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("bench: {} (pid {}) not reaped in time", self.name, self.pid);
        }
        let scan = self.stderr.take()?;
        // The pipe closes with the child; a grandchild holding it open must not stall us.
        match tokio::time::timeout(REAP_TIMEOUT, scan).await {
            Ok(Ok(scan)) => Some(scan),
            _ => None,
        }
    }
}

/// Removes what the bench's own environment would pass on and change in a child.
fn only_our_settings(command: &mut Command) {
    command.env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RPCGATE_") {
            command.env_remove(key);
        }
    }
}

/// Reads a child's stderr to the end: counts lines and rpcgate's access lines, and
/// passes on the first lines that are not info-or-below log lines (warnings,
/// errors, panics). The level sits at a fixed column of a text line, so a line costs
/// a newline search and two comparisons: this runs beside the measured gateway, on
/// the same cores.
async fn scan_stderr(name: String, mut pipe: impl AsyncRead + Unpin) -> StderrScan {
    let mut scan = StderrScan::default();
    let mut forwarded = 0;
    let mut buf = vec![0u8; 64 * 1024];
    // A line split across reads.
    let mut carry = Vec::new();
    let mut line = |line: &[u8], scan: &mut StderrScan| {
        scan.lines += 1;
        // `2026-12-01T11:26:52.613531Z  INFO rpcgate::access: ...`
        let level = line.get(28..33);
        if matches!(level, Some(b" INFO" | b"DEBUG" | b"TRACE")) {
            if line
                .get(34..)
                .is_some_and(|t| t.starts_with(b"rpcgate::access:"))
            {
                scan.access += 1;
            }
            return;
        }
        forwarded += 1;
        if forwarded <= FORWARD_LINES {
            eprintln!("{name}: {}", String::from_utf8_lossy(line));
        }
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            if carry.is_empty() {
                line(&rest[..at], &mut scan);
            } else {
                carry.extend_from_slice(&rest[..at]);
                line(&carry, &mut scan);
                carry.clear();
            }
            rest = &rest[at + 1..];
        }
        carry.extend_from_slice(rest);
    }
    if !carry.is_empty() {
        line(&carry, &mut scan);
    }
    if forwarded > FORWARD_LINES {
        eprintln!(
            "{name}: … and {} more such lines",
            forwarded - FORWARD_LINES
        );
    }
    scan
}

/// A child run to its end (a load generator), whose CPU counts as this bench's own
/// while it runs, not as other work on the machine.
pub struct Tool {
    child: Option<Child>,
    pid: u32,
}

impl Tool {
    pub fn spawn<I, S>(program: &str, args: I) -> std::io::Result<Tool>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = command_for(program, OsStr::new(program), args);
        only_our_settings(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("child has no pid"))?;
        children().push(pid);
        Ok(Tool {
            child: Some(child),
            pid,
        })
    }

    /// Waits for the child to exit, at most `timeout`, and returns what it printed.
    pub async fn finish(mut self, timeout: Duration) -> Result<Output> {
        let child = self.child.take().context("tool already finished")?;
        // On timeout the future, and with it the child, is dropped: kill_on_drop.
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => Ok(output?),
            Err(_) => bail!("still running after {timeout:?}; killed"),
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        children().retain(|&p| p != self.pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The child itself is killed by `kill_on_drop`.
        children().retain(|&p| p != self.pid);
    }
}

/// Asks the kernel to SIGKILL the child when the thread that forked it dies. The
/// threads that fork here (the main thread, tokio's workers) live as long as the
/// bench's runtime.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid).
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit, so that the bench and
/// the children it spawns afterwards (which inherit it) can hold 10,000 sockets each.
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Clock ticks per second, the unit of utime and stime in /proc/PID/stat.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// User plus system CPU time of `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses; fields after the
    // last ')' are plain. utime and stime are fields 14 and 15, i.e. the 12th and
    // 13th after the name.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("malformed /proc stat"))?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let mut next = || -> std::io::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed /proc stat"))
    };
    Ok(next()? + next()?)
}

/// CPU time the whole machine spent busy so far (all but idle and iowait), in ticks.
fn machine_busy_ticks() -> std::io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| std::io::Error::other("no cpu line in /proc/stat"))?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Ok(fields
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, v)| v)
        .sum())
}

/// Tells how much CPU the rest of the machine took over a stretch of time: other
/// people's builds and tests on the same cores, which make every number worse.
pub struct CpuMeter {
    /// This bench, its children and any pids it was asked to count as its own.
    pids: Vec<u32>,
    machine: Option<u64>,
    ours: u64,
}

impl CpuMeter {
    pub fn start(also: &[u32]) -> CpuMeter {
        let mut pids = ours();
        for &pid in also {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        let ours = ticks_of(&pids);
        CpuMeter {
            machine: machine_busy_ticks().ok(),
            ours,
            pids,
        }
    }

    /// CPU µs spent since `start` by anything but the pids counted as ours.
    pub fn foreign_us(&self) -> Option<f64> {
        let machine = machine_busy_ticks().ok()?.saturating_sub(self.machine?);
        let ours = ticks_of(&self.pids).saturating_sub(self.ours);
        Some(machine.saturating_sub(ours) as f64 * 1e6 / clock_ticks_per_sec() as f64)
    }
}

fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| cpu_ticks(p).ok()).sum()
}

/// A `kB` field of /proc/PID/status, such as "VmRSS" or "VmHWM", in KiB.
pub fn status_kib(pid: u32, field: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .ok_or_else(|| std::io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Resets the kernel's peak-RSS counter (VmHWM) of `pid` to its current RSS.
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// What one process used during a measured window.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// User + system CPU time in the window, µs.
    pub cpu_us: f64,
    /// Peak resident memory in the window, KiB.
    pub peak_rss_kib: Option<u64>,
    /// True when the peak is the highest of 100 ms VmRSS samples because VmHWM could
    /// not be reset; short spikes between samples are then missed.
    pub rss_sampled: bool,
}

/// Watches processes over a window [start, end) from a blocking thread, so that a busy
/// runtime cannot delay the snapshots that bound the window.
pub struct Monitor {
    handle: tokio::task::JoinHandle<Watched>,
}

/// What a monitor saw.
#[derive(Default)]
pub struct Watched {
    /// Per watched pid, in the order given; `None` where /proc could not be read (the
    /// process died).
    pub usage: Vec<Option<Usage>>,
    /// CPU µs the machine spent on anything but this bench and its children: builds
    /// or tests of others sharing the cores, which make the numbers worse.
    pub foreign_cpu_us: Option<f64>,
}

impl Monitor {
    pub fn start(pids: Vec<u32>, start: Instant, end: Instant) -> Monitor {
        let handle = tokio::task::spawn_blocking(move || watch(&pids, start, end));
        Monitor { handle }
    }

    pub async fn finish(self) -> Watched {
        self.handle.await.unwrap_or_default()
    }
}

fn watch(pids: &[u32], start: Instant, end: Instant) -> Watched {
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    // A peer gateway's pid is watched too, so its CPU is not "other work" either.
    let meter = CpuMeter::start(pids);
    let hwm_reset: Vec<bool> = pids.iter().map(|&p| reset_peak_rss(p).is_ok()).collect();
    let cpu_start: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p).ok()).collect();
    let mut sampled_max: Vec<Option<u64>> = vec![None; pids.len()];
    loop {
        for (max, &pid) in sampled_max.iter_mut().zip(pids) {
            if let Ok(rss) = status_kib(pid, "VmRSS") {
                *max = Some(max.map_or(rss, |m| m.max(rss)));
            }
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(RSS_SAMPLE_EVERY.min(end - now));
    }
    let foreign_cpu_us = meter.foreign_us();
    let tick_us = 1e6 / clock_ticks_per_sec() as f64;
    let usage = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let cpu = cpu_ticks(pid).ok()?.checked_sub(cpu_start[i]?)?;
            let hwm = if hwm_reset[i] {
                status_kib(pid, "VmHWM").ok()
            } else {
                None
            };
            Some(Usage {
                cpu_us: cpu as f64 * tick_us,
                peak_rss_kib: hwm.or(sampled_max[i]),
                rss_sampled: hwm.is_none(),
            })
        })
        .collect();
    Watched {
        usage,
        foreign_cpu_us,
    }
}
