//! A scale-up transition driven by hand: events in, actions out, time injected.
//!
//! Run: `cargo run -p scaler --example quickstart` (no GPU needed).

use scaler::{
    Action, DeviceSet, Event, Phase, PlanSummary, Strategy, Time, Transition, TransitionKind,
    TransitionSpec,
};

fn main() {
    // Scale up from devices {0, 1} to {0, 1, 2}.
    let spec = TransitionSpec {
        kind: TransitionKind::ScaleUp,
        strategy: Strategy::Elastic,
        from: DeviceSet::from([0, 1]),
        to: DeviceSet::from([0, 1, 2]),
    };
    let mut t = Transition::<PlanSummary>::new(spec, Time::ZERO).unwrap();
    assert!(matches!(t.poll_action(), Some(Action::ComputePlan { .. })));

    // The executor computed the plan: 1 MiB goes to device 2, 3 MiB stay in place.
    let plan = PlanSummary::copies(&DeviceSet::from([2]), 1 << 20, 3 << 20);
    t.handle(Event::PlanReady(plan), Time::from_millis(2))
        .unwrap();
    let prepare: Vec<_> = std::iter::from_fn(|| t.poll_action()).collect();
    assert!(prepare.iter().all(|a| !a.pauses_intake()));

    t.handle(
        Event::CopiesDone {
            device: scaler::DeviceId(2),
        },
        Time::from_millis(40),
    )
    .unwrap();
    t.handle(Event::DeploymentBuilt, Time::from_millis(41))
        .unwrap();
    t.handle(Event::Switched { iteration: 900 }, Time::from_millis(45))
        .unwrap();
    t.handle(Event::OldDrained, Time::from_millis(60)).unwrap();
    assert_eq!(t.phase(), Phase::Retired);
    assert_eq!(t.report().latency_ms, Some(45.0));
    println!("scaler: ok");
}
