//! `elasticmoe generate`: run prompts through the serving engine on host devices or GPUs.
//!
//! ```text
//! elasticmoe generate --model models/tiny-qwen3 --devices host:3 --placement load-aware \
//!     --prompt "Hello" --prompt-ids 1,2,3 --max-tokens 16 --json --logprobs
//! elasticmoe generate --model models/tiny-qwen3 --devices cuda:0,1 --prompt "Hello"
//! ```
//!
//! `--devices cuda:0,1,...` serves on GPUs 0..n with the CUDA runner (a binary built with the
//! `cuda` feature; experts split between the GPUs, placement flags do not apply). Greedy tokens
//! are then chosen on the GPU.
//!
//! Text prompts are encoded, and generated tokens decoded, with the model's own `tokenizer.json`
//! (the `tokenizers` crate, as `serve` does; special-token spellings in `--prompt` are control
//! tokens, as in `tokenizer(text)`), and the output is decoded incrementally. The tokenizer of
//! `gen-model`'s model directories is byte-level: each byte is one token.
//! The model's end-of-sequence ids stop generation unless `--ignore-eos` is given.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use moe_engine::{
    Completion, Engine, EngineConfig, EngineMetrics, Request, Runner, SamplingParams,
};
use moe_host::deployment::{DeploymentConfig, PlacementKind};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use scaler_exec::DeviceKind;

use crate::cmd::serve::text::{Detokenizer, TextCodec};

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
    /// Devices to serve on: `host:N` (N host devices) or `cuda:0,1,...` (GPUs 0..n).
    #[arg(long, default_value = "host:1")]
    pub devices: String,
    /// Expert placement.
    #[arg(long, value_enum, default_value_t = PlacementArg::Balanced)]
    pub placement: PlacementArg,
    /// A text prompt (encoded with the model's tokenizer); repeat for several prompts.
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
    /// CUDA: batch-invariant compute (`CudaConfig::batch_invariant`): each request's output is
    /// bitwise the same whatever it is batched with (slower at large batches). The host backend
    /// is batch-invariant already; there the flag changes nothing.
    #[arg(long)]
    pub batch_invariant: bool,
}

/// Where to run, from `--devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Devices {
    /// `host:N`: N host devices (CPU compute).
    Host(usize),
    /// `cuda:0,1,...,n-1`: the first n GPUs.
    Cuda(usize),
}

impl std::fmt::Display for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Devices::Host(n) => write!(f, "host:{n}"),
            Devices::Cuda(n) => {
                let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

/// Parses `host:N` or `cuda:0,1,...` (the CUDA runner takes the first n GPUs).
pub(crate) fn parse_devices(s: &str) -> Result<Devices> {
    let spec = super::parse_device_spec(s)?;
    match spec.kind() {
        DeviceKind::Host => Ok(Devices::Host(spec.ranks())),
        DeviceKind::Cuda => Ok(Devices::Cuda(super::first_gpus(&spec)?)),
    }
}

/// The error for `cuda:` devices in a binary built without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda_build(devices: Devices) -> anyhow::Error {
    anyhow::anyhow!(
        "--devices {devices}: this elasticmoe was built without CUDA support; rebuild it with \
         `cargo build --release -p elasticmoe --features cuda`"
    )
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

/// The text of generated `tokens`, decoded incrementally as a stream would be (special tokens
/// left out).
fn decode(codec: &TextCodec, tokens: &[u32]) -> String {
    let mut d = Detokenizer::default();
    let mut text: String = tokens.iter().map(|&t| d.push(codec, t)).collect();
    text.push_str(&d.finish(codec));
    text
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
    crate::cmd::serve::audit::init_logging("warn");
    let stdout = std::io::stdout();
    generate(args, &mut stdout.lock())
}

/// Runs `generate`, writing the results to `out`.
pub fn generate(args: &Args, out: &mut dyn Write) -> Result<()> {
    let devices = parse_devices(&args.devices)?;
    #[cfg(not(feature = "cuda"))]
    if let Devices::Cuda(_) = devices {
        return Err(no_cuda_build(devices));
    }
    let mut id_prompts = Vec::new();
    for ids in &args.prompt_ids {
        id_prompts.push(parse_ids(ids)?);
    }
    if args.prompt.is_empty() && id_prompts.is_empty() {
        bail!("give at least one --prompt TEXT or --prompt-ids 1,2,3");
    }
    if !args.model.is_dir() {
        bail!(
            "model directory {} does not exist (write one with `elasticmoe gen-model`)",
            args.model.display()
        );
    }
    let codec = TextCodec::from_dir(&args.model, None)?;
    let mut prompts: Vec<Vec<u32>> = args
        .prompt
        .iter()
        .map(|p| {
            codec
                .encode_trusted(p)
                .with_context(|| format!("--prompt {p:?}"))
        })
        .collect::<Result<_>>()?;
    prompts.extend(id_prompts);
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
    let started = std::time::Instant::now();
    let (done, m, loaded) = match devices {
        Devices::Host(n) => {
            let host = HostEngineConfig {
                devices: n,
                max_devices: n,
                placement: args.placement.into(),
                deployment: DeploymentConfig::default(),
                engine: EngineConfig::default(),
                ..HostEngineConfig::default()
            };
            let (engine, _store) = DeploymentRunner::host_engine(&cfg, &checkpoint, &host)
                .with_context(|| format!("loading {} onto {devices}", args.model.display()))?;
            let loaded = started.elapsed();
            let (done, m) = complete(&engine, requests)?;
            (done, m, loaded)
        }
        #[cfg(feature = "cuda")]
        Devices::Cuda(n) => {
            use moe_cuda::{CudaConfig, CudaRunner};
            let runner = CudaRunner::load(
                &cfg,
                &checkpoint,
                CudaConfig {
                    devices: n,
                    batch_invariant: args.batch_invariant,
                    ..CudaConfig::default()
                },
            )
            .with_context(|| format!("loading {} onto {devices}", args.model.display()))?;
            let loaded = started.elapsed();
            let engine = Engine::new(runner, EngineConfig::default());
            let (done, m) = complete(&engine, requests)?;
            (done, m, loaded)
        }
        #[cfg(not(feature = "cuda"))]
        Devices::Cuda(_) => return Err(no_cuda_build(devices)),
    };
    report(args, devices, &codec, &prompts, &done, &m, loaded, out)?;
    if let Some(c) = done
        .iter()
        .find(|c| matches!(c.finish, moe_engine::FinishReason::Error(_)))
    {
        bail!("a request failed: {:?}", c.finish);
    }
    Ok(())
}

/// Submits `requests`, runs the engine until they are done, and returns them in order with the
/// engine's metrics.
fn complete<R: Runner>(
    engine: &Engine<R>,
    requests: Vec<Request>,
) -> Result<(Vec<Completion>, EngineMetrics)> {
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
    Ok((done, engine.metrics()))
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    devices: Devices,
    codec: &TextCodec,
    prompts: &[Vec<u32>],
    done: &[Completion],
    m: &EngineMetrics,
    loaded: std::time::Duration,
    out: &mut dyn Write,
) -> Result<()> {
    if args.json {
        let results: Vec<serde_json::Value> = prompts
            .iter()
            .zip(done)
            .map(|(p, c)| {
                let mut v = serde_json::json!({
                    "prompt_ids": p,
                    "tokens": c.tokens,
                    "text": decode(codec, &c.tokens),
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
            "devices": match devices {
                Devices::Host(n) | Devices::Cuda(n) => n,
            },
            "device_spec": devices.to_string(),
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
            writeln!(out, "{}", decode(codec, &c.tokens))?;
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
            "generate: {devices}, {} iterations, {:.1} tokens/s, load {:.0} ms",
            m.iterations,
            m.tokens_per_s,
            loaded.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::presets::Preset;
    use moe_model::synth::{write_model, SynthOptions};

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
    fn batch_invariant_flag_parses_and_leaves_host_output_unchanged() {
        let dir = model(Preset::TinyQwen3);
        let base = [
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--json",
            "--ignore-eos",
        ];
        let plain = args(dir.path(), &base);
        assert!(!plain.batch_invariant);
        let mut more = base.to_vec();
        more.push("--batch-invariant");
        let bi = args(dir.path(), &more);
        assert!(bi.batch_invariant);
        assert_eq!(untimed(&json(&bi)), untimed(&json(&plain)));
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
    fn device_specs_parse() {
        assert_eq!(parse_devices("host:3").unwrap(), Devices::Host(3));
        assert_eq!(parse_devices("cuda:0").unwrap(), Devices::Cuda(1));
        assert_eq!(parse_devices("cuda:0,1,2").unwrap(), Devices::Cuda(3));
        assert_eq!(Devices::Cuda(2).to_string(), "cuda:0,1");
        assert_eq!(Devices::Host(4).to_string(), "host:4");
        for bad in ["cuda:", "cuda:1,0", "host:0", "host:x", "cpu:1"] {
            assert!(parse_devices(bad).is_err(), "{bad}");
        }
        // Two logical ranks on GPU 0 are a valid spec (demo and bench scale run them), but
        // generate runs one rank per GPU (Devices::Cuda(2) means GPUs 0 and 1): refused clearly.
        let logical: scaler_exec::DeviceSpec = "cuda:0,0".parse().unwrap();
        assert_eq!((logical.ranks(), logical.gpus()), (2, &[0, 0][..]));
        let e = format!("{:#}", parse_devices("cuda:0,0").unwrap_err());
        assert!(
            e.contains("logical ranks") && e.contains("one rank per GPU"),
            "{e}"
        );
    }

    #[test]
    fn cuda_devices_without_a_gpu_get_a_clear_error() {
        let dir = model(Preset::TinyQwen3);
        let a = args(dir.path(), &["--prompt", "x", "--devices", "cuda:0"]);
        let r = generate(&a, &mut Vec::new());
        #[cfg(feature = "cuda")]
        if moe_cuda::device_count().is_ok() {
            // On a GPU machine the CUDA runner serves.
            r.unwrap();
            return;
        }
        let e = format!("{:#}", r.unwrap_err());
        let want = if cfg!(feature = "cuda") {
            "no usable GPU"
        } else {
            "without CUDA support"
        };
        assert!(e.contains(want), "{e}");
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
        assert!(err(&["--prompt", "x", "--devices", "tpu:0"]).contains("device kind"));
        assert!(err(&["--prompt", "x", "--devices", "cuda:1"]).contains("from 0"));
        assert!(err(&["--prompt", "x", "--devices", "cuda:0,x"]).contains("not a GPU index"));
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
