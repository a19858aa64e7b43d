//! Turning measurements into the markdown tables, the JSON file and the checklist of
//! the targets.

use crate::load::Outcome;
use crate::procs::Usage;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::fmt::Write as _;

/// Other work on the machine above this many cores during a window makes the window's
/// numbers suspect.
pub const BUSY_CORES: f64 = 0.2;
/// The load generators: this bench's own, and wrk.
pub const BUILT_IN: &str = "built-in";
pub const WRK: &str = "wrk";
/// The gateway with its access log off; "rpcgate" alone is the shipped defaults.
pub const ACCESS_OFF: &str = "rpcgate, log.access_log = false";
/// Clients of the access log on/off comparison.
pub const ACCESS_LEVELS: [usize; 2] = [32, 256];
/// On/off pairs run back to back at each of those levels: a difference of a few
/// percent is within what one pair of runs varies by.
pub const ACCESS_ROUNDS: usize = 2;
/// What the access log may cost per call, on over off, in gateway CPU µs.
const ACCESS_BUDGET_US: f64 = 1.5;
/// The gateway with two workers; "rpcgate" alone is the default, `runtime.workers = 1`.
pub const WORKERS_2: &str = "rpcgate, --workers 2";
/// Clients of the workers = 1 / workers = 2 comparison (wrk rows).
pub const WORKERS_LEVELS: [usize; 2] = [32, 256];
/// workers = 1 / workers = 2 pairs run back to back at each of those levels.
pub const WORKERS_ROUNDS: usize = 2;
/// The idle-connection memory rows.
pub const IDLE_KEEP_ALIVE: &str = "idle keep-alive HTTP clients";
pub const IDLE_WEBSOCKETS: &str = "idle WebSocket clients";
pub const IDLE_STREAMS: &str = "idle event streams";

/// Issue 13's thresholds.
const CPU_OVER_STATIC: f64 = 1.25;
const THROUGHPUT_OF_STATIC: f64 = 0.65;
const P50_OVERHEAD_US: f64 = 40.0;
const WORKERS_CPU_RATIO: f64 = 1.15;
const BUSY_CLIENTS: usize = 2000;
const BUSY_RSS_MB: f64 = 50.0;
/// (row, RSS limit in MB) of the idle rows.
const IDLE_RSS_MB: [(&str, f64); 3] = [
    (IDLE_KEEP_ALIVE, 100.0),
    (IDLE_STREAMS, 150.0),
    (IDLE_WEBSOCKETS, 150.0),
];

/// Latency percentiles, µs.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// `None` for an empty histogram: a run with no successful call has no latency.
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let q = |q| h.value_at_quantile(q) as f64;
        Some(Latency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64,
            mean: h.mean(),
        })
    }

    fn json(&self) -> Value {
        json!({
            "p50": self.p50, "p90": self.p90, "p99": self.p99, "p99_9": self.p999,
            "max": self.max, "mean": self.mean,
        })
    }
}

/// A process's share of one run.
#[derive(Clone, Copy, Debug)]
pub struct ProcUsage {
    pub cpu_us: f64,
    /// CPU µs per JSON-RPC call answered inside the window.
    pub cpu_us_per_call: f64,
    pub peak_rss_kib: Option<u64>,
    pub rss_sampled: bool,
}

impl ProcUsage {
    fn new(usage: Usage, calls: f64) -> ProcUsage {
        ProcUsage {
            cpu_us: usage.cpu_us,
            cpu_us_per_call: usage.cpu_us / calls,
            peak_rss_kib: usage.peak_rss_kib,
            rss_sampled: usage.rss_sampled,
        }
    }

    fn json(&self) -> Value {
        json!({
            "cpu_us": self.cpu_us,
            "cpu_us_per_call": finite(self.cpu_us_per_call),
            "peak_rss_kib": self.peak_rss_kib,
            "peak_rss_source": if self.rss_sampled { "VmRSS sampled every 100 ms" } else { "VmHWM" },
        })
    }
}

/// One closed-loop run, reduced to numbers.
#[derive(Clone, Debug)]
pub struct Measured {
    pub clients: usize,
    pub connected: usize,
    pub secs: f64,
    pub requests: u64,
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Every request.
    pub latency: Option<Latency>,
    /// With a mixed workload: the main (fast) calls and the mixed-in ones apart.
    pub split: Option<(Option<Latency>, Option<Latency>)>,
    /// The process in the HTTP server's seat (rpcgate or the static responder).
    pub server: Option<ProcUsage>,
    /// The echo backend.
    pub backend: Option<ProcUsage>,
    /// Cores' worth of CPU that other work on the machine took during the window.
    pub foreign_cores: Option<f64>,
    /// Access-log lines the gateway wrote to stderr while it ran (warmup and
    /// readiness calls included): a check that "on" logged and "off" did not.
    pub access_lines: Option<u64>,
}

impl Measured {
    pub fn new(
        outcome: &Outcome,
        mixed: bool,
        server: Option<Usage>,
        backend: Option<Usage>,
        foreign_cpu_us: Option<f64>,
    ) -> Measured {
        let secs = outcome.window.as_secs_f64();
        Measured {
            clients: outcome.clients,
            connected: outcome.connected,
            secs,
            requests: outcome.requests,
            calls: outcome.calls,
            errors: outcome.errors,
            first_error: outcome.first_error.clone(),
            latency: Latency::of(&outcome.all()),
            split: mixed.then(|| (Latency::of(&outcome.main), Latency::of(&outcome.other))),
            server: server.map(|u| ProcUsage::new(u, outcome.calls as f64)),
            backend: backend.map(|u| ProcUsage::new(u, outcome.calls as f64)),
            foreign_cores: foreign_cpu_us.map(|us| us / 1e6 / secs),
            access_lines: None,
        }
    }

    /// A run of an outside generator, which reports totals over its whole run of
    /// `secs`, while CPU was read over a `window` inside it: CPU per call divides by
    /// the calls its rate puts in the window.
    pub fn external(
        clients: usize,
        run: &crate::wrk::WrkRun,
        window: f64,
        server: Option<Usage>,
        backend: Option<Usage>,
        foreign_cpu_us: Option<f64>,
    ) -> Measured {
        let in_window = run.good as f64 / run.secs * window;
        Measured {
            clients,
            connected: clients,
            secs: run.secs,
            requests: run.good,
            calls: run.good,
            errors: run.errors,
            first_error: run.first_error.clone(),
            latency: run.latency,
            split: None,
            server: server.map(|u| ProcUsage::new(u, in_window)),
            backend: backend.map(|u| ProcUsage::new(u, in_window)),
            foreign_cores: foreign_cpu_us.map(|us| us / 1e6 / window),
            access_lines: None,
        }
    }

    /// Other work took enough CPU during the window to distort it.
    pub fn is_busy(&self) -> bool {
        self.foreign_cores.is_some_and(|c| c > BUSY_CORES)
    }

    pub fn req_per_sec(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    pub fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.secs
    }

    fn p(&self, pick: fn(&Latency) -> f64) -> Option<f64> {
        self.latency.as_ref().map(pick)
    }

    fn json(&self) -> Value {
        let split = self.split.map(|(main, other)| {
            json!({
                "main": main.map(|l| l.json()),
                "other": other.map(|l| l.json()),
            })
        });
        json!({
            "clients": self.clients,
            "connected": self.connected,
            "secs": self.secs,
            "requests": self.requests,
            "calls": self.calls,
            "req_per_sec": self.req_per_sec(),
            "calls_per_sec": self.calls_per_sec(),
            "errors": self.errors,
            "first_error": self.first_error,
            "latency_us": self.latency.map(|l| l.json()),
            "latency_us_by_kind": split,
            "server": self.server.map(|u| u.json()),
            "backend": self.backend.map(|u| u.json()),
            "foreign_cpu_cores": self.foreign_cores,
            "access_lines": self.access_lines,
        })
    }

    fn cpu_per_call(&self) -> Option<f64> {
        self.server
            .map(|u| u.cpu_us_per_call)
            .filter(|c| c.is_finite())
    }
}

/// A target at one concurrency level of the echo comparison.
pub struct LevelRow {
    pub level: usize,
    pub target: String,
    /// [`BUILT_IN`] or [`WRK`].
    pub generator: &'static str,
    pub m: Measured,
}

/// A workload beyond plain echo, against rpcgate.
pub struct ScenarioRow {
    pub name: String,
    pub m: Measured,
}

/// 10,000 idle connections of one kind: keep-alive HTTP clients, WebSocket clients
/// or event streams.
pub struct Idle {
    /// [`IDLE_KEEP_ALIVE`], [`IDLE_WEBSOCKETS`] or [`IDLE_STREAMS`].
    pub what: &'static str,
    /// How each connection was set up.
    pub how: &'static str,
    pub wanted: usize,
    /// Connections opened and ready (their one call answered, or their stream's head
    /// read).
    pub answered: usize,
    /// Of those, still open when RSS was read.
    pub held: usize,
    pub errors: u64,
    pub first_error: Option<String>,
    pub rss_before_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    pub fds: Option<usize>,
    /// From the first connect to the RSS reading.
    pub secs: f64,
}

impl Idle {
    fn json(&self) -> Value {
        json!({
            "what": self.what,
            "how": self.how,
            "wanted": self.wanted,
            "answered": self.answered,
            "held": self.held,
            "errors": self.errors,
            "first_error": self.first_error,
            "rss_before_kib": self.rss_before_kib,
            "rss_kib": self.rss_kib,
            "hwm_kib": self.hwm_kib,
            "open_fds": self.fds,
            "secs": self.secs,
        })
    }
}

/// Everything one `cargo bench --bench gateway` measured.
pub struct Report {
    pub levels: Vec<usize>,
    pub secs: f64,
    pub warmup_secs: f64,
    pub git: Option<String>,
    pub timestamp: String,
    pub nofile: Option<u64>,
    /// `RPCGATE_BENCH_CPUS`, as the roles got it; `None` when unpinned.
    pub pinning: Option<String>,
    /// CPUs the gateway had to itself (none shared with the generator or the
    /// backend): 0 when unpinned.
    pub gateway_own_cpus: usize,
    pub rows: Vec<LevelRow>,
    /// The runs of the alternating comparisons (access log on/off, workers 1/2) after
    /// their first pair, which is in `rows`.
    pub repeats: Vec<LevelRow>,
    pub scenarios: Option<Vec<ScenarioRow>>,
    /// The idle-connection rows that ran, in the order run.
    pub idle: Vec<Idle>,
    /// The in-flight runs, fewest clients first.
    pub in_flight: Option<Vec<Measured>>,
    pub notes: Vec<String>,
}

impl Report {
    /// A row of the built-in generator.
    fn row(&self, level: usize, target: &str) -> Option<&Measured> {
        self.row_of(level, target, BUILT_IN)
    }

    fn row_of(&self, level: usize, target: &str, generator: &str) -> Option<&Measured> {
        self.rows
            .iter()
            .find(|r| r.level == level && r.target == target && r.generator == generator)
            .map(|r| &r.m)
    }

    /// Every built-in run of `target` at `level`, repeats included.
    fn runs(&self, level: usize, target: &str) -> Vec<&Measured> {
        self.runs_of(level, target, BUILT_IN)
    }

    /// Every run of `target` at `level` by `generator`, repeats included.
    fn runs_of(&self, level: usize, target: &str, generator: &str) -> Vec<&Measured> {
        self.rows
            .iter()
            .chain(&self.repeats)
            .filter(|r| r.level == level && r.target == target && r.generator == generator)
            .map(|r| &r.m)
            .collect()
    }

    fn idle_row(&self, what: &str) -> Option<&Idle> {
        self.idle.iter().find(|i| i.what == what)
    }

    /// workers = 1 and workers = 2 under wrk at `level`, each the mean of its runs:
    /// CPU per call and req/s of each.
    fn workers_pair(&self, level: usize) -> Option<WorkersPair> {
        let one = self.runs_of(level, "rpcgate", WRK);
        let two = self.runs_of(level, WORKERS_2, WRK);
        if two.is_empty() {
            return None;
        }
        Some(WorkersPair {
            cpu: (
                mean(one.iter().map(|m| m.cpu_per_call())),
                mean(two.iter().map(|m| m.cpu_per_call())),
            ),
            rate: (
                mean(one.iter().map(|m| Some(m.req_per_sec()))),
                mean(two.iter().map(|m| Some(m.req_per_sec()))),
            ),
            runs: (one.len(), two.len()),
        })
    }

    /// Gateway CPU per call with the access log on (the defaults) and off, each the
    /// mean of its runs, and the difference, at `level` clients.
    fn access_cost(&self, level: usize) -> Option<(f64, f64, f64)> {
        let on = mean(self.runs(level, "rpcgate").iter().map(|m| m.cpu_per_call()))?;
        let off = mean(
            self.runs(level, ACCESS_OFF)
                .iter()
                .map(|m| m.cpu_per_call()),
        )?;
        Some((on, off, on - off))
    }

    fn ratios(&self, level: usize) -> Ratios {
        let gw = self.row(level, "rpcgate");
        let st = self.row(level, "static");
        let ws = self.row(level, "ws-direct");
        let both = |a: Option<f64>, b: Option<f64>| a.zip(b);
        let wrk = |target| self.row_of(level, target, WRK).map(|m| m.req_per_sec());
        Ratios {
            throughput: both(gw.map(|m| m.req_per_sec()), st.map(|m| m.req_per_sec()))
                .map(|(a, b)| a / b),
            wrk_throughput: both(wrk("rpcgate"), wrk("static")).map(|(a, b)| a / b),
            p99: both(
                gw.and_then(|m| m.p(|l| l.p99)),
                st.and_then(|m| m.p(|l| l.p99)),
            )
            .map(|(a, b)| a / b),
            p50_overhead_us: both(
                gw.and_then(|m| m.p(|l| l.p50)),
                ws.and_then(|m| m.p(|l| l.p50)),
            )
            .map(|(a, b)| a - b),
        }
    }

    fn in_flight_ratio(&self) -> Option<f64> {
        let runs = self.in_flight.as_ref()?;
        let cpu = |m: &Measured| m.server.map(|u| u.cpu_us_per_call);
        Some(cpu(runs.last()?)? / cpu(runs.first()?)?)
    }

    /// The targets, judged on this run's numbers.
    pub fn checklist(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for level in [32, 256] {
            let r = self.ratios(level).throughput;
            checks.push(Check::new(
                format!("throughput at {level} clients ≥ 60% of static"),
                r.map(|r| (r >= 0.6, format!("{:.0}%", r * 100.0))),
                self.basis(&[(level, "rpcgate"), (level, "static")]),
            ));
        }
        let overhead = self.ratios(1).p50_overhead_us;
        checks.push(Check::new(
            "p50 overhead at 1 client ≤ 40 µs over ws-direct".into(),
            overhead.map(|o| (o <= 40.0, format!("{o:.0} µs"))),
            self.basis(&[(1, "rpcgate"), (1, "ws-direct")]),
        ));
        let p99 = self.ratios(256).p99;
        checks.push(Check::new(
            "p99 at 256 clients ≤ 3× static p99".into(),
            p99.map(|r| (r <= 3.0, format!("{r:.2}×"))),
            self.basis(&[(256, "rpcgate"), (256, "static")]),
        ));
        for level in ACCESS_LEVELS {
            let cpu = self.row(level, "rpcgate").and_then(Measured::cpu_per_call);
            checks.push(Check::new(
                format!("gateway CPU per call ≤ 20 µs at {level} clients, shipped defaults"),
                cpu.map(|c| (c <= 20.0, format!("{c:.1} µs"))),
                self.basis(&[(level, "rpcgate")]),
            ));
        }
        for level in ACCESS_LEVELS {
            checks.push(Check::new(
                format!(
                    "access log costs ≤ {ACCESS_BUDGET_US} µs gateway CPU per call at {level} clients (on − off)"
                ),
                self.access_cost(level)
                    .map(|(_, _, d)| (d <= ACCESS_BUDGET_US, format!("{d:+.1} µs"))),
                basis(
                    self.runs(level, "rpcgate")
                        .into_iter()
                        .chain(self.runs(level, ACCESS_OFF)),
                ),
            ));
        }
        let rss = self
            .row(2000, "rpcgate")
            .and_then(|m| m.server)
            .and_then(|u| u.peak_rss_kib);
        // Memory does not depend on CPU contention, so a busy window does not matter.
        let (errors, _) = self.basis(&[(2000, "rpcgate")]);
        checks.push(Check::new(
            "gateway peak RSS at 2000 clients ≤ 50 MB".into(),
            rss.map(|k| (mb(k) <= 50.0, format!("{:.1} MB", mb(k)))),
            (errors, None),
        ));
        let idle = self.idle_row(IDLE_KEEP_ALIVE).and_then(|i| {
            let rss = i.rss_kib?;
            let all = i.held >= i.wanted;
            Some((
                all && mb(rss) <= 100.0,
                format!("{:.1} MB with {} of {} held", mb(rss), i.held, i.wanted),
            ))
        });
        checks.push(Check::new(
            "10k idle keep-alive clients: gateway RSS ≤ 100 MB".into(),
            idle,
            (self.idle_row(IDLE_KEEP_ALIVE).map_or(0, |i| i.errors), None),
        ));
        let runs = self.in_flight.as_deref().unwrap_or_default();
        checks.push(Check::new(
            "10k calls in flight: CPU per call ≤ 1.5× that at 500".into(),
            self.in_flight_ratio()
                .map(|r| (r <= 1.5, format!("{r:.2}×"))),
            basis(runs.iter()),
        ));
        checks
    }

    /// Issue 13's targets, each with the figures it is judged on, all from this run.
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let us = |x: f64| format!("{x:.1} µs");
        let runs_note = |n: usize| {
            if n > 1 {
                format!(" (mean of {n} runs)")
            } else {
                String::new()
            }
        };
        for level in WORKERS_LEVELS {
            let gw = self.runs_of(level, "rpcgate", WRK);
            let st = self.row_of(level, "static", WRK);
            let gw_cpu = mean(gw.iter().map(|m| m.cpu_per_call()));
            let st_cpu = st.and_then(Measured::cpu_per_call);
            let judged = gw_cpu.zip(st_cpu).map(|(g, s)| {
                (
                    g / s <= CPU_OVER_STATIC,
                    format!("rpcgate {}{}, static {}", us(g), runs_note(gw.len()), us(s)),
                    format!("{:.2}×", g / s),
                )
            });
            goals.push(Goal::new(
                1,
                format!(
                    "gateway CPU per call ≤ {CPU_OVER_STATIC}× static's at {level} clients ({WRK}; defaults, access log on)"
                ),
                judged,
                basis(gw.iter().copied().chain(st)),
            ));
        }
        for level in WORKERS_LEVELS {
            let gw = self.runs_of(level, "rpcgate", WRK);
            let st = self.row_of(level, "static", WRK);
            let gw_rate = mean(gw.iter().map(|m| Some(m.req_per_sec())));
            let judged = gw_rate.zip(st.map(|m| m.req_per_sec())).map(|(g, s)| {
                (
                    g / s >= THROUGHPUT_OF_STATIC,
                    format!(
                        "rpcgate {} req/s{}, static {} req/s",
                        rate(g),
                        runs_note(gw.len()),
                        rate(s)
                    ),
                    format!("{:.0}%", g / s * 100.0),
                )
            });
            goals.push(Goal::new(
                2,
                format!(
                    "throughput ≥ {:.0}% of static's at {level} clients ({WRK})",
                    THROUGHPUT_OF_STATIC * 100.0
                ),
                judged,
                basis(gw.iter().copied().chain(st)),
            ));
        }
        let (gw, ws) = (self.row(1, "rpcgate"), self.row(1, "ws-direct"));
        let judged = gw
            .and_then(|m| m.p(|l| l.p50))
            .zip(ws.and_then(|m| m.p(|l| l.p50)))
            .map(|(g, w)| {
                (
                    g - w <= P50_OVERHEAD_US,
                    format!(
                        "rpcgate p50 {}, ws-direct p50 {}",
                        latency(Some(g)),
                        latency(Some(w))
                    ),
                    format!("{:+.0} µs", g - w),
                )
            });
        goals.push(Goal::new(
            3,
            format!(
                "p50 overhead at 1 client ≤ {P50_OVERHEAD_US:.0} µs over ws-direct ({BUILT_IN})"
            ),
            judged,
            basis(gw.into_iter().chain(ws)),
        ));
        let mut grows: Vec<(usize, f64, f64)> = Vec::new();
        for level in WORKERS_LEVELS {
            let pair = self.workers_pair(level);
            if let Some(WorkersPair {
                rate: (Some(a), Some(b)),
                ..
            }) = pair
            {
                grows.push((level, a, b));
            }
            let judged = pair.and_then(|p| {
                let (one, two) = (p.cpu.0?, p.cpu.1?);
                Some((
                    two / one <= WORKERS_CPU_RATIO,
                    format!(
                        "workers = 2 {}, workers = 1 {} (alternating, {} + {} runs)",
                        us(two),
                        us(one),
                        p.runs.1,
                        p.runs.0
                    ),
                    format!("{:.2}×", two / one),
                ))
            });
            goals.push(Goal::new(
                4,
                format!(
                    "`workers = 2`: CPU per call ≤ {WORKERS_CPU_RATIO}× that of `workers = 1` at {level} clients ({WRK})"
                ),
                judged,
                basis(
                    self.runs_of(level, "rpcgate", WRK)
                        .into_iter()
                        .chain(self.runs_of(level, WORKERS_2, WRK)),
                ),
            ));
        }
        let figures = grows
            .iter()
            .map(|&(level, a, b)| format!("{level}: {} → {} req/s", rate(a), rate(b)))
            .collect::<Vec<_>>()
            .join("; ");
        let ratios = grows
            .iter()
            .map(|&(_, a, b)| format!("{:.2}×", b / a))
            .collect::<Vec<_>>()
            .join(", ");
        let mut goal = Goal::new(
            4,
            format!("with more cores, throughput grows with workers (1 → 2, {WRK})"),
            (!grows.is_empty()).then(|| (grows.iter().all(|&(_, a, b)| b > a), figures, ratios)),
            (0, None),
        );
        if self.gateway_own_cpus < 2 && !grows.is_empty() {
            goal.verdict = Verdict::NotJudged;
            goal.caveat = Some(format!(
                "the gateway had {} CPUs of its own; it needs 2 or more apart from gen and echo (RPCGATE_BENCH_CPUS)",
                self.gateway_own_cpus
            ));
        }
        goals.push(goal);
        for (what, limit) in IDLE_RSS_MB {
            let row = self.idle_row(what);
            let judged = row.and_then(|i| {
                let held = i.rss_kib?;
                let all = i.held >= i.wanted;
                let peak = i
                    .hwm_kib
                    .map_or(String::new(), |k| format!(", peak {:.1} MB", mb(k)));
                Some((
                    all && mb(held) <= limit,
                    format!(
                        "held {:.1} MB{peak}; {} of {} held",
                        mb(held),
                        i.held,
                        i.wanted
                    ),
                    format!("{:.1} MB", mb(held)),
                ))
            });
            goals.push(Goal::new(
                5,
                format!(
                    "{} {what}: gateway RSS ≤ {limit:.0} MB",
                    rate(row.map_or(10_000, |i| i.wanted) as f64)
                ),
                judged,
                (row.map_or(0, |i| i.errors), None),
            ));
        }
        // Memory does not depend on CPU contention, so a busy window does not matter.
        let busy_rows: Vec<(&str, &Measured)> = [BUILT_IN, WRK]
            .into_iter()
            .filter_map(|g| Some((g, self.row_of(BUSY_CLIENTS, "rpcgate", g)?)))
            .collect();
        let peaks: Vec<(&str, u64)> = busy_rows
            .iter()
            .filter_map(|&(g, m)| Some((g, m.server?.peak_rss_kib?)))
            .collect();
        let worst = peaks.iter().map(|&(_, k)| k).max();
        let (errors, _) = basis(busy_rows.iter().map(|&(_, m)| m));
        goals.push(Goal::new(
            5,
            format!(
                "{} busy clients: gateway peak RSS ≤ {BUSY_RSS_MB:.0} MB",
                rate(BUSY_CLIENTS as f64)
            ),
            worst.map(|k| {
                let each = peaks
                    .iter()
                    .map(|&(g, k)| format!("{g} {:.1} MB", mb(k)))
                    .collect::<Vec<_>>()
                    .join(", ");
                (mb(k) <= BUSY_RSS_MB, each, format!("{:.1} MB", mb(k)))
            }),
            (errors, None),
        ));
        goals
    }

    /// Errors in, and the worst other work during, the rows a check is judged on.
    fn basis(&self, rows: &[(usize, &str)]) -> (u64, Option<f64>) {
        basis(
            rows.iter()
                .filter_map(|&(level, target)| self.row(level, target)),
        )
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## rpcgate end-to-end benchmark\n");
        let _ = writeln!(
            out,
            "{} s measured after {} s warmup per run; clients {}; git {}; {}; CPUs: {}.\n",
            self.secs,
            self.warmup_secs,
            join(&self.levels),
            self.git.as_deref().unwrap_or("unknown"),
            self.timestamp,
            self.pinning.as_deref().map_or_else(
                || "not pinned, all processes share the machine's".into(),
                |p| format!("{p} (taskset)")
            ),
        );
        self.echo_table(&mut out);
        self.ratio_table(&mut out);
        self.access_table(&mut out);
        if let Some(rows) = &self.scenarios {
            scenario_table(&mut out, rows);
        }
        self.workers_table(&mut out);
        self.capacity_tables(&mut out);
        self.goals_table(&mut out);
        let _ = writeln!(out, "### Earlier targets\n");
        for check in self.checklist() {
            let _ = writeln!(out, "{}", check.line());
        }
        out.push('\n');
        if !self.notes.is_empty() {
            let _ = writeln!(out, "### Notes\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
            out.push('\n');
        }
        out
    }

    fn echo_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "### Echo call by concurrency\n\n\
             rpcgate = the shipped defaults (access log on, text lines to stderr, a pipe here); \
             server = the process answering HTTP (rpcgate, or the static responder); \
             echo = the WebSocket backend; \
             generator = {BUILT_IN} (this bench's closed loop) or {WRK} (`benches/gateway/post.lua`); \
             other load = CPU that work outside this benchmark took meanwhile.\n"
        );
        let _ = writeln!(
            out,
            "| clients | target | generator | req/s | p50 | p90 | p99 | p99.9 | errors | server CPU/call | server peak RSS | echo CPU/call | other load |"
        );
        let _ = writeln!(
            out,
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.rows {
            let m = &r.m;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.level,
                r.target,
                r.generator,
                rate(m.req_per_sec()),
                latency(m.p(|l| l.p50)),
                latency(m.p(|l| l.p90)),
                latency(m.p(|l| l.p99)),
                latency(m.p(|l| l.p999)),
                errors(m),
                cpu(m.server),
                rss(m.server),
                cpu(m.backend),
                cores(m.foreign_cores),
            );
        }
        out.push('\n');
    }

    fn ratio_table(&self, out: &mut String) {
        let _ = writeln!(out, "### rpcgate against the ceilings\n");
        let _ = writeln!(
            out,
            "| clients | rpcgate ÷ static req/s | same, {WRK} | rpcgate ÷ static p99 | rpcgate p50 − ws-direct p50 |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
        for &level in &self.levels {
            let r = self.ratios(level);
            let _ = writeln!(
                out,
                "| {level} | {} | {} | {} | {} |",
                r.throughput
                    .map_or("–".into(), |x| format!("{:.0}%", x * 100.0)),
                r.wrk_throughput
                    .map_or("–".into(), |x| format!("{:.0}%", x * 100.0)),
                r.p99.map_or("–".into(), |x| format!("{x:.2}×")),
                r.p50_overhead_us
                    .map_or("–".into(), |x| format!("{x:.0} µs")),
            );
        }
        out.push('\n');
    }

    fn access_table(&self, out: &mut String) {
        if !ACCESS_LEVELS
            .iter()
            .any(|&l| self.row(l, ACCESS_OFF).is_some())
        {
            return;
        }
        let _ = writeln!(
            out,
            "### Access log cost ({BUILT_IN} generator, same run)\n\n\
             on = shipped defaults; off = `[log] access_log = false`; on and off alternate, \
             each value the mean of the runs in brackets. \
             Lines = access lines the gateway wrote while it ran, warmup included.\n"
        );
        let _ = writeln!(
            out,
            "| clients | CPU/call on | CPU/call off | on − off | req/s on | req/s off | lines on | lines off |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for level in ACCESS_LEVELS {
            let (on, off) = (self.runs(level, "rpcgate"), self.runs(level, ACCESS_OFF));
            if off.is_empty() {
                continue;
            }
            let cpu_runs = |runs: &[&Measured]| {
                let each: Vec<String> = runs.iter().map(|m| cpu(m.server)).collect();
                match mean(runs.iter().map(|m| m.cpu_per_call())) {
                    Some(c) => format!("{c:.1} µs ({})", each.join(", ")),
                    None => "–".into(),
                }
            };
            let rates = |runs: &[&Measured]| {
                mean(runs.iter().map(|m| Some(m.req_per_sec()))).map_or("–".into(), rate)
            };
            let lines = |runs: &[&Measured]| {
                let each: Vec<String> = runs
                    .iter()
                    .map(|m| m.access_lines.map_or("–".into(), |n| rate(n as f64)))
                    .collect();
                each.join(", ")
            };
            let _ = writeln!(
                out,
                "| {level} | {} | {} | {} | {} | {} | {} | {} |",
                cpu_runs(&on),
                cpu_runs(&off),
                self.access_cost(level)
                    .map_or("–".into(), |(_, _, d)| format!("{d:+.1} µs")),
                rates(&on),
                rates(&off),
                lines(&on),
                lines(&off),
            );
        }
        out.push('\n');
    }

    fn workers_table(&self, out: &mut String) {
        let pairs: Vec<(usize, WorkersPair)> = WORKERS_LEVELS
            .iter()
            .filter_map(|&l| Some((l, self.workers_pair(l)?)))
            .collect();
        if pairs.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### Workers ({WRK} generator, same run)\n\n\
             workers = 1 = the defaults (`rpcgate`); workers = 2 = `{WORKERS_2}`; the two \
             alternate, each value the mean of the runs in brackets. The gateway had {} CPUs \
             of its own.\n",
            self.gateway_own_cpus
        );
        let _ = writeln!(
            out,
            "| clients | CPU/call, workers = 1 | workers = 2 | 2 ÷ 1 | req/s, workers = 1 | workers = 2 | 2 ÷ 1 |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
        for (level, p) in pairs {
            let each = |target: &str| {
                self.runs_of(level, target, WRK)
                    .iter()
                    .map(|m| cpu(m.server))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let cpu_of = |c: Option<f64>, target: &str| {
                c.map_or("–".into(), |c| format!("{c:.1} µs ({})", each(target)))
            };
            let ratio = |a: Option<f64>, b: Option<f64>| {
                a.zip(b)
                    .map_or("–".into(), |(a, b)| format!("{:.2}×", b / a))
            };
            let _ = writeln!(
                out,
                "| {level} | {} | {} | {} | {} | {} | {} |",
                cpu_of(p.cpu.0, "rpcgate"),
                cpu_of(p.cpu.1, WORKERS_2),
                ratio(p.cpu.0, p.cpu.1),
                p.rate.0.map_or("–".into(), rate),
                p.rate.1.map_or("–".into(), rate),
                ratio(p.rate.0, p.rate.1),
            );
        }
        out.push('\n');
    }

    fn goals_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "### Targets (issue 13)\n\n\
             Every figure from this run; ratios of rows of this run (means where a pair \
             alternated). RSS of the idle rows: held = read 1 s after the last connection \
             was ready, peak = VmHWM.\n"
        );
        let _ = writeln!(out, "| # | target | measured | figure | result |");
        let _ = writeln!(out, "|---:|---|---|---:|---|");
        for g in self.goals() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                g.number,
                g.name,
                g.measured.as_deref().unwrap_or("not measured"),
                g.figure.as_deref().unwrap_or("–"),
                g.result(),
            );
        }
        out.push('\n');
    }

    fn capacity_tables(&self, out: &mut String) {
        if !self.idle.is_empty() {
            let _ = writeln!(out, "### Capacity: idle connections\n");
            let _ = writeln!(
                out,
                "| connections | each | wanted | ready | held open | errors | gateway RSS before | gateway RSS holding them | peak RSS | per connection | gateway fds | time |"
            );
            let _ = writeln!(
                out,
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            let kib = |k: Option<u64>| k.map_or("–".into(), |k| format!("{:.1} MB", mb(k)));
            for i in &self.idle {
                let per = match (i.rss_before_kib, i.rss_kib) {
                    (Some(b), Some(w)) if i.held > 0 => {
                        format!("{:.1} KiB", w.saturating_sub(b) as f64 / i.held as f64)
                    }
                    _ => "–".into(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {per} | {} | {:.1} s |",
                    i.what,
                    i.how,
                    i.wanted,
                    i.answered,
                    i.held,
                    i.errors,
                    kib(i.rss_before_kib),
                    kib(i.rss_kib),
                    kib(i.hwm_kib),
                    i.fds.map_or("–".into(), |f| f.to_string()),
                    i.secs,
                );
            }
            out.push('\n');
        }
        if let Some(runs) = &self.in_flight {
            let _ = writeln!(
                out,
                "### Capacity: calls in flight (each client loops `sleep [200]`)\n"
            );
            let _ = writeln!(
                out,
                "| clients | calls/s | mean in flight | p50 | p99 | errors | gateway CPU/call | gateway peak RSS | other load |"
            );
            let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for m in runs {
                // Little's law: what the gateway held on average.
                let in_flight = m.latency.map(|l| m.req_per_sec() * l.mean / 1e6);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    m.clients,
                    rate(m.calls_per_sec()),
                    in_flight.map_or("–".into(), |n| format!("{n:.0}")),
                    latency(m.p(|l| l.p50)),
                    latency(m.p(|l| l.p99)),
                    errors(m),
                    cpu(m.server),
                    rss(m.server),
                    cores(m.foreign_cores),
                );
            }
            if let Some(r) = self.in_flight_ratio() {
                let _ = writeln!(out, "\nCPU per call, most clients ÷ fewest: {r:.2}×");
            }
            out.push('\n');
        }
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut v = r.m.json();
                v["level"] = json!(r.level);
                v["target"] = json!(r.target);
                v["generator"] = json!(r.generator);
                v
            })
            .collect();
        let ratios: Vec<Value> = self
            .levels
            .iter()
            .map(|&level| {
                let r = self.ratios(level);
                json!({
                    "level": level,
                    "rpcgate_over_static_req_per_sec": r.throughput,
                    "rpcgate_over_static_req_per_sec_wrk": r.wrk_throughput,
                    "rpcgate_over_static_p99": r.p99,
                    "rpcgate_minus_ws_direct_p50_us": r.p50_overhead_us,
                })
            })
            .collect();
        let access_log_cost: Vec<Value> = ACCESS_LEVELS
            .iter()
            .filter_map(|&level| {
                let (on, off, difference) = self.access_cost(level)?;
                let runs = |target| {
                    self.runs(level, target)
                        .iter()
                        .map(|m| m.json())
                        .collect::<Vec<_>>()
                };
                Some(json!({
                    "level": level,
                    "generator": BUILT_IN,
                    "cpu_us_per_call_on": on,
                    "cpu_us_per_call_off": off,
                    "difference_us": difference,
                    "runs_on": runs("rpcgate"),
                    "runs_off": runs(ACCESS_OFF),
                }))
            })
            .collect();
        let scenarios = self.scenarios.as_ref().map(|rows| {
            rows.iter()
                .map(|r| {
                    let mut v = r.m.json();
                    v["scenario"] = json!(r.name);
                    v
                })
                .collect::<Vec<_>>()
        });
        let in_flight = self
            .in_flight
            .as_ref()
            .map(|runs| runs.iter().map(Measured::json).collect::<Vec<_>>());
        let goals: Vec<Value> = self
            .goals()
            .iter()
            .map(|g| {
                json!({
                    "item": g.number,
                    "target": g.name,
                    "result": g.verdict.met(),
                    "measured": g.measured,
                    "figure": g.figure,
                    "errors": g.errors,
                    "other_work_cores": g.busy,
                    "caveat": g.caveat,
                })
            })
            .collect();
        let workers: Vec<Value> = WORKERS_LEVELS
            .iter()
            .filter_map(|&level| {
                let p = self.workers_pair(level)?;
                let runs = |target| {
                    self.runs_of(level, target, WRK)
                        .iter()
                        .map(|m| m.json())
                        .collect::<Vec<_>>()
                };
                Some(json!({
                    "level": level,
                    "generator": WRK,
                    "cpu_us_per_call_workers_1": p.cpu.0,
                    "cpu_us_per_call_workers_2": p.cpu.1,
                    "req_per_sec_workers_1": p.rate.0,
                    "req_per_sec_workers_2": p.rate.1,
                    "runs_workers_1": runs("rpcgate"),
                    "runs_workers_2": runs(WORKERS_2),
                }))
            })
            .collect();
        let checklist: Vec<Value> = self
            .checklist()
            .iter()
            .map(|c| {
                json!({
                    "target": c.name,
                    "result": c.verdict.word(),
                    "value": c.value,
                    "errors": c.errors,
                    "other_work_cores": c.busy,
                })
            })
            .collect();
        json!({
            "levels": self.levels,
            "secs": self.secs,
            "warmup_secs": self.warmup_secs,
            "git_describe": self.git,
            "timestamp": self.timestamp,
            "nofile_limit": self.nofile,
            "cpus": self.pinning,
            "gateway_own_cpus": self.gateway_own_cpus,
            "echo": rows,
            "ratios": ratios,
            "access_log_cost": access_log_cost,
            "workers": workers,
            "scenarios": scenarios,
            "capacity": {
                "idle": self.idle.iter().map(Idle::json).collect::<Vec<_>>(),
                "in_flight": in_flight,
                "in_flight_cpu_per_call_ratio": self.in_flight_ratio(),
            },
            "targets_issue_13": goals,
            "checklist": checklist,
            "notes": self.notes,
        })
    }
}

/// Errors summed over `runs`, and the most other work any of them saw if that was
/// enough to distort it.
fn basis<'a>(runs: impl Iterator<Item = &'a Measured>) -> (u64, Option<f64>) {
    let mut errors = 0;
    let mut busy: Option<f64> = None;
    for m in runs {
        errors += m.errors;
        if m.is_busy() {
            let c = m.foreign_cores.unwrap_or_default();
            busy = Some(busy.map_or(c, |b| b.max(c)));
        }
    }
    (errors, busy)
}

#[derive(Clone, Copy)]
struct WorkersPair {
    /// Mean gateway CPU µs per call: (workers = 1, workers = 2).
    cpu: (Option<f64>, Option<f64>),
    /// Mean req/s: (workers = 1, workers = 2).
    rate: (Option<f64>, Option<f64>),
    /// Runs of each.
    runs: (usize, usize),
}

struct Ratios {
    throughput: Option<f64>,
    wrk_throughput: Option<f64>,
    p99: Option<f64>,
    p50_overhead_us: Option<f64>,
}

fn scenario_table(out: &mut String, rows: &[ScenarioRow]) {
    let _ = writeln!(out, "### Scenarios (rpcgate)\n");
    let _ = writeln!(
        out,
        "| scenario | clients | req/s | calls/s | p50 | p99 | fast p50 | fast p99 | errors | gateway CPU/call | gateway peak RSS | other load |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let m = &r.m;
        let fast = m.split.and_then(|(main, _)| main);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            m.clients,
            rate(m.req_per_sec()),
            rate(m.calls_per_sec()),
            latency(m.p(|l| l.p50)),
            latency(m.p(|l| l.p99)),
            latency(fast.map(|l| l.p50)),
            latency(fast.map(|l| l.p99)),
            errors(m),
            cpu(m.server),
            rss(m.server),
            cores(m.foreign_cores),
        );
    }
    out.push('\n');
}

#[derive(Clone, Copy)]
pub enum Verdict {
    Pass,
    Fail,
    NotRun,
    /// Measured, but this run's setup cannot tell (e.g. too few cores).
    NotJudged,
}

impl Verdict {
    fn word(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotRun => "not run",
            Verdict::NotJudged => "not judged",
        }
    }

    fn met(&self) -> &'static str {
        match self {
            Verdict::Pass => "met",
            Verdict::Fail => "not met",
            Verdict::NotRun => "not measured",
            Verdict::NotJudged => "not judged",
        }
    }
}

/// One of issue 13's targets, judged on this run.
pub struct Goal {
    /// The item of the list.
    number: usize,
    name: String,
    /// The figures it is judged on.
    measured: Option<String>,
    /// The ratio or value compared with the threshold.
    figure: Option<String>,
    verdict: Verdict,
    errors: u64,
    busy: Option<f64>,
    caveat: Option<String>,
}

impl Goal {
    fn new(
        number: usize,
        name: String,
        result: Option<(bool, String, String)>,
        (errors, busy): (u64, Option<f64>),
    ) -> Goal {
        let (verdict, measured, figure) = match result {
            Some((met, measured, figure)) => (
                if met { Verdict::Pass } else { Verdict::Fail },
                Some(measured),
                Some(figure),
            ),
            None => (Verdict::NotRun, None, None),
        };
        Goal {
            number,
            name,
            measured,
            figure,
            verdict,
            errors,
            busy,
            caveat: None,
        }
    }

    fn result(&self) -> String {
        let mut out = match self.verdict {
            Verdict::Pass => "**met**".to_owned(),
            Verdict::Fail => "**not met**".to_owned(),
            other => other.met().to_owned(),
        };
        if let Some(c) = &self.caveat {
            let _ = write!(out, "; {c}");
        }
        if self.errors > 0 {
            let _ = write!(out, " ({} errors in those runs)", self.errors);
        }
        if let Some(c) = self.busy {
            let _ = write!(out, " ⚠ other work took {c:.2} cores meanwhile");
        }
        out
    }
}

pub struct Check {
    name: String,
    verdict: Verdict,
    value: Option<String>,
    errors: u64,
    /// Cores of other work during a window the check rests on, when enough to distort it.
    busy: Option<f64>,
}

impl Check {
    fn new(
        name: String,
        result: Option<(bool, String)>,
        (errors, busy): (u64, Option<f64>),
    ) -> Check {
        let (verdict, value) = match result {
            Some((true, v)) => (Verdict::Pass, Some(v)),
            Some((false, v)) => (Verdict::Fail, Some(v)),
            None => (Verdict::NotRun, None),
        };
        Check {
            name,
            verdict,
            value,
            errors,
            busy,
        }
    }

    fn line(&self) -> String {
        let mark = match self.verdict {
            Verdict::Pass => "[x] PASS",
            Verdict::Fail => "[ ] FAIL",
            Verdict::NotRun => "[ ] NOT RUN",
            Verdict::NotJudged => "[ ] NOT JUDGED",
        };
        let value = self.value.as_deref().unwrap_or("not measured");
        let errors = if self.errors > 0 {
            format!(" ({} errors in that run)", self.errors)
        } else {
            String::new()
        };
        let busy = match self.busy {
            Some(c) => format!(" ⚠ other work took {c:.2} cores meanwhile"),
            None => String::new(),
        };
        format!("- {mark} {}: {value}{errors}{busy}", self.name)
    }
}

/// The mean of the values, `None` if any is missing.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Option<Vec<f64>> = values.collect();
    let values = values.filter(|v| !v.is_empty())?;
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn join(levels: &[usize]) -> String {
    levels
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn rate(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let whole = x.round() as u64;
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(d);
    }
    grouped
}

fn latency(us: Option<f64>) -> String {
    match us {
        None => "–".into(),
        Some(us) if us < 1_000.0 => format!("{us:.0} µs"),
        Some(us) if us < 1_000_000.0 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

fn cpu(usage: Option<ProcUsage>) -> String {
    match usage {
        Some(u) if u.cpu_us_per_call.is_finite() => format!("{:.1} µs", u.cpu_us_per_call),
        _ => "–".into(),
    }
}

fn rss(usage: Option<ProcUsage>) -> String {
    match usage.and_then(|u| Some((u.peak_rss_kib?, u.rss_sampled))) {
        Some((k, sampled)) => format!("{:.1} MB{}", mb(k), if sampled { "*" } else { "" }),
        None => "–".into(),
    }
}

/// CPU taken by work other than this benchmark, in cores; flagged when it is enough to
/// distort the run.
fn cores(x: Option<f64>) -> String {
    match x {
        Some(c) if c > BUSY_CORES => format!("⚠ {c:.2} cores"),
        Some(c) => format!("{c:.2} cores"),
        None => "–".into(),
    }
}

fn errors(m: &Measured) -> String {
    if m.connected < m.clients {
        format!("{} ({} not connected)", m.errors, m.clients - m.connected)
    } else {
        m.errors.to_string()
    }
}
