//! What serving looked like around one transition, from engine-side timestamps only: the
//! engine's iterations (`moe_engine::IterationRecord`) and when each request arrived and was
//! admitted. Pure arithmetic over seconds since the run's start, so it is tested here on
//! made-up timelines.
//!
//! The windows, for a request at `t_req` whose switch served at `t_switch`:
//! - *before*: `[t_req - before_s, t_req)`;
//! - *during* (the transition window): from `t_req` to the end of the first iteration that
//!   ended after `t_switch` (that iteration carries whatever the switch held the loop for).

use serde::Serialize;

/// One iteration that computed something, in seconds since the run's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Iteration {
    /// When it ended.
    pub ended: f64,
    /// Tokens it generated.
    pub generated: usize,
}

/// One request of the load, in seconds since the run's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Arrival {
    /// When the load generator asked to submit it (before any intake gate).
    pub arrived: f64,
    /// When the engine first scheduled it on a rank.
    pub admitted: Option<f64>,
}

/// The transition as a user of the service sees it (fields of a step in scaling.json).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(super) struct Window {
    /// Generated tokens per second over the *before* window (engine-side, per iteration).
    pub throughput_before: f64,
    /// Generated tokens per second over the transition window (request → first iteration
    /// after the switch).
    pub throughput_during: f64,
    /// `throughput_during / throughput_before` (0 when nothing ran before).
    pub throughput_during_ratio: f64,
    /// The transition window's length.
    pub transition_window_ms: f64,
    /// Median gap between consecutive iteration ends before the request.
    pub gap_p50_before_ms: f64,
    /// 99th-percentile gap between consecutive iteration ends before the request.
    pub gap_p99_before_ms: f64,
    /// The longest gap between consecutive iteration ends in the transition window.
    pub max_gap_during_ms: f64,
    /// Σ over the transition window's gaps of (gap − `gap_p50_before_ms`): serving time lost
    /// against the pace before the request (negative: iterations ran faster).
    pub lost_serving_ms: f64,
    /// Gaps longer than this count as downtime: `stall_factor` × `gap_p50_before_ms`, and at
    /// least `gap_p99_before_ms` (so a gap as common before as after does not count).
    pub downtime_threshold_ms: f64,
    /// The sum of the transition window's gaps longer than `downtime_threshold_ms`.
    pub downtime_ms: f64,
    /// How many gaps that is.
    pub downtime_gaps: u64,
    /// Requests that arrived in the transition window.
    pub arrivals_during: u64,
    /// The longest wait from arrival to admission (first scheduled on a rank) of a request that
    /// arrived in the transition window; 0 when none arrived.
    pub intake_paused_ms: f64,
    /// The 99th-percentile wait from arrival to admission of requests that arrived before.
    pub admission_wait_p99_before_ms: f64,
}

/// `p` in `[0, 1]`, nearest rank; 0 for no values.
pub(super) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Measures the window around a transition requested at `t_req` that switched at `t_switch`
/// (`its` in any order; `before_s` long before-window; gaps above `stall_factor` × the median
/// gap before, and above the p99 gap before, are downtime).
pub(super) fn measure(
    its: &[Iteration],
    arrivals: &[Arrival],
    t_req: f64,
    t_switch: f64,
    before_s: f64,
    stall_factor: f64,
) -> Window {
    let mut its = its.to_vec();
    its.sort_by(|a, b| a.ended.total_cmp(&b.ended));
    let t0 = t_req - before_s;
    // Gaps end at iteration i and start at iteration i - 1.
    let gaps: Vec<(f64, f64)> = its
        .windows(2)
        .map(|w| (w[1].ended, (w[1].ended - w[0].ended) * 1e3))
        .collect();
    let mut before: Vec<f64> = its
        .windows(2)
        .filter(|w| w[0].ended >= t0 && w[1].ended < t_req)
        .map(|w| (w[1].ended - w[0].ended) * 1e3)
        .collect();
    let gap_p50 = percentile(&mut before, 0.5);
    let gap_p99 = percentile(&mut before, 0.99);
    let end = its
        .iter()
        .find(|i| i.ended > t_switch)
        .map_or(t_switch, |i| i.ended)
        .max(t_req);
    let in_window = |t: f64| t > t_req && t <= end;
    let during: Vec<f64> = gaps
        .iter()
        .filter(|(t, _)| in_window(*t))
        .map(|g| g.1)
        .collect();
    let rate = |a: f64, b: f64, inside: &dyn Fn(f64) -> bool| -> f64 {
        let n: usize = its
            .iter()
            .filter(|i| inside(i.ended))
            .map(|i| i.generated)
            .sum();
        if b > a {
            n as f64 / (b - a)
        } else {
            0.0
        }
    };
    let throughput_before = rate(t0, t_req, &|t| t >= t0 && t < t_req);
    let throughput_during = rate(t_req, end, &in_window);
    let threshold = (stall_factor * gap_p50).max(gap_p99);
    let stalls: Vec<f64> = during.iter().copied().filter(|&g| g > threshold).collect();
    // A request never admitted (it failed) counts as waiting until the window's end.
    let during_waits: Vec<f64> = arrivals
        .iter()
        .filter(|r| r.arrived >= t_req && r.arrived <= end)
        .map(|r| (r.admitted.unwrap_or(end) - r.arrived).max(0.0) * 1e3)
        .collect();
    let mut before_waits: Vec<f64> = arrivals
        .iter()
        .filter(|r| r.arrived >= t0 && r.arrived < t_req)
        .filter_map(|r| r.admitted.map(|t| (t - r.arrived) * 1e3))
        .collect();
    Window {
        throughput_before,
        throughput_during,
        throughput_during_ratio: if throughput_before > 0.0 {
            throughput_during / throughput_before
        } else {
            0.0
        },
        transition_window_ms: (end - t_req) * 1e3,
        gap_p50_before_ms: gap_p50,
        gap_p99_before_ms: gap_p99,
        max_gap_during_ms: during.iter().copied().fold(0.0, f64::max),
        lost_serving_ms: during.iter().map(|g| g - gap_p50).sum(),
        downtime_threshold_ms: threshold,
        // A fold from +0.0: an empty `Sum` of f64 is -0.0, which would print as "-0.0 ms".
        downtime_ms: stalls.iter().fold(0.0, |a, b| a + b),
        downtime_gaps: stalls.len() as u64,
        arrivals_during: during_waits.len() as u64,
        intake_paused_ms: during_waits.iter().copied().fold(0.0, f64::max),
        admission_wait_p99_before_ms: percentile(&mut before_waits, 0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Iterations every `dt` seconds from `from` to `to`, each generating `g` tokens.
    fn steady(from: f64, to: f64, dt: f64, g: usize) -> Vec<Iteration> {
        let n = ((to - from) / dt).round() as usize;
        (0..=n)
            .map(|i| Iteration {
                ended: from + i as f64 * dt,
                generated: g,
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_steady_loop_loses_nothing_and_has_no_downtime() {
        // 10 ms iterations of 8 tokens from 0 to 3 s; request at 2 s, switch at 2.2 s.
        let its = steady(0.0, 3.0, 0.010, 8);
        let w = measure(&its, &[], 2.0, 2.2, 1.0, 5.0);
        assert!(close(w.gap_p50_before_ms, 10.0), "{w:?}");
        assert!(close(w.max_gap_during_ms, 10.0), "{w:?}");
        assert!(w.lost_serving_ms.abs() < 1e-6, "{w:?}");
        assert_eq!((w.downtime_ms, w.downtime_gaps), (0.0, 0));
        assert!(
            w.downtime_ms.is_sign_positive(),
            "reported as 0.0, not -0.0"
        );
        assert!(close(w.downtime_threshold_ms, 50.0));
        assert!((w.throughput_before - 800.0).abs() < 10.0, "{w:?}");
        assert!((w.throughput_during_ratio - 1.0).abs() < 0.06, "{w:?}");
        // The window runs to the first iteration after the switch.
        assert!(close(w.transition_window_ms, 210.0), "{w:?}");
    }

    #[test]
    fn a_held_loop_shows_as_downtime_lost_time_and_a_dip() {
        // Iterations stop from 2.05 s to 2.55 s (a 500 ms hold) and the switch serves at 2.5 s.
        let mut its = steady(0.0, 2.05, 0.010, 8);
        its.extend(steady(2.55, 3.0, 0.010, 8));
        let w = measure(&its, &[], 2.0, 2.5, 1.0, 5.0);
        assert!(close(w.max_gap_during_ms, 500.0), "{w:?}");
        assert!(close(w.downtime_ms, 500.0), "{w:?}");
        assert_eq!(w.downtime_gaps, 1);
        // One 500 ms gap where a 10 ms one was expected.
        assert!(close(w.lost_serving_ms, 490.0), "{w:?}");
        assert!(close(w.transition_window_ms, 550.0), "{w:?}");
        assert!(w.throughput_during_ratio < 0.2, "{w:?}");
    }

    #[test]
    fn intake_pause_is_the_longest_admission_wait_of_arrivals_in_the_window() {
        let its = steady(0.0, 3.0, 0.010, 8);
        let arrivals = [
            // Before: admitted within 2 ms.
            Arrival {
                arrived: 1.5,
                admitted: Some(1.502),
            },
            // During: one waits 300 ms, one is never admitted (counts to the window's end).
            Arrival {
                arrived: 2.1,
                admitted: Some(2.4),
            },
            Arrival {
                arrived: 2.3,
                admitted: None,
            },
            // After the window: not counted.
            Arrival {
                arrived: 2.9,
                admitted: Some(5.0),
            },
        ];
        let w = measure(&its, &arrivals, 2.0, 2.4, 1.0, 5.0);
        assert_eq!(w.arrivals_during, 2);
        assert!(close(w.intake_paused_ms, 300.0), "{w:?}");
        assert!(close(w.admission_wait_p99_before_ms, 2.0), "{w:?}");
        let only_first = measure(&its, &arrivals[..2], 2.0, 2.4, 1.0, 5.0);
        assert!(close(only_first.intake_paused_ms, 300.0), "{only_first:?}");
    }

    #[test]
    fn the_downtime_threshold_is_at_least_the_p99_gap_before() {
        // Every tenth gap before is 100 ms (a noisy machine): a 100 ms gap during is no stall.
        let mut its = Vec::new();
        let mut t = 0.0;
        for i in 0..300 {
            t += if i % 10 == 9 { 0.100 } else { 0.010 };
            its.push(Iteration {
                ended: t,
                generated: 1,
            });
        }
        let t_req = t - 0.005;
        let w = measure(&its, &[], t_req, t_req, 1.0, 5.0);
        assert!(close(w.gap_p50_before_ms, 10.0), "{w:?}");
        assert!(close(w.gap_p99_before_ms, 100.0), "{w:?}");
        assert!(close(w.downtime_threshold_ms, 100.0), "{w:?}");
        assert_eq!(w.downtime_gaps, 0, "{w:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank_and_zero_when_empty() {
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.99), 3.0);
    }
}
