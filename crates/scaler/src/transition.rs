//! The transition machine: Plan → Prepare → Switch → Retire, or Abort and roll back before the
//! switch.
//!
//! One [`Transition`] takes a running deployment on `from` devices to a next deployment on `to`
//! devices. It is sans-IO: [`Transition::handle`] takes an [`Event`] and the time,
//! [`Transition::poll_action`] hands out the [`Action`]s to carry out. The same machine runs
//! every [`Strategy`]; the strategies differ only in the actions it emits (see
//! [`Strategy`]'s table).
//!
//! Invalid events return a typed [`TransitionError`] and leave the machine exactly as it was.

use crate::action::{Action, Event, EventKind, Handoff, KvBudget, Resource, Step, WorkerSource};
use crate::device::{DeviceId, DeviceSet};
use crate::plan::TransitionPlan;
use crate::report::{AbortReason, Phase, PhaseTimes, TransitionReport};
use crate::strategy::{Strategy, TransitionKind};
use crate::time::{millis, Time};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// What a transition should do: its kind, strategy and device sets.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TransitionSpec {
    /// What changes.
    pub kind: TransitionKind,
    /// How.
    pub strategy: Strategy,
    /// The devices of the running deployment.
    pub from: DeviceSet,
    /// The devices of the next deployment.
    pub to: DeviceSet,
}

/// Why a [`TransitionSpec`] cannot run.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// No running devices.
    #[error("the running deployment has no devices; a transition needs one to start from")]
    EmptyFrom,
    /// The target set is empty.
    #[error("a deployment needs at least 1 device, but the target device set is empty")]
    EmptyTarget,
    /// A scale-up that does not grow.
    #[error("a scale-up must target more than the {from} devices serving now, not {to}")]
    NotLarger {
        /// Devices now.
        from: usize,
        /// Devices asked for.
        to: usize,
    },
    /// A scale-down that does not shrink.
    #[error("a scale-down must target fewer than the {from} devices serving now, not {to}")]
    NotSmaller {
        /// Devices now.
        from: usize,
        /// Devices asked for.
        to: usize,
    },
    /// A rebalance that changes the device set.
    #[error("a rebalance keeps the same devices ({from}), but the target is {to}")]
    RebalanceChangesDevices {
        /// Devices now.
        from: DeviceSet,
        /// Devices asked for.
        to: DeviceSet,
    },
    /// A failure transition without failed devices.
    #[error("a failure transition needs at least one failed device")]
    NoFailedDevices,
    /// A failed device that does not serve.
    #[error("device {device} failed but is not part of the running deployment {from}")]
    FailedNotServing {
        /// The device.
        device: DeviceId,
        /// Devices now.
        from: DeviceSet,
    },
    /// A failure transition must go to exactly the surviving devices.
    #[error("after a failure the target must be the surviving devices {expected}, not {to}")]
    TargetNotSurvivors {
        /// The survivors.
        expected: DeviceSet,
        /// Devices asked for.
        to: DeviceSet,
    },
    /// Elastic and colocated transitions grow or shrink the running set.
    #[error(
        "the {strategy} strategy keeps the running devices: a scale-up must contain {from} and a \
         scale-down must be inside it, but the target is {to}"
    )]
    NotNested {
        /// The strategy.
        strategy: Strategy,
        /// Devices now.
        from: DeviceSet,
        /// Devices asked for.
        to: DeviceSet,
    },
    /// The extravagant baseline needs a disjoint target.
    #[error("the extravagant strategy starts the new instance on fresh devices, but {shared} are in use")]
    NotDisjoint {
        /// Devices in both sets.
        shared: DeviceSet,
    },
    /// A kind the strategy cannot carry out.
    #[error("the {strategy} strategy cannot carry out a {kind} transition")]
    Unsupported {
        /// The kind's name.
        kind: &'static str,
        /// The strategy.
        strategy: Strategy,
    },
}

impl TransitionSpec {
    /// Checks that the sets fit the kind and the strategy.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (from, to) = (&self.from, &self.to);
        if from.is_empty() {
            return Err(SpecError::EmptyFrom);
        }
        if to.is_empty() {
            return Err(SpecError::EmptyTarget);
        }
        let unsupported = || SpecError::Unsupported {
            kind: self.kind.as_str(),
            strategy: self.strategy,
        };
        match &self.kind {
            TransitionKind::ScaleUp if to.len() <= from.len() => {
                return Err(SpecError::NotLarger {
                    from: from.len(),
                    to: to.len(),
                })
            }
            TransitionKind::ScaleDown if to.len() >= from.len() => {
                return Err(SpecError::NotSmaller {
                    from: from.len(),
                    to: to.len(),
                })
            }
            TransitionKind::Rebalance if self.strategy == Strategy::Extravagant => {
                return Err(unsupported())
            }
            TransitionKind::Rebalance if to != from => {
                return Err(SpecError::RebalanceChangesDevices {
                    from: from.clone(),
                    to: to.clone(),
                })
            }
            TransitionKind::Failure { failed } => {
                if failed.is_empty() {
                    return Err(SpecError::NoFailedDevices);
                }
                if let Some(device) = failed.difference(from).iter().next() {
                    return Err(SpecError::FailedNotServing {
                        device,
                        from: from.clone(),
                    });
                }
                let expected = from.difference(failed);
                if *to != expected {
                    return Err(SpecError::TargetNotSurvivors {
                        expected,
                        to: to.clone(),
                    });
                }
                if !matches!(self.strategy, Strategy::Elastic | Strategy::ColdRestart) {
                    return Err(unsupported());
                }
            }
            _ => {}
        }
        let nested = match self.kind {
            TransitionKind::ScaleUp => from.is_subset(to),
            TransitionKind::ScaleDown => to.is_subset(from),
            TransitionKind::Rebalance | TransitionKind::Failure { .. } => true,
        };
        match self.strategy {
            Strategy::Elastic | Strategy::Colocated if !nested => Err(SpecError::NotNested {
                strategy: self.strategy,
                from: from.clone(),
                to: to.clone(),
            }),
            Strategy::Extravagant if !from.is_disjoint(to) => Err(SpecError::NotDisjoint {
                shared: from.intersection(to),
            }),
            _ => Ok(()),
        }
    }
}

/// An event the machine refused. The machine is left exactly as it was.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The event makes no sense in this phase.
    #[error("event {event:?} is not valid while the transition is in phase {phase:?}")]
    UnexpectedEvent {
        /// The phase.
        phase: Phase,
        /// The event.
        event: EventKind,
    },
    /// A copy report for a device that has no copies outstanding.
    #[error(
        "copies into {device} were reported, but none are outstanding there (not a destination of \
         the plan, or already reported)"
    )]
    UnexpectedCopyReport {
        /// The device.
        device: DeviceId,
    },
    /// A failure report for a step that was never started.
    #[error("step {step:?} was reported as failed, but this transition never started it")]
    UnexpectedStepFailure {
        /// The step.
        step: Step,
    },
    /// The plan sends bytes somewhere outside the target.
    #[error("the plan copies into {device}, which is not in the target device set {to}")]
    PlanOutsideTarget {
        /// The device.
        device: DeviceId,
        /// The target.
        to: DeviceSet,
    },
    /// An abort after the switch was requested.
    #[error(
        "too late to abort in phase {phase:?}: the switch was already requested; start a new \
         transition to go back"
    )]
    TooLateToAbort {
        /// The phase.
        phase: Phase,
    },
    /// Any event after the end.
    #[error("the transition already finished ({phase:?}); start a new one")]
    Finished {
        /// How it ended.
        phase: Phase,
    },
    /// The injected clock went backwards.
    #[error("the clock went backwards: {now} is before {last}, the time of the previous event")]
    ClockWentBackwards {
        /// The previous time.
        last: Time,
        /// The time given now.
        now: Time,
    },
}

#[derive(Debug, Default)]
struct Pending {
    copies: DeviceSet,
    requeues: u32,
    kv_migration: bool,
    build: bool,
}

/// One transition from a running deployment to the next. See the `transition` module's docs.
///
/// # Invariants
///
/// - Nothing it emits pauses intake unless the strategy is [`Strategy::ColdRestart`]
///   ([`Action::pauses_intake`]); the elastic strategy keeps the old deployment serving at full
///   batch until the switch.
/// - The switch is one [`Action::RequestSwitch`], carried out by the engine at an iteration
///   boundary as a pointer swap; the machine never waits on the serving loop.
/// - Before the switch, every acquired [`Resource`] is in the ledger, and an abort releases all
///   of it, newest first. After the switch the ledger belongs to the new deployment.
#[derive(Debug)]
pub struct Transition<P> {
    spec: TransitionSpec,
    phase: Phase,
    plan: Option<Arc<P>>,
    ledger: Vec<Resource>,
    pending: Pending,
    actions: VecDeque<Action<P>>,
    times: PhaseTimes,
    last_now: Time,
    intake_paused_since: Option<Time>,
    intake_paused: Duration,
    abort_reason: Option<AbortReason>,
    failed_during: DeviceSet,
    sequences_requeued: u64,
    sequences_migrated: u64,
    kv_bytes_migrated: u64,
    switched_at: Option<u64>,
}

impl<P: TransitionPlan> Transition<P> {
    /// Starts a transition at `now`. Its first actions ask for the plan (and, for a failure,
    /// fence the failed devices and re-queue their sequences).
    pub fn new(spec: TransitionSpec, now: Time) -> Result<Transition<P>, SpecError> {
        spec.validate()?;
        let mut t = Transition {
            spec,
            phase: Phase::Plan,
            plan: None,
            ledger: Vec::new(),
            pending: Pending::default(),
            actions: VecDeque::new(),
            times: PhaseTimes {
                started: now,
                ..PhaseTimes::default()
            },
            last_now: now,
            intake_paused_since: None,
            intake_paused: Duration::ZERO,
            abort_reason: None,
            failed_during: DeviceSet::new(),
            sequences_requeued: 0,
            sequences_migrated: 0,
            kv_bytes_migrated: 0,
            switched_at: None,
        };
        let failed = t.spec.kind.failed();
        if !failed.is_empty() {
            t.emit(Action::FenceFailed {
                devices: failed.clone(),
            });
            t.emit(Action::RequeueSequences { devices: failed });
            t.pending.requeues += 1;
        }
        t.emit(Action::ComputePlan {
            kind: t.spec.kind.clone(),
            strategy: t.spec.strategy,
            from: t.spec.from.clone(),
            to: t.spec.to.clone(),
        });
        Ok(t)
    }

    /// The spec it was created with.
    pub fn spec(&self) -> &TransitionSpec {
        &self.spec
    }

    /// Where it is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether it has finished (retired or aborted).
    pub fn is_finished(&self) -> bool {
        self.phase.is_terminal()
    }

    /// What it holds that an abort would release, oldest first.
    pub fn ledger(&self) -> &[Resource] {
        &self.ledger
    }

    /// The plan, once it arrived.
    pub fn plan(&self) -> Option<&P> {
        self.plan.as_deref()
    }

    /// Devices whose copies have been started and not yet reported.
    pub fn copies_outstanding(&self) -> &DeviceSet {
        &self.pending.copies
    }

    /// The first iteration on the new deployment, once switched.
    pub fn switched_at(&self) -> Option<u64> {
        self.switched_at
    }

    /// The next action to carry out, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// What it knows about itself so far.
    pub fn report(&self) -> TransitionReport {
        let plan = self.plan.as_deref();
        let paused = self.intake_paused
            + self
                .intake_paused_since
                .map_or(Duration::ZERO, |s| self.last_now.saturating_since(s));
        TransitionReport {
            kind: self.spec.kind.clone(),
            strategy: self.spec.strategy,
            from: self.spec.from.clone(),
            to: self.spec.to.clone(),
            phase: self.phase,
            abort_reason: self.abort_reason.clone(),
            times: self.times,
            phases_ms: self.times.phases_ms(),
            latency_ms: self.times.latency_ms(),
            intake_paused_ms: millis(paused),
            bytes_moved: plan.map_or(0, P::bytes_moved),
            bytes_zero_copy: plan.map_or(0, P::bytes_zero_copy),
            bytes_reloaded: plan.map_or(0, P::bytes_reloaded),
            peak_bytes_per_device: plan.map(P::peak_bytes_per_device).unwrap_or_default(),
            sequences_requeued: self.sequences_requeued,
            sequences_migrated: self.sequences_migrated,
            kv_bytes_migrated: self.kv_bytes_migrated,
            failed_during: self.failed_during.clone(),
        }
    }

    /// Feeds one event at `now`. On error nothing changes.
    pub fn handle(&mut self, event: Event<P>, now: Time) -> Result<(), TransitionError> {
        if self.phase.is_terminal() {
            return Err(TransitionError::Finished { phase: self.phase });
        }
        if now < self.last_now {
            return Err(TransitionError::ClockWentBackwards {
                last: self.last_now,
                now,
            });
        }
        let unexpected = TransitionError::UnexpectedEvent {
            phase: self.phase,
            event: event.kind(),
        };
        match event {
            Event::PlanReady(plan) => {
                if self.phase != Phase::Plan {
                    return Err(unexpected);
                }
                if let Some(device) = plan
                    .copy_destinations()
                    .difference(&self.spec.to)
                    .iter()
                    .next()
                {
                    return Err(TransitionError::PlanOutsideTarget {
                        device,
                        to: self.spec.to.clone(),
                    });
                }
                self.last_now = now;
                self.plan = Some(Arc::new(plan));
                self.times.planned = Some(now);
                self.phase = Phase::Prepare;
                self.emit_prepare(now);
                self.maybe_build();
            }
            Event::PlanFailed { reason } => {
                if self.phase != Phase::Plan {
                    return Err(unexpected);
                }
                self.abort(AbortReason::PlanFailed { message: reason }, now);
            }
            Event::CopiesDone { device } => {
                self.check_copy_report(device, unexpected)?;
                self.last_now = now;
                self.pending.copies.remove(device);
                self.emit(Action::MapMovedExperts { device });
                self.maybe_build();
            }
            Event::CopiesFailed { device, reason } => {
                self.check_copy_report(device, unexpected)?;
                self.abort(
                    AbortReason::CopiesFailed {
                        device,
                        message: reason,
                    },
                    now,
                );
            }
            Event::SequencesRequeued { count } => {
                if !self.phase.is_before_switch() || self.pending.requeues == 0 {
                    return Err(unexpected);
                }
                self.last_now = now;
                self.pending.requeues -= 1;
                self.sequences_requeued = self.sequences_requeued.saturating_add(count);
                self.maybe_build();
            }
            Event::KvMigrated { sequences, bytes } => {
                if self.phase != Phase::Prepare || !self.pending.kv_migration {
                    return Err(unexpected);
                }
                self.last_now = now;
                self.pending.kv_migration = false;
                self.ledger.retain(|r| *r != Resource::KvMigration);
                self.sequences_migrated = self.sequences_migrated.saturating_add(sequences);
                self.kv_bytes_migrated = self.kv_bytes_migrated.saturating_add(bytes);
                self.maybe_build();
            }
            Event::StepFailed { step, reason } => {
                if !self.phase.is_before_switch() {
                    return Err(unexpected);
                }
                let index = self
                    .step_resource(step)
                    .ok_or(TransitionError::UnexpectedStepFailure { step })?;
                // The executor undid the failed step itself, except for experts mapped into the
                // next views, which the views' release frees.
                if step != Step::MapExperts {
                    self.ledger.remove(index);
                }
                self.abort(
                    AbortReason::StepFailed {
                        step,
                        message: reason,
                    },
                    now,
                );
            }
            Event::DeploymentBuilt => {
                if self.phase != Phase::Prepare || !self.pending.build {
                    return Err(unexpected);
                }
                self.last_now = now;
                self.pending.build = false;
                self.times.prepared = Some(now);
                self.phase = Phase::Switch;
                let handoff = match self.spec.strategy {
                    Strategy::Elastic | Strategy::ColdRestart => Handoff::InPlace,
                    Strategy::Extravagant | Strategy::Colocated => Handoff::MigrateAtSwitch {
                        from: self.live_from(),
                        to: self.spec.to.clone(),
                    },
                };
                self.emit(Action::RequestSwitch { handoff });
            }
            Event::Switched { iteration } => {
                if self.phase != Phase::Switch {
                    return Err(unexpected);
                }
                self.last_now = now;
                self.times.switched = Some(now);
                self.switched_at = Some(iteration);
                // The ledger now belongs to the new deployment, except a paused intake, which
                // the switch ends.
                for r in std::mem::take(&mut self.ledger) {
                    if r == Resource::IntakePaused {
                        self.resume_intake(now);
                        self.emit(Action::ResumeIntake);
                    }
                }
                self.phase = Phase::Retire;
                self.emit(Action::RetireOld {
                    switched_at: iteration,
                });
            }
            Event::OldDrained => {
                if self.phase != Phase::Retire {
                    return Err(unexpected);
                }
                self.last_now = now;
                self.emit_retire();
                self.times.retired = Some(now);
                self.phase = Phase::Retired;
            }
            Event::DeviceFailed { device } => {
                self.last_now = now;
                if self.spec.kind.failed().contains(device) {
                    return Ok(());
                }
                self.failed_during.insert(device);
                let involved = self.spec.from.contains(device) || self.spec.to.contains(device);
                if involved && self.phase.is_before_switch() {
                    self.abort(AbortReason::DeviceFailed { device }, now);
                }
            }
            Event::AbortRequested => {
                if !self.phase.is_before_switch() {
                    return Err(TransitionError::TooLateToAbort { phase: self.phase });
                }
                self.abort(AbortReason::Requested, now);
            }
        }
        Ok(())
    }

    fn check_copy_report(
        &self,
        device: DeviceId,
        unexpected: TransitionError,
    ) -> Result<(), TransitionError> {
        if self.phase != Phase::Prepare {
            return Err(unexpected);
        }
        if !self.pending.copies.contains(device) {
            return Err(TransitionError::UnexpectedCopyReport { device });
        }
        Ok(())
    }

    /// The ledger index of the resource a failed step had acquired, if the step ran.
    fn step_resource(&self, step: Step) -> Option<usize> {
        self.ledger.iter().position(|r| match step {
            Step::AcquireWorkers => matches!(r, Resource::Workers(_)),
            Step::ReserveNextViews | Step::MapExperts => matches!(r, Resource::NextViews(_)),
            Step::CreateKvPools => matches!(r, Resource::KvPools(_)),
            Step::ShrinkKvBudget => matches!(r, Resource::KvBudgetShrunk(_)),
            Step::MigrateKv => matches!(r, Resource::KvMigration),
            Step::BuildDeployment => matches!(r, Resource::NextDeployment),
        })
    }

    fn emit(&mut self, action: Action<P>) {
        self.actions.push_back(action);
    }

    fn acquire(&mut self, resource: Resource, action: Action<P>) {
        self.ledger.push(resource);
        self.emit(action);
    }

    /// The devices of the running deployment that still work.
    fn live_from(&self) -> DeviceSet {
        self.spec.from.difference(&self.spec.kind.failed())
    }

    fn emit_prepare(&mut self, now: Time) {
        let to = self.spec.to.clone();
        let live_from = self.live_from();
        let added = to.difference(&self.spec.from);
        let kept = live_from.intersection(&to);
        let leaving = live_from.difference(&to);
        match self.spec.strategy {
            Strategy::Elastic => {
                if !added.is_empty() {
                    self.acquire(
                        Resource::Workers(added.clone()),
                        Action::AcquireWorkers {
                            devices: added.clone(),
                            source: WorkerSource::WarmPool,
                        },
                    );
                }
                self.acquire(
                    Resource::NextViews(to.clone()),
                    Action::ReserveNextViews { devices: to },
                );
                if !kept.is_empty() {
                    self.emit(Action::MapKeptExperts {
                        devices: kept.clone(),
                    });
                }
                self.start_copies();
                if !added.is_empty() {
                    self.acquire(
                        Resource::KvPools(added.clone()),
                        Action::CreateKvPools {
                            devices: added,
                            budget: KvBudget::Full,
                        },
                    );
                }
                if !leaving.is_empty() {
                    self.acquire(
                        Resource::ClosedRanks(leaving.clone()),
                        Action::CloseRanks {
                            devices: leaving.clone(),
                        },
                    );
                    self.acquire(
                        Resource::KvMigration,
                        Action::MigrateKv {
                            from: leaving,
                            to: kept,
                        },
                    );
                    self.pending.kv_migration = true;
                }
            }
            Strategy::ColdRestart => {
                self.acquire(Resource::IntakePaused, Action::PauseIntake);
                self.intake_paused_since = Some(now);
                self.emit(Action::RequeueSequences {
                    devices: live_from.clone(),
                });
                self.pending.requeues += 1;
                self.acquire(
                    Resource::OldDeploymentStopped(live_from.clone()),
                    Action::StopOldDeployment { devices: live_from },
                );
                self.acquire(
                    Resource::Workers(to.clone()),
                    Action::AcquireWorkers {
                        devices: to.clone(),
                        source: WorkerSource::Cold,
                    },
                );
                self.acquire(
                    Resource::NextViews(to.clone()),
                    Action::ReserveNextViews {
                        devices: to.clone(),
                    },
                );
                self.start_copies();
                self.acquire(
                    Resource::KvPools(to.clone()),
                    Action::CreateKvPools {
                        devices: to,
                        budget: KvBudget::Full,
                    },
                );
            }
            Strategy::Extravagant => {
                self.acquire(
                    Resource::Workers(to.clone()),
                    Action::AcquireWorkers {
                        devices: to.clone(),
                        source: WorkerSource::WarmPool,
                    },
                );
                self.acquire(
                    Resource::NextViews(to.clone()),
                    Action::ReserveNextViews {
                        devices: to.clone(),
                    },
                );
                self.start_copies();
                self.acquire(
                    Resource::KvPools(to.clone()),
                    Action::CreateKvPools {
                        devices: to,
                        budget: KvBudget::Full,
                    },
                );
            }
            Strategy::Colocated => {
                if !kept.is_empty() {
                    self.acquire(
                        Resource::KvBudgetShrunk(kept.clone()),
                        Action::ShrinkKvBudget {
                            devices: kept,
                            budget: KvBudget::Half,
                        },
                    );
                }
                if !added.is_empty() {
                    self.acquire(
                        Resource::Workers(added.clone()),
                        Action::AcquireWorkers {
                            devices: added,
                            source: WorkerSource::WarmPool,
                        },
                    );
                }
                self.acquire(
                    Resource::NextViews(to.clone()),
                    Action::ReserveNextViews {
                        devices: to.clone(),
                    },
                );
                self.start_copies();
                self.acquire(
                    Resource::KvPools(to.clone()),
                    Action::CreateKvPools {
                        devices: to,
                        budget: KvBudget::Half,
                    },
                );
            }
        }
    }

    fn start_copies(&mut self) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        let destinations = plan.copy_destinations();
        if !destinations.is_empty() {
            self.pending.copies = destinations;
            self.acquire(Resource::CopyDestinations, Action::StartCopies { plan });
        }
    }

    fn maybe_build(&mut self) {
        let p = &self.pending;
        if self.phase == Phase::Prepare
            && !p.build
            && p.copies.is_empty()
            && p.requeues == 0
            && !p.kv_migration
        {
            self.pending.build = true;
            let devices = self.spec.to.clone();
            self.acquire(
                Resource::NextDeployment,
                Action::BuildDeployment { devices },
            );
        }
    }

    fn emit_retire(&mut self) {
        let live_from = self.live_from();
        let leaving = live_from.difference(&self.spec.to);
        let (old_views, old_pools, old_workers) = match self.spec.strategy {
            // The old deployment was stopped during Prepare; nothing of it is left.
            Strategy::ColdRestart => return,
            Strategy::Elastic => (live_from, leaving.clone(), leaving),
            Strategy::Extravagant => (live_from.clone(), live_from.clone(), live_from),
            Strategy::Colocated => (live_from.clone(), live_from, leaving),
        };
        self.emit(Action::ReleaseOldViews { devices: old_views });
        if !old_pools.is_empty() {
            self.emit(Action::DestroyKvPools { devices: old_pools });
        }
        for action in Resource::Workers(old_workers).release_actions(&self.failed_during) {
            self.emit(action);
        }
    }

    fn resume_intake(&mut self, now: Time) {
        if let Some(since) = self.intake_paused_since.take() {
            self.intake_paused += now.saturating_since(since);
        }
    }

    fn abort(&mut self, reason: AbortReason, now: Time) {
        self.last_now = now;
        for resource in std::mem::take(&mut self.ledger).into_iter().rev() {
            if resource == Resource::IntakePaused {
                self.resume_intake(now);
            }
            for action in resource.release_actions(&self.failed_during) {
                self.emit(action);
            }
        }
        self.pending = Pending::default();
        self.times.aborted = Some(now);
        self.abort_reason = Some(reason);
        self.phase = Phase::Aborted;
    }
}
