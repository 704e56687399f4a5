//! What goes wrong in the CUDA runner: [`CudaError`], and the checks that turn a driver or
//! cuBLAS status into one.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::sys;
use hbm_vmm::VmmError;
use moe_host::model::ModelError;

use crate::elastic::DeviceSetError;

/// What went wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No driver, no CUDA library or no GPU.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// A driver call failed.
    #[error("CUDA {call} failed: {msg}")]
    Driver {
        /// The call.
        call: &'static str,
        /// The driver's error.
        msg: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS {call} failed with status {status}")]
    Blas {
        /// The call.
        call: &'static str,
        /// The status code.
        status: i32,
    },
    /// NVRTC refused the kernels.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    /// Device memory could not be created or mapped.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The model config or a weight is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading a tensor failed.
    #[error("reading tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor.
        name: String,
        /// Why.
        msg: String,
    },
    /// The model or settings are outside what this backend supports.
    #[error("unsupported by the CUDA backend: {0}")]
    Unsupported(String),
    /// A step's input does not fit the runner (too many tokens, unknown sequence, ...).
    #[error("bad step input: {0}")]
    Input(String),
    /// Elastic scaling could not prepare or install the next configuration (see `elastic`).
    #[error("elastic scaling: {0}")]
    Scale(String),
    /// A target device set unusable for a new instance beside the running one.
    #[error(transparent)]
    DeviceSet(#[from] DeviceSetError),
}

impl CudaError {
    pub(crate) fn driver<E: std::fmt::Debug>(call: &'static str) -> impl Fn(E) -> CudaError {
        move |e| CudaError::Driver {
            call,
            msg: format!("{e:?}"),
        }
    }
}

pub(crate) fn cu(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver {
            call,
            msg: format!("{r:?}"),
        })
    }
}

pub(crate) fn blas(call: &'static str, s: blas_sys::cublasStatus_t) -> Result<(), CudaError> {
    if s == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Blas {
            call,
            status: s as i32,
        })
    }
}
