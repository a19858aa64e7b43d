//! wrk, an outside load generator, beside the bench's own: the same echo call at the
//! same concurrency, so that the headline rows do not rest only on a generator
//! written alongside the gateway it measures.
//!
//! wrk reports totals for its whole run. The gateway's CPU is read from /proc, as for
//! the built-in generator, over a window inside that run: it opens after wrk's
//! connections are up and closes before wrk stops, and it is divided by the calls
//! wrk's rate puts in it.

use crate::procs::Tool;
use crate::report::Latency;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

/// `post.lua`: the echo call, the check of each answer, and a parseable summary.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gateway/post.lua");
/// What the script's summary line starts with.
const SUMMARY: &str = "rpcgate-bench-wrk ";
/// From wrk's start to the window's: its connections are open by then.
pub const LEAD: Duration = Duration::from_millis(500);
/// From the window's end to wrk's: wrk must still be running when the window closes,
/// or its CPU would count as other work on the machine.
const TAIL: Duration = Duration::from_secs(1);
/// Same as the built-in generator's call timeout.
const CALL_TIMEOUT: &str = "15s";

pub struct Wrk;

/// What one wrk run reported.
pub struct WrkRun {
    /// Answered with a 200 and the echoed result.
    pub good: u64,
    pub secs: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency: Option<Latency>,
}

impl Wrk {
    /// wrk on the PATH, or why not.
    pub async fn find() -> Result<Wrk, String> {
        let tool = match Tool::spawn("wrk", ["-v"]) {
            Ok(tool) => tool,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("wrk is not installed (apt-get install wrk)".into());
            }
            Err(e) => return Err(format!("cannot run wrk: {e}")),
        };
        // `wrk -v` prints its version with the usage text and exits 1.
        match tool.finish(Duration::from_secs(5)).await {
            Ok(out) if text(&out).contains("wrk ") => Ok(Wrk),
            Ok(out) => Err(format!("`wrk -v` printed no version: {}", text(&out))),
            Err(e) => Err(format!("`wrk -v`: {e:#}")),
        }
    }

    /// How long a run must be for a window of `window` after `LEAD`, in the whole
    /// seconds wrk takes.
    pub fn run_length(window: Duration) -> Duration {
        Duration::from_secs((LEAD + window + TAIL).as_secs_f64().ceil() as u64)
    }

    /// Starts `connections` clients against `url` for `length` (whole seconds), on at
    /// most two threads (the development machine has two cores, shared with the
    /// gateway), or one per generator CPU when `RPCGATE_BENCH_CPUS` names them.
    pub fn start(&self, url: &str, connections: usize, length: Duration) -> Result<Tool> {
        let cpus = crate::procs::pinning().map_or(2, |p| p.cpus(crate::procs::Role::Gen).len());
        let threads = connections.clamp(1, cpus.max(1));
        let args = [
            format!("-t{threads}"),
            format!("-c{connections}"),
            format!("-d{}s", length.as_secs().max(1)),
            "--latency".into(),
            "--timeout".into(),
            CALL_TIMEOUT.into(),
            "-s".into(),
            SCRIPT.into(),
            url.into(),
        ];
        Tool::spawn("wrk", args).context("starting wrk")
    }
}

/// Reads the script's summary line from what wrk printed.
pub fn parse(output: &Output) -> Result<WrkRun> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(SUMMARY)) else {
        bail!(
            "wrk ({}) printed no summary: {} {}",
            output.status,
            stdout.trim(),
            text_of(&output.stderr)
        );
    };
    let fields: HashMap<&str, f64> = line
        .split_ascii_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .with_context(|| format!("wrk summary has no {k}: {line}"))
    };
    let count = |k: &str| get(k).map(|v| v.max(0.0) as u64);
    let requests = count("requests")?;
    let (non200, wrong) = (count("non200")?, count("wrong")?);
    let (connect, read, write, timeout) = (
        count("connect")?,
        count("read")?,
        count("write")?,
        count("timeout")?,
    );
    let errors = connect + read + write + timeout + non200 + wrong;
    let first_error = (errors > 0).then(|| {
        format!(
            "wrk: {connect} connect, {read} read, {write} write errors, {timeout} timeouts, \
             {non200} non-200 answers, {wrong} wrong replies"
        )
    });
    let good = requests.saturating_sub(non200 + wrong);
    let latency = if good > 0 {
        Some(Latency {
            p50: get("p50")?,
            p90: get("p90")?,
            p99: get("p99")?,
            p999: get("p999")?,
            max: get("max")?,
            mean: get("mean")?,
        })
    } else {
        None
    };
    Ok(WrkRun {
        good,
        secs: get("duration_us")? / 1e6,
        errors,
        first_error,
        latency,
    })
}

fn text(output: &Output) -> String {
    format!("{}{}", text_of(&output.stdout), text_of(&output.stderr))
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}
