//! Scale a live host engine from one device to two with the host executor while it serves.
//!
//! Run: `cargo run -p scaler-exec --example quickstart` (no GPU needed).

use std::sync::Arc;

fn main() {
    use moe_host::worker::{DeploymentRunner, HostEngineConfig};
    use moe_model::presets::Preset;
    use moe_model::weights::MemTensors;
    use scaler::{DeviceSet, Strategy, TransitionKind, TransitionSpec};
    use scaler_exec::executor::{Checkpoint, HostExecutor, HostExecutorConfig};

    // A tiny model on one host device, of at most two.
    let cfg = Preset::TinyQwen3.config();
    let checkpoint: Checkpoint = Arc::new(MemTensors::seeded(&cfg, 7));
    let host = HostEngineConfig {
        devices: 1,
        max_devices: 2,
        ..HostEngineConfig::default()
    };
    let (engine, _store) = DeploymentRunner::host_engine(&cfg, checkpoint.as_ref(), &host).unwrap();

    // Scale up to two devices while the engine's run loop serves.
    let mut executor = HostExecutor::new(engine.clone(), checkpoint, HostExecutorConfig::default());
    let serving = engine.start();
    let event = executor
        .run(TransitionSpec {
            kind: TransitionKind::ScaleUp,
            strategy: Strategy::Elastic,
            from: DeviceSet::first(1),
            to: DeviceSet::first(2),
        })
        .unwrap();
    assert!(event.completed());
    assert_eq!(event.downtime_ms, 0.0);
    assert_eq!(executor.devices(), DeviceSet::first(2));
    serving.stop();
    println!("scaler-exec: ok");
}
