//! One module per subcommand.

pub mod bench_decode;
pub mod demo;
pub mod gen_model;
pub mod generate;
pub mod serve;

/// `elasticmoe bench ...`: benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Decode throughput at several batch sizes, beside the weight-bytes-read floor (`cuda:`
    /// devices) or on the CPU backend (`host:N`).
    Decode(bench_decode::Args),
}

/// Runs a `bench` subcommand.
pub fn bench(b: &Bench) -> anyhow::Result<()> {
    match b {
        Bench::Decode(args) => bench_decode::run(args),
    }
}
