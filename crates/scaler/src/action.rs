//! The machine's vocabulary: [`Action`]s out, [`Event`]s in.
//!
//! An executor (the engine side, built on `hbm-vmm`, `p2p-xfer`, `kv-pool` and `moe-host`)
//! carries out each action and reports back with events.
//!
//! # The executor's contract
//!
//! - Carry out actions in the order they are polled. Actions emitted together do not depend on
//!   each other's success (the one exception, a cold restart's `AcquireWorkers` after
//!   `StopOldDeployment`, follows a teardown that cannot fail).
//! - Every action that acquires something is atomic from the machine's point of view: the
//!   executor either completes it or undoes its own partial effect and reports
//!   [`Event::StepFailed`]. The machine keeps a ledger of what it acquired ([`Resource`]) and,
//!   on rollback, emits the release of all of it, newest first; the executor carries those out
//!   like any other action, including for steps emitted after the one that failed.
//! - Actions with an answer ([`Action::ComputePlan`], [`Action::RequeueSequences`],
//!   [`Action::StartCopies`] (one per destination), [`Action::MigrateKv`],
//!   [`Action::BuildDeployment`], [`Action::RequestSwitch`], [`Action::RetireOld`]) are
//!   answered with the event they name, later, from any thread, through whoever owns the
//!   machine. Answers that arrive after an abort are refused with
//!   [`TransitionError::Finished`](crate::TransitionError::Finished) and can be dropped.

use crate::device::{DeviceId, DeviceSet};
use crate::strategy::{Strategy, TransitionKind};
use std::sync::Arc;

/// Where the workers for new devices come from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WorkerSource {
    /// Take pre-initialised workers from the [`WarmPool`](crate::WarmPool).
    WarmPool,
    /// Initialise them from scratch (the cold-restart baseline).
    Cold,
}

/// The KV-cache budget of a pool, relative to what a device would give a single instance.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KvBudget {
    /// The whole budget.
    Full,
    /// Half of it (the colocated baseline keeps two instances on one device).
    Half,
}

/// What happens to running sequences when the engine switches deployments.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Handoff {
    /// Running sequences stay on their rank with their KV blocks; every rank that still has
    /// sequences exists in the next deployment. The switch is a pointer swap.
    InPlace,
    /// The next deployment is a separate instance: at the switch, the KV blocks of the running
    /// sequences on `from` are copied into the next instance's pools on `to`. The baselines pay
    /// this copy inside the switch.
    MigrateAtSwitch {
        /// Ranks of the old instance.
        from: DeviceSet,
        /// Ranks of the new instance.
        to: DeviceSet,
    },
}

/// Something the executor must do. Emitted by [`Transition::poll_action`](crate::Transition::poll_action).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Action<P> {
    /// Compute the target placement and migration plan (pure, in `expert-placement`), then
    /// answer [`Event::PlanReady`] or [`Event::PlanFailed`]. A cold restart plans a fresh
    /// placement reloaded from disk; the colocated baseline plans a duplicate of every expert.
    ComputePlan {
        /// What changes.
        kind: TransitionKind,
        /// How.
        strategy: Strategy,
        /// The devices serving now.
        from: DeviceSet,
        /// The devices of the next deployment.
        to: DeviceSet,
    },
    /// Failure only: close the failed devices' ranks and drop their workers. Irreversible.
    FenceFailed {
        /// The failed devices.
        devices: DeviceSet,
    },
    /// Put the running sequences of these ranks back in the queue for recompute; answer
    /// [`Event::SequencesRequeued`] with how many.
    RequeueSequences {
        /// Ranks whose sequences are re-queued.
        devices: DeviceSet,
    },
    /// Stop admitting new requests. Only the cold-restart baseline ever emits this.
    PauseIntake,
    /// Admit new requests again.
    ResumeIntake,
    /// Cold restart: tear the old deployment down on these devices (views, KV, workers).
    /// Teardown cannot fail (as in `hbm-vmm`, errors on release are recorded, not returned),
    /// so there is no [`Step`] for it.
    StopOldDeployment {
        /// Its devices.
        devices: DeviceSet,
    },
    /// Cold-restart rollback: bring the old deployment back (from disk) on these devices.
    RestartOldDeployment {
        /// Its devices.
        devices: DeviceSet,
    },
    /// Colocated: shrink the running instance's KV pools on these devices to `budget`, so that
    /// a second instance fits beside it.
    ShrinkKvBudget {
        /// Devices shared by both instances.
        devices: DeviceSet,
        /// The new budget.
        budget: KvBudget,
    },
    /// Give the running instance its full KV budget back.
    RestoreKvBudget {
        /// The devices.
        devices: DeviceSet,
    },
    /// Get workers (contexts, streams, handles, kernels) for these devices.
    AcquireWorkers {
        /// The devices.
        devices: DeviceSet,
        /// From the warm pool or from scratch.
        source: WorkerSource,
    },
    /// Return these devices' workers to the warm pool.
    ReleaseWorkers {
        /// The devices.
        devices: DeviceSet,
    },
    /// Drop these devices' workers without returning them (the devices failed).
    DiscardWorkers {
        /// The devices.
        devices: DeviceSet,
    },
    /// Reserve the next deployment's virtual ranges (per-device expert ranges, attention views).
    ReserveNextViews {
        /// The next deployment's devices.
        devices: DeviceSet,
    },
    /// Unmap and free the next deployment's ranges (rollback).
    ReleaseNextViews {
        /// The devices.
        devices: DeviceSet,
    },
    /// Map the experts that stay on these devices into the next ranges, zero-copy.
    MapKeptExperts {
        /// Devices that keep experts.
        devices: DeviceSet,
    },
    /// Start the plan's copies (peer-to-peer moves and checkpoint reloads) on copy streams;
    /// answer one [`Event::CopiesDone`] or [`Event::CopiesFailed`] per destination device.
    StartCopies {
        /// The plan.
        plan: Arc<P>,
    },
    /// Map the experts that have arrived on `device` into its next range.
    MapMovedExperts {
        /// The device whose copies are done.
        device: DeviceId,
    },
    /// Cancel copies still in flight and free every destination chunk (rollback).
    DiscardCopies,
    /// Create KV pools on these ranks.
    CreateKvPools {
        /// The ranks.
        devices: DeviceSet,
        /// Their budget.
        budget: KvBudget,
    },
    /// Destroy the KV pools of these ranks.
    DestroyKvPools {
        /// The ranks.
        devices: DeviceSet,
    },
    /// Place no new sequence on these ranks any more (intake continues on the others).
    CloseRanks {
        /// The ranks.
        devices: DeviceSet,
    },
    /// Place new sequences on these ranks again (rollback).
    ReopenRanks {
        /// The ranks.
        devices: DeviceSet,
    },
    /// Move the running sequences of ranks `from` to ranks `to` of the running deployment: each
    /// sequence's KV blocks are exported, copied peer-to-peer and imported at an iteration
    /// boundary of its own, and it continues there without recompute. Answer
    /// [`Event::KvMigrated`].
    MigrateKv {
        /// Leaving ranks.
        from: DeviceSet,
        /// Ranks that stay.
        to: DeviceSet,
    },
    /// Stop migrating (rollback). Sequences already moved stay where they are, which is valid
    /// in the running deployment.
    StopKvMigration,
    /// Assemble the next `Deployment` from the prepared views, workers and pools; answer
    /// [`Event::DeploymentBuilt`].
    BuildDeployment {
        /// Its devices.
        devices: DeviceSet,
    },
    /// Drop the next deployment before it ever ran (rollback).
    DropNextDeployment,
    /// At the next iteration boundary, swap the engine's deployment pointer; answer
    /// [`Event::Switched`] with the first iteration on the new deployment.
    RequestSwitch {
        /// What happens to running sequences.
        handoff: Handoff,
    },
    /// Retire the old deployment once its last iteration (the one before `switched_at`) has
    /// finished; answer [`Event::OldDrained`].
    RetireOld {
        /// The first iteration on the new deployment.
        switched_at: u64,
    },
    /// Unmap the old deployment's views on these devices; chunks that no view uses are freed.
    ReleaseOldViews {
        /// The devices.
        devices: DeviceSet,
    },
}

impl<P> Action<P> {
    /// Whether this action pauses request intake. The [`Strategy::Elastic`] machine never emits
    /// one (a documented and tested invariant); only [`Strategy::ColdRestart`] does.
    pub fn pauses_intake(&self) -> bool {
        matches!(self, Action::PauseIntake)
    }
}

/// A step the executor can report as failed with [`Event::StepFailed`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    /// [`Action::AcquireWorkers`].
    AcquireWorkers,
    /// [`Action::ReserveNextViews`].
    ReserveNextViews,
    /// [`Action::MapKeptExperts`] or [`Action::MapMovedExperts`].
    MapExperts,
    /// [`Action::CreateKvPools`].
    CreateKvPools,
    /// [`Action::ShrinkKvBudget`].
    ShrinkKvBudget,
    /// [`Action::MigrateKv`].
    MigrateKv,
    /// [`Action::BuildDeployment`].
    BuildDeployment,
}

/// Something that happened, reported by the executor to [`Transition::handle`](crate::Transition::handle).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event<P> {
    /// The plan asked for by [`Action::ComputePlan`].
    PlanReady(P),
    /// The plan could not be computed (for example: the experts do not fit the memory budget).
    PlanFailed {
        /// Why.
        reason: String,
    },
    /// Every copy into `device` has landed and is visible to its compute.
    CopiesDone {
        /// The destination.
        device: DeviceId,
    },
    /// A copy into `device` failed.
    CopiesFailed {
        /// The destination.
        device: DeviceId,
        /// Why.
        reason: String,
    },
    /// Answer to [`Action::RequeueSequences`].
    SequencesRequeued {
        /// How many sequences went back to the queue (they will be recomputed).
        count: u64,
    },
    /// Answer to [`Action::MigrateKv`].
    KvMigrated {
        /// Sequences moved.
        sequences: u64,
        /// KV bytes copied.
        bytes: u64,
    },
    /// An acquiring step failed; the executor has undone its own partial effect.
    StepFailed {
        /// Which step.
        step: Step,
        /// Why.
        reason: String,
    },
    /// Answer to [`Action::BuildDeployment`].
    DeploymentBuilt,
    /// The engine switched deployments; `iteration` is the first one on the new deployment.
    Switched {
        /// The first iteration on the new deployment.
        iteration: u64,
    },
    /// The old deployment's last iteration has finished.
    OldDrained,
    /// A device failed (detected by the engine or injected by a test).
    DeviceFailed {
        /// The device.
        device: DeviceId,
    },
    /// An operator or the coordinator asks to abort.
    AbortRequested,
}

/// The name of an [`Event`] without its payload, for error messages and tests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[allow(missing_docs)]
pub enum EventKind {
    PlanReady,
    PlanFailed,
    CopiesDone,
    CopiesFailed,
    SequencesRequeued,
    KvMigrated,
    StepFailed,
    DeploymentBuilt,
    Switched,
    OldDrained,
    DeviceFailed,
    AbortRequested,
}

impl<P> Event<P> {
    /// The event's name.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::PlanReady(_) => EventKind::PlanReady,
            Event::PlanFailed { .. } => EventKind::PlanFailed,
            Event::CopiesDone { .. } => EventKind::CopiesDone,
            Event::CopiesFailed { .. } => EventKind::CopiesFailed,
            Event::SequencesRequeued { .. } => EventKind::SequencesRequeued,
            Event::KvMigrated { .. } => EventKind::KvMigrated,
            Event::StepFailed { .. } => EventKind::StepFailed,
            Event::DeploymentBuilt => EventKind::DeploymentBuilt,
            Event::Switched { .. } => EventKind::Switched,
            Event::OldDrained => EventKind::OldDrained,
            Event::DeviceFailed { .. } => EventKind::DeviceFailed,
            Event::AbortRequested => EventKind::AbortRequested,
        }
    }
}

/// Something the machine acquired and must release on rollback. Listed in the order a ledger
/// may hold them; the machine releases newest first.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Resource {
    /// Intake is paused ([`Action::PauseIntake`]); released by [`Action::ResumeIntake`].
    IntakePaused,
    /// The old deployment was stopped; released by [`Action::RestartOldDeployment`].
    OldDeploymentStopped(DeviceSet),
    /// KV budgets were shrunk; released by [`Action::RestoreKvBudget`].
    KvBudgetShrunk(DeviceSet),
    /// Workers acquired; released by [`Action::ReleaseWorkers`] (or
    /// [`Action::DiscardWorkers`] for devices that failed meanwhile).
    Workers(DeviceSet),
    /// Next ranges reserved (and whatever was mapped into them); released by
    /// [`Action::ReleaseNextViews`].
    NextViews(DeviceSet),
    /// Copy destinations allocated, copies maybe in flight; released by
    /// [`Action::DiscardCopies`].
    CopyDestinations,
    /// KV pools created; released by [`Action::DestroyKvPools`].
    KvPools(DeviceSet),
    /// Ranks closed to new sequences; released by [`Action::ReopenRanks`].
    ClosedRanks(DeviceSet),
    /// A KV migration running; released by [`Action::StopKvMigration`].
    KvMigration,
    /// The next deployment exists; released by [`Action::DropNextDeployment`].
    NextDeployment,
}

impl Resource {
    /// The actions that release this resource. Workers of devices in `failed` are discarded
    /// rather than returned to the pool.
    pub fn release_actions<P>(&self, failed: &DeviceSet) -> Vec<Action<P>> {
        match self {
            Resource::IntakePaused => vec![Action::ResumeIntake],
            Resource::OldDeploymentStopped(d) => {
                vec![Action::RestartOldDeployment { devices: d.clone() }]
            }
            Resource::KvBudgetShrunk(d) => vec![Action::RestoreKvBudget { devices: d.clone() }],
            Resource::Workers(d) => {
                let healthy = d.difference(failed);
                let dead = d.intersection(failed);
                let mut out = Vec::new();
                if !healthy.is_empty() {
                    out.push(Action::ReleaseWorkers { devices: healthy });
                }
                if !dead.is_empty() {
                    out.push(Action::DiscardWorkers { devices: dead });
                }
                out
            }
            Resource::NextViews(d) => vec![Action::ReleaseNextViews { devices: d.clone() }],
            Resource::CopyDestinations => vec![Action::DiscardCopies],
            Resource::KvPools(d) => vec![Action::DestroyKvPools { devices: d.clone() }],
            Resource::ClosedRanks(d) => vec![Action::ReopenRanks { devices: d.clone() }],
            Resource::KvMigration => vec![Action::StopKvMigration],
            Resource::NextDeployment => vec![Action::DropNextDeployment],
        }
    }
}
