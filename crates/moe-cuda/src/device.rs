//! The machine as the CUDA path sees it: whether the CUDA libraries and GPUs are there
//! ([`device_count`], [`hil_gpus`]) and which GPU each logical device lives on ([`GpuMap`]).

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{sys, CudaContext};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::Vmm;

use crate::error::CudaError;

/// Checks that the driver, cuBLAS and NVRTC libraries load and returns the number of GPUs.
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: each check only tries to dlopen a library; it has no other effect.
    let libs = unsafe {
        [
            ("libcuda", sys::is_culib_present()),
            ("libcublas", blas_sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    for (name, ok) in libs {
        if !ok {
            return Err(CudaError::NoGpu(format!(
                "{name} was not found; run on a machine with the NVIDIA driver and CUDA 13"
            )));
        }
    }
    let n = CudaContext::device_count().map_err(|e| CudaError::NoGpu(format!("{e:?}")))?;
    if n <= 0 {
        return Err(CudaError::NoGpu("the driver sees no CUDA device".into()));
    }
    Ok(n as usize)
}

/// The GPUs a hardware-in-the-loop test or benchmark may use: `Ok(Some(n))` with `n` GPUs,
/// `Ok(None)` without a usable GPU (the caller reports it as SKIPPED), or an error when the
/// environment variable `HIL_REQUIRE_GPUS=N` demands at least `N` GPUs and they are not there
/// (no GPU, a missing CUDA library, or fewer GPUs): a GPU run must never pass vacuously.
pub fn hil_gpus() -> Result<Option<usize>, CudaError> {
    let need = hbm_vmm::cuda::required_gpus();
    match device_count() {
        Ok(n) if n >= need => Ok(Some(n)),
        Ok(n) => Err(CudaError::NoGpu(format!(
            "HIL_REQUIRE_GPUS={need} but the driver sees {n} GPU(s)"
        ))),
        Err(e) if need > 0 => Err(CudaError::NoGpu(format!(
            "HIL_REQUIRE_GPUS={need} but no GPU can be used: {e}"
        ))),
        Err(_) => Ok(None),
    }
}

/// Which GPU each logical device lives on: the machine as the CUDA path sees it.
///
/// [`GpuMap::every_gpu`] (the default) is one logical device per visible GPU. [`GpuMap::new`]
/// places logical devices on any GPUs, several on one included: `[0, 0, 0, 0]` runs four ranks
/// on GPU 0, each with its own KV, its own experts and its own stream, so that the multi-rank
/// and elastic paths run on a one-GPU machine; copies between them are device-local. It is
/// `Copy` (at most [`GpuMap::MAX`] logical devices) so that [`CudaConfig`](crate::CudaConfig) stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GpuMap {
    pub(crate) len: u8,
    pub(crate) ordinals: [u8; GpuMap::MAX],
}

impl GpuMap {
    /// The most logical devices a map holds.
    pub const MAX: usize = 64;

    /// One logical device per visible GPU (`DeviceId(i)` on GPU `i`).
    pub const fn every_gpu() -> Self {
        Self {
            len: 0,
            ordinals: [0; Self::MAX],
        }
    }

    /// Logical device `i` on GPU `ordinals[i]`; ordinals may repeat.
    ///
    /// Errors: [`CudaError::Unsupported`] for an empty list, more than [`GpuMap::MAX`] devices
    /// or an ordinal above 255.
    pub fn new(ordinals: &[u32]) -> Result<Self, CudaError> {
        if ordinals.is_empty() || ordinals.len() > Self::MAX {
            return Err(CudaError::Unsupported(format!(
                "a GPU map holds 1 to {} logical devices, not {}",
                Self::MAX,
                ordinals.len()
            )));
        }
        let mut map = Self::every_gpu();
        for (i, &o) in ordinals.iter().enumerate() {
            map.ordinals[i] = u8::try_from(o)
                .map_err(|_| CudaError::Unsupported(format!("GPU ordinal {o} is above 255")))?;
        }
        map.len = ordinals.len() as u8;
        Ok(map)
    }

    /// A machine of at least `ranks` logical devices on the GPUs present: every GPU once where
    /// there are enough of them, otherwise `ranks` logical devices dealt round-robin over the
    /// GPUs (on one GPU, all of them there). This is how multi-rank code runs on a machine with
    /// fewer GPUs than ranks.
    ///
    /// Errors: [`CudaError::NoGpu`] without a GPU or the CUDA libraries.
    pub fn for_ranks(ranks: usize) -> Result<Self, CudaError> {
        let gpus = device_count()?;
        if gpus >= ranks {
            return Ok(Self::every_gpu());
        }
        let ordinals: Vec<u32> = (0..ranks).map(|i| (i % gpus) as u32).collect();
        Self::new(&ordinals)
    }

    /// The GPU of each logical device, or `None` for [`GpuMap::every_gpu`].
    pub fn ordinals(&self) -> Option<Vec<u32>> {
        (self.len > 0).then(|| {
            self.ordinals[..self.len as usize]
                .iter()
                .map(|&o| u32::from(o))
                .collect()
        })
    }

    /// The memory manager of this machine: a CUDA backend with these logical devices.
    pub fn vmm(&self) -> Result<Vmm<CudaBackend>, CudaError> {
        let backend = match self.ordinals() {
            None => CudaBackend::new()?,
            Some(o) => CudaBackend::logical(&o)?,
        };
        Ok(Vmm::new(backend))
    }
}

impl Default for GpuMap {
    fn default() -> Self {
        Self::every_gpu()
    }
}

impl std::fmt::Debug for GpuMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ordinals() {
            None => f.write_str("GpuMap(every GPU)"),
            Some(o) => write!(f, "GpuMap({o:?})"),
        }
    }
}
