//! One module per subcommand.

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
    /// Add or remove devices under a steady decode load with each strategy; writes
    /// scaling.json and scaling.svg.
    Scale(bench_scale::Args),
}
