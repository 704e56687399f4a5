//! `elasticmoe gen-model`: write a synthetic model directory for a preset.

use anyhow::{Context, Result};
use moe_model::config::DType;
use moe_model::presets::{self, Preset};
use moe_model::synth::{self, SynthOptions};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Storage dtype on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Arguments of `gen-model`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset: qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b, tiny-qwen3, tiny-deepseek, tiny-mixtral.
    #[arg(long)]
    pub preset: String,
    /// Override the number of layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Random seed for the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype (default: bf16 for full-size presets, f32 for tiny ones).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Largest shard in MiB (default: 4096 for full-size presets, 1 for tiny ones).
    #[arg(long)]
    pub max_shard_mib: Option<u64>,
}

/// Runs `gen-model`.
pub fn run(args: &Args) -> Result<()> {
    let preset: Preset = args.preset.parse()?;
    let mut cfg = preset.config();
    if let Some(n) = args.layers {
        cfg = presets::with_layers(&cfg, n)
            .with_context(|| format!("--layers {n} does not fit preset {preset}"))?;
    }
    let dtype = args.dtype.map_or(preset.default_dtype(), DType::from);
    let shard_mib = args
        .max_shard_mib
        .unwrap_or(if preset.is_tiny() { 1 } else { 4096 });
    anyhow::ensure!(shard_mib > 0, "--max-shard-mib must be at least 1");
    let opts = SynthOptions {
        seed: args.seed,
        dtype,
        max_shard_bytes: shard_mib << 20,
    };
    let total = moe_model::schema::ModelSchema::new(&cfg).total_bytes(dtype);
    eprintln!(
        "gen-model: {preset} ({}, {} layers, {} experts/layer, top-{}), {dtype}, {}, seed {} -> {}",
        cfg.architecture,
        cfg.num_layers,
        cfg.experts_per_layer(),
        cfg.top_k(),
        human_bytes(total as u64),
        args.seed,
        args.out.display()
    );
    let started = Instant::now();
    let mut last = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let report = synth::write_model(&cfg, &args.out, &opts, |p| {
        let done = p.tensors_done == p.tensors_total;
        // A line redrawn in place on a terminal; whole lines, less often, into a log file.
        let every = if tty {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(30)
        };
        if done || last.elapsed() >= every {
            last = Instant::now();
            let pct = 100.0 * p.bytes_done as f64 / p.bytes_total.max(1) as f64;
            let line = format!(
                "  {pct:5.1}%  {}/{} tensors  {}",
                p.tensors_done, p.tensors_total, p.tensor.name
            );
            if tty {
                eprint!("\r{line}");
                if done {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
    })
    .with_context(|| format!("writing model to {}", args.out.display()))?;
    eprintln!(
        "gen-model: wrote {} tensors ({}) in {} files in {:.1?}",
        report.tensors,
        human_bytes(report.bytes),
        report.files.len(),
        started.elapsed()
    );
    Ok(())
}

/// `bytes` as KiB, MiB or GiB.
fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
