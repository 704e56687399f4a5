//! Typed launchers: one small function per `extern "C" __global__` kernel of `model.cu` and
//! `bi_mma.cu`, with the kernel's parameters in its order and of its kinds.
//!
//! - A device pointer parameter is a [`DevPtr<T>`], where `T` is the element the kernel
//!   declares: `f32` (`float*`), `i32` (`int*`), `u64` (`unsigned long long*`), [`Act`] (the
//!   kernels' `bf16`, the stored weight and GEMM-input element: bf16 bits, or `float` in the f32
//!   reference precision) or [`Untyped`] (`void*`). A parameter the kernel tests for null (an
//!   optional output, an owner mask, a row index) is an `Option<DevPtr<T>>`.
//! - Scalars are `i32` (`int`), `i64` (`long long`), `u64` (`unsigned long long`) and `f32`
//!   (`float`).
//! - Before the one `unsafe` launch call, every pointer is checked: non-null where the kernel
//!   needs it and aligned to its element. An empty grid launches nothing (and checks nothing),
//!   as before the launchers existed.
//! - [`SIGNATURES`] lists each launcher's parameter kinds; a host test parses the `.cu` files
//!   and checks every kernel against it, so a launcher that drifts from its kernel fails CI
//!   without a GPU.
//!
//! What the launchers cannot see is how long each buffer is: the callers size the scratch for
//! the runner's limits and check a step against them before launching (see `memory::Scratch`).

use std::marker::PhantomData;

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::Kernels;
use crate::error::CudaError;

/// The element a device pointer parameter points at, as the kernel declares it (read by the
/// signature test).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    /// `float*`.
    F32,
    /// `int*`.
    I32,
    /// `unsigned long long*` (tables of device addresses).
    U64,
    /// `bf16*`: the stored weight and GEMM-input element (see [`Act`]).
    Act,
    /// `void*`: bf16 or f32 as another parameter says.
    Untyped,
}

/// The kind of one kernel parameter (read by the signature test).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamKind {
    /// A device pointer.
    Ptr(Elem),
    /// `int`.
    Int,
    /// `long long`.
    Long,
    /// `unsigned long long`.
    ULong,
    /// `float`.
    Float,
}

/// The kernels' `bf16`: a stored weight or GEMM-input element (bf16 bits, or `float` in the f32
/// reference precision, where the source is compiled with `ACT_F32`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Act;

/// A `void*` parameter's element: bf16 or f32, as another parameter of the kernel says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Untyped;

/// An element type a device pointer may point at.
pub(crate) trait Element {
    /// How the kernel declares it.
    #[cfg_attr(not(test), allow(dead_code))]
    const ELEM: Elem;
    /// The alignment (bytes) every pointer to it must have.
    const ALIGN: u64;
}

impl Element for f32 {
    const ELEM: Elem = Elem::F32;
    const ALIGN: u64 = 4;
}

impl Element for i32 {
    const ELEM: Elem = Elem::I32;
    const ALIGN: u64 = 4;
}

impl Element for u64 {
    const ELEM: Elem = Elem::U64;
    const ALIGN: u64 = 8;
}

impl Element for Act {
    const ELEM: Elem = Elem::Act;
    const ALIGN: u64 = 2;
}

impl Element for Untyped {
    const ELEM: Elem = Elem::Untyped;
    const ALIGN: u64 = 1;
}

/// A device address of elements of `T` (in a chunk the launching device can access).
pub(crate) struct DevPtr<T> {
    addr: u64,
    _elem: PhantomData<fn() -> T>,
}

impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DevPtr<T> {}

impl<T> std::fmt::Debug for DevPtr<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevPtr({:#x})", self.addr)
    }
}

impl<T> DevPtr<T> {
    fn at(addr: u64) -> Self {
        Self {
            addr,
            _elem: PhantomData,
        }
    }

    /// `None` for the null address (for a parameter the kernel tests for null).
    pub(crate) fn or_null(self) -> Option<Self> {
        (self.addr != 0).then_some(self)
    }
}

impl DevPtr<f32> {
    /// `float*` at `addr`.
    pub(crate) fn f32(addr: u64) -> Self {
        Self::at(addr)
    }
}

impl DevPtr<i32> {
    /// `int*` at `addr`.
    pub(crate) fn i32(addr: u64) -> Self {
        Self::at(addr)
    }
}

impl DevPtr<u64> {
    /// `unsigned long long*` at `addr`.
    pub(crate) fn u64(addr: u64) -> Self {
        Self::at(addr)
    }
}

impl DevPtr<Act> {
    /// `bf16*` (a stored weight or GEMM-input element) at `addr`.
    pub(crate) fn act(addr: u64) -> Self {
        Self::at(addr)
    }
}

impl DevPtr<Untyped> {
    /// `void*` at `addr`.
    pub(crate) fn untyped(addr: u64) -> Self {
        Self::at(addr)
    }
}

/// A launcher's parameter: its kind, its check and the value pushed for the kernel.
pub(crate) trait KernelParam {
    /// The kernel parameter's kind.
    #[cfg_attr(not(test), allow(dead_code))]
    const KIND: ParamKind;
    /// The bytes the kernel receives.
    type Raw: DeviceRepr;
    /// Refuses a value the kernel cannot take (a null or misaligned pointer).
    fn check(&self, kernel: &'static str, param: &'static str) -> Result<(), CudaError>;
    /// The value pushed for the kernel.
    fn raw(&self) -> Self::Raw;
}

fn check_ptr<T: Element>(
    addr: u64,
    kernel: &'static str,
    param: &'static str,
) -> Result<(), CudaError> {
    if addr == 0 {
        return Err(CudaError::Input(format!(
            "kernel {kernel}: `{param}` is a null device pointer"
        )));
    }
    if !addr.is_multiple_of(T::ALIGN) {
        return Err(CudaError::Input(format!(
            "kernel {kernel}: `{param}` ({addr:#x}) is not aligned to {} bytes",
            T::ALIGN
        )));
    }
    Ok(())
}

impl<T: Element> KernelParam for DevPtr<T> {
    const KIND: ParamKind = ParamKind::Ptr(T::ELEM);
    type Raw = u64;
    fn check(&self, kernel: &'static str, param: &'static str) -> Result<(), CudaError> {
        check_ptr::<T>(self.addr, kernel, param)
    }
    fn raw(&self) -> u64 {
        self.addr
    }
}

impl<T: Element> KernelParam for Option<DevPtr<T>> {
    const KIND: ParamKind = ParamKind::Ptr(T::ELEM);
    type Raw = u64;
    fn check(&self, kernel: &'static str, param: &'static str) -> Result<(), CudaError> {
        self.map_or(Ok(()), |p| check_ptr::<T>(p.addr, kernel, param))
    }
    fn raw(&self) -> u64 {
        self.map_or(0, |p| p.addr)
    }
}

macro_rules! scalar_param {
    ($t:ty, $kind:expr) => {
        impl KernelParam for $t {
            const KIND: ParamKind = $kind;
            type Raw = $t;
            fn check(&self, _: &'static str, _: &'static str) -> Result<(), CudaError> {
                Ok(())
            }
            fn raw(&self) -> $t {
                *self
            }
        }
    };
}

scalar_param!(i32, ParamKind::Int);
scalar_param!(i64, ParamKind::Long);
scalar_param!(u64, ParamKind::ULong);
scalar_param!(f32, ParamKind::Float);

/// A launch's shape: blocks (x, y, z), threads per block (x) and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    blocks: (u32, u32, u32),
    threads: u32,
    shared_bytes: u32,
}

impl Grid {
    /// `(x, y)` blocks of `threads` threads with `shared_bytes` of dynamic shared memory.
    pub(crate) fn new((x, y): (u32, u32), threads: u32, shared_bytes: u32) -> Self {
        Self {
            blocks: (x, y, 1),
            threads,
            shared_bytes,
        }
    }

    /// `(x, y, z)` blocks of `threads` threads, without dynamic shared memory.
    pub(crate) fn xyz(blocks: (u32, u32, u32), threads: u32) -> Self {
        Self {
            blocks,
            threads,
            shared_bytes: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.blocks.0 == 0 || self.blocks.1 == 0 || self.blocks.2 == 0
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.blocks,
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }
}

/// A compiled kernel, or one this runner did not compile (`bi_mma` outside batch-invariant
/// bf16 mode).
trait CompiledKernel {
    fn function(&self) -> Option<&CudaFunction>;
}

impl CompiledKernel for CudaFunction {
    fn function(&self) -> Option<&CudaFunction> {
        Some(self)
    }
}

impl CompiledKernel for Option<CudaFunction> {
    fn function(&self) -> Option<&CudaFunction> {
        self.as_ref()
    }
}

/// One rank's kernels on its stream: the typed launchers.
#[derive(Clone, Copy)]
pub(crate) struct Launcher<'a> {
    stream: &'a CudaStream,
    kernels: &'a Kernels,
}

impl<'a> Launcher<'a> {
    /// The launchers of `kernels` on `stream` (both of the same rank).
    pub(crate) fn new(stream: &'a CudaStream, kernels: &'a Kernels) -> Self {
        Self { stream, kernels }
    }

    /// Whether `bi_mma` (tensor-core batch-invariant GEMM) was compiled for this rank.
    pub(crate) fn has_bi_mma(&self) -> bool {
        self.kernels.bi_mma.is_some()
    }
}

/// Declares one launcher per kernel: `file: name(param: Type, ...)`, the parameters in the
/// kernel's order. Each launcher checks its pointers, then pushes every parameter and launches.
macro_rules! launchers {
    ($(
        $(#[$doc:meta])*
        $file:literal: $name:ident($($param:ident: $ty:ty),* $(,)?);
    )*) => {
        impl Launcher<'_> {
            $(
                $(#[$doc])*
                #[allow(clippy::too_many_arguments)]
                pub(crate) fn $name(&self, grid: Grid, $($param: $ty),*) -> Result<(), CudaError> {
                    if grid.is_empty() {
                        return Ok(());
                    }
                    $(KernelParam::check(&$param, stringify!($name), stringify!($param))?;)*
                    let func = CompiledKernel::function(&self.kernels.$name).ok_or_else(|| {
                        CudaError::Unsupported(format!(
                            "kernel {} is not compiled for this runner",
                            stringify!($name)
                        ))
                    })?;
                    $(let $param = KernelParam::raw(&$param);)*
                    let mut builder = self.stream.launch_builder(func);
                    $(builder.arg(&$param);)*
                    // SAFETY: the parameters are the kernel's, in its order and of its kinds
                    // (`SIGNATURES`, checked against the `.cu` sources by a host test); every
                    // pointer was checked above (non-null where the kernel needs it, aligned to
                    // its element) and points into a live chunk this device can access, which
                    // the caller sized for the whole grid; the pushed values live until the
                    // launch call returns.
                    unsafe { builder.launch(grid.config()) }
                        .map_err(CudaError::driver("cuLaunchKernel"))?;
                    Ok(())
                }
            )*
        }

        /// Every launcher's kernel, source file and parameter kinds, in the kernel's order (read
        /// by the signature test).
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) const SIGNATURES: &[(&str, &str, &[ParamKind])] = &[
            $((stringify!($name), $file, &[$(<$ty as KernelParam>::KIND),*]),)*
        ];
    };
}

launchers! {
    /// `embed`: row `blockIdx.x`'s token embedding into `out` (f32).
    "model.cu": embed(tok: DevPtr<i32>, table: DevPtr<Act>, out: DevPtr<f32>, hidden: i32);

    /// `rms_norm`: RMS norm of segment `blockIdx.x` of row `blockIdx.y`; either output may be
    /// absent.
    "model.cu": rms_norm(
        x: DevPtr<f32>,
        x_row: i32,
        seg_stride: i32,
        w: DevPtr<Act>,
        width: i32,
        eps: f32,
        out_f: Option<DevPtr<f32>>,
        of_row: i32,
        out_b: Option<DevPtr<Act>>,
        ob_row: i32,
    );

    /// `rope`: rotary embedding of row `blockIdx.x`'s heads, in place.
    "model.cu": rope(
        x: DevPtr<f32>,
        row_stride: i32,
        heads: i32,
        head_stride: i32,
        offset: i32,
        dim: i32,
        pos: DevPtr<i32>,
        cos_t: DevPtr<f32>,
        sin_t: DevPtr<f32>,
        interleaved: i32,
    );

    /// `kv_write`: row `blockIdx.x`'s `[a | b]` into its KV slot.
    "model.cu": kv_write(
        kv: DevPtr<f32>,
        block_floats: i32,
        block_tokens: i32,
        layer: i32,
        token_floats: i32,
        tables: DevPtr<i32>,
        tbl_off: DevPtr<i32>,
        pos: DevPtr<i32>,
        a: DevPtr<f32>,
        a_stride: i32,
        wa: i32,
        b: DevPtr<f32>,
        b_stride: i32,
        wb: i32,
    );

    /// `attn_gqa`: causal GQA over the paged KV; grid (heads, rows).
    "model.cu": attn_gqa(
        q: DevPtr<f32>,
        q_row: i32,
        kv: DevPtr<f32>,
        block_floats: i32,
        block_tokens: i32,
        layer: i32,
        token_floats: i32,
        tables: DevPtr<i32>,
        tbl_off: DevPtr<i32>,
        pos: DevPtr<i32>,
        heads: i32,
        kv_heads: i32,
        head_dim: i32,
        scale: f32,
        out: DevPtr<Act>,
        out_row: i32,
    );

    /// `attn_mla`: MLA attention in the absorbed form over the paged latent KV; grid (heads,
    /// rows).
    "model.cu": attn_mla(
        qlat: DevPtr<f32>,
        q: DevPtr<f32>,
        q_row: i32,
        qk_head_dim: i32,
        qk_nope: i32,
        rope_dim: i32,
        kv_lora_rank: i32,
        kv: DevPtr<f32>,
        block_floats: i32,
        block_tokens: i32,
        layer: i32,
        token_floats: i32,
        tables: DevPtr<i32>,
        tbl_off: DevPtr<i32>,
        pos: DevPtr<i32>,
        heads: i32,
        scale: f32,
        olat: DevPtr<Act>,
    );

    /// `linear_f32`: `out = x W^T` in f32 (the router's logits); grid (outputs, rows).
    "model.cu": linear_f32(
        x: DevPtr<f32>,
        w: DevPtr<Act>,
        out: DevPtr<f32>,
        inputs: i32,
        outputs: i32,
    );

    /// `route`: softmax/top-k router, one warp per row.
    "model.cu": route(
        logits: DevPtr<f32>,
        rows: i32,
        experts: i32,
        top_k: i32,
        n_group: i32,
        topk_group: i32,
        normalize: i32,
        scale: f32,
        ids: DevPtr<i32>,
        wts: DevPtr<f32>,
    );

    /// `gather_bf16`: row `blockIdx.x` of `dst` is row `idx[blockIdx.x]` of `src` (zeros for a
    /// negative index).
    "model.cu": gather_bf16(src: DevPtr<Act>, width: i32, idx: DevPtr<i32>, dst: DevPtr<Act>);

    /// `silu_mul`: `out = silu(g) * u`, row `blockIdx.x`.
    "model.cu": silu_mul(
        g: DevPtr<f32>,
        g_row: i32,
        u: DevPtr<f32>,
        u_row: i32,
        out: DevPtr<Act>,
        inter: i32,
    );

    /// `combine`: adds row `blockIdx.x`'s weighted expert outputs (ascending expert id) and
    /// shared experts (when present) into the residual stream.
    "model.cu": combine(
        hidden: DevPtr<f32>,
        hidden_size: i32,
        top_k: i32,
        idx: DevPtr<i32>,
        wts: DevPtr<f32>,
        eout: DevPtr<f32>,
        shared: Option<DevPtr<f32>>,
        shared_row: i32,
    );

    /// `ep_return`: expert parallel, writes this GPU's expert outputs into the owning ranks'
    /// return buffers in slot order.
    "model.cu": ep_return(
        ids: DevPtr<i32>,
        experts: i32,
        owner: DevPtr<i32>,
        me: i32,
        cidx: DevPtr<i32>,
        eo: DevPtr<f32>,
        hidden_size: i32,
        top_k: i32,
        offs: DevPtr<i32>,
        ranks: i32,
        rets: DevPtr<u64>,
    );

    /// `moe_dispatch`: per-expert counts, offsets and the gather list on the device (with an
    /// owner mask, only the experts owned by `me`).
    "model.cu": moe_dispatch(
        ids: DevPtr<i32>,
        slots: i32,
        experts: i32,
        top_k: i32,
        counts: DevPtr<i32>,
        offsets: DevPtr<i32>,
        gidx: DevPtr<i32>,
        cidx: DevPtr<i32>,
        active: DevPtr<i32>,
        owner: Option<DevPtr<i32>>,
        me: i32,
    );

    /// `moe_dispatch_padded`: the padded layout at `cap` rows per expert, and the overflow list.
    "model.cu": moe_dispatch_padded(
        ids: DevPtr<i32>,
        slots: i32,
        experts: i32,
        top_k: i32,
        cap: i32,
        gidx: DevPtr<i32>,
        cidx: DevPtr<i32>,
        ov_counts: DevPtr<i32>,
        ov_offsets: DevPtr<i32>,
        ov_gidx: DevPtr<i32>,
        active: DevPtr<i32>,
    );

    /// `moe_dispatch_grouped`: the grouped layout per active expert, with the batched GEMMs'
    /// pointer arrays and the layout's size in `info` (the buffer bases are passed as integers).
    "model.cu": moe_dispatch_grouped(
        ids: DevPtr<i32>,
        slots: i32,
        experts: i32,
        top_k: i32,
        cap: i32,
        etable: DevPtr<u64>,
        down_off: i64,
        xg: u64,
        xg_row: i64,
        gu: u64,
        gu_row: i64,
        eh: u64,
        eh_row: i64,
        eo: u64,
        eo_row: i64,
        gidx: DevPtr<i32>,
        cidx: DevPtr<i32>,
        ptrs: DevPtr<u64>,
        info: DevPtr<i32>,
        active: DevPtr<i32>,
        owner: Option<DevPtr<i32>>,
        me: i32,
    );

    /// `moe_gemv`: every expert's rows times its weights on CUDA cores; grid (column blocks,
    /// experts), `rchunk` rows per shared-memory chunk.
    "model.cu": moe_gemv(
        counts: DevPtr<i32>,
        offsets: DevPtr<i32>,
        row_idx: Option<DevPtr<i32>>,
        x: DevPtr<Act>,
        ldx: i32,
        wptrs: DevPtr<u64>,
        w_off: i64,
        n: i32,
        k: i32,
        out: DevPtr<f32>,
        ldo: i32,
        rchunk: i32,
    );

    /// `bi_gemm`: the batch-invariant GEMM on CUDA cores.
    "model.cu": bi_gemm(
        x: DevPtr<Act>,
        ldx: i32,
        sx: i64,
        w: DevPtr<Act>,
        ldw: i32,
        sw: i64,
        out: DevPtr<Untyped>,
        ldo: i32,
        so: i64,
        out_bf16: i32,
        beta: f32,
        m: i32,
        n: i32,
        k: i32,
        aligned: i32,
    );

    /// `bi_gemm_kn`: the batch-invariant GEMM with `[k, n]` weights (MLA's absorb).
    "model.cu": bi_gemm_kn(
        x: DevPtr<Act>,
        ldx: i32,
        sx: i64,
        w: DevPtr<Act>,
        ldw: i32,
        sw: i64,
        out: DevPtr<Untyped>,
        ldo: i32,
        so: i64,
        out_bf16: i32,
        beta: f32,
        m: i32,
        n: i32,
        k: i32,
    );

    /// `argmax_rows`: the greedy token of row `blockIdx.x` (lowest id among the largest finite
    /// logits, -1 when none is finite).
    "model.cu": argmax_rows(logits: DevPtr<f32>, vocab: i32, out: DevPtr<i32>);

    /// `cast_bf16`: `y = x` rounded to the stored element.
    "model.cu": cast_bf16(x: DevPtr<f32>, y: DevPtr<Act>, n: i64);

    /// `fill_random`: uniform values in `±scale` from `seed`.
    "model.cu": fill_random(p: DevPtr<Act>, n: i64, seed: u64, scale: f32);

    /// `fill_const`: every element `v`.
    "model.cu": fill_const(p: DevPtr<Act>, n: i64, v: f32);

    /// `bi_mma`: the tensor-core batch-invariant GEMM; plain mode with `counts` absent, routed
    /// experts (as `moe_gemv`) with `counts`, `offsets` and `wptrs` present (`w` then absent).
    "bi_mma.cu": bi_mma(
        x: DevPtr<Act>,
        ldx: i32,
        sx: i64,
        w: Option<DevPtr<Act>>,
        ldw: i32,
        sw: i64,
        out: DevPtr<Untyped>,
        ldo: i32,
        so: i64,
        out_bf16: i32,
        beta: f32,
        m: i32,
        n: i32,
        k: i32,
        aligned: i32,
        counts: Option<DevPtr<i32>>,
        offsets: Option<DevPtr<i32>>,
        row_idx: Option<DevPtr<i32>>,
        wptrs: Option<DevPtr<u64>>,
        w_off: i64,
    );
}

#[cfg(test)]
mod tests {
    use super::super::{MMA_SOURCE, SOURCE};
    use super::*;

    /// The kind of one parameter as a `.cu` signature declares it (`const float* x`, `int n`).
    fn kind_of(param: &str) -> ParamKind {
        let words: Vec<&str> = param
            .split(|c: char| c.is_whitespace() || c == '*')
            .filter(|w| !w.is_empty() && *w != "const")
            .collect();
        let (ty, _name) = words.split_at(words.len() - 1);
        let ty = ty.join(" ");
        if param.contains('*') {
            ParamKind::Ptr(match ty.as_str() {
                "float" => Elem::F32,
                "int" => Elem::I32,
                "unsigned long long" => Elem::U64,
                "bf16" => Elem::Act,
                "void" => Elem::Untyped,
                other => panic!("no launcher type for the pointer parameter `{param}` ({other})"),
            })
        } else {
            match ty.as_str() {
                "int" => ParamKind::Int,
                "long long" => ParamKind::Long,
                "unsigned long long" => ParamKind::ULong,
                "float" => ParamKind::Float,
                other => panic!("no launcher type for the parameter `{param}` ({other})"),
            }
        }
    }

    /// Every `extern "C" __global__` kernel of `src`: its name and parameter kinds, in order.
    fn kernels_of(src: &str) -> Vec<(String, Vec<ParamKind>)> {
        const DECL: &str = "extern \"C\" __global__ void ";
        src.match_indices(DECL)
            .map(|(at, _)| {
                let rest = &src[at + DECL.len()..];
                let open = rest.find('(').expect("a kernel's parameter list");
                let close = rest
                    .find(')')
                    .expect("the end of a kernel's parameter list");
                let params = &rest[open + 1..close];
                let kinds = params
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(kind_of)
                    .collect();
                (rest[..open].trim().to_string(), kinds)
            })
            .collect()
    }

    /// What is wrong between the kernels of the `.cu` files and `launchers` (empty: nothing).
    fn mismatches(files: &[(&str, &str)], launchers: &[(&str, &str, &[ParamKind])]) -> Vec<String> {
        let mut wrong = Vec::new();
        let mut kernels = Vec::new();
        for (file, src) in files {
            for (name, kinds) in kernels_of(src) {
                kernels.push((name, *file, kinds));
            }
        }
        for (name, file, kinds) in &kernels {
            match launchers.iter().find(|(n, _, _)| n == name) {
                None => wrong.push(format!("{file}: kernel {name} has no launcher")),
                Some((_, lfile, lkinds)) => {
                    if lfile != file {
                        wrong.push(format!("{name}: in {file}, its launcher says {lfile}"));
                    }
                    if lkinds.len() != kinds.len() {
                        wrong.push(format!(
                            "{name}: the kernel takes {} parameters, its launcher {}",
                            kinds.len(),
                            lkinds.len()
                        ));
                    }
                    for (i, (k, l)) in kinds.iter().zip(lkinds.iter()).enumerate() {
                        if k != l {
                            wrong.push(format!(
                                "{name}: parameter {i} is {k:?} in {file}, {l:?} in its launcher"
                            ));
                        }
                    }
                }
            }
        }
        for (name, file, _) in launchers {
            if !kernels.iter().any(|(n, _, _)| n == name) {
                wrong.push(format!("launcher {name} has no kernel in {file}"));
            }
        }
        wrong
    }

    #[test]
    fn every_launcher_matches_its_kernels_signature() {
        let files = [("model.cu", SOURCE), ("bi_mma.cu", MMA_SOURCE)];
        let found: usize = files.iter().map(|(_, s)| kernels_of(s).len()).sum();
        assert_eq!(found, SIGNATURES.len(), "one launcher per kernel");
        assert_eq!(found, 23);
        let wrong = mismatches(&files, SIGNATURES);
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_launcher_that_drifts_from_its_kernel_is_caught() {
        let src = "extern \"C\" __global__ void k(const float* x, int n, long long s,\n    \
                   unsigned long long seed, float v, bf16* out, void* o, const int* ids) {}";
        use ParamKind::*;
        let right: &[ParamKind] = &[
            Ptr(Elem::F32),
            Int,
            Long,
            ULong,
            Float,
            Ptr(Elem::Act),
            Ptr(Elem::Untyped),
            Ptr(Elem::I32),
        ];
        assert!(mismatches(&[("k.cu", src)], &[("k", "k.cu", right)]).is_empty());
        // Two parameters swapped, one missing, a wrong file, an unknown kernel.
        let swapped: &[ParamKind] = &[Int, Ptr(Elem::F32), Long, ULong, Float, Ptr(Elem::Act)];
        let wrong = mismatches(
            &[("k.cu", src)],
            &[("k", "other.cu", swapped), ("gone", "k.cu", right)],
        );
        assert_eq!(wrong.len(), 5, "{wrong:#?}");
        assert!(mismatches(&[("k.cu", src)], &[]).len() == 1);
    }

    #[test]
    fn a_null_or_misaligned_pointer_is_refused_before_the_launch() {
        assert!(DevPtr::f32(0x1000).check("k", "x").is_ok());
        assert!(matches!(
            DevPtr::f32(0).check("k", "x"),
            Err(CudaError::Input(m)) if m.contains("null")
        ));
        assert!(DevPtr::f32(0x1002).check("k", "x").is_err());
        assert!(DevPtr::u64(0x1004).check("k", "x").is_err());
        assert!(DevPtr::act(0x1002).check("k", "x").is_ok());
        assert!(DevPtr::untyped(0x1001).check("k", "x").is_ok());
        // An optional pointer may be absent, and is checked when present.
        assert_eq!(DevPtr::i32(0).or_null().raw(), 0);
        assert!(DevPtr::i32(0).or_null().check("k", "x").is_ok());
        assert!(Some(DevPtr::i32(0x1001)).check("k", "x").is_err());
        assert_eq!(Some(DevPtr::i32(0x2000)).raw(), 0x2000);
    }

    #[test]
    fn an_empty_grid_is_recognised() {
        assert!(Grid::new((0, 4), 256, 0).is_empty());
        assert!(Grid::xyz((4, 4, 0), 128).is_empty());
        let g = Grid::new((3, 2), 128, 64).config();
        assert_eq!(
            (g.grid_dim, g.block_dim, g.shared_mem_bytes),
            ((3, 2, 1), (128, 1, 1), 64)
        );
    }
}
