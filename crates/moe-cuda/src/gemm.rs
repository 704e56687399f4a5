//! The GEMMs of a rank: cuBLAS (`cublasGemmEx`, pointer-array and strided batched), or in
//! batch-invariant mode the fixed-order kernels (`bi_mma`, `bi_gemm`, `bi_gemm_kn`).

use std::ffi::c_void;

use cudarc::cublas::sys as blas_sys;

use crate::error::{blas, CudaError};
use crate::kernels::{bi_vectorizable, BI_COLS, BI_ROWS, BI_WARPS, MMA_COLS, MMA_ROWS};
use crate::kernels::{DevPtr, Grid};
use crate::rank::RankState;

impl RankState {
    /// `y[rows, outf] (ldy) = x[rows, inf] (ldx, bf16) * w[outf, inf]^T (bf16) + beta * y`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        w: u64,
        x: u64,
        ldx: usize,
        y: u64,
        ldy: usize,
        y_bf16: bool,
        rows: usize,
        inf: usize,
        outf: usize,
        beta: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        if self.batch_invariant {
            let x_ = (x, ldx, 0);
            let w_ = (w, inf, 0);
            return self.bi_gemm(
                false,
                x_,
                w_,
                (y, ldy, 0, y_bf16),
                beta,
                (rows, outf, inf),
                1,
            );
        }
        let alpha = 1.0f32;
        let ct = if y_bf16 {
            self.blas_type
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        // SAFETY: the handle is bound to this rank's stream; `w` holds `outf*inf` bf16 values,
        // `x` `rows` rows of `ldx` bf16 values and `y` `rows` rows of `ldy` outputs, all in live
        // chunks this device can access; alpha and beta are host scalars (host pointer mode).
        blas("cublasGemmEx", unsafe {
            blas_sys::cublasGemmEx(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                outf as i32,
                rows as i32,
                inf as i32,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                self.blas_type,
                inf as i32,
                x as *const c_void,
                self.blas_type,
                ldx as i32,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                ct,
                ldy as i32,
                self.blas_compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// Batched `C_i[n, m] = B_i[n, k] * A_i[m, k]^T` from device pointer arrays (bf16 in, f32 out).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_batched(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
        count: usize,
    ) -> Result<(), CudaError> {
        if count == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `a`, `b`, `c` are device arrays of `count` pointers (uploaded before this call
        // on the same stream) to bf16 `[m, k]` weights, bf16 `[n, k]` rows and f32 `[n, m]`
        // outputs in live chunks this device can access.
        blas("cublasGemmBatchedEx", unsafe {
            blas_sys::cublasGemmBatchedEx(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                a as *const *const c_void,
                self.blas_type,
                k as i32,
                b as *const *const c_void,
                self.blas_type,
                k as i32,
                (&beta as *const f32).cast(),
                c as *const *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m as i32,
                count as i32,
                self.blas_compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// Strided-batched GEMM over heads (bf16 inputs, f32 or bf16 output), column-major terms.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_strided(
        &self,
        trans_a: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        sa: usize,
        b: u64,
        ldb: usize,
        sb: usize,
        c: u64,
        ldc: usize,
        sc: usize,
        c_bf16: bool,
        count: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if self.batch_invariant {
            // Column-major C(i, j) = op(A)(i, p) B(p, j) is row-major out[j, i] = x[j, p] w(i, p)
            // with x = B, out = C, and w = A read as [m, k] rows (`trans_a`) or as [k, m] rows.
            let (x_, w_) = ((b, ldb, sb), (a, lda, sa));
            return self.bi_gemm(
                !trans_a,
                x_,
                w_,
                (c, ldc, sc, c_bf16),
                0.0,
                (n, m, k),
                count,
            );
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ta = if trans_a {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        };
        let ct = if c_bf16 {
            self.blas_type
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        // SAFETY: the caller passes matrices in live chunks of this rank whose extents cover
        // `count` batches at the given strides and leading dimensions.
        blas("cublasGemmStridedBatchedEx", unsafe {
            blas_sys::cublasGemmStridedBatchedEx(
                *self.blas.handle(),
                ta,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                self.blas_type,
                lda as i32,
                sa as i64,
                b as *const c_void,
                self.blas_type,
                ldb as i32,
                sb as i64,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                ct,
                ldc as i32,
                sc as i64,
                count as i32,
                self.blas_compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// The batch-invariant GEMM (see `bi_gemm` in `kernels/model.cu`): for each of `count`
    /// batches, `out[m, n] = sum_k x[m, k] * w(n, k) (+ beta * out)` with `(rows, cols, k)` =
    /// `(m, n, k)`. `x`, `w` and `out` are `(address, leading dimension, batch stride)` in
    /// elements (`out` also says whether it is bf16); `w(n, k)` is `w[n * ld + k]`, or with
    /// `k_major` `w[k * ld + n]`. Every output element's summation order depends on `k` alone.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bi_gemm(
        &self,
        k_major: bool,
        (x, ldx, sx): (u64, usize, usize),
        (w, ldw, sw): (u64, usize, usize),
        (out, ldo, so, out_bf16): (u64, usize, usize, bool),
        beta: f32,
        (rows, cols, k): (usize, usize, usize),
        count: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 || cols == 0 || count == 0 {
            return Ok(());
        }
        let es = if self.blas_type == blas_sys::cudaDataType::CUDA_R_32F {
            4
        } else {
            2
        };
        let (x_, w_, out_) = (DevPtr::act(x), DevPtr::act(w), DevPtr::untyped(out));
        let (ldx_, sx_, ldw_, sw_) = (ldx as i32, sx as i64, ldw as i32, sw as i64);
        let (ldo_, so_, out_bf16_) = (ldo as i32, so as i64, i32::from(out_bf16));
        let (m, n, k_) = (rows as i32, cols as i32, k as i32);
        let row_tiles = rows.div_ceil(BI_ROWS) as u32;
        let launch = self.launch();
        if k_major {
            return launch.bi_gemm_kn(
                Grid::xyz((cols.div_ceil(128) as u32, row_tiles, count as u32), 128),
                x_,
                ldx_,
                sx_,
                w_,
                ldw_,
                sw_,
                out_,
                ldo_,
                so_,
                out_bf16_,
                beta,
                m,
                n,
                k_,
            );
        }
        let aligned = i32::from(bi_vectorizable(es, k, &[x, w], &[ldx, ldw, sx, sw]));
        if launch.has_bi_mma() {
            // Tensor cores (bf16): plain mode, no expert arrays.
            return launch.bi_mma(
                Grid::xyz(
                    (
                        cols.div_ceil(MMA_COLS) as u32,
                        rows.div_ceil(MMA_ROWS) as u32,
                        count as u32,
                    ),
                    128,
                ),
                x_,
                ldx_,
                sx_,
                Some(w_),
                ldw_,
                sw_,
                out_,
                ldo_,
                so_,
                out_bf16_,
                beta,
                m,
                n,
                k_,
                aligned,
                None,
                None,
                None,
                None,
                0,
            );
        }
        launch.bi_gemm(
            Grid::xyz(
                (
                    cols.div_ceil(BI_WARPS * BI_COLS) as u32,
                    row_tiles,
                    count as u32,
                ),
                (32 * BI_WARPS) as u32,
            ),
            x_,
            ldx_,
            sx_,
            w_,
            ldw_,
            sw_,
            out_,
            ldo_,
            so_,
            out_bf16_,
            beta,
            m,
            n,
            k_,
            aligned,
        )
    }
}
