//! Autoscaling policies: observations in, a device count out.
//!
//! A [`Policy`] sees plain observation structs (the engine feeds them; tests make them up) and,
//! when asked at a time `now`, decides whether to change the device count. [`SloPolicy`] is the
//! SLO-aware one:
//!
//! - **Attainment**: the fraction of requests finished in the sliding window whose TTFT *and*
//!   TPOT met their targets.
//! - **Scale up** by `step` when attainment stays under `attainment_target`, or the queue per
//!   device stays over `queue_per_device_high`, or utilisation stays over `utilisation_high`, for
//!   `sustain_up`.
//! - **Scale down** by `step` when utilisation stays under `utilisation_low` for `sustain_down`,
//!   with attainment met and the queue empty, and only if the utilisation projected onto the
//!   smaller set stays under `utilisation_high` (so the step down cannot trigger a step up).
//! - **Hysteresis**: between the two watermarks nothing happens, and a trigger must hold
//!   continuously for its sustain period; one dip resets it.
//! - **Cooldown**: after a decision, nothing for `cooldown`, and only observations made after
//!   the decision count (they are the ones that see the new device count).
//! - **Bounds**: never below `min_devices` nor above `max_devices`; a count outside them is
//!   brought back inside.
//! - While a transition runs it holds.
//!
//! Everything is a function of the observations and the injected times, so it is deterministic.

use crate::time::Time;
use std::collections::VecDeque;
use std::time::Duration;

/// One finished request.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct RequestObservation {
    /// When it finished.
    pub at: Time,
    /// Time to first token.
    pub ttft: Duration,
    /// Mean time per output token after the first.
    pub tpot: Duration,
}

/// The engine's load at one moment.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct LoadObservation {
    /// When.
    pub at: Time,
    /// Requests waiting for admission.
    pub queue_depth: usize,
    /// Sequences running.
    pub running: usize,
    /// Fraction of KV blocks in use, 0 to 1.
    pub kv_usage: f64,
    /// Tokens generated per second.
    pub tokens_per_s: f64,
}

/// Something the engine saw.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Observation {
    /// A request finished.
    RequestFinished(RequestObservation),
    /// A load sample.
    Load(LoadObservation),
}

/// What the policy is told about the deployment when it decides.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClusterView {
    /// Devices serving now (or once the running and queued transitions finish).
    pub devices: usize,
    /// Whether a transition is running.
    pub transition_running: bool,
}

/// Why a policy wants to scale.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum ScaleReason {
    /// SLO attainment stayed under target.
    SloAttainment {
        /// The attainment, 0 to 1.
        attainment: f64,
    },
    /// The queue per device stayed long.
    QueueGrowth {
        /// Waiting requests per device.
        per_device: f64,
    },
    /// Utilisation stayed high.
    HighUtilisation {
        /// Utilisation, 0 to 1.
        utilisation: f64,
    },
    /// Utilisation stayed low.
    LowUtilisation {
        /// Utilisation, 0 to 1.
        utilisation: f64,
    },
    /// The count was outside `[min_devices, max_devices]`.
    OutOfBounds,
}

/// A policy's answer.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Decision {
    /// Keep the device count.
    Hold,
    /// Change to `devices`.
    ScaleTo {
        /// The new count.
        devices: usize,
        /// Why.
        reason: ScaleReason,
    },
}

/// An autoscaler. Deterministic given its inputs; it never reads a clock.
pub trait Policy {
    /// Takes one observation.
    fn observe(&mut self, observation: Observation);
    /// Decides at `now`. Times earlier than a previous call are treated as that call's time.
    fn decide(&mut self, now: Time, view: ClusterView) -> Decision;
}

/// [`SloPolicy`]'s knobs. See the `policy` module's docs for how they act.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct SloPolicyConfig {
    /// TTFT target.
    pub ttft_target: Duration,
    /// TPOT target.
    pub tpot_target: Duration,
    /// Fraction of requests that must meet both targets (for example 0.9).
    pub attainment_target: f64,
    /// Sliding window over requests and load samples.
    pub window: Duration,
    /// Requests needed in the window before attainment counts.
    pub min_requests: usize,
    /// How long a trigger to scale up must hold.
    pub sustain_up: Duration,
    /// How long a trigger to scale down must hold.
    pub sustain_down: Duration,
    /// Quiet time after any decision.
    pub cooldown: Duration,
    /// Scale up when waiting requests per device exceed this.
    pub queue_per_device_high: f64,
    /// Sequences one device runs at full utilisation.
    pub sequences_per_device: usize,
    /// Scale down under this utilisation.
    pub utilisation_low: f64,
    /// Scale up over this utilisation.
    pub utilisation_high: f64,
    /// Fewest devices.
    pub min_devices: usize,
    /// Most devices.
    pub max_devices: usize,
    /// Devices added or removed per decision.
    pub step: usize,
}

impl SloPolicyConfig {
    /// Targets of `ttft` and `tpot`, between 1 and `max_devices` devices, with defaults for the
    /// rest: 90% attainment over a 10 s window, 2 s to scale up, 10 s to scale down, 15 s
    /// cooldown, utilisation band 30%–85%, 4 waiting requests per device, 16 sequences per
    /// device, steps of one device.
    pub fn new(ttft: Duration, tpot: Duration, max_devices: usize) -> SloPolicyConfig {
        SloPolicyConfig {
            ttft_target: ttft,
            tpot_target: tpot,
            attainment_target: 0.9,
            window: Duration::from_secs(10),
            min_requests: 10,
            sustain_up: Duration::from_secs(2),
            sustain_down: Duration::from_secs(10),
            cooldown: Duration::from_secs(15),
            queue_per_device_high: 4.0,
            sequences_per_device: 16,
            utilisation_low: 0.3,
            utilisation_high: 0.85,
            min_devices: 1,
            max_devices,
            step: 1,
        }
    }
}

/// A bad [`SloPolicyConfig`].
#[derive(Clone, PartialEq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyConfigError {
    /// `min_devices` is 0 or above `max_devices`.
    #[error("need 1 <= min_devices <= max_devices, got min {min} and max {max}")]
    Bounds {
        /// min_devices.
        min: usize,
        /// max_devices.
        max: usize,
    },
    /// The watermarks do not leave a band.
    #[error(
        "need 0 <= utilisation_low < utilisation_high <= 1 (a hysteresis band), got {low} and {high}"
    )]
    Watermarks {
        /// utilisation_low.
        low: f64,
        /// utilisation_high.
        high: f64,
    },
    /// A fraction outside (0, 1].
    #[error("attainment_target must be in (0, 1], got {0}")]
    AttainmentTarget(f64),
    /// A zero that would make the policy meaningless.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A threshold that is negative or not a number.
    #[error("queue_per_device_high must be a non-negative number, got {0}")]
    QueueThreshold(f64),
}

/// The SLO-aware autoscaler. See the `policy` module's docs.
#[derive(Clone, Debug)]
pub struct SloPolicy {
    config: SloPolicyConfig,
    requests: VecDeque<RequestObservation>,
    loads: VecDeque<LoadObservation>,
    last_now: Time,
    last_decision: Option<Time>,
    up_since: Option<Time>,
    down_since: Option<Time>,
}

/// What the window says at one moment.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Signals {
    attainment: Option<f64>,
    utilisation: Option<f64>,
    queue_per_device: Option<f64>,
}

impl SloPolicy {
    /// A policy with `config`.
    pub fn new(config: SloPolicyConfig) -> Result<SloPolicy, PolicyConfigError> {
        let c = &config;
        if c.min_devices == 0 || c.min_devices > c.max_devices {
            return Err(PolicyConfigError::Bounds {
                min: c.min_devices,
                max: c.max_devices,
            });
        }
        let band_ok = (0.0..=1.0).contains(&c.utilisation_low)
            && (0.0..=1.0).contains(&c.utilisation_high)
            && c.utilisation_low < c.utilisation_high;
        if !band_ok {
            return Err(PolicyConfigError::Watermarks {
                low: c.utilisation_low,
                high: c.utilisation_high,
            });
        }
        if !(c.attainment_target > 0.0 && c.attainment_target <= 1.0) {
            return Err(PolicyConfigError::AttainmentTarget(c.attainment_target));
        }
        if c.queue_per_device_high.is_nan() || c.queue_per_device_high < 0.0 {
            return Err(PolicyConfigError::QueueThreshold(c.queue_per_device_high));
        }
        for (name, zero) in [
            ("window", c.window.is_zero()),
            ("sequences_per_device", c.sequences_per_device == 0),
            ("step", c.step == 0),
            ("min_requests", c.min_requests == 0),
        ] {
            if zero {
                return Err(PolicyConfigError::Zero(name));
            }
        }
        Ok(SloPolicy {
            config,
            requests: VecDeque::new(),
            loads: VecDeque::new(),
            last_now: Time::ZERO,
            last_decision: None,
            up_since: None,
            down_since: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &SloPolicyConfig {
        &self.config
    }

    /// Attainment over the window ending at `now`, if enough requests finished in it.
    pub fn attainment(&self, now: Time) -> Option<f64> {
        self.signals(now, 1).attainment
    }

    fn window_start(&self, now: Time) -> Time {
        let start = now.before(self.config.window);
        self.last_decision.map_or(start, |d| start.max(d))
    }

    fn signals(&self, now: Time, devices: usize) -> Signals {
        let c = &self.config;
        let start = self.window_start(now);
        let in_window = |at: Time| at >= start && at <= now;
        let (mut met, mut total) = (0usize, 0usize);
        for r in self.requests.iter().filter(|r| in_window(r.at)) {
            total += 1;
            if r.ttft <= c.ttft_target && r.tpot <= c.tpot_target {
                met += 1;
            }
        }
        let attainment = (total >= c.min_requests).then(|| met as f64 / total as f64);
        let devices = devices.max(1) as f64;
        let loads: Vec<&LoadObservation> = self.loads.iter().filter(|l| in_window(l.at)).collect();
        let utilisation = (!loads.is_empty()).then(|| {
            let capacity = devices * c.sequences_per_device as f64;
            let sum: f64 = loads
                .iter()
                .map(|l| {
                    (l.running as f64 / capacity)
                        .max(l.kv_usage)
                        .clamp(0.0, 1.0)
                })
                .sum();
            sum / loads.len() as f64
        });
        let queue_per_device = loads
            .iter()
            .max_by_key(|l| l.at)
            .map(|l| l.queue_depth as f64 / devices);
        Signals {
            attainment,
            utilisation,
            queue_per_device,
        }
    }

    fn prune(&mut self, now: Time) {
        let start = now.before(self.config.window);
        self.requests.retain(|r| r.at >= start);
        self.loads.retain(|l| l.at >= start);
    }

    fn decided(&mut self, now: Time, devices: usize, reason: ScaleReason) -> Decision {
        self.last_decision = Some(now);
        self.up_since = None;
        self.down_since = None;
        Decision::ScaleTo { devices, reason }
    }
}

/// Holds `since` while `condition` holds; true once it has held for `sustain`.
fn sustained(since: &mut Option<Time>, condition: bool, now: Time, sustain: Duration) -> bool {
    if !condition {
        *since = None;
        return false;
    }
    let start = *since.get_or_insert(now);
    now.saturating_since(start) >= sustain
}

impl Policy for SloPolicy {
    fn observe(&mut self, observation: Observation) {
        match observation {
            Observation::RequestFinished(r) => self.requests.push_back(r),
            Observation::Load(l) => self.loads.push_back(l),
        }
    }

    fn decide(&mut self, now: Time, view: ClusterView) -> Decision {
        let now = now.max(self.last_now);
        self.last_now = now;
        self.prune(now);
        let c = self.config;
        let n = view.devices;
        if view.transition_running {
            self.up_since = None;
            self.down_since = None;
            return Decision::Hold;
        }
        if self
            .last_decision
            .is_some_and(|d| now.saturating_since(d) < c.cooldown)
        {
            return Decision::Hold;
        }
        if n < c.min_devices {
            return self.decided(now, c.min_devices, ScaleReason::OutOfBounds);
        }
        if n > c.max_devices {
            return self.decided(now, c.max_devices, ScaleReason::OutOfBounds);
        }
        let s = self.signals(now, n);
        let slo_missed = s.attainment.is_some_and(|a| a < c.attainment_target);
        let queue_long = s
            .queue_per_device
            .is_some_and(|q| q > c.queue_per_device_high);
        let busy = s.utilisation.is_some_and(|u| u > c.utilisation_high);
        let up_reason = if slo_missed {
            ScaleReason::SloAttainment {
                attainment: s.attainment.unwrap_or(0.0),
            }
        } else if queue_long {
            ScaleReason::QueueGrowth {
                per_device: s.queue_per_device.unwrap_or(0.0),
            }
        } else {
            ScaleReason::HighUtilisation {
                utilisation: s.utilisation.unwrap_or(0.0),
            }
        };
        let want_up = (slo_missed || queue_long || busy) && n < c.max_devices;
        if sustained(&mut self.up_since, want_up, now, c.sustain_up) {
            let to = (n + c.step).min(c.max_devices);
            return self.decided(now, to, up_reason);
        }

        let smaller = n.saturating_sub(c.step).max(c.min_devices);
        let want_down = !want_up
            && smaller < n
            && !(slo_missed || queue_long)
            && s.queue_per_device.is_some_and(|q| q == 0.0)
            && s.utilisation.is_some_and(|u| {
                u < c.utilisation_low && u * (n as f64) / (smaller as f64) < c.utilisation_high
            });
        if sustained(&mut self.down_since, want_down, now, c.sustain_down) {
            let utilisation = s.utilisation.unwrap_or(0.0);
            return self.decided(now, smaller, ScaleReason::LowUtilisation { utilisation });
        }
        Decision::Hold
    }
}
