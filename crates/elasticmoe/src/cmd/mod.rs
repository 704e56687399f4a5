//! One module per subcommand.

pub mod bench_decode;
pub mod bench_scale;
pub mod demo;
pub mod gen_model;
pub mod generate;
pub mod serve;

/// `elasticmoe bench ...`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: Bench,
}

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Decode throughput at several batch sizes, beside the weight-bytes-read floor (`cuda:`
    /// devices) or on the CPU backend (`host:N`).
    Decode(bench_decode::Args),
    /// Add or remove devices under a steady decode load with each strategy; writes
    /// scaling.json and scaling.svg.
    Scale(bench_scale::Args),
}
