//! The CUDA backend: `moe_cuda`'s elastic scaling and baselines.

use super::*;
use moe_cuda::{self as cuda, CudaConfig, CudaRunner, CudaScaler, Precision, ScaleOutcome};
use moe_engine::{Engine, EngineConfig, RunLoop};
use moe_model::weights::TensorSource;

pub(super) struct CudaBench {
    /// The machine `--devices` named: the GPU of each logical device.
    gpus: cuda::GpuMap,
    cfg: ModelConfig,
    ckpt: Arc<Checkpoint>,
    n: usize,
    args_kv: usize,
    scheduler: SchedulerConfig,
    card: String,
    peer: Option<PeerBandwidth>,
    batch_invariant: bool,
}

impl CudaBench {
    pub(super) fn new(
        cfg: &ModelConfig,
        ckpt: Arc<Checkpoint>,
        machine: &[u32],
        args: &Args,
    ) -> Result<Self> {
        let have = cuda::device_count()?;
        if let Some(g) = machine.iter().find(|&&g| g as usize >= have) {
            bail!("--devices names GPU {g}; {have} present");
        }
        let n = machine.len();
        Ok(Self {
            gpus: cuda::GpuMap::new(machine)?,
            cfg: cfg.clone(),
            ckpt,
            n,
            args_kv: args.kv_blocks,
            scheduler: scheduler(args),
            card: String::new(),
            peer: None,
            batch_invariant: args.batch_invariant,
        })
    }

    fn config(&self, devices: usize, kv: usize) -> CudaConfig {
        CudaConfig {
            devices,
            gpus: self.gpus,
            kv_blocks_per_rank: kv,
            max_batch_tokens: self.scheduler.max_batch_tokens,
            max_context: 1024,
            precision: Precision::Bf16,
            batch_invariant: self.batch_invariant,
            ..CudaConfig::default()
        }
    }
}

/// A CUDA transition as the bench reports it.
fn measured(o: ScaleOutcome) -> Measured {
    Measured {
        latency_ms: o.latency_ms,
        phases_ms: o
            .phases_ms
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        declared_downtime_ms: o.downtime_ms,
        // Only the cold restart holds the loop; requests wait in the queue meanwhile.
        declared_intake_paused_ms: o.downtime_ms,
        bytes_moved: o.bytes_moved,
        bytes_zero_copy: o.bytes_zero_copy,
        max_bytes_into_device: o.max_bytes_into_device,
        peak_bytes_per_device: o.peak_bytes_per_device,
        kv_migrated: o.kv_migrated,
        requeued: o.requeued,
        devices_after: o.devices_after,
        prewarmed_chunks: o.prewarmed_chunks,
        kept_snapshot: o.kept_snapshot,
        staged_ahead: o.staged_ahead,
    }
}

struct CudaSession {
    engine: Engine<CudaRunner>,
    scaler: CudaScaler,
    ckpt: Arc<Checkpoint>,
    strategy: StrategyArg,
    kv: usize,
    serving: Option<RunLoop>,
    /// The runner times its phases (`ELASTICMOE_RUNNER_PHASES`; slows every step).
    phases: bool,
}

impl Session for CudaSession {
    fn submitter(&self) -> Submit {
        let engine = self.engine.clone();
        Arc::new(move |r| engine.submit(r))
    }
    fn metrics(&self) -> Metrics {
        let engine = self.engine.clone();
        Arc::new(move || engine.metrics())
    }
    fn observe(&self, observer: Option<IterationObserver>) {
        self.engine.set_iteration_observer(observer);
    }
    fn scale(&mut self, to: usize) -> Result<Measured> {
        let o: ScaleOutcome = match self.strategy {
            StrategyArg::Elastic => self.scaler.elastic(to)?,
            StrategyArg::ColdRestart => self.scaler.cold_restart(
                Arc::clone(&self.ckpt) as Arc<dyn TensorSource + Send + Sync>,
                to,
            )?,
            StrategyArg::Colocated => self.scaler.colocated(self.ckpt.as_ref(), to, self.kv)?,
            StrategyArg::Extravagant => self.scaler.extravagant(to)?,
        };
        trace(&format!("scaled: {o:?}"));
        Ok(measured(o))
    }
    fn ready(&mut self, to: usize) -> Result<Option<f64>> {
        if self.strategy != StrategyArg::Elastic {
            return Ok(None);
        }
        let from = self.engine.metrics().kv.len();
        if to <= from {
            return Ok(None);
        }
        // The joining ranks' contexts, streams, handles and kernels (the design's standby
        // instances); nothing of the step's layout.
        let t = self.scaler.prewarm(from, to)?;
        trace(&format!(
            "warm pool: ranks {from}..{to} started in {:.1} ms",
            t.as_secs_f64() * 1e3
        ));
        Ok(Some(t.as_secs_f64() * 1e3))
    }
    fn stages(&self) -> bool {
        self.strategy == StrategyArg::Elastic
    }
    fn scale_staged(&mut self, to: usize) -> Result<Option<StagedRun>> {
        if self.strategy != StrategyArg::Elastic || !self.scaler.has_snapshot() {
            return Ok(None);
        }
        // Everything the request would otherwise do before its copies: the expert chunks it
        // creates, the new ranges reserved and mapped, the warm ranks.
        let t = Instant::now();
        let from = self.engine.metrics().kv.len();
        if to > from {
            self.scaler.prewarm(from, to)?;
        }
        self.scaler.prewarm_experts(to)?;
        if self.scaler.stage_ahead(to)?.is_none() {
            return Ok(None);
        }
        let staging_ms = t.elapsed().as_secs_f64() * 1e3;
        let o = self.scaler.elastic(to)?;
        trace(&format!(
            "scaled (staged ahead in {staging_ms:.1} ms): {o:?}"
        ));
        if !o.staged_ahead {
            bail!("the staged run of {from}->{to} did not use its staged layout");
        }
        Ok(Some(StagedRun {
            staging_ms,
            measured: measured(o),
        }))
    }

    fn runner_phases(&mut self) -> Vec<(String, f64)> {
        if !self.phases {
            return Vec::new();
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.engine.at_boundary(move |r, _| {
            let _ = tx.send(r.take_phase_times());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .map(|v| v.into_iter().map(|(k, x)| (k.to_string(), x)).collect())
            .unwrap_or_default()
    }
    fn stop(mut self: Box<Self>) {
        if let Some(s) = self.serving.take() {
            s.stop();
        }
    }
}

impl ScaleBackend for CudaBench {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn card(&self) -> String {
        self.card.clone()
    }
    fn gpus(&self) -> usize {
        self.n
    }
    fn exact(&self) -> bool {
        self.batch_invariant
    }
    fn peer(&mut self) -> Result<PeerBandwidth> {
        // Measured when the first engine started (see `start`).
        Ok(self.peer.unwrap_or_default())
    }
    fn skip(&self, strategy: StrategyArg, from: usize, to: usize) -> Option<String> {
        match strategy {
            // The scaler's own device-set check: the engine serves on GPUs `0..from`.
            StrategyArg::Extravagant => {
                cuda::disjoint_devices(&cuda::first_devices(from), to, self.n)
                    .err()
                    .map(|e| e.to_string())
            }
            _ => None,
        }
    }
    fn start(&mut self, from: usize, strategy: StrategyArg) -> Result<Box<dyn Session>> {
        // Colocated keeps two instances on the staying GPUs: each gets half the KV.
        let kv = if strategy == StrategyArg::Colocated {
            self.args_kv / 2
        } else {
            self.args_kv
        };
        trace(&format!("loading the checkpoint on {from} GPU(s)"));
        let mut runner = CudaRunner::load(&self.cfg, self.ckpt.as_ref(), self.config(from, kv))?;
        trace("loaded");
        let phases = std::env::var_os("ELASTICMOE_RUNNER_PHASES").is_some();
        runner.set_phase_timing(phases);
        let bp = runner.blueprint();
        // Valid until the first switch (only a switch changes the runner's buffers).
        let snapshot = runner.snapshot();
        if self.card.is_empty() {
            self.card = runner.device_name()?;
        }
        let engine = Engine::new(
            runner,
            EngineConfig {
                scheduler: self.scheduler,
                idle_wait: Duration::from_millis(2),
                ..EngineConfig::default()
            },
        );
        let mut scaler = CudaScaler::new(engine.clone(), bp)?;
        scaler.adopt_snapshot(snapshot);
        if self.peer.is_none() && self.n >= 2 {
            // Between the first two devices (the same GPU's local copy for logical ranks on one
            // GPU), on 1 GiB: raw cuMemcpyPeerAsync, then the project's transport.
            let d = cuda::first_devices(2);
            let raw_gbps = scaler
                .blueprint()
                .raw_peer_bandwidth(d[0], d[1], 1 << 30, 4)?;
            let transport_gbps = cuda::peer_bandwidth(
                scaler.blueprint(),
                scaler.transport(),
                d[0],
                d[1],
                1 << 30,
                4,
            )?;
            trace(&format!(
                "peer bandwidth: raw {raw_gbps:.1} GB/s, transport {transport_gbps:.1} GB/s"
            ));
            self.peer = Some(PeerBandwidth {
                raw_gbps,
                transport_gbps: Some(transport_gbps),
            });
        }
        let serving = engine.start();
        Ok(Box::new(CudaSession {
            engine,
            scaler,
            ckpt: Arc::clone(&self.ckpt),
            strategy,
            kv,
            serving: Some(serving),
            phases,
        }))
    }
    fn reference(
        &mut self,
        prompts: &[Vec<TokenId>],
        max_tokens: usize,
        max_running: usize,
    ) -> Result<Vec<Vec<TokenId>>> {
        let runner = CudaRunner::load(&self.cfg, self.ckpt.as_ref(), self.config(1, self.args_kv))?;
        let engine = Engine::new(
            runner,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_running_per_rank: max_running.max(1),
                    ..self.scheduler
                },
                ..EngineConfig::default()
            },
        );
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
