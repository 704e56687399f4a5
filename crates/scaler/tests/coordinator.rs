//! The coordinator: validation, queueing, failure recovery, and no command ever lost.

use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use scaler::{
    Action, CommandError, CommandId, Coordinator, CoordinatorConfig, CoordinatorError, DeviceId,
    DeviceSet, Event, Outcome, Phase, PlanSummary, ScaleCommand, SpecError, Strategy, Submitted,
    TaggedAction, Time, TransitionId, TransitionKind, TransitionPlan,
};
use std::collections::{BTreeMap, VecDeque};

/// An automatic executor around a coordinator.
struct Harness {
    c: Coordinator<PlanSummary>,
    now: Time,
    answers: VecDeque<(TransitionId, Event<PlanSummary>)>,
    outcomes: Vec<Outcome>,
    log: Vec<(TransitionId, String)>,
}

impl Harness {
    fn new(config: CoordinatorConfig) -> Harness {
        Harness {
            c: Coordinator::new(config).unwrap(),
            now: Time::ZERO,
            answers: VecDeque::new(),
            outcomes: Vec::new(),
            log: Vec::new(),
        }
    }

    fn tick(&mut self) -> Time {
        self.now = self.now.after(std::time::Duration::from_millis(1));
        self.now
    }

    fn pump(&mut self) {
        while let Some(TaggedAction { transition, action }) = self.c.poll_action() {
            self.log.push((
                transition,
                format!("{action:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string(),
            ));
            let answer = match action {
                Action::ComputePlan { to, from, .. } => {
                    let gaining = to.difference(&from);
                    let dest = if gaining.is_empty() {
                        to.iter().take(1).collect()
                    } else {
                        gaining
                    };
                    Some(Event::PlanReady(PlanSummary::copies(&dest, 10, 90)))
                }
                Action::RequeueSequences { .. } => Some(Event::SequencesRequeued { count: 1 }),
                Action::StartCopies { plan } => {
                    for device in plan.copy_destinations().iter() {
                        self.answers
                            .push_back((transition, Event::CopiesDone { device }));
                    }
                    None
                }
                Action::MigrateKv { .. } => Some(Event::KvMigrated {
                    sequences: 1,
                    bytes: 1,
                }),
                Action::BuildDeployment { .. } => Some(Event::DeploymentBuilt),
                Action::RequestSwitch { .. } => Some(Event::Switched { iteration: 1 }),
                Action::RetireOld { .. } => Some(Event::OldDrained),
                _ => None,
            };
            if let Some(a) = answer {
                self.answers.push_back((transition, a));
            }
        }
        while let Some(o) = self.c.poll_outcome() {
            self.outcomes.push(o);
        }
    }

    fn submit(&mut self, cmd: ScaleCommand) -> Result<Submitted, CommandError> {
        let now = self.tick();
        let r = self.c.submit(cmd, now);
        self.pump();
        r
    }

    /// Feeds the next answer; stale answers (of aborted transitions) are refused and skipped.
    fn step(&mut self) -> bool {
        let Some((t, e)) = self.answers.pop_front() else {
            return false;
        };
        let now = self.tick();
        match self.c.handle(t, e, now) {
            Ok(()) | Err(CoordinatorError::StaleEvent { .. }) => {}
            Err(other) => panic!("answer refused: {other}"),
        }
        self.pump();
        true
    }

    fn run(&mut self) {
        while self.step() {}
    }

    fn fail(&mut self, device: u32) {
        let now = self.tick();
        self.c.device_failed(DeviceId(device), now).unwrap();
        self.pump();
    }

    fn finished(&self) -> Vec<(Option<CommandId>, String, Phase, usize, usize)> {
        self.outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Finished {
                    command, report, ..
                } => Some((
                    *command,
                    report.kind.as_str().to_string(),
                    report.phase,
                    report.from.len(),
                    report.to.len(),
                )),
                _ => None,
            })
            .collect()
    }
}

fn config(devices: u32, initial: u32, strategy: Strategy, queue: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        strategy,
        queue_capacity: queue,
        ..CoordinatorConfig::new(devices, initial)
    }
}

#[test]
fn bad_commands_get_typed_errors_with_clear_messages() {
    let mut h = Harness::new(config(4, 2, Strategy::Elastic, 4));
    let cases = [
        (ScaleCommand::Devices(0), CommandError::ZeroDevices),
        (
            ScaleCommand::Devices(5),
            CommandError::MoreThanExist {
                requested: 5,
                available: 4,
            },
        ),
        (
            ScaleCommand::Add(3),
            CommandError::MoreThanExist {
                requested: 5,
                available: 4,
            },
        ),
        (
            ScaleCommand::Remove(2),
            CommandError::RemovesEverything {
                remove: 2,
                devices: 2,
            },
        ),
        (
            ScaleCommand::Add(0),
            CommandError::EmptyStep {
                command: ScaleCommand::Add(0),
            },
        ),
        (
            ScaleCommand::Devices(2),
            CommandError::NoChange { devices: 2 },
        ),
    ];
    for (cmd, expected) in cases {
        assert_eq!(h.submit(cmd), Err(expected), "{cmd:?}");
    }
    assert_eq!(
        CommandError::MoreThanExist {
            requested: 5,
            available: 4
        }
        .to_string(),
        "asked for 5 devices, but only 4 healthy devices exist"
    );
    assert_eq!(
        CommandError::ZeroDevices.to_string(),
        "cannot serve on 0 devices: a deployment needs at least 1"
    );
    assert!(!h.c.is_busy(), "no bad command started anything");
    assert!(h.outcomes.is_empty());

    let bad = CoordinatorConfig {
        initial: DeviceSet::from([7]),
        ..CoordinatorConfig::new(4, 1)
    };
    assert!(matches!(
        Coordinator::<PlanSummary>::new(bad),
        Err(CoordinatorError::Config(_))
    ));
    let empty = CoordinatorConfig::new(4, 0);
    assert!(matches!(
        Coordinator::<PlanSummary>::new(empty),
        Err(CoordinatorError::Config(_))
    ));
}

#[test]
fn commands_during_a_transition_are_queued_and_run_in_order() {
    let mut h = Harness::new(config(4, 2, Strategy::Elastic, 4));
    let a = h.submit(ScaleCommand::Add(1)).unwrap();
    assert!(matches!(a, Submitted::Started { .. }));
    // Validated against the count the deployment will have (3): 4 is fine, then 4 is no change.
    let b = h.submit(ScaleCommand::Devices(4)).unwrap();
    assert!(matches!(b, Submitted::Queued { ahead: 0, .. }));
    assert_eq!(
        h.submit(ScaleCommand::Add(1)),
        Err(CommandError::MoreThanExist {
            requested: 5,
            available: 4
        })
    );
    let c = h.submit(ScaleCommand::Remove(3)).unwrap();
    assert!(matches!(c, Submitted::Queued { ahead: 1, .. }));
    assert_eq!(h.c.projected_devices(), 1);
    assert_eq!(
        h.c.devices(),
        &DeviceSet::from([0, 1]),
        "still the old set until the switch"
    );
    h.run();
    assert_eq!(
        h.finished(),
        [
            (Some(a.command()), "up".into(), Phase::Retired, 2, 3),
            (Some(b.command()), "up".into(), Phase::Retired, 3, 4),
            (Some(c.command()), "down".into(), Phase::Retired, 4, 1),
        ]
    );
    assert_eq!(h.c.devices(), &DeviceSet::from([0]));
    assert!(!h.c.is_busy());
    // Actions of different transitions are tagged apart.
    let ids: std::collections::BTreeSet<_> = h.log.iter().map(|(t, _)| *t).collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn a_full_queue_rejects_and_capacity_zero_means_reject_while_busy() {
    let mut h = Harness::new(config(4, 1, Strategy::Elastic, 1));
    h.submit(ScaleCommand::Add(1)).unwrap();
    h.submit(ScaleCommand::Add(1)).unwrap();
    assert_eq!(
        h.submit(ScaleCommand::Add(1)),
        Err(CommandError::QueueFull { capacity: 1 })
    );
    assert!(CommandError::QueueFull { capacity: 1 }
        .to_string()
        .contains("try again"));

    let mut h = Harness::new(config(4, 1, Strategy::Elastic, 0));
    h.submit(ScaleCommand::Add(1)).unwrap();
    assert_eq!(
        h.submit(ScaleCommand::Rebalance),
        Err(CommandError::QueueFull { capacity: 0 })
    );
    h.run();
    assert!(
        h.submit(ScaleCommand::Rebalance).is_ok(),
        "accepted again once idle"
    );
}

#[test]
fn new_devices_are_the_lowest_free_ones_and_leaving_ones_the_highest() {
    let mut h = Harness::new(config(6, 2, Strategy::Elastic, 4));
    h.fail(2);
    h.submit(ScaleCommand::Add(2)).unwrap();
    h.run();
    assert_eq!(
        h.c.devices(),
        &DeviceSet::from([0, 1, 3, 4]),
        "device 2 failed, so skipped"
    );
    h.submit(ScaleCommand::Remove(1)).unwrap();
    h.run();
    assert_eq!(h.c.devices(), &DeviceSet::from([0, 1, 3]));

    let mut e = Harness::new(config(4, 1, Strategy::Extravagant, 4));
    e.submit(ScaleCommand::Add(1)).unwrap();
    e.run();
    assert_eq!(e.c.devices(), &DeviceSet::from([1, 2]), "a disjoint set");
    assert_eq!(
        e.submit(ScaleCommand::Add(1)),
        Err(CommandError::NotEnoughForStrategy {
            strategy: Strategy::Extravagant,
            needed: 5,
            available: 4
        })
    );
    assert_eq!(
        e.submit(ScaleCommand::Rebalance),
        Err(CommandError::Spec(SpecError::Unsupported {
            kind: "rebalance",
            strategy: Strategy::Extravagant
        }))
    );
}

#[test]
fn a_failure_mid_transition_rolls_back_then_recovers_before_queued_commands() {
    let mut h = Harness::new(config(4, 2, Strategy::Elastic, 4));
    let up = h.submit(ScaleCommand::Add(1)).unwrap();
    let queued = h.submit(ScaleCommand::Devices(4)).unwrap();
    let later = h.submit(ScaleCommand::Rebalance).unwrap();
    h.step(); // the plan
    h.fail(1);
    h.run();
    let finished = h.finished();
    assert_eq!(
        finished[0],
        (Some(up.command()), "up".into(), Phase::Aborted, 2, 3)
    );
    assert_eq!(finished[1], (None, "failure".into(), Phase::Retired, 2, 1));
    // Devices(4) cannot run any more: only 3 healthy devices are left. It is not lost.
    assert!(h.outcomes.iter().any(|o| matches!(
        o,
        Outcome::Rejected { command, error: CommandError::MoreThanExist { requested: 4, available: 3 } }
            if *command == queued.command()
    )));
    assert_eq!(
        finished[2],
        (
            Some(later.command()),
            "rebalance".into(),
            Phase::Retired,
            1,
            1
        )
    );
    assert_eq!(finished.len(), 3);
    assert_eq!(h.c.devices(), &DeviceSet::from([0]));
    let recovery = h.outcomes.iter().find_map(|o| match o {
        Outcome::Finished {
            command: None,
            report,
            ..
        } => Some(report.clone()),
        _ => None,
    });
    let recovery = recovery.unwrap();
    assert_eq!(
        recovery.kind,
        TransitionKind::Failure {
            failed: DeviceSet::from([1])
        }
    );
    assert_eq!(recovery.sequences_requeued, 1);
}

#[test]
fn an_idle_failure_recovers_at_once_and_losing_everything_is_reported() {
    let mut h = Harness::new(config(3, 2, Strategy::ColdRestart, 4));
    h.fail(2); // not serving: nothing to do
    assert!(!h.c.is_busy());
    h.fail(0);
    assert!(h.c.is_busy(), "recovery started");
    h.run();
    assert_eq!(h.c.devices(), &DeviceSet::from([1]));
    assert_eq!(
        h.finished(),
        [(None, "failure".into(), Phase::Retired, 2, 1)]
    );
    let q = h.submit(ScaleCommand::Rebalance).unwrap();
    h.fail(1);
    h.run();
    assert!(h
        .outcomes
        .iter()
        .any(|o| matches!(o, Outcome::DeploymentLost { .. })));
    assert!(h
        .outcomes
        .iter()
        .any(|o| matches!(o, Outcome::Finished { command: Some(c), .. } if *c == q.command())));
    assert_eq!(
        h.submit(ScaleCommand::Add(1)),
        Err(CommandError::DeploymentLost)
    );
}

#[test]
fn stale_events_unknown_devices_and_idle_aborts_are_typed_errors() {
    let mut h = Harness::new(config(4, 1, Strategy::Elastic, 4));
    let Submitted::Started { transition, .. } = h.submit(ScaleCommand::Add(1)).unwrap() else {
        panic!("not started")
    };
    let now = h.tick();
    h.c.abort(now).unwrap();
    h.pump();
    let now = h.tick();
    assert_eq!(
        h.c.handle(transition, Event::DeploymentBuilt, now),
        Err(CoordinatorError::StaleEvent {
            transition,
            running: None
        })
    );
    assert_eq!(h.c.abort(now), Err(CoordinatorError::NothingRunning));
    assert!(matches!(
        h.c.device_failed(DeviceId(9), now),
        Err(CoordinatorError::UnknownDevice { .. })
    ));
    assert_eq!(
        h.finished(),
        [(Some(CommandId(1)), "up".into(), Phase::Aborted, 1, 2)]
    );
    assert_eq!(
        h.c.devices(),
        &DeviceSet::from([0]),
        "an abort keeps the old devices"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Submit(ScaleCommand),
    Answer,
    Fail(u32),
    Abort,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..6).prop_map(|n| Op::Submit(ScaleCommand::Devices(n))),
        2 => (0usize..3).prop_map(|n| Op::Submit(ScaleCommand::Add(n))),
        2 => (0usize..3).prop_map(|n| Op::Submit(ScaleCommand::Remove(n))),
        1 => Just(Op::Submit(ScaleCommand::Rebalance)),
        8 => Just(Op::Answer),
        1 => (0u32..6).prop_map(Op::Fail),
        1 => Just(Op::Abort),
    ]
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        Just(Strategy::Elastic),
        Just(Strategy::ColdRestart),
        Just(Strategy::Extravagant),
        Just(Strategy::Colocated),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn no_command_is_ever_lost(
        s in strategy(),
        queue in 0usize..4,
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let mut h = Harness::new(config(6, 2, s, queue));
        let mut accepted: Vec<CommandId> = Vec::new();
        for op in ops {
            match op {
                Op::Submit(cmd) => {
                    if let Ok(sub) = h.submit(cmd) {
                        accepted.push(sub.command());
                    }
                }
                Op::Answer => {
                    h.step();
                }
                Op::Fail(d) => h.fail(d),
                Op::Abort => {
                    let now = h.tick();
                    let r = h.c.abort(now);
                    prop_assert!(
                        matches!(r, Ok(()) | Err(CoordinatorError::NothingRunning | CoordinatorError::Transition(_))),
                        "{r:?}"
                    );
                    h.pump();
                }
            }
            prop_assert!(h.c.queued() <= queue);
            prop_assert!(!h.c.devices().is_empty());
        }
        h.run();
        prop_assert!(!h.c.is_busy(), "the automatic executor finishes everything");
        prop_assert_eq!(h.c.queued(), 0);
        // Exactly one outcome per accepted command.
        let mut seen: BTreeMap<CommandId, usize> = BTreeMap::new();
        for o in &h.outcomes {
            match o {
                Outcome::Finished { command: Some(c), .. } | Outcome::Rejected { command: c, .. } => {
                    *seen.entry(*c).or_default() += 1;
                }
                _ => {}
            }
        }
        for c in &accepted {
            prop_assert_eq!(seen.get(c).copied(), Some(1), "command {:?} has no single outcome", c);
        }
        prop_assert_eq!(seen.len(), accepted.len());
        // Unless everything failed, the serving set is healthy.
        let lost = h.outcomes.iter().any(|o| matches!(o, Outcome::DeploymentLost { .. }));
        if !lost {
            prop_assert!(h.c.devices().is_subset(&h.c.healthy()), "{:?} vs {:?}", h.c.devices(), h.c.healthy());
        }
    }
}
