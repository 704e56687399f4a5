//! A test executor: a model of the world the actions act on, and an automatic responder.
//!
//! The world holds tokens for everything that exists (workers, views, KV pools, copies in
//! flight, paused intake, ...). Each action adds or removes tokens the way the real executor
//! would allocate or free. Releasing something that is not held, or acquiring something twice,
//! is recorded as a violation. Tests then compare the world with what must exist.
#![allow(dead_code)]

use scaler::{
    Action, DeviceId, DeviceSet, Event, Phase, PlanSummary, Strategy, Time, Transition,
    TransitionKind, TransitionSpec,
};
use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Token {
    Worker(u32),
    OldViews(u32),
    NextViews(u32),
    KvPool(u32),
    CopyDestinations,
    ClosedRank(u32),
    KvBudgetShrunk(u32),
    OldStopped(u32),
    KvMigration,
    NextDeployment,
    IntakePaused,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct World {
    pub held: BTreeMap<Token, u32>,
    pub violations: Vec<String>,
    pub actions: Vec<String>,
    last_acquire: BTreeMap<String, Action<PlanSummary>>,
}

impl World {
    /// A deployment serving on `devices`.
    pub fn serving(devices: &DeviceSet) -> World {
        let mut w = World::default();
        for d in devices.iter() {
            for t in [Token::Worker(d.0), Token::OldViews(d.0), Token::KvPool(d.0)] {
                w.add(t);
            }
        }
        w
    }

    /// What must exist once a deployment on `devices` has fully replaced the old one.
    pub fn retired_onto(devices: &DeviceSet) -> World {
        let mut w = World::default();
        for d in devices.iter() {
            for t in [
                Token::Worker(d.0),
                Token::NextViews(d.0),
                Token::KvPool(d.0),
            ] {
                w.add(t);
            }
        }
        w
    }

    pub fn tokens(&self) -> &BTreeMap<Token, u32> {
        &self.held
    }

    fn add(&mut self, t: Token) {
        let n = self.held.entry(t).or_insert(0);
        *n += 1;
        // Only KV pools may exist twice on one device (the colocated baseline's two instances).
        let limit = if matches!(t, Token::KvPool(_)) { 2 } else { 1 };
        if *n > limit {
            self.violations
                .push(format!("{t:?} acquired while already held"));
        }
    }

    fn remove(&mut self, t: Token) {
        match self.held.get_mut(&t) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.held.remove(&t);
            }
            None => self.violations.push(format!("{t:?} released but not held")),
        }
    }

    fn require(&mut self, t: Token, why: &str) {
        if !self.held.contains_key(&t) {
            self.violations.push(format!("{why}: {t:?} not held"));
        }
    }

    fn each(&mut self, devices: &DeviceSet, f: fn(u32) -> Token, add: bool) {
        for d in devices.iter() {
            if add {
                self.add(f(d.0));
            } else {
                self.remove(f(d.0));
            }
        }
    }

    /// Carries out one action.
    pub fn apply(&mut self, action: &Action<PlanSummary>) {
        self.actions.push(short(action));
        let step = match action {
            Action::AcquireWorkers { .. } => Some("AcquireWorkers"),
            Action::ReserveNextViews { .. } => Some("ReserveNextViews"),
            Action::CreateKvPools { .. } => Some("CreateKvPools"),
            Action::ShrinkKvBudget { .. } => Some("ShrinkKvBudget"),
            Action::MigrateKv { .. } => Some("MigrateKv"),
            Action::BuildDeployment { .. } => Some("BuildDeployment"),
            _ => None,
        };
        if let Some(step) = step {
            self.last_acquire.insert(step.to_string(), action.clone());
        }
        match action {
            Action::ComputePlan { .. }
            | Action::RequeueSequences { .. }
            | Action::RequestSwitch { .. }
            | Action::RetireOld { .. } => {}
            Action::FenceFailed { devices } => {
                self.each(devices, Token::Worker, false);
                self.each(devices, Token::OldViews, false);
                self.each(devices, Token::KvPool, false);
            }
            Action::PauseIntake => self.add(Token::IntakePaused),
            Action::ResumeIntake => self.remove(Token::IntakePaused),
            Action::StopOldDeployment { devices } => {
                self.each(devices, Token::Worker, false);
                self.each(devices, Token::OldViews, false);
                self.each(devices, Token::KvPool, false);
                self.each(devices, Token::OldStopped, true);
            }
            Action::RestartOldDeployment { devices } => {
                self.each(devices, Token::OldStopped, false);
                self.each(devices, Token::Worker, true);
                self.each(devices, Token::OldViews, true);
                self.each(devices, Token::KvPool, true);
            }
            Action::ShrinkKvBudget { devices, .. } => {
                self.each(devices, Token::KvBudgetShrunk, true)
            }
            Action::RestoreKvBudget { devices } => self.each(devices, Token::KvBudgetShrunk, false),
            Action::AcquireWorkers { devices, .. } => self.each(devices, Token::Worker, true),
            Action::ReleaseWorkers { devices } | Action::DiscardWorkers { devices } => {
                self.each(devices, Token::Worker, false)
            }
            Action::ReserveNextViews { devices } => self.each(devices, Token::NextViews, true),
            Action::ReleaseNextViews { devices } => self.each(devices, Token::NextViews, false),
            Action::MapKeptExperts { devices } => {
                for d in devices.iter() {
                    self.require(Token::NextViews(d.0), "map kept experts");
                    self.require(Token::OldViews(d.0), "map kept experts");
                }
            }
            Action::StartCopies { .. } => self.add(Token::CopyDestinations),
            Action::MapMovedExperts { device } => {
                self.require(Token::NextViews(device.0), "map moved experts");
                self.require(Token::CopyDestinations, "map moved experts");
            }
            Action::DiscardCopies => self.remove(Token::CopyDestinations),
            Action::CreateKvPools { devices, .. } => self.each(devices, Token::KvPool, true),
            Action::DestroyKvPools { devices } => self.each(devices, Token::KvPool, false),
            Action::CloseRanks { devices } => self.each(devices, Token::ClosedRank, true),
            Action::ReopenRanks { devices } => self.each(devices, Token::ClosedRank, false),
            Action::MigrateKv { .. } => self.add(Token::KvMigration),
            Action::StopKvMigration => self.remove(Token::KvMigration),
            Action::BuildDeployment { .. } => self.add(Token::NextDeployment),
            Action::DropNextDeployment => self.remove(Token::NextDeployment),
            Action::ReleaseOldViews { devices } => self.each(devices, Token::OldViews, false),
        }
    }

    /// A finished KV migration leaves nothing running.
    pub fn kv_migration_finished(&mut self) {
        self.remove(Token::KvMigration);
    }

    /// The engine switched: what was prepared now belongs to the serving deployment.
    pub fn switched(&mut self) {
        self.held.retain(|t, _| {
            !matches!(
                t,
                Token::CopyDestinations
                    | Token::NextDeployment
                    | Token::ClosedRank(_)
                    | Token::KvMigration
                    | Token::KvBudgetShrunk(_)
                    | Token::OldStopped(_)
            )
        });
    }

    /// Feeds an accepted event's effect on the world.
    pub fn accepted(&mut self, event: &Event<PlanSummary>) {
        match event {
            Event::KvMigrated { .. } => self.kv_migration_finished(),
            Event::Switched { .. } => self.switched(),
            // The executor undoes a failed step itself before reporting it.
            Event::StepFailed { step, .. } => {
                if let Some(action) = self.last_acquire.remove(&format!("{step:?}")) {
                    self.undo(&action);
                }
            }
            _ => {}
        }
    }

    fn undo(&mut self, action: &Action<PlanSummary>) {
        match action {
            Action::AcquireWorkers { devices, .. } => self.each(devices, Token::Worker, false),
            Action::ReserveNextViews { devices } => self.each(devices, Token::NextViews, false),
            Action::CreateKvPools { devices, .. } => self.each(devices, Token::KvPool, false),
            Action::ShrinkKvBudget { devices, .. } => {
                self.each(devices, Token::KvBudgetShrunk, false)
            }
            Action::MigrateKv { .. } => self.remove(Token::KvMigration),
            Action::BuildDeployment { .. } => self.remove(Token::NextDeployment),
            _ => {}
        }
    }
}

/// A short name for an action, for golden sequences.
pub fn short(action: &Action<PlanSummary>) -> String {
    let set = |d: &DeviceSet| format!("{d}");
    match action {
        Action::ComputePlan { .. } => "ComputePlan".into(),
        Action::FenceFailed { devices } => format!("FenceFailed{}", set(devices)),
        Action::RequeueSequences { devices } => format!("Requeue{}", set(devices)),
        Action::PauseIntake => "PauseIntake".into(),
        Action::ResumeIntake => "ResumeIntake".into(),
        Action::StopOldDeployment { devices } => format!("StopOld{}", set(devices)),
        Action::RestartOldDeployment { devices } => format!("RestartOld{}", set(devices)),
        Action::ShrinkKvBudget { devices, .. } => format!("ShrinkKv{}", set(devices)),
        Action::RestoreKvBudget { devices } => format!("RestoreKv{}", set(devices)),
        Action::AcquireWorkers { devices, source } => {
            format!("AcquireWorkers{}:{source:?}", set(devices))
        }
        Action::ReleaseWorkers { devices } => format!("ReleaseWorkers{}", set(devices)),
        Action::DiscardWorkers { devices } => format!("DiscardWorkers{}", set(devices)),
        Action::ReserveNextViews { devices } => format!("ReserveNext{}", set(devices)),
        Action::ReleaseNextViews { devices } => format!("ReleaseNext{}", set(devices)),
        Action::MapKeptExperts { devices } => format!("MapKept{}", set(devices)),
        Action::StartCopies { .. } => "StartCopies".into(),
        Action::MapMovedExperts { device } => format!("MapMoved{{{}}}", device.0),
        Action::DiscardCopies => "DiscardCopies".into(),
        Action::CreateKvPools { devices, budget } => format!("CreateKv{}:{budget:?}", set(devices)),
        Action::DestroyKvPools { devices } => format!("DestroyKv{}", set(devices)),
        Action::CloseRanks { devices } => format!("CloseRanks{}", set(devices)),
        Action::ReopenRanks { devices } => format!("ReopenRanks{}", set(devices)),
        Action::MigrateKv { from, to } => format!("MigrateKv{}->{}", set(from), set(to)),
        Action::StopKvMigration => "StopKvMigration".into(),
        Action::BuildDeployment { devices } => format!("Build{}", set(devices)),
        Action::DropNextDeployment => "DropNext".into(),
        Action::RequestSwitch { handoff } => match handoff {
            scaler::Handoff::InPlace => "Switch:InPlace".into(),
            scaler::Handoff::MigrateAtSwitch { from, to } => {
                format!("Switch:Migrate{}->{}", set(from), set(to))
            }
        },
        Action::RetireOld { .. } => "RetireOld".into(),
        Action::ReleaseOldViews { devices } => format!("ReleaseOldViews{}", set(devices)),
    }
}

/// A plan for `spec`: every device that gains experts receives `bytes`; for a failure, the
/// survivors also reload what the failed devices held alone.
pub fn plan_for(spec: &TransitionSpec) -> PlanSummary {
    let mut plan = PlanSummary::default();
    let failed = spec.kind.failed();
    match (spec.strategy, &spec.kind) {
        (Strategy::ColdRestart, _) => {
            for d in spec.to.iter() {
                plan.reloaded_to.insert(d, 1000);
            }
        }
        (Strategy::Extravagant | Strategy::Colocated, _) => {
            for d in spec.to.iter() {
                plan.moved_to.insert(d, 1000);
            }
        }
        (Strategy::Elastic, TransitionKind::Failure { .. }) => {
            let first = spec.to.iter().next().expect("survivors");
            plan.reloaded_to.insert(first, 100 * failed.len() as u64);
            plan.zero_copy = 900;
        }
        (Strategy::Elastic, _) => {
            // Scale-up: experts move to the new devices; scale-down: the leaving devices'
            // experts move to the survivors; rebalance: one device gains hot replicas.
            let gaining: DeviceSet = if spec.to.len() > spec.from.len() {
                spec.to.difference(&spec.from)
            } else {
                spec.to.iter().take(1).collect()
            };
            for d in gaining.iter() {
                plan.moved_to.insert(d, 250);
            }
            plan.zero_copy = 750;
        }
    }
    plan
}

/// Every valid (kind, strategy, from, to) among 4 devices that the tests cover.
pub fn all_specs() -> Vec<TransitionSpec> {
    let mut out = Vec::new();
    let s = |kind, strategy, from: DeviceSet, to: DeviceSet| TransitionSpec {
        kind,
        strategy,
        from,
        to,
    };
    for strategy in [
        Strategy::Elastic,
        Strategy::ColdRestart,
        Strategy::Colocated,
    ] {
        out.push(s(
            TransitionKind::ScaleUp,
            strategy,
            DeviceSet::from([0, 1]),
            DeviceSet::from([0, 1, 2]),
        ));
        out.push(s(
            TransitionKind::ScaleUp,
            strategy,
            DeviceSet::from([0]),
            DeviceSet::from([0, 1, 2, 3]),
        ));
        out.push(s(
            TransitionKind::ScaleDown,
            strategy,
            DeviceSet::from([0, 1, 2]),
            DeviceSet::from([0, 1]),
        ));
        out.push(s(
            TransitionKind::ScaleDown,
            strategy,
            DeviceSet::from([0, 1, 2, 3]),
            DeviceSet::from([0]),
        ));
        out.push(s(
            TransitionKind::Rebalance,
            strategy,
            DeviceSet::from([0, 1]),
            DeviceSet::from([0, 1]),
        ));
    }
    for strategy in [Strategy::Elastic, Strategy::ColdRestart] {
        out.push(s(
            TransitionKind::Failure {
                failed: DeviceSet::from([1]),
            },
            strategy,
            DeviceSet::from([0, 1, 2]),
            DeviceSet::from([0, 2]),
        ));
        out.push(s(
            TransitionKind::Failure {
                failed: DeviceSet::from([0, 3]),
            },
            strategy,
            DeviceSet::from([0, 1, 2, 3]),
            DeviceSet::from([1, 2]),
        ));
    }
    out.push(s(
        TransitionKind::ScaleUp,
        Strategy::Extravagant,
        DeviceSet::from([0]),
        DeviceSet::from([1, 2]),
    ));
    out.push(s(
        TransitionKind::ScaleDown,
        Strategy::Extravagant,
        DeviceSet::from([0, 1]),
        DeviceSet::from([2]),
    ));
    out
}

/// The world after an abort: as it was, less what a failure fenced for good.
pub fn world_after_abort(spec: &TransitionSpec) -> World {
    World::serving(&spec.from.difference(&spec.kind.failed()))
}

/// Drives a transition with an automatic executor, applying every action to a world.
#[derive(Debug)]
pub struct Driver {
    pub t: Transition<PlanSummary>,
    pub world: World,
    pub now: Time,
    responses: VecDeque<Event<PlanSummary>>,
    pub log: Vec<String>,
}

impl Driver {
    pub fn new(spec: TransitionSpec) -> Driver {
        let world = World::serving(&spec.from);
        let t = Transition::new(spec, Time::ZERO).expect("valid spec");
        let mut d = Driver {
            t,
            world,
            now: Time::ZERO,
            responses: VecDeque::new(),
            log: Vec::new(),
        };
        d.pump();
        d
    }

    /// Applies every pending action and queues the executor's answers.
    pub fn pump(&mut self) {
        while let Some(action) = self.t.poll_action() {
            self.world.apply(&action);
            self.log.push(short(&action));
            match &action {
                Action::ComputePlan { .. } => {
                    let plan = plan_for(self.t.spec());
                    self.responses.push_back(Event::PlanReady(plan));
                }
                Action::RequeueSequences { devices } => {
                    self.responses.push_back(Event::SequencesRequeued {
                        count: 2 * devices.len() as u64,
                    })
                }
                Action::StartCopies { plan } => {
                    use scaler::TransitionPlan;
                    for device in plan.copy_destinations().iter() {
                        self.responses.push_back(Event::CopiesDone { device });
                    }
                }
                Action::MigrateKv { from, .. } => self.responses.push_back(Event::KvMigrated {
                    sequences: 3 * from.len() as u64,
                    bytes: 4096,
                }),
                Action::BuildDeployment { .. } => self.responses.push_back(Event::DeploymentBuilt),
                Action::RequestSwitch { .. } => {
                    self.responses.push_back(Event::Switched { iteration: 100 })
                }
                Action::RetireOld { .. } => self.responses.push_back(Event::OldDrained),
                _ => {}
            }
        }
    }

    /// Feeds one event 1 ms after the previous one, applying its effects.
    pub fn feed(&mut self, event: Event<PlanSummary>) -> Result<(), scaler::TransitionError> {
        self.now = self.now.after(std::time::Duration::from_millis(1));
        let copy = event.clone();
        let r = self.t.handle(event, self.now);
        if r.is_ok() {
            self.world.accepted(&copy);
        }
        self.pump();
        r
    }

    /// Feeds the next automatic answer; false when there is none.
    pub fn step(&mut self) -> bool {
        match self.responses.pop_front() {
            Some(e) => {
                self.feed(e).expect("automatic answers are valid");
                true
            }
            None => false,
        }
    }

    /// Answers until the phase is `phase` (or nothing is left to answer).
    pub fn run_until(&mut self, phase: Phase) {
        while self.t.phase() != phase && self.step() {}
    }

    /// Answers until nothing is left.
    pub fn run(&mut self) {
        while self.step() {}
    }

    /// Takes the next automatic answer without feeding it.
    pub fn next_answer(&mut self) -> Option<Event<PlanSummary>> {
        self.responses.pop_front()
    }

    pub fn pending_answers(&self) -> usize {
        self.responses.len()
    }

    pub fn drop_answers(&mut self) {
        self.responses.clear();
    }
}

pub fn dev(i: u32) -> DeviceId {
    DeviceId(i)
}
