//! Prometheus metrics, registered on a [`Registry`] of our own.
//!
//! Never the global default registry: parallel tests run several gateways in one
//! process, and each must count only its own traffic. Labels are bounded: `method`
//! is one of the configured method names or `other`, `upstream` one of the
//! configured or discovered upstreams, the rest fixed sets.

use prometheus::proto::{self, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashSet;
use std::time::Duration;

/// Every metric rpcgate exports.
pub struct Metrics {
    registry: Registry,
    /// Method names that get their own label value; the rest count as `other`.
    methods: HashSet<String>,
    pub http_requests: IntCounterVec,
    pub rpc_calls: IntCounterVec,
    pub call_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub batch_size: Histogram,
    pub upstream_connections: IntGaugeVec,
    pub upstream_healthy: IntGaugeVec,
    pub reconnects: IntCounterVec,
    pub connect_failures: IntCounterVec,
    pub unmatched: IntCounterVec,
    pub queue_wait: Histogram,
    pub sessions_active: IntGauge,
    pub sessions_refused: IntCounterVec,
    pub replays: IntCounterVec,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub ready: IntGauge,
    pub log_lines_dropped: IntCounter,
    pub memory_budget_used: IntGauge,
    pub memory_budget_limit: IntGauge,
    pub http_connections_open: IntGauge,
    /// Requests handed to the worker owning their session (`runtime.workers` > 1).
    pub worker_handovers: IntCounter,
    pub http_connections_parked: IntGauge,
    /// HTTP/1.1 event streams served without hyper once their head was sent.
    pub event_streams_detached: IntGauge,
    pub http_connections_refused: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    pub tls_reloads: IntCounterVec,
    pub tls_certificate_expiry: IntGauge,
    pub push_sessions: IntGauge,
    pub push_streams: IntGauge,
    pub push_subscriptions: IntGauge,
    pub pushed: IntCounterVec,
    pub resubscribed: IntCounterVec,
    pub server_requests: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub key_reloads: IntCounterVec,
    pub caller_calls: IntCounterVec,
    pub calls_forbidden: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_limit_rate: GaugeVec,
    pub rate_limit_burst: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(
        r,
        IntGauge::new(name, help).expect("valid metric definition"),
    )
}

/// Registering a metric fails only on a name clash, which is a bug in this file.
fn reg<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
    )
}

impl Metrics {
    /// Creates and registers every metric; `methods` are the method names worth a label
    /// value of their own.
    pub fn new(methods: impl IntoIterator<Item = String>) -> Metrics {
        Metrics::build(methods, true)
    }

    /// A worker's own metrics (`runtime.workers` > 1): counted without touching another
    /// worker's cache lines, and added up at scrape time ([`Metrics::render_all`]).
    /// Without the process's CPU and memory, which worker 0's carry.
    pub fn shard(methods: impl IntoIterator<Item = String>) -> Metrics {
        Metrics::build(methods, false)
    }

    fn build(methods: impl IntoIterator<Item = String>, process: bool) -> Metrics {
        let r = Registry::new();
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ];
        #[cfg(target_os = "linux")]
        if process {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(e) = r.register(Box::new(process)) {
                tracing::warn!(error = %e, "process metrics unavailable");
            }
        }
        let metrics = Metrics {
            methods: methods.into_iter().collect(),
            http_requests: counter_vec(
                &r,
                "rpcgate_http_requests_total",
                "HTTP requests answered, by status code.",
                &["status"],
            ),
            rpc_calls: counter_vec(
                &r,
                "rpcgate_rpc_calls_total",
                "JSON-RPC calls (batch elements count one each), by method and outcome.",
                &["method", "outcome"],
            ),
            call_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "rpcgate_rpc_call_duration_seconds",
                        "Time from a call's request being read to its answer, by method.",
                    )
                    .buckets(latency.clone()),
                    &["method"],
                )
                .expect("valid metric definition"),
            ),
            in_flight: reg(
                &r,
                IntGauge::new(
                    "rpcgate_rpc_calls_in_flight",
                    "JSON-RPC calls being served now.",
                )
                .expect("valid metric definition"),
            ),
            batch_size: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("rpcgate_batch_size", "Elements per JSON-RPC batch.")
                        .buckets(vec![
                            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                        ]),
                )
                .expect("valid metric definition"),
            ),
            upstream_connections: gauge_vec(
                &r,
                "rpcgate_upstream_connections",
                "Pooled upstream WebSocket connections, by upstream and state (open, connecting, backoff).",
                &["upstream", "state"],
            ),
            upstream_healthy: gauge_vec(
                &r,
                "rpcgate_upstream_healthy",
                "1 while the upstream passes its health check (always 1 without health_method).",
                &["upstream"],
            ),
            reconnects: counter_vec(
                &r,
                "rpcgate_upstream_reconnects_total",
                "Upstream connections lost and reopened, by upstream.",
                &["upstream"],
            ),
            connect_failures: counter_vec(
                &r,
                "rpcgate_upstream_connect_failures_total",
                "Upstream connect attempts that failed, by upstream and reason (connect, timeout, wamp_abort, wamp_auth, wamp_protocol).",
                &["upstream", "reason"],
            ),
            unmatched: counter_vec(
                &r,
                "rpcgate_upstream_unmatched_messages_total",
                "Upstream messages that matched no pending call: unsolicited (notifications, late replies) or garbage (not JSON-RPC).",
                &["kind"],
            ),
            queue_wait: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "rpcgate_queue_wait_seconds",
                        "Time calls waited for an open upstream connection or a free slot.",
                    )
                    .buckets(latency),
                )
                .expect("valid metric definition"),
            ),
            push_sessions: gauge(
                &r,
                "rpcgate_push_sessions",
                "Push sessions open: named by a session key, each with its buffer of pushed messages.",
            ),
            push_streams: gauge(
                &r,
                "rpcgate_push_streams",
                "Event streams, long-polls and WebSocket clients reading a push session now.",
            ),
            push_subscriptions: gauge(
                &r,
                "rpcgate_push_subscriptions",
                "Subscriptions rpcgate tracks for sessions ([[subscriptions]]).",
            ),
            pushed: counter_vec(
                &r,
                "rpcgate_pushed_messages_total",
                "Messages pushed to sessions: buffered (routed to a session), delivered (written to its stream or socket), dropped (pushed out of a full buffer before anyone read them, or refused by the memory budget).",
                &["outcome"],
            ),
            resubscribed: counter_vec(
                &r,
                "rpcgate_push_resubscriptions_total",
                "Subscriptions opened again after their upstream connection died, by result (ok, failed).",
                &["result"],
            ),
            server_requests: counter_vec(
                &r,
                "rpcgate_server_requests_total",
                "Requests upstreams sent to clients, by outcome (answered by the client, timed_out: rpcgate answered with an error).",
                &["outcome"],
            ),
            auth_failures: counter_vec(
                &r,
                "rpcgate_auth_failures_total",
                "Requests refused with 401, by reason (missing, unknown_key, bad_token, expired, unknown_certificate).",
                &["reason"],
            ),
            key_reloads: counter_vec(
                &r,
                "rpcgate_auth_key_reloads_total",
                "JWT key files (auth.jwt.public_key, jwks) re-read after a change, by result (ok; error: the keys in use were kept).",
                &["result"],
            ),
            caller_calls: counter_vec(
                &r,
                "rpcgate_caller_calls_total",
                "Calls admitted by the access rules, by caller (a configured key or certificate name, jwt, anonymous).",
                &["caller"],
            ),
            calls_forbidden: counter_vec(
                &r,
                "rpcgate_calls_forbidden_total",
                "Calls refused with 403 by the method allow and deny lists, by caller.",
                &["caller"],
            ),
            rate_limited: counter_vec(
                &r,
                "rpcgate_rate_limited_total",
                "Calls refused with 429 by a rate limit, by caller and limit.",
                &["caller", "limit"],
            ),
            rate_limit_rate: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "rpcgate_rate_limit_tokens_per_second",
                        "Each configured rate limit's refill rate.",
                    ),
                    &["limit"],
                )
                .expect("valid metric definition"),
            ),
            rate_limit_burst: gauge_vec(
                &r,
                "rpcgate_rate_limit_burst",
                "Each configured rate limit's bucket size.",
                &["limit"],
            ),
            sessions_active: reg(
                &r,
                IntGauge::new(
                    "rpcgate_sessions_active",
                    "Sticky sessions with their own upstream connection (affinity = connection).",
                )
                .expect("valid metric definition"),
            ),
            sessions_refused: counter_vec(
                &r,
                "rpcgate_sessions_refused_total",
                "New affinity = connection sessions refused, by the limit that refused them \
                 (max_sessions, max_per_client, new_per_client_per_minute).",
                &["reason"],
            ),
            replays: counter_vec(
                &r,
                "rpcgate_session_replays_total",
                "Session reconnects whose recorded calls were replayed, by result (ok, failed).",
                &["result"],
            ),
            bytes_in: reg(
                &r,
                IntCounter::new(
                    "rpcgate_http_request_bytes_total",
                    "Bytes of JSON-RPC request bodies read.",
                )
                .expect("valid metric definition"),
            ),
            bytes_out: reg(
                &r,
                IntCounter::new(
                    "rpcgate_http_response_bytes_total",
                    "Bytes of JSON-RPC response bodies sent.",
                )
                .expect("valid metric definition"),
            ),
            ready: reg(
                &r,
                IntGauge::new("rpcgate_ready", "1 while /readyz answers 200.")
                    .expect("valid metric definition"),
            ),
            log_lines_dropped: reg(
                &r,
                IntCounter::new(
                    "rpcgate_log_lines_dropped_total",
                    "Log and access-log lines dropped because stderr did not keep up, or failed to write.",
                )
                .expect("valid metric definition"),
            ),
            memory_budget_used: reg(
                &r,
                IntGauge::new(
                    "rpcgate_memory_budget_used_bytes",
                    "Bytes of request bodies and unsent answers held for clients now (limits.memory).",
                )
                .expect("valid metric definition"),
            ),
            memory_budget_limit: reg(
                &r,
                IntGauge::new(
                    "rpcgate_memory_budget_limit_bytes",
                    "The memory budget in force (limits.memory, or its default for this machine).",
                )
                .expect("valid metric definition"),
            ),
            worker_handovers: reg(
                &r,
                IntCounter::new(
                    "rpcgate_worker_handovers_total",
                    "Requests accepted by one worker and served by the worker owning their session (runtime.workers > 1).",
                )
                .expect("valid metric definition"),
            ),
            http_connections_open: reg(
                &r,
                IntGauge::new(
                    "rpcgate_http_connections_open",
                    "Client connections being served now (at most http.max_connections).",
                )
                .expect("valid metric definition"),
            ),
            event_streams_detached: reg(
                &r,
                IntGauge::new(
                    "rpcgate_event_streams_detached",
                    "HTTP/1.1 event streams written by rpcgate itself once their head was sent, \
                     holding none of hyper's buffers.",
                )
                .expect("valid metric definition"),
            ),
            http_connections_parked: reg(
                &r,
                IntGauge::new(
                    "rpcgate_http_connections_parked",
                    "HTTP/1 client connections idle between requests, holding no HTTP state \
                     (their buffers are dropped until the client sends again); part of \
                     rpcgate_http_connections_open.",
                )
                .expect("valid metric definition"),
            ),
            http_connections_refused: counter_vec(
                &r,
                "rpcgate_http_connections_refused_total",
                "Client connections accepted and refused at once, by the limit that refused them: \
                 max_connections (answered 503) or max_connections_per_address (answered 429).",
                &["reason"],
            ),
            tls_handshake_failures: reg(
                &r,
                IntCounter::new(
                    "rpcgate_tls_handshake_failures_total",
                    "TLS handshakes on the listeners that failed or did not finish within \
                     http.header_read_timeout (plain HTTP on a TLS port, a refused client certificate).",
                )
                .expect("valid metric definition"),
            ),
            tls_reloads: counter_vec(
                &r,
                "rpcgate_tls_reloads_total",
                "Reloads of the listener's certificate files (a file changed, or SIGHUP), by result \
                 (ok; error: the old certificate is kept).",
                &["result"],
            ),
            tls_certificate_expiry: gauge(
                &r,
                "rpcgate_tls_certificate_expiry_timestamp_seconds",
                "When the listener's certificate in use expires (its not-after), in Unix seconds; 0 without TLS.",
            ),
            registry: r,
        };
        // Every label value from the start, so a rate over them never starts missing.
        for reason in ["max_connections", "max_connections_per_address"] {
            metrics
                .http_connections_refused
                .with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            metrics.tls_reloads.with_label_values(&[result]);
        }
        metrics
    }

    /// The label value for `method`: itself if configured, else `other`.
    pub fn method_label<'a>(&self, method: &'a str) -> &'a str {
        if self.methods.contains(method) {
            method
        } else {
            "other"
        }
    }

    /// Counts one finished call.
    pub fn call_done(&self, method: &str, outcome: &str, took: Duration) {
        let method = self.method_label(method);
        self.rpc_calls.with_label_values(&[method, outcome]).inc();
        self.call_duration
            .with_label_values(&[method])
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> Vec<u8> {
        Metrics::render_all([self])
    }

    /// One exposition of several workers' metrics: each series is the sum of its
    /// values in every shard (counters, gauges, histogram buckets), except
    /// `rpcgate_upstream_healthy`, which is healthy only if it is for every worker.
    pub fn render_all<'a>(shards: impl IntoIterator<Item = &'a Metrics>) -> Vec<u8> {
        let mut shards = shards.into_iter();
        let mut families = shards
            .next()
            .map(|m| m.registry.gather())
            .unwrap_or_default();
        for shard in shards {
            merge(&mut families, shard.registry.gather());
        }
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Adds `from`'s series to `into`'s, family by family and label set by label set.
fn merge(into: &mut Vec<MetricFamily>, from: Vec<MetricFamily>) {
    for mut family in from {
        let Some(target) = into.iter_mut().find(|f| f.name() == family.name()) else {
            into.push(family);
            continue;
        };
        let lowest = family.name() == "rpcgate_upstream_healthy";
        let kind = family.get_field_type();
        for metric in family.take_metric() {
            let same = target
                .mut_metric()
                .iter_mut()
                .find(|t| t.get_label() == metric.get_label());
            match same {
                Some(t) => add(t, &metric, kind, lowest),
                None => target.mut_metric().push(metric),
            }
        }
    }
}

/// `into` += `from`, for one series of type `kind` (the lower of the two if `lowest`).
fn add(into: &mut Metric, from: &Metric, kind: MetricType, lowest: bool) {
    match kind {
        MetricType::COUNTER => {
            let mut c = proto::Counter::default();
            c.set_value(into.get_counter().get_value() + from.get_counter().get_value());
            into.set_counter(c);
        }
        MetricType::GAUGE => {
            let (a, b) = (into.get_gauge().get_value(), from.get_gauge().get_value());
            let mut g = proto::Gauge::default();
            g.set_value(if lowest { a.min(b) } else { a + b });
            into.set_gauge(g);
        }
        MetricType::HISTOGRAM => {
            let (a, b) = (into.get_histogram(), from.get_histogram());
            let mut h = proto::Histogram::default();
            h.set_sample_count(a.get_sample_count() + b.get_sample_count());
            h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
            // The same buckets in every shard: one Metrics::build made them all.
            let buckets = a
                .get_bucket()
                .iter()
                .zip(b.get_bucket())
                .map(|(x, y)| {
                    let mut bucket = x.clone();
                    bucket.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                    bucket
                })
                .collect();
            h.set_bucket(buckets);
            into.set_histogram(h);
        }
        // rpcgate registers none of the other kinds.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up_and_an_upstream_is_healthy_only_if_every_worker_says_so() {
        let (a, b) = (Metrics::new([]), Metrics::shard([]));
        a.http_requests.with_label_values(&["200"]).inc_by(3);
        b.http_requests.with_label_values(&["200"]).inc_by(4);
        b.http_requests.with_label_values(&["503"]).inc();
        a.call_done("x", "ok", Duration::from_micros(200));
        b.call_done("x", "ok", Duration::from_secs(2));
        a.upstream_healthy.with_label_values(&["u"]).set(1);
        b.upstream_healthy.with_label_values(&["u"]).set(0);
        a.http_connections_open.set(2);
        b.http_connections_open.set(5);
        let text = String::from_utf8(Metrics::render_all([&a, &b])).unwrap();
        for line in [
            r#"rpcgate_http_requests_total{status="200"} 7"#,
            r#"rpcgate_http_requests_total{status="503"} 1"#,
            r#"rpcgate_rpc_calls_total{method="other",outcome="ok"} 2"#,
            r#"rpcgate_rpc_call_duration_seconds_bucket{method="other",le="0.00025"} 1"#,
            r#"rpcgate_rpc_call_duration_seconds_bucket{method="other",le="2.5"} 2"#,
            r#"rpcgate_rpc_call_duration_seconds_count{method="other"} 2"#,
            r#"rpcgate_upstream_healthy{upstream="u"} 0"#,
            "rpcgate_http_connections_open 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // The process's own figures once, from worker 0's.
        assert_eq!(text.matches("\nprocess_cpu_seconds_total ").count(), 1);
    }

    #[test]
    fn methods_outside_the_configured_set_are_other() {
        let m = Metrics::new(["login".to_string()]);
        assert_eq!(m.method_label("login"), "login");
        assert_eq!(m.method_label("anything-a-client-sends"), "other");
        m.call_done("anything", "ok", Duration::from_millis(3));
        m.call_done("login", "timeout", Duration::from_millis(3));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"rpcgate_rpc_calls_total{method="other",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"rpcgate_rpc_calls_total{method="login",outcome="timeout"} 1"#));
        assert!(text.contains("# HELP rpcgate_rpc_call_duration_seconds"));
    }

    #[test]
    fn two_instances_do_not_share_counts() {
        let a = Metrics::new([]);
        let b = Metrics::new([]);
        a.bytes_in.inc_by(10);
        assert!(
            String::from_utf8(b.render())
                .unwrap()
                .contains("rpcgate_http_request_bytes_total 0")
        );
    }
}
