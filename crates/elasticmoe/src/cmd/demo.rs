//! `elasticmoe demo`: elastic scaling end to end on 4 host devices.
//!
//! ```text
//! elasticmoe demo --out target/demo
//! elasticmoe demo --out target/demo --compare
//! ```
//!
//! A tiny model is generated into the cache directory on the first run and reused. A trace with
//! a step, a ramp and a burst drives the SLO policy, which scales the deployment up and down by
//! itself while requests keep arriving. Writes `OUT/report.json` (issue 8's schema; with
//! `--compare`, `{"runs": [...]}`) and `OUT/timeline.svg`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use moe_runtime::checkpoint::Checkpoint;
use moe_runtime::config::ModelConfig;
use moe_runtime::presets::Preset;
use moe_runtime::synth::{write_model, SynthOptions};
use scaler::demo::{self, DemoConfig, DemoRun, Trace};
use scaler::Strategy;

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
}

const DEVICES: u32 = 4;
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
    let strategies: Vec<Strategy> = if args.compare {
        Strategy::ALL.to_vec()
    } else {
        vec![args.strategy.into()]
    };
    let dir = model_dir(&args.cache, args.quiet)?;
    let cfg = ModelConfig::from_dir(&dir)
        .with_context(|| format!("reading the demo model's config in {}", dir.display()))?;
    let checkpoint: scaler::executor::Checkpoint =
        Arc::new(Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?);
    let trace = Trace::step_ramp_burst(cfg.vocab_size, args.trace_seconds, args.max_tokens, SEED);
    let base = DemoConfig::new(Strategy::Elastic, DEVICES, PRESET.name());
    if !args.quiet {
        eprintln!(
            "{} requests over {:.0} s; computing the fixed-deployment reference",
            trace.requests.len(),
            args.trace_seconds
        );
    }
    let reference = demo::reference_tokens(&cfg, &checkpoint, &base, 1, &trace)
        .context("running the reference on a fixed deployment")?;
    let mut runs: Vec<DemoRun> = Vec::new();
    for strategy in strategies {
        let config = DemoConfig::new(strategy, DEVICES, PRESET.name());
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
        runs.push(run);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = if args.compare {
        serde_json::json!({ "runs": runs.iter().map(|r| &r.report).collect::<Vec<_>>() })
    } else {
        serde_json::to_value(&runs[0].report)?
    };
    let report_path = args.out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", report_path.display()))?;
    let svg_path = args.out.join("timeline.svg");
    let refs: Vec<&DemoRun> = runs.iter().collect();
    std::fs::write(&svg_path, crate::report::timeline_svg(&refs))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    for r in &runs {
        let rep = &r.report;
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
