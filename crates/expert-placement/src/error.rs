//! Typed errors, one enum per concern: building a placement, planning a migration, and replaying a
//! plan. Every message says what was wrong and, where there is one, what to change.

use crate::{DeviceId, ExpertId};

/// Why a placement (or a load table) could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The device list is empty.
    #[error("a placement needs at least one device, but the device list is empty")]
    NoDevices,
    /// Zero MoE layers were asked for.
    #[error("a placement needs at least one MoE layer, but 0 layers were given")]
    NoLayers,
    /// Zero experts per layer were asked for.
    #[error("a placement needs at least one expert per layer, but 0 experts were given")]
    NoExperts,
    /// More layers or experts than this crate plans for.
    #[error(
        "{layers} layers x {experts} experts is beyond the supported {max_layers} layers x \
         {max_experts} experts per layer"
    )]
    TooLarge {
        /// Layers asked for.
        layers: usize,
        /// Experts per layer asked for.
        experts: usize,
        /// [`crate::MAX_LAYERS`].
        max_layers: usize,
        /// [`crate::MAX_EXPERTS_PER_LAYER`].
        max_experts: usize,
    },
    /// A device id appears twice in a device list.
    #[error("device {0} is listed twice; device ids in a placement must be unique")]
    DuplicateDevice(DeviceId),
    /// More redundant slots than distinct (device, expert) pairs allow.
    #[error(
        "{requested} redundant slots do not fit on {devices} device(s) with {experts} experts per \
         layer: a device holds at most one copy of an expert, so at most {max} redundant slots fit \
         (experts x (devices - 1)); use fewer redundant slots or more devices"
    )]
    TooManyRedundantSlots {
        /// Redundant slots asked for.
        requested: usize,
        /// The most that fit.
        max: usize,
        /// Devices in the placement.
        devices: usize,
        /// Experts per layer.
        experts: usize,
    },
    /// The per-device slot budget cannot hold every slot of a layer.
    #[error(
        "a budget of {max_slots_per_device} slots per device on {devices} device(s) holds \
         {capacity} slots per layer, but each layer needs {needed} (experts + redundant slots); \
         raise the slot budget or lower the redundant slots"
    )]
    SlotBudgetTooSmall {
        /// The budget asked for (after capping at the number of experts: a device never holds an
        /// expert twice).
        max_slots_per_device: usize,
        /// Devices in the placement.
        devices: usize,
        /// `max_slots_per_device * devices`.
        capacity: usize,
        /// Slots each layer needs.
        needed: usize,
    },
    /// A load table's shape does not match the placement it is used with.
    #[error(
        "the load table is {load_layers} layers x {load_experts} experts, but the placement is \
         {layers} layers x {experts} experts"
    )]
    LoadShapeMismatch {
        /// Layers in the load table.
        load_layers: usize,
        /// Experts per layer in the load table.
        load_experts: usize,
        /// Layers in the placement.
        layers: usize,
        /// Experts per layer in the placement.
        experts: usize,
    },
    /// Load rows of different lengths.
    #[error("load row {layer} has {found} experts but row 0 has {expected}; every row must have the same length")]
    RaggedLoad {
        /// The offending row.
        layer: usize,
        /// Its length.
        found: usize,
        /// Row 0's length.
        expected: usize,
    },
    /// A load update named a layer or expert outside the table.
    #[error("load entry (layer {layer}, expert {expert}) is outside a table of {layers} layers x {experts} experts")]
    LoadIndexOutOfRange {
        /// Layer asked for.
        layer: usize,
        /// Expert asked for.
        expert: usize,
        /// Layers in the table.
        layers: usize,
        /// Experts per layer in the table.
        experts: usize,
    },
    /// A layer lists a different number of device rows than there are devices.
    #[error("layer {layer} has {found} device rows, but {expected} devices were given")]
    DeviceCountMismatch {
        /// The offending layer.
        layer: usize,
        /// Rows found.
        found: usize,
        /// Devices given.
        expected: usize,
    },
    /// A slot names an expert id outside `0..experts_per_layer`.
    #[error("layer {layer}, device {device}: expert {expert} is out of range (experts per layer: {experts})")]
    ExpertOutOfRange {
        /// The layer.
        layer: usize,
        /// The device.
        device: DeviceId,
        /// The bad id.
        expert: ExpertId,
        /// Experts per layer.
        experts: usize,
    },
    /// A device holds the same expert twice in one layer.
    #[error("layer {layer}, device {device}: expert {expert} appears twice; a device holds at most one copy of each expert")]
    DuplicateSlot {
        /// The layer.
        layer: usize,
        /// The device.
        device: DeviceId,
        /// The repeated expert.
        expert: ExpertId,
    },
    /// An expert has no copy anywhere in a layer.
    #[error(
        "layer {layer}: expert {expert} has no copy on any device; every expert needs at least one"
    )]
    MissingExpert {
        /// The layer.
        layer: usize,
        /// The expert without a copy.
        expert: ExpertId,
    },
    /// Layers with different slot totals.
    #[error("layer {layer} has {found} slots but layer 0 has {expected}; every layer must have the same number of slots")]
    UnequalSlotTotals {
        /// The offending layer.
        layer: usize,
        /// Its slot total.
        found: usize,
        /// Layer 0's slot total.
        expected: usize,
    },
}

/// Why a migration plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The two placements describe different models.
    #[error(
        "the placements describe different models: old is {old_layers} layers x {old_experts} \
         experts, new is {new_layers} layers x {new_experts} experts"
    )]
    ShapeMismatch {
        /// Layers in the old placement.
        old_layers: usize,
        /// Experts per layer in the old placement.
        old_experts: usize,
        /// Layers in the new placement.
        new_layers: usize,
        /// Experts per layer in the new placement.
        new_experts: usize,
    },
    /// `expert_bytes` was zero.
    #[error("expert_bytes is 0; give the size in bytes of one expert's weights in one layer")]
    ZeroExpertBytes,
    /// A device that holds or receives experts has no memory budget.
    #[error("device {device} has no memory budget; give every device of the old and the new placement a budget")]
    MissingBudget {
        /// The device.
        device: DeviceId,
    },
    /// The budgets together cannot hold even one copy of every expert.
    #[error(
        "the memory budgets together hold {total_budget} bytes, but one copy of every expert of \
         every layer needs {needed} bytes; add devices or raise the budgets"
    )]
    BudgetTooSmall {
        /// Bytes for one copy of each expert in each layer.
        needed: u64,
        /// The sum of the budgets of the new placement's devices.
        total_budget: u64,
    },
    /// A device already holds more than its budget before the plan starts.
    #[error(
        "device {device} already holds {bytes} bytes of experts, over its budget of {budget} bytes"
    )]
    OldOverBudget {
        /// The device.
        device: DeviceId,
        /// Bytes it holds now.
        bytes: u64,
        /// Its budget.
        budget: u64,
    },
    /// The target placement does not fit a device's budget.
    #[error(
        "device {device} needs {bytes} bytes for its {slots} expert slots in the new placement, \
         over its budget of {budget} bytes; pick a placement with fewer slots on it or raise the budget"
    )]
    TargetOverBudget {
        /// The device.
        device: DeviceId,
        /// Slots (over all layers) the new placement gives it.
        slots: usize,
        /// Bytes those slots take.
        bytes: u64,
        /// Its budget.
        budget: u64,
    },
    /// A device listed as failed is not in the old placement.
    #[error("device {device} is listed as failed but is not in the old placement")]
    FailedDeviceNotInOld {
        /// The device.
        device: DeviceId,
    },
    /// A device listed as failed is in the new placement.
    #[error("device {device} is listed as failed but the new placement puts experts on it")]
    FailedDeviceInTarget {
        /// The device.
        device: DeviceId,
    },
    /// No step order keeps every expert live and every device within budget.
    #[error(
        "no order of steps keeps every expert live and every device within its budget: device \
         {device} is full and must receive expert {expert} of layer {layer}, and every copy it \
         could give up is the last live copy of its expert, with no device left that has room to \
         stage it; give at least one device room for one more expert"
    )]
    NoFeasibleOrder {
        /// A device that is stuck.
        device: DeviceId,
        /// The layer of a copy it cannot receive.
        layer: usize,
        /// The expert it cannot receive.
        expert: ExpertId,
    },
}

/// What a replayed plan got wrong (see [`crate::MigrationPlan::validate`]). `step` is the index into
/// [`crate::MigrationPlan::steps`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanViolation {
    /// The placements given to the replay do not match each other.
    #[error("the placements describe different models ({old_layers}x{old_experts} vs {new_layers}x{new_experts})")]
    ShapeMismatch {
        /// Layers in the old placement.
        old_layers: usize,
        /// Experts per layer in the old placement.
        old_experts: usize,
        /// Layers in the new placement.
        new_layers: usize,
        /// Experts per layer in the new placement.
        new_experts: usize,
    },
    /// A device used by the plan has no budget.
    #[error("device {device} has no memory budget")]
    MissingBudget {
        /// The device.
        device: DeviceId,
    },
    /// A step names a layer or expert outside the model.
    #[error("step {step}: layer {layer} / expert {expert} is outside the model")]
    OutOfRange {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
    },
    /// A step puts a copy on a failed device or reads from one.
    #[error("step {step}: device {device} has failed and can neither send nor receive")]
    FailedDeviceUsed {
        /// The step.
        step: usize,
        /// The failed device.
        device: DeviceId,
    },
    /// A keep step names a copy that is not live or not in the target.
    #[error(
        "step {step}: keep of expert {expert} (layer {layer}) on device {device}, but {reason}"
    )]
    BadKeep {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// Its device.
        device: DeviceId,
        /// What is wrong.
        reason: &'static str,
    },
    /// A copy that both placements share has no keep step (the engine relies on keeps to map
    /// chunks zero-copy).
    #[error("expert {expert} (layer {layer}) stays on device {device} but the plan has no keep step for it")]
    MissingKeep {
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// Its device.
        device: DeviceId,
    },
    /// A move reads from a device that holds no live copy.
    #[error("step {step}: move of expert {expert} (layer {layer}) from device {from}, which holds no live copy")]
    SourceNotLive {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// The source.
        from: DeviceId,
    },
    /// A move or reload targets a device that already holds the expert.
    #[error("step {step}: device {device} already holds expert {expert} (layer {layer})")]
    AlreadyHeld {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// The destination.
        device: DeviceId,
    },
    /// A reload of an expert that still had a live copy (it should have been a peer copy).
    #[error("step {step}: reload of expert {expert} (layer {layer}) from the checkpoint although a live copy exists")]
    NeedlessReload {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
    },
    /// A device holds more than its budget before the first step.
    #[error(
        "before the first step, device {device} holds {bytes} bytes, over its budget of {budget}"
    )]
    InitialOverBudget {
        /// The device.
        device: DeviceId,
        /// Bytes it holds.
        bytes: u64,
        /// Its budget.
        budget: u64,
    },
    /// A device would go over its budget.
    #[error("step {step}: device {device} would hold {bytes} bytes, over its budget of {budget}")]
    OverBudget {
        /// The step.
        step: usize,
        /// The device.
        device: DeviceId,
        /// Bytes it would hold.
        bytes: u64,
        /// Its budget.
        budget: u64,
    },
    /// A drop of a copy that is not there.
    #[error("step {step}: drop of expert {expert} (layer {layer}) on device {device}, which does not hold it")]
    DropOfAbsentCopy {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// The device.
        device: DeviceId,
    },
    /// A drop of an expert's last live copy.
    #[error("step {step}: drop of expert {expert} (layer {layer}) on device {device} removes its last live copy")]
    LastReplicaDropped {
        /// The step.
        step: usize,
        /// Its layer.
        layer: usize,
        /// Its expert.
        expert: ExpertId,
        /// The device.
        device: DeviceId,
    },
    /// After the last step the state differs from the target placement.
    #[error("after the last step, device {device} {what} expert {expert} in layer {layer}, unlike the target placement")]
    FinalStateDiffers {
        /// The layer.
        layer: usize,
        /// The device.
        device: DeviceId,
        /// The expert.
        expert: ExpertId,
        /// `"holds"` (an extra copy) or `"lacks"` (a missing one).
        what: &'static str,
    },
    /// The plan's own accounting disagrees with the replay.
    #[error("the plan reports {what} = {reported}, but replaying it gives {replayed}")]
    ReportMismatch {
        /// Which figure.
        what: &'static str,
        /// What the plan says.
        reported: u64,
        /// What the replay measured.
        replayed: u64,
    },
}
