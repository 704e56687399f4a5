//! Property tests: random event sequences against every kind of transition.
//!
//! Whatever arrives, the machine never panics, a refused event changes nothing, the world never
//! sees a resource released twice or acquired twice, intake is paused only by the cold restart,
//! and the machine can always be brought to Retired or Aborted: after an abort the world holds
//! exactly what it held before the transition, after a retire exactly the next deployment.

mod common;

use common::{all_specs, world_after_abort, Driver, World};
use proptest::prelude::*;
use scaler::{DeviceId, Event, Phase, PlanSummary, Step, Strategy as How};

/// One input: the executor's correct next answer, or an arbitrary event.
#[derive(Clone, Debug)]
enum Input {
    Answer,
    Any(Event<PlanSummary>),
}

fn device() -> impl Strategy<Value = DeviceId> {
    (0u32..6).prop_map(DeviceId)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::AcquireWorkers),
        Just(Step::ReserveNextViews),
        Just(Step::MapExperts),
        Just(Step::CreateKvPools),
        Just(Step::ShrinkKvBudget),
        Just(Step::MigrateKv),
        Just(Step::BuildDeployment),
    ]
}

fn plan() -> impl Strategy<Value = PlanSummary> {
    (
        proptest::collection::btree_map(device(), 0u64..1000, 0..4),
        0u64..1000,
    )
        .prop_map(|(moved_to, zero_copy)| PlanSummary {
            moved_to,
            zero_copy,
            ..PlanSummary::default()
        })
}

fn event() -> impl Strategy<Value = Event<PlanSummary>> {
    prop_oneof![
        plan().prop_map(Event::PlanReady),
        Just(Event::PlanFailed {
            reason: "no fit".into()
        }),
        device().prop_map(|device| Event::CopiesDone { device }),
        device().prop_map(|device| Event::CopiesFailed {
            device,
            reason: "link".into()
        }),
        (0u64..10).prop_map(|count| Event::SequencesRequeued { count }),
        (0u64..10).prop_map(|sequences| Event::KvMigrated {
            sequences,
            bytes: sequences * 64
        }),
        step().prop_map(|step| Event::StepFailed {
            step,
            reason: "injected".into()
        }),
        Just(Event::DeploymentBuilt),
        (0u64..1000).prop_map(|iteration| Event::Switched { iteration }),
        Just(Event::OldDrained),
        device().prop_map(|device| Event::DeviceFailed { device }),
        Just(Event::AbortRequested),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![3 => Just(Input::Answer), 1 => event().prop_map(Input::Any)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_events_never_break_the_machine(
        which in 0..all_specs().len(),
        inputs in proptest::collection::vec(input(), 0..40),
    ) {
        let spec = all_specs()[which].clone();
        let mut d = Driver::new(spec.clone());
        for input in inputs {
            let event = match input {
                Input::Answer => match d.next_answer() {
                    Some(e) => e,
                    None => continue,
                },
                Input::Any(e) => e,
            };
            let phase = d.t.phase();
            let report = d.t.report();
            let ledger = d.t.ledger().to_vec();
            let actions_before = d.log.len();
            if d.feed(event.clone()).is_err() {
                prop_assert_eq!(d.t.phase(), phase, "refused {:?} changed the phase", event);
                prop_assert_eq!(d.t.report(), report);
                prop_assert_eq!(d.t.ledger(), &ledger[..]);
                prop_assert_eq!(d.log.len(), actions_before, "refused {:?} emitted actions", event);
            }
            prop_assert!(d.world.violations.is_empty(), "{:?}\n{:?}", d.world.violations, d.log);
            if spec.strategy != How::ColdRestart {
                prop_assert!(!d.log.iter().any(|a| a == "PauseIntake"));
            }
        }

        // Bring it to an end the way an executor would.
        if d.t.phase().is_before_switch() {
            d.feed(Event::AbortRequested).expect("abort before the switch is always accepted");
        }
        if d.t.phase() == Phase::Switch {
            d.feed(Event::Switched { iteration: 1 }).expect("switch");
        }
        if d.t.phase() == Phase::Retire {
            d.feed(Event::OldDrained).expect("drain");
        }
        prop_assert!(d.t.is_finished());
        prop_assert!(d.world.violations.is_empty(), "{:?}\n{:?}", d.world.violations, d.log);
        prop_assert!(!d.world.tokens().contains_key(&common::Token::IntakePaused));
        let expected = match d.t.phase() {
            Phase::Aborted => world_after_abort(&spec),
            Phase::Retired => World::retired_onto(&spec.to),
            other => unreachable!("not finished: {other:?}"),
        };
        prop_assert_eq!(d.world.tokens(), expected.tokens(), "{:?}\n{:?}", d.t.phase(), d.log);
        prop_assert!(d.t.ledger().is_empty());
        let r = d.t.report();
        prop_assert!(r.phases_ms.plan >= 0.0 && r.phases_ms.retire >= 0.0);
        prop_assert_eq!(r.from, spec.from);
    }
}
