//! What every GPU test shares: the machine it runs on, and the rule that a GPU test without its
//! GPU fails instead of passing when `HIL_REQUIRE_GPUS` is set (as `run.sh` of the hil bundle
//! sets it on a GPU machine; see `moe_cuda::hil_gpus`).

use moe_cuda::{self as cuda, GpuMap};

/// The machine for a test of `ranks` ranks: the GPUs present, with several logical ranks on one
/// GPU where there are fewer GPUs than ranks ([`GpuMap::for_ranks`]). Without a GPU it prints
/// `SKIPPED` and returns `None`, unless `HIL_REQUIRE_GPUS` asks for GPUs: then the test fails.
pub fn machine(test: &str, ranks: usize) -> Option<GpuMap> {
    match cuda::hil_gpus() {
        Ok(Some(have)) => {
            let map = GpuMap::for_ranks(ranks).expect("a GPU map on the GPUs present");
            println!("{test}: {ranks} rank(s) on {map:?} ({have} GPU(s) present)");
            Some(map)
        }
        Ok(None) => {
            println!("SKIPPED {test}: no GPU");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}
