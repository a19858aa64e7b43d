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

/// The 10,000 idle keep-alive clients.
pub struct Idle {
    pub wanted: usize,
    /// Connections whose one call succeeded.
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
    pub rows: Vec<LevelRow>,
    /// The access log comparison's runs after the first pair (which is in `rows`).
    pub access_repeats: Vec<LevelRow>,
    pub scenarios: Option<Vec<ScenarioRow>>,
    pub idle: Option<Idle>,
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
        self.rows
            .iter()
            .chain(&self.access_repeats)
            .filter(|r| r.level == level && r.target == target && r.generator == BUILT_IN)
            .map(|r| &r.m)
            .collect()
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
        let idle = self.idle.as_ref().and_then(|i| {
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
            (self.idle.as_ref().map_or(0, |i| i.errors), None),
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
            "{} s measured after {} s warmup per run; clients {}; git {}; {}.\n",
            self.secs,
            self.warmup_secs,
            join(&self.levels),
            self.git.as_deref().unwrap_or("unknown"),
            self.timestamp,
        );
        self.echo_table(&mut out);
        self.ratio_table(&mut out);
        self.access_table(&mut out);
        if let Some(rows) = &self.scenarios {
            scenario_table(&mut out, rows);
        }
        self.capacity_tables(&mut out);
        let _ = writeln!(out, "### Targets\n");
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

    fn capacity_tables(&self, out: &mut String) {
        if let Some(i) = &self.idle {
            let _ = writeln!(out, "### Capacity: idle keep-alive clients\n");
            let _ = writeln!(
                out,
                "| clients | answered | held open | errors | gateway RSS before | gateway RSS holding them | peak RSS | gateway fds | time |"
            );
            let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            let kib = |k: Option<u64>| k.map_or("–".into(), |k| format!("{:.1} MB", mb(k)));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
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
            "echo": rows,
            "ratios": ratios,
            "access_log_cost": access_log_cost,
            "scenarios": scenarios,
            "capacity": {
                "idle": self.idle.as_ref().map(Idle::json),
                "in_flight": in_flight,
                "in_flight_cpu_per_call_ratio": self.in_flight_ratio(),
            },
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

pub enum Verdict {
    Pass,
    Fail,
    NotRun,
}

impl Verdict {
    fn word(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotRun => "not run",
        }
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
