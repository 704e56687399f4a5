//! `elasticmoe generate`: run prompts through the serving engine on host devices.
//!
//! ```text
//! elasticmoe generate --model models/tiny-qwen3 --devices host:3 --placement load-aware \
//!     --prompt "Hello" --prompt-ids 1,2,3 --max-tokens 16 --json --logprobs
//! ```
//!
//! Text prompts are byte-level: each byte is one token id (the tokenizer of `gen-model`'s model
//! directories maps bytes 1:1). Generated ids below 256 are printed as bytes, others as `<id>`.
//! The model's end-of-sequence ids stop generation unless `--ignore-eos` is given.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use moe_runtime::checkpoint::Checkpoint;
use moe_runtime::config::ModelConfig;
use moe_runtime::deployment::{DeploymentConfig, PlacementKind};
use moe_runtime::engine::{Completion, EngineConfig, Request, SamplingParams};
use moe_runtime::worker::{DeploymentRunner, HostEngineConfig};

/// Expert placement on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacementArg {
    /// Contiguous blocks of experts per device.
    Balanced,
    /// Expert `e` on device `e mod n`.
    RoundRobin,
    /// Load-aware, with replicas of the hottest experts.
    LoadAware,
}

impl From<PlacementArg> for PlacementKind {
    fn from(p: PlacementArg) -> Self {
        match p {
            PlacementArg::Balanced => PlacementKind::Balanced,
            PlacementArg::RoundRobin => PlacementKind::RoundRobin,
            PlacementArg::LoadAware => PlacementKind::LoadAware,
        }
    }
}

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors, as `gen-model` writes).
    #[arg(long)]
    pub model: PathBuf,
    /// Devices to serve on: `host:N` (N host devices).
    #[arg(long, default_value = "host:1")]
    pub devices: String,
    /// Expert placement.
    #[arg(long, value_enum, default_value_t = PlacementArg::Balanced)]
    pub placement: PlacementArg,
    /// A text prompt (byte-level tokens); repeat for several prompts.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A prompt as comma-separated token ids; repeat for several prompts.
    #[arg(long = "prompt-ids")]
    pub prompt_ids: Vec<String>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Greedy decoding (the default).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    pub greedy: bool,
    /// Sampling temperature (turns on seeded sampling).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, requires = "temperature", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Sampling seed (with --temperature); prompt `i` uses `seed + i`.
    #[arg(long, requires = "temperature")]
    pub seed: Option<u64>,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print JSON with token ids instead of text.
    #[arg(long)]
    pub json: bool,
    /// Include each token's logprob (in JSON; in text mode, on stderr).
    #[arg(long)]
    pub logprobs: bool,
}

/// Parses `host:N`.
fn parse_devices(s: &str) -> Result<usize> {
    let Some((kind, n)) = s.split_once(':') else {
        bail!("--devices {s:?} is not of the form host:N");
    };
    if kind != "host" {
        bail!("--devices {s:?}: only host devices (host:N) are supported by generate");
    }
    let n: usize = n
        .parse()
        .with_context(|| format!("--devices {s:?}: N must be a number"))?;
    if n == 0 {
        bail!("--devices {s:?}: at least one device is needed");
    }
    Ok(n)
}

/// Parses `1,2,3`.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--prompt-ids {s:?}: {t:?} is not a token id"))
        })
        .collect()
}

/// Byte-level decoding: ids below 256 are bytes, others `<id>`.
fn decode(tokens: &[u32]) -> String {
    let mut bytes = Vec::new();
    for &t in tokens {
        match u8::try_from(t) {
            Ok(b) => bytes.push(b),
            Err(_) => bytes.extend_from_slice(format!("<{t}>").as_bytes()),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn sampling(args: &Args, i: usize) -> SamplingParams {
    match args.temperature {
        None => SamplingParams::Greedy,
        Some(temperature) => SamplingParams::Random {
            temperature,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed.unwrap_or(0).wrapping_add(i as u64),
        },
    }
}

/// Runs `generate`.
pub fn run(args: &Args) -> Result<()> {
    let stdout = std::io::stdout();
    generate(args, &mut stdout.lock())
}

/// Runs `generate`, writing the results to `out`.
pub fn generate(args: &Args, out: &mut dyn Write) -> Result<()> {
    let devices = parse_devices(&args.devices)?;
    let mut prompts: Vec<Vec<u32>> = args
        .prompt
        .iter()
        .map(|p| p.bytes().map(u32::from).collect())
        .collect();
    for ids in &args.prompt_ids {
        prompts.push(parse_ids(ids)?);
    }
    if prompts.is_empty() {
        bail!("give at least one --prompt TEXT or --prompt-ids 1,2,3");
    }
    if !args.model.is_dir() {
        bail!(
            "model directory {} does not exist (write one with `elasticmoe gen-model`)",
            args.model.display()
        );
    }
    let cfg = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading the config of {}", args.model.display()))?;
    let checkpoint = Checkpoint::open(&args.model)
        .with_context(|| format!("opening the checkpoint in {}", args.model.display()))?;
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let stop = if args.ignore_eos {
                Vec::new()
            } else {
                cfg.eos_token_ids.clone()
            };
            Request::greedy(p.clone(), args.max_tokens)
                .with_stop_tokens(stop)
                .with_sampling(sampling(args, i))
                .with_logprobs(args.logprobs)
        })
        .collect();
    let host = HostEngineConfig {
        devices,
        max_devices: devices,
        placement: args.placement.into(),
        deployment: DeploymentConfig::default(),
        engine: EngineConfig::default(),
        ..HostEngineConfig::default()
    };
    let started = std::time::Instant::now();
    let (engine, _store) = DeploymentRunner::host_engine(&cfg, &checkpoint, &host)
        .with_context(|| format!("loading {} onto host:{devices}", args.model.display()))?;
    let loaded = started.elapsed();
    let mut handles = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        handles.push(
            engine
                .submit(r)
                .with_context(|| format!("prompt {}", i + 1))?,
        );
    }
    engine
        .run_until_idle(usize::MAX)
        .context("running the engine")?;
    let done: Vec<Completion> = handles.into_iter().map(|h| h.wait()).collect();
    let m = engine.metrics();
    if args.json {
        let results: Vec<serde_json::Value> = prompts
            .iter()
            .zip(&done)
            .map(|(p, c)| {
                let mut v = serde_json::json!({
                    "prompt_ids": p,
                    "tokens": c.tokens,
                    "text": decode(&c.tokens),
                    "finish_reason": c.finish.as_str(),
                    "ttft_ms": c.timings.ttft.map(|d| d.as_secs_f64() * 1e3),
                    "tpot_ms": c.timings.tpot().map(|d| d.as_secs_f64() * 1e3),
                    "preemptions": c.timings.preemptions,
                });
                if args.logprobs {
                    v["logprobs"] = serde_json::json!(c.logprobs);
                }
                v
            })
            .collect();
        let report = serde_json::json!({
            "model": args.model.display().to_string(),
            "devices": devices,
            "placement": format!("{:?}", PlacementKind::from(args.placement)),
            "results": results,
            "metrics": {
                "load_ms": loaded.as_secs_f64() * 1e3,
                "iterations": m.iterations,
                "generated_tokens": m.generated_tokens,
                "prefill_tokens": m.prefill_tokens,
                "preemptions": m.preemptions,
                "tokens_per_s": m.tokens_per_s,
            },
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for (i, c) in done.iter().enumerate() {
            writeln!(out, "{}", decode(&c.tokens))?;
            let ttft = c
                .timings
                .ttft
                .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
            eprintln!(
                "generate: prompt {}: {} tokens ({}), ttft {ttft}",
                i + 1,
                c.tokens.len(),
                c.finish.as_str()
            );
            if args.logprobs {
                eprintln!("generate: prompt {} logprobs {:?}", i + 1, c.logprobs);
            }
        }
        eprintln!(
            "generate: host:{devices}, {} iterations, {:.1} tokens/s, load {:.0} ms",
            m.iterations,
            m.tokens_per_s,
            loaded.as_secs_f64() * 1e3
        );
    }
    if let Some(c) = done
        .iter()
        .find(|c| matches!(c.finish, moe_runtime::engine::FinishReason::Error(_)))
    {
        bail!("a request failed: {:?}", c.finish);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_runtime::presets::Preset;
    use moe_runtime::synth::{write_model, SynthOptions};

    fn args(model: &std::path::Path, extra: &[&str]) -> Args {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let mut argv = vec!["generate", "--model", model.to_str().unwrap()];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments parse").args
    }

    fn model(preset: Preset) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_model(&preset.config(), dir.path(), &SynthOptions::new(4), |_| {}).unwrap();
        dir
    }

    /// The results without their timings (which differ from run to run).
    fn untimed(v: &serde_json::Value) -> serde_json::Value {
        let mut r = v["results"].clone();
        for x in r.as_array_mut().unwrap() {
            let o = x.as_object_mut().unwrap();
            o.remove("ttft_ms");
            o.remove("tpot_ms");
        }
        r
    }

    fn json(a: &Args) -> serde_json::Value {
        let mut out = Vec::new();
        generate(a, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn every_tiny_preset_generates_the_same_ids_on_any_device_count() {
        for preset in [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral] {
            let dir = model(preset);
            let base = [
                "--prompt",
                "Hi!",
                "--prompt-ids",
                "1,2,3",
                "--max-tokens",
                "5",
                "--json",
                "--logprobs",
                "--ignore-eos",
            ];
            let one = json(&args(dir.path(), &base));
            let r = &one["results"];
            assert_eq!(r[0]["prompt_ids"], serde_json::json!([72, 105, 33]));
            assert_eq!(r[0]["tokens"].as_array().unwrap().len(), 5);
            assert_eq!(r[1]["logprobs"].as_array().unwrap().len(), 5);
            assert_eq!(r[0]["finish_reason"], "length");
            let mut more = base.to_vec();
            more.extend_from_slice(&["--devices", "host:3", "--placement", "load-aware"]);
            let three = json(&args(dir.path(), &more));
            assert_eq!(untimed(&three), untimed(&one), "{preset}");
        }
    }

    #[test]
    fn text_mode_prints_one_line_per_prompt() {
        let dir = model(Preset::TinyMixtral);
        let a = args(
            dir.path(),
            &[
                "--prompt",
                "ab",
                "--prompt",
                "cd",
                "--max-tokens",
                "3",
                "--temperature",
                "0.8",
                "--seed",
                "7",
            ],
        );
        let mut out = Vec::new();
        generate(&a, &mut out).unwrap();
        let mut again = Vec::new();
        generate(&a, &mut again).unwrap();
        assert_eq!(out, again, "seeded sampling is reproducible");
        assert_eq!(String::from_utf8_lossy(&out).lines().count(), 2);
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let dir = model(Preset::TinyMixtral);
        let err = |extra: &[&str]| {
            let mut out = Vec::new();
            format!(
                "{:#}",
                generate(&args(dir.path(), extra), &mut out).unwrap_err()
            )
        };
        let missing = args(std::path::Path::new("/no/such/model"), &["--prompt", "x"]);
        let e = format!("{:#}", generate(&missing, &mut Vec::new()).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        assert!(err(&["--prompt", "x", "--devices", "host:9"]).contains("at most 8 devices"));
        assert!(err(&["--prompt", "x", "--devices", "gpu"]).contains("host:N"));
        assert!(err(&[]).contains("at least one --prompt"));
        assert!(err(&["--prompt", ""]).contains("empty"));
        assert!(err(&["--prompt-ids", "1,99999"]).contains("outside the vocabulary"));
        assert!(err(&["--prompt-ids", "1,x"]).contains("not a token id"));
        assert!(err(&["--prompt", "x", "--max-tokens", "0"]).contains("max_tokens is 0"));
        assert!(err(&["--prompt", "x", "--max-tokens", "100000000"]).contains("whole context"));
        let long = "y".repeat(5000);
        assert!(err(&["--prompt", &long]).contains("context"));
        assert!(err(&["--prompt", "x", "--temperature", "-1"]).contains("temperature"));
        assert!(err(&["--prompt", "x", "--temperature", "1", "--top-p", "2"]).contains("top_p"));
    }
}
