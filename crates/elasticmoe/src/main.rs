//! `elasticmoe`: the command line of ElasticMoE.
//!
//! One module per subcommand under [`cmd`]; each has an `Args` (clap) and a `run`. The binary only
//! parses arguments, calls library crates and prints; it holds no logic a library should own.
//!
//! ```text
//! elasticmoe gen-model --preset tiny-qwen3 --out models/tiny-qwen3
//! elasticmoe gen-model --preset qwen3-30b-a3b --layers 4 --seed 1 --out /data/qwen3-4l
//! ```
#![forbid(unsafe_code)]

mod cmd;
mod report;

use clap::{Parser, Subcommand};

/// Serve Mixture-of-Experts models on a device set that grows and shrinks while it serves.
#[derive(Debug, Parser)]
#[command(name = "elasticmoe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a model directory (config, sharded safetensors with seeded random weights, tokenizer)
    /// for a real architecture.
    GenModel(cmd::gen_model::Args),
    /// Run prompts through the serving engine on host devices and print the generated text.
    Generate(cmd::generate::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, with metrics and admin scaling.
    Serve(cmd::serve::Args),
    /// Elastic scaling end to end on 4 host devices: a load trace drives the autoscaler; writes
    /// report.json and timeline.svg.
    Demo(cmd::demo::Args),
    /// Benchmarks (`bench decode`, `bench scale`).
    Bench(cmd::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenModel(args) => cmd::gen_model::run(&args),
        Command::Generate(args) => cmd::generate::run(&args),
        Command::Serve(args) => cmd::serve::run(&args),
        Command::Demo(args) => cmd::demo::run(&args),
        Command::Bench(b) => match b.which {
            cmd::Bench::Decode(args) => cmd::bench_decode::run(&args),
            cmd::Bench::Scale(args) => cmd::bench_scale::run(&args),
        },
    }
}
