//! Server metrics and the `/metrics` exposition, through `prometheus-client` (OpenMetrics text).
//!
//! Every metric carries the `model_name` label (the served model name). Names follow Prometheus
//! conventions: counters' samples end in `_total`, gauges and histograms never do, units are
//! base units (`_seconds`, `_bytes`, `_ratio`). Request metrics are recorded as requests finish;
//! engine, connection and scaling figures are read at scrape time. docs/serve.md maps each to
//! vLLM's nearest metric.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use moe_engine::{EngineMetrics, RequestTimings};

use super::connections::ConnectionCounts;
use super::scale::ScaleStatus;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket upper bounds (seconds) for TTFT, end-to-end latency and queue time.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
/// Bucket upper bounds (seconds) for per-token latencies.
const TOKEN_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn token_histogram() -> Histogram {
    Histogram::new(TOKEN_BUCKETS)
}

type Labels = Vec<(&'static str, String)>;
type Ratio = Gauge<f64, AtomicU64>;

/// A finished generation, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// OpenAI's finish reason.
    pub reason: &'static str,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// The engine's timings.
    pub timings: &'a RequestTimings,
}

/// What the server counts, and the registry that renders it.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    finished: Family<Labels, Counter>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    client_disconnects: Counter,
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    // Read at scrape time.
    queue_depth: Gauge,
    running: Gauge,
    kv_usage: Ratio,
    kv_used: Family<Labels, Gauge>,
    kv_capacity: Family<Labels, Gauge>,
    requests_waiting: Gauge,
    connections_open: Gauge,
    connections_control_open: Gauge,
    connections_accepted: Counter,
    connections_rejected: Family<Labels, Counter>,
    connection_timeouts: Family<Labels, Counter>,
    accept_errors: Counter,
    engine_tokens_per_second: Ratio,
    engine_generated: Counter,
    engine_prefill: Counter,
    engine_preemptions: Counter,
    engine_iterations: Counter,
    active_devices: Gauge,
    max_devices: Gauge,
    transition_running: Gauge,
    scale_events: Family<Labels, Counter>,
    scale_bytes_moved: Counter,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics::new("model")
    }
}

/// A count as a gauge value.
fn g(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Raises a counter that mirrors a monotonic figure read elsewhere to `value`.
fn mirror(c: &Counter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

impl ServerMetrics {
    /// Metrics of a server whose model is called `model_name`.
    pub fn new(model_name: &str) -> ServerMetrics {
        let mut r = Registry::with_prefix_and_labels(
            "elasticmoe",
            [(
                Cow::Borrowed("model_name"),
                Cow::Owned(model_name.to_string()),
            )]
            .into_iter(),
        );
        let m = ServerMetrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            finished: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            client_disconnects: Counter::default(),
            ttft: latency_histogram(),
            itl: token_histogram(),
            tpot: token_histogram(),
            e2e: latency_histogram(),
            queue_time: latency_histogram(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_usage: Ratio::default(),
            kv_used: Family::default(),
            kv_capacity: Family::default(),
            requests_waiting: Gauge::default(),
            connections_open: Gauge::default(),
            connections_control_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_rejected: Family::default(),
            connection_timeouts: Family::default(),
            accept_errors: Counter::default(),
            engine_tokens_per_second: Ratio::default(),
            engine_generated: Counter::default(),
            engine_prefill: Counter::default(),
            engine_preemptions: Counter::default(),
            engine_iterations: Counter::default(),
            active_devices: Gauge::default(),
            max_devices: Gauge::default(),
            transition_running: Gauge::default(),
            scale_events: Family::default(),
            scale_bytes_moved: Counter::default(),
        };
        r.register(
            "http_requests",
            "HTTP responses by endpoint and status code",
            m.http_requests.clone(),
        );
        r.register(
            "requests_finished",
            "Generations finished, by finish reason",
            m.finished.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished generations",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated for finished generations",
            m.generation_tokens.clone(),
        );
        r.register(
            "client_disconnects",
            "Requests cancelled because the client went away",
            m.client_disconnects.clone(),
        );
        r.register(
            "ttft_seconds",
            "Time to first token, from submission to the engine",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between consecutive output tokens of a generation, one sample per token",
            m.itl.clone(),
        );
        r.register(
            "tpot_seconds",
            "Mean time per output token after the first, one sample per generation",
            m.tpot.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "Time from submission to the end of a generation",
            m.e2e.clone(),
        );
        r.register(
            "request_queue_time_seconds",
            "Time a generation waited before the engine first computed it",
            m.queue_time.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for admission to a rank",
            m.queue_depth.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences admitted on a rank",
            m.running.clone(),
        );
        r.register(
            "kv_usage_ratio",
            "Fraction of all KV blocks in use",
            m.kv_usage.clone(),
        );
        r.register(
            "kv_blocks_used",
            "KV blocks held by sequences, per rank",
            m.kv_used.clone(),
        );
        r.register(
            "kv_blocks_capacity",
            "KV blocks in each rank's pool",
            m.kv_capacity.clone(),
        );
        r.register(
            "requests_waiting",
            "Generations accepted that wait for their first token (at most --max-queue)",
            m.requests_waiting.clone(),
        );
        r.register(
            "connections_open",
            "Client connections open, control slots included",
            m.connections_open.clone(),
        );
        r.register(
            "connections_control_open",
            "Control slots in use (connections past the caps)",
            m.connections_control_open.clone(),
        );
        r.register(
            "connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_rejected",
            "Connections refused at a connection cap, by cap",
            m.connections_rejected.clone(),
        );
        r.register(
            "connection_timeouts",
            "Connections ended by a timeout, by kind (header and body answer 408)",
            m.connection_timeouts.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accept calls (for example out of descriptors)",
            m.accept_errors.clone(),
        );
        r.register(
            "engine_tokens_per_second",
            "Generated tokens per second over recent iterations",
            m.engine_tokens_per_second.clone(),
        );
        r.register(
            "engine_generated_tokens",
            "Tokens the engine generated",
            m.engine_generated.clone(),
        );
        r.register(
            "engine_prefill_tokens",
            "Tokens computed in prefill, recompute included",
            m.engine_prefill.clone(),
        );
        r.register(
            "engine_preemptions",
            "Sequences preempted",
            m.engine_preemptions.clone(),
        );
        r.register(
            "engine_iterations",
            "Engine iterations",
            m.engine_iterations.clone(),
        );
        r.register(
            "active_devices",
            "Devices serving",
            m.active_devices.clone(),
        );
        r.register(
            "max_devices",
            "Devices this server may use",
            m.max_devices.clone(),
        );
        r.register(
            "scale_transition_running",
            "1 while a scaling transition runs",
            m.transition_running.clone(),
        );
        r.register(
            "scale_events",
            "Scaling transitions by kind, strategy and outcome",
            m.scale_events.clone(),
        );
        r.register(
            "scale_bytes_moved",
            "Bytes moved between devices by scaling transitions",
            m.scale_bytes_moved.clone(),
        );
        ServerMetrics { registry: r, ..m }
    }

    /// Counts one HTTP response.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_string()),
                ("code", status.to_string()),
            ])
            .inc();
    }

    /// Records a finished generation: its counts, and its latencies (TTFT, every gap between
    /// tokens, the mean gap, end to end, time in the queue).
    pub fn finished(&self, f: &Finished<'_>) {
        self.finished
            .get_or_create(&vec![("reason", f.reason.to_string())])
            .inc();
        self.prompt_tokens.inc_by(f.prompt_tokens as u64);
        self.generation_tokens.inc_by(f.completion_tokens as u64);
        let t = f.timings;
        if let Some(d) = t.ttft {
            self.ttft.observe(d.as_secs_f64());
        }
        for w in t.token_times.windows(2) {
            self.itl.observe(w[1].saturating_sub(w[0]).as_secs_f64());
        }
        if let Some(d) = t.tpot() {
            self.tpot.observe(d.as_secs_f64());
        }
        self.e2e.observe(t.total.as_secs_f64());
        if let Some(d) = t.admitted {
            self.queue_time.observe(d.as_secs_f64());
        }
    }

    /// Counts a client that went away before its request finished.
    pub fn disconnect(&self) {
        self.client_disconnects.inc();
    }

    /// The exposition, with the scrape-time figures read from `engine`, `scale` and `conns`.
    pub fn render(
        &self,
        engine: &EngineMetrics,
        scale: &ScaleStatus,
        conns: &ConnectionCounts,
        waiting: usize,
    ) -> String {
        self.queue_depth.set(g(engine.queue_depth));
        self.running.set(g(engine.running));
        self.kv_usage.set(engine.kv_utilisation());
        for r in &engine.kv {
            let rank = vec![("rank", r.rank.0.to_string())];
            self.kv_used.get_or_create(&rank).set(g(r.used_blocks));
            self.kv_capacity.get_or_create(&rank).set(g(r.total_blocks));
        }
        self.requests_waiting.set(g(waiting));
        self.connections_open.set(g(conns.open));
        self.connections_control_open.set(g(conns.control_open));
        mirror(&self.connections_accepted, conns.accepted);
        for (reason, n) in [
            ("per_client", conns.rejected_per_client),
            ("total", conns.rejected_total),
        ] {
            mirror(
                &self
                    .connections_rejected
                    .get_or_create(&vec![("reason", reason.to_string())]),
                n,
            );
        }
        for (kind, n) in [
            ("header", conns.header_timeouts),
            ("body", conns.body_timeouts),
            ("idle", conns.idle_closed),
            ("write", conns.write_timeouts),
        ] {
            mirror(
                &self
                    .connection_timeouts
                    .get_or_create(&vec![("kind", kind.to_string())]),
                n,
            );
        }
        mirror(&self.accept_errors, conns.accept_errors);
        self.engine_tokens_per_second.set(engine.tokens_per_s);
        mirror(&self.engine_generated, engine.generated_tokens);
        mirror(&self.engine_prefill, engine.prefill_tokens);
        mirror(&self.engine_preemptions, engine.preemptions);
        mirror(&self.engine_iterations, engine.iterations);
        self.active_devices.set(g(scale.active_devices));
        self.max_devices.set(g(scale.max_devices));
        self.transition_running
            .set(i64::from(scale.transition_running));
        for e in &scale.events {
            let labels = vec![
                ("kind", e.kind.clone()),
                ("strategy", e.strategy.clone()),
                ("outcome", e.outcome.clone()),
            ];
            mirror(&self.scale_events.get_or_create(&labels), e.count);
        }
        mirror(&self.scale_bytes_moved, scale.bytes_moved);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_engine::{RankId, RankKv};
    use std::time::Duration;

    fn sample() -> String {
        let m = ServerMetrics::new("tiny-qwen3");
        m.request("completions", 200);
        let timings = RequestTimings {
            ttft: Some(Duration::from_millis(5)),
            admitted: Some(Duration::from_millis(1)),
            token_times: vec![
                Duration::from_millis(5),
                Duration::from_millis(15),
                Duration::from_millis(35),
            ],
            total: Duration::from_millis(40),
            preemptions: 0,
        };
        m.finished(&Finished {
            reason: "length",
            prompt_tokens: 3,
            completion_tokens: 3,
            timings: &timings,
        });
        let engine = EngineMetrics {
            kv: vec![RankKv {
                rank: RankId(0),
                used_blocks: 1,
                total_blocks: 8,
            }],
            generated_tokens: 3,
            ..EngineMetrics::default()
        };
        let scale = super::super::scale::NoScaling {
            devices: 1,
            max_devices: 1,
            reason: String::new(),
        };
        use super::super::scale::ScaleControl as _;
        m.render(&engine, &scale.status(), &ConnectionCounts::default(), 0)
    }

    /// Names follow Prometheus conventions (OpenMetrics: a counter's family is declared without
    /// `_total` and its samples carry it).
    #[test]
    fn names_follow_prometheus_conventions() {
        let text = sample();
        let mut types = std::collections::BTreeMap::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") {
                assert!(line.ends_with('.') && !line.ends_with(".."), "{line}");
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    name.starts_with("elasticmoe_")
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{name}"
                );
                assert!(!name.ends_with("_total"), "{kind} {name}");
                assert!(
                    matches!(kind, "counter" | "gauge" | "histogram"),
                    "unknown type {kind} of {name}"
                );
                types.insert(name.to_string(), kind.to_string());
            }
        }
        assert!(types.len() > 25, "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = types
                .iter()
                .filter(|(f, _)| name.starts_with(f.as_str()))
                .max_by_key(|(f, _)| f.len())
                .unwrap_or_else(|| panic!("{name} has no family"));
            match family.1.as_str() {
                "counter" => assert_eq!(name, format!("{}_total", family.0), "{line}"),
                "gauge" => assert_eq!(name, family.0, "{line}"),
                _ => assert!(
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| *name == format!("{}{s}", family.0)),
                    "{line}"
                ),
            }
            assert!(line.contains("model_name=\"tiny-qwen3\""), "{line}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// The exposition parses with a Prometheus text parser, with the values recorded.
    #[test]
    fn exposition_parses_with_a_prometheus_parser() {
        let text = sample();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let find = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        for s in &scrape.samples {
            assert_eq!(
                s.labels.get("model_name"),
                Some("tiny-qwen3"),
                "{}",
                s.metric
            );
        }
        let value = |name: &str| match find(name).value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        };
        assert_eq!(value("elasticmoe_prompt_tokens_total"), 3.0);
        assert_eq!(value("elasticmoe_engine_generated_tokens_total"), 3.0);
        assert_eq!(value("elasticmoe_kv_usage_ratio"), 1.0 / 8.0);
        assert!(matches!(
            find("elasticmoe_running_sequences").value,
            prometheus_parse::Value::Gauge(0.0)
        ));
        let hist = |name: &str| match &find(name).value {
            prometheus_parse::Value::Histogram(b) => b.clone(),
            other => panic!("{name}: {other:?}"),
        };
        // Two gaps between three tokens: 10 ms and 20 ms.
        let itl = hist("elasticmoe_inter_token_latency_seconds");
        let le = |b: &[prometheus_parse::HistogramCount], x: f64| {
            b.iter().find(|c| c.less_than == x).unwrap().count
        };
        assert_eq!(le(&itl, 0.01), 1.0);
        assert_eq!(le(&itl, 0.025), 2.0);
        assert_eq!(le(&itl, f64::INFINITY), 2.0);
        assert_eq!(le(&hist("elasticmoe_ttft_seconds"), 0.005), 1.0);
        assert_eq!(
            le(&hist("elasticmoe_e2e_request_latency_seconds"), 0.05),
            1.0
        );
        assert_eq!(
            le(&hist("elasticmoe_request_queue_time_seconds"), 0.001),
            1.0
        );
    }
}
