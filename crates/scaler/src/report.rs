//! What a transition reports: phase timestamps from the injected clock, bytes and sequences.

use crate::action::Step;
use crate::device::{DeviceId, DeviceSet};
use crate::strategy::{Strategy, TransitionKind};
use crate::time::{millis, Time};
use serde::Serialize;
use std::collections::BTreeMap;

/// Where a transition is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the plan.
    Plan,
    /// Preparing the next deployment beside the running one.
    Prepare,
    /// The switch is requested for the next iteration boundary.
    Switch,
    /// Switched; waiting for the old deployment's last iteration.
    Retire,
    /// Done: the next deployment serves, the old one is released.
    Retired,
    /// Rolled back: the old deployment serves, everything acquired was released.
    Aborted,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 6] = [
        Phase::Plan,
        Phase::Prepare,
        Phase::Switch,
        Phase::Retire,
        Phase::Retired,
        Phase::Aborted,
    ];

    /// Whether the transition has finished.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Retired | Phase::Aborted)
    }

    /// Whether the transition may still be aborted and rolled back.
    pub fn is_before_switch(self) -> bool {
        matches!(self, Phase::Plan | Phase::Prepare)
    }
}

/// Why a transition was rolled back.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum AbortReason {
    /// [`Event::AbortRequested`](crate::Event::AbortRequested).
    Requested,
    /// The plan could not be computed.
    PlanFailed {
        /// The executor's message.
        message: String,
    },
    /// Copies into a device failed.
    CopiesFailed {
        /// The destination.
        device: DeviceId,
        /// The executor's message.
        message: String,
    },
    /// An acquiring step failed.
    StepFailed {
        /// The step.
        #[serde(serialize_with = "step_name")]
        step: Step,
        /// The executor's message.
        message: String,
    },
    /// A device of the old or next deployment failed before the switch.
    DeviceFailed {
        /// The device.
        device: DeviceId,
    },
}

fn step_name<S: serde::Serializer>(step: &Step, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{step:?}"))
}

/// When each phase ended, on the injected clock.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct PhaseTimes {
    /// The transition was created.
    pub started: Time,
    /// The plan arrived.
    pub planned: Option<Time>,
    /// The next deployment was built.
    pub prepared: Option<Time>,
    /// The engine switched.
    pub switched: Option<Time>,
    /// The old deployment was released.
    pub retired: Option<Time>,
    /// The transition was rolled back.
    pub aborted: Option<Time>,
}

/// Phase durations in milliseconds, the report's `phases_ms`. A phase that did not happen (or
/// was cut short by an abort) counts up to the abort, then zero.
#[derive(Clone, Copy, PartialEq, Debug, Default, Serialize)]
pub struct PhasesMs {
    /// From creation to the plan.
    pub plan: f64,
    /// From the plan to the built deployment.
    pub prepare: f64,
    /// From the built deployment to the switch.
    pub switch: f64,
    /// From the switch to the release of the old deployment.
    pub retire: f64,
}

impl PhaseTimes {
    /// Phase durations. Each phase runs from the end of the one before it to its own end, or
    /// to the abort if the transition was rolled back during it.
    pub fn phases_ms(&self) -> PhasesMs {
        let ends = [self.planned, self.prepared, self.switched, self.retired];
        let mut out = [0.0f64; 4];
        let mut start = self.started;
        for (slot, end) in out.iter_mut().zip(ends) {
            match (end, self.aborted) {
                (Some(end), _) => {
                    *slot = millis(end.saturating_since(start));
                    start = end;
                }
                (None, Some(aborted)) => {
                    *slot = millis(aborted.saturating_since(start));
                    break;
                }
                (None, None) => break,
            }
        }
        PhasesMs {
            plan: out[0],
            prepare: out[1],
            switch: out[2],
            retire: out[3],
        }
    }

    /// From creation until the next deployment served (the switch), in ms.
    pub fn latency_ms(&self) -> Option<f64> {
        self.switched
            .map(|s| millis(s.saturating_since(self.started)))
    }
}

/// Everything a transition knows about itself; the source of a `scale_events` entry in the
/// report. Downtime is not here: only the engine can see iterations that did not run.
#[derive(Clone, PartialEq, Debug, Serialize)]
pub struct TransitionReport {
    /// What changed.
    pub kind: TransitionKind,
    /// How.
    pub strategy: Strategy,
    /// Devices before.
    pub from: DeviceSet,
    /// Devices after (if it retired).
    pub to: DeviceSet,
    /// Where it ended (or is).
    pub phase: Phase,
    /// Why it was rolled back, if it was.
    pub abort_reason: Option<AbortReason>,
    /// Phase timestamps.
    pub times: PhaseTimes,
    /// Phase durations.
    pub phases_ms: PhasesMs,
    /// From creation to the switch, if it switched.
    pub latency_ms: Option<f64>,
    /// How long intake was paused (only the cold restart pauses it).
    pub intake_paused_ms: f64,
    /// Bytes copied between devices.
    pub bytes_moved: u64,
    /// Bytes reused in place.
    pub bytes_zero_copy: u64,
    /// Bytes reloaded from the checkpoint.
    pub bytes_reloaded: u64,
    /// The most expert bytes each device holds during the plan (empty if the plan does not
    /// say).
    pub peak_bytes_per_device: BTreeMap<DeviceId, u64>,
    /// Sequences re-queued for recompute.
    pub sequences_requeued: u64,
    /// Sequences live-migrated to other ranks.
    pub sequences_migrated: u64,
    /// KV bytes live-migrated.
    pub kv_bytes_migrated: u64,
    /// Devices that failed while this transition ran.
    pub failed_during: DeviceSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_end_to_end_and_stop_at_an_abort() {
        let t = PhaseTimes {
            started: Time::from_millis(100),
            planned: Some(Time::from_millis(103)),
            prepared: Some(Time::from_millis(150)),
            switched: Some(Time::from_millis(151)),
            retired: Some(Time::from_millis(160)),
            aborted: None,
        };
        assert_eq!(
            t.phases_ms(),
            PhasesMs {
                plan: 3.0,
                prepare: 47.0,
                switch: 1.0,
                retire: 9.0
            }
        );
        assert_eq!(t.latency_ms(), Some(51.0));

        let a = PhaseTimes {
            started: Time::from_millis(0),
            planned: Some(Time::from_millis(2)),
            aborted: Some(Time::from_millis(12)),
            ..PhaseTimes::default()
        };
        assert_eq!(
            a.phases_ms(),
            PhasesMs {
                plan: 2.0,
                prepare: 10.0,
                switch: 0.0,
                retire: 0.0
            }
        );
        assert_eq!(a.latency_ms(), None);
    }
}
