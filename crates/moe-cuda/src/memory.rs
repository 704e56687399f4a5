//! Device and host memory of a rank: [`DevBuf`] (an `hbm-vmm` chunk in its own reservation),
//! [`PinnedHost`] (page-locked read-back staging), the sizes a rank is built for ([`Dims`]) and
//! the layout of its scratch chunk ([`Scratch`]).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Mapping, Vmm};

use crate::error::{cu, CudaError};

/// One device allocation: an `hbm-vmm` chunk mapped into its own reservation (the mapping keeps
/// both alive).
pub(crate) struct DevBuf {
    pub(crate) map: Mapping<CudaBackend>,
}

impl DevBuf {
    pub(crate) fn new(
        vmm: &Vmm<CudaBackend>,
        dev: DeviceId,
        bytes: usize,
        access: &[DeviceId],
    ) -> Result<Self, CudaError> {
        let g = vmm.granularity(dev)?;
        let size = bytes.max(1).div_ceil(g) * g;
        let chunk = vmm.create_chunk(dev, size, false)?;
        let res = vmm.reserve(dev, size)?;
        if !access.is_empty() {
            res.set_access(access)?;
        }
        let map = res.map(0, &chunk, 0, size)?;
        Ok(Self { map })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.map.addr()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.addr(), self.len())
    }
}

/// Page-locked host memory for reading logits back (`cuMemAllocHost` in the rank's context): a
/// device-to-host copy into it runs at full PCIe speed, where a copy into fresh pageable memory
/// is staged and page-faulted (it took about 50 ms for 64 rows of Qwen3's vocabulary). Host
/// memory, so outside `hbm-vmm`, which owns device memory only.
pub(crate) struct PinnedHost {
    pub(crate) ptr: *mut f32,
    pub(crate) len: usize,
    pub(crate) ctx: Arc<CudaContext>,
}

// SAFETY: the pointer is memory this value owns alone (allocated in `new`, freed in `drop`); it is
// written only by copies that `Rank::read_back` (or, for `pinned_info`, `Rank::fetch_info`)
// issues and waits for, and read only there (or in `Rank::wait_info`).
unsafe impl Send for PinnedHost {}
// SAFETY: as above; a shared reference gives no way to touch the memory outside `read_back`,
// whose caller holds the runner mutably.
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, CudaError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ctx` is bound to this thread (the caller bound it); `p` is a valid out-pointer.
        cu("cuMemAllocHost", unsafe {
            sys::cuMemAllocHost_v2(&mut p, 4 * len.max(1))
        })?;
        Ok(Self {
            ptr: p.cast(),
            len,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Errors are ignored: Drop must not panic.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemAllocHost` and is freed once; the rank's stream was
        // synchronised by `CudaRunner::drop` before its ranks drop, so no copy still writes it.
        let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
    }
}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedHost({} floats)", self.len)
    }
}

/// Addresses of one rank's scratch buffers (all in its scratch chunk).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Scratch {
    pub(crate) hidden: u64,
    pub(crate) xn: u64,
    pub(crate) xb: u64,
    pub(crate) q: u64,
    pub(crate) qbf: u64,
    pub(crate) kbuf: u64,
    pub(crate) vbuf: u64,
    pub(crate) att: u64,
    pub(crate) att2: u64,
    pub(crate) qlat: u64,
    pub(crate) rlogits: u64,
    pub(crate) ids: u64,
    pub(crate) wts: u64,
    pub(crate) f1: u64,
    pub(crate) f2: u64,
    pub(crate) hb: u64,
    pub(crate) y: u64,
    pub(crate) xg: u64,
    pub(crate) gu: u64,
    pub(crate) eh: u64,
    pub(crate) eo: u64,
    pub(crate) gidx: u64,
    pub(crate) cidx: u64,
    pub(crate) ptrs: u64,
    pub(crate) tokens: u64,
    pub(crate) pos: u64,
    pub(crate) tbl_off: u64,
    pub(crate) last: u64,
    pub(crate) tables: u64,
    pub(crate) lastb: u64,
    pub(crate) logits: u64,
    pub(crate) cos: u64,
    pub(crate) sin: u64,
    pub(crate) counts: u64,
    pub(crate) offsets: u64,
    pub(crate) active: u64,
    pub(crate) etable: u64,
    pub(crate) argmax: u64,
    pub(crate) etable_down: u64,
    pub(crate) pptrs: u64,
    pub(crate) ov_counts: u64,
    pub(crate) ov_offsets: u64,
    pub(crate) ov_gidx: u64,
    /// `{active experts, busiest expert's rows, bad id}` of the host path's grouped dispatch.
    pub(crate) dinfo: u64,
    /// Expert parallel: the rank index owning each routed expert, `[layer][expert]`.
    pub(crate) eowner: u64,
    /// Expert parallel: the step's first global row of each rank (`ranks + 1` entries).
    pub(crate) ep_offs: u64,
    /// Expert parallel: each rank's return buffer ([`Exchange::ret`]).
    pub(crate) ep_rets: u64,
    /// `0, 1, 2, ...`: the combine's slot index when the expert outputs are already in slot order.
    pub(crate) iota: u64,
}

/// Sizes the scratch of a rank needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) h: usize,
    pub(crate) vocab: usize,
    pub(crate) qw: usize,
    pub(crate) kvw: usize,
    pub(crate) qr: usize,
    pub(crate) attw: usize,
    pub(crate) lat: usize,
    pub(crate) inter_max: usize,
    pub(crate) inter_e: usize,
    pub(crate) experts: usize,
    pub(crate) top_k: usize,
    pub(crate) rows: usize,
    pub(crate) table_cap: usize,
    pub(crate) gather_cap: usize,
    pub(crate) half_rope: usize,
    pub(crate) max_context: usize,
    /// Bytes per weight / GEMM-input element (2 for bf16, 4 for f32).
    pub(crate) es: usize,
    /// Layers of the model.
    pub(crate) layers: usize,
    /// GPUs of the machine: the most ranks a runner can grow to.
    pub(crate) gpus: usize,
}

impl Dims {
    /// The most rows one expert-parallel step gathers on a GPU: every rank's, at most `rows`
    /// each.
    pub(crate) fn ep_rows(&self) -> usize {
        self.rows * self.gpus
    }
}
