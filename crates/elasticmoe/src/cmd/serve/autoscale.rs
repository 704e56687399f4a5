//! `--autoscale`: the SLO policy ([`scaler::SloPolicy`]) driving the [`ScaleControl`] seam.
//!
//! Every `interval` the server's autoscale task takes a load sample from the engine's metrics
//! (queue depth, running sequences, KV usage, tokens/s), hands it and the TTFT/TPOT of every
//! request that finished since the last tick to the policy, and asks it to decide, telling it the
//! device count the deployment is heading to and whether a transition is in progress. A
//! [`Decision::ScaleTo`] becomes `{"devices": N}` through the same seam the admin endpoint uses.
//! The policy itself (watermarks, sustain, cooldown, bounds) is the scaler's; this module only
//! feeds it and records what it decided.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use moe_engine::EngineMetrics;
use scaler::{
    ClusterView, Decision, LoadObservation, Observation, Policy, PolicyConfigError,
    RequestObservation, ScaleCommand, SloPolicy, SloPolicyConfig, Time,
};
use serde_json::{json, Value};

use super::scale::ScaleControl;

/// How the autoscaler runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoscaleConfig {
    /// Time between decisions.
    pub interval: Duration,
    /// The policy's knobs (its `max_devices` is capped at the server's devices).
    pub policy: SloPolicyConfig,
}

#[derive(Debug)]
struct Inner {
    policy: SloPolicy,
    finished: Vec<RequestObservation>,
    decisions: u64,
    refused: u64,
    last: Value,
}

/// The policy and what it has been fed; shared by the request handlers (finished requests) and
/// the autoscale task (ticks).
#[derive(Debug)]
pub struct Autoscaler {
    interval: Duration,
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl Autoscaler {
    /// An autoscaler with `config`, for a server of `max_devices` devices.
    pub fn new(
        config: AutoscaleConfig,
        max_devices: usize,
    ) -> Result<Autoscaler, PolicyConfigError> {
        let mut policy = config.policy;
        policy.max_devices = policy.max_devices.min(max_devices);
        if config.interval.is_zero() {
            return Err(PolicyConfigError::Zero("autoscale interval"));
        }
        Ok(Autoscaler {
            interval: config.interval,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                policy: SloPolicy::new(policy)?,
                finished: Vec::new(),
                decisions: 0,
                refused: 0,
                last: Value::Null,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> Time {
        Time::from_duration(self.epoch.elapsed())
    }

    /// Time between ticks.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records a finished request (requests without a first token or a second one are skipped:
    /// they have no TTFT or TPOT to judge).
    pub fn finished(&self, ttft: Option<Duration>, tpot: Option<Duration>) {
        let (Some(ttft), Some(tpot)) = (ttft, tpot) else {
            return;
        };
        let at = self.now();
        self.lock()
            .finished
            .push(RequestObservation { at, ttft, tpot });
    }

    /// One tick: feed the policy, decide, and carry out a decision through `scale`. Returns the
    /// device count asked for, if the policy decided to scale and the scaler accepted it.
    pub fn tick(&self, engine: &EngineMetrics, scale: &dyn ScaleControl) -> Option<usize> {
        let status = scale.status();
        let now = self.now();
        let mut g = self.lock();
        for r in std::mem::take(&mut g.finished) {
            g.policy.observe(Observation::RequestFinished(r));
        }
        g.policy.observe(Observation::Load(LoadObservation {
            at: now,
            queue_depth: engine.queue_depth,
            running: engine.running,
            kv_usage: engine.kv_utilisation(),
            tokens_per_s: engine.tokens_per_s,
        }));
        let view = ClusterView {
            devices: status.target_devices,
            transition_running: status.transition_running,
        };
        let Decision::ScaleTo { devices, reason } = g.policy.decide(now, view) else {
            return None;
        };
        g.decisions += 1;
        let result = scale.scale(ScaleCommand::Devices(devices));
        let outcome = match &result {
            Ok(_) => "accepted".to_string(),
            Err(e) => {
                g.refused += 1;
                format!("refused: {e}")
            }
        };
        eprintln!(
            "serve: autoscale: {} -> {devices} devices ({reason:?}): {outcome}",
            status.target_devices
        );
        g.last = json!({
            "at_s": now.since_epoch().as_secs_f64(),
            "from": status.target_devices,
            "to": devices,
            "reason": format!("{reason:?}"),
            "outcome": outcome,
        });
        result.ok().map(|_| devices)
    }

    /// What the autoscaler did, for `/admin/status`.
    pub fn status(&self) -> Value {
        let g = self.lock();
        let c = g.policy.config();
        json!({
            "enabled": true,
            "interval_ms": self.interval.as_millis() as u64,
            "min_devices": c.min_devices,
            "max_devices": c.max_devices,
            "ttft_target_ms": c.ttft_target.as_millis() as u64,
            "tpot_target_ms": c.tpot_target.as_millis() as u64,
            "decisions": g.decisions,
            "refused": g.refused,
            "last": g.last,
        })
    }
}
