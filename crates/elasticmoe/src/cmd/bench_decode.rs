//! `elasticmoe bench decode`: decode throughput of the serving engine at several batch sizes,
//! beside the weight-bytes-read floor.
//!
//! ```text
//! elasticmoe bench decode --preset qwen3-30b-a3b --layers 24 --devices cuda:0 --batches 1,8,64,256
//! elasticmoe bench decode --model models/tiny-qwen3 --devices host:2 --batches 1,8 --json
//! ```
//!
//! For each batch size B, B greedy requests with a one-token prompt go through the engine
//! ([`Engine::step`] on this thread); after `--warmup` iterations (the first one prefills), the
//! next `--steps` iterations are timed, each of which must generate exactly B tokens. On
//! `cuda:` devices the CUDA runner serves (greedy tokens chosen on the GPU) and the floor is the
//! bytes one step reads (replicated weights except the embedding table, plus every routed expert
//! the step's routes touched) divided by the device copy bandwidth measured in the same run. On
//! `host:N` the CPU backend serves (so the command is testable anywhere) and there is no floor.
//!
//! `--preset` weights are seeded random values (generated on the GPU for `cuda:`, in host memory
//! for `host:`, where large presets are refused: use `--layers` or a tiny preset).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use moe_engine::{Engine, EngineConfig, Request, Runner, SchedulerConfig};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use moe_model::presets::{self, Preset};
use moe_model::weights::MemTensors;

use super::generate::{parse_devices, Devices};

/// Largest f32 weight size a `--preset` may have on `host:` devices.
const HOST_PRESET_MAX_BYTES: usize = 4 << 30;

/// Arguments of `bench decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    pub model: Option<PathBuf>,
    /// A preset shape with seeded random weights (e.g. qwen3-30b-a3b, tiny-qwen3).
    #[arg(long)]
    pub preset: Option<String>,
    /// Keep only the first N layers of the model.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Devices: `host:N` (CPU backend) or `cuda:0,1,...` (GPUs 0..n).
    #[arg(long, default_value = "host:1")]
    pub devices: String,
    /// Batch sizes (concurrent sequences), comma-separated.
    #[arg(long, default_value = "1,8,64,256")]
    pub batches: String,
    /// Untimed iterations per batch (the first prefills the one-token prompts).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed decode iterations per batch.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Seed of `--preset` weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One batch size's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// Concurrent sequences.
    pub batch: usize,
    /// Generated tokens per second over the timed iterations.
    pub tokens_per_s: f64,
    /// Milliseconds per timed iteration.
    pub ms_per_step: f64,
    /// Tokens per second at the weight-bytes-read floor (GPU only).
    pub floor_tokens_per_s: Option<f64>,
}

fn parse_batches(s: &str) -> Result<Vec<usize>> {
    let b = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("--batches {s:?}: {t:?} is not a positive number"))
        })
        .collect::<Result<Vec<_>>>()?;
    if b.is_empty() {
        bail!("--batches is empty");
    }
    Ok(b)
}

/// Runs `bench decode`.
pub fn run(args: &Args) -> Result<()> {
    let stdout = std::io::stdout();
    bench(args, &mut stdout.lock())
}

/// The model config and where its weights come from.
enum Source {
    Dir(PathBuf),
    Preset(String),
}

/// Runs `bench decode`, writing the report to `out`.
pub fn bench(args: &Args, out: &mut dyn Write) -> Result<()> {
    let devices = parse_devices(&args.devices)?;
    let batches = parse_batches(&args.batches)?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (mut cfg, source) = match (&args.model, &args.preset) {
        (Some(dir), None) => {
            if !dir.is_dir() {
                bail!(
                    "model directory {} does not exist (write one with `elasticmoe gen-model`)",
                    dir.display()
                );
            }
            let cfg = ModelConfig::from_dir(dir)
                .with_context(|| format!("reading the config of {}", dir.display()))?;
            (cfg, Source::Dir(dir.clone()))
        }
        (None, Some(p)) => {
            let preset: Preset = p.parse()?;
            (preset.config(), Source::Preset(preset.to_string()))
        }
        _ => bail!("give exactly one of --model DIR and --preset NAME"),
    };
    if let Some(n) = args.layers {
        cfg = presets::with_layers(&cfg, n)
            .with_context(|| format!("--layers {n} does not fit the model"))?;
    }
    let name = match &source {
        Source::Dir(d) => d.display().to_string(),
        Source::Preset(p) => p.clone(),
    };
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let scheduler = SchedulerConfig {
        max_batch_tokens: max_batch,
        max_running_per_rank: max_batch,
    };
    let engine_cfg = EngineConfig {
        scheduler,
        ..EngineConfig::default()
    };
    let (rows, card) = match devices {
        Devices::Host(n) => {
            let host = HostEngineConfig {
                devices: n,
                max_devices: n,
                engine: engine_cfg,
                ..HostEngineConfig::default()
            };
            let (engine, _store) = match &source {
                Source::Dir(dir) => {
                    let ckpt = Checkpoint::open(dir)
                        .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
                    DeploymentRunner::host_engine(&cfg, &ckpt, &host)
                }
                Source::Preset(p) => {
                    let bytes = 4 * cfg.total_params();
                    if bytes > HOST_PRESET_MAX_BYTES {
                        bail!(
                            "--preset {p} with {} layers needs {:.1} GB of f32 weights in host \
                             memory; use --layers, a tiny preset or cuda: devices",
                            cfg.num_layers,
                            bytes as f64 / 1e9
                        );
                    }
                    DeploymentRunner::host_engine(&cfg, &MemTensors::seeded(&cfg, args.seed), &host)
                }
            }
            .with_context(|| format!("loading {name} onto {devices}"))?;
            let rows = measure_all(&engine, &cfg, &batches, args, |_| None)?;
            (rows, format!("{n} host device(s), CPU backend"))
        }
        #[cfg(feature = "cuda")]
        Devices::Cuda(n) => cuda_rows(&cfg, &source, n, engine_cfg, &batches, args)
            .with_context(|| format!("{name} on {devices}"))?,
        #[cfg(not(feature = "cuda"))]
        Devices::Cuda(_) => return Err(super::generate::no_cuda_build(devices)),
    };
    report(out, args, &name, &cfg, devices, &card, &rows)
}

#[cfg(feature = "cuda")]
fn cuda_rows(
    cfg: &ModelConfig,
    source: &Source,
    n: usize,
    engine_cfg: EngineConfig,
    batches: &[usize],
    args: &Args,
) -> Result<(Vec<Row>, String)> {
    use moe_cuda::{CudaConfig, CudaRunner};
    let max_batch = engine_cfg.scheduler.max_batch_tokens;
    // Context a sequence reaches: prompt, warm-up and timed tokens, and one spare.
    let context = args.warmup.max(1) + args.steps + 2;
    let config = CudaConfig {
        devices: n,
        block_tokens: 16,
        // Every sequence of the largest batch, each rank holding all of them at worst.
        kv_blocks_per_rank: max_batch * (context.div_ceil(16) + 1) + 16,
        max_batch_tokens: max_batch,
        max_context: (context + 16).min(cfg.max_position_embeddings),
        ..CudaConfig::default()
    };
    let runner = match source {
        Source::Dir(dir) => {
            let ckpt = Checkpoint::open(dir)
                .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
            CudaRunner::load(cfg, &ckpt, config)?
        }
        Source::Preset(_) => CudaRunner::synthetic(cfg, args.seed, config)?,
    };
    let card = runner.device_name()?;
    let bandwidth = runner.copy_bandwidth(1 << 30, 20)?;
    let embed = (cfg.vocab_size * cfg.hidden_size) as u64 * 2;
    let replicated = runner.replicated_weight_bytes().saturating_sub(embed);
    let engine = Engine::new(runner, engine_cfg);
    let rows = measure_all(&engine, cfg, batches, args, |r: &CudaRunner| {
        Some((replicated + r.last_step_expert_bytes()) as f64 / bandwidth)
    })?;
    Ok((
        rows,
        format!("{n} x {card}, copy bandwidth {:.0} GB/s", bandwidth / 1e9),
    ))
}

/// Measures every batch size; `floor_secs` gives the floor time of the step just run, if any.
fn measure_all<R: Runner>(
    engine: &Engine<R>,
    cfg: &ModelConfig,
    batches: &[usize],
    args: &Args,
    floor_secs: impl Fn(&R) -> Option<f64>,
) -> Result<Vec<Row>> {
    batches
        .iter()
        .map(|&b| measure(engine, cfg, b, args, &floor_secs))
        .collect()
}

fn measure<R: Runner>(
    engine: &Engine<R>,
    cfg: &ModelConfig,
    batch: usize,
    args: &Args,
    floor_secs: &impl Fn(&R) -> Option<f64>,
) -> Result<Row> {
    let max_tokens = args.warmup.max(1) + args.steps + 1;
    let handles = (0..batch)
        .map(|i| {
            let prompt = vec![((i * 7919 + 1) % cfg.vocab_size) as u32];
            engine
                .submit(Request::greedy(prompt, max_tokens))
                .with_context(|| format!("batch {batch}: request {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    for _ in 0..args.warmup.max(1) {
        engine.step().context("warm-up iteration")?;
    }
    let (mut secs, mut floor, mut have_floor) = (0.0f64, 0.0f64, true);
    for s in 0..args.steps {
        let t = Instant::now();
        let r = engine.step().context("timed iteration")?;
        secs += t.elapsed().as_secs_f64();
        if r.generated != batch {
            bail!(
                "batch {batch}: timed iteration {s} generated {} tokens, not {batch} (KV or \
                 scheduler limits); lower --batches or --steps",
                r.generated
            );
        }
        match engine.with_runner(|r| floor_secs(r)) {
            Some(f) => floor += f,
            None => have_floor = false,
        }
    }
    drop(handles);
    engine
        .run_until_idle(usize::MAX)
        .context("draining the batch")?;
    let tokens = (batch * args.steps) as f64;
    Ok(Row {
        batch,
        tokens_per_s: tokens / secs,
        ms_per_step: secs * 1e3 / args.steps as f64,
        floor_tokens_per_s: (have_floor && floor > 0.0).then(|| tokens / floor),
    })
}

fn report(
    out: &mut dyn Write,
    args: &Args,
    name: &str,
    cfg: &ModelConfig,
    devices: Devices,
    card: &str,
    rows: &[Row],
) -> Result<()> {
    if args.json {
        let v = serde_json::json!({
            "model": name,
            "layers": cfg.num_layers,
            "devices": devices.to_string(),
            "card": card,
            "warmup": args.warmup,
            "steps": args.steps,
            "decode": rows,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "bench decode: {name} ({} layers) on {devices} ({card}), {} timed steps",
        cfg.num_layers, args.steps
    )?;
    writeln!(
        out,
        "{:>6} {:>12} {:>10} {:>14} {:>8}",
        "batch", "tokens/s", "ms/step", "floor tok/s", "x floor"
    )?;
    for r in rows {
        let (floor, x) = match r.floor_tokens_per_s {
            Some(f) => (format!("{f:.1}"), format!("{:.2}", f / r.tokens_per_s)),
            None => ("-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:>6} {:>12.1} {:>10.2} {:>14} {:>8}",
            r.batch, r.tokens_per_s, r.ms_per_step, floor, x
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::synth::{write_model, SynthOptions};

    fn args(extra: &[&str]) -> Args {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let mut argv = vec!["decode"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments parse").args
    }

    fn run_json(a: &Args) -> serde_json::Value {
        let mut out = Vec::new();
        bench(a, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn host_bench_reports_every_batch() {
        let v = run_json(&args(&[
            "--preset",
            "tiny-qwen3",
            "--devices",
            "host:2",
            "--batches",
            "1,3,8",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--json",
        ]));
        assert_eq!(v["layers"], Preset::TinyQwen3.config().num_layers);
        assert_eq!(v["devices"], "host:2");
        let rows = v["decode"].as_array().unwrap();
        let batches: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 3, 8]);
        for r in rows {
            let tps = r["tokens_per_s"].as_f64().unwrap();
            let ms = r["ms_per_step"].as_f64().unwrap();
            assert!(tps > 0.0 && ms > 0.0, "{r}");
            // tokens/s and ms/step describe the same steps: batch tokens per step.
            let b = r["batch"].as_f64().unwrap();
            assert!((tps * ms / 1e3 - b).abs() < 1e-6 * b.max(1.0), "{r}");
            assert!(
                r["floor_tokens_per_s"].is_null(),
                "no floor on host devices"
            );
        }
    }

    #[test]
    fn model_directories_and_text_output_work() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Preset::TinyDeepseek.config();
        write_model(&cfg, dir.path(), &SynthOptions::new(2), |_| {}).unwrap();
        let a = args(&[
            "--model",
            dir.path().to_str().unwrap(),
            "--layers",
            "2",
            "--batches",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
        ]);
        let mut out = Vec::new();
        bench(&a, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("(2 layers) on host:1"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.trim_start().starts_with("2 "), "{text}");
        assert!(last.trim_end().ends_with('-'), "no floor on host: {text}");
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let err =
            |extra: &[&str]| format!("{:#}", bench(&args(extra), &mut Vec::new()).unwrap_err());
        assert!(err(&["--preset", "tiny-qwen3", "--batches", "1,0"]).contains("positive"));
        assert!(err(&["--preset", "tiny-qwen3", "--batches", "x"]).contains("positive"));
        assert!(err(&["--preset", "tiny-qwen3", "--steps", "0"]).contains("--steps"));
        assert!(err(&["--preset", "no-such-preset"]).contains("no-such-preset"));
        assert!(err(&["--preset", "tiny-qwen3", "--layers", "0"]).contains("--layers 0"));
        assert!(err(&["--preset", "qwen3-30b-a3b"]).contains("host memory"));
        assert!(err(&["--model", "/no/such/dir"]).contains("does not exist"));
        assert!(err(&["--preset", "tiny-qwen3", "--devices", "cuda:1"]).contains("from 0"));
        // With a GPU and the `cuda` feature the bench would run; otherwise a clear error.
        if !cfg!(feature = "cuda") || moe_runtime_has_no_gpu() {
            let cuda = err(&[
                "--preset",
                "tiny-qwen3",
                "--devices",
                "cuda:0",
                "--batches",
                "1",
            ]);
            let want = if cfg!(feature = "cuda") {
                "no usable GPU"
            } else {
                "without CUDA support"
            };
            assert!(cuda.contains(want), "{cuda}");
        }
    }

    #[cfg(feature = "cuda")]
    fn moe_runtime_has_no_gpu() -> bool {
        moe_cuda::device_count().is_err()
    }

    #[cfg(not(feature = "cuda"))]
    fn moe_runtime_has_no_gpu() -> bool {
        true
    }
}
