//! End-to-end benchmark: the release `rpcgate` in front of the release echo backend,
//! driven over real sockets by a closed-loop load generator in this process (and by
//! wrk, when installed), next to the two ceilings it cannot beat (a bare hyper
//! responder, and the backend driven directly over WebSocket).
//!
//! rpcgate runs with the shipped defaults, access log included, unless a row's label
//! says otherwise: its stderr is a pipe this bench drains, as under journald or a
//! container runtime.
//!
//! Run with `cargo bench --bench gateway`. Settings come from the environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `RPCGATE_BENCH_SECS` | 5 | measured seconds per run (after 1 s warmup) |
//! | `RPCGATE_BENCH_LEVELS` | 1,32,256,2000 | concurrent clients of the echo comparison |
//! | `RPCGATE_BENCH_PEER_URL` | unset | another gateway (http://, loopback only) to load the same way |
//! | `RPCGATE_BENCH_PEER_PID` | unset | its pid, for its CPU and RSS |
//! | `RPCGATE_BENCH_SCENARIOS` | 1 | 0 skips the large-params, batch and slow-call scenarios |
//! | `RPCGATE_BENCH_CAPACITY` | 1 | 0 skips the 10k-idle and 10k-in-flight runs |
//! | `RPCGATE_BENCH_IN_FLIGHT` | 1 | 0 skips the in-flight runs only (the 10k-idle one stays) |
//! | `RPCGATE_BENCH_BUSY_RETRIES` | 2 | tries again of a run during which other work used the CPU |
//! | `RPCGATE_BENCH_WRK` | 1 | 0 skips the wrk rows (skipped anyway, with a note, when `wrk` is not installed) |
//! | `RPCGATE_BENCH_WORKERS` | 1 | 0 skips the `--workers 2` wrk rows at 32 and 256 clients (and their repeat of the default's) |
//! | `RPCGATE_BENCH_MEMORY` | 1 | 0 skips the 10k idle WebSocket clients and 10k idle event streams |
//! | `RPCGATE_BENCH_CPUS` | unset | pin by role with `taskset -c`, e.g. `gen:0-1,gw:2-3,echo:4` (roles `gen`: this bench and wrk; `gw`: rpcgate; `echo`: the backends; `static`: the static responder, default the `gw` CPUs) |
//!
//! The 10k-connection rows (idle keep-alive clients, idle WebSocket clients, idle event
//! streams, calls in flight) need about 11,000 descriptors in this process and in the
//! gateway: the bench raises its soft RLIMIT_NOFILE to the hard limit (children inherit
//! it) and skips those rows, with a note, if that is still too low (`ulimit -Hn`).
//!
//! Rows for issue 13: at 32 and 256 clients, under wrk, the defaults (`workers = 1`)
//! and `--workers 2` alternate twice, so that their CPU per call compares within the
//! run; the report ends with a "Targets (issue 13)" table, each target judged on this
//! run's figures.
//!
//! Each run gets a fresh gateway (and static responder), so memory one run leaves
//! behind is not charged to the next. Other work on the machine (a build, someone
//! else's tests) is measured from /proc/stat during every window; a run it disturbed
//! is tried again once the machine is quiet, and flagged if it never is.
//!
//! Results go to stdout as markdown and to `target/bench/gateway.{json,md}`.
//!
//! Layout:
//! - `main.rs`: settings, the process roles, the order of runs.
//! - `load.rs`: the HTTP and WebSocket closed-loop generators and their histograms.
//! - `wrk.rs`, `post.lua`: the outside generator, and the script it runs.
//! - `procs.rs`: child processes and what /proc says about them.
//! - `report.rs`: tables, JSON and the checklist of targets.
//!
//! The same binary is also the static responder: started with
//! `RPCGATE_BENCH_ROLE=static` it serves a fixed reply until its stdin closes, in its
//! own process so that it shares no runtime with the generator, just as rpcgate does.

mod load;
mod procs;
mod report;
mod wrk;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use load::{Call, HttpTarget, Target, Window, Workload, WsTarget};
use procs::{CpuMeter, Monitor, Proc};
use report::{
    ACCESS_LEVELS, ACCESS_OFF, ACCESS_ROUNDS, BUILT_IN, BUSY_CORES, IDLE_KEEP_ALIVE, IDLE_STREAMS,
    IDLE_WEBSOCKETS, Idle, LevelRow, Measured, Report, ScenarioRow, WORKERS_2, WORKERS_LEVELS,
    WORKERS_ROUNDS, WRK,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Selects what this process is; unset means the benchmark itself.
const ROLE_VAR: &str = "RPCGATE_BENCH_ROLE";
const WARMUP: Duration = Duration::from_secs(1);
/// Pause between runs, so connections closed by one run are gone before the next.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a fresh gateway may take to answer its first call (its upstream
/// connections open in the background).
const READY_WAIT: Duration = Duration::from_secs(15);
const IDLE_CLIENTS: usize = 10_000;
/// The gateway closes idle keep-alive connections after 60 s; every connection must
/// be open and counted well before the first one opened reaches that.
const IDLE_CONNECT_BUDGET: Duration = Duration::from_secs(35);
/// WebSocket clients answer the gateway's pings and event streams get its keep-alive
/// comments, so neither is closed as idle: more time to open them all.
const KEPT_CONNECT_BUDGET: Duration = Duration::from_secs(60);
/// A WebSocket client's read buffer in this bench: tungstenite's default (128 KiB,
/// allocated up front) would cost 1.3 GB here for 10,000 clients.
const WS_READ_BUFFER: usize = 4096;
/// Descriptors this process and the gateway each need for the 10k-connection rows.
const NOFILE_NEEDED: u64 = IDLE_CLIENTS as u64 + 1000;
/// From this limit on, a gateway with the default `http.max_connections` (20,000) no
/// longer warns that it could run out of descriptors (it asks for about 21,156).
const GATEWAY_NOFILE_QUIET: u64 = 21_200;
const IN_FLIGHT_CLIENTS: [usize; 2] = [500, 10_000];
/// Upstream connections of the in-flight gateway, and calls each may carry: room for
/// all 10,000 calls at once.
const IN_FLIGHT_CONNECTIONS: usize = 4;
const IN_FLIGHT_PER_CONNECTION: usize = 4096;
/// Runs during which other work took more than `BUSY_CORES` are retried, but only
/// for this long in all, and each retry waits at most `QUIET_WAIT` for quiet first.
const RETRY_BUDGET: Duration = Duration::from_secs(300);
const QUIET_WAIT: Duration = Duration::from_secs(10);
const STATIC_REPLY: &str = r#"{"jsonrpc":"2.0","id":1,"result":["hello"]}"#;
/// How long a wrk run may overrun its length before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    if std::env::var(ROLE_VAR).as_deref() == Ok("static") {
        return static_role();
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not, and must not sit
    // through minutes of load.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("gateway bench: nothing to do outside `cargo bench --bench gateway`");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Before any thread or child exists, so that they inherit it.
    if let Some(pinning) = &settings.pinning {
        let pinned = procs::set_pinning(pinning.clone()).and_then(|()| pinning.pin_self());
        if let Err(e) = pinned {
            eprintln!("gateway bench: RPCGATE_BENCH_CPUS: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let nofile = match procs::raise_nofile_limit() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("gateway bench: cannot raise RLIMIT_NOFILE: {e}");
            None
        }
    };
    // Two workers, one per core of the machine this was written for. The generator is
    // the same for every target, so the cores it takes weigh on all of them alike.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    secs: Duration,
    levels: Vec<usize>,
    peer_url: Option<String>,
    peer_pid: Option<u32>,
    scenarios: bool,
    capacity: bool,
    /// The in-flight capacity runs (with `capacity`): minutes of their own, which
    /// measuring idle memory alone does not need.
    in_flight: bool,
    /// Further tries of a run during which other work took a share of the CPU.
    busy_retries: usize,
    wrk: bool,
    /// The `--workers 2` rows.
    workers: bool,
    /// The 10k idle WebSocket clients and event streams.
    memory: bool,
    /// `RPCGATE_BENCH_CPUS`.
    pinning: Option<procs::Pinning>,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let secs = match var("RPCGATE_BENCH_SECS") {
            Some(v) => {
                let s: f64 = v
                    .trim()
                    .parse()
                    .with_context(|| format!("RPCGATE_BENCH_SECS={v}"))?;
                if !(s > 0.0 && s <= 3600.0) {
                    bail!("RPCGATE_BENCH_SECS={v}: want seconds in (0, 3600]");
                }
                Duration::from_secs_f64(s)
            }
            None => Duration::from_secs(5),
        };
        let levels = match var("RPCGATE_BENCH_LEVELS") {
            Some(v) => v
                .split(',')
                .map(|l| match l.trim().parse::<usize>() {
                    Ok(n) if (1..=20_000).contains(&n) => Ok(n),
                    _ => {
                        bail!("RPCGATE_BENCH_LEVELS={v}: {l:?} is not a client count in 1..=20000")
                    }
                })
                .collect::<Result<Vec<_>>>()?,
            None => vec![1, 32, 256, 2000],
        };
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| v.trim().parse().with_context(|| format!("{name}={v}")))
                .transpose()
        };
        let peer_pid = number("RPCGATE_BENCH_PEER_PID")?
            .map(u32::try_from)
            .transpose()
            .context("RPCGATE_BENCH_PEER_PID")?;
        let off = |name: &str| var(name).is_some_and(|v| v.trim() == "0");
        Ok(Settings {
            secs,
            levels,
            peer_url: var("RPCGATE_BENCH_PEER_URL"),
            peer_pid,
            scenarios: !off("RPCGATE_BENCH_SCENARIOS"),
            capacity: !off("RPCGATE_BENCH_CAPACITY"),
            in_flight: !off("RPCGATE_BENCH_IN_FLIGHT"),
            busy_retries: number("RPCGATE_BENCH_BUSY_RETRIES")?.unwrap_or(2),
            wrk: !off("RPCGATE_BENCH_WRK"),
            workers: !off("RPCGATE_BENCH_WORKERS"),
            memory: !off("RPCGATE_BENCH_MEMORY"),
            pinning: var("RPCGATE_BENCH_CPUS")
                .map(|v| {
                    procs::Pinning::parse(&v).with_context(|| format!("RPCGATE_BENCH_CPUS={v}"))
                })
                .transpose()?,
        })
    }
}

/// The release `rpcgate` that cargo built for this bench.
fn rpcgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rpcgate"))
}

fn echo_call() -> Call {
    Call::single("echo", r#"["hello"]"#, r#"["hello"]"#)
}

async fn run(settings: Settings, nofile: Option<u64>) -> Result<()> {
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut notes = Vec::new();
    let mut settings = settings;
    // Unknown counts as enough: the rows then say what failed.
    if nofile.is_some_and(|n| n < NOFILE_NEEDED) && (settings.capacity || settings.memory) {
        let why = format!(
            "RLIMIT_NOFILE is {} (hard limit; `ulimit -Hn`); the 10k-connection rows need about {NOFILE_NEEDED} descriptors \
             in the bench and in the gateway each, so they were skipped: raise it (e.g. `ulimit -n 21000`, \
             or LimitNOFILE= / limits.conf) and run again",
            nofile.unwrap_or_default()
        );
        eprintln!("bench: {why}");
        notes.push(why);
        settings.capacity = false;
        settings.memory = false;
    } else if let Some(n) = nofile.filter(|&n| n < GATEWAY_NOFILE_QUIET) {
        notes.push(format!(
            "RLIMIT_NOFILE is {n}: enough for the 10k-connection rows (about {NOFILE_NEEDED} each in the bench and the gateway), \
             but below what the gateway's default http.max_connections (20,000) plus its upstream sockets could use, \
             so each gateway warns at startup; {GATEWAY_NOFILE_QUIET} or more silences it"
        ));
    }

    // Checked before anything starts: a load generator aimed off this machine would
    // be a flood at someone else's server.
    let peer = match &settings.peer_url {
        Some(url) => {
            let target = http_target(url).await?;
            if !target.addr().ip().is_loopback() {
                bail!("RPCGATE_BENCH_PEER_URL={url}: load goes to loopback addresses only");
            }
            wait_ready(&target, &echo_call()).await?;
            Some(target)
        }
        None => None,
    };

    let echo = Proc::spawn(
        "echo-server",
        rpcgate_bin(),
        [
            "echo-server",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "bench-echo",
        ],
        &[],
        "echo-server listening on ",
    )
    .await?;
    let ws = WsTarget::new(echo.url());
    wait_ready(&ws, &echo_call()).await?;
    let wrk = if settings.wrk {
        match wrk::Wrk::find().await {
            Ok(wrk) => Some(wrk),
            Err(why) => {
                eprintln!("bench: {why}: skipping the wrk rows");
                notes.push(format!("wrk rows skipped: {why}"));
                None
            }
        }
    } else {
        None
    };
    let access_off = write_config(
        &out_dir,
        "gateway-access-log-off.toml",
        &format!(
            "[log]\naccess_log = false\n\n[[upstreams]]\nurl = \"{}\"\n",
            echo.url()
        ),
    )?;
    let bench = Bench {
        retry_until: Instant::now() + RETRY_BUDGET,
        settings,
        echo,
        out_dir,
    };

    let echo_work = Workload::only(echo_call());
    let echo_pid = Some(bench.echo.pid());
    let mut rows = Vec::new();
    // The alternating comparisons' runs after their first pair.
    let mut repeats = Vec::new();
    for &level in &bench.settings.levels {
        let row = |target: &str, generator, m| LevelRow {
            level,
            target: target.into(),
            generator,
            m,
        };
        let defaults = async || {
            let (gateway, target) = bench.gateway(None).await?;
            let m = bench
                .measure(&target, level, &echo_work, Some(gateway.pid()), echo_pid)
                .await;
            Ok(with_access_lines(m, gateway.stop().await))
        };
        let logging_off = async || {
            let (gateway, target) = bench.gateway(Some(&access_off)).await?;
            let m = bench
                .measure(&target, level, &echo_work, Some(gateway.pid()), echo_pid)
                .await;
            Ok(with_access_lines(m, gateway.stop().await))
        };
        let what = format!("{level} clients, rpcgate");
        rows.push(row(
            "rpcgate",
            BUILT_IN,
            bench.quietest(&what, defaults).await?,
        ));
        // Off right after on, in turns, so that the difference is not the machine's.
        if ACCESS_LEVELS.contains(&level) {
            let what_off = format!("{level} clients, {ACCESS_OFF}");
            rows.push(row(
                ACCESS_OFF,
                BUILT_IN,
                bench.quietest(&what_off, logging_off).await?,
            ));
            for round in 2..=ACCESS_ROUNDS {
                let m = bench
                    .quietest(&format!("{what}, round {round}"), defaults)
                    .await?;
                repeats.push(row("rpcgate", BUILT_IN, m));
                let m = bench
                    .quietest(&format!("{what_off}, round {round}"), logging_off)
                    .await?;
                repeats.push(row(ACCESS_OFF, BUILT_IN, m));
            }
        }
        let m = bench
            .quietest(&format!("{level} clients, static"), async || {
                let (server, target) = bench.static_server().await?;
                let m = bench
                    .measure(&target, level, &echo_work, Some(server.pid()), None)
                    .await;
                server.stop().await;
                Ok(m)
            })
            .await?;
        rows.push(row("static", BUILT_IN, m));
        let m = bench
            .quietest(&format!("{level} clients, ws-direct"), async || {
                Ok(bench.measure(&ws, level, &echo_work, None, echo_pid).await)
            })
            .await?;
        rows.push(row("ws-direct", BUILT_IN, m));
        if let Some(peer) = &peer {
            let pid = bench.settings.peer_pid;
            let m = bench
                .quietest(&format!("{level} clients, peer"), async || {
                    Ok(bench.measure(peer, level, &echo_work, pid, None).await)
                })
                .await?;
            rows.push(row("peer", BUILT_IN, m));
        }
        if let Some(wrk) = &wrk {
            // A wrk failure costs its row, with a note, not the whole run.
            let gateway_wrk = |extra: &'static [&'static str]| {
                let bench = &bench;
                async move || {
                    let (gateway, _) = bench.gateway_with(None, extra).await?;
                    let m = bench
                        .measure_wrk(wrk, gateway.url(), level, gateway.pid(), echo_pid)
                        .await;
                    let lines = gateway.stop().await;
                    Ok(with_access_lines(m?, lines))
                }
            };
            let what = format!("{level} clients, rpcgate ({WRK})");
            match bench.quietest(&what, gateway_wrk(&[])).await {
                Ok(m) => rows.push(row("rpcgate", WRK, m)),
                Err(e) => {
                    eprintln!("bench: {what}: {e:#}");
                    notes.push(format!("{what}: {e:#}"));
                }
            }
            // workers = 2 right after the defaults (workers = 1), in turns, so that
            // their ratio is not the machine's.
            if bench.settings.workers && WORKERS_LEVELS.contains(&level) {
                let what_2 = format!("{level} clients, {WORKERS_2} ({WRK})");
                for round in 1..=WORKERS_ROUNDS {
                    if round > 1 {
                        let what = format!("{what}, round {round}");
                        match bench.quietest(&what, gateway_wrk(&[])).await {
                            Ok(m) => repeats.push(row("rpcgate", WRK, m)),
                            Err(e) => {
                                eprintln!("bench: {what}: {e:#}");
                                notes.push(format!("{what}: {e:#}"));
                            }
                        }
                    }
                    let what = format!("{what_2}, round {round}");
                    match bench
                        .quietest(&what, gateway_wrk(&["--workers", "2"]))
                        .await
                    {
                        Ok(m) if round == 1 => rows.push(row(WORKERS_2, WRK, m)),
                        Ok(m) => repeats.push(row(WORKERS_2, WRK, m)),
                        Err(e) => {
                            eprintln!("bench: {what}: {e:#}");
                            notes.push(format!("{what}: {e:#}"));
                        }
                    }
                }
            }
            let what = format!("{level} clients, static ({WRK})");
            let m = bench
                .quietest(&what, async || {
                    let (server, _) = bench.static_server().await?;
                    let m = bench
                        .measure_wrk(wrk, server.url(), level, server.pid(), None)
                        .await;
                    server.stop().await;
                    m
                })
                .await;
            match m {
                Ok(m) => rows.push(row("static", WRK, m)),
                Err(e) => {
                    eprintln!("bench: {what}: {e:#}");
                    notes.push(format!("{what}: {e:#}"));
                }
            }
        }
    }

    let scenarios = if bench.settings.scenarios {
        Some(bench.scenarios().await?)
    } else {
        None
    };
    let mut idle = Vec::new();
    let in_flight = if bench.settings.capacity {
        idle.push(bench.idle_capacity().await?);
        match bench.settings.in_flight {
            true => Some(bench.in_flight_capacity().await?),
            false => None,
        }
    } else {
        None
    };
    if bench.settings.memory {
        idle.push(bench.idle_websockets().await?);
        idle.push(bench.idle_event_streams().await?);
    }

    let measured = || {
        rows.iter()
            .map(|r| {
                let by = if r.generator == BUILT_IN {
                    String::new()
                } else {
                    format!(" ({})", r.generator)
                };
                (format!("{} clients, {}{by}", r.level, r.target), &r.m)
            })
            .chain(repeats.iter().map(|r| {
                let by = if r.generator == BUILT_IN {
                    String::new()
                } else {
                    format!(" ({})", r.generator)
                };
                (
                    format!("{} clients, {}{by}, repeat", r.level, r.target),
                    &r.m,
                )
            }))
            .chain(scenarios.iter().flatten().map(|s| (s.name.clone(), &s.m)))
            .chain(
                in_flight
                    .iter()
                    .flatten()
                    .map(|m| (format!("{} calls in flight", m.clients), m)),
            )
    };
    if measured().any(|(_, m)| m.server.is_some_and(|u| u.rss_sampled)) {
        notes.push(
            "* peak RSS is the highest VmRSS sampled every 100 ms: /proc/PID/clear_refs could not reset VmHWM".into(),
        );
    }
    let busy: Vec<String> = measured()
        .filter(|(_, m)| m.is_busy())
        .map(|(what, _)| what)
        .collect();
    if !busy.is_empty() {
        notes.push(format!(
            "⚠ other work on the machine took more than {BUSY_CORES} cores during {} (still so after {} retries): \
             their numbers understate what rpcgate and the ceilings can do",
            busy.join("; "),
            bench.settings.busy_retries
        ));
    }
    for (what, m) in measured() {
        if let Some(e) = &m.first_error {
            notes.push(format!("{what}: {} errors, first: {e}", m.errors));
        }
    }
    for i in &idle {
        if let Some(e) = &i.first_error {
            notes.push(format!("{}: {} errors, first: {e}", i.what, i.errors));
        }
    }
    if in_flight.is_some() {
        notes.push(format!(
            "calls in flight: the echo backend sleeps at most 1,024 calls per upstream connection; with {IN_FLIGHT_CONNECTIONS} connections \
             calls/s tops out near {} ÷ 0.2 s and the calls beyond wait in the backend's queue, still in flight in the gateway",
            IN_FLIGHT_CONNECTIONS * 1024
        ));
    }
    notes.push(
        "ws-direct gives the backend one WebSocket per client, while rpcgate multiplexes all clients over 4; \
         at high concurrency the backend's per-connection cost makes ws-direct slower than rpcgate, \
         so it is the upstream ceiling only at low concurrency"
            .into(),
    );
    bench.echo.stop().await;

    let report = Report {
        levels: bench.settings.levels.clone(),
        secs: bench.settings.secs.as_secs_f64(),
        warmup_secs: WARMUP.as_secs_f64(),
        git: git_describe(),
        timestamp: utc_timestamp(SystemTime::now()),
        nofile,
        pinning: bench
            .settings
            .pinning
            .as_ref()
            .map(procs::Pinning::describe),
        gateway_own_cpus: bench
            .settings
            .pinning
            .as_ref()
            .map_or(0, procs::Pinning::gateway_own_cpus),
        rows,
        repeats,
        scenarios,
        idle,
        in_flight,
        notes,
    };
    let markdown = report.markdown();
    println!("{markdown}");
    let json = serde_json::to_string_pretty(&report.json()).context("encoding the JSON report")?;
    let json_path = bench.out_dir.join("gateway.json");
    let md_path = bench.out_dir.join("gateway.md");
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, markdown).with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!(
        "bench: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

/// What every run needs and outlives it.
struct Bench {
    settings: Settings,
    /// The one backend behind every gateway, and the ws-direct target.
    echo: Proc,
    /// Where the report and the gateways' config files go.
    out_dir: PathBuf,
    /// Busy runs are retried only until then, so a machine that never goes quiet
    /// costs bounded time.
    retry_until: Instant,
}

impl Bench {
    /// A fresh gateway in front of the echo backend, already answering. Each run gets
    /// its own, so that memory a run leaves behind is not counted in the next.
    async fn gateway(&self, config: Option<&Path>) -> Result<(Proc, HttpTarget)> {
        self.gateway_with(config, &[]).await
    }

    /// The same, with `extra` flags (e.g. `--workers 2`).
    async fn gateway_with(
        &self,
        config: Option<&Path>,
        extra: &[&str],
    ) -> Result<(Proc, HttpTarget)> {
        let gateway = start_gateway(self.echo.url(), config, extra).await?;
        let target = http_target(gateway.url()).await?;
        wait_ready(&target, &echo_call()).await?;
        Ok((gateway, target))
    }

    async fn static_server(&self) -> Result<(Proc, HttpTarget)> {
        let server = Proc::spawn(
            "static",
            &std::env::current_exe().context("locating the bench binary")?,
            std::iter::empty::<&str>(),
            &[(ROLE_VAR, "static")],
            "static listening on ",
        )
        .await?;
        let target = http_target(server.url()).await?;
        wait_ready(&target, &echo_call()).await?;
        Ok((server, target))
    }

    /// One closed-loop run: connect `clients`, warm up, measure, close. `server` and
    /// `backend` are the pids whose CPU and memory are charged to this run.
    async fn measure<T: Target>(
        &self,
        target: &T,
        clients: usize,
        workload: &Arc<Workload>,
        server: Option<u32>,
        backend: Option<u32>,
    ) -> Measured {
        let connected = load::connect_all(target, clients).await;
        let window = Window::after_warmup(WARMUP, self.settings.secs);
        let pids: Vec<u32> = [server, backend].into_iter().flatten().collect();
        let monitor = Monitor::start(pids, window.start.into_std(), window.end.into_std());
        let outcome = load::drive(target, connected, workload.clone(), window).await;
        let watched = monitor.finish().await;
        let mut usage = watched.usage.into_iter();
        let server_usage = server.and_then(|_| usage.next().flatten());
        let backend_usage = backend.and_then(|_| usage.next().flatten());
        tokio::time::sleep(SETTLE).await;
        Measured::new(
            &outcome,
            workload.other.is_some(),
            server_usage,
            backend_usage,
            watched.foreign_cpu_us,
        )
    }

    /// One wrk run against `url`, after a warmup run of its own; `server` and
    /// `backend` are the pids whose CPU and memory are charged to it.
    async fn measure_wrk(
        &self,
        wrk: &wrk::Wrk,
        url: &str,
        clients: usize,
        server: u32,
        backend: Option<u32>,
    ) -> Result<Measured> {
        let warmup = wrk.start(url, clients, WARMUP)?;
        warmup.finish(WARMUP + WRK_GRACE).await?;
        let length = wrk::Wrk::run_length(self.settings.secs);
        let run = wrk.start(url, clients, length)?;
        let start = std::time::Instant::now() + wrk::LEAD;
        let pids: Vec<u32> = [Some(server), backend].into_iter().flatten().collect();
        let monitor = Monitor::start(pids, start, start + self.settings.secs);
        let output = run.finish(length + WRK_GRACE).await;
        let watched = monitor.finish().await;
        let run = wrk::parse(&output?)?;
        let mut usage = watched.usage.into_iter();
        let server_usage = usage.next().flatten();
        let backend_usage = backend.and_then(|_| usage.next().flatten());
        tokio::time::sleep(SETTLE).await;
        Ok(Measured::external(
            clients,
            &run,
            self.settings.secs.as_secs_f64(),
            server_usage,
            backend_usage,
            watched.foreign_cpu_us,
        ))
    }

    /// Runs `attempt`, and again (at most `busy_retries` times, after waiting for the
    /// machine to go quiet) while other work took a share of the CPU during it;
    /// returns the quietest attempt.
    async fn quietest(
        &self,
        what: &str,
        mut attempt: impl AsyncFnMut() -> Result<Measured>,
    ) -> Result<Measured> {
        let mut best = attempt().await?;
        eprintln!("bench: {}", summary_line(what, &best));
        for _ in 0..self.settings.busy_retries {
            if !best.is_busy() {
                break;
            }
            if Instant::now() >= self.retry_until {
                eprintln!("bench: {what}: machine busy, but the retry budget is spent");
                break;
            }
            eprintln!("bench: {what}: other work was running; waiting for quiet, then again");
            wait_for_quiet().await;
            let m = attempt().await?;
            eprintln!("bench: {}", summary_line(what, &m));
            if m.foreign_cores.unwrap_or(0.0) < best.foreign_cores.unwrap_or(0.0) {
                best = m;
            }
        }
        Ok(best)
    }

    async fn scenarios(&self) -> Result<Vec<ScenarioRow>> {
        let string_of = |len: usize| format!(r#"["{}"]"#, "x".repeat(len));
        let echo_of = |params: &str| Call::single("echo", params, params);
        let hello = r#"["hello"]"#;
        // 1 MB params exceed the default body limit.
        let large_body = write_config(
            &self.out_dir,
            "gateway-large-body.toml",
            &format!(
                "[http]\nmax_body_bytes = 4_194_304\n\n[[upstreams]]\nurl = \"{}\"\n",
                self.echo.url()
            ),
        )?;
        // Two more backends, for the multi-upstream and sticky-session scenarios.
        let mut extra = Vec::new();
        for name in ["bench-echo-2", "bench-echo-3"] {
            extra.push(
                Proc::spawn(
                    "echo-server",
                    rpcgate_bin(),
                    ["echo-server", "--listen", "127.0.0.1:0", "--name", name],
                    &[],
                    "echo-server listening on ",
                )
                .await?,
            );
        }
        let three: String = [self.echo.url(), extra[0].url(), extra[1].url()]
            .iter()
            .map(|url| format!("[[upstreams]]\nurl = \"{url}\"\n\n"))
            .collect();
        let three_upstreams = write_config(&self.out_dir, "gateway-three.toml", &three)?;
        let sticky_upstream = write_config(
            &self.out_dir,
            "gateway-sticky-upstream.toml",
            &format!("[sessions]\naffinity = \"upstream\"\n\n{three}"),
        )?;
        let sticky_connection = write_config(
            &self.out_dir,
            "gateway-sticky-connection.toml",
            // Every bench client comes from 127.0.0.1: the per-client session limits
            // (64 open, 120 new a minute) would refuse all but the first 64. A real
            // deployment sees many addresses, or sets these for its proxy.
            &format!(
                "[sessions]\naffinity = \"connection\"\nmax_per_client = 2000\nnew_per_client_per_minute = 100000\n\n{three}"
            ),
        )?;
        // (name, clients, workload, gateway config, each client its own session)
        type Scenario<'a> = (&'a str, usize, Arc<Workload>, Option<&'a Path>, bool);
        let scenarios: Vec<Scenario<'_>> = vec![
            (
                "params 10 KB",
                32,
                Workload::only(echo_of(&string_of(10 * 1024))),
                None,
                false,
            ),
            (
                "800 slow calls of 1 MB at once (sleep [200, 1 MB]), memory budget on",
                800,
                Workload::only(Call::single(
                    "sleep",
                    &format!(r#"[200,"{}"]"#, "x".repeat(1000 * 1000)),
                    "200",
                )),
                Some(&large_body),
                false,
            ),
            (
                "params 1 MB",
                4,
                Workload::only(echo_of(&string_of(1024 * 1024))),
                Some(&large_body),
                false,
            ),
            (
                "batch of 10",
                32,
                Workload::only(Call::batch(10, "echo", hello, hello)),
                None,
                false,
            ),
            (
                "batch of 100",
                32,
                Workload::only(Call::batch(100, "echo", hello, hello)),
                None,
                false,
            ),
            (
                "10% sleep [50], 90% echo",
                32,
                Arc::new(Workload {
                    main: echo_of(hello),
                    other: Some((Call::single("sleep", "[50]", "50"), 0.1)),
                }),
                None,
                false,
            ),
            (
                "3 upstreams",
                256,
                Workload::only(echo_of(hello)),
                Some(&three_upstreams),
                false,
            ),
            (
                "1,000 sticky sessions, affinity upstream, 3 upstreams",
                1000,
                Workload::only(echo_of(hello)),
                Some(&sticky_upstream),
                true,
            ),
            (
                "1,000 sticky sessions, affinity connection (own socket each)",
                1000,
                Workload::only(echo_of(hello)),
                Some(&sticky_connection),
                true,
            ),
        ];
        let mut rows = Vec::new();
        for (name, clients, work, config, sessions) in scenarios {
            let m = self
                .quietest(name, async || {
                    let (gateway, target) = self.gateway(config).await?;
                    let target = if sessions {
                        target.with_sessions()
                    } else {
                        target
                    };
                    let pids = (Some(gateway.pid()), Some(self.echo.pid()));
                    let m = self.measure(&target, clients, &work, pids.0, pids.1).await;
                    gateway.stop().await;
                    Ok(m)
                })
                .await?;
            rows.push(ScenarioRow {
                name: name.into(),
                m,
            });
        }
        for proc in extra {
            proc.stop().await;
        }
        Ok(rows)
    }

    /// 10,000 keep-alive clients that made one call each and then sit idle: what they
    /// cost the gateway in memory.
    async fn idle_capacity(&self) -> Result<Idle> {
        let (gateway, target) = self.gateway(None).await?;
        let pid = gateway.pid();
        let rss_before_kib = procs::status_kib(pid, "VmRSS").ok();
        let started = Instant::now();
        let deadline = started + IDLE_CONNECT_BUDGET;
        let held = load::open_idle(&target, IDLE_CLIENTS, &echo_call(), deadline).await;
        // Let the gateway finish whatever the burst left behind, so what is read is
        // the idle state.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_kib = procs::status_kib(pid, "VmRSS").ok();
        let hwm_kib = procs::status_kib(pid, "VmHWM").ok();
        let fds = procs::open_fds(pid).ok();
        let still_open = held.conns.iter().filter(|c| c.is_open()).count();
        let secs = started.elapsed().as_secs_f64();
        let idle = Idle {
            what: IDLE_KEEP_ALIVE,
            how: "HTTP/1.1 keep-alive, one echo call",
            wanted: IDLE_CLIENTS,
            answered: held.conns.len(),
            held: still_open,
            errors: held.errors,
            first_error: held.first_error,
            rss_before_kib,
            rss_kib,
            hwm_kib,
            fds,
            secs,
        };
        eprintln!(
            "bench: idle clients: {} held, gateway VmRSS {} KiB, {} errors",
            idle.held,
            idle.rss_kib.unwrap_or_default(),
            idle.errors
        );
        drop(held.conns);
        gateway.stop().await;
        tokio::time::sleep(SETTLE).await;
        Ok(idle)
    }

    /// 10,000 WebSocket clients of the gateway's JSON-RPC path that made one call each
    /// and then sit idle (answering pings): what they cost the gateway in memory.
    async fn idle_websockets(&self) -> Result<Idle> {
        let (gateway, _) = self.gateway(None).await?;
        let url = match gateway.url().strip_prefix("http://") {
            Some(rest) => format!("ws://{rest}"),
            None => bail!("gateway URL {} is not http://", gateway.url()),
        };
        let target = WsTarget::new(&url).with_read_buffer(WS_READ_BUFFER);
        let call = echo_call();
        let idle = self
            .held_idle(
                IDLE_WEBSOCKETS,
                "WebSocket to the JSON-RPC path, one echo call, pings answered",
                &gateway,
                |_| load::ws_after_call(&target, &call),
                load::ws_keep,
            )
            .await;
        gateway.stop().await;
        tokio::time::sleep(SETTLE).await;
        Ok(idle)
    }

    /// 10,000 event streams (`GET /events?session=K`, a session each), nothing
    /// subscribed: what they cost the gateway in memory.
    async fn idle_event_streams(&self) -> Result<Idle> {
        let (gateway, target) = self.gateway(None).await?;
        let addr = target.addr();
        let idle = self
            .held_idle(
                IDLE_STREAMS,
                "`GET /events?session=K`, a session each, none subscribed",
                &gateway,
                |i| async move {
                    load::open_event_stream(addr, "/events", &format!("bench-idle-{i}")).await
                },
                load::stream_keep,
            )
            .await;
        gateway.stop().await;
        tokio::time::sleep(SETTLE).await;
        Ok(idle)
    }

    /// Opens `IDLE_CLIENTS` connections to `gateway` with `open`, each kept by `keep`,
    /// and reads the gateway's memory with them all open.
    async fn held_idle<C, O, K>(
        &self,
        what: &'static str,
        how: &'static str,
        gateway: &Proc,
        open: impl Fn(usize) -> O,
        keep: impl Fn(C) -> K,
    ) -> Idle
    where
        O: Future<Output = Result<C, String>>,
        K: Future<Output = ()> + Send + 'static,
    {
        let pid = gateway.pid();
        let rss_before_kib = procs::status_kib(pid, "VmRSS").ok();
        let started = Instant::now();
        let deadline = started + KEPT_CONNECT_BUDGET;
        let kept = load::open_kept(IDLE_CLIENTS, deadline, open, keep).await;
        // Let the gateway finish whatever the burst left behind, so what is read is
        // the idle state.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_kib = procs::status_kib(pid, "VmRSS").ok();
        let hwm_kib = procs::status_kib(pid, "VmHWM").ok();
        let fds = procs::open_fds(pid).ok();
        let idle = Idle {
            what,
            how,
            wanted: IDLE_CLIENTS,
            answered: kept.opened,
            held: kept.open_now(),
            errors: kept.errors,
            first_error: kept.first_error.clone(),
            rss_before_kib,
            rss_kib,
            hwm_kib,
            fds,
            secs: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "bench: {what}: {} held, gateway VmRSS {} KiB (peak {} KiB), {} errors; fds: gateway {}, bench {}",
            idle.held,
            idle.rss_kib.unwrap_or_default(),
            idle.hwm_kib.unwrap_or_default(),
            idle.errors,
            idle.fds.unwrap_or_default(),
            procs::open_fds(std::process::id()).unwrap_or_default(),
        );
        kept.close().await;
        idle
    }

    /// The same slow call at 500 and at 10,000 clients: per-call CPU must not grow with
    /// the number of calls the gateway holds.
    async fn in_flight_capacity(&self) -> Result<Vec<Measured>> {
        // queue_timeout covers the first burst, when all 10,000 arrive at once.
        let config = write_config(
            &self.out_dir,
            "gateway-in-flight.toml",
            &format!(
                "[http]\nmax_connections = 20_000\n\n[calls]\nqueue_timeout = \"5s\"\n\n\
                 [[upstreams]]\nurl = \"{}\"\nconnections = {IN_FLIGHT_CONNECTIONS}\n\
                 max_in_flight = {IN_FLIGHT_PER_CONNECTION}\n",
                self.echo.url()
            ),
        )?;
        let work = Workload::only(Call::single("sleep", "[200]", "200"));
        let mut runs = Vec::new();
        for clients in IN_FLIGHT_CLIENTS {
            let what = format!("{clients} clients looping sleep [200]");
            let m = self
                .quietest(&what, async || {
                    let (gateway, target) = self.gateway(Some(&config)).await?;
                    let pids = (Some(gateway.pid()), Some(self.echo.pid()));
                    let m = self.measure(&target, clients, &work, pids.0, pids.1).await;
                    gateway.stop().await;
                    Ok(m)
                })
                .await?;
            runs.push(m);
        }
        Ok(runs)
    }
}

/// Waits, for at most `QUIET_WAIT`, until a second passes in which other work takes
/// less than `BUSY_CORES` of CPU.
async fn wait_for_quiet() {
    let deadline = Instant::now() + QUIET_WAIT;
    while Instant::now() < deadline {
        let meter = CpuMeter::start(&[]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if meter.foreign_us().is_none_or(|us| us / 1e6 < BUSY_CORES) {
            return;
        }
    }
}

/// Starts a gateway in front of `upstream`, from a config file when the defaults will
/// not do.
async fn start_gateway(upstream: &str, config: Option<&Path>, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--admin-listen".to_owned(),
        "off".to_owned(),
    ];
    match config {
        // The file names the upstream: `--upstream` would replace its per-upstream
        // settings with the defaults.
        Some(file) => args.extend(["--config".to_owned(), file.display().to_string()]),
        None => args.extend(["--upstream".to_owned(), upstream.to_owned()]),
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Proc::spawn(
        "rpcgate",
        rpcgate_bin(),
        &args,
        &[],
        "rpcgate listening on ",
    )
    .await
}

async fn http_target(url: &str) -> Result<HttpTarget> {
    HttpTarget::new(url).await.map_err(anyhow::Error::msg)
}

/// Calls until one call succeeds, so no run's warmup is spent waiting for upstream
/// connections to open.
async fn wait_ready<T: Target>(target: &T, call: &Call) -> Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let mut conn = target.connect().await?;
            let reply = target.call(&mut conn, &call.body).await?;
            if call.check(&reply) {
                Ok(())
            } else {
                Err(format!(
                    "unexpected reply {}",
                    String::from_utf8_lossy(&reply)
                ))
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no correct reply within {READY_WAIT:?}: {last}")
}

/// `m`, with the count of access lines the gateway wrote.
fn with_access_lines(mut m: Measured, stderr: Option<procs::StderrScan>) -> Measured {
    m.access_lines = stderr.map(|s| s.access);
    m
}

fn summary_line(what: &str, m: &Measured) -> String {
    let (p50, p99) = m.latency.map_or((f64::NAN, f64::NAN), |l| (l.p50, l.p99));
    let lines = m
        .access_lines
        .map_or(String::new(), |n| format!(", {n} access lines"));
    format!(
        "{what}: {:.0} req/s, {:.0} calls/s, p50 {p50:.0} µs, p99 {p99:.0} µs, {} errors, other work {:.2} cores{lines}",
        m.req_per_sec(),
        m.calls_per_sec(),
        m.errors,
        m.foreign_cores.unwrap_or(f64::NAN),
    )
}

fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `CARGO_TARGET_DIR` if set (relative to the package, as cargo reads it when run from
/// there), else the package's `target/`.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => manifest.join(dir),
        _ => manifest.join("target"),
    }
}

/// `git describe --always --tags` of the package, if git can tell. Read-only: no
/// `--dirty`, which refreshes the index.
fn git_describe() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--tags"])
        .env("GIT_OPTIONAL_LOCKS", "0")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// RFC 3339 in UTC, e.g. 2026-11-25T06:59:06Z.
fn utc_timestamp(now: SystemTime) -> String {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The static responder: the fastest HTTP JSON-RPC answer this machine can give, to
/// measure rpcgate's HTTP side against. Runs until stdin closes.
fn static_role() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("static: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve_static());
    // Connection tasks may still be parked on sockets; do not wait for them, nor for
    // the blocking thread that read stdin.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("static: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_static() -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use std::io::Read as _;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    println!("static listening on http://{}/", listener.local_addr()?);
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // Same as rpcgate: small replies must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(static_reply);
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of descriptors, most likely; retrying at once would spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    // tokio's stdin needs a feature this crate does not enable; a plain thread does.
    let (closed_tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = std::io::stdin().read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    tokio::select! {
        _ = stdin_closed => {}
        _ = accept => {}
    }
    Ok(())
}

async fn static_reply(
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::Full<Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;
    // Read the body as a real server would; its content does not matter.
    let _ = request.into_body().collect().await;
    let mut response = http::Response::new(http_body_util::Full::new(Bytes::from_static(
        STATIC_REPLY.as_bytes(),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
