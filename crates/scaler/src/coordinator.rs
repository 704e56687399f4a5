//! The coordinator: scale commands in, one transition at a time, an outcome for every command.
//!
//! # Commands that arrive while a transition runs are queued
//!
//! A command that arrives while a transition runs (or while others wait) goes to the back of a
//! bounded FIFO queue ([`CoordinatorConfig::queue_capacity`]); a full queue rejects it at once
//! with [`CommandError::QueueFull`]. A capacity of 0 therefore means "reject while busy".
//! Commands are validated twice: on submission against the device count the deployment will have
//! once everything before them has run (so obvious mistakes fail at once), and again when their
//! turn comes, against the devices serving then. Relative commands (`Add`, `Remove`) are
//! relative to the devices serving when they start. A command that has become invalid by then
//! (say a device failed meanwhile) is not dropped: it gets [`Outcome::Rejected`].
//!
//! # Failures come first
//!
//! [`Coordinator::device_failed`] marks the device as failed and tells the running transition
//! (which aborts if the device was part of it and the switch has not been requested). Whenever
//! no transition runs and the serving set contains a failed device, the coordinator starts a
//! failure recovery before any queued command.

use crate::action::{Action, Event};
use crate::device::{DeviceId, DeviceSet};
use crate::plan::TransitionPlan;
use crate::report::{Phase, TransitionReport};
use crate::strategy::{Strategy, TransitionKind};
use crate::time::Time;
use crate::transition::{SpecError, Transition, TransitionError, TransitionSpec};
use std::collections::VecDeque;
use std::fmt;

/// A request to change the deployment's size.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScaleCommand {
    /// Serve on exactly this many devices.
    Devices(usize),
    /// Add this many devices.
    Add(usize),
    /// Remove this many devices.
    Remove(usize),
    /// Keep the devices, re-place experts for the current load.
    Rebalance,
}

/// Names an accepted command.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CommandId(pub u64);

/// Names a transition the coordinator started.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TransitionId(pub u64);

impl fmt::Display for TransitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transition #{}", self.0)
    }
}

/// What happened to a command on submission.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Submitted {
    /// Its transition started at once.
    Started {
        /// The command.
        command: CommandId,
        /// Its transition.
        transition: TransitionId,
    },
    /// It waits behind a running transition.
    Queued {
        /// The command.
        command: CommandId,
        /// How many commands wait before it.
        ahead: usize,
    },
}

impl Submitted {
    /// The command's id.
    pub fn command(&self) -> CommandId {
        match *self {
            Submitted::Started { command, .. } | Submitted::Queued { command, .. } => command,
        }
    }
}

/// Why a command cannot run.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// `Devices(0)`.
    #[error("cannot serve on 0 devices: a deployment needs at least 1")]
    ZeroDevices,
    /// `Add(0)` or `Remove(0)`.
    #[error("{command:?} changes nothing; give a count of at least 1")]
    EmptyStep {
        /// The command.
        command: ScaleCommand,
    },
    /// A removal that would leave no device.
    #[error("removing {remove} of {devices} devices would leave none; at least 1 must stay")]
    RemovesEverything {
        /// Devices to remove.
        remove: usize,
        /// Devices it would run on.
        devices: usize,
    },
    /// More devices than are there.
    #[error("asked for {requested} devices, but only {available} healthy devices exist")]
    MoreThanExist {
        /// Devices asked for.
        requested: usize,
        /// Healthy devices.
        available: usize,
    },
    /// The extravagant baseline needs the old and the new set side by side.
    #[error(
        "the {strategy} strategy needs {needed} healthy devices for this step (old and new \
         instances side by side), but only {available} exist"
    )]
    NotEnoughForStrategy {
        /// The strategy.
        strategy: Strategy,
        /// Devices needed.
        needed: usize,
        /// Healthy devices.
        available: usize,
    },
    /// The target equals what the deployment will have anyway.
    #[error("the deployment already has (or will have) {devices} devices; nothing to do")]
    NoChange {
        /// The device count.
        devices: usize,
    },
    /// The queue is full.
    #[error(
        "a transition is running and {capacity} commands already wait; try again when it \
         finishes"
    )]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The strategy cannot carry it out.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Every device of the deployment failed; nothing can be scaled any more.
    #[error("every device of the deployment failed; restart the server from the checkpoint")]
    DeploymentLost,
}

/// Errors of the coordinator itself.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// A bad [`CoordinatorConfig`].
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// An event for a transition that is not running (it finished, or never existed).
    #[error("event for {transition}, which is not running (running: {running:?})")]
    StaleEvent {
        /// The transition the event named.
        transition: TransitionId,
        /// The running one, if any.
        running: Option<TransitionId>,
    },
    /// The running transition refused the event.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A device not in the inventory.
    #[error("device {device} is not one of the devices this server manages ({inventory})")]
    UnknownDevice {
        /// The device.
        device: DeviceId,
        /// The inventory.
        inventory: DeviceSet,
    },
    /// An abort with nothing running.
    #[error("no transition is running, so there is nothing to abort")]
    NothingRunning,
}

/// The result of a command or of a failure recovery.
#[derive(Clone, PartialEq, Debug)]
pub enum Outcome {
    /// A transition finished (retired or aborted; see the report's phase).
    Finished {
        /// The command that caused it; `None` for a failure recovery.
        command: Option<CommandId>,
        /// The transition.
        transition: TransitionId,
        /// What it reports.
        report: Box<TransitionReport>,
    },
    /// A queued command could not run when its turn came.
    Rejected {
        /// The command.
        command: CommandId,
        /// Why.
        error: CommandError,
    },
    /// Every device of the serving deployment failed.
    DeploymentLost {
        /// The devices that failed.
        failed: DeviceSet,
    },
}

/// An action of the running transition, tagged with it so that late events can be told apart.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TaggedAction<P> {
    /// The transition.
    pub transition: TransitionId,
    /// The action.
    pub action: Action<P>,
}

/// How the coordinator starts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CoordinatorConfig {
    /// Every device this server may use.
    pub inventory: DeviceSet,
    /// The devices serving at the start.
    pub initial: DeviceSet,
    /// How transitions are carried out.
    pub strategy: Strategy,
    /// How many commands may wait behind a running transition (0: reject while busy).
    pub queue_capacity: usize,
}

impl CoordinatorConfig {
    /// `devices` devices `0..devices`, the first `initial` serving, elastic, a queue of 8.
    pub fn new(devices: u32, initial: u32) -> CoordinatorConfig {
        CoordinatorConfig {
            inventory: DeviceSet::first(devices),
            initial: DeviceSet::first(initial),
            strategy: Strategy::Elastic,
            queue_capacity: 8,
        }
    }
}

#[derive(Debug)]
struct Running<P> {
    id: TransitionId,
    command: Option<CommandId>,
    transition: Transition<P>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Count(usize),
    Rebalance,
}

/// Accepts scale commands and runs their transitions one at a time. Sans-IO like
/// [`Transition`]: feed it commands and events, poll actions and outcomes.
#[derive(Debug)]
pub struct Coordinator<P> {
    inventory: DeviceSet,
    failed: DeviceSet,
    current: DeviceSet,
    strategy: Strategy,
    capacity: usize,
    queue: VecDeque<(CommandId, ScaleCommand)>,
    running: Option<Running<P>>,
    next_command: u64,
    next_transition: u64,
    lost: bool,
    actions: VecDeque<TaggedAction<P>>,
    outcomes: VecDeque<Outcome>,
}

impl<P: TransitionPlan> Coordinator<P> {
    /// A coordinator serving on `config.initial`.
    pub fn new(config: CoordinatorConfig) -> Result<Coordinator<P>, CoordinatorError> {
        if config.initial.is_empty() {
            return Err(CoordinatorError::Config(
                "the initial deployment needs at least 1 device".into(),
            ));
        }
        if !config.initial.is_subset(&config.inventory) {
            return Err(CoordinatorError::Config(format!(
                "the initial devices {} are not all in the inventory {}",
                config.initial, config.inventory
            )));
        }
        Ok(Coordinator {
            inventory: config.inventory,
            failed: DeviceSet::new(),
            current: config.initial,
            strategy: config.strategy,
            capacity: config.queue_capacity,
            queue: VecDeque::new(),
            running: None,
            next_command: 0,
            next_transition: 0,
            lost: false,
            actions: VecDeque::new(),
            outcomes: VecDeque::new(),
        })
    }

    /// The devices serving now (the old set until a transition retires).
    pub fn devices(&self) -> &DeviceSet {
        &self.current
    }

    /// Devices that exist and have not failed.
    pub fn healthy(&self) -> DeviceSet {
        self.inventory.difference(&self.failed)
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Whether a transition runs.
    pub fn is_busy(&self) -> bool {
        self.running.is_some()
    }

    /// Commands waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The running transition.
    pub fn running(&self) -> Option<(TransitionId, &Transition<P>)> {
        self.running.as_ref().map(|r| (r.id, &r.transition))
    }

    /// The device count once the running transition and every queued command have run, if
    /// they all succeed. Policies decide against this.
    pub fn projected_devices(&self) -> usize {
        let mut n = self
            .running
            .as_ref()
            .map_or(self.current.len(), |r| r.transition.spec().to.len());
        for &(_, command) in &self.queue {
            if let Ok(Target::Count(k)) = self.target(command, n) {
                n = k;
            }
        }
        n
    }

    /// Accepts a command: starts it now if nothing runs, or queues it.
    pub fn submit(&mut self, command: ScaleCommand, now: Time) -> Result<Submitted, CommandError> {
        if self.lost {
            return Err(CommandError::DeploymentLost);
        }
        let projected = self.projected_devices();
        self.target(command, projected)?;
        if command == ScaleCommand::Rebalance && self.strategy == Strategy::Extravagant {
            return Err(SpecError::Unsupported {
                kind: "rebalance",
                strategy: self.strategy,
            }
            .into());
        }
        if self.running.is_some() || !self.queue.is_empty() {
            if self.queue.len() >= self.capacity {
                return Err(CommandError::QueueFull {
                    capacity: self.capacity,
                });
            }
            let id = self.new_command_id();
            let ahead = self.queue.len();
            self.queue.push_back((id, command));
            return Ok(Submitted::Queued { command: id, ahead });
        }
        let spec = self.spec_for(command)?;
        let transition = Transition::new(spec, now)?;
        let id = self.new_command_id();
        let tid = self.install(Some(id), transition);
        Ok(Submitted::Started {
            command: id,
            transition: tid,
        })
    }

    /// Feeds an event of transition `transition`.
    pub fn handle(
        &mut self,
        transition: TransitionId,
        event: Event<P>,
        now: Time,
    ) -> Result<(), CoordinatorError> {
        let running_id = self.running.as_ref().map(|r| r.id);
        let running = self.running.as_mut().filter(|r| r.id == transition).ok_or(
            CoordinatorError::StaleEvent {
                transition,
                running: running_id,
            },
        )?;
        running.transition.handle(event, now)?;
        self.after_event(now);
        Ok(())
    }

    /// Asks the running transition to abort and roll back.
    pub fn abort(&mut self, now: Time) -> Result<(), CoordinatorError> {
        let running = self
            .running
            .as_mut()
            .ok_or(CoordinatorError::NothingRunning)?;
        running.transition.handle(Event::AbortRequested, now)?;
        self.after_event(now);
        Ok(())
    }

    /// A device failed. The running transition hears of it; a recovery follows as soon as no
    /// transition runs.
    pub fn device_failed(&mut self, device: DeviceId, now: Time) -> Result<(), CoordinatorError> {
        if !self.inventory.contains(device) {
            return Err(CoordinatorError::UnknownDevice {
                device,
                inventory: self.inventory.clone(),
            });
        }
        self.failed.insert(device);
        if let Some(running) = self.running.as_mut() {
            running
                .transition
                .handle(Event::DeviceFailed { device }, now)?;
            self.after_event(now);
        } else {
            self.start_next(now);
        }
        Ok(())
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<TaggedAction<P>> {
        self.actions.pop_front()
    }

    /// The next outcome.
    pub fn poll_outcome(&mut self) -> Option<Outcome> {
        self.outcomes.pop_front()
    }

    fn new_command_id(&mut self) -> CommandId {
        self.next_command += 1;
        CommandId(self.next_command)
    }

    fn install(&mut self, command: Option<CommandId>, transition: Transition<P>) -> TransitionId {
        self.next_transition += 1;
        let id = TransitionId(self.next_transition);
        self.running = Some(Running {
            id,
            command,
            transition,
        });
        self.drain_actions();
        id
    }

    fn drain_actions(&mut self) {
        if let Some(r) = self.running.as_mut() {
            while let Some(action) = r.transition.poll_action() {
                self.actions.push_back(TaggedAction {
                    transition: r.id,
                    action,
                });
            }
        }
    }

    fn after_event(&mut self, now: Time) {
        self.drain_actions();
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.transition.is_finished())
        {
            if let Some(r) = self.running.take() {
                let report = r.transition.report();
                if report.phase == Phase::Retired {
                    self.current = report.to.clone();
                }
                self.outcomes.push_back(Outcome::Finished {
                    command: r.command,
                    transition: r.id,
                    report: Box::new(report),
                });
            }
            self.start_next(now);
        }
    }

    /// Starts what comes next: a failure recovery, else the oldest queued command that can run.
    fn start_next(&mut self, now: Time) {
        while self.running.is_none() && !self.lost {
            let dead = self.current.intersection(&self.failed);
            if !dead.is_empty() {
                let survivors = self.current.difference(&dead);
                let spec = TransitionSpec {
                    kind: TransitionKind::Failure {
                        failed: dead.clone(),
                    },
                    strategy: self.strategy.failure_recovery(),
                    from: self.current.clone(),
                    to: survivors,
                };
                match Transition::new(spec, now) {
                    Ok(t) => {
                        self.install(None, t);
                    }
                    // Only an empty survivor set makes a recovery spec invalid.
                    Err(_) => {
                        self.lost = true;
                        self.outcomes
                            .push_back(Outcome::DeploymentLost { failed: dead });
                        while let Some((command, _)) = self.queue.pop_front() {
                            self.outcomes.push_back(Outcome::Rejected {
                                command,
                                error: CommandError::DeploymentLost,
                            });
                        }
                    }
                }
                continue;
            }
            let Some((command, cmd)) = self.queue.pop_front() else {
                break;
            };
            let started = self
                .target(cmd, self.current.len())
                .and_then(|_| self.spec_for(cmd))
                .and_then(|spec| Transition::new(spec, now).map_err(CommandError::from));
            match started {
                Ok(t) => {
                    self.install(Some(command), t);
                }
                Err(error) => self
                    .outcomes
                    .push_back(Outcome::Rejected { command, error }),
            }
        }
    }

    /// The device count (or rebalance) `command` asks for when the deployment has `n` devices.
    fn target(&self, command: ScaleCommand, n: usize) -> Result<Target, CommandError> {
        let available = self.healthy().len();
        let k = match command {
            ScaleCommand::Rebalance => return Ok(Target::Rebalance),
            ScaleCommand::Devices(0) => return Err(CommandError::ZeroDevices),
            ScaleCommand::Add(0) | ScaleCommand::Remove(0) => {
                return Err(CommandError::EmptyStep { command })
            }
            ScaleCommand::Devices(k) => k,
            ScaleCommand::Add(k) => n.saturating_add(k),
            ScaleCommand::Remove(k) if k >= n => {
                return Err(CommandError::RemovesEverything {
                    remove: k,
                    devices: n,
                })
            }
            ScaleCommand::Remove(k) => n - k,
        };
        if k > available {
            return Err(CommandError::MoreThanExist {
                requested: k,
                available,
            });
        }
        if k == n {
            return Err(CommandError::NoChange { devices: n });
        }
        if self.strategy == Strategy::Extravagant && n + k > available {
            return Err(CommandError::NotEnoughForStrategy {
                strategy: self.strategy,
                needed: n + k,
                available,
            });
        }
        Ok(Target::Count(k))
    }

    /// The transition that carries out `command` from the devices serving now. New devices are
    /// the lowest-numbered healthy free ones; leaving devices the highest-numbered serving ones.
    fn spec_for(&self, command: ScaleCommand) -> Result<TransitionSpec, CommandError> {
        let from = self.current.clone();
        let n = from.len();
        let free = self.healthy().difference(&from);
        let spec = |kind, to| TransitionSpec {
            kind,
            strategy: self.strategy,
            from: from.clone(),
            to,
        };
        let k = match self.target(command, n)? {
            Target::Rebalance => return Ok(spec(TransitionKind::Rebalance, from.clone())),
            Target::Count(k) => k,
        };
        let kind = if k > n {
            TransitionKind::ScaleUp
        } else {
            TransitionKind::ScaleDown
        };
        let to: DeviceSet = if self.strategy == Strategy::Extravagant {
            free.iter().take(k).collect()
        } else if k > n {
            from.union(&free.iter().take(k - n).collect())
        } else {
            from.iter().take(k).collect()
        };
        let spec = spec(kind, to);
        spec.validate()?;
        Ok(spec)
    }
}
