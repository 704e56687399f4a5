//! `elasticmoe demo`: elastic scaling end to end on 4 host devices, or on GPUs.
//!
//! ```text
//! elasticmoe demo --out target/demo
//! elasticmoe demo --out target/demo --compare
//! elasticmoe demo --out target/demo-gpu --devices cuda:0,1   # binary built with --features cuda
//! ```
//!
//! A tiny model is generated into the cache directory on the first run and reused. Before the
//! trace, the demo measures how many requests per second one device of this machine completes
//! (`scaler_exec::demo::measure_capacity`) and scales the trace to it
//! (`TraceRates::for_capacity`): a base load one device carries, a step that needs at least
//! two devices, a ramp down, a burst that needs every device and a quiet tail that needs one.
//! So the SLO policy scales the deployment up and down by itself on a fast machine as on a
//! slow one, while requests keep arriving. Latencies come from the engine's token timestamps,
//! counted from each request's arrival on the trace. Writes `OUT/report.json` (issue 8's
//! schema plus the calibration; with `--compare`, `{"runs": [...]}`) and `OUT/timeline.svg`.
//!
//! `--devices host:N` (default `host:4`) runs the host executor on N host devices.
//! `--devices cuda:0,1,...` runs the same trace and policy on that many GPUs: an
//! `Engine<CudaRunner>` serves on its own thread and `moe_cuda::CudaScaler` carries out
//! the policy's decisions (elastic, cold restart or colocated; the extravagant baseline is not
//! implemented on CUDA). The report has the same keys, with `backend: "cuda"`. On GPUs the model
//! runs in f32 (`Precision::F32`) and every step takes the same expert-dispatch path, so a
//! request's tokens do not depend on the batch it ran in and the outputs can be compared with a
//! fixed one-GPU deployment token by token. Without the `cuda` feature, or without a GPU or
//! driver, `cuda:` devices are a clear error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use moe_model::presets::Preset;
use moe_model::synth::{write_model, SynthOptions};
use scaler::Strategy;
use scaler_exec::demo::{
    self, Calibration, Capacity, DemoConfig, DemoRun, Report, Trace, TraceRates,
};
use scaler_exec::DeviceKind;

/// A strategy on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// Build the next deployment beside the running one; never pause.
    Elastic,
    /// Stop, rebuild from disk, restart.
    ColdRestart,
    /// A new instance on disjoint devices.
    Extravagant,
    /// A second instance on old plus new devices, weights duplicated, KV budget halved.
    Colocated,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::Elastic => Strategy::Elastic,
            StrategyArg::ColdRestart => Strategy::ColdRestart,
            StrategyArg::Extravagant => Strategy::Extravagant,
            StrategyArg::Colocated => Strategy::Colocated,
        }
    }
}

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where report.json and timeline.svg go.
    #[arg(long, default_value = "target/demo")]
    pub out: PathBuf,
    /// The scaling strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Elastic)]
    pub strategy: StrategyArg,
    /// Run every strategy (elastic, cold-restart, extravagant, colocated) on the same trace.
    #[arg(long, conflicts_with = "strategy")]
    pub compare: bool,
    /// Length of the trace in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub trace_seconds: f64,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Where the generated model is cached.
    #[arg(long, default_value = ".elasticmoe-cache")]
    pub cache: PathBuf,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// `host:N` (the host executor on N devices) or `cuda:0,1,...` (GPUs 0..n, binary built with
    /// the `cuda` feature).
    #[arg(long, default_value = "host:4")]
    pub devices: String,
    /// Host devices: add this many milliseconds to every step, to see the demo on slower
    /// devices (the trace is fitted to the measured speed either way).
    #[arg(long, default_value_t = 0.0)]
    pub step_delay_ms: f64,
}

const PRESET: Preset = Preset::TinyQwen3;
const SEED: u64 = 8;

/// The cached model directory, generated on first use.
fn model_dir(cache: &Path, quiet: bool) -> Result<PathBuf> {
    let dir = cache.join(format!("{}-seed{SEED}", PRESET.name()));
    if !dir.join("config.json").exists() || Checkpoint::open(&dir).is_err() {
        if !quiet {
            eprintln!(
                "generating {} into {} (first run only)",
                PRESET.name(),
                dir.display()
            );
        }
        let tmp = cache.join(format!(".{}-partial", PRESET.name()));
        let _ = std::fs::remove_dir_all(&tmp);
        write_model(&PRESET.config(), &tmp, &SynthOptions::new(SEED), |_| {})
            .with_context(|| format!("writing the demo model into {}", tmp.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving the demo model into {}", dir.display()))?;
    }
    Ok(dir)
}

/// Runs the demo.
pub fn run(args: &Args) -> Result<()> {
    if !(args.trace_seconds > 0.0 && args.trace_seconds.is_finite()) {
        bail!("--trace-seconds must be a positive number of seconds");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(args.step_delay_ms >= 0.0 && args.step_delay_ms <= 10_000.0) {
        bail!("--step-delay-ms must be between 0 and 10000");
    }
    let strategies: Vec<Strategy> = if args.compare {
        Strategy::ALL.to_vec()
    } else {
        vec![args.strategy.into()]
    };
    let spec = super::parse_device_spec(&args.devices)?;
    let devices = match spec.kind() {
        DeviceKind::Host => spec.ranks() as u32,
        DeviceKind::Cuda => return cuda_demo(args, &strategies, &super::cuda_machine(&spec)?),
    };
    let dir = model_dir(&args.cache, args.quiet)?;
    let cfg = ModelConfig::from_dir(&dir)
        .with_context(|| format!("reading the demo model's config in {}", dir.display()))?;
    let checkpoint: scaler_exec::executor::Checkpoint =
        Arc::new(Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?);
    let step_delay = std::time::Duration::from_secs_f64(args.step_delay_ms / 1e3);
    let host_config = |strategy: Strategy| {
        let mut c = DemoConfig::new(strategy, devices, PRESET.name());
        c.step_delay = step_delay;
        c
    };
    let base = host_config(Strategy::Elastic);
    if !args.quiet {
        eprintln!("measuring the capacity of one device and of {devices}");
    }
    let one = demo::host_capacity(&cfg, &checkpoint, &base, 1, args.max_tokens)
        .context("measuring one device's capacity")?;
    let all = demo::host_capacity(&cfg, &checkpoint, &base, devices, args.max_tokens)
        .with_context(|| format!("measuring {devices} devices' capacity"))?;
    let (trace, calibration) = fitted_trace(args, cfg.vocab_size, one, all, devices);
    let reference = demo::reference_tokens(&cfg, &checkpoint, &base, 1, &trace)
        .context("running the reference on a fixed deployment")?;
    let mut runs: Vec<DemoRun> = Vec::new();
    for strategy in strategies {
        let mut config = host_config(strategy);
        config.fit_targets(&one);
        let quiet = args.quiet;
        let run = demo::run(&cfg, &checkpoint, &config, &trace, &reference, |p| {
            if !quiet {
                eprint!(
                    "\r[{strategy}] t={:5.1}s  done {}/{}  devices {}  {:7.0} tok/s  transitions {}   ",
                    p.t_s, p.finished, p.total, p.devices, p.tokens_per_s, p.transitions
                );
                let _ = std::io::stderr().flush();
            }
        })
        .with_context(|| format!("running the {strategy} demo"))?;
        if !quiet {
            eprintln!();
        }
        let mut run = run;
        run.report.calibration = Some(calibration);
        runs.push(run);
    }
    let refs: Vec<&DemoRun> = runs.iter().collect();
    let reports: Vec<&Report> = runs.iter().map(|r| &r.report).collect();
    write_outputs(
        &args.out,
        args.compare,
        &reports,
        &crate::report::timeline_svg(&refs),
    )
}

/// The trace fitted to the measured capacity of one device and of all `devices`, and how.
fn fitted_trace(
    args: &Args,
    vocab: usize,
    one: Capacity,
    all: Capacity,
    devices: u32,
) -> (Trace, Calibration) {
    let rates = TraceRates::for_capacity(one.requests_per_s, all.requests_per_s, devices);
    let trace = Trace::step_ramp_burst(vocab, args.trace_seconds, args.max_tokens, SEED, rates);
    if !args.quiet {
        eprintln!(
            "one device: {:.1} requests/s ({:.2} ms per token), {devices}: {:.1} requests/s; \
             trace at {:.1}/{:.1}/{:.1}/{:.1} requests/s (base/step/burst/tail): {} requests \
             over {:.0} s; computing the fixed-deployment reference",
            one.requests_per_s,
            one.tpot_ms,
            all.requests_per_s,
            rates.base,
            rates.step,
            rates.burst,
            rates.tail,
            trace.requests.len(),
            args.trace_seconds
        );
    }
    (
        trace,
        Calibration {
            one_device: one,
            all_devices: all,
            rates,
        },
    )
}

/// Writes report.json and timeline.svg and prints one summary line per run.
fn write_outputs(out: &Path, compare: bool, reports: &[&Report], svg: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = match reports {
        [one] if !compare => serde_json::to_value(one)?,
        _ => serde_json::json!({ "runs": reports }),
    };
    let report_path = out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", report_path.display()))?;
    let svg_path = out.join("timeline.svg");
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    for rep in reports {
        println!(
            "{}: {} requests, {} completed, {} failed; {} scale events ({}); identical outputs: {}",
            rep.strategy,
            rep.requests.submitted,
            rep.requests.completed,
            rep.requests.failed,
            rep.scale_events.len(),
            rep.scale_events
                .iter()
                .map(|e| format!("{} {}→{}", e.kind, e.from_devices, e.to_devices))
                .collect::<Vec<_>>()
                .join(", "),
            rep.outputs_identical_to_reference
        );
    }
    println!("wrote {} and {}", report_path.display(), svg_path.display());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_demo(_args: &Args, _strategies: &[Strategy], _machine: &[u32]) -> Result<()> {
    bail!("this binary was not built with CUDA (build with --features cuda); use --devices host:N")
}

#[cfg(feature = "cuda")]
fn cuda_demo(args: &Args, strategies: &[Strategy], machine: &[u32]) -> Result<()> {
    gpu::run(args, strategies, machine)
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The demo on GPUs: the host demo's trace, policy and report over an `Engine<CudaRunner>`
    //! scaled by `CudaScaler`.

    use std::time::Duration;

    use moe_cuda::{self as cuda, CudaConfig, CudaRunner, CudaScaler, Precision, ScaleOutcome};
    use moe_engine::{Engine, EngineConfig, Request, SchedulerConfig, TokenId};
    use moe_model::weights::TensorSource;
    use scaler::DeviceSet;
    use scaler_exec::demo::{DemoEvent, EventPhasesMs, ScaleEventReport};

    use super::*;

    /// KV blocks per GPU: the demo's requests are short (prompts up to 13 tokens, 64 generated).
    const KV_BLOCKS: usize = 1024;

    /// The machine `--devices` named: the GPU of each logical device (set once, in [`run`]).
    static MACHINE: std::sync::OnceLock<cuda::GpuMap> = std::sync::OnceLock::new();

    fn config(devices: usize, kv_blocks: usize) -> CudaConfig {
        CudaConfig {
            devices,
            gpus: MACHINE.get().copied().unwrap_or_default(),
            block_tokens: 16,
            kv_blocks_per_rank: kv_blocks,
            max_batch_tokens: SchedulerConfig::default().max_batch_tokens,
            max_context: 1024,
            precision: Precision::F32,
            // Run on the GPUs (2026-11-28) with the default GEMMs; f32 plus one dispatch path
            // gave identical outputs there (`docs/benchmarks/cuda-runtime.md`).
            batch_invariant: false,
        }
    }

    /// A runner on GPUs `0..devices` on which every step takes the host-dispatch path, so that
    /// a row's result does not depend on how many rows share its step.
    fn runner(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        devices: usize,
        kv: usize,
    ) -> Result<CudaRunner> {
        let mut r = CudaRunner::load(cfg, ckpt, config(devices, kv))
            .with_context(|| format!("loading the demo model on {devices} GPU(s)"))?;
        r.set_device_dispatch_max_rows(0);
        r.set_padded_dispatch_max_rows(0);
        Ok(r)
    }

    fn engine_config(scheduler: SchedulerConfig) -> EngineConfig {
        EngineConfig {
            scheduler,
            idle_wait: Duration::from_millis(2),
            ..EngineConfig::default()
        }
    }

    /// The report entry of a finished CUDA transition. Phases map onto issue 8's four: plan
    /// (snapshot and placement plan), prepare (workers, mapping, peer copies; the colocated
    /// baseline's load beside), switch (the cold restart's held reload too) and retire.
    fn event_report(
        kind: &str,
        from: usize,
        strategy: Strategy,
        o: &ScaleOutcome,
    ) -> ScaleEventReport {
        let phase = |names: &[&str]| -> f64 {
            o.phases_ms
                .iter()
                .filter(|(n, _)| names.contains(n))
                .map(|(_, v)| v)
                .sum()
        };
        ScaleEventReport {
            kind: kind.to_string(),
            from_devices: from as u64,
            to_devices: o.devices_after as u64,
            strategy: strategy.as_str().to_string(),
            latency_ms: o.latency_ms,
            downtime_ms: o.downtime_ms,
            // Only the cold restart holds the loop; requests wait in the queue meanwhile.
            intake_paused_ms: o.downtime_ms,
            bytes_moved: o.bytes_moved,
            bytes_zero_copy: o.bytes_zero_copy,
            peak_bytes_per_device: o.peak_bytes_per_device.clone(),
            phases_ms: EventPhasesMs {
                plan: phase(&["snapshot", "plan"]),
                prepare: phase(&["workers", "map", "copy", "load_beside"]),
                switch: phase(&["switch", "stopped_reload"]),
                retire: phase(&["retire"]),
            },
            switch_boundary_ms: phase(&["switch_boundary", "stopped_reload"]),
            // The CUDA scaler copies a leaving GPU's KV inside the switch (counted in
            // bytes_moved) and has no pre-copy.
            kv_bytes_precopied: 0,
            kv_bytes_at_switch: 0,
            sequences_preempted: o.requeued,
            kv_budget_chunks: Vec::new(),
        }
    }

    /// Every trace request on a fixed one-GPU deployment.
    fn reference(cfg: &ModelConfig, ckpt: &Checkpoint, trace: &Trace) -> Result<Vec<Vec<TokenId>>> {
        let engine = Engine::new(
            runner(cfg, ckpt, 1, KV_BLOCKS)?,
            engine_config(SchedulerConfig::default()),
        );
        let handles = trace
            .requests
            .iter()
            .map(|r| engine.submit(Request::greedy(r.prompt.clone(), r.max_tokens)))
            .collect::<Result<Vec<_>, _>>()?;
        let run = engine.start();
        let out = handles.into_iter().map(|h| h.wait().tokens).collect();
        run.stop();
        Ok(out)
    }

    /// The capacity of `devices` GPUs with the demo's scheduler ([`demo::measure_capacity`]).
    fn capacity(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        devices: usize,
        max_tokens: usize,
    ) -> Result<Capacity> {
        let scheduler = DemoConfig::new(Strategy::Elastic, 1, PRESET.name()).scheduler;
        let engine = Engine::new(
            runner(cfg, ckpt, devices, KV_BLOCKS)?,
            engine_config(scheduler),
        );
        let serving = engine.start();
        let submit = |r: Request| engine.submit(r).map_err(|e| e.to_string());
        let out = demo::measure_capacity(
            &submit,
            scheduler.max_running_per_rank * devices,
            max_tokens,
            cfg.vocab_size,
        );
        serving.stop();
        Ok(out?)
    }

    /// A finished CUDA transition, as the demo's loop sees it.
    struct GpuEvent {
        report: ScaleEventReport,
        after: DeviceSet,
    }

    impl DemoEvent for GpuEvent {
        fn devices_after(&self) -> DeviceSet {
            self.after.clone()
        }

        fn completed(&self) -> bool {
            true
        }

        fn report(&self) -> ScaleEventReport {
            self.report.clone()
        }
    }

    pub(super) fn run(args: &Args, strategies: &[Strategy], machine: &[u32]) -> Result<()> {
        let have = cuda::device_count().context("--devices cuda: needs a GPU")?;
        if let Some(g) = machine.iter().find(|&&g| g as usize >= have) {
            bail!("--devices names GPU {g}; {have} present");
        }
        let map = cuda::GpuMap::new(machine)?;
        MACHINE.get_or_init(|| map);
        let gpus = machine.len() as u32;
        if let Some(s) = strategies.iter().find(|&&s| s == Strategy::Extravagant) {
            bail!("the {s} baseline is not implemented on CUDA; use elastic, cold-restart or colocated");
        }
        let dir = model_dir(&args.cache, args.quiet)?;
        let cfg = ModelConfig::from_dir(&dir)
            .with_context(|| format!("reading the demo model's config in {}", dir.display()))?;
        let ckpt: Arc<Checkpoint> =
            Arc::new(Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?);
        if args.step_delay_ms > 0.0 {
            bail!("--step-delay-ms is for host devices");
        }
        if !args.quiet {
            eprintln!("measuring the capacity of one GPU and of {gpus}");
        }
        let one =
            capacity(&cfg, &ckpt, 1, args.max_tokens).context("measuring one GPU's capacity")?;
        let all = capacity(&cfg, &ckpt, gpus as usize, args.max_tokens)
            .with_context(|| format!("measuring {gpus} GPUs' capacity"))?;
        let (trace, calibration) = fitted_trace(args, cfg.vocab_size, one, all, gpus);
        let reference = reference(&cfg, &ckpt, &trace)
            .context("running the reference on a fixed one-GPU deployment")?;
        let mut runs = Vec::new();
        for &strategy in strategies {
            let mut r = run_one(args, &cfg, &ckpt, &trace, &reference, strategy, gpus, &one)
                .with_context(|| format!("running the {strategy} demo on {gpus} GPU(s)"))?;
            r.report.calibration = Some(calibration);
            runs.push(r);
        }
        let marks = |r: &DemoRun<GpuEvent>| -> Vec<(f64, String)> {
            r.events
                .iter()
                .map(|e| {
                    let x = &e.event.report;
                    (
                        e.start_s,
                        format!("{} {}→{}", x.kind, x.from_devices, x.to_devices),
                    )
                })
                .collect()
        };
        let lines: Vec<crate::report::Line<'_>> = runs
            .iter()
            .map(|r| crate::report::Line {
                name: &r.report.strategy,
                timeline: &r.timeline,
                marks: marks(r),
            })
            .collect();
        let reports: Vec<&Report> = runs.iter().map(|r| &r.report).collect();
        write_outputs(
            &args.out,
            args.compare,
            &reports,
            &crate::report::lines_svg(&lines),
        )
    }

    /// One strategy's demo: a runner on the first GPU(s), the engine serving it, and the
    /// scaler's transitions behind the host demo's loop ([`demo::drive`]).
    #[allow(clippy::too_many_arguments)]
    fn run_one(
        args: &Args,
        cfg: &ModelConfig,
        ckpt: &Arc<Checkpoint>,
        trace: &Trace,
        reference: &[Vec<TokenId>],
        strategy: Strategy,
        gpus: u32,
        one: &Capacity,
    ) -> Result<DemoRun<GpuEvent>> {
        let mut config = DemoConfig::new(strategy, gpus, PRESET.name());
        config.fit_targets(one);
        // The colocated baseline keeps two instances on the staying GPUs: each gets half the KV.
        let kv = if strategy == Strategy::Colocated {
            KV_BLOCKS / 2
        } else {
            KV_BLOCKS
        };
        let first = runner(cfg, ckpt, config.initial as usize, kv)?;
        let bp = first.blueprint();
        let card = first.device_name()?;
        let engine = Engine::new(first, engine_config(config.scheduler));
        let mut scaler = CudaScaler::new(engine.clone(), bp)?;
        if strategy == Strategy::Elastic {
            scaler.prewarm(config.initial as usize, gpus as usize)?;
        }
        if !args.quiet {
            eprintln!("[{strategy}] serving on {} x {card}", config.initial);
        }
        let serving = engine.start();
        let source = Arc::clone(ckpt);
        let submit_engine = engine.clone();
        let backend = demo::DemoBackend {
            name: "cuda",
            submit: Box::new(move |r| submit_engine.submit(r).map_err(|e| e.to_string())),
            metrics: Box::new(move || engine.metrics()),
            transition: Box::new(move |spec| {
                let to = spec.to.len();
                let out = match strategy {
                    Strategy::Elastic => scaler.elastic(to),
                    Strategy::ColdRestart => scaler.cold_restart(
                        Arc::clone(&source) as Arc<dyn TensorSource + Send + Sync>,
                        to,
                    ),
                    _ => scaler.colocated(source.as_ref(), to, kv),
                };
                out.map(|o| GpuEvent {
                    report: event_report(spec.kind.as_str(), spec.from.len(), strategy, &o),
                    after: DeviceSet::first(o.devices_after as u32),
                })
                .map_err(|e| scaler_exec::demo::DemoError::Transition(e.to_string()))
            }),
            stop: Box::new(move || serving.stop()),
        };
        let quiet = args.quiet;
        let run = demo::drive(backend, &config, trace, reference, |p| {
            if !quiet {
                eprint!(
                    "\r[{strategy}] t={:5.1}s  done {}/{}  GPUs {}  {:7.0} tok/s  transitions {}   ",
                    p.t_s, p.finished, p.total, p.devices, p.tokens_per_s, p.transitions
                );
                let _ = std::io::stderr().flush();
            }
        });
        if !quiet {
            eprintln!();
        }
        Ok(run?)
    }
}
