//! The seam between the HTTP server and whatever scales the live engine.
//!
//! The admin endpoints and the autoscaler only talk to a [`ScaleControl`]. The server uses
//! [`super::executor_scale::ExecutorScale`] (the host executor on a thread of its own);
//! [`NoScaling`] stands for a deployment that cannot scale (a fixed device set): it reports the
//! serving devices and refuses every command with [`ScaleError::Unavailable`] (HTTP 503).

use scaler::ScaleCommand;

/// Why a scale command was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScaleError {
    /// Scaling is not available in this build or on these devices.
    #[error("scaling not available in this build: {0}")]
    Unavailable(String),
    /// The command is invalid for the current deployment.
    #[error("{0}")]
    Invalid(String),
    /// Too many commands are already waiting (HTTP 429). Only an executor that queues commands
    /// returns it; [`NoScaling`] never does.
    #[error("{0}")]
    Busy(String),
}

/// A scale command the executor accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScaleAccepted {
    /// The executor's id for it.
    pub command: u64,
    /// `started` or `queued`.
    pub state: &'static str,
    /// Devices the deployment will have once it and everything before it ran.
    pub target_devices: usize,
}

/// Scale events of one kind and strategy, by outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScaleEventCount {
    /// `scale_up`, `scale_down`, ...
    pub kind: String,
    /// `elastic`, ...
    pub strategy: String,
    /// `completed`, `aborted`, `rejected`.
    pub outcome: String,
    /// How many.
    pub count: u64,
}

/// What the scaler reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScaleStatus {
    /// Whether commands can be carried out.
    pub available: bool,
    /// Devices serving now.
    pub active_devices: usize,
    /// Devices the deployment will have once the running and queued commands ran.
    pub target_devices: usize,
    /// Devices this server may use.
    pub max_devices: usize,
    /// Whether a transition is running.
    pub transition_running: bool,
    /// Commands waiting.
    pub queued: usize,
    /// Scale events so far.
    pub events: Vec<ScaleEventCount>,
    /// Bytes moved between devices by all transitions.
    pub bytes_moved: u64,
    /// The executor's own report (free-form JSON), if it has one.
    pub detail: serde_json::Value,
}

/// Scales the live engine.
pub trait ScaleControl: Send + Sync + 'static {
    /// Accepts (starts or queues) a command, or says why not. Never waits for the transition.
    fn scale(&self, command: ScaleCommand) -> Result<ScaleAccepted, ScaleError>;
    /// The current state.
    fn status(&self) -> ScaleStatus;
}

/// No executor in this build: the device set is fixed.
#[derive(Debug, Clone)]
pub struct NoScaling {
    /// Devices serving.
    pub devices: usize,
    /// Devices this server could use.
    pub max_devices: usize,
    /// Why scaling is unavailable.
    pub reason: String,
}

impl ScaleControl for NoScaling {
    fn scale(&self, _command: ScaleCommand) -> Result<ScaleAccepted, ScaleError> {
        Err(ScaleError::Unavailable(self.reason.clone()))
    }

    fn status(&self) -> ScaleStatus {
        ScaleStatus {
            available: false,
            active_devices: self.devices,
            target_devices: self.devices,
            max_devices: self.max_devices,
            transition_running: false,
            queued: 0,
            events: Vec::new(),
            bytes_moved: 0,
            detail: serde_json::json!({ "reason": self.reason }),
        }
    }
}

/// Checks a command against the device range before it reaches the executor, so that obvious
/// mistakes get a clear 400 whatever the executor is. Relative commands count from the devices
/// the deployment will have once the commands already accepted ran.
pub fn precheck(command: ScaleCommand, status: &ScaleStatus) -> Result<(), ScaleError> {
    let now = status.target_devices;
    let max = status.max_devices;
    let target = match command {
        ScaleCommand::Devices(n) => Some(n),
        ScaleCommand::Add(k) => now.checked_add(k),
        ScaleCommand::Remove(k) => now.checked_sub(k),
        ScaleCommand::Rebalance => return Ok(()),
    };
    match (command, target) {
        (ScaleCommand::Add(0) | ScaleCommand::Remove(0), _) => Err(ScaleError::Invalid(
            "a step of 0 devices changes nothing; give a count of at least 1".into(),
        )),
        (_, Some(0)) => Err(ScaleError::Invalid(
            "the deployment needs at least 1 device".into(),
        )),
        (ScaleCommand::Remove(k), None) => Err(ScaleError::Invalid(format!(
            "cannot remove {k} devices: only {now} are serving (or will be, once the \
             commands before it ran)"
        ))),
        (_, Some(t)) if t > max => Err(ScaleError::Invalid(format!(
            "asked for {t} devices, but this server has {max} (--devices)"
        ))),
        (_, None) => Err(ScaleError::Invalid("device count out of range".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precheck_refuses_out_of_range_commands() {
        let s = NoScaling {
            devices: 2,
            max_devices: 4,
            reason: "x".into(),
        }
        .status();
        assert_eq!(precheck(ScaleCommand::Devices(4), &s), Ok(()));
        assert_eq!(precheck(ScaleCommand::Add(2), &s), Ok(()));
        assert_eq!(precheck(ScaleCommand::Remove(1), &s), Ok(()));
        for bad in [
            ScaleCommand::Devices(0),
            ScaleCommand::Devices(5),
            ScaleCommand::Add(3),
            ScaleCommand::Add(0),
            ScaleCommand::Remove(2),
            ScaleCommand::Remove(3),
            ScaleCommand::Add(usize::MAX),
        ] {
            assert!(
                matches!(precheck(bad, &s), Err(ScaleError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
