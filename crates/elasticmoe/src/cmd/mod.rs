//! One module per subcommand.

pub mod bench_decode;
pub mod bench_scale;
pub mod demo;
pub mod gen_model;
pub mod generate;
pub mod serve;

use anyhow::{bail, Context, Result};
use scaler_exec::DeviceSpec;

/// Parses `--devices` with the one device-spec parser ([`DeviceSpec`]); the error names the
/// argument and says what to write instead.
pub(crate) fn parse_device_spec(s: &str) -> Result<DeviceSpec> {
    s.parse().with_context(|| format!("--devices {s:?}"))
}

/// The machine of a `cuda:` spec: the GPU of each rank, in rank order (`cuda:0,1` is one rank
/// on each of GPUs 0 and 1; `cuda:0,0,0,0` is four logical ranks on GPU 0, each with its own KV
/// and experts). The CUDA path turns it into its `GpuMap`; the driver checks that the GPUs exist.
pub(crate) fn cuda_machine(spec: &DeviceSpec) -> Result<Vec<u32>> {
    let gpus = spec.gpus();
    if gpus.is_empty() {
        bail!("--devices {spec}: not a cuda: device list");
    }
    Ok(gpus.to_vec())
}

/// The GPU count of a `cuda:` spec for the commands that run one rank per GPU on the first n
/// GPUs (`generate`, `bench decode`); `demo` and `bench scale` take any list
/// ([`cuda_machine`]). Other lists parse but are refused here, with what to write instead.
pub(crate) fn first_gpus(spec: &DeviceSpec) -> Result<usize> {
    if let Some(n) = spec.first_gpus() {
        return Ok(n);
    }
    let s = spec.to_string();
    if spec.shares_a_gpu() {
        bail!(
            "--devices {s:?}: this command runs one rank per GPU; logical ranks (several on one \
             GPU) are for demo and bench scale. List each GPU once, from 0 up (cuda:0,1,...)"
        );
    }
    bail!(
        "--devices {s:?}: this command uses the first n GPUs; list them from 0 up, without \
         gaps (cuda:0 or cuda:0,1,...), or choose GPUs with CUDA_VISIBLE_DEVICES"
    )
}

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
