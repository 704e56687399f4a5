//! Where each MoE expert lives, and how to get from one layout to the next.
//!
//! # What this crate owns
//! - [`Placement`]: for every MoE layer and every device, the ordered list of experts the device
//!   holds (its *slots*, the layout of its contiguous expert range), with replicas allowed. Built
//!   by [`Placement::balanced`], [`Placement::round_robin`], [`Placement::load_aware`] (hot
//!   experts get replicas, then greedy bin packing, in the spirit of DeepSeek's EPLB), or
//!   [`Placement::from_slots`]. Routing picks a replica with [`Placement::replica_for`].
//! - [`Placement::rebalanced_for`]: the target for a new device set (or a new load) that is
//!   balanced and keeps every copy that can stay, so the bytes moved are the least a balanced
//!   target allows.
//! - [`MigrationPlan`]: the ordered keep / move / drop / reload steps from one placement to
//!   another, such that every expert always has a live replica and no device goes over its memory
//!   budget; with [`MigrationPlan::validate`], an independent step-by-step replay that proves it.
//!
//! # Architecture invariants
//! - Pure, deterministic math in the style of quinn-proto's core: no I/O, no clocks, no threads,
//!   no randomness, no memory or device access, and no dependency on other project crates. The
//!   same inputs always give the same placement and the same plan, on every machine.
//! - Devices are opaque [`DeviceId`]s chosen by the caller (the engine maps them to its own
//!   device handles); experts are [`ExpertId`]s within a layer.
//! - Bad input is a typed error ([`PlacementError`], [`PlanError`]); a plan that breaks a
//!   guarantee is a typed [`PlanViolation`]. Nothing here panics on caller input.
//!
//! # Example: scale up from 2 to 3 devices
//! ```
//! use expert_placement::{
//!     DeviceId, ExpertLoad, MemoryBudgets, MigrationPlan, Placement, PlacementShape,
//! };
//!
//! let shape = PlacementShape::new(2, 8, 2); // 2 MoE layers, 8 experts, 2 redundant slots
//! let two: Vec<DeviceId> = (0..2).map(DeviceId).collect();
//! let three: Vec<DeviceId> = (0..3).map(DeviceId).collect();
//! let old = Placement::balanced(&shape, &two)?;
//! let load = ExpertLoad::uniform(2, 8)?;
//! let new = Placement::rebalanced_for(&old, &three, &load)?;
//!
//! let expert_bytes = 1 << 20;
//! let budgets = MemoryBudgets::uniform(three.iter().copied(), 16 << 20);
//! let plan = MigrationPlan::between(&old, &new, expert_bytes, &budgets)?;
//! let report = plan.validate(&old, &new, &budgets)?;
//! assert!(report.min_live_copies >= 1);
//! // 10 slots over 3 devices: the newcomer needs 3 per layer, and only those move.
//! assert_eq!(plan.bytes_moved(), 2 * 3 * expert_bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod error;
mod ids;
mod load;
mod migration;
mod packing;
mod placement;
mod rebalance;
mod replay;
mod replication;

pub use error::{PlacementError, PlanError, PlanViolation};
pub use ids::{DeviceId, ExpertId};
pub use load::ExpertLoad;
pub use migration::{MemoryBudgets, MigrationPlan, MigrationStep};
pub use placement::{
    max_redundant_slots, Placement, PlacementShape, MAX_EXPERTS_PER_LAYER, MAX_LAYERS,
};
pub use rebalance::RebalanceConfig;
pub use replay::ReplayReport;
