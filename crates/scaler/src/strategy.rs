//! What a transition does ([`TransitionKind`]) and how it does it ([`Strategy`]).

use crate::device::DeviceSet;
use serde::Serialize;
use std::fmt;

/// What a transition changes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransitionKind {
    /// Grow to more devices.
    ScaleUp,
    /// Shrink to fewer devices (at least one).
    ScaleDown,
    /// Same devices, new expert placement for a new load.
    Rebalance,
    /// Emergency scale-down: `failed` devices are gone. Their sequences are re-queued for
    /// recompute (and counted) and experts left without a copy are reloaded from the checkpoint.
    Failure {
        /// The devices that failed.
        failed: DeviceSet,
    },
}

impl TransitionKind {
    /// The name the report uses: `up`, `down`, `rebalance` or `failure`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TransitionKind::ScaleUp => "up",
            TransitionKind::ScaleDown => "down",
            TransitionKind::Rebalance => "rebalance",
            TransitionKind::Failure { .. } => "failure",
        }
    }

    /// The failed devices of a [`TransitionKind::Failure`]; empty otherwise.
    pub fn failed(&self) -> DeviceSet {
        match self {
            TransitionKind::Failure { failed } => failed.clone(),
            _ => DeviceSet::new(),
        }
    }
}

/// How a transition is carried out. All four run on the same engine through the same
/// [`Transition`](crate::Transition) machine; they differ only in the actions it emits.
///
/// | strategy | intake | in-flight sequences | weights | devices |
/// |---|---|---|---|---|
/// | `Elastic` | never paused | keep their KV where it is; leaving ranks' KV migrates peer-to-peer before the switch | kept zero-copy, moved peer-to-peer | old ∪ new, one step at a time |
/// | `ColdRestart` | paused from Prepare until the switch | re-queued and recomputed | all reloaded from disk after the old deployment stops | the new set |
/// | `Extravagant` | never paused | KV migrated to the new instance at the switch | all copied peer-to-peer to the new devices | a disjoint new set beside the old |
/// | `Colocated` | never paused | KV migrated to the new instance at the switch | duplicated: the new instance gets its own copy | old ∪ new, KV budget halved in advance |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Ours: build the next deployment beside the running one, reuse what stays, switch at an
    /// iteration boundary.
    Elastic,
    /// Baseline: stop, rebuild from disk on the new device set, restart.
    ColdRestart,
    /// Baseline: a whole new instance on a disjoint set of devices.
    Extravagant,
    /// Baseline: a second instance on old plus new devices, weights duplicated, KV halved.
    Colocated,
}

impl Strategy {
    /// Every strategy, in the order reports list them.
    pub const ALL: [Strategy; 4] = [
        Strategy::Elastic,
        Strategy::ColdRestart,
        Strategy::Extravagant,
        Strategy::Colocated,
    ];

    /// The name the CLI and the report use.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Elastic => "elastic",
            Strategy::ColdRestart => "cold-restart",
            Strategy::Extravagant => "extravagant",
            Strategy::Colocated => "colocated",
        }
    }

    /// Parses a CLI name (`elastic`, `cold-restart`, `extravagant`, `colocated`).
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether this strategy pauses request intake during a transition. Only the cold restart
    /// does; see the crate docs' invariants.
    pub fn pauses_intake(self) -> bool {
        matches!(self, Strategy::ColdRestart)
    }

    /// The strategy used to recover from a device failure when this one is configured: the cold
    /// restart recovers by restarting, every other strategy recovers elastically (a disjoint or
    /// duplicated instance cannot be built from a deployment that has already lost a device).
    pub fn failure_recovery(self) -> Strategy {
        match self {
            Strategy::ColdRestart => Strategy::ColdRestart,
            _ => Strategy::Elastic,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::from_name(s.as_str()), Some(s));
        }
        assert_eq!(Strategy::from_name("warm-restart"), None);
        assert_eq!(
            TransitionKind::Failure {
                failed: DeviceSet::from([1])
            }
            .as_str(),
            "failure"
        );
    }

    #[test]
    fn only_cold_restart_pauses_intake() {
        let pausing: Vec<_> = Strategy::ALL
            .into_iter()
            .filter(|s| s.pauses_intake())
            .collect();
        assert_eq!(pausing, vec![Strategy::ColdRestart]);
    }
}
