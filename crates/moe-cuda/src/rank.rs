//! One rank: a logical device with its stream, cuBLAS handle, compiled kernels, replicated
//! weights, KV and scratch ([`RankState`]), how one is built, and its copies between host and device.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm};
use moe_engine::{Need, RowOutput};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::{Model, ModelError};
use moe_model::config::ModelConfig;
use moe_model::spec::KvGeometry;
use moe_model::weights::ChunkLayout;

use crate::config::{CudaConfig, Precision};
use crate::error::{cu, CudaError};
use crate::exchange::ExchangeBuffers;
use crate::kernels::{DevPtr, Grid, Kernels, Launcher};
use crate::memory::{DevBuf, Dims, PinnedHost, Scratch};
use crate::runner::CudaRunner;
use crate::weights::Fill;

/// One GPU: an attention rank with its stream, handles, kernels, replicated weights, KV and scratch.
pub(crate) struct RankState {
    pub(crate) dev: DeviceId,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// The compiled kernels (launched through [`RankState::launch`]).
    pub(crate) kernels: Kernels,
    pub(crate) global: DevBuf,
    pub(crate) layers: Vec<DevBuf>,
    pub(crate) kv: DevBuf,
    /// The scratch chunk (kept mapped) and its buffers' addresses.
    pub(crate) _scratch_chunk: DevBuf,
    pub(crate) scratch: Scratch,
    /// The expert-parallel exchange chunk (kept mapped) and its buffers' addresses.
    pub(crate) _exchange_chunk: DevBuf,
    pub(crate) exchange: ExchangeBuffers,
    /// Whether every GPU of the machine may read and write the exchange chunk.
    pub(crate) peer_exchange: bool,
    /// Recorded once the rank has pushed a layer's rows and routes to every GPU.
    pub(crate) ev_pub: CudaEvent,
    /// Recorded once the GPU has pushed a layer's expert outputs back to every rank.
    pub(crate) ev_ret: CudaEvent,
    /// Page-locked staging for the logits of up to `rows` sampled rows.
    pub(crate) pinned: PinnedHost,
    /// Page-locked staging for the greedy tokens of up to `rows` rows, then one active-expert
    /// count per layer (32-bit integers).
    pub(crate) pinned_small: PinnedHost,
    /// Page-locked staging for the host-dispatch layout's size (`scratch.dinfo`, 3 integers), and the
    /// event that says it has arrived (see [`RankState::fetch_info`]).
    pub(crate) pinned_info: PinnedHost,
    pub(crate) info_ready: CudaEvent,
    /// cuBLAS type of weights and GEMM inputs (bf16 or f32).
    pub(crate) blas_type: blas_sys::cudaDataType,
    /// cuBLAS compute type (f32 accumulation; pedantic in the f32 reference mode).
    pub(crate) blas_compute: blas_sys::cublasComputeType_t,
    /// [`CudaConfig::batch_invariant`]: GEMMs go through `bi_gemm` / `bi_gemm_kn`.
    pub(crate) batch_invariant: bool,
}

impl std::fmt::Debug for RankState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankState")
            .field("dev", &self.dev)
            .field("kv", &self.kv)
            .finish()
    }
}

impl RankState {
    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))
    }

    /// The typed launchers of this rank's kernels on its stream.
    pub(crate) fn launch(&self) -> Launcher<'_> {
        Launcher::new(&self.stream, &self.kernels)
    }

    pub(crate) fn htod<T: Copy>(&self, dst: u64, src: &[T]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` is an address inside a live scratch chunk of this rank with room for
        // `src` (the caller sized the scratch for the step's limits, checked before the copy);
        // `src` is a valid host slice. From pageable memory the call returns only once `src`
        // has been staged, so the slice may be dropped afterwards.
        cu("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst,
                src.as_ptr().cast::<c_void>(),
                std::mem::size_of_val(src),
                self.stream.cu_stream(),
            )
        })
    }

    /// Ends a step: copies what `needs` asks of the sampled rows (the greedy token from
    /// `scratch.argmax`, or the row's f32 logits from `scratch.logits`) and the active-expert count of each of
    /// the `layers` layers (`scratch.active`) through the page-locked buffers, then synchronises the
    /// stream once.
    pub(crate) fn read_back(
        &self,
        needs: &[Need],
        vocab: usize,
        layers: usize,
    ) -> Result<(Vec<RowOutput>, Vec<i32>), CudaError> {
        let n = needs.len();
        if n * vocab > self.pinned.len || n + layers > self.pinned_small.len {
            return Err(CudaError::Input(format!(
                "{n} sampled rows exceed the pinned read-back buffers"
            )));
        }
        let stream = self.stream.cu_stream();
        let copy = |dst: *mut c_void, src: u64, bytes: usize| {
            if bytes == 0 {
                return Ok(());
            }
            // SAFETY: every caller below passes a destination inside one of this rank's pinned
            // buffers (bounds checked above) and a source inside its scratch chunk holding
            // `bytes` bytes written by this step; nothing else uses the buffers meanwhile.
            cu("cuMemcpyDtoHAsync", unsafe {
                sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, stream)
            })
        };
        let small = self.pinned_small.ptr.cast::<i32>();
        if needs.contains(&Need::GreedyToken) {
            copy(small.cast(), self.scratch.argmax, 4 * n)?;
        }
        // SAFETY: `n + layers` i32 slots fit the small buffer (checked above).
        let active_counts = unsafe { small.add(n) };
        copy(active_counts.cast(), self.scratch.active, 4 * layers)?;
        // Runs of consecutive rows that need logits go in one copy each.
        let mut i = 0;
        while i < n {
            if needs[i] != Need::Logits {
                i += 1;
                continue;
            }
            let run = needs[i..]
                .iter()
                .take_while(|&&x| x == Need::Logits)
                .count();
            copy(
                // SAFETY: rows `i..i + run` lie within the `n * vocab` floats checked above.
                unsafe { self.pinned.ptr.add(i * vocab) }.cast(),
                self.scratch.logits + (4 * i * vocab) as u64,
                4 * run * vocab,
            )?;
            i += run;
        }
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        // SAFETY: both buffers are live and every part read below was written by a copy above
        // that completed (the stream was synchronised); no other copy into them is queued.
        let (ints, floats) = unsafe {
            (
                std::slice::from_raw_parts(small, n + layers),
                std::slice::from_raw_parts(self.pinned.ptr, n * vocab),
            )
        };
        let out = needs
            .iter()
            .enumerate()
            .map(|(i, need)| match need {
                Need::GreedyToken => RowOutput::Greedy(u32::try_from(ints[i]).ok()),
                Need::Logits => RowOutput::Logits(floats[i * vocab..(i + 1) * vocab].to_vec()),
            })
            .collect();
        Ok((out, ints[n..].to_vec()))
    }

    /// Queues the copy of the host-dispatch layout's size (`scratch.dinfo`) into `pinned_info` and
    /// records `info_ready` behind it; [`RankState::wait_info`] reads it. The stream goes on with
    /// whatever is queued after this (work that does not need the routes), so the host's wait
    /// and its next launches overlap with it.
    pub(crate) fn fetch_info(&self) -> Result<(), CudaError> {
        // SAFETY: `pinned_info` holds 4 i32 slots of page-locked memory owned by this rank and
        // `scratch.dinfo` 4 i32 slots of its scratch chunk; only this function writes the buffer, and
        // `wait_info` reads it after the event behind this copy completed. The next copy is
        // queued only after that read (both run on the thread driving the rank, in order).
        cu("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.pinned_info.ptr.cast::<c_void>(),
                self.scratch.dinfo,
                3 * std::mem::size_of::<i32>(),
                self.stream.cu_stream(),
            )
        })?;
        self.info_ready
            .record(&self.stream)
            .map_err(CudaError::driver("cuEventRecord"))
    }

    /// Waits for the copy [`RankState::fetch_info`] queued; returns `{active experts, busiest
    /// expert's rows, bad id}`.
    pub(crate) fn wait_info(&self) -> Result<[i32; 3], CudaError> {
        self.info_ready
            .synchronize()
            .map_err(CudaError::driver("cuEventSynchronize"))?;
        // SAFETY: the copy into these 3 slots completed (its event completed above) and nothing
        // else writes them (see `fetch_info`).
        let v = unsafe { std::slice::from_raw_parts(self.pinned_info.ptr.cast::<i32>(), 3) };
        Ok([v[0], v[1], v[2]])
    }

    /// Queues a copy of `bytes` bytes from `src` (this rank's memory) to `dst` (its own or a peer
    /// GPU's) on this rank's stream.
    pub(crate) fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `src` holds `bytes` bytes of a live chunk of this rank and `dst` has room for
        // them in a live chunk that this device was granted access to (an exchange chunk, which
        // every GPU of the machine may write); the caller orders the copy against the buffers'
        // other users with stream order and events.
        cu("cuMemcpyDtoDAsync", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream.cu_stream())
        })
    }

    pub(crate) fn dtoh<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); n];
        if n == 0 {
            return Ok(out);
        }
        // SAFETY: `src` holds at least `n` elements of `T` in a live chunk of this rank; `out` is
        // a writable host buffer of that size; the stream is synchronised before `out` is read.
        cu("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                out.as_mut_ptr().cast::<c_void>(),
                src,
                n * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        })?;
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rms(
        &self,
        x: u64,
        x_row: usize,
        segs: usize,
        seg_stride: usize,
        w: u64,
        width: usize,
        eps: f32,
        out_f: u64,
        of_row: usize,
        out_b: u64,
        ob_row: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        self.launch().rms_norm(
            Grid::new((segs as u32, rows as u32), 256, 0),
            DevPtr::f32(x),
            x_row as i32,
            seg_stride as i32,
            DevPtr::act(w),
            width as i32,
            eps,
            DevPtr::f32(out_f).or_null(),
            of_row as i32,
            DevPtr::act(out_b).or_null(),
            ob_row as i32,
        )
    }

    pub(crate) fn fill(
        &self,
        ptr: u64,
        n: usize,
        random: Option<(u64, f32)>,
        v: f32,
    ) -> Result<(), CudaError> {
        let blocks = (n.div_ceil(256).min(65535) as u32).max(1);
        let grid = Grid::new((blocks, 1), 256, 0);
        match random {
            Some((seed, scale)) => {
                self.launch()
                    .fill_random(grid, DevPtr::act(ptr), n as i64, seed, scale)
            }
            None => self
                .launch()
                .fill_const(grid, DevPtr::act(ptr), n as i64, v),
        }
    }
}

impl CudaRunner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn make_rank(
        vmm: &Vmm<CudaBackend>,
        dev: DeviceId,
        cfg: &ModelConfig,
        model: &Model<CpuCompute>,
        d: &Dims,
        geo: &KvGeometry,
        config: &CudaConfig,
        layout: &moe_model::weights::WeightLayout,
        fill: &Fill<'_>,
        seed_ctr: &mut u64,
    ) -> Result<RankState, CudaError> {
        // A logical device's GPU: several ranks may share one (their own streams, handles and
        // kernels, in the GPU's primary context).
        let ordinal = vmm.backend().ordinal(dev)? as usize;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("cuCtxCreate"))?;
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let blas_h = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas {
            call: "cublasCreate",
            status: e.0 as i32,
        })?;
        let f32_storage = config.precision == Precision::F32;
        let k = Kernels::compile(&ctx, f32_storage, config.batch_invariant && !f32_storage)?;
        let es = d.elem_bytes;
        let global = DevBuf::new(vmm, dev, layout.global().floats() * es, &[])?;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let lay = layout
                    .layer(l)
                    .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
                DevBuf::new(vmm, dev, lay.floats() * es, &[])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kv = DevBuf::new(
            vmm,
            dev,
            geo.block_floats() * 4 * config.kv_blocks_per_rank,
            &[],
        )?;
        let r = d.rows;
        let scratch = DevBuf::new(vmm, dev, Scratch::bytes(d), &[])?;
        ctx.bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        let pinned = PinnedHost::new(&ctx, r * d.vocab)?;
        let pinned_small = PinnedHost::new(&ctx, r + d.layers)?;
        let pinned_info = PinnedHost::new(&ctx, 4)?;
        let info_ready = ctx
            .new_event(None)
            .map_err(CudaError::driver("cuEventCreate"))?;
        let scratch_bufs = Scratch::carve(scratch.addr(), d);
        // The exchange chunk: readable and writable by every GPU of the machine, so any rank that
        // joins later can use it without a new grant.
        let x_len = ExchangeBuffers::bytes(d);
        let everyone: Vec<DeviceId> = if d.gpus > 1 {
            (0..d.gpus as u32).map(DeviceId).collect()
        } else {
            Vec::new()
        };
        // Without peer access between some GPUs the grant fails; the rank then keeps its
        // exchange chunk to itself and steps run without expert parallelism.
        let (xchg, peer_exchange) = match DevBuf::new(vmm, dev, x_len, &everyone) {
            Ok(b) => (b, !everyone.is_empty()),
            Err(_) => (DevBuf::new(vmm, dev, x_len, &[])?, false),
        };
        let exchange = ExchangeBuffers::carve(xchg.addr(), d);
        let event = || {
            ctx.new_event(None)
                .map_err(CudaError::driver("cuEventCreate"))
        };
        let (ev_pub, ev_ret) = (event()?, event()?);
        let rank = RankState {
            dev,
            ctx,
            stream,
            blas: blas_h,
            kernels: k,
            global,
            layers,
            kv,
            _scratch_chunk: scratch,
            scratch: scratch_bufs,
            _exchange_chunk: xchg,
            exchange,
            peer_exchange,
            ev_pub,
            ev_ret,
            pinned,
            pinned_small,
            pinned_info,
            info_ready,
            blas_type: if f32_storage {
                blas_sys::cudaDataType::CUDA_R_32F
            } else {
                blas_sys::cudaDataType::CUDA_R_16BF
            },
            blas_compute: if f32_storage {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
            } else {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            },
            batch_invariant: config.batch_invariant,
        };
        rank.bind()?;
        // Rope tables, computed on the host exactly as the CPU reference computes them.
        let half = d.half_rope;
        let (mut cos, mut sin) = (
            vec![0.0f32; d.max_context * half],
            vec![0.0f32; d.max_context * half],
        );
        for p in 0..d.max_context {
            model.rope().cos_sin(
                p,
                &mut cos[p * half..(p + 1) * half],
                &mut sin[p * half..(p + 1) * half],
            );
        }
        rank.htod(rank.scratch.cos, &cos)?;
        rank.htod(rank.scratch.sin, &sin)?;
        let iota: Vec<i32> = (0..(r * d.top_k) as i32).collect();
        rank.htod(rank.scratch.iota, &iota)?;
        // Replicated weights.
        let fill_chunk =
            |base: u64, lay: &ChunkLayout, seed_ctr: &mut u64| -> Result<(), CudaError> {
                for t in lay.tensors() {
                    Self::fill_tensor(
                        &rank,
                        base + (d.elem_bytes * t.offset) as u64,
                        t.len,
                        &t.spec(),
                        fill,
                        seed_ctr,
                    )?;
                }
                Ok(())
            };
        fill_chunk(rank.global.addr(), layout.global(), seed_ctr)?;
        for (l, buf) in rank.layers.iter().enumerate() {
            if let Some(lay) = layout.layer(l) {
                fill_chunk(buf.addr(), lay, seed_ctr)?;
            }
        }
        Ok(rank)
    }
}
