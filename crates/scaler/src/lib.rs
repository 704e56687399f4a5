//! `scaler`: when and how a serving deployment grows, shrinks, rebalances or survives a failure.
//!
//! # What it owns
//!
//! - [`Transition`]: a deterministic, sans-IO state machine in quinn-proto's style. Events go
//!   in ([`Transition::handle`]), actions come out ([`Transition::poll_action`]), and the time
//!   is injected ([`Time`]). It runs Plan → Prepare → Switch → Retire, or aborts and rolls back
//!   from any phase before the switch, releasing everything it acquired (its ledger of
//!   [`Resource`]s). It carries out scale-up, scale-down, rebalance and failure recovery
//!   ([`TransitionKind`]) by four strategies ([`Strategy`]): ours (elastic) and the three
//!   baselines (cold restart, extravagant, colocated), as different action sequences of the
//!   same machine so that one executor runs all four on the same engine.
//! - [`Coordinator`]: accepts scale commands ([`ScaleCommand`]), validates them against the
//!   devices that exist, runs one transition at a time, queues commands that arrive meanwhile
//!   (bounded, FIFO; a full queue rejects with [`CommandError::QueueFull`]), reports an outcome
//!   for every accepted command, and recovers from device failures first.
//! - [`Policy`] and [`SloPolicy`]: an autoscaler over plain observations (TTFT/TPOT per
//!   request, queue depth, running sequences, KV usage, tokens/s) with SLO attainment over a
//!   sliding window, sustained triggers, hysteresis, cooldown and min/max devices.
//! - [`WarmPool`]: pre-initialised device workers, generic over a [`WorkerFactory`], LRU.
//!
//! The machine is generic over the plan ([`TransitionPlan`]); `expert-placement`'s
//! `MigrationPlan` implements it, and [`PlanSummary`] is a plain stand-in for tests and for
//! strategies that plan elsewhere.
//!
//! # Architecture invariants
//!
//! - **No I/O and no clock.** Nothing here touches a device, a file, a thread (other than the
//!   caller's, in [`WarmPool`]) or the system clock, and the crate depends on no engine (no
//!   engine crate, no `hbm-vmm`). The drivers live above it in `scaler-exec`: its executor
//!   carries out actions with `hbm-vmm`, `p2p-xfer`, `kv-pool` and `moe-host`, and its demo
//!   loop feeds the policy; time comes in as [`Time`].
//! - **Never pause intake, never block the serving loop.** The elastic strategy emits no action
//!   that pauses request intake ([`Action::pauses_intake`]); only the cold-restart baseline
//!   does. The switch is one [`Action::RequestSwitch`], an O(1) pointer swap that the engine
//!   performs at an iteration boundary; the machine never waits on an iteration.
//! - **Nothing is lost.** Invalid events and commands return typed errors (`#[non_exhaustive]`
//!   `thiserror` enums) and change nothing; no input panics. An abort releases every acquired
//!   resource. Every accepted command gets exactly one [`Outcome`].
//! - Deterministic: the same inputs at the same times give the same actions.
//!
//! # Example
//!
//! ```
//! use scaler::{Action, DeviceSet, Event, Phase, PlanSummary, Strategy, Time, Transition,
//!              TransitionKind, TransitionSpec};
//!
//! // Scale up from devices {0, 1} to {0, 1, 2}.
//! let spec = TransitionSpec {
//!     kind: TransitionKind::ScaleUp,
//!     strategy: Strategy::Elastic,
//!     from: DeviceSet::from([0, 1]),
//!     to: DeviceSet::from([0, 1, 2]),
//! };
//! let mut t = Transition::<PlanSummary>::new(spec, Time::ZERO).unwrap();
//! assert!(matches!(t.poll_action(), Some(Action::ComputePlan { .. })));
//!
//! // The executor computed the plan: 1 MiB goes to device 2, 3 MiB stay in place.
//! let plan = PlanSummary::copies(&DeviceSet::from([2]), 1 << 20, 3 << 20);
//! t.handle(Event::PlanReady(plan), Time::from_millis(2)).unwrap();
//! let prepare: Vec<_> = std::iter::from_fn(|| t.poll_action()).collect();
//! assert!(prepare.iter().all(|a| !a.pauses_intake()));
//!
//! t.handle(Event::CopiesDone { device: scaler::DeviceId(2) }, Time::from_millis(40)).unwrap();
//! t.handle(Event::DeploymentBuilt, Time::from_millis(41)).unwrap();
//! t.handle(Event::Switched { iteration: 900 }, Time::from_millis(45)).unwrap();
//! t.handle(Event::OldDrained, Time::from_millis(60)).unwrap();
//! assert_eq!(t.phase(), Phase::Retired);
//! assert_eq!(t.report().latency_ms, Some(45.0));
//! ```
#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod action;
mod coordinator;
mod device;
mod loom;
mod placement_plan;
mod plan;
mod policy;
mod report;
mod strategy;
mod time;
mod transition;
mod warm_pool;

pub use action::{Action, Event, EventKind, Handoff, KvBudget, Resource, Step, WorkerSource};
pub use coordinator::{
    CommandError, CommandId, Coordinator, CoordinatorConfig, CoordinatorError, Outcome,
    ScaleCommand, Submitted, TaggedAction, TransitionId,
};
pub use device::{DeviceId, DeviceSet};
pub use plan::{PlanSummary, TransitionPlan};
pub use policy::{
    ClusterView, Decision, LoadObservation, Observation, Policy, PolicyConfigError,
    RequestObservation, ScaleReason, SloPolicy, SloPolicyConfig,
};
pub use report::{AbortReason, Phase, PhaseTimes, PhasesMs, TransitionReport};
pub use strategy::{Strategy, TransitionKind};
pub use time::{millis, Time};
pub use transition::{SpecError, Transition, TransitionError, TransitionSpec};
pub use warm_pool::{PoolError, PoolStats, Taken, WarmPool, WarmPoolConfig, WorkerFactory};
