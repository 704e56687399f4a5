//! The host backend: `scaler`'s `HostExecutor` on host devices.

use super::*;
use moe_engine::{Engine, EngineConfig};
use moe_host::deployment::{DeploymentConfig, PlacementKind};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use scaler::{DeviceSet, Strategy, TransitionKind, TransitionSpec};
use scaler_exec::executor::{HostExecutor, HostExecutorConfig};

pub(super) struct HostBench {
    cfg: ModelConfig,
    ckpt: Arc<Checkpoint>,
    n: usize,
    scheduler: SchedulerConfig,
}

impl HostBench {
    pub(super) fn new(cfg: &ModelConfig, ckpt: Arc<Checkpoint>, n: usize, args: &Args) -> Self {
        Self {
            cfg: cfg.clone(),
            ckpt,
            n,
            scheduler: scheduler(args),
        }
    }

    fn engine(
        &self,
        devices: usize,
        scheduler: SchedulerConfig,
    ) -> Result<Engine<DeploymentRunner>> {
        let (engine, _store) = DeploymentRunner::host_engine(
            &self.cfg,
            self.ckpt.as_ref(),
            &HostEngineConfig {
                devices,
                max_devices: self.n,
                placement: PlacementKind::Balanced,
                deployment: DeploymentConfig::default(),
                engine: EngineConfig {
                    scheduler,
                    idle_wait: Duration::from_millis(5),
                    ..EngineConfig::default()
                },
                ..HostEngineConfig::default()
            },
        )?;
        Ok(engine)
    }
}

struct HostSession {
    engine: Engine<DeploymentRunner>,
    exec: HostExecutor,
    strategy: Strategy,
    n: usize,
    serving: Option<moe_engine::RunLoop>,
    /// How long pre-initialising the warm pool's workers (every spare device) took at start.
    warm_pool_ms: f64,
}

impl Session for HostSession {
    fn submitter(&self) -> Submit {
        let (engine, gate) = (self.engine.clone(), Arc::clone(self.exec.gate()));
        Arc::new(move |r| gate.submit(&engine, r))
    }
    fn metrics(&self) -> Metrics {
        let engine = self.engine.clone();
        Arc::new(move || engine.metrics())
    }
    fn observe(&self, observer: Option<IterationObserver>) {
        self.engine.set_iteration_observer(observer);
    }
    fn scale(&mut self, to: usize) -> Result<Measured> {
        let from = self.exec.devices();
        let from_n = from.len();
        let target = scaler_exec::demo::target_devices(self.strategy, &from, to, self.n as u32)
            .with_context(|| format!("no {to} free devices for {:?}", self.strategy))?;
        let kind = if to > from.len() {
            TransitionKind::ScaleUp
        } else {
            TransitionKind::ScaleDown
        };
        let ev = self.exec.run(TransitionSpec {
            kind,
            strategy: self.strategy,
            from,
            to: target.clone(),
        })?;
        if !ev.completed() {
            bail!("the transition rolled back: {:?}", ev.report.abort_reason);
        }
        let r = &ev.report;
        let p = r.phases_ms;
        // The executor reports bytes moved, not per destination: spread them over the
        // receiving devices (those joining on a scale-up, the target set otherwise).
        let receivers = if self.strategy == Strategy::Elastic && to > from_n {
            to - from_n
        } else {
            to
        } as u64;
        let max_in = (r.bytes_moved + r.bytes_reloaded).div_ceil(receivers.max(1));
        Ok(Measured {
            latency_ms: r.latency_ms.unwrap_or(0.0),
            phases_ms: vec![
                ("plan".into(), p.plan),
                ("prepare".into(), p.prepare),
                ("switch".into(), p.switch),
                ("retire".into(), p.retire),
                ("switch_boundary".into(), ev.switch_boundary_ms),
            ],
            declared_downtime_ms: ev.downtime_ms,
            declared_intake_paused_ms: r.intake_paused_ms,
            bytes_moved: r.bytes_moved + r.bytes_reloaded,
            bytes_zero_copy: r.bytes_zero_copy,
            max_bytes_into_device: max_in,
            peak_bytes_per_device: ev.peak_bytes_per_device.values().copied().collect(),
            kv_migrated: r.sequences_migrated,
            requeued: r.sequences_requeued,
            devices_after: ev.devices_after.len(),
            prewarmed_chunks: 0,
            kept_snapshot: false,
            staged_ahead: false,
        })
    }
    fn ready(&mut self, _to: usize) -> Result<Option<f64>> {
        // The executor's warm pool was filled for every spare device when the session started.
        Ok(Some(self.warm_pool_ms))
    }
    fn stages(&self) -> bool {
        false
    }
    fn scale_staged(&mut self, _to: usize) -> Result<Option<StagedRun>> {
        // The host executor builds the next deployment inside the transition; nothing to stage.
        Ok(None)
    }
    fn runner_phases(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
    fn stop(mut self: Box<Self>) {
        if let Some(s) = self.serving.take() {
            s.stop();
        }
    }
}

impl ScaleBackend for HostBench {
    fn name(&self) -> &'static str {
        "host"
    }
    fn card(&self) -> String {
        "host".into()
    }
    fn gpus(&self) -> usize {
        self.n
    }
    fn exact(&self) -> bool {
        // The CPU compute is batch- and layout-invariant (moe-host's `Compute` contract).
        true
    }
    fn peer(&mut self) -> Result<PeerBandwidth> {
        // The host stand-in for a peer link is a memcpy between two buffers, which is also
        // what the executor's weight copies are: no transport apart.
        let bytes = 256 << 20;
        let a = vec![1u8; bytes];
        let mut b = vec![0u8; bytes];
        b.copy_from_slice(&a);
        let t = Instant::now();
        for _ in 0..4 {
            b.copy_from_slice(std::hint::black_box(&a));
        }
        Ok(PeerBandwidth {
            raw_gbps: 4.0 * bytes as f64 / t.elapsed().as_secs_f64() / 1e9,
            transport_gbps: None,
        })
    }
    fn skip(&self, strategy: StrategyArg, from: usize, to: usize) -> Option<String> {
        match strategy {
            StrategyArg::Colocated => {
                Some("the host executor does not implement the colocated baseline".into())
            }
            StrategyArg::Extravagant if from + to > self.n => Some(format!(
                "needs {} devices (a disjoint set of {to} beside {from}); {} present",
                from + to,
                self.n
            )),
            _ => None,
        }
    }
    fn start(&mut self, from: usize, strategy: StrategyArg) -> Result<Box<dyn Session>> {
        let engine = self.engine(from, self.scheduler)?;
        let exec = HostExecutor::new(
            engine.clone(),
            Arc::clone(&self.ckpt) as scaler_exec::executor::Checkpoint,
            HostExecutorConfig {
                deployment: DeploymentConfig::default(),
                ..HostExecutorConfig::default()
            },
        );
        let t = Instant::now();
        exec.prewarm(&DeviceSet::first(self.n as u32).difference(&exec.devices()));
        let warm_pool_ms = t.elapsed().as_secs_f64() * 1e3;
        let serving = engine.start();
        Ok(Box::new(HostSession {
            engine,
            exec,
            strategy: strategy.into(),
            n: self.n,
            serving: Some(serving),
            warm_pool_ms,
        }))
    }
    fn reference(
        &mut self,
        prompts: &[Vec<TokenId>],
        max_tokens: usize,
        max_running: usize,
    ) -> Result<Vec<Vec<TokenId>>> {
        let engine = self.engine(
            1,
            SchedulerConfig {
                max_running_per_rank: max_running.max(1),
                ..self.scheduler
            },
        )?;
        let handles = prompts
            .iter()
            .map(|p| engine.submit(Request::greedy(p.clone(), max_tokens)))
            .collect::<Result<Vec<_>, _>>()?;
        let run = engine.start();
        let out = handles.into_iter().map(|h| h.wait().tokens).collect();
        run.stop();
        Ok(out)
    }
}
