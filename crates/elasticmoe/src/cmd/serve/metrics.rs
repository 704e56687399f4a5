//! Server counters and the Prometheus text exposition of `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use moe_engine::EngineMetrics;

use super::connections::ConnectionCounts;
use super::scale::ScaleStatus;

/// Bucket upper bounds (seconds) for TTFT.
const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket upper bounds (seconds) for TPOT.
const TPOT_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value (seconds).
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    /// (endpoint, HTTP status) → requests.
    requests: BTreeMap<(&'static str, u16), u64>,
    /// finish reason → requests.
    finished: BTreeMap<&'static str, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    client_disconnects: u64,
    ttft: Histogram,
    tpot: Histogram,
}

/// What the HTTP layer counts.
#[derive(Debug)]
pub struct ServerMetrics {
    inner: Mutex<Inner>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                finished: BTreeMap::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                client_disconnects: 0,
                ttft: Histogram::new(&TTFT_BUCKETS),
                tpot: Histogram::new(&TPOT_BUCKETS),
            }),
        }
    }
}

impl ServerMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one HTTP response.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.lock().requests.entry((endpoint, status)).or_default() += 1;
    }

    /// Counts a finished generation.
    pub fn finished(
        &self,
        reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        ttft: Option<Duration>,
        tpot: Option<Duration>,
    ) {
        let mut m = self.lock();
        *m.finished.entry(reason).or_default() += 1;
        m.prompt_tokens += prompt_tokens as u64;
        m.completion_tokens += completion_tokens as u64;
        if let Some(t) = ttft {
            m.ttft.observe(t.as_secs_f64());
        }
        if let Some(t) = tpot {
            m.tpot.observe(t.as_secs_f64());
        }
    }

    /// Counts a client that went away before its request finished.
    pub fn disconnect(&self) {
        self.lock().client_disconnects += 1;
    }

    /// The Prometheus text exposition. Names follow Prometheus conventions: counters end in
    /// `_total`, gauges never do, units are base units (`_seconds`, `_bytes`, `_ratio`).
    pub fn render(
        &self,
        engine: &EngineMetrics,
        scale: &ScaleStatus,
        conns: &ConnectionCounts,
        waiting: usize,
    ) -> String {
        let m = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "elasticmoe_http_requests_total",
            "counter",
            "HTTP responses by endpoint and status code.",
        );
        for ((ep, code), n) in &m.requests {
            let _ = writeln!(
                out,
                "elasticmoe_http_requests_total{{endpoint=\"{ep}\",code=\"{code}\"}} {n}"
            );
        }
        head(
            &mut out,
            "elasticmoe_requests_finished_total",
            "counter",
            "Generations finished, by finish reason.",
        );
        for (reason, n) in &m.finished {
            let _ = writeln!(
                out,
                "elasticmoe_requests_finished_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        };
        scalar(
            &mut out,
            "elasticmoe_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished generations.",
            m.prompt_tokens.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_generation_tokens_total",
            "counter",
            "Tokens generated for finished generations.",
            m.completion_tokens.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_client_disconnects_total",
            "counter",
            "Requests cancelled because the client went away.",
            m.client_disconnects.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_queue_depth",
            "gauge",
            "Requests waiting for admission.",
            engine.queue_depth.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_running_sequences",
            "gauge",
            "Sequences admitted on a rank.",
            engine.running.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_kv_usage_ratio",
            "gauge",
            "Fraction of all KV blocks in use.",
            engine.kv_utilisation().to_string(),
        );
        head(
            &mut out,
            "elasticmoe_kv_blocks_used",
            "gauge",
            "KV blocks held by sequences, per rank.",
        );
        for r in &engine.kv {
            let _ = writeln!(
                out,
                "elasticmoe_kv_blocks_used{{rank=\"{}\"}} {}",
                r.rank.0, r.used_blocks
            );
        }
        head(
            &mut out,
            "elasticmoe_kv_blocks_capacity",
            "gauge",
            "KV blocks in each rank's pool.",
        );
        for r in &engine.kv {
            let _ = writeln!(
                out,
                "elasticmoe_kv_blocks_capacity{{rank=\"{}\"}} {}",
                r.rank.0, r.total_blocks
            );
        }
        scalar(
            &mut out,
            "elasticmoe_requests_waiting",
            "gauge",
            "Generations accepted that wait for their first token (at most --max-queue).",
            waiting.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_connections_open",
            "gauge",
            "Client connections open, control slots included.",
            conns.open.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_connections_control_open",
            "gauge",
            "Control slots in use (connections past the caps).",
            conns.control_open.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            conns.accepted.to_string(),
        );
        head(
            &mut out,
            "elasticmoe_connections_rejected_total",
            "counter",
            "Connections refused at a connection cap, by cap.",
        );
        for (reason, n) in [
            ("per_client", conns.rejected_per_client),
            ("total", conns.rejected_total),
        ] {
            let _ = writeln!(
                out,
                "elasticmoe_connections_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        head(
            &mut out,
            "elasticmoe_connection_timeouts_total",
            "counter",
            "Connections ended by a timeout, by kind (header and body answer 408).",
        );
        for (kind, n) in [
            ("header", conns.header_timeouts),
            ("body", conns.body_timeouts),
            ("idle", conns.idle_closed),
            ("write", conns.write_timeouts),
        ] {
            let _ = writeln!(
                out,
                "elasticmoe_connection_timeouts_total{{kind=\"{kind}\"}} {n}"
            );
        }
        scalar(
            &mut out,
            "elasticmoe_accept_errors_total",
            "counter",
            "Failed accept calls (for example out of descriptors).",
            conns.accept_errors.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_engine_tokens_per_second",
            "gauge",
            "Generated tokens per second over recent iterations.",
            engine.tokens_per_s.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_engine_generated_tokens_total",
            "counter",
            "Tokens the engine generated.",
            engine.generated_tokens.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_engine_prefill_tokens_total",
            "counter",
            "Tokens computed in prefill, recompute included.",
            engine.prefill_tokens.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_engine_preemptions_total",
            "counter",
            "Sequences preempted.",
            engine.preemptions.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_engine_iterations_total",
            "counter",
            "Engine iterations.",
            engine.iterations.to_string(),
        );
        m.ttft
            .render("elasticmoe_ttft_seconds", "Time to first token.", &mut out);
        m.tpot.render(
            "elasticmoe_tpot_seconds",
            "Mean time per output token after the first, per request.",
            &mut out,
        );
        scalar(
            &mut out,
            "elasticmoe_active_devices",
            "gauge",
            "Devices serving.",
            scale.active_devices.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_max_devices",
            "gauge",
            "Devices this server may use.",
            scale.max_devices.to_string(),
        );
        scalar(
            &mut out,
            "elasticmoe_scale_transition_running",
            "gauge",
            "1 while a scaling transition runs.",
            u8::from(scale.transition_running).to_string(),
        );
        head(
            &mut out,
            "elasticmoe_scale_events_total",
            "counter",
            "Scaling transitions by kind, strategy and outcome.",
        );
        for e in &scale.events {
            let _ = writeln!(
                out,
                "elasticmoe_scale_events_total{{kind=\"{}\",strategy=\"{}\",outcome=\"{}\"}} {}",
                label(&e.kind),
                label(&e.strategy),
                label(&e.outcome),
                e.count
            );
        }
        scalar(
            &mut out,
            "elasticmoe_scale_bytes_moved_total",
            "counter",
            "Bytes moved between devices by scaling transitions.",
            scale.bytes_moved.to_string(),
        );
        out
    }
}

/// Escapes a label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 4.25\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        use moe_engine::{RankId, RankKv};
        let m = ServerMetrics::default();
        m.request("completions", 200);
        m.finished("length", 3, 4, Some(Duration::from_millis(5)), None);
        let engine = EngineMetrics {
            kv: vec![RankKv {
                rank: RankId(0),
                used_blocks: 1,
                total_blocks: 8,
            }],
            ..EngineMetrics::default()
        };
        let scale = super::super::scale::NoScaling {
            devices: 1,
            max_devices: 1,
            reason: String::new(),
        };
        use super::super::scale::ScaleControl as _;
        let text = m.render(&engine, &scale.status(), &ConnectionCounts::default(), 0);
        let mut types = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap();
            types += 1;
            assert!(
                name.starts_with("elasticmoe_")
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            match kind {
                "counter" => assert!(name.ends_with("_total"), "counter {name}"),
                "gauge" | "histogram" => assert!(!name.ends_with("_total"), "{kind} {name}"),
                other => panic!("unknown type {other} of {name}"),
            }
        }
        assert!(types > 20, "{text}");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
