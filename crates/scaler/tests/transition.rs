//! The transition machine: legal paths for every strategy and kind, golden action sequences,
//! rollback from every phase before the switch, and every illegal event in every phase.

mod common;

use common::{all_specs, dev, world_after_abort, Driver, World};
use scaler::{
    AbortReason, Action, DeviceSet, Event, EventKind, Phase, PlanSummary, SpecError, Step,
    Strategy, Time, Transition, TransitionError, TransitionKind, TransitionSpec,
};

fn spec(kind: TransitionKind, strategy: Strategy, from: &[u32], to: &[u32]) -> TransitionSpec {
    TransitionSpec {
        kind,
        strategy,
        from: from.iter().copied().map(scaler::DeviceId).collect(),
        to: to.iter().copied().map(scaler::DeviceId).collect(),
    }
}

fn assert_clean(d: &Driver) {
    assert!(
        d.world.violations.is_empty(),
        "violations: {:?}\nlog: {:?}",
        d.world.violations,
        d.log
    );
}

#[test]
fn every_spec_runs_to_retired_and_leaves_exactly_the_next_deployment() {
    for s in all_specs() {
        let mut d = Driver::new(s.clone());
        d.run();
        assert_eq!(d.t.phase(), Phase::Retired, "{s:?}\nlog: {:?}", d.log);
        assert_clean(&d);
        assert_eq!(
            d.world.tokens(),
            World::retired_onto(&s.to).tokens(),
            "{s:?}\nlog: {:?}",
            d.log
        );
        assert!(d.t.ledger().is_empty());
        let r = d.t.report();
        assert_eq!(r.phase, Phase::Retired);
        let p = r.phases_ms;
        assert!(
            p.plan > 0.0 && p.prepare > 0.0 && p.switch > 0.0 && p.retire > 0.0,
            "{p:?}"
        );
        let total = r.times.retired.unwrap().saturating_since(r.times.started);
        assert!((p.plan + p.prepare + p.switch + p.retire - scaler::millis(total)).abs() < 1e-9);
    }
}

#[test]
fn golden_elastic_scale_up() {
    let mut d = Driver::new(spec(
        TransitionKind::ScaleUp,
        Strategy::Elastic,
        &[0, 1],
        &[0, 1, 2],
    ));
    d.run();
    assert_eq!(
        d.log,
        [
            "ComputePlan",
            "AcquireWorkers{2}:WarmPool",
            "ReserveNext{0, 1, 2}",
            "MapKept{0, 1}",
            "StartCopies",
            "CreateKv{2}:Full",
            "MapMoved{2}",
            "Build{0, 1, 2}",
            "Switch:InPlace",
            "RetireOld",
            "ReleaseOldViews{0, 1}",
        ]
    );
    let r = d.t.report();
    assert_eq!(
        (r.bytes_moved, r.bytes_zero_copy, r.bytes_reloaded),
        (250, 750, 0)
    );
    assert_eq!(r.intake_paused_ms, 0.0);
    assert_eq!(d.t.switched_at(), Some(100));
}

#[test]
fn golden_elastic_scale_down_migrates_kv_before_the_switch() {
    let mut d = Driver::new(spec(
        TransitionKind::ScaleDown,
        Strategy::Elastic,
        &[0, 1, 2],
        &[0, 1],
    ));
    d.run();
    assert_eq!(
        d.log,
        [
            "ComputePlan",
            "ReserveNext{0, 1}",
            "MapKept{0, 1}",
            "StartCopies",
            "CloseRanks{2}",
            "MigrateKv{2}->{0, 1}",
            "MapMoved{0}",
            "Build{0, 1}",
            "Switch:InPlace",
            "RetireOld",
            "ReleaseOldViews{0, 1, 2}",
            "DestroyKv{2}",
            "ReleaseWorkers{2}",
        ]
    );
    let r = d.t.report();
    assert_eq!(
        (
            r.sequences_migrated,
            r.kv_bytes_migrated,
            r.sequences_requeued
        ),
        (3, 4096, 0)
    );
}

#[test]
fn golden_baselines() {
    let mut cold = Driver::new(spec(
        TransitionKind::ScaleUp,
        Strategy::ColdRestart,
        &[0, 1],
        &[0, 1, 2],
    ));
    cold.run();
    assert_eq!(
        cold.log,
        [
            "ComputePlan",
            "PauseIntake",
            "Requeue{0, 1}",
            "StopOld{0, 1}",
            "AcquireWorkers{0, 1, 2}:Cold",
            "ReserveNext{0, 1, 2}",
            "StartCopies",
            "CreateKv{0, 1, 2}:Full",
            "MapMoved{0}",
            "MapMoved{1}",
            "MapMoved{2}",
            "Build{0, 1, 2}",
            "Switch:InPlace",
            "ResumeIntake",
            "RetireOld",
        ]
    );
    let r = cold.t.report();
    assert_eq!(
        (r.sequences_requeued, r.bytes_reloaded, r.bytes_moved),
        (4, 3000, 0)
    );

    let mut ext = Driver::new(spec(
        TransitionKind::ScaleUp,
        Strategy::Extravagant,
        &[0],
        &[1, 2],
    ));
    ext.run();
    assert_eq!(
        ext.log,
        [
            "ComputePlan",
            "AcquireWorkers{1, 2}:WarmPool",
            "ReserveNext{1, 2}",
            "StartCopies",
            "CreateKv{1, 2}:Full",
            "MapMoved{1}",
            "MapMoved{2}",
            "Build{1, 2}",
            "Switch:Migrate{0}->{1, 2}",
            "RetireOld",
            "ReleaseOldViews{0}",
            "DestroyKv{0}",
            "ReleaseWorkers{0}",
        ]
    );

    let mut colo = Driver::new(spec(
        TransitionKind::ScaleUp,
        Strategy::Colocated,
        &[0, 1],
        &[0, 1, 2],
    ));
    colo.run();
    assert_eq!(
        colo.log,
        [
            "ComputePlan",
            "ShrinkKv{0, 1}",
            "AcquireWorkers{2}:WarmPool",
            "ReserveNext{0, 1, 2}",
            "StartCopies",
            "CreateKv{0, 1, 2}:Half",
            "MapMoved{0}",
            "MapMoved{1}",
            "MapMoved{2}",
            "Build{0, 1, 2}",
            "Switch:Migrate{0, 1}->{0, 1, 2}",
            "RetireOld",
            "ReleaseOldViews{0, 1}",
            "DestroyKv{0, 1}",
        ]
    );
}

#[test]
fn golden_elastic_failure_requeues_and_reloads() {
    let mut d = Driver::new(spec(
        TransitionKind::Failure {
            failed: DeviceSet::from([1]),
        },
        Strategy::Elastic,
        &[0, 1, 2],
        &[0, 2],
    ));
    d.run();
    assert_eq!(
        d.log,
        [
            "FenceFailed{1}",
            "Requeue{1}",
            "ComputePlan",
            "ReserveNext{0, 2}",
            "MapKept{0, 2}",
            "StartCopies",
            "MapMoved{0}",
            "Build{0, 2}",
            "Switch:InPlace",
            "RetireOld",
            "ReleaseOldViews{0, 2}",
        ]
    );
    let r = d.t.report();
    assert_eq!(
        (r.sequences_requeued, r.bytes_reloaded, r.sequences_migrated),
        (2, 100, 0)
    );
    assert_eq!(r.kind.as_str(), "failure");
}

#[test]
fn only_cold_restart_ever_pauses_intake() {
    for s in all_specs() {
        // Full run, and an abort from the middle of Prepare.
        for abort in [false, true] {
            let mut d = Driver::new(s.clone());
            if abort {
                d.run_until(Phase::Prepare);
                d.step();
                if d.t.phase().is_before_switch() {
                    d.feed(Event::AbortRequested).unwrap();
                }
            } else {
                d.run();
            }
            let pauses = d.log.iter().filter(|a| *a == "PauseIntake").count();
            let resumes = d.log.iter().filter(|a| *a == "ResumeIntake").count();
            let r = d.t.report();
            if s.strategy == Strategy::ColdRestart {
                assert_eq!((pauses, resumes), (1, 1), "{s:?} {:?}", d.log);
                assert!(r.intake_paused_ms > 0.0);
            } else {
                assert_eq!((pauses, resumes), (0, 0), "{s:?} {:?}", d.log);
                assert_eq!(r.intake_paused_ms, 0.0);
            }
        }
    }
}

#[test]
fn cold_restart_intake_pause_is_measured_on_the_injected_clock() {
    let s = spec(
        TransitionKind::ScaleUp,
        Strategy::ColdRestart,
        &[0],
        &[0, 1],
    );
    let mut t = Transition::<PlanSummary>::new(s.clone(), Time::from_millis(1000)).unwrap();
    let plan = common::plan_for(&s);
    t.handle(Event::PlanReady(plan), Time::from_millis(1010))
        .unwrap();
    t.handle(
        Event::SequencesRequeued { count: 5 },
        Time::from_millis(1011),
    )
    .unwrap();
    t.handle(
        Event::CopiesDone { device: dev(0) },
        Time::from_millis(1500),
    )
    .unwrap();
    t.handle(
        Event::CopiesDone { device: dev(1) },
        Time::from_millis(1600),
    )
    .unwrap();
    t.handle(Event::DeploymentBuilt, Time::from_millis(1700))
        .unwrap();
    assert_eq!(
        t.report().intake_paused_ms,
        690.0,
        "still paused, counted up to the last event"
    );
    t.handle(Event::Switched { iteration: 3 }, Time::from_millis(1710))
        .unwrap();
    t.handle(Event::OldDrained, Time::from_millis(1800))
        .unwrap();
    let r = t.report();
    assert_eq!(r.intake_paused_ms, 700.0);
    assert_eq!(r.latency_ms, Some(710.0));
    assert_eq!(r.sequences_requeued, 5);
}

/// Every abort reason the executor could give at the current point of `d`.
fn abort_events(d: &Driver) -> Vec<Event<PlanSummary>> {
    let mut out = vec![Event::AbortRequested];
    let spec = d.t.spec();
    let failed = spec.kind.failed();
    if let Some(device) = spec.from.union(&spec.to).difference(&failed).iter().last() {
        out.push(Event::DeviceFailed { device });
    }
    match d.t.phase() {
        Phase::Plan => out.push(Event::PlanFailed {
            reason: "does not fit".into(),
        }),
        Phase::Prepare => {
            use scaler::Resource;
            for r in d.t.ledger() {
                let step = match r {
                    Resource::Workers(_) => Step::AcquireWorkers,
                    Resource::NextViews(_) => Step::ReserveNextViews,
                    Resource::KvPools(_) => Step::CreateKvPools,
                    Resource::KvBudgetShrunk(_) => Step::ShrinkKvBudget,
                    Resource::KvMigration => Step::MigrateKv,
                    Resource::NextDeployment => Step::BuildDeployment,
                    _ => continue,
                };
                out.push(Event::StepFailed {
                    step,
                    reason: "injected".into(),
                });
            }
            if d.t
                .ledger()
                .iter()
                .any(|r| matches!(r, Resource::NextViews(_)))
            {
                out.push(Event::StepFailed {
                    step: Step::MapExperts,
                    reason: "injected".into(),
                });
            }
            if let Some(device) = d.t.copies_outstanding().iter().next() {
                out.push(Event::CopiesFailed {
                    device,
                    reason: "link down".into(),
                });
            }
        }
        _ => {}
    }
    out
}

#[test]
fn rollback_from_every_point_before_the_switch_releases_everything() {
    let mut cases = 0;
    for s in all_specs() {
        // Walk the happy path answer by answer; at every point before the switch, try every
        // abort reason on a replay of the walk so far.
        let mut steps = 0;
        loop {
            let mut d = Driver::new(s.clone());
            for _ in 0..steps {
                d.step();
            }
            if !d.t.phase().is_before_switch() {
                break;
            }
            for event in abort_events(&d) {
                let mut d = Driver::new(s.clone());
                for _ in 0..steps {
                    d.step();
                }
                let phase = d.t.phase();
                d.feed(event.clone())
                    .unwrap_or_else(|e| panic!("{s:?} {event:?} in {phase:?}: {e}"));
                assert_eq!(d.t.phase(), Phase::Aborted, "{s:?} {event:?} in {phase:?}");
                assert_clean(&d);
                assert_eq!(
                    d.world.tokens(),
                    world_after_abort(&s).tokens(),
                    "{s:?}: {event:?} in {phase:?} after {steps} answers\nlog: {:?}",
                    d.log
                );
                assert!(d.t.ledger().is_empty());
                assert!(d.t.report().abort_reason.is_some());
                cases += 1;
            }
            steps += 1;
        }
    }
    assert!(cases > 150, "only {cases} rollback cases ran");
}

#[test]
fn abort_reasons_are_recorded() {
    let s = spec(TransitionKind::ScaleUp, Strategy::Elastic, &[0], &[0, 1]);
    let mut d = Driver::new(s.clone());
    d.step();
    d.feed(Event::CopiesFailed {
        device: dev(1),
        reason: "link down".into(),
    })
    .unwrap();
    assert_eq!(
        d.t.report().abort_reason,
        Some(AbortReason::CopiesFailed {
            device: dev(1),
            message: "link down".into()
        })
    );
    // The abort released the newest first.
    let tail: Vec<_> = d.log.iter().rev().take(4).rev().cloned().collect();
    assert_eq!(
        tail,
        [
            "DestroyKv{1}",
            "DiscardCopies",
            "ReleaseNext{0, 1}",
            "ReleaseWorkers{1}"
        ]
    );

    let mut d = Driver::new(s);
    d.step();
    d.feed(Event::DeviceFailed { device: dev(1) }).unwrap();
    assert_eq!(
        d.t.report().abort_reason,
        Some(AbortReason::DeviceFailed { device: dev(1) })
    );
    assert!(
        d.log.contains(&"DiscardWorkers{1}".to_string()),
        "a failed device's worker is not pooled"
    );
    assert_eq!(d.t.report().failed_during, DeviceSet::from([1]));
}

#[test]
fn a_device_failing_after_the_switch_is_noted_and_its_worker_discarded() {
    let s = spec(
        TransitionKind::ScaleDown,
        Strategy::Elastic,
        &[0, 1, 2],
        &[0, 1],
    );
    let mut d = Driver::new(s);
    d.run_until(Phase::Retire);
    d.feed(Event::DeviceFailed { device: dev(2) }).unwrap();
    assert_eq!(d.t.phase(), Phase::Retire);
    d.run();
    assert_eq!(d.t.phase(), Phase::Retired);
    assert!(d
        .log
        .ends_with(&["DestroyKv{2}".to_string(), "DiscardWorkers{2}".to_string()]));
    assert_eq!(d.t.report().failed_during, DeviceSet::from([2]));
    // A device outside the transition does not abort it.
    let mut d = Driver::new(spec(
        TransitionKind::ScaleUp,
        Strategy::Elastic,
        &[0],
        &[0, 1],
    ));
    d.feed(Event::DeviceFailed { device: dev(7) }).unwrap();
    assert_eq!(d.t.phase(), Phase::Plan);
}

/// One event of every kind, with payloads that fit the elastic scale-down {0,1,2} → {0,1},
/// whose plan copies into device 0 and which migrates KV off device 2.
fn one_of_each(s: &TransitionSpec) -> Vec<Event<PlanSummary>> {
    vec![
        Event::PlanReady(common::plan_for(s)),
        Event::PlanFailed { reason: "x".into() },
        Event::CopiesDone { device: dev(0) },
        Event::CopiesFailed {
            device: dev(0),
            reason: "x".into(),
        },
        Event::SequencesRequeued { count: 1 },
        Event::KvMigrated {
            sequences: 1,
            bytes: 1,
        },
        Event::StepFailed {
            step: Step::ReserveNextViews,
            reason: "x".into(),
        },
        Event::DeploymentBuilt,
        Event::Switched { iteration: 7 },
        Event::OldDrained,
        Event::DeviceFailed { device: dev(2) },
        Event::AbortRequested,
    ]
}

/// A driver for the scale-down, brought to `phase`.
fn in_phase(s: &TransitionSpec, phase: Phase) -> Driver {
    let mut d = Driver::new(s.clone());
    match phase {
        Phase::Aborted => {
            d.feed(Event::AbortRequested).unwrap();
        }
        Phase::Retired => d.run(),
        _ => d.run_until(phase),
    }
    assert_eq!(d.t.phase(), phase);
    d.drop_answers();
    d
}

#[test]
fn every_illegal_event_in_every_phase_is_a_typed_error_that_changes_nothing() {
    use EventKind::*;
    let s = spec(
        TransitionKind::ScaleDown,
        Strategy::Elastic,
        &[0, 1, 2],
        &[0, 1],
    );
    let legal: [(Phase, &[EventKind]); 6] = [
        (
            Phase::Plan,
            &[PlanReady, PlanFailed, DeviceFailed, AbortRequested],
        ),
        (
            Phase::Prepare,
            &[
                CopiesDone,
                CopiesFailed,
                KvMigrated,
                StepFailed,
                DeviceFailed,
                AbortRequested,
            ],
        ),
        (Phase::Switch, &[Switched, DeviceFailed]),
        (Phase::Retire, &[OldDrained, DeviceFailed]),
        (Phase::Retired, &[]),
        (Phase::Aborted, &[]),
    ];
    let mut illegal_seen = 0;
    for (phase, ok) in legal {
        for event in one_of_each(&s) {
            let mut d = in_phase(&s, phase);
            let report = d.t.report();
            let ledger = d.t.ledger().to_vec();
            let kind = event.kind();
            let result = d.feed(event);
            if ok.contains(&kind) {
                assert!(result.is_ok(), "{kind:?} in {phase:?}: {result:?}");
                continue;
            }
            illegal_seen += 1;
            let err = result.expect_err("illegal event accepted");
            let expected = match (phase, kind) {
                (Phase::Retired | Phase::Aborted, _) => TransitionError::Finished { phase },
                (Phase::Switch | Phase::Retire, AbortRequested) => {
                    TransitionError::TooLateToAbort { phase }
                }
                (Phase::Plan, StepFailed) => TransitionError::UnexpectedStepFailure {
                    step: Step::ReserveNextViews,
                },
                _ => TransitionError::UnexpectedEvent { phase, event: kind },
            };
            assert_eq!(err, expected, "{kind:?} in {phase:?}");
            assert!(!err.to_string().is_empty());
            assert_eq!(d.t.phase(), phase, "{kind:?} changed the phase");
            assert_eq!(
                d.t.report(),
                report,
                "{kind:?} in {phase:?} changed the report"
            );
            assert_eq!(d.t.ledger(), &ledger[..]);
            assert!(
                d.t.poll_action().is_none(),
                "{kind:?} in {phase:?} emitted an action"
            );
        }
    }
    assert_eq!(illegal_seen, 12 * 6 - 4 - 6 - 2 - 2);
}

#[test]
fn payload_errors_are_typed_and_change_nothing() {
    let s = spec(
        TransitionKind::ScaleDown,
        Strategy::Elastic,
        &[0, 1, 2],
        &[0, 1],
    );
    let mut d = in_phase(&s, Phase::Plan);
    // A plan that copies into a device outside the target.
    let bad = PlanSummary::copies(&DeviceSet::from([2]), 10, 0);
    assert_eq!(
        d.feed(Event::PlanReady(bad)),
        Err(TransitionError::PlanOutsideTarget {
            device: dev(2),
            to: s.to.clone()
        })
    );
    assert_eq!(d.t.phase(), Phase::Plan);

    let mut d = in_phase(&s, Phase::Prepare);
    assert_eq!(
        d.feed(Event::CopiesDone { device: dev(1) }),
        Err(TransitionError::UnexpectedCopyReport { device: dev(1) })
    );
    d.feed(Event::CopiesDone { device: dev(0) }).unwrap();
    assert_eq!(
        d.feed(Event::CopiesDone { device: dev(0) }),
        Err(TransitionError::UnexpectedCopyReport { device: dev(0) }),
        "a second report for the same device"
    );
    assert_eq!(
        d.feed(Event::StepFailed {
            step: Step::AcquireWorkers,
            reason: String::new()
        }),
        Err(TransitionError::UnexpectedStepFailure {
            step: Step::AcquireWorkers
        }),
        "a scale-down acquires no workers"
    );
    assert_eq!(
        d.feed(Event::DeploymentBuilt),
        Err(TransitionError::UnexpectedEvent {
            phase: Phase::Prepare,
            event: EventKind::DeploymentBuilt
        }),
        "not built before the KV migration finished"
    );
    let before = d.t.report();
    assert!(matches!(
        d.t.handle(Event::AbortRequested, Time::ZERO),
        Err(TransitionError::ClockWentBackwards { now: Time::ZERO, last }) if last > Time::ZERO
    ));
    assert_eq!(d.t.report(), before);
}

#[test]
fn the_switch_is_a_single_request_and_no_action_waits_on_an_iteration() {
    for s in all_specs() {
        let mut d = Driver::new(s.clone());
        d.run();
        let switches = d.log.iter().filter(|a| a.starts_with("Switch:")).count();
        assert_eq!(switches, 1, "{s:?}");
        // Nothing after the build and before the switch: the engine swaps at its next boundary.
        let build = d.log.iter().position(|a| a.starts_with("Build")).unwrap();
        let switch = d.log.iter().position(|a| a.starts_with("Switch:")).unwrap();
        assert_eq!(switch, build + 1, "{s:?}: {:?}", d.log);
    }
}

#[test]
fn specs_are_validated_with_clear_errors() {
    let up = TransitionKind::ScaleUp;
    let down = TransitionKind::ScaleDown;
    let cases: Vec<(TransitionSpec, SpecError)> = vec![
        (
            spec(up.clone(), Strategy::Elastic, &[], &[0]),
            SpecError::EmptyFrom,
        ),
        (
            spec(down.clone(), Strategy::Elastic, &[0, 1], &[]),
            SpecError::EmptyTarget,
        ),
        (
            spec(up.clone(), Strategy::Elastic, &[0, 1], &[0, 1]),
            SpecError::NotLarger { from: 2, to: 2 },
        ),
        (
            spec(down.clone(), Strategy::Elastic, &[0], &[0, 1]),
            SpecError::NotSmaller { from: 1, to: 2 },
        ),
        (
            spec(
                TransitionKind::Rebalance,
                Strategy::Elastic,
                &[0, 1],
                &[0, 2],
            ),
            SpecError::RebalanceChangesDevices {
                from: DeviceSet::from([0, 1]),
                to: DeviceSet::from([0, 2]),
            },
        ),
        (
            spec(up.clone(), Strategy::Elastic, &[0, 1], &[0, 2, 3]),
            SpecError::NotNested {
                strategy: Strategy::Elastic,
                from: DeviceSet::from([0, 1]),
                to: DeviceSet::from([0, 2, 3]),
            },
        ),
        (
            spec(up.clone(), Strategy::Extravagant, &[0, 1], &[1, 2, 3]),
            SpecError::NotDisjoint {
                shared: DeviceSet::from([1]),
            },
        ),
        (
            spec(TransitionKind::Rebalance, Strategy::Extravagant, &[0], &[0]),
            SpecError::Unsupported {
                kind: "rebalance",
                strategy: Strategy::Extravagant,
            },
        ),
        (
            spec(
                TransitionKind::Failure {
                    failed: DeviceSet::new(),
                },
                Strategy::Elastic,
                &[0, 1],
                &[0],
            ),
            SpecError::NoFailedDevices,
        ),
        (
            spec(
                TransitionKind::Failure {
                    failed: DeviceSet::from([5]),
                },
                Strategy::Elastic,
                &[0, 1],
                &[0],
            ),
            SpecError::FailedNotServing {
                device: dev(5),
                from: DeviceSet::from([0, 1]),
            },
        ),
        (
            spec(
                TransitionKind::Failure {
                    failed: DeviceSet::from([1]),
                },
                Strategy::Elastic,
                &[0, 1, 2],
                &[0],
            ),
            SpecError::TargetNotSurvivors {
                expected: DeviceSet::from([0, 2]),
                to: DeviceSet::from([0]),
            },
        ),
        (
            spec(
                TransitionKind::Failure {
                    failed: DeviceSet::from([1]),
                },
                Strategy::Colocated,
                &[0, 1],
                &[0],
            ),
            SpecError::Unsupported {
                kind: "failure",
                strategy: Strategy::Colocated,
            },
        ),
    ];
    for (s, expected) in cases {
        assert_eq!(s.validate(), Err(expected.clone()), "{s:?}");
        let err = Transition::<PlanSummary>::new(s, Time::ZERO).unwrap_err();
        assert_eq!(err, expected);
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(
        SpecError::NotLarger { from: 2, to: 2 }.to_string(),
        "a scale-up must target more than the 2 devices serving now, not 2"
    );
}

#[test]
fn a_rebalance_with_nothing_to_move_builds_at_once() {
    let s = spec(
        TransitionKind::Rebalance,
        Strategy::Elastic,
        &[0, 1],
        &[0, 1],
    );
    let mut t = Transition::<PlanSummary>::new(s, Time::ZERO).unwrap();
    assert!(matches!(t.poll_action(), Some(Action::ComputePlan { .. })));
    t.handle(
        Event::PlanReady(PlanSummary {
            zero_copy: 5,
            ..PlanSummary::default()
        }),
        Time::from_millis(1),
    )
    .unwrap();
    let actions: Vec<_> = std::iter::from_fn(|| t.poll_action())
        .map(|a| common::short(&a))
        .collect();
    assert_eq!(
        actions,
        ["ReserveNext{0, 1}", "MapKept{0, 1}", "Build{0, 1}"]
    );
}
