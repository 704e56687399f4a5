//! Device and host memory of a rank: [`DevBuf`] (an `hbm-vmm` chunk in its own reservation),
//! [`PinnedHost`] (page-locked read-back staging), the sizes a rank is built for ([`Dims`]) and
//! the layout of its scratch chunk ([`Scratch`]).

use std::collections::BTreeMap;
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
// written only by copies that `RankState::read_back` (or, for `pinned_info`, `RankState::fetch_info`)
// issues and waits for, and read only there (or in `RankState::wait_info`).
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
    /// Expert parallel: each rank's return buffer ([`ExchangeBuffers::returned`](crate::exchange::ExchangeBuffers::returned)).
    pub(crate) ep_rets: u64,
    /// `0, 1, 2, ...`: the combine's slot index when the expert outputs are already in slot order.
    pub(crate) iota: u64,
}

impl Scratch {
    /// Every scratch buffer's name and bytes, in layout order, for a rank of sizes `d`.
    fn sizes(d: &Dims) -> Vec<(&'static str, usize)> {
        let (r, es) = (d.rows, d.elem_bytes);
        vec![
            ("hidden", 4 * r * d.hidden),
            ("xn", 4 * r * d.hidden),
            ("xb", es * r * d.hidden.max(d.q_lora_rank)),
            ("q", 4 * r * d.q_width),
            ("qbf", es * r * d.q_width),
            ("kbuf", 4 * r * d.kv_width.max(d.q_lora_rank)),
            ("vbuf", 4 * r * d.kv_width),
            ("att", es * r * d.attn_width.max(d.latent_width)),
            ("att2", es * r * d.attn_width),
            ("qlat", 4 * r * d.latent_width),
            ("rlogits", 4 * r * d.experts),
            ("ids", 4 * r * d.top_k),
            ("wts", 4 * r * d.top_k),
            ("f1", 4 * r * d.inter_max),
            ("f2", 4 * r * d.inter_max),
            ("hb", es * r * d.inter_max),
            ("y", 4 * r * d.hidden),
            ("xg", es * d.gather_cap * d.hidden),
            ("gu", 4 * d.gather_cap * 2 * d.expert_inter),
            ("eh", es * d.gather_cap * d.expert_inter),
            ("eo", 4 * d.gather_cap * d.hidden),
            ("gidx", 4 * d.gather_cap),
            ("cidx", 4 * d.ep_rows() * d.top_k),
            ("ptrs", 8 * 6 * d.experts),
            ("tokens", 4 * r),
            ("pos", 4 * r),
            ("tbl_off", 4 * r),
            ("last", 4 * r),
            ("tables", 4 * d.table_cap),
            ("lastb", es * r * d.hidden.max(d.q_lora_rank)),
            ("logits", 4 * r * d.vocab),
            ("cos", 4 * d.max_context * d.half_rope),
            ("sin", 4 * d.max_context * d.half_rope),
            ("counts", 4 * d.experts),
            ("offsets", 4 * d.experts),
            ("active", 4 * d.layers.max(1)),
            ("etable", 8 * d.layers.max(1) * d.experts),
            ("etable_down", 8 * d.layers.max(1) * d.experts),
            ("pptrs", 8 * 4 * d.experts),
            ("ov_counts", 4 * d.experts),
            ("ov_offsets", 4 * d.experts),
            ("ov_gidx", 4 * r * d.top_k),
            ("argmax", 4 * r),
            ("dinfo", 4 * 4),
            ("eowner", 4 * d.layers.max(1) * d.experts),
            ("ep_offs", 4 * (d.gpus + 1)),
            ("ep_rets", 8 * d.gpus),
            ("iota", 4 * r * d.top_k),
        ]
    }

    /// Bytes of the scratch chunk: every buffer bump-allocated at 256-byte alignment, with a
    /// 256-byte gap after each.
    pub(crate) fn bytes(d: &Dims) -> usize {
        Self::sizes(d)
            .iter()
            .map(|(_, b)| b.div_ceil(256) * 256 + 256)
            .sum()
    }

    /// The buffers' addresses in a scratch chunk of [`Scratch::bytes`] mapped at `base`.
    pub(crate) fn carve(base: u64, d: &Dims) -> Self {
        let mut at = base;
        let mut addr = BTreeMap::new();
        for (name, b) in &Self::sizes(d) {
            addr.insert(*name, at);
            at += (b.div_ceil(256) * 256 + 256) as u64;
        }
        let a = |n: &str| addr[n];
        Scratch {
            hidden: a("hidden"),
            xn: a("xn"),
            xb: a("xb"),
            q: a("q"),
            qbf: a("qbf"),
            kbuf: a("kbuf"),
            vbuf: a("vbuf"),
            att: a("att"),
            att2: a("att2"),
            qlat: a("qlat"),
            rlogits: a("rlogits"),
            ids: a("ids"),
            wts: a("wts"),
            f1: a("f1"),
            f2: a("f2"),
            hb: a("hb"),
            y: a("y"),
            xg: a("xg"),
            gu: a("gu"),
            eh: a("eh"),
            eo: a("eo"),
            gidx: a("gidx"),
            cidx: a("cidx"),
            ptrs: a("ptrs"),
            tokens: a("tokens"),
            pos: a("pos"),
            tbl_off: a("tbl_off"),
            last: a("last"),
            tables: a("tables"),
            lastb: a("lastb"),
            logits: a("logits"),
            cos: a("cos"),
            sin: a("sin"),
            counts: a("counts"),
            offsets: a("offsets"),
            active: a("active"),
            etable: a("etable"),
            etable_down: a("etable_down"),
            pptrs: a("pptrs"),
            ov_counts: a("ov_counts"),
            ov_offsets: a("ov_offsets"),
            ov_gidx: a("ov_gidx"),
            argmax: a("argmax"),
            dinfo: a("dinfo"),
            eowner: a("eowner"),
            ep_offs: a("ep_offs"),
            ep_rets: a("ep_rets"),
            iota: a("iota"),
        }
    }
}

/// Sizes the scratch of a rank needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    /// Hidden size.
    pub(crate) hidden: usize,
    pub(crate) vocab: usize,
    /// Query width of a row (heads x query head size).
    pub(crate) q_width: usize,
    /// Key (or MLA latent plus rope key) width of a row.
    pub(crate) kv_width: usize,
    /// MLA query LoRA rank (0 without one).
    pub(crate) q_lora_rank: usize,
    /// Attention output width of a row (heads x value head size).
    pub(crate) attn_width: usize,
    /// MLA: heads x KV LoRA rank (0 for GQA).
    pub(crate) latent_width: usize,
    pub(crate) inter_max: usize,
    /// Intermediate size of one routed expert.
    pub(crate) expert_inter: usize,
    pub(crate) experts: usize,
    pub(crate) top_k: usize,
    pub(crate) rows: usize,
    pub(crate) table_cap: usize,
    pub(crate) gather_cap: usize,
    pub(crate) half_rope: usize,
    pub(crate) max_context: usize,
    /// Bytes per weight / GEMM-input element (2 for bf16, 4 for f32).
    pub(crate) elem_bytes: usize,
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
