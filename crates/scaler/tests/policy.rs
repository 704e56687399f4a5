//! `SloPolicy` on traces with injected time: a step, a ramp and a burst drive a small queueing
//! model of a deployment; the policy's decisions change the device count (after a transition
//! that takes 500 ms).

use scaler::{
    ClusterView, Decision, LoadObservation, Observation, Policy, PolicyConfigError,
    RequestObservation, ScaleReason, SloPolicy, SloPolicyConfig, Time,
};
use std::time::Duration;

/// Requests per second one device serves.
const MU: f64 = 10.0;
const TICK_MS: u64 = 100;
const TRANSITION_MS: u64 = 500;

fn config() -> SloPolicyConfig {
    SloPolicyConfig {
        window: Duration::from_secs(5),
        min_requests: 10,
        sustain_up: Duration::from_secs(2),
        sustain_down: Duration::from_secs(5),
        cooldown: Duration::from_secs(8),
        sequences_per_device: 10,
        ..SloPolicyConfig::new(Duration::from_millis(500), Duration::from_millis(50), 4)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Change {
    at_ms: u64,
    from: usize,
    to: usize,
    reason: ScaleReason,
}

/// A deployment of `n` devices, each serving `MU` requests/s, with a FIFO queue.
struct Sim {
    policy: SloPolicy,
    n: usize,
    queue: f64,
    carry: f64,
    t_ms: u64,
    pending: Option<(u64, usize)>,
    changes: Vec<Change>,
    devices_over_time: Vec<usize>,
}

impl Sim {
    fn new(config: SloPolicyConfig, n: usize) -> Sim {
        Sim {
            policy: SloPolicy::new(config).unwrap(),
            n,
            queue: 0.0,
            carry: 0.0,
            t_ms: 0,
            pending: None,
            changes: Vec::new(),
            devices_over_time: Vec::new(),
        }
    }

    fn tick(&mut self, lambda: f64) {
        let dt = TICK_MS as f64 / 1e3;
        let now = Time::from_millis(self.t_ms);
        if let Some((done, k)) = self.pending {
            if self.t_ms >= done {
                self.n = k;
                self.pending = None;
            }
        }
        let cap = self.n as f64 * MU;
        self.queue += lambda * dt;
        let served = self.queue.min(cap * dt);
        self.queue -= served;
        let rho = lambda / cap;
        self.carry += served;
        while self.carry >= 1.0 {
            self.carry -= 1.0;
            let wait = self.queue / cap;
            let ttft = if rho < 0.8 {
                0.15
            } else if rho < 1.0 {
                0.35
            } else {
                0.35 + wait
            };
            let tpot = 0.02 * (1.0 + rho.min(3.0));
            self.policy
                .observe(Observation::RequestFinished(RequestObservation {
                    at: now,
                    ttft: Duration::from_secs_f64(ttft),
                    tpot: Duration::from_secs_f64(tpot),
                }));
        }
        let running = (served / dt).min(cap);
        self.policy.observe(Observation::Load(LoadObservation {
            at: now,
            queue_depth: self.queue as usize,
            running: running as usize,
            kv_usage: 0.8 * running / cap,
            tokens_per_s: running * 50.0,
        }));
        let view = ClusterView {
            devices: self.n,
            transition_running: self.pending.is_some(),
        };
        if let Decision::ScaleTo { devices, reason } = self.policy.decide(now, view) {
            assert!(self.pending.is_none(), "decided while a transition ran");
            self.changes.push(Change {
                at_ms: self.t_ms,
                from: self.n,
                to: devices,
                reason,
            });
            self.pending = Some((self.t_ms + TRANSITION_MS, devices));
        }
        self.devices_over_time.push(self.n);
        self.t_ms += TICK_MS;
    }

    /// Runs `secs` seconds of load `lambda(t_ms)`.
    fn run(&mut self, secs: u64, lambda: impl Fn(u64) -> f64) {
        for _ in 0..secs * 1000 / TICK_MS {
            let l = lambda(self.t_ms);
            self.tick(l);
        }
    }

    fn ups(&self) -> Vec<&Change> {
        self.changes.iter().filter(|c| c.to > c.from).collect()
    }

    fn downs(&self) -> Vec<&Change> {
        self.changes.iter().filter(|c| c.to < c.from).collect()
    }

    /// No two decisions closer than the cooldown, and never a direction change inside it.
    fn assert_no_flapping(&self, cooldown_ms: u64) {
        for w in self.changes.windows(2) {
            assert!(
                w[1].at_ms - w[0].at_ms >= cooldown_ms,
                "decisions too close: {w:?}"
            );
        }
    }
}

#[test]
fn step_scales_up_after_the_sustain_period_then_down_after_cooldown() {
    let mut sim = Sim::new(config(), 2);
    sim.run(20, |_| 15.0); // 75% of 2 devices: inside the band
    assert!(sim.changes.is_empty(), "{:?}", sim.changes);
    sim.run(60, |_| 35.0); // needs 4 devices
    let ups = sim.ups();
    assert!(!ups.is_empty());
    let first = ups[0];
    assert!(
        first.at_ms >= 20_000 + 2_000,
        "waited for the sustain period: {first:?}"
    );
    assert!(
        first.at_ms < 20_000 + 6_000,
        "but not much longer: {first:?}"
    );
    assert_eq!(sim.n, 4, "{:?}", sim.changes);
    assert!(
        sim.downs().is_empty(),
        "no step down under load: {:?}",
        sim.changes
    );
    sim.run(120, |_| 5.0); // 12.5% of 4 devices
    assert_eq!(sim.n, 1, "{:?}", sim.changes);
    let first_down = sim.downs()[0];
    let last_up = sim.ups().last().copied().unwrap();
    assert!(
        first_down.at_ms >= 80_000 + 5_000,
        "sustained low utilisation first: {first_down:?}"
    );
    assert!(first_down.at_ms - last_up.at_ms >= 8_000);
    assert!(matches!(
        first_down.reason,
        ScaleReason::LowUtilisation { .. }
    ));
    sim.assert_no_flapping(8_000);
    assert!(sim.devices_over_time.iter().all(|&n| (1..=4).contains(&n)));
}

#[test]
fn ramp_scales_up_monotonically_and_stops_at_max() {
    let mut sim = Sim::new(config(), 1);
    // 4 → 60 requests/s over 120 s; 4 devices can serve only 40.
    sim.run(120, |t| 4.0 + 56.0 * t as f64 / 120_000.0);
    assert!(
        sim.downs().is_empty(),
        "no step down on a rising ramp: {:?}",
        sim.changes
    );
    assert_eq!(sim.n, 4);
    assert_eq!(sim.ups().len(), 3, "{:?}", sim.changes);
    assert!(sim.devices_over_time.windows(2).all(|w| w[0] <= w[1]));
    assert!(
        sim.devices_over_time.iter().all(|&n| n <= 4),
        "never above max"
    );
    sim.assert_no_flapping(8_000);
}

#[test]
fn burst_scales_up_then_back_down_after_cooldown() {
    let mut sim = Sim::new(config(), 2);
    sim.run(10, |_| 8.0);
    sim.run(15, |_| 45.0); // a 15 s burst
    sim.run(90, |_| 8.0);
    let ups = sim.ups();
    let downs = sim.downs();
    assert!(!ups.is_empty() && !downs.is_empty(), "{:?}", sim.changes);
    assert!(
        ups.iter().all(|u| u.at_ms < 25_000 + 8_000),
        "ups belong to the burst: {:?}",
        sim.changes
    );
    assert!(
        downs.iter().all(|d| d.at_ms > 25_000),
        "downs come after it: {:?}",
        sim.changes
    );
    assert!(
        downs[0].at_ms - ups.last().unwrap().at_ms >= 8_000,
        "cooldown respected"
    );
    // 8 requests/s is 20% of 4 devices and 27% of 3 (under the 30% watermark) but 40% of 2:
    // inside the band, so it settles at 2, not 1.
    assert_eq!(sim.n, 2, "{:?}", sim.changes);
    sim.assert_no_flapping(8_000);
}

#[test]
fn load_inside_the_hysteresis_band_never_changes_anything() {
    let mut sim = Sim::new(config(), 2);
    // Between 40% and 80% of 2 devices, switching every 0.5 s.
    sim.run(300, |t| if (t / 500) % 2 == 0 { 8.0 } else { 16.0 });
    assert!(sim.changes.is_empty(), "{:?}", sim.changes);
}

#[test]
fn a_trigger_shorter_than_the_sustain_period_does_nothing() {
    let mut p = SloPolicy::new(config()).unwrap();
    let view = ClusterView {
        devices: 2,
        transition_running: false,
    };
    let mut t = 0;
    // Long queues in alternate seconds: the trigger never holds for 2 s in a row.
    for i in 0..60u64 {
        let queue_depth = if i % 2 == 0 { 40 } else { 0 };
        for _ in 0..10 {
            p.observe(Observation::Load(LoadObservation {
                at: Time::from_millis(t),
                queue_depth,
                running: 10,
                kv_usage: 0.5,
                tokens_per_s: 100.0,
            }));
            assert_eq!(
                p.decide(Time::from_millis(t), view),
                Decision::Hold,
                "at {t} ms"
            );
            t += 100;
        }
    }
    // The same queue held for 2 s does scale up, citing the queue.
    for _ in 0..21 {
        p.observe(Observation::Load(LoadObservation {
            at: Time::from_millis(t),
            queue_depth: 40,
            running: 10,
            kv_usage: 0.5,
            tokens_per_s: 100.0,
        }));
        if let Decision::ScaleTo { devices, reason } = p.decide(Time::from_millis(t), view) {
            assert_eq!(devices, 3);
            assert_eq!(reason, ScaleReason::QueueGrowth { per_device: 20.0 });
            return;
        }
        t += 100;
    }
    panic!("a sustained queue never scaled up");
}

#[test]
fn bounds_are_respected_and_a_running_transition_holds() {
    let mut p = SloPolicy::new(config()).unwrap();
    let at = |ms| Time::from_millis(ms);
    // Miss every SLO, at max: hold.
    for i in 0..100u64 {
        p.observe(Observation::RequestFinished(RequestObservation {
            at: at(i * 100),
            ttft: Duration::from_secs(3),
            tpot: Duration::from_millis(10),
        }));
        let d = p.decide(
            at(i * 100),
            ClusterView {
                devices: 4,
                transition_running: false,
            },
        );
        assert_eq!(d, Decision::Hold);
    }
    assert_eq!(p.attainment(at(9_900)), Some(0.0));
    // While a transition runs: hold, whatever the signals.
    let d = p.decide(
        at(10_000),
        ClusterView {
            devices: 2,
            transition_running: true,
        },
    );
    assert_eq!(d, Decision::Hold);
    // Outside the bounds: brought back, once per cooldown.
    let d = p.decide(
        at(10_100),
        ClusterView {
            devices: 6,
            transition_running: false,
        },
    );
    assert_eq!(
        d,
        Decision::ScaleTo {
            devices: 4,
            reason: ScaleReason::OutOfBounds
        }
    );
    let mut low = SloPolicy::new(SloPolicyConfig {
        min_devices: 2,
        ..config()
    })
    .unwrap();
    let d = low.decide(
        at(0),
        ClusterView {
            devices: 1,
            transition_running: false,
        },
    );
    assert_eq!(
        d,
        Decision::ScaleTo {
            devices: 2,
            reason: ScaleReason::OutOfBounds
        }
    );
    assert_eq!(
        low.decide(
            at(100),
            ClusterView {
                devices: 1,
                transition_running: false
            }
        ),
        Decision::Hold
    );
}

#[test]
fn slo_misses_scale_up_and_cite_attainment() {
    let mut p = SloPolicy::new(config()).unwrap();
    let view = ClusterView {
        devices: 2,
        transition_running: false,
    };
    let mut decision = Decision::Hold;
    for i in 0..40u64 {
        let at = Time::from_millis(i * 100);
        // 8 of 10 meet the targets: 80% attainment, under the 90% target.
        for j in 0..10 {
            let ttft = if j < 8 { 100 } else { 900 };
            p.observe(Observation::RequestFinished(RequestObservation {
                at,
                ttft: Duration::from_millis(ttft),
                tpot: Duration::from_millis(20),
            }));
        }
        decision = p.decide(at, view);
        if decision != Decision::Hold {
            assert_eq!(i, 20, "after exactly the 2 s sustain period");
            break;
        }
    }
    match decision {
        Decision::ScaleTo {
            devices: 3,
            reason: ScaleReason::SloAttainment { attainment },
        } => {
            assert!((attainment - 0.8).abs() < 1e-9)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn decisions_are_deterministic() {
    let trace = |t: u64| {
        if t < 30_000 {
            10.0
        } else if t < 60_000 {
            38.0
        } else {
            6.0
        }
    };
    let mut a = Sim::new(config(), 2);
    let mut b = Sim::new(config(), 2);
    a.run(150, trace);
    b.run(150, trace);
    assert!(!a.changes.is_empty());
    assert_eq!(a.changes, b.changes);
}

#[test]
fn bad_configs_are_refused() {
    let c = config();
    let cases = [
        (
            SloPolicyConfig {
                min_devices: 0,
                ..c
            },
            PolicyConfigError::Bounds { min: 0, max: 4 },
        ),
        (
            SloPolicyConfig {
                min_devices: 5,
                ..c
            },
            PolicyConfigError::Bounds { min: 5, max: 4 },
        ),
        (
            SloPolicyConfig {
                utilisation_low: 0.9,
                ..c
            },
            PolicyConfigError::Watermarks {
                low: 0.9,
                high: 0.85,
            },
        ),
        (
            SloPolicyConfig {
                attainment_target: 0.0,
                ..c
            },
            PolicyConfigError::AttainmentTarget(0.0),
        ),
        (
            SloPolicyConfig { step: 0, ..c },
            PolicyConfigError::Zero("step"),
        ),
        (
            SloPolicyConfig {
                window: Duration::ZERO,
                ..c
            },
            PolicyConfigError::Zero("window"),
        ),
        (
            SloPolicyConfig {
                queue_per_device_high: -1.0,
                ..c
            },
            PolicyConfigError::QueueThreshold(-1.0),
        ),
    ];
    for (cfg, expected) in cases {
        let err = SloPolicy::new(cfg).unwrap_err();
        assert_eq!(err, expected);
        assert!(!err.to_string().is_empty());
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the load, decisions stay within the bounds, are at least a cooldown apart,
        /// move by one step, and never come while a transition runs.
        #[test]
        fn decisions_respect_bounds_cooldown_and_step(
            start in 1usize..=4,
            min in 1usize..=2,
            segments in proptest::collection::vec((0.0f64..60.0, 1u64..20), 1..8),
        ) {
            let cfg = SloPolicyConfig { min_devices: min, ..config() };
            let mut sim = Sim::new(cfg, start.max(min));
            for (lambda, secs) in segments {
                sim.run(secs, |_| lambda);
            }
            sim.assert_no_flapping(8_000);
            for c in &sim.changes {
                prop_assert!((min..=4).contains(&c.to), "{:?}", c);
                prop_assert_eq!(c.to.abs_diff(c.from), 1, "{:?}", c);
            }
            prop_assert!(sim.devices_over_time.iter().all(|&n| (min..=4).contains(&n)));
        }
    }
}
