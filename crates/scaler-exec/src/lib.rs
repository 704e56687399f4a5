//! `scaler-exec`: the drivers of `scaler`'s sans-IO transitions on a live engine.
//!
//! `scaler` decides: its [`Transition`](scaler::Transition) machine turns a scale command into
//! actions, its [`Coordinator`](scaler::Coordinator) runs one transition at a time, its
//! [`SloPolicy`](scaler::SloPolicy) says when to scale. It has no engine, no thread, no clock.
//! This crate does: it holds the I/O that carries those actions out.
//!
//! # What it owns
//!
//! - [`executor`]: the host executor ([`HostExecutor`](executor::HostExecutor)). It drives one
//!   [`Transition`](scaler::Transition) to its end on the calling thread, carrying out each
//!   action with `hbm-vmm`, `expert-placement` and `moe-host` (weight copies, deployments
//!   built beside the running one, KV pre-copy, the switch at an iteration boundary), for every
//!   strategy (elastic, cold restart, colocated, extravagant), while the engine's run loop keeps
//!   serving on its own thread. It reads the wall clock and injects it as
//!   [`scaler::Time`].
//! - [`demo`]: the demo's loop ([`demo::drive`]): a trace with a step, a ramp and a burst (the
//!   load generator), the policy fed from the engine's metrics, one transition at a time on a
//!   scaler thread, and the report. It runs over a [`demo::DemoBackend`] of closures, so the host
//!   engine here and the CUDA runner in the `elasticmoe` binary share it.
//! - [`device_spec`]: the one parser of the `--devices` spec ([`DeviceSpec`]: `host:N`, or
//!   `cuda:I,J,...` with one rank per listed GPU index, repeats meaning logical ranks on one
//!   GPU) with typed errors ([`DeviceSpecError`]). It only parses; what a command or a runner
//!   can run on is theirs to check.
//!
//! # Architecture invariants
//!
//! - **Holds no policy.** When to scale and which devices to use are `scaler`'s
//!   ([`SloPolicy`](scaler::SloPolicy), [`demo::target_devices`] only applies a decision to a
//!   strategy); the order and the rollback of a transition's steps are the
//!   [`Transition`](scaler::Transition) machine's. The executor only carries actions out and
//!   reports what happened as events.
//! - **Never blocks the serving loop for longer than one iteration in the elastic strategy.**
//!   Plan, copies and the build of the next deployment run on the caller's thread; the switch is
//!   one pointer swap at an iteration boundary. Only the cold-restart baseline holds the loop,
//!   and that time is its measured downtime.
//! - **Never pauses intake** except for the cold-restart baseline (the [`IntakeGate`] only ever
//!   closes for it).
//! - **The engine keeps serving whatever fails.** A failure before the switch rolls the
//!   transition back; [`ExecError`](executor::ExecError) says why, and the old deployment
//!   keeps serving.
//! - No `unsafe`: memory is touched only through `hbm-vmm`'s and `moe-host`'s safe APIs.
//!
//! [`IntakeGate`]: executor::IntakeGate
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use moe_host::worker::{DeploymentRunner, HostEngineConfig};
//! use moe_model::presets::Preset;
//! use moe_model::weights::MemTensors;
//! use scaler::{DeviceSet, Strategy, TransitionKind, TransitionSpec};
//! use scaler_exec::executor::{Checkpoint, HostExecutor, HostExecutorConfig};
//!
//! // A tiny model on one host device, of at most two.
//! let cfg = Preset::TinyQwen3.config();
//! let checkpoint: Checkpoint = Arc::new(MemTensors::seeded(&cfg, 7));
//! let host = HostEngineConfig { devices: 1, max_devices: 2, ..HostEngineConfig::default() };
//! let (engine, _store) = DeploymentRunner::host_engine(&cfg, checkpoint.as_ref(), &host).unwrap();
//!
//! // Scale up to two devices while the engine's run loop serves.
//! let mut executor = HostExecutor::new(engine.clone(), checkpoint, HostExecutorConfig::default());
//! let serving = engine.start();
//! let event = executor
//!     .run(TransitionSpec {
//!         kind: TransitionKind::ScaleUp,
//!         strategy: Strategy::Elastic,
//!         from: DeviceSet::first(1),
//!         to: DeviceSet::first(2),
//!     })
//!     .unwrap();
//! assert!(event.completed());
//! assert_eq!(event.downtime_ms, 0.0);
//! assert_eq!(executor.devices(), DeviceSet::first(2));
//! serving.stop();
//! ```
#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod demo;
pub mod device_spec;
pub mod executor;

pub use device_spec::{DeviceKind, DeviceSpec, DeviceSpecError};
