//! Plan a scale-up from two devices to three: a balanced placement, a load-aware one over three devices, and the migration plan between them, validated by replay.
//!
//! Run: `cargo run -p expert-placement --example quickstart` (no GPU needed).

use expert_placement::{
    DeviceId, ExpertLoad, MemoryBudgets, MigrationPlan, Placement, PlacementShape,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shape = PlacementShape::new(2, 8, 2); // 2 MoE layers, 8 experts, 2 redundant slots
    let two: Vec<DeviceId> = (0..2).map(DeviceId).collect();
    let three: Vec<DeviceId> = (0..3).map(DeviceId).collect();
    let old = Placement::balanced(&shape, &two)?;
    let load = ExpertLoad::uniform(2, 8)?;
    let new = Placement::rebalanced_for(&old, &three, &load)?;

    let expert_bytes = 1 << 20;
    let budgets = MemoryBudgets::uniform(three.iter().copied(), 16 << 20);
    let plan = MigrationPlan::between(&old, &new, expert_bytes, &budgets)?;
    let report = plan.validate(&old, &new, &budgets)?;
    assert!(report.min_live_copies >= 1);
    // 10 slots over 3 devices: the newcomer needs 3 per layer, and only those move.
    assert_eq!(plan.bytes_moved(), 2 * 3 * expert_bytes);
    println!("expert-placement: ok");
    Ok(())
}
